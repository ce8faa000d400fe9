"""Paired, interleaved timing: run every variant once per round, in a rotating order, so drift on
a shared machine hits them all alike; compare them by the median of per-round ratios.

Two clocks: `wall` (time.perf_counter) and `cpu` (time.thread_time: this thread's CPU time, which
the other processes on a shared machine do not add to). With one intra-op thread every op, and
autograd's CPU backward, runs on the calling thread, so the CPU clock times the same work."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from bench.measure.timing import summarize

CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.thread_time}
_clock = ["wall"]


def use_clock(name: str) -> None:
    if name not in CLOCKS:
        raise ValueError(f"unknown clock {name!r}; valid: {', '.join(CLOCKS)}")
    _clock[0] = name


def current_clock() -> str:
    return _clock[0]


def interleaved(variants: dict[str, Callable[[], object]], repeats: int,
                warmup: int = 2) -> dict[str, list[float]]:
    """Seconds of each variant per round, `repeats` rounds after `warmup` untimed ones."""
    clock = CLOCKS[_clock[0]]
    names = list(variants)
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(warmup + repeats):
        shift = round_ % len(names)  # rotate the order: no variant always runs first
        for name in names[shift:] + names[:shift]:
            t0 = clock()
            variants[name]()
            elapsed = clock() - t0
            if round_ >= warmup:
                seconds[name].append(elapsed)
    return seconds


def ratios(a: list[float], b: list[float]) -> list[float]:
    """Per-round ratios a_i / b_i."""
    return [x / y for x, y in zip(a, b, strict=True)]


def spread(values: list[float], scale: float = 1.0, unit: str = "") -> str:
    """'median (IQR x)' of values times scale."""
    median, iqr = summarize(values)
    iqr_text = "n/a" if iqr is None else f"{iqr * scale:.3g}"
    return f"{median * scale:.3g}{unit} (IQR {iqr_text}{unit})"


def header(title: str, repeats: int) -> None:
    clock = {"wall": "wall clock", "cpu": "this thread's CPU time"}[_clock[0]]
    print(f"# {title}")
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} intra-op thread(s), {clock}, "
          f"{repeats} interleaved rounds; medians with their IQR; ratios = median of per-round ratios")


def add_clock_argument(parser) -> None:
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                        help="wall (default) or cpu: this thread's CPU time, steadier on a shared "
                             "machine (one intra-op thread: all the work runs on this thread)")


def set_one_thread() -> None:
    torch.set_num_threads(1)
