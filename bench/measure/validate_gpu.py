"""Run every instrument on a few cases and check `predicted` against `torch_cuda`.

    python -m bench.measure.validate_gpu --out results/reference/<device>

Writes `instruments.csv` (one row per case: every instrument's numbers and the gaps between
them), `env.json` and `summary.md` into the output directory. The gaps: the CUDA context
(NVML's process memory before the model exists), reserved - allocated (the caching allocator's
slack), NVML - reserved (what the driver sees beyond the allocator), predicted vs allocated.
Exit code 1 when a prediction misses torch_cuda by more than the tolerance. Without CUDA it
runs the CPU instruments, says why the GPU ones are missing, and skips the check.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from bench.env import capture, device_kind
from bench.measure import RESULT_COLUMNS, Instrument, Workload, default_instruments, make_instrument
from bench.measure.protocol import measure
from bench.results import csv_text
from models import list_models

CASE_COLUMNS = ("model", "size", "mode", "phase", "batch", "seq_len", "device")
GAP_COLUMNS = (
    "cuda_context_bytes",
    "reserved_minus_allocated_bytes",
    "nvml_minus_reserved_bytes",
    "predicted_vs_cuda",
    "predicted_vs_cuda_raw",
    "check",
)


def cases(models: Sequence[str], *, size: str, batch: int, seq_len: int, device: str) -> list[Workload]:
    return [
        Workload(model=m, size=size, mode="core", phase=phase, batch=batch, seq_len=seq_len, device=device)
        for m in models
        for phase in ("train", "eval")
    ]


def gaps(row: dict[str, Any], tolerance: float) -> dict[str, Any]:
    """The gaps between instruments in one row, and whether predicted is within `tolerance` of
    torch_cuda's peak allocated bytes less what was allocated before the step and is not the
    model's (cuBLAS workspace); `predicted_vs_cuda_raw` compares with the peak as it is."""

    def diff(a: str, b: str) -> int | None:
        return None if row.get(a) is None or row.get(b) is None else row[a] - row[b]

    out: dict[str, Any] = {
        "cuda_context_bytes": row.get("nvml_process_baseline_bytes"),
        "reserved_minus_allocated_bytes": diff("reserved_bytes", "cuda_peak_bytes"),
        "nvml_minus_reserved_bytes": diff("nvml_process_bytes", "reserved_bytes"),
        "predicted_vs_cuda": None,
        "predicted_vs_cuda_raw": None,
    }
    # the allocator hands out 512-byte blocks: compare its peak with the prediction rounded alike
    cuda, predicted = row.get("cuda_peak_bytes"), row.get("predicted_cuda_bytes")
    if row.get("error"):
        out["check"] = "error"
    elif cuda is None or predicted is None:
        missing = "torch_cuda" if cuda is None else "predicted"
        out["check"] = f"skipped: no {missing} number"
    else:
        model_peak = cuda - (row.get("cuda_preexisting_bytes") or 0)
        rel = (predicted - model_peak) / model_peak
        out["predicted_vs_cuda"] = rel
        out["predicted_vs_cuda_raw"] = (predicted - cuda) / cuda
        out["check"] = "pass" if abs(rel) <= tolerance else "fail"
    return out


def run_case(workload: Workload, instruments: list[Instrument]) -> dict[str, Any]:
    gc.collect()
    if torch.device(workload.device).type == "cuda":
        torch.cuda.empty_cache()  # the previous case's cached blocks would show in NVML
    try:
        return measure(workload, instruments)
    except Exception as err:  # one failing case is a row, not the end of the validation
        return {"error": f"{type(err).__name__}: {err}"}


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    columns = list(dict.fromkeys([*CASE_COLUMNS, *RESULT_COLUMNS, *GAP_COLUMNS,
                                  *(k for r in rows for k in r)]))
    path.write_text(csv_text(columns, rows, header=True))


def summary(rows: list[dict[str, Any]], tolerance: float) -> str:
    lines = [
        f"# Instrument validation ({rows[0]['device'] if rows else '-'})", "",
        f"predicted vs torch_cuda max_memory_allocated less pre-existing non-model allocations "
        f"(cuBLAS workspace), tolerance {tolerance:.0%}; raw: against the peak as it is.", "",
        "| case | check | predicted vs cuda | raw | cuda MiB | pre-existing MiB "
        "| reserved - alloc MiB | NVML - reserved MiB | context MiB |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]

    def mib(x: Any) -> str:
        return "-" if x is None else f"{x / 2**20:.1f}"

    def pct(x: Any) -> str:
        return "-" if x is None else f"{x:+.1%}"

    for r in rows:
        lines.append(
            f"| {r['model']} {r['phase']} B{r['batch']} T{r['seq_len']} | {r['check']} "
            f"| {pct(r.get('predicted_vs_cuda'))} | {pct(r.get('predicted_vs_cuda_raw'))} "
            f"| {mib(r.get('cuda_peak_bytes'))} | {mib(r.get('cuda_preexisting_bytes'))} "
            f"| {mib(r.get('reserved_minus_allocated_bytes'))} "
            f"| {mib(r.get('nvml_minus_reserved_bytes'))} | {mib(r.get('cuda_context_bytes'))} |"
        )
    notes = sorted({r["notes"] for r in rows if r.get("notes")})
    if notes:
        lines += ["", "Notes:", *(f"- {n}" for n in notes)]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.measure.validate_gpu", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="output directory (default results/reference/<device>)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", help="comma-separated model names (default: every registered model)")
    parser.add_argument("--size", default="debug")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--tolerance", type=float, default=0.10)
    parser.add_argument("--repeats", type=int, default=10, help="timed steps per case")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("validate_gpu: CUDA is not available here; running the CPU instruments only "
              "(torch_cuda and nvml say why in the notes; the predicted check is skipped)")
        device = torch.device("cpu")
    models = args.models.split(",") if args.models else list_models()
    unknown = sorted(set(models) - set(list_models()))
    if unknown or not models:
        what = f"unknown models {unknown}" if unknown else "no models to validate"
        print(f"validate_gpu: error: {what}; registered: {', '.join(list_models()) or 'none'}",
              file=sys.stderr)
        return 2
    out = args.out or Path("results/reference") / device_kind(str(device))
    out.mkdir(parents=True, exist_ok=True)

    # Ask for the GPU instruments even on a CPU: their rows then say why they are missing.
    names = list(dict.fromkeys(["torch_cuda", "nvml", *default_instruments(device)]))
    (out / "env.json").write_text(json.dumps(capture(str(device)), indent=2, default=str) + "\n")
    rows = []
    for workload in cases(models, size=args.size, batch=args.batch, seq_len=args.seq_len,
                          device=str(device)):
        case = {k: getattr(workload, k) for k in CASE_COLUMNS}
        instruments = [make_instrument(n, **({"repeats": args.repeats} if n == "timing" else {}))
                       for n in names]  # fresh ones per case
        row = {**case, **run_case(workload, instruments)}
        row |= gaps(row, args.tolerance)
        rows.append(row)
        write_csv(out / "instruments.csv", rows)  # after every case: a run cut short keeps its rows
        print(f"{workload.model:<20} {workload.phase:<5} {row['check']}", flush=True)

    (out / "summary.md").write_text(summary(rows, args.tolerance))
    print(f"wrote {out / 'instruments.csv'}, env.json, summary.md")
    return 1 if any(r["check"] in ("fail", "error") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
