"""Figures of a run directory, drawn from results.csv (and env.json, train logs) alone.

    plot_run("results/latest")      # -> Figures; writes figures/<name>.png and .svg
    deqbench plot results/latest

Each figure is a view of the tidy rows: memory vs sequence length and vs depth, the memory
reduction 1 - DEQ/explicit (as lines and as a seq_len x depth map, with the paper's 88% and its
pairs), speed (tokens/s and the DEQ/explicit slowdown against NFE, with the paper's Table 4), the
memory breakdown, solver convergence and training curves. A figure the run has no data for (one
sequence length, no timings, no traces) is skipped with the reason, which the report prints; a
missing column or a family whose cases all failed is a note, never a crash.

Colours are fixed per variant (and per solver) so a reader can carry them from figure to figure.
`figures/index.json` lists what was drawn, with the hash of the results.csv it was drawn from,
so the report embeds exactly these figures.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import math
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from bench.analysis import format_bytes, pairs
from bench.paper import CLAIM, PAIRS, PROTOCOL, SPEED
from bench.results import COLUMNS, RESULTS, read_env, read_results

FIGURE_DIR = "figures"
INDEX = "index.json"
DPI = 150  # readable on screen and in a README at ~1000 px wide
OK = ("ok", "diverged")  # rows whose numbers exist (a diverged solve keeps its measurements)
FAILED_MARKS = ("oom", "timeout", "error")
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
SOURCE_LABELS = {
    "torch_cuda": "torch.cuda max allocated",
    "tracked": "tracked (live tensor bytes)",
    "predicted": "predicted (fake tensors, nothing allocated)",
}


# -- the run and what was drawn -------------------------------------------------------------------
@dataclass
class Figure:
    name: str  # file stem under figures/
    caption: str  # one sentence the report prints under the figure
    files: list[str]  # relative to the run directory

    @property
    def heading(self) -> str:
        return HEADINGS.get(self.name, self.name.replace("_", " "))


@dataclass
class Figures:
    made: list[Figure] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # name -> why it was not drawn
    notes: list[str] = field(default_factory=list)  # things drawn around (missing columns, ...)
    results_sha256: str = ""


@dataclass
class Run:
    """A run directory as the figures see it."""

    dir: Path
    df: pd.DataFrame
    env: dict[str, Any]
    missing: set[str]  # result columns absent from this results.csv

    @classmethod
    def load(cls, run_dir: str | Path) -> Run:
        run_dir = Path(run_dir)
        df = read_results(run_dir)
        missing = {c for c in COLUMNS if c not in df.columns}
        for c in missing:  # absent columns read as empty cells; each figure says what it lacks
            df[c] = None
        for c in ("depth", "seq_len", "batch", "peak_bytes"):
            df[c] = pd.to_numeric(df[c], errors="coerce")
        return cls(run_dir, df, read_env(run_dir), missing)

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

    def title(self, what: str, rows: pd.DataFrame) -> str:
        return f"{what}\n{self.device} · preset {self.preset} · batch {_values(rows['batch'])} · " \
               f"seq_len {_values(rows['seq_len'])}"

    def lacks(self, *columns: str) -> str | None:
        gone = [c for c in columns if c in self.missing]
        return f"results.csv has no {', '.join(gone)} column{'s' if len(gone) > 1 else ''}" if gone else None


def _first(df: pd.DataFrame, col: str) -> str | None:
    if col not in df:
        return None
    values = df[col].dropna()
    return str(values.iloc[0]) if len(values) else None


def _values(s: pd.Series) -> str:
    vals = sorted({int(v) for v in s.dropna()})
    if not vals:
        return "?"
    if len(vals) <= 3:
        return ", ".join(map(str, vals))
    return f"{vals[0]}–{vals[-1]} ({len(vals)} values)"


def results_hash(run_dir: Path) -> str:
    return hashlib.sha256((Path(run_dir) / RESULTS).read_bytes()).hexdigest()


# -- entry points ---------------------------------------------------------------------------------
def plot_run(run_dir: str | Path, only: Iterable[str] | None = None) -> Figures:
    """Draw every figure the run has data for into run_dir/figures (PNG + SVG); returns what was
    drawn and why the others were not, and writes figures/index.json for the report. `only`
    draws just the named figures (no index: the set is incomplete)."""
    wanted = None if only is None else set(only)
    unknown = (wanted or set()) - {name for name, _ in FIGURES}
    if unknown:
        raise ValueError(f"unknown figure(s) {sorted(unknown)}; valid: {', '.join(n for n, _ in FIGURES)}")
    plt = _pyplot()
    run = Run.load(run_dir)
    out = run.dir / FIGURE_DIR
    out.mkdir(exist_ok=True)
    figures = Figures(results_sha256=results_hash(run.dir))
    if run.missing:
        figures.notes.append(f"results.csv lacks column(s) {', '.join(sorted(run.missing))}; "
                             "figures needing them are skipped")
    for name, draw in FIGURES:
        if wanted is not None and name not in wanted:
            continue
        try:
            drawn = draw(run)
        except _Skip as skip:
            figures.skipped[name] = str(skip)
            _remove_stale(out, name)
            continue
        fig, caption, notes = drawn
        files = []
        for ext in ("png", "svg"):
            path = out / f"{name}.{ext}"
            fig.savefig(path, dpi=DPI, bbox_inches="tight")
            files.append(str(path.relative_to(run.dir)))
        plt.close(fig)
        figures.made.append(Figure(name, caption, files))
        figures.notes.extend(notes)
    if wanted is None:
        (out / INDEX).write_text(json.dumps(asdict(figures), indent=2) + "\n")
    return figures


def load_index(run_dir: str | Path) -> Figures | None:
    """The figures drawn for this results.csv, or None if they are missing or stale."""
    run_dir = Path(run_dir)
    path = run_dir / FIGURE_DIR / INDEX
    try:
        data = json.loads(path.read_text())
        figures = Figures(made=[Figure(**f) for f in data["made"]], skipped=data["skipped"],
                          notes=data["notes"], results_sha256=data["results_sha256"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    fresh = figures.results_sha256 == results_hash(run_dir)
    present = all((run_dir / f).exists() for fig in figures.made for f in fig.files)
    return figures if fresh and present else None


def _remove_stale(out: Path, name: str) -> None:
    for ext in ("png", "svg"):
        (out / f"{name}.{ext}").unlink(missing_ok=True)


class _Skip(Exception):
    """This run has no data for the figure; the message says why."""


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; never a window
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 9, "axes.titlesize": 10, "figure.titlesize": 11,
                         "legend.fontsize": 8, "svg.fonttype": "none"})
    return plt


# -- helpers shared by the figures ----------------------------------------------------------------
def _ok(df: pd.DataFrame) -> pd.DataFrame:
    return df[df["status"].isin(OK) & df["peak_bytes"].notna()]


def _source_label(rows: pd.DataFrame) -> str:
    sources = sorted(set(rows["memory_source"].dropna()))
    return "; ".join(SOURCE_LABELS.get(s, s) for s in sources) or "source unknown"


def _bytes_axis(ax, axis: str = "y") -> None:
    """Byte labels (500 kB, 2 MB) at 1-2-5 steps, or at decades when the range is wide."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    target = ax.yaxis if axis == "y" else ax.xaxis
    lo, hi = ax.get_ylim() if axis == "y" else ax.get_xlim()
    wide = lo > 0 and math.log10(hi / lo) > 2.5
    target.set_major_locator(LogLocator(base=10, subs=(1.0,) if wide else (1.0, 2.0, 5.0)))
    target.set_major_formatter(FuncFormatter(lambda v, _: _short_bytes(v)))
    target.set_minor_formatter(NullFormatter())


