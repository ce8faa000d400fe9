"""A DEQ training step against its floor: what the step costs beyond f, its VJPs and the rest.

    python -m bench.perf.deq_step [--repeats 21] [--paper] [--paper-repeats 3] [--clock wall|cpu]

Goal of issue 18 this holds: a DEQ step (forward + loss + backward; no optimizer step) costs
<= 1.3x its floor at the debug size and <= 1.05x at the paper sizes. The floor is what any
implementation of the same step must spend, each part timed alone in the same round as the step:

    floor = NFE_forward x f(z*)            (f at the equilibrium, no graph)
          + NFE_backward x VJP(z*)         (J^T v through the one retained graph of f, plus dL/dz)
          + outer                          (the model's forward around the solve, the one
                                            differentiable application of f, the loss, and the
                                            backward through them: the step with both solves
                                            replaced by "z* is already known")

step / floor, per round, is the solvers' whole cost: their bookkeeping, host reads, and any f
or VJP call beyond the NFE. The NFE are the step's own (the same in every round: fixed inputs,
no optimizer step, dropout off). Paper sizes (--paper) are slow on a CPU: batch 2 at the paper's
sequence length 150, core mode, the first segment (no Transformer-XL memory), a few rounds.
"""

from __future__ import annotations

import argparse
import contextlib
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import Tensor

from bench.measure.timing import summarize
from bench.perf.counting import OpCount
from bench.perf.paired import (
    add_clock_argument,
    header,
    interleaved,
    ratios,
    set_one_thread,
    spread,
    use_clock,
)
from models import build_model
from models.stats import ModelStats

DEBUG_CASES = (
    ("deq-transformer", "debug", 2, 32),
    ("deq-transformer", "debug", 2, 128),
    ("deq-trellisnet", "debug", 2, 32),
    ("deq-trellisnet", "debug", 2, 128),
)
PAPER_CASES = (
    ("deq-transformer", "paper-small", 2, 150),
    ("deq-trellisnet", "paper-ptb", 2, 150),
)
NO_DROPOUT = {"deq-transformer": {"dropout": 0.0}, "deq-trellisnet": {"dropout": 0.0, "dropouth": 0.0}}


class _StandIn:
    """Stands in for model.deq; its settings (subseq_len, ...) are the DEQ's."""

    def __init__(self, deq) -> None:
        self.deq = deq

    def __getattr__(self, name: str):
        return getattr(self.deq, name)


class _Capture(_StandIn):
    """Stands in for model.deq once: keeps f and z* of a real solve, then solves as usual."""

    def __call__(self, f, z0, stats=None):
        self.f = f
        self.z_star = self.deq.solve_forward(f, z0)[0].detach()
        return self.deq(f, z0, stats)


class _Known(_StandIn):
    """Stands in for model.deq in the outer step: z* is known, apply f once with a graph."""

    def __init__(self, z_star: Tensor, deq) -> None:
        super().__init__(deq)
        self.z_star = z_star

    def __call__(self, f, z0, stats=None):
        return f(self.z_star), ModelStats() if stats is None else stats


@dataclass
class StepFloor:
    case: str
    nfe_forward: int
    nfe_backward: int
    step: list[float]
    floor: list[float]
    parts: dict[str, list[float]]
    ops: tuple[int, int] = (0, 0)  # aten ops (views included) of one step, and of its floor
    beyond: dict[str, int] = field(default_factory=dict)  # op -> its count in the step minus the floor's

    @property
    def ratio(self) -> list[float]:
        return ratios(self.step, self.floor)


