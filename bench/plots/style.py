"""What every figure shares: colours fixed per variant (and solver) so a reader can carry them
from figure to figure, the axes helpers, and how a figure says it has nothing to draw (`Skip`)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import pandas as pd

from bench.analysis import SOURCE_LABELS, RunView
from bench.results import FAILED_STATUSES

DPI = 150  # readable on screen and in a README at ~1000 px wide
FAILED_MARKS = FAILED_STATUSES
LINE_KEYS = ["model", "variant", "size", "mode", "batch", "solver", "backward"]  # one line each

VARIANT_COLORS = {
    "deq": "#d62728",  # red: the model the question is about
    "untied": "#1f77b4",
    "tied": "#2ca02c",
    "ckpt": "#ff7f0e",
    "hf": "#9467bd",
}
VARIANT_LABELS = {
    "deq": "DEQ",
    "untied": "untied (L layers)",
    "tied": "weight-tied (1 layer x L)",
    "ckpt": "weight-tied, checkpointed",
    "hf": "HF GPT-2",
}
SOLVER_COLORS = {"broyden": "#8c564b", "anderson": "#e377c2", "fixed_point": "#17becf"}
FAMILY_MARKERS = {"transformer": "o", "trellisnet": "s"}  # where families share a panel
# within a family's panel: lines that nearly coincide still show both markers
VARIANT_MARKERS = {"deq": "o", "untied": "v", "tied": "s", "ckpt": "D", "hf": "^"}
STYLES = ("-", "--", ":", "-.")  # one per value of the axis not on x (largest first)


class Skip(Exception):
    """This run has no data for the figure; the message says why."""


def run_title(run: RunView, what: str, rows: pd.DataFrame) -> str:
    return (f"{what}\n{run.device} · preset {run.preset} · batch {values_text(rows['batch'])} · "
            f"seq_len {values_text(rows['seq_len'])}")


def values_text(s: pd.Series) -> str:
    vals = sorted({int(v) for v in s.dropna()})
    if not vals:
        return "?"
    if len(vals) <= 3:
        return ", ".join(map(str, vals))
    return f"{vals[0]}–{vals[-1]} ({len(vals)} values)"



def pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; never a window
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 9, "axes.titlesize": 10, "figure.titlesize": 11,
                         "legend.fontsize": 8, "svg.fonttype": "none"})
    return plt


# -- helpers shared by the figures ----------------------------------------------------------------
def ok_rows(df: pd.DataFrame) -> pd.DataFrame:
    from bench.results import OK_STATUSES

    return df[df["status"].isin(OK_STATUSES) & df["peak_bytes"].notna()]


def source_label(rows: pd.DataFrame) -> str:
    sources = sorted(set(rows["memory_source"].dropna()))
    return "; ".join(SOURCE_LABELS.get(s, s) for s in sources) or "source unknown"


def bytes_axis(ax, axis: str = "y") -> None:
    """Byte labels (500 kB, 2 MB) at 1-2-5 steps, or at decades when the range is wide."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    target = ax.yaxis if axis == "y" else ax.xaxis
    lo, hi = ax.get_ylim() if axis == "y" else ax.get_xlim()
    wide = lo > 0 and math.log10(hi / lo) > 2.5
    target.set_major_locator(LogLocator(base=10, subs=(1.0,) if wide else (1.0, 2.0, 5.0)))
    target.set_major_formatter(FuncFormatter(lambda v, _: short_bytes(v)))
    target.set_minor_formatter(NullFormatter())


def short_bytes(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:g} {unit}"
    return f"{n:g} B"


def int_log_axis(ax, values: Iterable[float], axis: str = "x") -> None:
    """A log2 axis ticked at exactly the values the run has (seq_len, depth)."""
    from matplotlib.ticker import FixedLocator, NullLocator, ScalarFormatter

    target = ax.xaxis if axis == "x" else ax.yaxis
    (ax.set_xscale if axis == "x" else ax.set_yscale)("log", base=2)
    target.set_major_locator(FixedLocator(sorted(set(values))))
    target.set_major_formatter(ScalarFormatter())
    target.set_minor_locator(NullLocator())


def line_label(r: Any, other: str | None, size: bool = False) -> str:
    """'weight-tied (1 layer x L), L=16 [debug]': the variant, the value of the axis that is not
    on x (when it varies), the size (when the run has several)."""
    if r.variant == "deq":
        label = f"DEQ ({r.solver}, {r.backward})"
    else:
        label = VARIANT_LABELS.get(r.variant, r.variant)
    if other == "depth" and r.variant != "deq" and pd.notna(r.depth):
        label += f", L={r.depth:.0f}"
    if other == "seq_len":
        label += f", T={r.seq_len:.0f}"
    if size:
        # a Series row's .size is its length: read the column by name
        label += f" [{r['size'] if isinstance(r, pd.Series) else r.size}]"
    return label


def has_line(df: pd.DataFrame, x: str, keys: list[str]) -> bool:
    """Some model (same size, same value of the other axes) was run at >= 2 values of x."""
    rows = df[df[x].notna()]
    return not rows.empty and bool((rows.groupby(keys, dropna=False)[x].nunique() >= 2).any())


def line_styles(values: Iterable[float]) -> dict[float, str]:
    """Largest value solid, then dashed, dotted, dash-dot."""
    ordered = sorted({v for v in values if pd.notna(v)}, reverse=True)
    return {v: STYLES[i % len(STYLES)] for i, v in enumerate(ordered)}


def mark_failed(ax, x: float, status: str, color: str) -> None:
    """A failed case at x: an X on the panel's top edge (its memory is above what fit, unknown)."""
    from matplotlib.transforms import blended_transform_factory

    tr = blended_transform_factory(ax.transData, ax.transAxes)
    ax.plot([x], [0.97], marker="X", markersize=8, color=color, transform=tr, clip_on=False,
            linestyle="none", markeredgecolor="black", markeredgewidth=0.5)
    ax.text(x, 0.93, status, transform=tr, color=color, fontsize=7, ha="center", va="top")


def family_list(df: pd.DataFrame) -> list[str]:
    return sorted(df["family"].dropna().unique())


def phase_list(df: pd.DataFrame) -> list[str]:
    present = set(df["phase"].dropna())
    return [p for p in ("train", "eval") if p in present] + sorted(present - {"train", "eval"})


def subplot_grid(plt, rows: int, cols: int, *, width: float = 5.0, height: float = 3.6, **kw):
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False, **kw)
    return fig, axes


def figure_legend(fig, axes) -> None:
    """One legend for the figure, right of the panels, each label once."""
    seen: dict[str, Any] = {}
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            seen.setdefault(label, handle)
    if seen:
        fig.legend(seen.values(), seen.keys(), loc="center left", bbox_to_anchor=(1.0, 0.5),
                   frameon=False)



def status_counts(rows: pd.DataFrame) -> str:
    return ", ".join(f"{n} {s}" for s, n in rows["status"].value_counts().items())



def variant_order(s: pd.Series) -> pd.Series:
    order = {v: i for i, v in enumerate(VARIANT_COLORS)}
    return s.map(order).fillna(len(order)) if s.name == "variant" else s