def _short_bytes(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:g} {unit}"
    return f"{n:g} B"


def _int_log_axis(ax, values: Iterable[float], axis: str = "x") -> None:
    """A log2 axis ticked at exactly the values the run has (seq_len, depth)."""
    from matplotlib.ticker import FixedLocator, NullLocator, ScalarFormatter

    target = ax.xaxis if axis == "x" else ax.yaxis
    (ax.set_xscale if axis == "x" else ax.set_yscale)("log", base=2)
    target.set_major_locator(FixedLocator(sorted(set(values))))
    target.set_major_formatter(ScalarFormatter())
    target.set_minor_locator(NullLocator())


def _line_label(r: Any, other: str | None, size: bool = False) -> str:
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


def _has_line(df: pd.DataFrame, x: str, keys: list[str]) -> bool:
    """Some model (same size, same value of the other axes) was run at >= 2 values of x."""
    rows = df[df[x].notna()]
    return not rows.empty and bool((rows.groupby(keys, dropna=False)[x].nunique() >= 2).any())


def _styles(values: Iterable[float]) -> dict[float, str]:
    """Largest value solid, then dashed, dotted, dash-dot."""
    ordered = sorted({v for v in values if pd.notna(v)}, reverse=True)
    return {v: STYLES[i % len(STYLES)] for i, v in enumerate(ordered)}


def _mark_failed(ax, x: float, status: str, color: str) -> None:
    """A failed case at x: an X on the panel's top edge (its memory is above what fit, unknown)."""
    from matplotlib.transforms import blended_transform_factory

    tr = blended_transform_factory(ax.transData, ax.transAxes)
    ax.plot([x], [0.97], marker="X", markersize=8, color=color, transform=tr, clip_on=False,
            linestyle="none", markeredgecolor="black", markeredgewidth=0.5)
    ax.text(x, 0.93, status, transform=tr, color=color, fontsize=7, ha="center", va="top")


def _families(df: pd.DataFrame) -> list[str]:
    return sorted(df["family"].dropna().unique())


def _phases(df: pd.DataFrame) -> list[str]:
    present = set(df["phase"].dropna())
    return [p for p in ("train", "eval") if p in present] + sorted(present - {"train", "eval"})


def _grid(plt, rows: int, cols: int, *, width: float = 5.0, height: float = 3.6, **kw):
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False, **kw)
    return fig, axes


def _figure_legend(fig, axes) -> None:
    """One legend for the figure, right of the panels, each label once."""
    seen: dict[str, Any] = {}
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            seen.setdefault(label, handle)
    if seen:
        fig.legend(seen.values(), seen.keys(), loc="center left", bbox_to_anchor=(1.0, 0.5),
                   frameon=False)