def measure(model_name: str, size: str, batch: int, seq_len: int, repeats: int,
            warmup: int = 2) -> StepFloor:
    torch.manual_seed(0)
    model = build_model(model_name, size, mode="core", **NO_DROPOUT[model_name]).train()
    params = [p for p in model.parameters() if p.requires_grad]
    x = torch.randn(batch, seq_len, model.config.d_model)
    target = torch.randn_like(x) if model_name == "deq-transformer" else None
    deq = model.deq

    def step(deq_like=deq) -> ModelStats:
        model.deq = deq_like
        out, stats = model(x)
        model.loss(out, target if target is not None else torch.zeros_like(out)).backward()
        for p in params:
            p.grad = None
        model.deq = deq
        return stats

    stats = step()
    if target is None:  # TrellisNet's output width is its own: make the target to match
        with torch.no_grad():
            target = torch.randn_like(model(x)[0])
        stats = step()
    nfe_f, nfe_b = stats.nfe_forward, stats.nfe_backward
    capture = _Capture(deq)
    step(capture)
    f, z_star = capture.f, capture.z_star
    known = _Known(z_star, deq)
    z_in = z_star.clone().requires_grad_()
    z_out = f(z_in)  # the graph the adjoint solve differentiates through
    v = torch.randn_like(z_out)

    def forward_calls() -> None:
        with torch.no_grad():
            for _ in range(nfe_f):
                f(z_star)

    def vjps() -> None:
        for _ in range(nfe_b):
            (g,) = torch.autograd.grad(z_out, z_in, v, retain_graph=True)
            g.add_(v)

    with OpCount() as step_ops:
        step()
    floor_ops: Counter[str] = Counter()
    for run, times in ((lambda: step(known), 1), (lambda: f(z_star), nfe_f), (vjps, 1)):
        with OpCount() as count, torch.no_grad() if times == nfe_f else contextlib.nullcontext():
            run()
        floor_ops.update({op: n * times for op, n in count.ops.items()})
    beyond = {op: step_ops.ops[op] - floor_ops[op] for op in step_ops.ops | floor_ops
              if step_ops.ops[op] != floor_ops[op]}
    seen: list[tuple[int, int]] = []

    def full() -> None:
        s = step()
        seen.append((s.nfe_forward, s.nfe_backward))

    t = interleaved({"step": full, "outer": lambda: step(known), "f": forward_calls, "vjp": vjps},
                    repeats, warmup)
    if set(seen) != {(nfe_f, nfe_b)}:
        raise RuntimeError(f"NFE changed between rounds: {sorted(set(seen))}")
    floor = [a + b + c for a, b, c in zip(t["outer"], t["f"], t["vjp"], strict=True)]
    return StepFloor(f"{model_name}/{size}/B{batch}/T{seq_len}", nfe_f, nfe_b, t["step"], floor,
                     {"outer": t["outer"], "f": t["f"], "vjp": t["vjp"]},
                     (step_ops.total, floor_ops.total()), beyond)


def report(result: StepFloor, goal: float) -> None:
    med = summarize(result.ratio)[0]
    print(f"\n{result.case}: NFE forward {result.nfe_forward}, backward {result.nfe_backward}")
    print(f"  step  {spread(result.step, 1e3, ' ms')}")
    print(f"  floor {spread(result.floor, 1e3, ' ms')} = outer {spread(result.parts['outer'], 1e3, ' ms')}"
          f" + {result.nfe_forward} f {spread(result.parts['f'], 1e3, ' ms')}"
          f" + {result.nfe_backward} VJP {spread(result.parts['vjp'], 1e3, ' ms')}")
    step_ops, floor_ops = result.ops
    print(f"  aten ops (views included; deterministic): step {step_ops}, floor {floor_ops}: "
          f"{(step_ops - floor_ops) / (result.nfe_forward + result.nfe_backward):.1f} beyond the floor "
          f"per solver iteration")
    # whose ops: the solvers' own (bmm, baddbmm, norms, ...) or f's / its backward's (the model, the glue)
    top = sorted(result.beyond.items(), key=lambda item: (-abs(item[1]), item[0]))[:8]
    print("    beyond the floor, by op: " + ", ".join(f"{op.removeprefix('aten.')} {n:+d}" for op, n in top))
    verdict = "met" if med <= goal else "not met"
    print(f"  step / floor {spread(result.ratio)}x  (goal <= {goal}x: {verdict})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--paper", action="store_true", help="also the paper sizes (slow on a CPU)")
    parser.add_argument("--paper-repeats", type=int, default=3)
    parser.add_argument("--only-paper", action="store_true")
    add_clock_argument(parser)
    args = parser.parse_args(argv)
    set_one_thread()
    use_clock(args.clock)
    header("bench.perf.deq_step: a DEQ training step (forward + loss + backward) against its floor",
           args.repeats)
    print("# models built with their default solver settings (Broyden, implicit backward), core mode, "
          "dropout off")
    if not args.only_paper:
        for case in DEBUG_CASES:
            report(measure(*case, repeats=args.repeats), goal=1.3)
    if args.paper or args.only_paper:
        print(f"\n# paper sizes: batch 2 x seq 150, first segment, {args.paper_repeats} rounds, 1 warm-up")
        for case in PAPER_CASES:
            report(measure(*case, repeats=args.paper_repeats, warmup=1), goal=1.05)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
