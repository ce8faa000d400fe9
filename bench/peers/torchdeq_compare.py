"""Our DEQ engine against torchdeq 0.1.0 on one transformer-like cell, interleaved in one process.

    python -m bench.peers.torchdeq_compare [--out DIR] [--reps 15] [--clock wall|cpu]

Same cell, same solver, same iteration caps and tolerances (stop modes set explicitly on both;
torchdeq asked for implicit gradients with `ift=True`, in both of its implementations: the
default autograd.Function, which re-runs f in backward, and `hook_ift=True`). Per implementation
and solver: median step time (forward + backward) with IQR, tracked peak bytes, forward and
backward NFE, gradient error against autograd through 500 unrolled float64 iterations, and the
solver's own overhead (time outside f and its VJPs), measured on a trivial f of the same state
shape with both libraries making the same number of f calls (counted, and printed). Writes
`torchdeq.csv` and `torchdeq_overhead.csv`; prints the ratios.
"""

from __future__ import annotations

import argparse
import copy
import csv
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bench.measure.timing import summarize
from bench.measure.tracked import LiveTensorCounter
from bench.perf.paired import (
    CLOCKS,
    add_clock_argument,
    current_clock,
    interleaved,
    ratios,
    use_clock,
)
from models.deq import DEQ
from models.solvers import solve

SOLVER_NAMES = {"broyden": "broyden", "anderson": "anderson", "fixed_point": "fixed_point_iter"}
F_MAX, B_MAX, F_TOL, B_TOL, STOP = 30, 40, 1e-4, 1e-6, "rel"
ANDERSON_M = 6  # torchdeq's default window; ours is set to match
# The overhead solves test a tolerance no solver reaches in their iterations: both libraries read
# the residual every iteration and run to their caps, so the f calls they make can be matched.
OVERHEAD_TOL = 1e-12


