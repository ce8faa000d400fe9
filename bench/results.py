"""results.csv: one tidy row per case, appended as each case ends, and env.json beside it.

Raw bytes and seconds only; an instrument that could not measure leaves its cell empty (never 0).
A run killed mid-write leaves at most one torn last line, which reading skips.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

CASE_COLUMNS = ("case_id", "family", "model", "variant", "solver", "backward", "depth", "seq_len",
                "batch", "size", "mode", "phase")
COLUMNS = (
    *CASE_COLUMNS, "params", "params_nonembed", "status", "device", "device_name", "memory_source",
    "peak_bytes", "static_bytes", "activation_bytes", "solver_workspace_bytes", "reserved_bytes",
    "nvml_process_bytes", "nvml_device_bytes", "tracked_bytes", "predicted_bytes",
    "step_s_median", "step_s_iqr", "tokens_per_s", "energy_j_per_token", "flops_per_token",
    "nfe_forward", "nfe_backward", "residual_forward", "residual_backward",
    # beyond DESIGN.md's minimum: what a reader needs to trust or reproduce a row
    "overrides", "num_alloc_retries", "nvml_note", "solver_trace", "elapsed_s", "error",
    # fit cases (bench.train): perplexities after the matrix's training budget, and the curve
    "valid_ppl", "test_ppl", "optimal_ppl", "train_steps", "train_s", "train_curve",
)
STATUSES = ("ok", "oom", "diverged", "error", "timeout")
RESULTS, ENV = "results.csv", "env.json"


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value)
    return str(value)


def append_row(run_dir: Path, row: Mapping[str, Any]) -> None:
    """Append one row (header first if the file is new) with a single write, then fsync."""
    path = Path(run_dir) / RESULTS
    unknown = set(row) - set(COLUMNS)
    if unknown:
        raise KeyError(f"unknown result column(s) {sorted(unknown)}")
    new = not path.exists() or path.stat().st_size == 0
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    if new:
        writer.writerow(COLUMNS)
    writer.writerow([_cell(row.get(c)) for c in COLUMNS])
    with path.open("a", newline="") as fh:
        if not new and not _ends_with_newline(path):
            fh.write("\n")  # a torn line from a killed run stays on its own line
        fh.write(buf.getvalue())
        fh.flush()
        os.fsync(fh.fileno())


def _ends_with_newline(path: Path) -> bool:
    with path.open("rb") as fh:
        fh.seek(-1, os.SEEK_END)
        return fh.read(1) == b"\n"


def read_results(run_dir_or_csv: str | Path) -> pd.DataFrame:
    """The results table; rows torn by a kill (wrong field count) are dropped."""
    path = Path(run_dir_or_csv)
    if path.is_dir():
        path = path / RESULTS
    with path.open(newline="") as fh:
        lines = list(csv.reader(fh))
    if not lines:
        return pd.DataFrame(columns=list(COLUMNS))
    header, body = lines[0], [r for r in lines[1:] if len(r) == len(lines[0])]
    df = pd.DataFrame(body, columns=header).replace("", None)
    for col in df.columns:
        if col in ("case_id", "family", "model", "variant", "solver", "backward", "size", "mode",
                   "phase", "status", "device", "device_name", "memory_source", "overrides",
                   "nvml_note", "solver_trace", "error", "train_curve"):
            continue
        df[col] = pd.to_numeric(df[col], errors="coerce")
    return df


def finished_case_ids(run_dir: Path) -> set[str]:
    path = Path(run_dir) / RESULTS
    if not path.exists():
        return set()
    return set(read_results(path)["case_id"].dropna())


def write_json(path: Path, data: Mapping[str, Any]) -> None:
    tmp = Path(f"{path}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    tmp.replace(path)


def read_env(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / ENV
    return json.loads(path.read_text()) if path.exists() else {}


def case_columns(case: Any) -> dict[str, Any]:
    return {
        "case_id": case.case_id, "family": case.family, "model": case.model, "variant": case.variant,
        "solver": case.solver, "backward": case.backward, "depth": case.depth,
        "seq_len": case.seq_len, "batch": case.batch, "size": case.size, "mode": case.mode,
        "phase": case.phase, "overrides": dict(case.overrides) or None,
    }
