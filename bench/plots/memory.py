"""Peak memory against sequence length and against depth, log-log, one line per model."""

from __future__ import annotations

from typing import Any

import pandas as pd

from bench.analysis import RunView
from bench.plots.registry import figure
from bench.plots.style import (
    FAILED_MARKS,
    LINE_KEYS,
    VARIANT_COLORS,
    VARIANT_MARKERS,
    Skip,
    bytes_axis,
    family_list,
    figure_legend,
    has_line,
    int_log_axis,
    line_label,
    line_styles,
    mark_failed,
    ok_rows,
    phase_list,
    pyplot,
    run_title,
    source_label,
    status_counts,
    subplot_grid,
    values_text,
)


@figure("memory_vs_seq_len", "Peak memory vs sequence length")
def memory_vs_seq_len(run: RunView) -> tuple[Any, str, list[str]]:
    return _memory_vs(run, "seq_len")


@figure("memory_vs_depth", "Peak memory vs depth")
def memory_vs_depth(run: RunView) -> tuple[Any, str, list[str]]:
    return _memory_vs(run, "depth")


def _memory_vs(run: RunView, x: str) -> tuple[Any, str, list[str]]:
    lack = run.lacks("peak_bytes", "status", x)
    if lack:
        raise Skip(lack)
    df = run.df
    explicit = df[df["variant"] != "deq"]
    xs = sorted(explicit[x].dropna().unique()) if x == "depth" else sorted(df[x].dropna().unique())
    other = "seq_len" if x == "depth" else "depth"
    if x == "depth" and explicit.empty:
        raise Skip("no explicit model in this run (the DEQ has no depth)")
    if len(xs) < 2 or not has_line(explicit if x == "depth" else df, x, [*LINE_KEYS, other]):
        what = "depth" if x == "depth" else "sequence length"
        raise Skip(f"no model was run at two {what}s with its size and other axes fixed (this run: "
                    f"{what} {values_text(pd.Series(xs))}): no line to draw")
    families = [f for f in family_list(df) if not ok_rows(df[df["family"] == f]).empty]
    notes = [f"memory vs {x}: every {f} case failed ({status_counts(df[df['family'] == f])}); "
             "no panel" for f in family_list(df) if f not in families]
    if not families:
        raise Skip("no case has a peak memory (all failed)")
    phases = phase_list(df)
    plt = pyplot()
    fig, axes = subplot_grid(plt, len(phases), len(families))
    for i, phase in enumerate(phases):
        for j, family in enumerate(families):
            ax = axes[i, j]
            rows = df[(df["family"] == family) & (df["phase"] == phase)]
            ax.set_title(f"{family}, {phase}")
            if rows.empty:  # another family has this phase; this one was not run in it
                ax.text(0.5, 0.5, f"no {family} case\nin this phase", transform=ax.transAxes,
                        ha="center", va="center", color="grey")
                ax.set_xticks([])
                ax.set_yticks([])
                continue
            _memory_panel(ax, rows, x, other, xs, slope=phase == "train")
            ax.set_xlabel("sequence length T" if x == "seq_len" else "explicit depth L (layers)")
            ax.set_ylabel(f"peak memory\n{source_label(rows)}" if j == 0 else "")
    figure_legend(fig, axes)
    what = "Peak memory vs sequence length" if x == "seq_len" else "Peak memory vs depth"
    fig.suptitle(run_title(run, what, df))
    fig.tight_layout()
    if x == "seq_len":
        caption = ("Peak memory of one step against sequence length, log-log: one line per model "
                   "(and explicit depth); an X on a panel's top edge marks a case that ran out of "
                   "memory or time (its peak is unknown); lines that coincide are drawn as rings.")
    else:
        caption = ("Peak memory of one step against explicit depth, log-log: the DEQ has no depth, "
                   "so it is a horizontal line; lines that coincide are drawn as rings; a line that "
                   "ends without an X was not run further (the preset's choice), an X marks a failure."
                   + (" Untied baselines are parameter-matched to the DEQ: a deeper untied net has "
                      "narrower layers." if run.matched_params else ""))
    return fig, caption, notes


def _memory_panel(ax, rows: pd.DataFrame, x: str, other: str, xs: list[float], *, slope: bool) -> None:
    styles = line_styles(rows[other]) if other in rows else {}
    anchors: list[tuple[float, float]] = []
    drawn: list[tuple[tuple[float, ...], tuple[float, ...]]] = []  # (x, y) of the lines so far
    sizes = rows["size"].nunique() > 1
    for _, g in rows.groupby([*LINE_KEYS, other], dropna=False, sort=False):
        r = g.iloc[0]
        color = VARIANT_COLORS.get(r.variant, "grey")
        style = styles.get(r[other], "-") if pd.notna(r[other]) else "-"
        ok = ok_rows(g).sort_values(x)
        label = line_label(r, other if len(styles) > 1 else None, sizes)
        if x == "depth" and r.variant == "deq":  # no depth: its one peak across the depth range
            if not ok.empty:
                peak = float(ok["peak_bytes"].iloc[-1])
                ax.plot([min(xs), max(xs)], [peak, peak], style, color=color, linewidth=2, label=label)
            for s in g[g["status"].isin(FAILED_MARKS)].itertuples():
                mark_failed(ax, max(xs), s.status, color)
            continue
        if not ok.empty:
            # A line identical to one already drawn (eval: tied and checkpointed hold the same
            # bytes) would vanish under it: its markers become larger rings around the first's.
            points = (tuple(ok[x]), tuple(ok["peak_bytes"]))
            same = sum(1 for d in drawn if d == points)
            drawn.append(points)
            # explicit markers hollow: one that nearly covers another still shows its outline
            filled = same == 0 and r.variant == "deq"
            ax.plot(ok[x], ok["peak_bytes"], style, marker=VARIANT_MARKERS.get(r.variant, "o"),
                    markersize=5 + 3.5 * same, fillstyle="full" if filled else "none",
                    markeredgewidth=1.2, color=color, label=label, zorder=3 - 0.1 * same)
            diverged = ok[ok["status"] == "diverged"]
            if not diverged.empty:
                ax.plot(diverged[x], diverged["peak_bytes"], "D", markersize=7, fillstyle="none",
                        color="black", label="solver diverged (numbers kept)")
            if r.variant != "deq":
                anchors.append((float(ok[x].iloc[0]), float(ok["peak_bytes"].iloc[0])))
        for s in g[g["status"].isin(FAILED_MARKS)].itertuples():
            mark_failed(ax, getattr(s, x), s.status, color)
    if slope and anchors:  # slope 1 through the lowest explicit start: memory proportional to x
        x0, y0 = min(anchors, key=lambda a: a[1])
        x1 = max(xs)
        ax.plot([x0, x1], [y0, y0 * x1 / x0], color="grey", linewidth=0.8, linestyle=(0, (1, 3)),
                label="slope 1 (memory ∝ T)" if x == "seq_len" else "slope 1 (memory ∝ L)")
    ax.set_yscale("log")
    bytes_axis(ax)
    int_log_axis(ax, xs)
    ax.grid(True, which="major", alpha=0.3)