class Cell(nn.Module):
    """Post-LN transformer cell f(z; x): causal SDPA attention with the injection added to QKV."""

    def __init__(self, d: int = 128, heads: int = 2, d_ff: int = 512) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ff = nn.Sequential(nn.Linear(d, d_ff), nn.ReLU(), nn.Linear(d_ff, d))
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.inject = nn.Linear(d, 3 * d)
        with torch.no_grad():  # a contractive start, as DEQ training keeps it
            for lin in (self.qkv, self.proj, self.ff[0], self.ff[2]):
                lin.weight.mul_(0.3)
            # A post-LN residual cell contracts only as fast as the injection pulls it: a
            # stronger injection makes both libraries converge within the 30-iteration cap,
            # so gradient errors measure the backward, not an unfinished forward.
            self.inject.weight.mul_(3.0)

    def forward(self, z: Tensor, injection: Tensor) -> Tensor:
        B, T, d = z.shape
        qkv = (self.qkv(z) + injection).view(B, T, 3, self.heads, d // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, h, T, d/h)
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        z = self.ln1(z + self.proj(attn.transpose(1, 2).reshape(B, T, d)))
        return self.ln2(z + self.ff(z))


@dataclass
class Row:
    impl: str
    solver: str
    step_s_median: float
    step_s_iqr: float
    peak_bytes: int
    nfe_forward: float
    nfe_backward: float
    grad_rel_err: float
    reps: int


def _ours(solver: str) -> Callable[[Callable[[Tensor], Tensor], Tensor], tuple[Tensor, dict]]:
    opts = {"m": ANDERSON_M} if solver == "anderson" else {}
    deq = DEQ(solver=solver, max_iter=F_MAX, tol=F_TOL, stop_mode=STOP, b_max_iter=B_MAX,
              b_tol=B_TOL, solver_options=opts)
    last: dict = {}

    def run(f, z0):
        z, stats = deq(f, z0)
        last["stats"] = stats
        return z, last

    run.nfe = lambda: (last["stats"].nfe_forward, last["stats"].nfe_backward)  # type: ignore[attr-defined]
    return run


def _torchdeq(solver: str, hook: bool):
    from torchdeq import get_deq

    backward_info: dict = {}
    deq = get_deq(
        f_solver=SOLVER_NAMES[solver], b_solver=SOLVER_NAMES[solver], f_max_iter=F_MAX,
        b_max_iter=B_MAX, f_tol=F_TOL, b_tol=B_TOL, f_stop_mode=STOP, b_stop_mode=STOP,
        ift=not hook, hook_ift=hook,
    )
    deq.train()
    last: dict = {}

    def writer(info):
        backward_info["nstep"] = float(info["nstep"].float().mean())

    def run(f, z0):
        z_list, info = deq(f, z0, backward_writer=writer)
        last["nstep"] = float(info["nstep"].float().mean())
        return z_list[-1], last

    run.nfe = lambda: (last["nstep"], backward_info.get("nstep", float("nan")))  # type: ignore[attr-defined]
    return run


def _step(cell: Cell, run, x: Tensor, target: Tensor) -> None:
    injection = cell.inject(x)
    z, _ = run(lambda z: cell(z, injection), torch.zeros_like(x))
    F.mse_loss(z, target).backward()
    for p in cell.parameters():
        p.grad = None


def _grads(cell: Cell, run, x: Tensor, target: Tensor) -> list[Tensor]:
    injection = cell.inject(x)
    z, _ = run(lambda z: cell(z, injection), torch.zeros_like(x))
    F.mse_loss(z, target).backward()
    grads = [p.grad.detach().double().clone() for p in cell.parameters()]
    for p in cell.parameters():
        p.grad = None
    return grads


def _reference_grads(cell: Cell, x: Tensor, target: Tensor) -> list[Tensor]:
    ref = copy.deepcopy(cell).double()
    deq = DEQ(backward="unrolled", max_iter=500, tol=0.0)
    xd, td = x.double(), target.double()
    injection = ref.inject(xd)
    z, _ = deq(lambda z: ref(z, injection), torch.zeros_like(xd))
    F.mse_loss(z, td).backward()
    return [p.grad.detach().clone() for p in ref.parameters()]


def _peak(cell: Cell, run, x: Tensor, target: Tensor) -> int:
    counter = LiveTensorCounter()
    counter.track(cell, x, target)
    with counter:
        _step(cell, run, x, target)
    return counter.peak_bytes


def compare(batch: int = 8, seq: int = 64, d: int = 128, heads: int = 2, reps: int = 15,
            warmup: int = 3, solvers: tuple[str, ...] = ("broyden", "anderson")) -> list[Row]:
    torch.manual_seed(0)
    cell = Cell(d, heads)
    x = torch.randn(batch, seq, d)
    target = torch.randn(batch, seq, d)
    reference = _reference_grads(cell, x, target)
    clock = CLOCKS[current_clock()]
    rows = []
    for solver in solvers:
        impls = {"deq-bench": _ours(solver), "torchdeq": _torchdeq(solver, hook=False),
                 "torchdeq-hook": _torchdeq(solver, hook=True)}
        times: dict[str, list[float]] = {name: [] for name in impls}
        for _ in range(warmup):
            for run in impls.values():
                _step(cell, run, x, target)
        for _ in range(reps):  # interleaved: drift hits every implementation alike
            for name, run in impls.items():
                t0 = clock()
                _step(cell, run, x, target)
                times[name].append(clock() - t0)
        for name, run in impls.items():
            grads = _grads(cell, run, x, target)
            nfe_f, nfe_b = run.nfe()
            err = max(((g - r).norm() / r.norm()).item() for g, r in zip(grads, reference, strict=True))
            median, iqr = summarize(times[name])
            rows.append(Row(name, solver, median, iqr, _peak(cell, run, x, target), nfe_f, nfe_b, err, reps))
    return rows


def solver_overhead(batch: int = 8, seq: int = 64, d: int = 128, iters: int = 20, reps: int = 30,
                    solvers: tuple[str, ...] = ("broyden", "anderson", "fixed_point")) -> list[dict]:
    """Seconds per f call spent outside f, at equal NFE, for a trivial f(z) = x + a * z.

    The rates a are spread over [0, 0.9) per coordinate, so no solver converges within `iters`
    iterations (with one isotropic rate Broyden solves the linear map exactly in a few steps and
    stops, which made an earlier version of this comparison count 5 calls against 20). torchdeq's
    f calls for `iters` iterations are counted (its Broyden makes one before its loop); ours runs
    exactly as many. Per round: time of the solve minus the same number of f calls alone."""
    from torchdeq.solver import get_solver

    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, seq, d, generator=g)
    a = 0.9 * torch.rand(seq, d, generator=g)
    z0 = torch.zeros_like(x)
    calls = [0]

    def f(z):
        calls[0] += 1
        return torch.addcmul(x, a, z)

    def nfe_of(run) -> int:
        calls[0] = 0
        run()
        return calls[0]

    out = []
    for solver in solvers:
        opts = {"m": ANDERSON_M} if solver == "anderson" else {}
        theirs = get_solver(SOLVER_NAMES[solver])

        def run_theirs(theirs=theirs):
            return theirs(f, z0, max_iter=iters, tol=OVERHEAD_TOL, stop_mode=STOP)

        nfe = nfe_of(run_theirs)

        def run_ours(solver=solver, opts=opts, nfe=nfe):
            return solve(f, z0, solver=solver, max_iter=nfe, tol=OVERHEAD_TOL, stop_mode=STOP, **opts)

        if nfe_of(run_ours) != nfe:
            raise RuntimeError(f"{solver}: deq-bench stopped before torchdeq's {nfe} f calls")

        def f_alone(nfe=nfe):
            z = z0
            for _ in range(nfe):
                z = f(z)

        t = interleaved({"f": f_alone, "deq-bench": run_ours, "torchdeq": run_theirs}, reps, warmup=3)
        over = {name: [(s - f_s) / nfe for s, f_s in zip(t[name], t["f"], strict=True)]
                for name in ("deq-bench", "torchdeq")}
        ratio, ratio_iqr = summarize(ratios(over["deq-bench"], over["torchdeq"]))
        for name in ("deq-bench", "torchdeq"):
            solve_median, solve_iqr = summarize(t[name])
            per_nfe, per_nfe_iqr = summarize(over[name])
            out.append({"impl": name, "solver": solver, "nfe": nfe, "reps": reps,
                        "solve_s_median": solve_median, "solve_s_iqr": solve_iqr,
                        "overhead_per_nfe_s": per_nfe, "overhead_per_nfe_iqr_s": per_nfe_iqr,
                        "overhead_ratio_to_torchdeq": ratio if name == "deq-bench" else 1.0,
                        "overhead_ratio_iqr": ratio_iqr if name == "deq-bench" else 0.0})
    return out