# -- memory vs sequence length / depth ------------------------------------------------------------
def memory_vs_seq_len(run: Run) -> tuple[Any, str, list[str]]:
    return _memory_vs(run, "seq_len")


def memory_vs_depth(run: Run) -> tuple[Any, str, list[str]]:
    return _memory_vs(run, "depth")


def _memory_vs(run: Run, x: str) -> tuple[Any, str, list[str]]:
    lack = run.lacks("peak_bytes", "status", x)
    if lack:
        raise _Skip(lack)
    df = run.df
    explicit = df[df["variant"] != "deq"]
    xs = sorted(explicit[x].dropna().unique()) if x == "depth" else sorted(df[x].dropna().unique())
    other = "seq_len" if x == "depth" else "depth"
    if x == "depth" and explicit.empty:
        raise _Skip("no explicit model in this run (the DEQ has no depth)")
    if len(xs) < 2 or not _has_line(explicit if x == "depth" else df, x, [*LINE_KEYS, other]):
        what = "depth" if x == "depth" else "sequence length"
        raise _Skip(f"no model was run at two {what}s with its size and other axes fixed (this run: "
                    f"{what} {_values(pd.Series(xs))}): no line to draw")
    families = [f for f in _families(df) if not _ok(df[df["family"] == f]).empty]
    notes = [f"memory vs {x}: every {f} case failed ({_status_counts(df[df['family'] == f])}); "
             "no panel" for f in _families(df) if f not in families]
    if not families:
        raise _Skip("no case has a peak memory (all failed)")
    phases = _phases(df)
    plt = _pyplot()
    fig, axes = _grid(plt, len(phases), len(families))
    for i, phase in enumerate(phases):
        for j, family in enumerate(families):
            ax = axes[i, j]
            rows = df[(df["family"] == family) & (df["phase"] == phase)]
            _memory_panel(ax, rows, x, other, xs, slope=phase == "train")
            ax.set_title(f"{family}, {phase}")
            ax.set_xlabel("sequence length T" if x == "seq_len" else "explicit depth L (layers)")
            ax.set_ylabel(f"peak memory\n{_source_label(rows)}" if j == 0 else "")
    _figure_legend(fig, axes)
    what = "Peak memory vs sequence length" if x == "seq_len" else "Peak memory vs depth"
    fig.suptitle(run.title(what, df))
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
    styles = _styles(rows[other]) if other in rows else {}
    anchors: list[tuple[float, float]] = []
    drawn: list[tuple[tuple[float, ...], tuple[float, ...]]] = []  # (x, y) of the lines so far
    sizes = rows["size"].nunique() > 1
    for _, g in rows.groupby([*LINE_KEYS, other], dropna=False, sort=False):
        r = g.iloc[0]
        color = VARIANT_COLORS.get(r.variant, "grey")
        style = styles.get(r[other], "-") if pd.notna(r[other]) else "-"
        ok = _ok(g).sort_values(x)
        label = _line_label(r, other if len(styles) > 1 else None, sizes)
        if x == "depth" and r.variant == "deq":  # no depth: its one peak across the depth range
            if not ok.empty:
                peak = float(ok["peak_bytes"].iloc[-1])
                ax.plot([min(xs), max(xs)], [peak, peak], style, color=color, linewidth=2, label=label)
            for s in g[g["status"].isin(FAILED_MARKS)].itertuples():
                _mark_failed(ax, max(xs), s.status, color)
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
            _mark_failed(ax, getattr(s, x), s.status, color)
    if slope and anchors:  # slope 1 through the lowest explicit start: memory proportional to x
        x0, y0 = min(anchors, key=lambda a: a[1])
        x1 = max(xs)
        ax.plot([x0, x1], [y0, y0 * x1 / x0], color="grey", linewidth=0.8, linestyle=(0, (1, 3)),
                label="slope 1 (memory ∝ T)" if x == "seq_len" else "slope 1 (memory ∝ L)")
    ax.set_yscale("log")
    _bytes_axis(ax)
    _int_log_axis(ax, xs)
    ax.grid(True, which="major", alpha=0.3)


def _status_counts(rows: pd.DataFrame) -> str:
    return ", ".join(f"{n} {s}" for s, n in rows["status"].value_counts().items())


# -- reduction: lines and map ---------------------------------------------------------------------
def _train_pairs(run: Run) -> pd.DataFrame:
    lack = run.lacks("peak_bytes", "status", "depth", "seq_len")
    if lack:
        raise _Skip(lack)
    p = pairs(run.df)
    if p.empty:
        raise _Skip("no DEQ-baseline pair (a DEQ and an explicit model of its family at the same "
                    "shape, both with a peak)")
    train = p[p["phase"] == "train"]
    if train.empty:
        raise _Skip("no training-step pairs (the paper's memory claim is about training)")
    return train


