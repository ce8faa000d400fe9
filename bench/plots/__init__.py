"""Figures of a run directory, drawn from results.csv (and env.json, train logs) alone.

    plot_run("results/latest")      # -> Figures; writes figures/<name>.png
    plot_run("results/latest", formats=("png", "svg"))   # and a vector copy: deqbench plot --svg
    deqbench plot results/latest

Each figure is a view of the tidy rows, registered by name in `registry.FIGURES` (report order):
memory vs sequence length and vs depth, the memory reduction 1 - DEQ/explicit (as lines and as a
seq_len x depth map, with the paper's 88% and its pairs), the paper's pairs, speed (tokens/s and
the DEQ/explicit slowdown against NFE, with the paper's Table 4), the memory breakdown, solver
convergence and training curves. A figure the run has no data for is skipped with the reason,
which the report prints; a figure that fails to draw is skipped with its error (a finished
measurement never fails because of a figure). `figures/index.json` lists what was drawn, with
the hash of the results.csv it was drawn from, so the report embeds exactly these figures.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bench.analysis import RunView
from bench.plots import breakdown, convergence, explain, memory, reduction, speed, training  # noqa: F401
from bench.plots.draw import FIGURE_DIR, FORMATS, draw_figure
from bench.plots.pool import FigurePool
from bench.plots.registry import FIGURES
from bench.plots.style import pyplot
from bench.results import RESULTS

INDEX = "index.json"
# What it writes unless asked: SVG (with bbox_inches="tight", a second layout pass) took as long
# again as the PNGs, which are what the report shows; `--svg` adds the vector copies.
DEFAULT_FORMATS = ("png",)


@dataclass
class Figure:
    name: str  # file stem under figures/
    caption: str  # one sentence the report prints under the figure
    files: list[str]  # relative to the run directory

    @property
    def heading(self) -> str:
        return heading(self.name)


@dataclass
class Figures:
    made: list[Figure] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # name -> why it was not drawn
    notes: list[str] = field(default_factory=list)  # things drawn around (missing columns, ...)
    results_sha256: str = ""


def heading(name: str) -> str:
    spec = FIGURES.get(name)
    return spec.heading if spec else name.replace("_", " ")


def results_hash(run_dir: Path) -> str:
    return hashlib.sha256((Path(run_dir) / RESULTS).read_bytes()).hexdigest()


def plot_run(run_dir: str | Path | RunView, only: Iterable[str] | None = None,
             formats: Iterable[str] = DEFAULT_FORMATS, pool: FigurePool | None = None) -> Figures:
    """Draw every figure the run has data for into run_dir/figures; returns what was drawn and
    why the others were not, and writes figures/index.json for the report. `only` draws just
    the named figures (no index: the set is incomplete). `formats`: file types among FORMATS
    (a drawn figure's files of other types are removed: they would show older results).
    `pool`: helper processes that draw beside this one (bench.plots.pool); None: this one alone."""
    wanted = None if only is None else set(only)
    unknown = (wanted or set()) - set(FIGURES)
    if unknown:
        raise ValueError(f"unknown figure(s) {sorted(unknown)}; valid: {', '.join(FIGURES)}")
    formats = tuple(dict.fromkeys(formats))
    if not formats or not set(formats) <= set(FORMATS):
        raise ValueError(f"figure formats must be among {', '.join(FORMATS)}, got {formats}")
    run = run_dir if isinstance(run_dir, RunView) else RunView.load(run_dir)
    assert run.dir is not None, "figures are drawn into a run directory"
    pyplot()
    out = run.dir / FIGURE_DIR
    made_dir = not out.exists()
    out.mkdir(exist_ok=True)
    figures = Figures(results_sha256=results_hash(run.dir))
    if run.missing:
        figures.notes.append(f"results.csv lacks column(s) {', '.join(sorted(run.missing))}; "
                             "figures needing them are skipped")
    names = [name for name in FIGURES if wanted is None or name in wanted]
    try:
        if pool is not None and pool.size and len(names) > 1:
            drawn = pool.draw(run.dir, names, formats, lambda name: draw_figure(run, name, run.dir, formats))
        else:
            drawn = [draw_figure(run, name, run.dir, formats) for name in names]
    except OSError:  # a full disk: no half-written figure, no figures/ made for nothing
        if made_dir and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        raise
    for name, files, caption, notes, skipped in drawn:
        if skipped is not None:
            figures.skipped[name] = skipped
        else:
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


__all__ = ["DEFAULT_FORMATS", "FIGURES", "FIGURE_DIR", "FORMATS", "INDEX", "Figure", "FigurePool", "Figures",
           "draw_figure", "heading", "load_index", "plot_run"]
