"""`measure(workload, instruments)`: one workload through every instrument, as one result row.

Order, so that no instrument disturbs another:
1. predict: a bench of fake tensors, primed (the state a warm-up step leaves, made without its
   backward: `Bench.prime`), one step under `predicted` (no allocation).
2. the real bench is built after `prepare()` (NVML's idle baseline), warmed up by one step
   (Adam's state, lazy buffers, the allocator's cache), then
   - memory: one step under the memory instruments together (torch_cuda, nvml, tracked);
   - flops: one step under the FLOP counter;
   - timed: the timing instrument's warm-up, then repeated steps with only timing and NVML's
     energy counter attached, for at least their steps and seconds.
Raw bytes and seconds; a number no instrument could give is None, never 0.
"""

from __future__ import annotations

import gc
import math
import time
from collections.abc import Sequence
from typing import Any

import torch

from bench.measure.instrument import FLOPS, MEMORY, PASSES, PREDICT, TIMED, Instrument
from bench.measure.workload import Bench, Workload, fake_tensors
from models import ModelStats

RESULT_COLUMNS = (
    "memory_source",
    "peak_bytes",
    "static_bytes",
    "activation_bytes",
    "solver_workspace_bytes",
    "reserved_bytes",
    "nvml_process_bytes",
    "nvml_device_bytes",
    "tracked_bytes",
    "predicted_bytes",
    "predicted_cuda_bytes",
    "step_s_median",
    "step_s_iqr",
    "tokens_per_s",
    "energy_j_per_token",
    "flops_per_token",
    "nfe_forward",
    "nfe_backward",
    "residual_forward",
    "residual_backward",
)
# Which instrument's peak is the row's peak_bytes, best first: (source, peak key, static key).
MEMORY_SOURCES = (
    ("torch_cuda", "cuda_peak_bytes", "cuda_static_bytes"),
    ("tracked", "tracked_bytes", "tracked_static_bytes"),
    ("predicted", "predicted_bytes", "predicted_static_bytes"),
)


def measure(workload: Workload, chosen: Sequence[Instrument], *, warmup: int = 1) -> dict[str, Any]:
    """The result columns of one workload (RESULT_COLUMNS first, then each instrument's extras,
    `params`, `params_nonembed`, `predict_s`, `diverged` and `notes`).

    `chosen`: instrument instances (e.g. `make_instrument("timing", repeats=20)`; one measure()
    call each; `bench.measure.measure` takes names). Instruments the device does not allow are
    skipped, the reason in `notes`. Errors of the workload itself (out of memory, a crashing
    model) propagate."""
    if warmup < 1:
        raise ValueError("warmup must be >= 1: static memory exists only after a first step")
    device = torch.device(workload.device)
    active: list[Instrument] = []
    notes: list[str] = []
    for inst in chosen:
        ok, why = inst.available(device)
        if ok:
            active.append(inst)
        else:
            notes.append(f"{inst.name} unavailable: {why}")
    joined = {p: [i for i in active if p in i.passes] for p in PASSES}

    stats: ModelStats | None = None  # of the first measured real step, else the fake one
    extra: dict[str, Any] = {}
    if joined[PREDICT]:
        started = time.perf_counter()
        with fake_tensors():
            bench = Bench(workload, fake=True)
            bench.prime(warmup)
            stats = run_pass(bench, joined[PREDICT], PREDICT)
            extra |= _params(bench)
            del bench
        # The fake graph is garbage now: collect it before the real passes, not during them
        # (cheap where the process froze its imports: bench.worker, the test session).
        gc.collect()
        extra["predict_s"] = time.perf_counter() - started

    real_passes = [p for p in (MEMORY, FLOPS, TIMED) if joined[p]]
    if real_passes:
        for inst in active:
            inst.prepare(workload)
        bench = Bench(workload)
        bench.warm_up(warmup)
        extra |= _params(bench)
        for i, pass_name in enumerate(real_passes):
            pass_stats = run_pass(bench, joined[pass_name], pass_name)
            if i == 0:
                stats = pass_stats
        del bench

    results: dict[str, Any] = {}
    for inst in active:
        results |= inst.results()
        notes.extend(f"{inst.name}: {note}" for note in inst.notes)
    row = dict.fromkeys(RESULT_COLUMNS)
    row |= {k: v for k, v in results.items() if k in row}
    row |= _memory_breakdown(results, stats)
    row |= _solver_columns(stats)
    extras = {k: v for k, v in results.items() if k not in row}
    return {**row, **extras, **extra, "diverged": bool(stats and stats.diverged),
            "notes": "; ".join(dict.fromkeys(notes))}