def reduction(run: Run) -> tuple[Any, str, list[str]]:
    """1 - DEQ/explicit peak against depth and against seq_len, the 88% line, the paper's pairs.

    Drawn on a log scale of DEQ/explicit (inverted: up = more saving), labelled as reductions:
    a DEQ 5x larger than its baseline (-400%) and one 8x smaller (88%) are equally far from 0."""
    from matplotlib.lines import Line2D

    train = _train_pairs(run)
    keys = ["family", "baseline_model", "size", "mode", "batch", "solver", "backward"]
    axes_x = [x for x in ("depth", "seq_len")
              if _has_line(train, x, [*keys, "seq_len" if x == "depth" else "depth"])]
    if not axes_x:
        raise _Skip("no baseline was paired with the DEQ at two depths or two sequence lengths "
                    "(same size, batch and mode): no line to draw; the report's pair table has the "
                    "numbers")
    plt = _pyplot()
    fig, axes = _grid(plt, 1, len(axes_x), width=6.0, height=4.4)
    ratio = train["deq_peak_bytes"] / train["baseline_peak_bytes"]
    train = train.assign(ratio=ratio.where(train["reduction"].notna()))
    paper_on = "depth" if "depth" in axes_x else None
    kinds: dict[str, Any] = {}  # legend: colours, then markers, then line styles
    markers: dict[str, Any] = {}
    legend: dict[str, Any] = {}
    for ax, x in zip(axes[0], axes_x, strict=True):
        other = "seq_len" if x == "depth" else "depth"
        styles = _styles(train[other])
        for _, g in train.groupby(["baseline_variant", *keys, other], sort=False, dropna=False):
            r = g.iloc[0]
            g = g.sort_values(x)
            color = VARIANT_COLORS.get(r.baseline_variant, "grey")
            ok = g[g["ratio"].notna()]
            ax.plot(ok[x], ok["ratio"], styles[r[other]], marker=FAMILY_MARKERS.get(r.family, "o"),
                    markersize=5, color=color)
            for s in g[g["ratio"].isna()].itertuples():
                _mark_failed(ax, getattr(s, x), f"baseline {s.baseline_status}", color)
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
        _int_log_axis(ax, ticks)
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
    fig.suptitle(run.title("Memory reduction of the DEQ, training step", train))
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


def reduction_map(run: Run) -> tuple[Any, str, list[str]]:
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
        raise _Skip("needs training pairs at >= 2 sequence lengths and >= 2 depths for one "
                    f"baseline kind; this run has seq_len {_values(train['seq_len'])} and depth "
                    f"{_values(train['depth'])}")
    families = sorted({f for f, _ in panels})
    kinds = [v for v in VARIANT_COLORS if any(k == v for _, k in panels)]
    plt = _pyplot()
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
            _int_log_axis(ax, ts, "x")
            _int_log_axis(ax, ls, "y")
            ax.set_title(f"{family} DEQ vs {VARIANT_LABELS.get(kind, kind)}", fontsize=9)
            ax.set_xlabel("sequence length T")
            ax.set_ylabel("explicit depth L")
            _paper_map_points(ax, g["family"].iloc[0], kind, cmap, norm, ts)
    fig.colorbar(mesh, ax=axes, label="memory reduction 1 − DEQ/explicit peak", extend="min",
                 format=lambda v, _: f"{100 * v:.0f}%", shrink=0.9)
    fig.suptitle(run.title("Memory reduction over sequence length × depth, training step", train))
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
def paper_pairs(run: Run) -> tuple[Any, str, list[str]]:
    """Ours vs the paper's reduction for each PAPER.md pair this run has at the paper protocol."""
    from bench.analysis import paper_table

    lack = run.lacks("peak_bytes", "status")
    if lack:
        raise _Skip(lack)
    t = paper_table(run.df)
    t = t[t["baseline_status"].notna() & t["deq_status"].notna()]
    if t.empty:
        raise _Skip(f"no pair at the paper's protocol (seq_len {PROTOCOL['seq_len']}, batch "
                    f"{PROTOCOL['batch']}, {PROTOCOL['mode']} mode, the paper's sizes); "
                    "`deqbench predict --preset paper` has them")
    plt = _pyplot()
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
    fig.suptitle(run.title("The paper's memory pairs at its protocol: ours vs the paper", t.assign(
        batch=PROTOCOL["batch"], seq_len=PROTOCOL["seq_len"])))
    fig.tight_layout()
    caption = ("Each memory pair of the paper (PAPER.md) at its protocol (T=150, batch 15, no word "
               "embeddings): our reduction beside the paper's; the dashed line is the 88% claim.")
    return fig, caption, []


