"""One figure drawn into a run's figures/ folder: what plot_run and the pool's helpers share."""

from __future__ import annotations

import traceback
from pathlib import Path

from bench.analysis import RunView
from bench.plots.registry import FIGURES
from bench.plots.style import DPI, Skip, pyplot

FIGURE_DIR = "figures"
FORMATS = ("png", "svg")  # what plot_run can write
# What a drawer hands back for one figure: (name, files, caption, notes, skipped reason).
Drawn = tuple[str, list[str], str, list[str], str | None]


def draw_figure(run: RunView, name: str, run_dir: Path, formats: tuple[str, ...]) -> Drawn:
    """Draw one registered figure into run_dir/figures: (name, files, caption, notes, None), or
    (name, [], "", [], why) when it was skipped; raises OSError only (after removing its files)."""
    plt = pyplot()
    out = run_dir / FIGURE_DIR
    try:
        fig, caption, notes = FIGURES[name].draw(run)
    except Skip as skip:
        _remove_stale(out, name)
        return name, [], "", [], str(skip)
    except Exception as err:  # a bug in a figure must not cost the run its other outputs
        where = traceback.extract_tb(err.__traceback__)[-1]
        plt.close("all")
        _remove_stale(out, name)
        return name, [], "", [], (f"failed to draw ({type(err).__name__}: {err} at "
                                  f"{Path(where.filename).name}:{where.lineno}); please report it")
    files = []
    _remove_stale(out, name)
    try:
        for ext in formats:
            path = out / f"{name}.{ext}"
            fig.savefig(path, dpi=DPI, bbox_inches="tight")
            files.append(str(path.relative_to(run_dir)))
    except OSError:
        plt.close("all")
        _remove_stale(out, name)
        raise
    plt.close(fig)
    return name, files, caption, list(notes), None


def _remove_stale(out: Path, name: str) -> None:
    for ext in FORMATS:
        (out / f"{name}.{ext}").unlink(missing_ok=True)
