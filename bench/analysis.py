"""Derived views of results.csv: DEQ-vs-baseline pairs and the paper comparison.

Every number here is recomputed from the table's raw bytes and seconds, so the summary printed by
`deqbench run`, the report and the figures agree with the CSV by construction.
"""

from __future__ import annotations

import math

import pandas as pd

from bench.paper import PAIRS, PROTOCOL

PAIR_KEY = ["family", "size", "mode", "phase", "seq_len", "batch"]


def pairs(df: pd.DataFrame) -> pd.DataFrame:
    """Each DEQ case against every explicit case of its family at the same shape and phase.

    reduction = 1 - deq_peak / baseline_peak; slowdown = deq step time / baseline step time.
    A baseline that ran out of memory or time where the DEQ fit is kept with its status and
    no reduction (its peak is unknown, only above the limit)."""
    if df.empty or "variant" not in df:
        return pd.DataFrame()
    deq = df[(df["variant"] == "deq") & (df["status"].isin(["ok", "diverged"]))]
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
    })
    ok = out["baseline_status"].isin(["ok", "diverged"])
    out["reduction"] = (1.0 - out["deq_peak_bytes"] / out["baseline_peak_bytes"]).where(ok)
    out["slowdown"] = (out["deq_step_s"] / out["baseline_step_s"]).where(ok)
    return out.sort_values(["family", "phase", "baseline_variant", "seq_len", "depth"]).reset_index(drop=True)


def paper_table(df: pd.DataFrame) -> pd.DataFrame:
    """Per PAPER.md pair: our peaks at the paper protocol beside the paper's, when present."""
    rows = []
    for pair in PAIRS:
        base = _protocol_row(df, pair.baseline_model, pair.size, pair.baseline_depth)
        deq = _protocol_row(df, pair.deq_model, pair.size, None)
        base_peak = _peak(base)
        deq_peak = _peak(deq)
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
    if row is None or row["status"] not in ("ok", "diverged") or pd.isna(row["peak_bytes"]):
        return math.nan
    return float(row["peak_bytes"])


def _source(*rows: pd.Series | None) -> str | None:
    sources = {r["memory_source"] for r in rows if r is not None and isinstance(r["memory_source"], str)}
    if not sources:
        return None
    return "predicted" if sources == {"predicted"} else "measured" if "predicted" not in sources else "mixed"


def format_bytes(n: float | None) -> str:
    if n is None or (isinstance(n, float) and math.isnan(n)):
        return "—"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def format_pct(x: float | None) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}%"


def summary_lines(df: pd.DataFrame) -> list[str]:
    """The table `deqbench run` prints at the end: per pair, peaks, reduction and slowdown."""
    p = pairs(df)
    lines = []
    if p.empty:
        return ["no DEQ-baseline pairs in these results", *quality_lines(df)]
    head = f"{'family':<12}{'phase':<6}{'T':>5}  {'baseline':<17}{'L':>4}{'DEQ peak':>11}{'base peak':>11}{'saving':>8}{'slowdown':>9}{'NFE f/b':>9}"
    lines.append(head)
    lines.append("-" * len(head))
    for r in p.itertuples():
        slow = "—" if pd.isna(r.slowdown) else f"{r.slowdown:.2f}x"
        nfe = "—" if pd.isna(r.nfe_forward) else f"{r.nfe_forward:.0f}/" + ("—" if pd.isna(r.nfe_backward) else f"{r.nfe_backward:.0f}")
        base_peak = format_bytes(r.baseline_peak_bytes) if r.baseline_status in ("ok", "diverged") else r.baseline_status
        lines.append(
            f"{r.family:<12}{r.phase:<6}{r.seq_len:>5}  {r.baseline_model:<17}{r.depth:>4.0f}"
            f"{format_bytes(r.deq_peak_bytes):>11}{base_peak:>11}{format_pct(r.reduction):>8}{slow:>9}{nfe:>9}"
        )
    sources = sorted(set(df["memory_source"].dropna()))
    lines.append(f"peak memory source: {', '.join(sources) or '—'}; saving = 1 - DEQ/baseline peak")
    return lines + quality_lines(df)


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


def quality_lines(df: pd.DataFrame) -> list[str]:
    t = quality_table(df)
    if t.empty:
        return []
    head = (f"{'model':<18}{'L':>4}{'steps':>7}{'train s':>9}{'tokens/s':>10}{'peak':>11}"
            f"{'NFE f/b':>9}{'valid ppl':>11}{'optimum':>9}{'gap':>8}")
    lines = ["", "quality after the same training budget (fit cases):", head, "-" * len(head)]
    for r in t.itertuples():
        depth = "—" if pd.isna(r.depth) else f"{r.depth:.0f}"
        nfe = "—" if pd.isna(r.nfe_forward) else f"{r.nfe_forward:.0f}/" + ("—" if pd.isna(r.nfe_backward) else f"{r.nfe_backward:.0f}")
        lines.append(
            f"{r.model:<18}{depth:>4}{_num(r.train_steps, '.0f'):>7}{_num(r.train_s, '.1f'):>9}"
            f"{_num(r.tokens_per_s, ',.0f'):>10}{format_bytes(r.peak_bytes):>11}{nfe:>9}"
            f"{_num(r.valid_ppl, '.3f'):>11}{_num(r.optimal_ppl, '.3f'):>9}{format_pct(r.gap):>8}"
        )
    return lines


def _num(value: float | None, spec: str) -> str:
    return "—" if value is None or pd.isna(value) else format(value, spec)


def paper_lines(df: pd.DataFrame) -> list[str]:
    t = paper_table(df)
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
