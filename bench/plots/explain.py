"""One waterfall per PAPER.md pair, from explain.csv (`deqbench explain`): our modern peak, each
factor's Δ, the device overhead, the gap no factor explains (hatched) and the paper's number as
the last bar; one panel per side, and the reduction after each step beside them."""

from __future__ import annotations

import functools
from typing import Any

import pandas as pd

from bench.analysis import NOT_MEASURED, RunView
from bench.format import format_bytes
from bench.paper import GB, PAIRS, PaperPair
from bench.plots.registry import figure
from bench.plots.style import VARIANT_COLORS, Skip, pyplot
from bench.results import number

EXPLAIN_FIGURES = tuple(f"explain-{p.key}" for p in PAIRS)
UP, DOWN, FLAT = "#d6604d", "#4393c3", "#bababa"  # a step that adds memory, removes it, leaves it
GAP, PAPER = "#fdb863", "#252525"


def _draw(pair: PaperPair, run: RunView) -> tuple[Any, str, list[str]]:
    table = run.explain
    if table.empty:
        raise Skip("no explain.csv in this run (`deqbench explain` writes one)")
    rows = table[(table["pair"] == pair.key) & table["kind"].isin(("chain", "device"))].sort_values("order")
    if rows.empty:
        raise Skip(f"explain.csv has no chain for {pair.key}")
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6), gridspec_kw={"width_ratios": [5, 5, 3]})
    last = rows.iloc[-1]
    for ax, who, side, paper_gb in ((axes[0], "baseline", "baseline", pair.baseline_gb),
                                    (axes[1], "DEQ", "deq", pair.deq_gb)):
        _waterfall(ax, rows, side, paper_gb * GB)
        ax.set_title(f"{who}: {pair.baseline_model if side == 'baseline' else pair.deq_model}")
    _reductions(axes[2], rows, pair)
    source = "/".join(sorted(set(rows["source"].dropna()) - {NOT_MEASURED})) or "?"
    fig.suptitle(f"{pair.label}: from our modern peaks to the paper's\n{run.device} · preset {run.preset} · "
                 f"seq_len 150 · batch 15 · memory: {source}")
    fig.tight_layout()
    caption = (f"{pair.label}: our modern peak (first bar), each factor's Δ (red adds memory, blue removes "
               f"it, grey: does not apply), the device overhead (hatched grey where not measured), the "
               f"gap no factor explains (orange, hatched: {format_bytes(last.residual_baseline_bytes)} "
               f"baseline, {format_bytes(last.residual_deq_bytes)} DEQ) and the paper's number (black); "
               f"right: the reduction after each step against the paper's {100 * pair.reduction:.1f}%.")
    return fig, caption, []


def _num(v: Any) -> float:
    n = number(v)
    return float("nan") if n is None else float(n)


def _waterfall(ax, rows: pd.DataFrame, side: str, paper: float) -> None:
    labels, level = [], 0.0
    for i, r in enumerate(rows.itertuples()):
        after, delta = _num(getattr(r, f"{side}_bytes")), _num(getattr(r, f"delta_{side}_bytes"))
        labels.append(r.step)
        if i == 0:
            ax.bar(i, after / GB, color=VARIANT_COLORS["deq"] if side == "deq" else VARIANT_COLORS["untied"])
            ax.text(i, after / GB, format_bytes(after), ha="center", va="bottom", fontsize=7)
        elif r.source == NOT_MEASURED:
            ax.bar(i, max(paper, level) / GB * 0.02, bottom=level / GB, color="white", edgecolor=FLAT, hatch="///")
            ax.text(i, level / GB, " not measured", ha="center", va="bottom", fontsize=6, color="#636363",
                    rotation=90)
        elif delta == delta:  # a measured step (NaN: a case missing)
            color = UP if delta > 0 else DOWN if delta < 0 else FLAT
            ax.bar(i, delta / GB if delta else max(paper, level) / GB * 0.004, bottom=level / GB, color=color)
            if delta:  # above a rise, below a fall: never on the neighbour's label
                ax.text(i, after / GB, f" {_signed(delta)} ", ha="center", va="bottom" if delta > 0 else "top",
                        fontsize=7, rotation=90)
        level = after if after == after else level
    gap, n = paper - level, len(labels)
    ax.bar(n, gap / GB, bottom=level / GB, color=GAP, hatch="xx", edgecolor="#b35806")
    ax.text(n, (level + gap / 2) / GB, _signed(gap), ha="center", va="center", fontsize=7, rotation=90,
            bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.8, "pad": 1})
    ax.bar(n + 1, paper / GB, color=PAPER)
    ax.text(n + 1, paper / GB, f"{paper / GB:g} GB", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(n + 2), [*labels, "unexplained", "paper"], rotation=45, ha="right")
    ax.set_ylabel("peak training memory (GB)")
    ax.set_ylim(0, max(paper, level, *(_num(v) for v in rows[f"{side}_bytes"] if _num(v) == _num(v))) / GB * 1.12)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)


def _signed(v: float) -> str:
    return ("+" if v > 0 else "") + format_bytes(v)


def _reductions(ax, rows: pd.DataFrame, pair: PaperPair) -> None:
    values = [100 * _num(v) for v in rows["reduction"]]
    ax.plot(range(len(values)), values, marker="o", color=VARIANT_COLORS["deq"], label="ours after the step")
    ax.axhline(100 * pair.reduction, color=PAPER, linestyle="--", label=f"paper {100 * pair.reduction:.1f}%")
    last = rows.iloc[-1]
    ax.annotate(f"residual {_num(last.residual_reduction_points):+.1f} points", (len(values) - 1, values[-1]),
                textcoords="offset points", xytext=(-10, -18), ha="right", fontsize=7)
    ax.set_xticks(range(len(values)), list(rows["step"]), rotation=45, ha="right")
    ax.set_ylabel("memory reduction 1 − DEQ/baseline (%)")
    ax.set_title("reduction after each step")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", frameon=False)


for _pair in PAIRS:
    figure(f"explain-{_pair.key}", f"Waterfall: {_pair.label}")(functools.partial(_draw, _pair))