# -- speed ----------------------------------------------------------------------------------------
def speed(run: Run) -> tuple[Any, str, list[str]]:
    """tokens/s per phase, and DEQ/explicit slowdown against the DEQ's NFE with Table 4."""
    lack = run.lacks("tokens_per_s", "step_s_median")
    if lack:
        raise _Skip(lack)
    df = run.df[run.df["status"].isin(OK) & run.df["tokens_per_s"].notna()]
    if df.empty:
        raise _Skip("no case was timed (predicted runs measure no time)")
    families = _families(df)
    x = "seq_len" if _has_line(df, "seq_len", [*LINE_KEYS, "depth"]) else "depth"
    other = "depth" if x == "seq_len" else "seq_len"
    bars = not _has_line(df[df["variant"] != "deq"] if x == "depth" else df, x, [*LINE_KEYS, other])
    phases = _phases(df)
    plt = _pyplot()
    p = pairs(run.df)
    p = p[p["slowdown"].notna()] if not p.empty else p
    notes = [] if not p.empty else ["speed: no timed DEQ-baseline pair, so no slowdown panel"]
    fig, axes = _grid(plt, len(families), len(phases) + (not p.empty), width=4.6, height=3.6)
    for i, family in enumerate(families):
        for j, phase in enumerate(phases):
            ax = axes[i, j]
            rows = df[(df["family"] == family) & (df["phase"] == phase)]
            ax.set_title(f"{family}, {phase}: throughput")
            if bars:  # no model at two shapes: one bar per case
                _speed_bars(ax, rows)
                continue
            _speed_panel(ax, rows, x, other)
            ax.set_ylabel("tokens / s (median step)" if j == 0 else "")
            ax.set_xlabel("sequence length T" if x == "seq_len" else "explicit depth L")
        if not p.empty:
            _slowdown_panel(axes[i, -1], p[p["family"] == family], family)
    _figure_legend(fig, axes)
    fig.suptitle(run.title("Speed", df))
    fig.tight_layout()
    caption = ("Throughput of training and inference steps (median of the timed steps), and the "
               "DEQ's step time over each explicit baseline's against the DEQ's function evaluations "
               "(forward + backward NFE) per explicit layer pass; on the dash-dotted diagonal the "
               "slowdown is exactly the evaluation ratio; horizontal lines are the paper's Table 4 "
               "ratios (WT103, paper sizes).")
    if p.empty:
        caption = "Throughput (median of the timed steps) of every timed case."
    return fig, caption, notes


def _speed_bars(ax, rows: pd.DataFrame) -> None:
    rows = rows.sort_values(["variant", "depth", "solver"], key=_variant_order)
    sizes = rows["size"].nunique() > 1
    labels = [_line_label(r, "depth", sizes) + ("" if rows["seq_len"].nunique() == 1 else f", T={r.seq_len}")
              for r in rows.itertuples()]
    ax.barh(labels, rows["tokens_per_s"], color=[VARIANT_COLORS.get(v, "grey") for v in rows["variant"]])
    for y, v in enumerate(rows["tokens_per_s"]):
        ax.text(v, y, f" {v:,.0f}", va="center", fontsize=7)
    ax.invert_yaxis()
    ax.set_xlim(0, rows["tokens_per_s"].max() * 1.25)
    ax.set_xlabel("tokens / s (median step)")
    ax.grid(True, axis="x", alpha=0.3)


def _speed_panel(ax, rows: pd.DataFrame, x: str, other: str) -> None:
    styles = _styles(rows[other])
    xs = sorted(rows[x].dropna().unique())
    sizes = rows["size"].nunique() > 1
    for _, g in rows.groupby([*LINE_KEYS, other], dropna=False, sort=False):
        r = g.iloc[0]
        g = g.sort_values(x)
        color = VARIANT_COLORS.get(r.variant, "grey")
        label = _line_label(r, other if len(styles) > 1 else None, sizes)
        if x == "depth" and r.variant == "deq":
            ax.axhline(float(g["tokens_per_s"].iloc[-1]), color=color, linestyle=styles.get(r[other], "-"),
                       linewidth=2, label=label)
            continue
        ax.plot(g[x], g["tokens_per_s"], styles.get(r[other], "-") if pd.notna(r[other]) else "-",
                marker=VARIANT_MARKERS.get(r.variant, "o"), markersize=4, color=color, label=label)
    ax.set_yscale("log")
    _count_axis(ax)
    if xs:
        _int_log_axis(ax, xs)
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
        ax.text(0.5, 0.5, "no timed DEQ-baseline pair", transform=ax.transAxes, ha="center")
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


