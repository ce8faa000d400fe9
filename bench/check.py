"""Memory (and speed) regression checks against a committed baseline.

    deqbench baseline RUN_DIR -o results/baselines/cpu.json
    deqbench check RUN_DIR --baseline results/baselines/cpu.json [--tol-memory 5%] [--tol-speed 30%]

A baseline keeps, per case, the deterministic numbers (tracked and predicted bytes, parameter
counts, FLOPs: exact on any machine; for a training case also what it adds over its eval twin)
and the device numbers (peak and reserved bytes, step time, tokens/s), with the device they came
from. `check` compares case by case: memory growing past
its tolerance, a parameter count that changed, a case that used to pass and now fails, or (looser,
timings drift) a step that slowed past its tolerance is a regression: exit 1. A baseline made on
another kind of device is refused (exit 2): its bytes and seconds are not comparable.
"""

from __future__ import annotations

import datetime as dt
import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.analysis import RunView
from bench.errors import BaselineError
from bench.results import number

FORMAT = 1
# (column, kind): memory grows = regression; speed: time up / throughput down = regression.
DETERMINISTIC = ("tracked_bytes", "predicted_bytes", "params", "params_nonembed", "flops_per_token",
                 "static_bytes")
DEVICE = ("peak_bytes", "reserved_bytes", "activation_bytes", "step_s_median", "tokens_per_s")
MEMORY = ("tracked_bytes", "predicted_bytes", "peak_bytes", "reserved_bytes", "static_bytes",
          "activation_bytes", "flops_per_token", "train_minus_eval_bytes")
EXACT = ("params", "params_nonembed")
SLOWER_IF_UP = ("step_s_median",)
SLOWER_IF_DOWN = ("tokens_per_s",)


def make_baseline(run_dir: Path | RunView) -> dict[str, Any]:
    view = run_dir if isinstance(run_dir, RunView) else RunView.load(run_dir)
    df, env = view.df, view.env
    return {
        "format": FORMAT,
        "device_kind": env.get("device_kind") or ("cpu" if _first(df, "device") == "cpu" else None),
        "device_name": env.get("device_name") or _first(df, "device_name"),
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "source": {"run": str(run_dir), "matrix": (env.get("matrix") or {}).get("name"),
                   "git": env.get("git"), "versions": env.get("versions"),
                   "command": env.get("command")},
        "cases": case_records(df.to_dict("records"), view.twins),
    }


def case_records(rows: Iterable[Mapping[str, Any]],
                 twins: Mapping[str, str] | None = None) -> dict[str, dict[str, Any]]:
    """What a baseline keeps of each result row, by case id.

    A training case whose eval twin (same case, phase eval; `RunView.twins`, computed from the
    rows when not given) is among `rows` also gets
    `train_minus_eval_bytes`: tracked bytes of the training step less those of the forward pass,
    i.e. what training adds (gradients, optimizer state, activations saved for backward). Saved
    activations are a small part of a DEQ's peak (Broyden's history dominates it), so a change
    there hides within a tolerance on the total and shows on this difference."""
    rows = list(rows)
    if twins is None:
        twins = RunView.from_rows(rows).twins
    by_id = {row["case_id"]: row for row in rows}
    cases: dict[str, Any] = {}
    for row in rows:
        deterministic = {k: number(row.get(k)) for k in DETERMINISTIC if number(row.get(k)) is not None}
        twin = by_id.get(twins.get(row["case_id"], ""))
        if twin is not None:
            train, forward = number(row.get("tracked_bytes")), number(twin.get("tracked_bytes"))
            if train is not None and forward is not None:
                deterministic["train_minus_eval_bytes"] = train - forward
        cases[row["case_id"]] = {
            "status": row["status"],
            "memory_source": row.get("memory_source"),
            "deterministic": deterministic,
            "device": {k: number(row.get(k)) for k in DEVICE if number(row.get(k)) is not None},
        }
    return cases


def _first(df: Any, col: str) -> Any:
    vals = df[col].dropna() if col in df else []
    return vals.iloc[0] if len(vals) else None


@dataclass(frozen=True)
class Finding:
    case_id: str
    metric: str
    baseline: Any
    current: Any
    change: float | None  # relative change, current / baseline - 1
    verdict: str  # "regression" | "improved" | "changed" | "missing-in-run" | "new-in-run"