def _write(path: Path, rows: list[dict]) -> None:
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("results/reference/cpu"))
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads for both libraries (default 1: stable on shared cores)")
    add_clock_argument(parser)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    use_clock(args.clock)
    try:
        import torchdeq  # noqa: F401
    except ImportError:
        print("torchdeq is not installed: pip install -e '.[peers]'")
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    rows = compare(reps=args.reps)
    overhead = solver_overhead()
    # Solver share of our step: forward + backward solver overhead at the measured NFE.
    per_iter = {(r["impl"], r["solver"]): r["overhead_per_nfe_s"] for r in overhead}
    table = []
    for r in rows:
        row = asdict(r)
        key = ("deq-bench" if r.impl == "deq-bench" else "torchdeq", r.solver)
        spent = per_iter[key] * (r.nfe_forward + r.nfe_backward)
        row["solver_overhead_share"] = spent / r.step_s_median
        table.append(row)
    _write(args.out / "torchdeq.csv", table)
    _write(args.out / "torchdeq_overhead.csv", overhead)
    from bench.env import capture
    from bench.results import write_json

    env = capture("cpu", ["python", "-m", "bench.peers.torchdeq_compare", *(argv or sys.argv[1:])])
    env["torch_threads"] = torch.get_num_threads()
    env["clock"] = current_clock()
    write_json(args.out / "torchdeq_env.json", env)
    print(f"{'impl':<14}{'solver':<10}{'step ms':>9}{'iqr ms':>8}{'peak MB':>9}{'nfe f/b':>10}"
          f"{'grad err':>10}{'solver%':>8}")
    for row in table:
        print(f"{row['impl']:<14}{row['solver']:<10}{1e3 * row['step_s_median']:>9.2f}"
              f"{1e3 * row['step_s_iqr']:>8.2f}{row['peak_bytes'] / 1e6:>9.2f}"
              f"{row['nfe_forward']:>5.0f}/{row['nfe_backward']:<4.0f}{row['grad_rel_err']:>10.1e}"
              f"{100 * row['solver_overhead_share']:>7.1f}%")
    by = {(r["impl"], r["solver"]): r for r in table}
    for solver in ("broyden", "anderson"):
        ours = by[("deq-bench", solver)]
        for peer in ("torchdeq", "torchdeq-hook"):
            them = by[(peer, solver)]
            print(f"{solver}: ours/{peer} step time {ours['step_s_median'] / them['step_s_median']:.2f}x, "
                  f"peak {ours['peak_bytes'] / them['peak_bytes']:.2f}x")
    for r in overhead:
        if r["impl"] == "deq-bench":
            theirs = next(t for t in overhead if t["impl"] == "torchdeq" and t["solver"] == r["solver"])
            print(f"{r['solver']} solver overhead per f call (trivial f, {r['nfe']} f calls on both "
                  f"sides, {r['reps']} interleaved rounds): ours {1e6 * r['overhead_per_nfe_s']:.0f} us "
                  f"(IQR {1e6 * r['overhead_per_nfe_iqr_s']:.0f}), torchdeq "
                  f"{1e6 * theirs['overhead_per_nfe_s']:.0f} us (IQR {1e6 * theirs['overhead_per_nfe_iqr_s']:.0f}), "
                  f"ours/torchdeq {r['overhead_ratio_to_torchdeq']:.2f}x (IQR {r['overhead_ratio_iqr']:.2f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
