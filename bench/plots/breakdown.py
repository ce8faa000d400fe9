"""What the peak is made of: static memory, activations, the solver's workspace (and on a GPU
the allocator's reserve and the CUDA context)."""

from __future__ import annotations

from typing import Any

import pandas as pd

from bench.analysis import RunView
from bench.format import format_bytes
from bench.plots.registry import figure
from bench.plots.style import (
    Skip,
    family_list,
    line_label,
    ok_rows,
    phase_list,
    pyplot,
    run_title,
    source_label,
    variant_order,
)


@figure("memory_breakdown", "Memory breakdown")
def memory_breakdown(run: RunView) -> tuple[Any, str, list[str]]:
    """Stacked bars: static, activations, solver workspace (+ allocator reserve, CUDA context)."""
    lack = run.lacks("peak_bytes", "static_bytes", "solver_workspace_bytes")
    if lack:
        raise Skip(lack)
    df = ok_rows(run.df)
    df = df[df["static_bytes"].notna()]
    phase = "train" if (df["phase"] == "train").any() else (phase_list(df) or [None])[0]
    if phase is None:
        raise Skip("no case has a peak and static memory")
    df = df[df["phase"] == phase]
    chosen, notes = [], []
    for family in family_list(df):
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
        chosen.append(rows.sort_values(["size", "variant", "depth"], key=variant_order))
    df = pd.concat(chosen)
    gpu = df["reserved_bytes"].notna().any()
    nvml = df["nvml_process_bytes"].notna().any()
    plt = pyplot()
    families = family_list(df)
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
        labels = [line_label(r, "depth", sizes) for r in rows.itertuples()]
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
        ax.set_xlabel(f"{what}; peak: {source_label(rows)}"
                      + (f", then the allocator's reserve{beyond}" if gpu or nvml else ""))
        ax.set_title(f"{family}, {phase}, T={rows['seq_len'].iloc[0]:.0f}")
        ax.grid(True, axis="x", alpha=0.3)
    handles, names = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, names, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=len(parts), frameon=False)
    fig.suptitle(run_title(run, "Memory breakdown of the peak", df))
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

