"""Solver convergence: the worst sample's residual after each function evaluation."""

from __future__ import annotations

import json
import math
from typing import Any

import pandas as pd

from bench.analysis import RunView
from bench.plots.registry import figure
from bench.plots.style import (
    SOLVER_COLORS,
    Skip,
    figure_legend,
    pyplot,
    run_title,
    subplot_grid,
)


@figure("convergence", "Solver convergence")
def convergence(run: RunView) -> tuple[Any, str, list[str]]:
    lack = run.lacks("solver_trace")
    if lack:
        raise Skip(lack)
    rows = run.df[run.df["solver_trace"].notna() & (run.df["variant"] == "deq")]
    traces = []
    for r in rows.itertuples():
        try:
            trace = json.loads(r.solver_trace)
        except (TypeError, ValueError):
            continue
        traces.append((r, trace))
    if not traces:
        raise Skip("no solver traces in results.csv (predicted runs have none: a fake solve has "
                    "no residual values)")
    directions = [d for d in ("forward", "backward") if any(d in t for _, t in traces)]
    plt = pyplot()
    fig, axes = subplot_grid(plt, 1, len(directions), width=5.5, height=4.0, sharey=True)
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
    figure_legend(fig, axes)
    fig.suptitle(run_title(run, "Solver convergence (first measured step)", pd.DataFrame([r._asdict() for r, _ in traces])))
    fig.tight_layout()
    caption = ("Residual of the worst sample after each function evaluation, forward solve and the "
               "implicit backward solve, for every DEQ case of the first measured step; dotted lines "
               "are the stopping tolerances.")
    return fig, caption, []


