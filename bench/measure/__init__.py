"""Measurement instruments and the protocol that runs a workload through them (DESIGN.md §3).

    from bench.measure import Workload, measure
    row = measure(Workload(model="deq-transformer", phase="train", batch=15, seq_len=150),
                  ["tracked", "predicted", "flops", "timing"])
"""

from bench.measure.instrument import (
    INSTRUMENTS,
    PASSES,
    Instrument,
    default_instruments,
    list_instruments,
    make_instrument,
    make_instruments,
    register_instrument,
)
from bench.measure.protocol import RESULT_COLUMNS, measure, run_pass
from bench.measure.tracked import LiveTensorCounter
from bench.measure.workload import DTYPES, MODES, PHASES, Bench, Workload, fake_device, fake_tensors

__all__ = [
    "DTYPES",
    "INSTRUMENTS",
    "MODES",
    "PASSES",
    "PHASES",
    "RESULT_COLUMNS",
    "Bench",
    "Instrument",
    "LiveTensorCounter",
    "Workload",
    "default_instruments",
    "fake_device",
    "fake_tensors",
    "list_instruments",
    "make_instrument",
    "make_instruments",
    "measure",
    "register_instrument",
    "run_pass",
]
