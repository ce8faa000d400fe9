"""results.csv: one tidy row per case, appended as each case ends, and env.json beside it.

The columns are one typed schema (`SCHEMA`): every writer and reader goes through it. Raw bytes
and seconds only; an instrument that could not measure leaves its cell empty (never 0). A run
killed mid-write leaves at most one torn last line; every cell is written on one line, so a
reader takes a record per line and a torn line, wherever it is, costs only itself. A run folder
also keeps one row file per case (bench.rundir): results.csv is rebuilt from them on resume.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd

RESULTS, ENV = "results.csv", "env.json"
# A row's status. Rows whose numbers exist are OK_STATUSES: a diverged solve keeps its
# measurements (and says so in `error`); the rest failed and hold no measurement. `killed`: the
# worker died from a signal with no evidence of running out of memory (`--resume` runs it again).
STATUSES = ("ok", "oom", "diverged", "killed", "error", "timeout")
OK_STATUSES = ("ok", "diverged")
FAILED_STATUSES = tuple(s for s in STATUSES if s not in OK_STATUSES)


@dataclass(frozen=True)
class Column:
    name: str
    kind: str  # "text" | "int" | "float" | "bool" | "json" (a JSON document in one cell)
    doc: str


def _columns(kind: str, names: str, doc: str = "") -> tuple[Column, ...]:
    return tuple(Column(n, kind, doc) for n in names.split())


SCHEMA: tuple[Column, ...] = (
    # -- the case (bench.spec.Case.columns) --
    Column("case_id", "text", "model/size/mode/phase/T/B and L (explicit) or solver/backward (DEQ)"),
    *_columns("text", "family model variant solver backward"),
    *_columns("int", "depth seq_len batch"),
    *_columns("text", "size mode phase"),
    # -- what was measured --
    Column("params", "int", "all parameters, head and embeddings included"),
    Column("params_nonembed", "int", "parameters without token embeddings and output layer"),
    Column("status", "text", f"one of {', '.join(STATUSES)}"),
    *_columns("text", "device device_name"),
    Column("memory_source", "text", "the instrument peak_bytes comes from: torch_cuda, tracked, predicted"),
    Column("peak_bytes", "int", "peak over forward + backward + optimizer step, from memory_source"),
    Column("static_bytes", "int", "params + grads + optimizer state, same source"),
    Column("activation_bytes", "int", "peak_bytes - static_bytes"),
    Column("solver_workspace_bytes", "int", "the DEQ solver's history buffers (Broyden U/V)"),
    Column("reserved_bytes", "int", "torch.cuda.max_memory_reserved"),
    *_columns("int", "nvml_process_bytes nvml_device_bytes", "NVML peaks, idle baseline subtracted"),
    Column("tracked_bytes", "int", "peak live tensor bytes of a real step, exact"),
    Column("predicted_bytes", "int", "the tracked count over fake tensors (nothing allocated), exact"),
    *_columns("float", "step_s_median step_s_iqr tokens_per_s energy_j_per_token flops_per_token"),
    *_columns("float", "nfe_forward nfe_backward residual_forward residual_backward"),
    # -- beyond DESIGN.md's minimum: what a reader needs to trust or reproduce a row --
    Column("overrides", "json", "model config overrides (e.g. parameter matching)"),
    Column("num_alloc_retries", "int", "CUDA allocator retries during the measured step"),
    Column("nvml_note", "text", "why an NVML number is missing or doubtful"),
    Column("solver_trace", "json", "residual after each function evaluation, per solve"),
    Column("elapsed_s", "float", "wall time of the case, worker side"),
    Column("error", "text", "first line of the failure, or what is doubtful about ok numbers"),
    # -- fit cases (bench.train): perplexities after the matrix's training budget, the curve --
    *_columns("float", "valid_ppl test_ppl optimal_ppl"),
    Column("train_steps", "int", ""),
    Column("train_s", "float", ""),
    Column("train_curve", "json", "the train log's main columns (bench.train.CURVE_COLUMNS)"),
    # -- after DESIGN.md's list, so older results.csv files stay readable --
    Column("predicted_cuda_bytes", "int",
           "predicted_bytes with every storage rounded up to 512 B, as CUDA's caching allocator "
           "hands them out: what torch_cuda's max_memory_allocated would say"),
    Column("converged", "int",
           "1: every solve of the measured step (forward, implicit backward) reached its "
           "tolerance; 0: one stopped above it (max_iter, or diverged), so the row's numbers are "
           "of a truncated solve; empty: no solve (explicit models, fake tensors)"),
    Column("nvml_process_baseline_bytes", "int",
           "NVML: the process's GPU memory before the model is built (the CUDA context), the idle "
           "baseline nvml_process_bytes leaves out"),
    Column("timing_noisy", "bool", "step times spread more than 10% (IQR/median): read as rough"),
    Column("job_id", "text", "the SLURM job that ran the case (--launcher slurm; 123 or 123_4 in an array)"),
)
COLUMNS: tuple[str, ...] = tuple(c.name for c in SCHEMA)
# Columns added after the first layout: a results.csv written before them is complete without.
LATER_COLUMNS = ("predicted_cuda_bytes", "converged", "nvml_process_baseline_bytes",
                 "timing_noisy", "job_id")
KINDS: dict[str, str] = {c.name: c.kind for c in SCHEMA}
CASE_COLUMNS = COLUMNS[: COLUMNS.index("phase") + 1]
TEXT_KINDS = ("text", "json")


def number(value: Any) -> float | int | None:
    """A cell as a number: None for missing, empty or NaN; whole floats as ints (exact bytes)."""
    if value is None or isinstance(value, (str, bool)):
        return None
    try:
        value = float(value) if not isinstance(value, int) else value
    except (TypeError, ValueError):
        return None
    if isinstance(value, float):
        if math.isnan(value):
            return None
        if value.is_integer() and abs(value) < 2**53:
            return int(value)
    return value


def cell(value: Any) -> str:
    """How a value is written into a CSV cell: empty for None, repr for floats, JSON for
    containers; never a line break (a record is one line)."""
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(float(value))
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value)
    text = str(value)
    return " ".join(text.splitlines()) if "\n" in text or "\r" in text else text


def csv_text(columns: Iterable[str], rows: Iterable[Mapping[str, Any]], *, header: bool) -> str:
    """Rows as CSV text, cells written by `cell()`; the one CSV writer of the package."""
    columns = list(columns)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    if header:
        writer.writerow(columns)
    for row in rows:
        writer.writerow([cell(row.get(c)) for c in columns])
    return buf.getvalue()


def append_row(run_dir: Path, row: Mapping[str, Any]) -> None:
    """Append one row (header first if the file is new) with a single write, then fsync."""
    path = Path(run_dir) / RESULTS
    unknown = set(row) - set(COLUMNS)
    if unknown:
        raise KeyError(f"unknown result column(s) {sorted(unknown)}")
    new = not path.exists() or path.stat().st_size == 0
    text = csv_text(COLUMNS, [row], header=new)
    with path.open("a", newline="") as fh:
        if not new and not _ends_with_newline(path):
            fh.write("\n")  # a torn line from a killed run stays on its own line
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())


def _ends_with_newline(path: Path) -> bool:
    with path.open("rb") as fh:
        fh.seek(-1, os.SEEK_END)
        return fh.read(1) == b"\n"


def read_results(run_dir_or_csv: str | Path) -> pd.DataFrame:
    """The results table, typed by the schema; rows torn by a kill (wrong field count) are
    dropped. Columns a results.csv of an older layout lacks are absent (see `RunView.missing`)."""
    import pandas as pd

    path = Path(run_dir_or_csv)
    if path.is_dir():
        path = path / RESULTS
    header, body = read_records(path)
    if not header:
        return pd.DataFrame(columns=list(COLUMNS))
    df = pd.DataFrame(body, columns=header).replace("", None)
    for col in df.columns:
        kind = KINDS.get(col, "text")
        if kind == "bool":
            df[col] = df[col].map({"True": True, "False": False}).astype(object)
        elif kind not in TEXT_KINDS:
            df[col] = pd.to_numeric(df[col], errors="coerce")
    return df


def read_records(path: Path) -> tuple[list[str], list[list[str]]]:
    """The header and the whole records of a results.csv, one a line. A line that does not
    parse into the header's field count (torn by a kill, even inside a quoted field) is
    skipped alone: it never swallows the lines after it."""
    with Path(path).open(newline="") as fh:
        lines = fh.read().split("\n")
    records = []
    for line in lines:
        if line.endswith("\r"):
            line = line[:-1]
        if not line:
            continue
        try:
            records.append(next(csv.reader([line], strict=True)))
        except (csv.Error, StopIteration):
            continue
    if not records:
        return [], []
    header = records[0]
    return header, [r for r in records[1:] if len(r) == len(header)]


def finished_case_ids(run_dir: Path) -> set[str]:
    path = Path(run_dir) / RESULTS
    if not path.exists():
        return set()
    return set(read_results(path)["case_id"].dropna())


def write_json(path: Path, data: Mapping[str, Any]) -> None:
    """Write-then-rename: a reader never sees half a file."""
    tmp = Path(f"{path}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    tmp.replace(path)


def read_env(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / ENV
    return json.loads(path.read_text()) if path.exists() else {}