# -- memory breakdown -----------------------------------------------------------------------------
def memory_breakdown(run: Run) -> tuple[Any, str, list[str]]:
    """Stacked bars: static, activations, solver workspace (+ allocator reserve, CUDA context)."""
    lack = run.lacks("peak_bytes", "static_bytes", "solver_workspace_bytes")
    if lack:
        raise _Skip(lack)
    df = _ok(run.df)
    df = df[df["static_bytes"].notna()]
    phase = "train" if (df["phase"] == "train").any() else (_phases(df) or [None])[0]
    if phase is None:
        raise _Skip("no case has a peak and static memory")
    df = df[df["phase"] == phase]
    chosen, notes = [], []
    for family in _families(df):
        rows = df[df["family"] == family]
        deq = rows[rows["variant"] == "deq"]
        # the largest sequence length at which the DEQ (else anything) has numbers
        t = (deq if not deq.empty else rows)["seq_len"].max()
        rows = rows[rows["seq_len"] == t]
        depths = sorted(rows["depth"].dropna().unique())
        if len(depths) > 3:  # a sweep: its shallowest, middle and deepest baselines
            keep = [depths[0], depths[len(depths) // 2], depths[-1]]
            rows = rows[rows["depth"].isna() | rows["depth"].isin(keep)]
            notes.append(f"memory breakdown: {family} baselines at L = {', '.join(f'{d:.0f}' for d in keep)} "
                         f"of {len(depths)} depths")
        chosen.append(rows.sort_values(["size", "variant", "depth"], key=_variant_order))
    df = pd.concat(chosen)
    gpu = df["reserved_bytes"].notna().any()
    nvml = df["nvml_process_bytes"].notna().any()
    plt = _pyplot()
    families = _families(df)
    heights = [max(2.0, 0.32 * len(df[df["family"] == f]) + 1.0) for f in families]
    fig, axes = plt.subplots(len(families), 1, figsize=(8.5, sum(heights)), squeeze=False,
                             gridspec_kw={"height_ratios": heights})
    # greys and a hatch: no part may look like a variant's colour
    parts = [("static: params, grads, optimizer", {"color": "#525252"}),
             ("activations", {"color": "#bdbdbd"}),
             ("solver workspace", {"color": "white", "hatch": "////", "edgecolor": "black"})]
    if gpu:
        parts.append(("allocator reserve (reserved − peak)", {"color": "#deebf7", "edgecolor": "#9ecae1"}))
    if nvml:
        parts.append(("CUDA context etc. (NVML − reserved)", {"color": "#fde0dd", "edgecolor": "#fa9fb5"}))
    for ax, family in zip(axes[:, 0], families, strict=True):
        rows = df[df["family"] == family]
        scale, unit = (1e9, "GB") if rows[["peak_bytes", "nvml_process_bytes"]].max().max() >= 2e9 else (1e6, "MB")
        sizes = rows["size"].nunique() > 1
        labels = [_line_label(r, "depth", sizes) for r in rows.itertuples()]
        static = rows["static_bytes"].astype(float)
        activation = (rows["peak_bytes"] - rows["static_bytes"]).astype(float)
        # the solver's history lives during the solve; shown inside the activation part, so the
        # bar's length stays the measured peak (capped: a workspace freed before the peak is not
        # in it)
        workspace = rows["solver_workspace_bytes"].fillna(0).astype(float).clip(upper=activation.clip(lower=0))
        segments = [static, (activation - workspace).clip(lower=0), workspace]
        if gpu:
            segments.append((rows["reserved_bytes"] - rows["peak_bytes"]).fillna(0).clip(lower=0))
        if nvml:
            segments.append((rows["nvml_process_bytes"] - rows["reserved_bytes"]).fillna(0).clip(lower=0))
        totals = sum(segments)
        # bars 10x apart would hide the small ones' parts: then each bar shows shares of itself
        shares = totals.max() > 10 * totals[totals > 0].min()
        per = (totals / 100) if shares else pd.Series(scale, index=rows.index)
        left = pd.Series(0.0, index=rows.index)
        for (name, style), seg in zip(parts, segments, strict=True):
            width = (seg / per).where(seg > 0).values  # NaN: no zero-width bar edge drawn
            ax.barh(labels, width, left=(left / per).values, label=name, linewidth=0.5, **style)
            left = left + seg
        for y, (peak, total) in enumerate(zip(rows["peak_bytes"], left, strict=True)):
            # the bar ends at the peak, or (GPU) at what the allocator / the process held
            text = f" peak {format_bytes(peak)}" + (f", bar {format_bytes(total)}" if total > peak else "")
            ax.text(100 if shares else total / scale, y, text, va="center", fontsize=7)
        ax.invert_yaxis()
        ax.set_xlim(0, 135 if shares else left.max() / scale * 1.25)
        beyond = " and NVML process memory" if nvml else ""
        what = "share of each bar (%)" if shares else unit
        ax.set_xlabel(f"{what}; peak: {_source_label(rows)}"
                      + (f", then the allocator's reserve{beyond}" if gpu or nvml else ""))
        ax.set_title(f"{family}, {phase}, T={rows['seq_len'].iloc[0]:.0f}")
        ax.grid(True, axis="x", alpha=0.3)
    handles, names = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, names, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=len(parts), frameon=False)
    fig.suptitle(run.title("Memory breakdown of the peak", df))
    fig.tight_layout()
    caption = ("What the peak is made of, per model at the largest sequence length its family's DEQ "
               "ran: static memory (parameters, gradients, Adam state), activations, and the solver's "
               "workspace (its history buffers: solver_workspace_bytes, drawn inside the activation "
               "part and capped by it; the row records its size, not that it was live at the peak's "
               "instant)"
               + ("; on the GPU also the allocator's unused reserve and the CUDA context." if gpu else ".")
               + " Where a panel's bars differ more than 10x, each bar shows shares of itself, its "
               "size written beside it.")
    return fig, caption, notes


def _variant_order(s: pd.Series) -> pd.Series:
    order = {v: i for i, v in enumerate(VARIANT_COLORS)}
    return s.map(order).fillna(len(order)) if s.name == "variant" else s


# -- solver convergence ---------------------------------------------------------------------------
def convergence(run: Run) -> tuple[Any, str, list[str]]:
    lack = run.lacks("solver_trace")
    if lack:
        raise _Skip(lack)
    rows = run.df[run.df["solver_trace"].notna() & (run.df["variant"] == "deq")]
    traces = []
    for r in rows.itertuples():
        try:
            trace = json.loads(r.solver_trace)
        except (TypeError, ValueError):
            continue
        traces.append((r, trace))
    if not traces:
        raise _Skip("no solver traces in results.csv (predicted runs have none: a fake solve has "
                    "no residual values)")
    directions = [d for d in ("forward", "backward") if any(d in t for _, t in traces)]
    plt = _pyplot()
    fig, axes = _grid(plt, 1, len(directions), width=5.5, height=4.0, sharey=True)
    styles = {"transformer": "-", "trellisnet": "--"}
    solvers = {s["solver"] for _, t in traces for s in t.values()}
    # several solvers: colour = solver; one: colour tells the cases apart (seq_len, phase)
    case_colors = {}
    if len(solvers) == 1:
        keys = sorted({(r.seq_len, r.phase) for r, _ in traces})
        palette = plt.get_cmap("viridis")
        case_colors = {k: palette(i / max(1, len(keys) - 1) * 0.85) for i, k in enumerate(keys)}
    for ax, direction in zip(axes[0], directions, strict=True):
        tols = set()
        for r, t in traces:
            solve = t.get(direction)
            if not solve:
                continue
            values = [math.nan if v is None else v for v in solve["trace"]]
            color = case_colors.get((r.seq_len, r.phase)) or SOLVER_COLORS.get(solve["solver"], "grey")
            ax.plot(range(1, len(values) + 1), values, styles.get(r.family, "-."), marker=".",
                    color=color, alpha=0.8,
                    label=f"{r.family} {solve['solver']}, T={r.seq_len:.0f} {r.phase}")
            tols.add((solve["tol"], solve["stop_mode"]))
        for tol, mode in tols:
            ax.axhline(tol, color="black", linestyle=":", linewidth=1)
            ax.text(1.0, tol, f" tol {tol:g} ({mode})", transform=ax.get_yaxis_transform(), fontsize=7,
                    va="center")
        ax.set_yscale("log")
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("function evaluation (iteration)")
        ax.set_title(f"{direction} solve" + (" (implicit backward)" if direction == "backward" else ""))
        ax.grid(True, which="both", alpha=0.3)
    modes = {s["stop_mode"] for _, t in traces for s in t.values()}
    axes[0, 0].set_ylabel(f"worst-sample residual ({'relative' if modes == {'rel'} else '/'.join(sorted(modes))})")
    _figure_legend(fig, axes)
    fig.suptitle(run.title("Solver convergence (first measured step)", pd.DataFrame([r._asdict() for r, _ in traces])))
    fig.tight_layout()
    caption = ("Residual of the worst sample after each function evaluation, forward solve and the "
               "implicit backward solve, for every DEQ case of the first measured step; dotted lines "
               "are the stopping tolerances.")
    return fig, caption, []


# -- training curves ------------------------------------------------------------------------------
LOG = "train_log.csv"  # written by `deqbench train` (bench/train.py)


def training_curves(run: Run) -> tuple[Any, str, list[str]]:
    """Each train_log.csv (bench/train.py's LOG_COLUMNS) against the training step."""
    from matplotlib.ticker import FuncFormatter, ScalarFormatter

    curves = _training_logs(run.dir)
    if not curves:
        raise _Skip("no training results in this run (train_log.csv from `deqbench train`)")
    plt = _pyplot()
    panels = [("ppl", "perplexity (line: train; ○: validation)", "log"),
              ("tokens_per_s", "tokens / s (training steps)", "linear"),
              ("peak_bytes", "peak memory", "linear"),
              ("nfe", "NFE (solid: forward, dashed: backward)", "linear"),
              ("residual", "residual (solid: forward, dashed: backward)", "log")]
    fig, axes = _grid(plt, 2, 3, width=4.2, height=3.2)
    flat = list(axes.flat)
    notes = []
    pretrain_shaded = False
    for label, log, variant in curves:
        color = VARIANT_COLORS.get(variant or "")
        missing = [c for c in ("step", "ppl") if c not in log]
        if missing:
            notes.append(f"training log {label}: no {', '.join(missing)} column; not drawn")
            continue
        for ax, (key, ylabel, scale) in zip(flat, panels, strict=False):
            if key == "ppl":
                (line,) = ax.plot(log["step"], log["ppl"], color=color, label=label)
                color = line.get_color()
                if "valid_ppl" in log and log["valid_ppl"].notna().any():
                    v = log[log["valid_ppl"].notna()]
                    ax.plot(v["step"], v["valid_ppl"], "o", fillstyle="none", color=color)
            elif key in ("nfe", "residual"):
                for direction, style in (("forward", "-"), ("backward", "--")):
                    col = f"{key}_{direction}"
                    if col in log and log[col].notna().any():
                        v = log[log[col].notna()]
                        ax.plot(v["step"], v[col], style, color=color)
            elif key in log and log[key].notna().any():
                v = log[log[key].notna()]
                ax.plot(v["step"], v[key], ".-", color=color)
            if "pretrain" in log and (log["pretrain"] > 0).any():  # DEQ unrolling tied layers
                last = log.loc[log["pretrain"] > 0, "step"].max()
                ax.axvspan(0, last, color="grey", alpha=0.12, linewidth=0,
                           label=None if pretrain_shaded else "pretraining (unrolled, no solve)")
                pretrain_shaded = True
            ax.set_yscale(scale)
            ax.set_xlabel("step")
            ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.3)
    flat[0].yaxis.set_major_formatter(ScalarFormatter())
    flat[0].yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    sources = sorted({s for _, log, _ in curves if "memory_source" in log for s in log["memory_source"].dropna()})
    flat[2].set_ylabel(f"peak memory\n{', '.join(SOURCE_LABELS.get(s, s) for s in sources) or 'source unknown'}")
    flat[2].yaxis.set_major_formatter(FuncFormatter(lambda v, _: _short_bytes(v) if v > 0 else "0"))
    handles: dict[str, Any] = {}
    for ax in flat[:5]:
        for handle, name in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(name, handle)
    flat[5].set_axis_off()
    flat[5].legend(handles.values(), handles.keys(), loc="center", frameon=False)
    fig.suptitle(f"Training curves\n{run.device} · preset {run.preset}")
    fig.tight_layout()
    caption = ("Training: perplexity (validation as circles), throughput, peak memory, the DEQ's "
               "function evaluations and residuals, against the training step; grey = the DEQ's "
               "pretraining steps (tied layers unrolled instead of solved).")
    return fig, caption, notes