def run_pass(bench: Bench, instruments: Sequence[Instrument], pass_name: str) -> ModelStats:
    """Steps of `bench` observed by `instruments`; returns the first step's stats. The timed
    pass runs each instrument's warm-up first, then at least `min_steps` steps and
    `min_seconds`; every other pass is one step."""
    cuda = bench.device.type == "cuda" and not bench.fake
    min_steps, min_seconds = 1, 0.0
    if pass_name == TIMED:
        bench.warm_up(max((i.warmup_steps for i in instruments), default=0))
        min_steps = max(i.min_steps for i in instruments)
        min_seconds = max(i.min_seconds for i in instruments)
    for inst in instruments:
        inst.start(bench, pass_name)
    first: ModelStats | None = None
    steps, started = 0, time.perf_counter()
    try:
        while steps < min_steps or time.perf_counter() - started < min_seconds:
            for inst in instruments:
                inst.before_step(bench)
            stats = bench.step()
            if cuda:
                torch.cuda.synchronize(bench.device)
            for inst in reversed(instruments):
                inst.after_step(bench)
            if first is None:
                first = stats
            steps += 1
    finally:
        for inst in reversed(instruments):
            inst.stop(bench, pass_name)
    assert first is not None
    return first


def _params(bench: Bench) -> dict[str, int]:
    return {"params": bench.num_params(), "params_nonembed": bench.num_params(non_embedding=True)}


def _memory_breakdown(results: dict[str, Any], stats: ModelStats | None) -> dict[str, Any]:
    row: dict[str, Any] = {}
    for source, peak_key, static_key in MEMORY_SOURCES:
        if results.get(peak_key) is not None:
            peak, static = results[peak_key], results[static_key]
            row = {
                "memory_source": source,
                "peak_bytes": peak,
                "static_bytes": static,
                "activation_bytes": peak - static,
            }
            break
    if stats is not None:
        row["solver_workspace_bytes"] = stats.solver_workspace_bytes
    return row


def _solver_columns(stats: ModelStats | None) -> dict[str, Any]:
    if stats is None:
        return {}

    def finite(x: float | None) -> float | None:  # a fake solve has no residual: NaN -> None
        return None if x is None or math.isnan(x) else x

    return {
        "nfe_forward": stats.nfe_forward,
        "nfe_backward": stats.nfe_backward,
        "residual_forward": finite(stats.residual_forward),
        "residual_backward": finite(stats.residual_backward),
        "solver_trace": solver_trace(stats),
        **convergence(stats),
    }


def convergence(stats: ModelStats) -> dict[str, Any]:
    """`converged` (1 / 0, None without a real solve) and, for a solve that stopped above its
    tolerance, `solver_note` saying which, where and why (the row's `error` beside ok numbers)."""
    solves = [(d, s) for d, s in (("forward", stats.forward), ("backward", stats.backward))
              if s is not None and math.isfinite(s.residual)]  # a fake solve has no residual
    if not solves:
        return {"converged": None}
    cut = [f"{d} solve did not converge: residual {s.residual:.3g} > tol {s.tol:g} ({s.stop_mode}) "
           f"after {s.nfe} NFE ({s.status})" for d, s in solves if not s.converged]
    note = "; ".join(cut) + "; numbers are of a truncated solve" if cut else None
    return {"converged": int(not cut), "solver_note": note}


def solver_trace(stats: ModelStats) -> dict[str, Any] | None:
    """The residual after each call of f, per solve (forward, and the implicit backward solve),
    for the convergence figure: {"forward": {"solver", "stop_mode", "tol", "trace": [...]}, ...}.
    None for explicit models and for fake solves (fixed iterations have no residual values)."""
    out: dict[str, Any] = {}
    for direction, solve in (("forward", stats.forward), ("backward", stats.backward)):
        if solve is None or not any(math.isfinite(r) for r in solve.trace):
            continue
        out[direction] = {
            "solver": solve.solver, "stop_mode": solve.stop_mode, "tol": solve.tol,
            "trace": [float(f"{r:.4g}") if math.isfinite(r) else None for r in solve.trace],
        }
    return out or None
