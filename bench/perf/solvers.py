"""What the solvers cost besides f: per-iteration overhead, Broyden's history reads, host syncs.

    python -m bench.perf.solvers [--repeats 41] [--iters 30] [--batch 2] [--dim 1024] [--clock wall|cpu]

Goals of issue 18 this holds:
- overhead: Broyden's and Anderson's per-iteration overhead <= 2x fixed point's on a trivial f.
  The f is one elementwise op, f(z) = x + a * z with rates a spread over [0, 0.9) (no solver
  converges in `--iters` iterations, so every solve makes exactly that many f calls: checked).
  Overhead per iteration = (time of one solve - time of the same number of f calls alone) / NFE,
  both timed in the same round. Printed beside it: the whole time per iteration.
- history reads: Broyden passes over its U/V history <= 4 times per iteration. Counted exactly
  (a dispatch mode counts the ops that read two or more stored pairs of U or V), and timed per
  iteration at 8 x 8192, where a solve is bandwidth-bound, against fixed point's.
- host syncs: none per iteration where a read cannot change the result (tol <= 0, or
  `fixed_iterations()`), one every k iterations with `check_every=k`. Counted exactly.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Callable

import torch
from torch import Tensor

from bench.measure.timing import summarize
from bench.perf.counting import HistoryReads, HostReads, OpCount
from bench.perf.paired import (
    add_clock_argument,
    header,
    interleaved,
    ratios,
    set_one_thread,
    spread,
    use_clock,
)
from models.solvers import fixed_iterations, solve, solver_options

SOLVERS = ("fixed_point", "broyden", "anderson")
TOL = 1e-12  # positive, so the stopping test runs (and reads the host) every iteration; never met


def trivial_map(batch: int, dim: int, seed: int = 0) -> tuple[Callable[[Tensor], Tensor], Tensor]:
    """f(z) = x + a * z, one aten op, with per-coordinate rates a in [0, 0.9): a contraction whose
    slow coordinates keep every solver busy for many iterations."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, dim, generator=g)
    a = 0.9 * torch.rand(dim, generator=g)

    def f(z: Tensor) -> Tensor:
        return torch.addcmul(x, a, z)

    return f, torch.zeros(batch, dim)


def _solve(f, z0, solver: str, iters: int, tol: float = TOL, **options):
    return solve(f, z0, solver=solver, max_iter=iters, tol=tol, **options)


def overhead(batch: int, dim: int, iters: int, repeats: int) -> dict[str, float]:
    f, z0 = trivial_map(batch, dim)
    for solver in SOLVERS:  # equal NFE, or the per-iteration comparison means nothing
        nfe = _solve(f, z0, solver, iters)[1].nfe
        if nfe != iters:
            raise RuntimeError(f"{solver} made {nfe} f calls, not {iters}: pick another map")

    def f_alone():
        z = z0
        for _ in range(iters):
            z = f(z)

    variants = {"f": f_alone, **{s: (lambda s=s: _solve(f, z0, s, iters)) for s in SOLVERS}}
    t = interleaved(variants, repeats)
    per_iter = {name: [s / iters for s in t[name]] for name in t}
    over = {s: [(a - b) / iters for a, b in zip(t[s], t["f"], strict=True)] for s in SOLVERS}
    print(f"\n## overhead on a trivial f, (B, D) = ({batch}, {dim}), {iters} iterations (NFE = {iters} "
          f"for every solver), tol {TOL:g} (checked every iteration)")
    print(f"{'':<12}{'time per iteration':>28}{'overhead per iteration':>30}")
    print(f"{'f alone':<12}{spread(per_iter['f'], 1e6, ' us'):>28}")
    for s in SOLVERS:
        print(f"{s:<12}{spread(per_iter[s], 1e6, ' us'):>28}{spread(over[s], 1e6, ' us'):>30}")
    out = {}
    for s in ("broyden", "anderson"):
        r = ratios(over[s], over["fixed_point"])
        out[s] = summarize(r)[0]
        print(f"{s} / fixed_point overhead per iteration: {spread(r)}x  (goal <= 2x); "
              f"whole time per iteration: {spread(ratios(per_iter[s], per_iter['fixed_point']))}x")
    return out


def ops_per_iteration(batch: int, dim: int) -> dict[str, float]:
    """aten ops (views included) per iteration, f's one op included: the difference between a
    20- and a 10-iteration solve. Deterministic, unlike the timings."""
    f, z0 = trivial_map(batch, dim)
    per_iteration = {}
    for s in SOLVERS:
        totals = []
        for n in (10, 20):
            with OpCount() as count:
                _solve(f, z0, s, n)
            totals.append(count.total)
        per_iteration[s] = (totals[1] - totals[0]) / 10
    print("aten ops per iteration (f's one op included; views count): "
          + ", ".join(f"{s} {n:g}" for s, n in per_iteration.items()))
    return per_iteration


