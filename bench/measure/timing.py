"""The `timing` instrument: warm-up, then repeated steps, each timed on its own.

On CUDA each step sits between two CUDA events and is waited for; elsewhere the wall clock times
it. The summary is the median and the interquartile range (robust to a stray slow step), and
tokens/s from the median. A spread above `max_rel_iqr` of the median is flagged, not hidden.
"""

from __future__ import annotations

import statistics
import time
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from bench.measure.instrument import TIMED, Instrument

if TYPE_CHECKING:
    from bench.measure.workload import Bench


class NoisyTimingWarning(UserWarning):
    """Step times spread more than the tolerated IQR/median."""


def summarize(seconds: Sequence[float]) -> tuple[float, float | None]:
    """(median, interquartile range, inclusive quartiles); the IQR needs at least two samples.
    The one summary of step times: every row's step_s_median / step_s_iqr come from here."""
    median = statistics.median(seconds)
    if len(seconds) < 2:
        return median, None
    q1, _, q3 = statistics.quantiles(seconds, n=4, method="inclusive")
    return median, q3 - q1


def step_statistics(seconds: Sequence[float], tokens_per_step: int) -> dict[str, Any]:
    """The timing columns of a row from its step times: median, IQR and tokens/s at the median
    (robust to a stray slow step, unlike a mean). Empty without steps."""
    if not seconds:
        return {}
    median, iqr = summarize(seconds)
    return {
        "step_s_median": median,
        "step_s_iqr": iqr,
        "tokens_per_s": tokens_per_step / median if median > 0 else None,
        "timing_steps": len(seconds),
    }


class Timing(Instrument):
    name = "timing"
    passes = (TIMED,)

    def __init__(self, warmup: int = 2, repeats: int = 10, max_rel_iqr: float = 0.10) -> None:
        super().__init__()
        if repeats < 1 or warmup < 0:
            raise ValueError(f"timing needs repeats >= 1 and warmup >= 0, got {repeats}, {warmup}")
        self.warmup_steps, self.min_steps, self.max_rel_iqr = warmup, repeats, max_rel_iqr
        self.seconds: list[float] = []
        self._tokens = 0

    def start(self, bench: Bench, pass_name: str) -> None:
        self.seconds = []
        self._tokens = bench.tokens_per_step
        self._cuda = bench.device.type == "cuda"

    def before_step(self, bench: Bench) -> None:
        if self._cuda:
            torch.cuda.synchronize(bench.device)
            self._events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            self._events[0].record()
        else:
            self._t0 = time.perf_counter()

    def after_step(self, bench: Bench) -> None:
        if self._cuda:
            begin, end = self._events
            end.record()
            end.synchronize()
            self.seconds.append(begin.elapsed_time(end) / 1000.0)  # elapsed_time is in ms
        else:
            self.seconds.append(time.perf_counter() - self._t0)

    def results(self) -> dict[str, Any]:
        if not self.seconds:
            return {}
        stats = step_statistics(self.seconds, self._tokens)
        median, iqr = stats["step_s_median"], stats["step_s_iqr"]
        stats["timing_noisy"] = None if iqr is None or median <= 0 else iqr / median > self.max_rel_iqr
        if stats["timing_noisy"]:
            message = (
                f"step time IQR/median = {iqr / median:.0%} > {self.max_rel_iqr:.0%} over "
                f"{len(self.seconds)} steps: a busy machine? more repeats?"
            )
            warnings.warn(message, NoisyTimingWarning, stacklevel=2)
            self.notes.append(message)
        return stats
