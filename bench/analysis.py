"""One view of a run: its rows, the DEQ-vs-baseline pairs, each training case's eval twin and
the paper comparison, derived once from results.csv (and env.json).

    view = RunView.load("results/latest")
    view.pairs        # each DEQ case against every explicit case of its family at its shape
    view.paper        # PAPER.md's pairs beside ours at the paper protocol
    view.twins        # training case id -> its eval twin's id
    view.quality      # fit cases: perplexity beside speed and memory

The report, the figures, `deqbench check` and the summary `deqbench run` prints all read this
view, so every number they show is recomputed from the table's raw bytes and seconds the same way.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import pandas as pd

from bench.errors import RunDirError
from bench.format import fmt, format_bytes, format_pct
from bench.paper import PAIRS, PROTOCOL
from bench.results import (
    COLUMNS,
    ENV,
    LATER_COLUMNS,
    OK_STATUSES,
    RESULTS,
    STATUSES,
    read_env,
    read_results,
)

EXPLAIN = "explain.csv"  # `deqbench explain`'s table beside results.csv (bench.explain writes it)
NOT_MEASURED = "not measured"  # explain.csv's source of a step no instrument of the run could measure
PAIR_KEY = ["family", "size", "mode", "phase", "seq_len", "batch"]
# Columns that make a case what it is, apart from its phase: a training case and its eval twin
# agree on all of them.
TWIN_KEY = ["model", "size", "mode", "seq_len", "batch", "depth", "solver", "backward", "overrides"]
NOISY = 0.10  # IQR/median of step times above which a timing is called noisy (timing.Timing's)
SOURCE_LABELS = {
    "torch_cuda": "torch.cuda max allocated",
    "tracked": "tracked (live tensor bytes)",
    "predicted": "predicted (fake tensors, nothing allocated)",
}


@dataclass
class RunView:
    """A run directory (or in-process rows) read once; derived tables computed on first use."""

    dir: Path | None
    df: pd.DataFrame
    env: dict[str, Any] = field(default_factory=dict)
    missing: set[str] = field(default_factory=set)  # schema columns absent from this results.csv

    @classmethod
    def load(cls, run_dir: str | Path) -> RunView:
        """RunDirError (one line) for a results.csv or env.json that is not what a run writes."""
        run_dir = Path(run_dir)
        return cls.of(load_results(run_dir), load_env(run_dir), run_dir)

    @classmethod
    def from_rows(cls, rows: Iterable[Mapping[str, Any]], env: dict[str, Any] | None = None) -> RunView:
        """Rows measured in this process (dicts of result columns), e.g. by a test."""
        return cls.of(pd.DataFrame(list(rows)), env or {}, None)

    @classmethod
    def of(cls, df: pd.DataFrame, env: dict[str, Any], run_dir: Path | None) -> RunView:
        df = df.copy()
        absent = [c for c in COLUMNS if c not in df.columns]
        for c in absent:  # absent columns read as empty cells; each figure says what it lacks
            df[c] = None
        missing = set(absent) - set(LATER_COLUMNS)
        for c in ("depth", "seq_len", "batch", "peak_bytes"):
            df[c] = pd.to_numeric(df[c], errors="coerce")
        # a results.csv written before timing_noisy existed: the same rule from its raw IQR
        spread = pd.to_numeric(df["step_s_iqr"], errors="coerce") / pd.to_numeric(df["step_s_median"], errors="coerce")
        df["timing_noisy"] = df["timing_noisy"].where(df["timing_noisy"].notna(), (spread > NOISY).where(spread.notna()))
        return cls(run_dir, df, env, missing)

    # -- what the run is -------------------------------------------------------------------------
    @property
    def preset(self) -> str:
        return (self.env.get("matrix") or {}).get("name") or "unknown preset"

    @property
    def device(self) -> str:
        name = self.env.get("device_name") or _first(self.df, "device_name") or "unknown device"
        device = self.env.get("device") or _first(self.df, "device") or "?"
        predicted = set(self.df["memory_source"].dropna()) == {"predicted"}
        return f"predicted on {device} ({name})" if predicted else f"{device}: {name}"

    @property
    def matched_params(self) -> bool:
        settings = (self.env.get("matrix") or {}).get("settings") or {}
        return bool(settings.get("match_params")) and (self.df["variant"] == "untied").any()

    def lacks(self, *columns: str) -> str | None:
        gone = [c for c in columns if c in self.missing]
        return f"results.csv has no {', '.join(gone)} column{'s' if len(gone) > 1 else ''}" if gone else None

    @property
    def ok(self) -> pd.DataFrame:
        """Rows whose numbers exist and that have a peak."""
        df = self.df
        return df[df["status"].isin(OK_STATUSES) & df["peak_bytes"].notna()]

    def sources(self, rows: pd.DataFrame | None = None) -> list[str]:
        rows = self.df if rows is None else rows
        return sorted(set(rows["memory_source"].dropna()))

    # -- derived tables --------------------------------------------------------------------------
    @cached_property
    def pairs(self) -> pd.DataFrame:
        return pairs(self.df)

    @cached_property
    def train_pairs(self) -> pd.DataFrame:
        """Training-step pairs (the paper's memory claim is about training)."""
        p = self.pairs
        return p[p["phase"] == "train"] if not p.empty else p

    @cached_property
    def paper(self) -> pd.DataFrame:
        return paper_table(self.df)

    @cached_property
    def quality(self) -> pd.DataFrame:
        return quality_table(self.df)

    @cached_property
    def explain(self) -> pd.DataFrame:
        """explain.csv (`deqbench explain`: each paper pair's chain of factors, bench.explain),
        typed; empty when the run has none."""
        path = None if self.dir is None else self.dir / EXPLAIN
        if path is None or not path.is_file():
            return pd.DataFrame()
        df = pd.read_csv(path, dtype=str, keep_default_na=False).replace("", None)
        for c in df.columns:
            if c.startswith(("delta_", "residual_")) or c.endswith(("_bytes", "reduction")) or c == "order":
                df[c] = pd.to_numeric(df[c], errors="coerce")
        return df

    @cached_property
    def twins(self) -> dict[str, str]:
        """Training case id -> the id of its eval twin (same model and shape, phase eval)."""
        df = self.df
        if df.empty:
            return {}
        keys = [tuple(str(v) for v in row) for row in df[TWIN_KEY].itertuples(index=False)]
        evals = {k: cid for k, cid, phase in zip(keys, df["case_id"], df["phase"], strict=True)
                 if phase == "eval"}
        return {cid: evals[k] for k, cid, phase in zip(keys, df["case_id"], df["phase"], strict=True)
                if phase == "train" and k in evals}

    def why_no_pairs(self, family: str) -> str:
        rows = self.df[self.df["family"] == family]
        deq, base = rows[rows["variant"] == "deq"], rows[rows["variant"] != "deq"]
        if deq.empty:
            return "no DEQ case in this family."
        if base.empty:
            return "no explicit baseline in this family."
        if not deq["status"].isin(OK_STATUSES).any():
            counts = ", ".join(f"{n} {s}" for s, n in deq["status"].value_counts().items())
            return f"every DEQ case failed ({counts}); see the failed cases below."
        return "no DEQ and baseline case share a shape (seq_len, batch, size, mode, phase)."


def load_results(run_dir: Path) -> pd.DataFrame:
    path = run_dir / RESULTS
    try:
        df = read_results(run_dir)
    except OSError as err:
        raise RunDirError(f"cannot read {path}: {err.strerror or err}") from None
    except (UnicodeDecodeError, csv.Error) as err:
        raise RunDirError(f"{path} is not a results table ({err}); give a run directory written by "
                          "`deqbench run` or `deqbench predict`") from None
    absent = [c for c in ("case_id", "status") if c not in df.columns]
    twice = sorted({c for c in df.columns if list(df.columns).count(c) > 1})
    if absent or twice:
        why = f"no {', '.join(absent)} column" if absent else f"column {', '.join(twice)} appears twice"
        raise RunDirError(f"{path} is not a results table ({why}); give a run directory written "
                          "by `deqbench run` or `deqbench predict`")
    for i, row in enumerate(df[[c for c in ("case_id", "status", "seq_len", "batch") if c in df]]
                            .itertuples(index=False), start=1):
        bad = (f"status {row.status!r} is not one of {', '.join(STATUSES)}" if row.status not in STATUSES
               else next((f"{c} {getattr(row, c)!r} is not a positive integer" for c in ("seq_len", "batch")
                          if hasattr(row, c) and getattr(row, c) <= 0), None))  # NaN: empty
        if bad:
            raise RunDirError(f"{path} case row {i} ({row.case_id}): {bad}; the file is damaged: fix or "
                              "drop that row, or run the case again")
    return df


def load_env(run_dir: Path) -> dict[str, Any]:
    """env.json, or {} where there is none (results.csv alone is enough)."""
    path = run_dir / ENV
    try:
        env = read_env(run_dir)
    except OSError as err:
        raise RunDirError(f"cannot read {path}: {err.strerror or err}") from None
    except ValueError:  # not JSON, not UTF-8, empty
        env = None
    fix = "restore it, or delete it: results.csv alone is enough"
    if not isinstance(env, dict):
        raise RunDirError(f"{path} is not a JSON object (empty or damaged); {fix}")
    for key in ("matrix", "git", "versions", "cuda", "nvml"):  # the tables a report reads
        if env.get(key) is not None and not isinstance(env[key], dict):
            raise RunDirError(f"{path}: {key} is {env[key]!r}, not a table (damaged); {fix}")
    return env


def _first(df: pd.DataFrame, col: str) -> str | None:
    if col not in df:
        return None
    values = df[col].dropna()
    return str(values.iloc[0]) if len(values) else None


def pairs(df: pd.DataFrame) -> pd.DataFrame:
    """Each DEQ case against every explicit case of its family at the same shape and phase.

    reduction = 1 - deq_peak / baseline_peak; slowdown = deq step time / baseline step time.
    A baseline that ran out of memory or time where the DEQ fit is kept with its status and
    no reduction (its peak is unknown, only above the limit)."""
    if df.empty or "variant" not in df:
        return pd.DataFrame()
    deq = df[(df["variant"] == "deq") & (df["status"].isin(OK_STATUSES))]
    base = df[df["variant"] != "deq"]
    if deq.empty or base.empty:
        return pd.DataFrame()
    merged = deq.merge(base, on=PAIR_KEY, suffixes=("_deq", "_base"))
    out = pd.DataFrame({
        **{k: merged[k] for k in PAIR_KEY},
        "solver": merged["solver_deq"],
        "backward": merged["backward_deq"],
        "deq_model": merged["model_deq"],
        "baseline_model": merged["model_base"],
        "baseline_variant": merged["variant_base"],
        "depth": merged["depth_base"],
        "baseline_overrides": merged["overrides_base"],  # parameter matching, config
        "baseline_status": merged["status_base"],
        "memory_source": merged["memory_source_deq"],
        "deq_peak_bytes": merged["peak_bytes_deq"],
        "baseline_peak_bytes": merged["peak_bytes_base"],
        "deq_params_nonembed": merged["params_nonembed_deq"],
        "baseline_params_nonembed": merged["params_nonembed_base"],
        "deq_step_s": merged["step_s_median_deq"],
        "baseline_step_s": merged["step_s_median_base"],
        "nfe_forward": merged["nfe_forward_deq"],
        "nfe_backward": merged["nfe_backward_deq"],
        "deq_converged": merged["converged_deq"],  # 0: the DEQ's numbers are of a truncated solve
        "timing_noisy": (merged["timing_noisy_deq"].fillna(False).astype(bool)
                         | merged["timing_noisy_base"].fillna(False).astype(bool)),
    })
    ok = out["baseline_status"].isin(OK_STATUSES)
    out["reduction"] = (1.0 - out["deq_peak_bytes"] / out["baseline_peak_bytes"]).where(ok)
    out["slowdown"] = (out["deq_step_s"] / out["baseline_step_s"]).where(ok)
    return out.sort_values(["family", "phase", "baseline_variant", "seq_len", "depth"]).reset_index(drop=True)


def paper_table(df: pd.DataFrame) -> pd.DataFrame:
    """Per PAPER.md pair: our peaks at the paper protocol beside the paper's, when present."""
    rows = []
    for pair in PAIRS:
        base = _protocol_row(df, pair.baseline_model, pair.size, pair.baseline_depth)
        deq = _protocol_row(df, pair.deq_model, pair.size, None)
        base_peak, deq_peak = _peak(base), _peak(deq)
        ours = (1.0 - deq_peak / base_peak) if base_peak and deq_peak else math.nan
        rows.append({
            "pair": pair.label,
            "key": pair.key,
            "paper_table": pair.table,
            "baseline_status": None if base is None else base["status"],
            "deq_status": None if deq is None else deq["status"],
            "baseline_peak_bytes": base_peak,
            "deq_peak_bytes": deq_peak,
            "reduction": ours,
            "paper_baseline_gb": pair.baseline_gb,
            "paper_deq_gb": pair.deq_gb,
            "paper_reduction": pair.reduction,
            "source": _source(base, deq),
            "baseline_params_nonembed": None if base is None else base.get("params_nonembed"),
            "deq_params_nonembed": None if deq is None else deq.get("params_nonembed"),
        })
    return pd.DataFrame(rows)


def _protocol_row(df: pd.DataFrame, model: str, size: str, depth: int | None) -> pd.Series | None:
    if df.empty:
        return None
    sel = (
        (df["model"] == model) & (df["size"] == size) & (df["phase"] == "train")
        & (df["mode"] == PROTOCOL["mode"]) & (df["seq_len"] == PROTOCOL["seq_len"])
        & (df["batch"] == PROTOCOL["batch"])
    )
    if depth is not None:
        sel &= df["depth"] == depth
    hits = df[sel]
    return None if hits.empty else hits.iloc[-1]


def _peak(row: pd.Series | None) -> float:
    if row is None or row["status"] not in OK_STATUSES or pd.isna(row["peak_bytes"]):
        return math.nan
    return float(row["peak_bytes"])


def _source(*rows: pd.Series | None) -> str | None:
    sources = {r["memory_source"] for r in rows if r is not None and isinstance(r["memory_source"], str)}
    if not sources:
        return None
    return "predicted" if sources == {"predicted"} else "measured" if "predicted" not in sources else "mixed"


def quality_table(df: pd.DataFrame) -> pd.DataFrame:
    """Fit cases (models trained to the matrix's budget): perplexity beside speed and memory;
    `gap` = valid / best achievable - 1 where the corpus's optimum is known (synthetic)."""
    if df.empty or "valid_ppl" not in df or "phase" not in df:
        return pd.DataFrame()
    fit = df[(df["phase"] == "fit") & df["train_steps"].notna()]  # not `deqbench predict` rows
    if fit.empty:
        return pd.DataFrame()
    out = fit[["family", "model", "variant", "depth", "solver", "backward", "seq_len", "batch",
               "size", "status", "params_nonembed", "train_steps", "train_s", "tokens_per_s",
               "peak_bytes", "memory_source", "nfe_forward", "nfe_backward", "valid_ppl",
               "test_ppl", "optimal_ppl"]].copy()
    out["gap"] = out["valid_ppl"] / out["optimal_ppl"] - 1.0
    return out.sort_values(["family", "seq_len", "variant", "depth"]).reset_index(drop=True)


# -- what `deqbench run` prints ---------------------------------------------------------------
def summary_lines(view: RunView) -> list[str]:
    """Per pair: peaks, reduction and slowdown; then the quality table of fit cases."""
    p = view.pairs
    if p.empty:
        return ["no DEQ-baseline pairs in these results", *quality_lines(view)]
    head = (f"{'family':<12}{'phase':<6}{'T':>5}  {'baseline':<17}{'L':>4}{'DEQ peak':>11}"
            f"{'base peak':>11}{'saving':>8}{'slowdown':>9}{'NFE f/b':>9}{'converged':>10}")
    lines = [head, "-" * len(head)]
    for r in p.itertuples():
        slow = "—" if pd.isna(r.slowdown) else f"{r.slowdown:.2f}x"
        nfe = "—" if pd.isna(r.nfe_forward) else f"{r.nfe_forward:.0f}/" + fmt(r.nfe_backward, ".0f")
        base_peak = format_bytes(r.baseline_peak_bytes) if r.baseline_status in OK_STATUSES else r.baseline_status
        lines.append(
            f"{r.family:<12}{r.phase:<6}{r.seq_len:>5}  {r.baseline_model:<17}{r.depth:>4.0f}"
            f"{format_bytes(r.deq_peak_bytes):>11}{base_peak:>11}{format_pct(r.reduction):>8}{slow:>9}{nfe:>9}"
            f"{converged_text(r.deq_converged):>10}"
        )
    lines.append(f"peak memory source: {', '.join(view.sources()) or '—'}; saving = 1 - DEQ/baseline peak")
    return lines + unconverged_lines(view) + quality_lines(view)


def converged_text(flag: Any) -> str:
    return "—" if pd.isna(flag) else "yes" if flag else "NO"


def unconverged(df: pd.DataFrame) -> pd.DataFrame:
    """Rows with numbers whose solve stopped above its tolerance (`converged` = 0)."""
    return df[df["status"].isin(OK_STATUSES) & (pd.to_numeric(df["converged"], errors="coerce") == 0)]


def unconverged_lines(view: RunView) -> list[str]:
    cut = unconverged(view.df)
    if cut.empty:
        return []
    return [f"{len(cut)} case(s) did not converge (their time and memory are of a truncated "
            "solve, not of an equilibrium; raise max_iter or tol):",
            *(f"  {r.case_id}  {r.error if isinstance(r.error, str) else ''}" for r in cut.itertuples())]


def quality_lines(view: RunView) -> list[str]:
    t = view.quality
    if t.empty:
        return []
    head = (f"{'model':<18}{'L':>4}{'steps':>7}{'train s':>9}{'tokens/s':>10}{'peak':>11}"
            f"{'NFE f/b':>9}{'valid ppl':>11}{'optimum':>9}{'gap':>8}")
    lines = ["", "quality after the same training budget (fit cases):", head, "-" * len(head)]
    for r in t.itertuples():
        nfe = "—" if pd.isna(r.nfe_forward) else f"{r.nfe_forward:.0f}/" + fmt(r.nfe_backward, ".0f")
        lines.append(
            f"{r.model:<18}{fmt(r.depth, '.0f'):>4}{fmt(r.train_steps, '.0f'):>7}{fmt(r.train_s, '.1f'):>9}"
            f"{fmt(r.tokens_per_s, ',.0f'):>10}{format_bytes(r.peak_bytes):>11}{nfe:>9}"
            f"{fmt(r.valid_ppl, '.3f'):>11}{fmt(r.optimal_ppl, '.3f'):>9}{format_pct(r.gap):>8}"
        )
    return lines


def paper_lines(view: RunView) -> list[str]:
    t = view.paper
    t = t[t["baseline_status"].notna() | t["deq_status"].notna()]
    if t.empty:
        return []
    lines = [f"{'paper pair':<72}{'baseline':>11}{'DEQ':>11}{'ours':>8}{'paper':>8}  source"]
    for r in t.itertuples():
        lines.append(
            f"{r.pair:<72}{format_bytes(r.baseline_peak_bytes):>11}{format_bytes(r.deq_peak_bytes):>11}"
            f"{format_pct(r.reduction):>8}{format_pct(r.paper_reduction):>8}  {r.source or '—'}"
        )
    return lines
