"""Fit cases of a benchmark matrix (phase `fit`): train the case's model from scratch for the
matrix's budget and report one results.csv row — perplexities beside the same timing, memory
and solver columns as every measured row."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import torch

from bench.results import OK_STATUSES
from bench.train.config import TrainConfig
from bench.train.loop import Trainer

if TYPE_CHECKING:
    from bench.spec import Case, RunSettings

TIMED_STEP_CAP = 1_000_000  # steps allowed to a run budgeted in seconds only
# The log columns a fit case keeps in results.csv's `train_curve` (JSON: column -> values).
CURVE_COLUMNS = ("step", "elapsed_s", "loss", "tokens_per_s", "peak_bytes", "nfe_forward",
                 "nfe_backward", "residual_forward", "residual_backward", "valid_ppl")


def fit_config(case: Case, device: str, settings: RunSettings) -> TrainConfig:
    """A runner case of phase `fit` as a training run: the case's model, shape and overrides,
    the matrix's budget (`fit_steps`, and `fit_seconds` when set) and corpus."""
    kwargs = case.model_kwargs()
    depth = kwargs.pop("depth", None)
    budget: dict[str, Any] = {}
    if settings.fit_seconds:
        budget["max_seconds"] = float(settings.fit_seconds)
        budget["steps"] = settings.fit_steps or TIMED_STEP_CAP
    elif settings.fit_steps:
        budget["steps"] = settings.fit_steps
    if settings.fit_lr:
        budget["lr"] = float(settings.fit_lr)
    config = TrainConfig(
        model=case.model, size=case.size, depth=depth, overrides=tuple(sorted(kwargs.items())),
        data=settings.fit_data, batch=case.batch, seq_len=case.seq_len, seed=settings.seed,
        device=device, threads=settings.threads or torch.get_num_threads(), **budget,
    )
    # About 50 curve points for a step budget; a time budget's step count is not known ahead.
    log_every = TrainConfig.log_every if settings.fit_seconds else max(1, config.steps // 50)
    return dataclasses.replace(config, log_every=log_every)


def fit_case(case: Case, device: str, settings: RunSettings,
             instruments: tuple[str, ...] = ()) -> dict[str, Any]:
    """Train the case's model from scratch for the matrix's budget; one results.csv row with
    its perplexities and the run's speed, memory and solver statistics."""
    from bench.env import device_name

    if instruments == ("predicted",):  # `deqbench predict`: a fit case's memory is its train step's
        from bench.measure.case import measure_case

        return measure_case(case, device, settings, instruments)
    memory = tuple(i for i in instruments if i in ("torch_cuda", "tracked")) if instruments else None
    trainer = Trainer(fit_config(case, device, settings), None, memory_instruments=memory)
    o = trainer.run()
    status = "ok" if o.status == "ok" else "diverged"
    assert status in OK_STATUSES
    return {
        "status": status, "device": device,
        "device_name": device_name(device), "params": o.params, "params_nonembed": o.params_nonembed,
        "memory_source": o.memory_source, "peak_bytes": o.peak_bytes,
        "tracked_bytes": o.peak_bytes if o.memory_source == "tracked" else None,
        "step_s_median": o.step_s_median, "step_s_iqr": o.step_s_iqr, "tokens_per_s": o.tokens_per_s,
        "nfe_forward": o.nfe_forward, "nfe_backward": o.nfe_backward,
        "residual_forward": o.residual_forward, "residual_backward": o.residual_backward,
        "valid_ppl": o.valid_ppl, "test_ppl": o.test_ppl, "optimal_ppl": o.optimal_ppl,
        "train_steps": o.steps, "train_s": o.train_s,
        "train_curve": {col: [_round(row.get(col)) for row in _thin(o.curve)] for col in CURVE_COLUMNS},
        "error": None if o.status == "ok" else f"training loss or gradient not finite at step {o.steps}",
    }


def _thin(rows: list[dict[str, Any]], most: int = 100) -> list[dict[str, Any]]:
    """At most about `most` evenly spaced rows, the last one always kept (a time budget logs
    every 10 steps however many steps it reaches; results.csv needs a curve, not the log)."""
    if len(rows) <= most:
        return rows
    every = -(-len(rows) // most)
    kept = rows[::every]
    return kept if kept[-1] is rows[-1] else [*kept, rows[-1]]


def _round(value: Any) -> Any:
    """Six significant digits: enough for a curve, a tenth of the JSON."""
    return float(f"{value:.6g}") if isinstance(value, float) else value