def history_reads(dim: int = 64, batch: int = 2, memory: int | None = None) -> tuple[float, float]:
    """Passes over U/V per Broyden update in steady state, and single-pair reads: differences
    between two solve lengths, so the first updates (with an empty history) do not count.
    `memory` < the iterations makes the buffers wrap around."""
    f, z0 = trivial_map(batch, dim)
    counts = {}
    for n in (10, 20):
        options = {} if memory is None else {"memory": memory}
        with HistoryReads(batch, n if memory is None else memory, dim) as counter:
            _solve(f, z0, "broyden", n, **options)
        counts[n] = (counter.passes, counter.row_reads)
        ops = dict(counter.ops)
    passes, rows = ((counts[20][i] - counts[10][i]) / 10 for i in range(2))
    label = "" if memory is None else f", history of {memory} pairs (wrapping around)"
    print(f"\n## Broyden history passes per iteration{label}: {passes:g} (goal <= 4), and {rows:g} "
          f"single-pair reads (one state's bytes each: the new u read back, and when wrapping the "
          f"pair that leaves). Ops making the "
          f"passes in a 20-iteration solve: {ops}")
    return passes, rows


def bandwidth(batch: int, dim: int, iters: int, repeats: int) -> None:
    f, z0 = trivial_map(batch, dim)
    variants = {s: (lambda s=s: _solve(f, z0, s, iters)) for s in ("fixed_point", "broyden")}
    t = interleaved(variants, repeats)
    per_iter = {s: [x / iters for x in t[s]] for s in t}
    history_mb = 2 * batch * iters * dim * 4 / 1e6
    print(f"\n## bandwidth-bound: (B, D) = ({batch}, {dim}), {iters} iterations, U + V = {history_mb:.0f} MB")
    for s in variants:
        print(f"{s:<12} per iteration {spread(per_iter[s], 1e3, ' ms')}")
    print(f"broyden / fixed_point per iteration: {spread(ratios(per_iter['broyden'], per_iter['fixed_point']))}x")


def host_reads(iters: int = 12, batch: int = 2, dim: int = 64) -> dict[tuple[str, str], int]:
    """Host reads per solve of `iters` iterations in each checking regime."""
    f, z0 = trivial_map(batch, dim)
    regimes: dict[str, tuple[dict, contextlib.AbstractContextManager | None]] = {
        "tol > 0": ({}, None),
        "tol = 0": ({"tol": 0.0}, None),
        "tol < 0": ({"tol": -1.0}, None),
        "fixed_iterations()": ({}, "fixed"),
    }
    if "check_every" in solver_options("broyden"):
        regimes["tol > 0, check_every=4"] = ({"check_every": 4}, None)
    counts = {}
    print(f"\n## host reads per solve of {iters} iterations (tolist, item, bool: each one a sync on a GPU)")
    print(f"{'regime':<26}" + "".join(f"{s:>13}" for s in SOLVERS))
    for name, (kwargs, mode) in regimes.items():
        line = f"{name:<26}"
        for s in SOLVERS:
            with fixed_iterations() if mode else contextlib.nullcontext(), HostReads() as reads:
                _solve(f, z0, s, iters, **kwargs)
            counts[(name, s)] = reads.count
            line += f"{reads.count:>13}"
        print(line)
    return counts


def deferred_timing(batch: int, dim: int, iters: int, repeats: int) -> None:
    """Per-iteration time reading the residuals every iteration, every 4, or (tol <= 0) every
    16. On a CPU a read costs no more than any op; the point of fewer reads is a GPU's queue."""
    f, z0 = trivial_map(batch, dim)
    regimes = {"every iteration": {}, "check_every=4": {"check_every": 4}, "tol=0 (every 16)": {"tol": 0.0}}
    print(f"\n## host reads and time: (B, D) = ({batch}, {dim}), {iters} iterations, per iteration")
    for s in SOLVERS:
        variants = {name: (lambda s=s, o=o: _solve(f, z0, s, iters, **o)) for name, o in regimes.items()}
        t = interleaved(variants, repeats)
        base = t["every iteration"]
        cells = [f"{name} {spread([x / iters for x in t[name]], 1e6, ' us')}" for name in regimes]
        rel = [f"{name}: {spread(ratios(t[name], base))}x" for name in list(regimes)[1:]]
        print(f"{s:<12}" + "; ".join(cells) + " | vs every iteration: " + ", ".join(rel))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=41)
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--skip-bandwidth", action="store_true", help="skip the 8 x 8192 timing")
    add_clock_argument(parser)
    args = parser.parse_args(argv)
    set_one_thread()
    use_clock(args.clock)
    header("bench.perf.solvers: solver cost besides f", args.repeats)
    overhead(args.batch, args.dim, args.iters, args.repeats)
    ops_per_iteration(args.batch, args.dim)
    history_reads()
    history_reads(memory=5)
    if not args.skip_bandwidth:
        bandwidth(8, 8192, args.iters, max(5, args.repeats // 4))
    host_reads()
    deferred_timing(args.batch, args.dim, args.iters, max(5, args.repeats // 2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