def _training_logs(run_dir: Path) -> list[tuple[str, pd.DataFrame, str | None]]:
    """(label, log, variant) for train_log.csv in the run directory or its direct subdirectories."""
    found = []
    for path in [run_dir / LOG, *sorted(run_dir.glob(f"*/{LOG}"))]:
        if not path.is_file():
            continue
        try:
            log = pd.read_csv(path)
        except (OSError, ValueError):
            continue
        if log.empty:
            continue
        summary = path.parent / "train.json"
        config: dict[str, Any] = {}
        if summary.is_file():
            try:
                config = json.loads(summary.read_text()).get("config", {})
            except ValueError:
                config = {}
        model = config.get("model")
        label = model or path.parent.name
        if config.get("depth"):
            label += f" L={config['depth']}"
        found.append((label, log, _variant_of(model)))
    return found + _fit_logs(run_dir)


def _fit_logs(run_dir: Path) -> list[tuple[str, pd.DataFrame, str | None]]:
    """Fit cases of a benchmark run: results.csv's `train_curve` (the train log's main columns,
    bench/train.py) as a log."""
    if not (run_dir / RESULTS).is_file():
        return []
    df = read_results(run_dir)
    if "train_curve" not in df:
        return []
    found = []
    for r in df[df["train_curve"].notna()].itertuples():
        log = pd.DataFrame(json.loads(r.train_curve))  # column -> values, bench.train.CURVE_COLUMNS
        if log.empty or "loss" not in log:
            continue
        log["ppl"] = [math.exp(min(v, 700.0)) for v in log["loss"]]
        log["memory_source"] = r.memory_source
        label = r.model if pd.isna(r.depth) else f"{r.model} L={r.depth:.0f}"
        found.append((f"{label} T={r.seq_len}", log, r.variant))
    return found


