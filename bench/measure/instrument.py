"""What every instrument shares (the registry by name is bench.measure's).

An instrument observes steps of a workload and reports named raw numbers. `measure()` drives
them through *passes*, each a few steps of one built workload:

    predict  steps of a workload built from fake tensors (nothing real allocated)
    memory   one step after warm-up, observed by the memory instruments together
    flops    one step under the FLOP counter
    timed    warm-up, then repeated steps with nothing else attached (timing, energy)

and calls on each instrument, in order:

    available(device)      -> (ok, reason): may it run here? (never raises)
    prepare(workload)      before the real model exists (idle baselines)
    start(bench, pass)     at the start of each pass it joins
    before_step(bench) / after_step(bench)   around every step of those passes
    stop(bench, pass)
    results()              -> {name: number | str | None}; None where it cannot tell, never 0
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, ClassVar

import torch

if TYPE_CHECKING:
    from bench.measure.workload import Bench, Workload

PREDICT, MEMORY, FLOPS, TIMED = "predict", "memory", "flops", "timed"
PASSES = (PREDICT, MEMORY, FLOPS, TIMED)


class Instrument:
    """Base class: subclasses set `name` and `passes` and override the hooks they need."""

    name: ClassVar[str] = ""
    passes: ClassVar[tuple[str, ...]] = ()
    min_steps: int = 1  # steps the pass must run for this instrument
    min_seconds: float = 0.0  # and for at least this long (energy windows)
    warmup_steps: int = 0  # extra steps before the pass starts (timing)

    def __init__(self) -> None:
        self.notes: list[str] = []  # why a number is missing or doubtful, for the row's notes

    def available(self, device: torch.device) -> tuple[bool, str]:
        return True, ""

    def prepare(self, workload: Workload) -> None:
        """Called before the real model is built."""

    def start(self, bench: Bench, pass_name: str) -> None:
        pass

    def before_step(self, bench: Bench) -> None:
        pass

    def after_step(self, bench: Bench) -> None:
        pass

    def stop(self, bench: Bench, pass_name: str) -> None:
        pass

    def results(self) -> dict[str, Any]:
        return {}

    @contextlib.contextmanager
    def observing(self, bench: Bench, pass_name: str | None = None) -> Iterator[Instrument]:
        """`with inst.observing(bench): bench.step()` — one pass by hand, outside `measure()`."""
        pass_name = pass_name or self.passes[0]
        self.start(bench, pass_name)
        try:
            yield self
        finally:
            self.stop(bench, pass_name)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
