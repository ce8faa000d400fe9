"""One runner case through `measure()`: the worker's side of a results.csv row."""

from __future__ import annotations

import json
from typing import Any

from bench.measure.instrument import make_instrument
from bench.measure.protocol import measure
from bench.measure.workload import Workload
from bench.results import COLUMNS


def workload_of(case: Any, device: str, settings: Any) -> Workload:
    overrides = dict(case.overrides)
    if case.is_deq:
        overrides.update(solver=case.solver, backward=case.backward)
    return Workload(
        model=case.model, size=case.size, mode=case.mode, phase=case.phase, batch=case.batch,
        seq_len=case.seq_len, depth=case.depth, overrides=tuple(sorted(overrides.items())),
        device=device, dtype=settings.dtype, seed=settings.seed,
    )


def measure_case(case: Any, device: str, settings: Any, instruments: tuple[str, ...]) -> dict[str, Any]:
    """The row of one case: every instrument the device allows (or those named), raw numbers;
    `status` is ok, or diverged when a solver diverged (its numbers are kept)."""
    return case_row(measure_case_result(case, device, settings, instruments), device)


def measure_case_result(case: Any, device: str, settings: Any,
                        instruments: tuple[str, ...]) -> dict[str, Any]:
    """Everything `measure()` returns for one case, extras included (e.g. the CUDA workspace a
    torch_cuda peak holds besides the model's tensors), before it is cut down to a row."""
    from bench.measure import default_instruments

    names = list(instruments) or default_instruments(device)
    chosen = [make_instrument(n, repeats=settings.repeats, warmup=settings.warmup) if n == "timing"
              else make_instrument(n) for n in names]
    return measure(workload_of(case, device, settings), chosen, warmup=max(1, settings.warmup))


def case_row(result: dict[str, Any], device: str) -> dict[str, Any]:
    """The results.csv columns of a `measure_case_result`."""
    from bench.env import device_name

    row = {k: v for k, v in result.items() if k in COLUMNS}
    row["status"] = "diverged" if result.get("diverged") else "ok"
    row["device"] = device
    row["device_name"] = device_name(device)
    notes = result.get("notes") or ""
    row["nvml_note"] = "; ".join(n for n in notes.split("; ") if "nvml" in n.lower()) or None
    if result.get("solver_trace") is not None:
        row["solver_trace"] = json.dumps(result["solver_trace"])
    if row["status"] == "diverged":
        row["error"] = "solver diverged (NaN/Inf or a growing residual); numbers kept"
    return row
