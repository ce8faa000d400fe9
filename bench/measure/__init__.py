"""Measurement instruments, the registry of them by name, and the protocol that runs a workload
through them (DESIGN.md §3).

    from bench.measure import Workload, measure
    row = measure(Workload(model="deq-transformer", phase="train", batch=15, seq_len=150),
                  ["tracked", "predicted", "flops", "timing"])

The registry is built here, after the implementations are imported, so that no instrument module
imports the package (torchdeq's solver package does the same). A plugin's own instrument joins it
with `register_instrument`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from bench.measure import protocol
from bench.measure.flops import Flops
from bench.measure.instrument import FLOPS, MEMORY, PASSES, PREDICT, TIMED, Instrument
from bench.measure.memory import PredictedMemory, TorchCudaMemory, TrackedMemory
from bench.measure.nvml import NvmlMemory
from bench.measure.protocol import RESULT_COLUMNS, run_pass
from bench.measure.timing import Timing
from bench.measure.tracked import LiveTensorCounter
from bench.measure.workload import DTYPES, MODES, PHASES, Bench, Workload, fake_device, fake_tensors

INSTRUMENTS: dict[str, type[Instrument]] = {}


def register_instrument(cls: type[Instrument]) -> type[Instrument]:
    if not cls.name or not cls.passes or not set(cls.passes) <= set(PASSES):
        raise ValueError(f"{cls.__name__} needs a name and passes among {PASSES}")
    INSTRUMENTS[cls.name] = cls
    return cls


for _cls in (TorchCudaMemory, NvmlMemory, TrackedMemory, PredictedMemory, Flops, Timing):
    register_instrument(_cls)


def list_instruments() -> list[str]:
    return sorted(INSTRUMENTS)


def check_instrument(name: str) -> str:
    if name not in INSTRUMENTS:
        raise ValueError(f"unknown instrument {name!r}; valid instruments: {', '.join(list_instruments())}")
    return name


def make_instrument(name: str, **options: Any) -> Instrument:
    return INSTRUMENTS[check_instrument(name)](**options)


def make_instruments(items: Iterable[str | Instrument]) -> list[Instrument]:
    """Instances from names (checked before anything runs) or ready-made instruments."""
    items = list(items)
    for item in items:
        if isinstance(item, str):
            check_instrument(item)
    return [item if isinstance(item, Instrument) else make_instrument(item) for item in items]


def default_instruments(device: torch.device | str, predicted: bool = True) -> list[str]:
    """Everything the device allows: the GPU-only ones are left out on a CPU. `predicted=False`
    leaves out the prediction too (a case outside the matrix's predicted sample)."""
    device = torch.device(device)
    gpu = ["torch_cuda", "nvml"] if device.type == "cuda" else []
    return [*gpu, "tracked", *["predicted"] * predicted, "flops", "timing"]


def measure(workload: Workload, instruments: Iterable[str | Instrument] | None = None, *,
            warmup: int = 1) -> dict[str, Any]:
    """One workload through the named (or given) instruments; None = everything the device
    allows. Unknown names raise before anything runs. See `bench.measure.protocol.measure`."""
    names = default_instruments(workload.device) if instruments is None else instruments
    return protocol.measure(workload, make_instruments(names), warmup=warmup)


__all__ = [
    "DTYPES", "FLOPS", "INSTRUMENTS", "MEMORY", "MODES", "PASSES", "PHASES", "PREDICT",
    "RESULT_COLUMNS", "TIMED", "Bench", "Instrument", "LiveTensorCounter", "Workload",
    "check_instrument", "default_instruments", "fake_device", "fake_tensors", "list_instruments",
    "make_instrument", "make_instruments", "measure", "register_instrument", "run_pass",
]
