"""Speed: throughput, and the DEQ/explicit slowdown against the DEQ's function evaluations."""

from __future__ import annotations

from typing import Any

import pandas as pd

from bench.analysis import RunView
from bench.paper import SPEED
from bench.plots.registry import figure
from bench.plots.style import (
    LINE_KEYS,
    VARIANT_COLORS,
    VARIANT_LABELS,
    VARIANT_MARKERS,
    Skip,
    family_list,
    figure_legend,
    has_line,
    int_log_axis,
    line_label,
    line_styles,
    phase_list,
    pyplot,
    run_title,
    subplot_grid,
    variant_order,
)
from bench.results import OK_STATUSES


@figure("speed", "Speed")
def speed(run: RunView) -> tuple[Any, str, list[str]]:
    """tokens/s per phase, and DEQ/explicit slowdown against the DEQ's NFE with Table 4."""
    lack = run.lacks("tokens_per_s", "step_s_median")
    if lack:
        raise Skip(lack)
    df = run.df[run.df["status"].isin(OK_STATUSES) & run.df["tokens_per_s"].notna()]
    if df.empty:
        raise Skip("no case was timed (predicted runs measure no time)")
    families = family_list(df)
    x = "seq_len" if has_line(df, "seq_len", [*LINE_KEYS, "depth"]) else "depth"
    other = "depth" if x == "seq_len" else "seq_len"
    bars = not has_line(df[df["variant"] != "deq"] if x == "depth" else df, x, [*LINE_KEYS, other])
    phases = phase_list(df)
    plt = pyplot()
    p = run.pairs
    p = p[p["slowdown"].notna()] if not p.empty else p
    notes = [] if not p.empty else ["speed: no timed DEQ-baseline pair, so no slowdown panel"]
    fig, axes = subplot_grid(plt, len(families), len(phases) + (not p.empty), width=4.6, height=3.6)
    for i, family in enumerate(families):
        for j, phase in enumerate(phases):
            ax = axes[i, j]
            rows = df[(df["family"] == family) & (df["phase"] == phase)]
            ax.set_title(f"{family}, {phase}: throughput")
            if rows.empty:  # another family has this phase; this one was not timed in it
                _empty(ax, f"no timed {family} case\nin this phase")
                continue
            if bars:  # no model at two shapes: one bar per case
                _speed_bars(ax, rows)
                continue
            _speed_panel(ax, rows, x, other)
            ax.set_ylabel("tokens / s (median step)" if j == 0 else "")
            ax.set_xlabel("sequence length T" if x == "seq_len" else "explicit depth L")
        if not p.empty:
            _slowdown_panel(axes[i, -1], p[p["family"] == family], family)
    figure_legend(fig, axes)
    fig.suptitle(run_title(run, "Speed", df))
    fig.tight_layout()
    caption = ("Throughput of training and inference steps (median of the timed steps), and the "
               "DEQ's step time over each explicit baseline's against the DEQ's function evaluations "
               "(forward + backward NFE) per explicit layer pass; on the dash-dotted diagonal the "
               "slowdown is exactly the evaluation ratio; horizontal lines are the paper's Table 4 "
               "ratios (WT103, paper sizes).")
    if p.empty:
        caption = "Throughput (median of the timed steps) of every timed case."
    return fig, caption, notes


