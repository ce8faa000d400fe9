"""Memory (and speed) regression checks against a committed baseline.

    deqbench baseline RUN_DIR -o results/baselines/cpu.json
    deqbench check RUN_DIR --baseline results/baselines/cpu.json [--tol-memory 5%] [--tol-speed 30%]

A baseline keeps, per case, the deterministic numbers (tracked and predicted bytes, parameter
counts, FLOPs: exact on any machine; for a training case also what it adds over its eval twin)
and the device numbers (peak and reserved bytes, step time, tokens/s), with the device they came
from. `check` compares case by case: memory growing past
its tolerance, a parameter count that changed, a case that used to pass and now fails, or (looser,
timings drift) a step that slowed past its tolerance is a regression: exit 1. So is a baseline case
the run does not have, or has without a number to compare (a check that compared nothing must
not pass), unless `--allow-missing`; "compared N of M baseline cases" is always printed. A
baseline made on another kind of device is refused (exit 2): its bytes and seconds are not
comparable.
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


def make_baseline(run_dir: Path | RunView, *, require_measurements: bool = False) -> dict[str, Any]:
    """The baseline of a run. `require_measurements`: refuse (BaselineError) a run with no case,
    or none with a number to compare (`deqbench baseline`; a check may meet such a run)."""
    view = run_dir if isinstance(run_dir, RunView) else RunView.load(run_dir)
    df, env = view.df, view.env
    cases = case_records(df.to_dict("records"), view.twins)
    if require_measurements and not any(c["deterministic"] or c["device"] for c in cases.values()):
        what = "no case" if not cases else f"no measurement in any of its {len(cases)} case(s)"
        raise BaselineError(f"{run_dir} has {what} (no {', '.join(DETERMINISTIC[:2])}, peak_bytes "
                            "or step time): nothing to keep; make a baseline from a run of "
                            "`deqbench run` or `deqbench predict`")
    return {
        "format": FORMAT,
        "device_kind": env.get("device_kind") or ("cpu" if _first(df, "device") == "cpu" else None),
        "device_name": env.get("device_name") or _first(df, "device_name"),
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "source": {"run": str(run_dir), "matrix": (env.get("matrix") or {}).get("name"),
                   "git": env.get("git"), "versions": env.get("versions"),
                   "command": env.get("command")},
        "cases": cases,
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
        converged = number(row.get("converged"))
        cases[row["case_id"]] = {
            "status": row["status"],
            **({"converged": bool(converged)} if converged is not None else {}),
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
    verdict: str  # regression | improved | changed | missing-in-run | not-compared | new-in-run


def load_baseline(path: Path) -> dict[str, Any]:
    """A baseline file, checked field by field: BaselineError (one line) names what is wrong."""
    try:
        data = json.loads(Path(path).read_bytes())
    except OSError as err:
        raise BaselineError(f"cannot read baseline {path}: {err.strerror or err}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BaselineError(f"baseline {path} is not valid JSON: {err}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("cases"), dict):
        raise BaselineError(f"{path} is not a deq-bench baseline (a JSON object of format {FORMAT} "
                            "with its cases); make one with `deqbench baseline RUN_DIR -o FILE`")
    remake = "; remake it with `deqbench baseline RUN_DIR -o FILE`"
    if not data["cases"]:
        raise BaselineError(f"baseline {path} holds no case{remake}")
    if not isinstance(data.get("device_kind"), str) or not data["device_kind"]:
        raise BaselineError(f"baseline {path} names no device kind (device_kind is "
                            f"{data.get('device_kind')!r}){remake}")
    for case_id, case in data["cases"].items():
        if not isinstance(case, dict) or not isinstance(case.get("status"), str):
            raise BaselineError(f"baseline {path}: case {case_id!r} is not a case record with a status{remake}")
        for part in ("deterministic", "device"):
            values = case.get(part, {})
            if not isinstance(values, dict):
                raise BaselineError(f"baseline {path}: case {case_id!r}: {part} is not a table{remake}")
            for metric, value in values.items():
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                    raise BaselineError(f"baseline {path}: case {case_id!r}: {metric} = {value!r} is "
                                        f"not a finite number{remake}")
    return data


@dataclass(frozen=True)
class Comparison:
    """A run against a baseline: what moved, and how much of the baseline was compared."""

    findings: list[Finding]
    baseline_cases: int
    same_device: bool  # timings compared (the same device model)
    baseline_device: str | None
    run_device: str | None

    @property
    def missing(self) -> int:
        """Baseline cases with nothing compared: absent from the run, or without a number in it."""
        return sum(f.verdict in MISSING for f in self.findings)

    @property
    def compared(self) -> int:
        return self.baseline_cases - self.missing

    @property
    def regressions(self) -> list[Finding]:
        return [f for f in self.findings if f.verdict in FAILING]

    def failed(self, allow_missing: bool = False) -> bool:
        return bool(self.regressions) or (self.missing > 0 and not allow_missing)

    def lines(self, allow_missing: bool = False) -> list[str]:
        """What `deqbench check` prints after the findings table."""
        new = sum(f.verdict == "new-in-run" for f in self.findings)
        out = []
        if not self.same_device:
            out.append(f"speed not compared: baseline measured on {self.baseline_device}, this run "
                       f"on {self.run_device}")
        extra = [f"{self.missing} missing from this run"] * bool(self.missing) + [f"{new} new in it"] * bool(new)
        out.append(f"compared {self.compared} of {self.baseline_cases} baseline cases"
                   + (f" ({'; '.join(extra)})" if extra else ""))
        if self.missing and not allow_missing:
            out.append("missing cases fail the check: run them, or pass --allow-missing to check a subset")
        return out


def compare(run_dir: Path | RunView, baseline: dict[str, Any], tol_memory: float = 0.05,
            tol_speed: float = 0.30) -> list[Finding]:
    return comparison(run_dir, baseline, tol_memory, tol_speed).findings


def comparison(run_dir: Path | RunView, baseline: dict[str, Any], tol_memory: float = 0.05,
               tol_speed: float = 0.30) -> Comparison:
    current = make_baseline(run_dir)
    if baseline.get("device_kind") != current.get("device_kind"):
        raise BaselineError(
            f"baseline is for device kind {baseline.get('device_kind')!r} "
            f"({baseline.get('device_name')}), this run is {current.get('device_kind')!r} "
            f"({current.get('device_name')}); compare runs of the same kind of device"
        )
    # Timings compare only on the same device model; bytes and FLOPs compare on any of its kind.
    same_device = baseline.get("device_name") == current.get("device_name")
    findings = compare_cases(baseline["cases"], current["cases"], tol_memory,
                             tol_speed if same_device else math.inf)
    return Comparison(findings, len(baseline["cases"]), same_device, baseline.get("device_name"),
                      current.get("device_name"))


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
        base, run = base_cases[case_id], run_cases[case_id]
        if base["status"] == run["status"] and not _shared_metrics(base, run) and (
                base.get("converged") is None or run.get("converged") is None):
            findings.append(Finding(case_id, "case", "measured", None, None, "not-compared"))
            continue
        findings += _compare_case(case_id, base, run, tol_memory, tol_speed)
    return findings


def _shared_metrics(base: dict, run: dict) -> set[str]:
    values = [{**c.get("deterministic", {}), **c.get("device", {})} for c in (base, run)]
    return {m for m in set(values[0]) & set(values[1]) if values[0][m]}


def _compare_case(case_id: str, base: dict, run: dict, tol_memory: float, tol_speed: float) -> list[Finding]:
    out = []
    if base["status"] != run["status"]:
        worse = base["status"] == "ok"
        out.append(Finding(case_id, "status", base["status"], run["status"], None,
                           "regression" if worse else "improved"))
    if base.get("converged") is not None and run.get("converged") is not None and base["converged"] != run["converged"]:
        out.append(Finding(case_id, "converged", base["converged"], run["converged"], None,
                           "improved" if run["converged"] else "regression"))
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
MISSING = ("missing-in-run", "not-compared")  # baseline cases the run gave nothing to compare


def format_findings(findings: list[Finding]) -> list[str]:
    if not findings:
        return ["no case moved beyond tolerance"]
    lines = [f"{'verdict':<15}{'metric':<18}{'baseline':>14}{'current':>14}{'change':>9}  case"]
    order = {"regression": 0, "changed": 1, "missing-in-run": 2, "not-compared": 3, "new-in-run": 4,
             "improved": 5}
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
