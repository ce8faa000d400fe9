"""Training curves: perplexity, throughput, memory, NFE and residuals against the step."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pandas as pd

from bench.analysis import SOURCE_LABELS, RunView
from bench.plots.registry import figure
from bench.plots.style import (
    VARIANT_COLORS,
    Skip,
    pyplot,
    short_bytes,
    subplot_grid,
)
from bench.results import RESULTS, read_results

LOG = "train_log.csv"  # written by `deqbench train` (bench/train.py)


@figure("training_curves", "Training curves")
def training_curves(run: RunView) -> tuple[Any, str, list[str]]:
    """Each train_log.csv (bench/train.py's LOG_COLUMNS) against the training step."""
    from matplotlib.ticker import FuncFormatter, ScalarFormatter

    curves = _training_logs(run.dir)
    if not curves:
        raise Skip("no training results in this run (train_log.csv from `deqbench train`)")
    plt = pyplot()
    panels = [("ppl", "perplexity (line: train; ○: validation)", "log"),
              ("tokens_per_s", "tokens / s (training steps)", "linear"),
              ("peak_bytes", "peak memory", "linear"),
              ("nfe", "NFE (solid: forward, dashed: backward)", "linear"),
              ("residual", "residual (solid: forward, dashed: backward)", "log")]
    fig, axes = subplot_grid(plt, 2, 3, width=4.2, height=3.2)
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
    flat[2].yaxis.set_major_formatter(FuncFormatter(lambda v, _: short_bytes(v) if v > 0 else "0"))
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

