"""The memory reduction 1 - DEQ/explicit: lines against depth and sequence length, a
sequence length x depth map, and the paper's own pairs beside ours."""

from __future__ import annotations

import itertools
import math
from typing import Any

import pandas as pd

from bench.analysis import RunView
from bench.paper import CLAIM, PAIRS, PROTOCOL
from bench.plots.registry import figure
from bench.plots.style import (
    FAMILY_MARKERS,
    VARIANT_COLORS,
    VARIANT_LABELS,
    Skip,
    has_line,
    int_log_axis,
    line_styles,
    mark_failed,
    pyplot,
    run_title,
    subplot_grid,
    values_text,
)


def _train_pairs(run: RunView) -> pd.DataFrame:
    lack = run.lacks("peak_bytes", "status", "depth", "seq_len")
    if lack:
        raise Skip(lack)
    if run.pairs.empty:
        raise Skip("no DEQ-baseline pair (a DEQ and an explicit model of its family at the same "
                   "shape, both with a peak)")
    if run.train_pairs.empty:
        raise Skip("no training-step pairs (the paper's memory claim is about training)")
    return run.train_pairs


@figure("reduction", "Memory reduction vs depth and sequence length")
def reduction(run: RunView) -> tuple[Any, str, list[str]]:
    """1 - DEQ/explicit peak against depth and against seq_len, the 88% line, the paper's pairs.

    Drawn on a log scale of DEQ/explicit (inverted: up = more saving), labelled as reductions:
    a DEQ 5x larger than its baseline (-400%) and one 8x smaller (88%) are equally far from 0."""
    from matplotlib.lines import Line2D

    train = _train_pairs(run)
    keys = ["family", "baseline_model", "size", "mode", "batch", "solver", "backward"]
    axes_x = [x for x in ("depth", "seq_len")
              if has_line(train, x, [*keys, "seq_len" if x == "depth" else "depth"])]
    if not axes_x:
        raise Skip("no baseline was paired with the DEQ at two depths or two sequence lengths "
                    "(same size, batch and mode): no line to draw; the report's pair table has the "
                    "numbers")
    plt = pyplot()
    fig, axes = subplot_grid(plt, 1, len(axes_x), width=6.0, height=4.4)
    ratio = train["deq_peak_bytes"] / train["baseline_peak_bytes"]
    train = train.assign(ratio=ratio.where(train["reduction"].notna()))
    paper_on = "depth" if "depth" in axes_x else None
    kinds: dict[str, Any] = {}  # legend: colours, then markers, then line styles
    markers: dict[str, Any] = {}
    legend: dict[str, Any] = {}
    for ax, x in zip(axes[0], axes_x, strict=True):
        other = "seq_len" if x == "depth" else "depth"
        styles = line_styles(train[other])
        for _, g in train.groupby(["baseline_variant", *keys, other], sort=False, dropna=False):
            r = g.iloc[0]
            g = g.sort_values(x)
            color = VARIANT_COLORS.get(r.baseline_variant, "grey")
            ok = g[g["ratio"].notna()]
            ax.plot(ok[x], ok["ratio"], styles[r[other]], marker=FAMILY_MARKERS.get(r.family, "o"),
                    markersize=5, color=color)
            for s in g[g["ratio"].isna()].itertuples():
                mark_failed(ax, getattr(s, x), f"baseline {s.baseline_status}", color)
            kinds.setdefault(f"vs {VARIANT_LABELS.get(r.baseline_variant, r.baseline_variant)}",
                             Line2D([], [], color=color, linewidth=2))
            markers.setdefault(f"{r.family} (marker)", Line2D(
                [], [], color="black", marker=FAMILY_MARKERS.get(r.family, "o"), linestyle="none"))
        if len(styles) > 1:
            for v, style in sorted(styles.items()):
                name = "T" if other == "seq_len" else "L"
                legend.setdefault(f"{name}={v:.0f}", Line2D([], [], color="black", linestyle=style))
        ax.axhline(1 - CLAIM, color="black", linestyle="--", linewidth=1)
        ax.text(0.01, 1 - CLAIM, f"{100 * CLAIM:.0f}%: the paper's claim", va="bottom", fontsize=8,
                transform=ax.get_yaxis_transform())
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.text(0.01, 1.0, "0%: no saving", va="bottom", fontsize=8, transform=ax.get_yaxis_transform())
        ticks = set(train[x].dropna())
        if x == paper_on:  # the paper's depths too, where they don't crowd the run's own ticks
            ticks |= {d for d in (p.baseline_depth for p in PAIRS)
                      if all(max(d, t) / min(d, t) > 1.25 for t in ticks)}
        int_log_axis(ax, ticks)
        fixed = f" (all at {'T' if other == 'seq_len' else 'L'}={next(iter(styles)):.0f})" if len(styles) == 1 else ""
        ax.set_xlabel(("explicit depth L (layers)" if x == "depth" else "sequence length T") + fixed)
        ax.set_ylabel("memory reduction 1 − DEQ/explicit peak\n(log scale of DEQ/explicit)")
        ax.grid(True, alpha=0.3)
        if x == paper_on:
            _paper_points(ax, set(train["family"]))
            legend["paper's pairs (paper sizes, T=150, B=15)"] = Line2D(
                [], [], marker="*", markersize=12, color="white", markeredgecolor="black", linestyle="none")
    ratios = [*train["ratio"].dropna(), 1 - CLAIM, 1.0]
    if paper_on:
        ratios += [p.deq_gb / p.baseline_gb for p in PAIRS]
    lo, hi = min(ratios) / 1.6, max(ratios) * 1.6
    for ax in axes[0]:
        ax.set_yscale("log")
        ax.set_ylim(hi, lo)  # inverted: more saving is higher
        _reduction_ticks(ax, lo, hi)
    legend = {**dict(sorted(kinds.items())), **markers, **legend}
    fig.legend(legend.values(), legend.keys(), loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    fig.suptitle(run_title(run, "Memory reduction of the DEQ, training step", train))
    fig.tight_layout()
    caption = ("Memory reduction 1 − DEQ/explicit peak (training step) against explicit depth and "
               "sequence length; colour = baseline kind, marker = family; up = more saving, on a log "
               "scale of DEQ/explicit; the dashed line is the paper's 88%"
               + ("; stars are the paper's own pairs at their depth (paper sizes, T=150, batch 15)."
                  if paper_on else "."))
    return fig, caption, []


def _reduction_ticks(ax, lo: float, hi: float) -> None:
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    candidates = [0.01, 0.02, 0.05, 0.12, 0.25, 0.5, 1.0, 2.0, 4.0, 10.0, 20.0, 50.0, 100.0]
    ax.yaxis.set_major_locator(FixedLocator([c for c in candidates if lo <= c <= hi]))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{100 * (1 - v):.0f}%"))
    ax.yaxis.set_minor_locator(NullLocator())


def _paper_family(pair: Any) -> str:
    return "trellisnet" if "trellis" in pair.deq_model else "transformer"


PAPER_VARIANTS = {"trellisnet": "tied", "trellisnet-ckpt": "ckpt", "transformer": "untied",
                  "transformer-tied": "tied", "transformer-ckpt": "ckpt"}


def _paper_points(ax, families: set[str]) -> None:
    """The paper's memory pairs at their baseline depth, coloured by baseline kind."""
    shown = [p for p in PAIRS if _paper_family(p) in families]
    placed: list[tuple[float, float, bool]] = []  # (depth, y, label on the left)
    for pair in sorted(shown, key=lambda p: (p.baseline_depth, p.reduction)):
        color = VARIANT_COLORS.get(PAPER_VARIANTS.get(pair.baseline_model, ""), "grey")
        y = pair.deq_gb / pair.baseline_gb
        ax.plot([pair.baseline_depth], [y], marker="*", markersize=13, color=color,
                markeredgecolor="black", linestyle="none", zorder=4)
        # labels on the left, unless a neighbouring star's label is there already
        near = [left for d, yy, left in placed
                if pair.baseline_depth / d < 1.35 and abs(math.log(y / yy)) < 0.3]
        left = not (near and near[-1])
        placed.append((pair.baseline_depth, y, left))
        ax.annotate(f"{100 * pair.reduction:.1f}%", (pair.baseline_depth, y), textcoords="offset points",
                    xytext=(-8 if left else 8, 0), ha="right" if left else "left", va="center", fontsize=7)
    depths = [p.baseline_depth for p in shown]
    if depths:
        lo, hi = ax.get_xlim()
        ax.set_xlim(min(lo, min(depths) / 1.3), max(hi, max(depths) * 1.3))


@figure("reduction_map", "Memory reduction map (sequence length × depth)")
def reduction_map(run: RunView) -> tuple[Any, str, list[str]]:
    """1 - DEQ/explicit over seq_len x depth per family and baseline kind, contours at 88% and 0."""
    import numpy as np
    from matplotlib.colors import TwoSlopeNorm

    train = _train_pairs(run)
    panels = {}
    many = train[["size", "mode", "batch"]].drop_duplicates().shape[0] > 1
    for (family, variant, *shape), g in train.groupby(
            ["family", "baseline_variant", "size", "mode", "batch"], sort=True):
        ok = g[g["reduction"].notna()]
        if ok["seq_len"].nunique() >= 2 and ok["depth"].nunique() >= 2:
            row = f"{family} [{shape[0]}, {shape[1]}, B={shape[2]:.0f}]" if many else family
            panels[row, variant] = g
    if not panels:
        raise Skip("needs training pairs at >= 2 sequence lengths and >= 2 depths for one "
                    f"baseline kind; this run has seq_len {values_text(train['seq_len'])} and depth "
                    f"{values_text(train['depth'])}")
    families = sorted({f for f, _ in panels})
    kinds = [v for v in VARIANT_COLORS if any(k == v for _, k in panels)]
    plt = pyplot()
    fig, axes = plt.subplots(len(families), len(kinds), figsize=(3.9 * len(kinds) + 1.2, 3.6 * len(families) + 0.8),
                             squeeze=False, layout="constrained")
    # -100% and below share the darkest red: the cell texts carry the exact values
    norm = TwoSlopeNorm(vmin=-1.0, vcenter=0.0, vmax=1.0)
    cmap = plt.get_cmap("RdYlGn")
    mesh = None
    for i, family in enumerate(families):
        for j, kind in enumerate(kinds):
            ax = axes[i, j]
            g = panels.get((family, kind))
            if g is None:
                ax.set_axis_off()
                ax.text(0.5, 0.5, f"{family}: no {VARIANT_LABELS.get(kind, kind)} pairs\non a 2×2 grid",
                        ha="center", va="center", transform=ax.transAxes, color="grey")
                continue
            ts = sorted(g["seq_len"].unique())
            ls = sorted(g["depth"].unique())
            grid = np.full((len(ls), len(ts)), np.nan)
            for r in g.itertuples():
                grid[ls.index(r.depth), ts.index(r.seq_len)] = r.reduction
            mesh = ax.pcolormesh(_edges(ts), _edges(ls), grid, cmap=cmap, norm=norm, shading="flat")
            for r in g.itertuples():
                text = f"{100 * r.reduction:.0f}%" if pd.notna(r.reduction) else f"baseline\n{r.baseline_status}"
                dark = pd.notna(r.reduction) and (r.reduction < -0.6 or r.reduction > 0.8)
                ax.text(r.seq_len, r.depth, text, ha="center", va="center", fontsize=8,
                        color="white" if dark else "black")
            if not np.isnan(grid).any():
                cs = ax.contour(ts, ls, grid, levels=[0.0, CLAIM], colors="black",
                                linestyles=["-", "--"], linewidths=1.3)
                ax.clabel(cs, fmt={0.0: "0%", CLAIM: f"{100 * CLAIM:.0f}%"}, fontsize=7)
            int_log_axis(ax, ts, "x")
            int_log_axis(ax, ls, "y")
            ax.set_title(f"{family}\nDEQ vs {VARIANT_LABELS.get(kind, kind)}", fontsize=9)  # 2 lines: no overlap
            ax.set_xlabel("sequence length T")
            ax.set_ylabel("explicit depth L")
            _paper_map_points(ax, g["family"].iloc[0], kind, cmap, norm, ts)
    fig.colorbar(mesh, ax=axes, label="memory reduction 1 − DEQ/explicit peak", extend="min",
                 format=lambda v, _: f"{100 * v:.0f}%", shrink=0.9)
    fig.suptitle(run_title(run, "Memory reduction over sequence length × depth, training step", train))
    caption = ("Memory reduction 1 − DEQ/explicit peak (training step) over sequence length × "
               "explicit depth, per baseline kind (cells: this run's values; −100% and below share "
               "the darkest red); solid contour 0%, dashed contour the paper's 88%; stars, in a "
               "column right of the grid, are the paper's own pairs of that kind at their depth "
               "(the paper's sizes, T=150, batch 15), in the same colours.")
    return fig, caption, []


def _edges(values: list[float]) -> list[float]:
    """Cell edges around log-spaced centres (geometric midpoints)."""
    if len(values) == 1:
        return [values[0] / 1.5, values[0] * 1.5]
    mids = [math.sqrt(a * b) for a, b in itertools.pairwise(values)]
    return [values[0] ** 2 / mids[0], *mids, values[-1] ** 2 / mids[-1]]


def _paper_map_points(ax, family: str, variant: str, cmap, norm, ts: list[float]) -> None:
    """The paper's pairs of this family and baseline kind, at their depth in a column of their
    own right of the grid (they are at T=150 and the paper's sizes: not cells of this run)."""
    from matplotlib.ticker import FixedLocator

    shown = sorted((p for p in PAIRS if _paper_family(p) == family
                    and PAPER_VARIANTS.get(p.baseline_model) == variant), key=lambda p: p.baseline_depth)
    if not shown:
        return
    right = _edges(ts)[-1]
    x = right * 2.2  # the "paper" column, a gap beyond the last cell
    ylo, yhi = ax.get_ylim()
    for i, pair in enumerate(shown):
        y = pair.baseline_depth
        ax.plot([x], [y], marker="*", markersize=15, color=cmap(norm(pair.reduction)),
                markeredgecolor="black", linestyle="none", zorder=4)
        close = i > 0 and y / shown[i - 1].baseline_depth < 1.4
        ax.annotate(f"{100 * pair.reduction:.1f}%\nL={y}", (x, y), textcoords="offset points",
                    xytext=(-9, 7 if close else -7), ha="right", va="bottom" if close else "top", fontsize=6.5)
        ylo, yhi = min(ylo, y / 1.4), max(yhi, y * 2.0)
    ax.axvline(right * 1.3, color="grey", linewidth=0.8)
    ax.set_xlim(right=x * 1.5)
    ax.set_ylim(ylo, yhi)
    ax.xaxis.set_major_locator(FixedLocator([*ts, x]))
    ax.set_xticklabels([f"{t:.0f}" for t in ts] + ["paper\nT=150"])


# -- the paper's pairs --------------------------------------------------------------------------
@figure("paper_pairs", "The paper's pairs: ours vs the paper")
def paper_pairs(run: RunView) -> tuple[Any, str, list[str]]:
    """Ours vs the paper's reduction for each PAPER.md pair this run has at the paper protocol."""
    lack = run.lacks("peak_bytes", "status")
    if lack:
        raise Skip(lack)
    t = run.paper
    t = t[t["baseline_status"].notna() & t["deq_status"].notna()]
    if t.empty:
        raise Skip(f"no pair at the paper's protocol (seq_len {PROTOCOL['seq_len']}, batch "
                    f"{PROTOCOL['batch']}, {PROTOCOL['mode']} mode, the paper's sizes); "
                    "`deqbench predict --preset paper` has them")
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8.5, 0.55 * len(t) + 1.6))
    ys = list(range(len(t)))
    sources = sorted(set(t["source"].dropna()))
    ours = 100 * t["reduction"].astype(float)
    ax.barh([y - 0.2 for y in ys], ours.fillna(0), height=0.38, color="#525252",
            label=f"ours ({', '.join(sources) or '?'})")
    ax.barh([y + 0.2 for y in ys], 100 * t["paper_reduction"], height=0.38, color="#bdbdbd",
            label="paper (PAPER.md)")
    for y, v, status in zip(ys, ours, t["baseline_status"], strict=True):
        if pd.isna(v):
            ax.text(0, y - 0.2, f" baseline {status}: unknown", va="center", fontsize=7)
        else:  # the value at the bar's end, on its outer side
            ax.text(v, y - 0.2, f" {v:.1f}% " if v >= 0 else f"{v:.1f}% ", va="center", fontsize=7,
                    ha="left" if v >= 0 else "right")
    for y, v in zip(ys, 100 * t["paper_reduction"], strict=True):
        ax.text(max(v, 0), y + 0.2, f" {v:.1f}%", va="center", fontsize=7)
    ax.axvline(100 * CLAIM, color="black", linestyle="--", linewidth=1)
    ax.text(100 * CLAIM, -0.75, f"{100 * CLAIM:.0f}%", ha="center", fontsize=8)
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_yticks(ys, [f"{r.pair}\n({r.paper_table})" for r in t.itertuples()], fontsize=7)
    ax.invert_yaxis()
    lo = min(0.0, float(ours.min()) if ours.notna().any() else 0.0)
    ax.set_xlim(lo - 25 if lo < 0 else -5, 110)
    ax.set_xlabel("memory reduction 1 − DEQ/explicit peak (%), training step")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2, frameon=False)
    ax.grid(True, axis="x", alpha=0.3)
    fig.suptitle(run_title(run, "The paper's memory pairs at its protocol: ours vs the paper", t.assign(
        batch=PROTOCOL["batch"], seq_len=PROTOCOL["seq_len"])))
    fig.tight_layout()
    caption = ("Each memory pair of the paper (PAPER.md) at its protocol (T=150, batch 15, no word "
               "embeddings): our reduction beside the paper's; the dashed line is the 88% claim.")
    return fig, caption, []