def load_baseline(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text())
    except OSError as err:
        raise BaselineError(f"cannot read baseline {path}: {err.strerror or err}") from None
    except json.JSONDecodeError as err:
        raise BaselineError(f"baseline {path} is not valid JSON: {err}") from None
    if data.get("format") != FORMAT or "cases" not in data:
        raise BaselineError(f"{path} is not a deq-bench baseline (format {FORMAT}); make one "
                               "with `deqbench baseline RUN_DIR -o FILE`")
    return data


def compare(run_dir: Path, baseline: dict[str, Any], tol_memory: float = 0.05,
            tol_speed: float = 0.30) -> list[Finding]:
    current = make_baseline(run_dir)
    if baseline.get("device_kind") != current.get("device_kind"):
        raise BaselineError(
            f"baseline is for device kind {baseline.get('device_kind')!r} "
            f"({baseline.get('device_name')}), this run is {current.get('device_kind')!r} "
            f"({current.get('device_name')}); compare runs of the same kind of device"
        )
    # Timings compare only on the same device model; bytes and FLOPs compare on any of its kind.
    same_device = baseline.get("device_name") == current.get("device_name")
    return compare_cases(baseline["cases"], current["cases"], tol_memory,
                         tol_speed if same_device else math.inf)


def compare_cases(base_cases: Mapping[str, dict], run_cases: Mapping[str, dict],
                  tol_memory: float = 0.05, tol_speed: float = 0.30) -> list[Finding]:
    """Case records (`case_records`) of a baseline against those of a run, case by case."""
    findings: list[Finding] = []
    for case_id in sorted(set(base_cases) | set(run_cases)):
        if case_id not in run_cases:
            findings.append(Finding(case_id, "case", "present", None, None, "missing-in-run"))
            continue
        if case_id not in base_cases:
            findings.append(Finding(case_id, "case", None, "present", None, "new-in-run"))
            continue
        findings += _compare_case(case_id, base_cases[case_id], run_cases[case_id], tol_memory, tol_speed)
    return findings


def _compare_case(case_id: str, base: dict, run: dict, tol_memory: float, tol_speed: float) -> list[Finding]:
    out = []
    if base["status"] != run["status"]:
        worse = base["status"] == "ok"
        out.append(Finding(case_id, "status", base["status"], run["status"], None,
                           "regression" if worse else "improved"))
    values_b = {**base.get("deterministic", {}), **base.get("device", {})}
    values_r = {**run.get("deterministic", {}), **run.get("device", {})}
    for metric in sorted(set(values_b) & set(values_r)):
        b, r = values_b[metric], values_r[metric]
        if not b:
            continue
        change = r / b - 1.0
        if metric in EXACT:
            if r != b:
                out.append(Finding(case_id, metric, b, r, change, "changed"))
        elif metric in MEMORY:
            if change > tol_memory:
                out.append(Finding(case_id, metric, b, r, change, "regression"))
            elif change < -tol_memory:
                out.append(Finding(case_id, metric, b, r, change, "improved"))
        elif (metric in SLOWER_IF_UP and change > tol_speed) or (metric in SLOWER_IF_DOWN and change < -tol_speed):
            out.append(Finding(case_id, metric, b, r, change, "regression"))
        elif (metric in SLOWER_IF_UP and change < -tol_speed) or (metric in SLOWER_IF_DOWN and change > tol_speed):
            out.append(Finding(case_id, metric, b, r, change, "improved"))
    return out


FAILING = ("regression", "changed")


def format_findings(findings: list[Finding]) -> list[str]:
    if not findings:
        return ["no case moved beyond tolerance"]
    lines = [f"{'verdict':<15}{'metric':<18}{'baseline':>14}{'current':>14}{'change':>9}  case"]
    order = {"regression": 0, "changed": 1, "missing-in-run": 2, "new-in-run": 3, "improved": 4}
    for f in sorted(findings, key=lambda f: (order[f.verdict], f.case_id, f.metric)):
        change = "" if f.change is None else f"{100 * f.change:+.1f}%"
        lines.append(f"{f.verdict:<15}{f.metric:<18}{_show(f.baseline):>14}{_show(f.current):>14}"
                     f"{change:>9}  {f.case_id}")
    return lines


def _show(v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