def _empty(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", color="grey")
    ax.set_xticks([])
    ax.set_yticks([])


def _speed_bars(ax, rows: pd.DataFrame) -> None:
    rows = rows.sort_values(["variant", "depth", "solver"], key=variant_order)
    sizes = rows["size"].nunique() > 1
    labels = [line_label(r, "depth", sizes) + ("" if rows["seq_len"].nunique() == 1 else f", T={r.seq_len}")
              for r in rows.itertuples()]
    ax.barh(labels, rows["tokens_per_s"], color=[VARIANT_COLORS.get(v, "grey") for v in rows["variant"]])
    for y, v in enumerate(rows["tokens_per_s"]):
        ax.text(v, y, f" {v:,.0f}", va="center", fontsize=7)
    ax.invert_yaxis()
    ax.set_xlim(0, rows["tokens_per_s"].max() * 1.25)
    ax.set_xlabel("tokens / s (median step)")
    ax.grid(True, axis="x", alpha=0.3)


def _speed_panel(ax, rows: pd.DataFrame, x: str, other: str) -> None:
    styles = line_styles(rows[other])
    xs = sorted(rows[x].dropna().unique())
    sizes = rows["size"].nunique() > 1
    for _, g in rows.groupby([*LINE_KEYS, other], dropna=False, sort=False):
        r = g.iloc[0]
        g = g.sort_values(x)
        color = VARIANT_COLORS.get(r.variant, "grey")
        label = line_label(r, other if len(styles) > 1 else None, sizes)
        if x == "depth" and r.variant == "deq":
            ax.axhline(float(g["tokens_per_s"].iloc[-1]), color=color, linestyle=styles.get(r[other], "-"),
                       linewidth=2, label=label)
            continue
        ax.plot(g[x], g["tokens_per_s"], styles.get(r[other], "-") if pd.notna(r[other]) else "-",
                marker=VARIANT_MARKERS.get(r.variant, "o"), markersize=4, color=color, label=label)
    ax.set_yscale("log")
    _count_axis(ax)
    if xs:
        int_log_axis(ax, xs)
    ax.grid(True, which="both", alpha=0.3)


def _count_axis(ax) -> None:
    """A log axis of counts labelled 2k, 5k, 10k, 20k ... at 1-2-5 steps."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    def short(v: float, _: Any) -> str:
        for unit, scale in (("M", 1e6), ("k", 1e3)):
            if v >= scale:
                return f"{v / scale:g}{unit}"
        return f"{v:g}"

    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(short))
    ax.yaxis.set_minor_formatter(NullFormatter())


def _slowdown_panel(ax, p: pd.DataFrame, family: str) -> None:
    """Slowdown against the DEQ's function evaluations per explicit layer application:
    (forward + backward NFE) / 2L for a training step, forward NFE / L for inference. On the
    diagonal, the DEQ's extra time is just its extra evaluations of the same block."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.set_title(f"{family}: DEQ / explicit step time")
    ax.set_xlabel("DEQ evaluations of f per explicit layer pass\n(train: (NFE fwd + bwd) / 2L; eval: NFE fwd / L)")
    ax.set_ylabel("slowdown (×)")
    if p.empty:
        _empty(ax, "no timed DEQ-baseline pair")
        return
    train = p["phase"] == "train"
    evals = p["nfe_forward"] + p["nfe_backward"].where(train, 0).fillna(0)
    work = evals / (p["depth"] * train.map({True: 2, False: 1}))  # (n,)
    for (variant, phase), idx in p.groupby(["baseline_variant", "phase"]).groups.items():
        g = p.loc[idx]
        ax.scatter(work.loc[idx], g["slowdown"], color=VARIANT_COLORS.get(variant, "grey"),
                   marker="o" if phase == "train" else "^",
                   facecolors=VARIANT_COLORS.get(variant, "grey") if phase == "train" else "none",
                   label=f"vs {VARIANT_LABELS.get(variant, variant)} ({phase})", zorder=3)
        for k in idx:
            ax.annotate(f"L{p.loc[k, 'depth']:.0f}", (work.loc[k], p.loc[k, "slowdown"]),
                        textcoords="offset points", xytext=(4, 2), fontsize=6)
    ok = work[work.notna() & (work > 0)]
    if not ok.empty:
        lo, hi = float(ok.min()) / 1.5, float(ok.max()) * 1.5
        ax.plot([lo, hi], [lo, hi], color="grey", linestyle="-.", linewidth=0.9,
                label="slowdown = evaluation ratio")
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
    paper = SPEED.get(family)
    if paper:
        for phase, style in (("train", "--"), ("eval", ":")):
            ax.axhline(paper[phase], color="black", linestyle=style, linewidth=1)
            # top left stays clear: points sit near the diagonal
            ax.text(0.01, paper[phase], f"paper {phase} {paper[phase]:.2f}×",
                    transform=ax.get_yaxis_transform(), fontsize=7, va="bottom", ha="left",
                    bbox={"boxstyle": "square,pad=0.1", "facecolor": "white", "alpha": 0.7, "linewidth": 0})
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}×"))
    ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}×" if v in (0.5, 2, 5, 20) else ""))
    ax.grid(True, which="both", alpha=0.3)


