"""One runner case through `measure()`: the worker's side of a results.csv row."""

from __future__ import annotations

import json
import warnings
from typing import TYPE_CHECKING, Any

from bench.measure import default_instruments, make_instrument, measure
from bench.measure.timing import NoisyTimingWarning
from bench.results import COLUMNS

if TYPE_CHECKING:
    from bench.spec import Case, RunSettings


def measure_case(case: Case, device: str, settings: RunSettings,
                 instruments: tuple[str, ...]) -> dict[str, Any]:
    """The row of one case: every instrument the device allows (or those named), raw numbers;
    `status` is ok, or diverged when a solver diverged (its numbers are kept)."""
    return case_row(measure_case_result(case, device, settings, instruments), device)


def measure_case_result(case: Case, device: str, settings: RunSettings,
                        instruments: tuple[str, ...]) -> dict[str, Any]:
    """Everything `measure()` returns for one case, extras included (e.g. the CUDA workspace a
    torch_cuda peak holds besides the model's tensors), before it is cut down to a row. The
    case's own instruments (its sweep's) win over the run's."""
    names = list(case.instruments or instruments) or default_instruments(device, predicted=case.predict)
    chosen = [make_instrument(n, repeats=settings.repeats, warmup=settings.warmup) if n == "timing"
              else make_instrument(n) for n in names]
    with warnings.catch_warnings():  # a noisy timing marks its row (timing_noisy) instead
        warnings.simplefilter("ignore", NoisyTimingWarning)
        return measure(case.workload(device, settings), chosen, warmup=max(1, settings.warmup))


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
    elif result.get("solver_note"):  # ok numbers of a solve that stopped above its tolerance
        row["error"] = result["solver_note"]
    return row