def _variant_of(model: str | None) -> str | None:
    if not model:
        return None
    try:
        from models import model_spec

        return model_spec(model).variant
    except (ImportError, KeyError, ValueError):
        return None


HEADINGS = {
    "memory_vs_seq_len": "Peak memory vs sequence length",
    "memory_vs_depth": "Peak memory vs depth",
    "reduction": "Memory reduction vs depth and sequence length",
    "reduction_map": "Memory reduction map (sequence length × depth)",
    "paper_pairs": "The paper's pairs: ours vs the paper",
    "speed": "Speed",
    "memory_breakdown": "Memory breakdown",
    "convergence": "Solver convergence",
    "training_curves": "Training curves",
}

# -- the list of figures, in report order ---------------------------------------------------------
FIGURES: tuple[tuple[str, Callable[[Run], tuple[Any, str, list[str]]]], ...] = (
    ("memory_vs_seq_len", memory_vs_seq_len),
    ("memory_vs_depth", memory_vs_depth),
    ("reduction", reduction),
    ("reduction_map", reduction_map),
    ("paper_pairs", paper_pairs),
    ("speed", speed),
    ("memory_breakdown", memory_breakdown),
    ("convergence", convergence),
    ("training_curves", training_curves),
)


# -- command line ---------------------------------------------------------------------------------
def cmd_plot(args: argparse.Namespace) -> int:
    from bench.cli import EXIT_OK

    run_dir = check_run_dir(args.run_dir)
    figures = plot_run(run_dir)
    for fig in figures.made:
        print(f"wrote {fig.files[0]}")
    for name, why in figures.skipped.items():
        print(f"skipped {name}: {why}")
    for note in figures.notes:
        print(f"note: {note}")
    return EXIT_OK


def check_run_dir(text: str) -> Path:
    from bench.cli import BadInput

    run_dir = Path(text)
    if not (run_dir / RESULTS).is_file():
        raise BadInput(f"{run_dir / RESULTS} does not exist; give a run directory written by "
                       "`deqbench run` or `deqbench predict`")
    return run_dir


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plot", help="draw a run's figures (PNG + SVG) from its results.csv")
    p.add_argument("run_dir", help="run directory holding results.csv (and env.json)")
    p.set_defaults(func=cmd_plot)
