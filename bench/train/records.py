"""What a training run keeps as it goes: the running sums of the current log row (saved in
checkpoints) and the outcome of a finished or stopped run."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Sums:
    """Running sums over the steps of the current log row (saved in checkpoints)."""

    steps: int = 0
    loss: float = 0.0
    grad_norm: float = 0.0
    tokens: int = 0
    times: list[float] = field(default_factory=list)  # seconds of the untracked steps
    stats: dict[str, list[float]] = field(default_factory=dict)
    peak_bytes: int | None = None

    def add_stat(self, name: str, value: float | None) -> None:
        if value is not None and math.isfinite(value):
            self.stats.setdefault(name, []).append(float(value))

    def mean(self, name: str) -> float | None:
        values = self.stats.get(name)
        return sum(values) / len(values) if values else None


@dataclass
class Outcome:
    """What a finished (or stopped) run measured."""

    status: str  # ok | diverged | interrupted
    steps: int
    train_s: float
    train_loss: float | None
    valid_ppl: float | None
    test_ppl: float | None
    optimal_ppl: float | None
    unigram_ppl: float | None
    tokens_per_s: float | None
    step_s_median: float | None
    step_s_iqr: float | None
    peak_bytes: int | None
    memory_source: str | None
    memory_steps: list[int]  # tracked: the sampled steps; torch_cuda: the log rows' last steps
    nfe_forward: float | None
    nfe_backward: float | None
    residual_forward: float | None
    residual_backward: float | None
    params: int
    params_nonembed: int
    threads: int  # torch intra-op threads the steps ran with
    curve: list[dict[str, Any]]  # the train_log.csv rows


def exp(x: float) -> float:
    """Perplexity of a mean cross-entropy, without overflow."""
    return math.exp(min(x, 700.0))
