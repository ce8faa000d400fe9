"""Train and eval step times (pytest-benchmark) with peak memory, NFE and tokens/s beside them.

    tox -e bench                        # times every step; writes .benchmarks/bench.json and
                                        # saves the run under .benchmarks/<machine>/NNNN_bench.json
    tox -e bench -- --benchmark-compare --benchmark-compare-fail=median:30%
                                        # fails when a median step is 30% slower than the last save

`extra_info` of each benchmark: `peak_bytes` with its `memory_source` (torch_cuda on a GPU, tracked
elsewhere), `static_bytes`, `activation_bytes`, `nfe_forward`, `nfe_backward`, `tokens_per_s`
(tokens of a step over the median step time). Times are compared by pytest-benchmark; memory is
compared by tests/bench/test_memory_regression.py and `deqbench check`.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from bench.env import device_name
from bench.measure import Bench, Workload, make_instrument

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BATCH, SEQ_LEN = 2, 128  # the smoke preset's largest debug case
MODELS = [  # each DEQ beside its 16-layer weight-tied twin
    ("deq-transformer", None),
    ("transformer-tied", 16),
    ("deq-trellisnet", None),
    ("trellisnet", 16),
]


# instrument -> its (peak, static) result keys
MEMORY_KEYS = {"torch_cuda": ("cuda_peak_bytes", "cuda_static_bytes"),
               "tracked": ("tracked_bytes", "tracked_static_bytes")}


def _memory_of_one_step(bench: Bench) -> dict[str, Any]:
    """Peak and static bytes of one step by the best instrument here, and that step's NFE."""
    source = "torch_cuda" if bench.device.type == "cuda" else "tracked"
    instrument = make_instrument(source)
    with instrument.observing(bench):
        stats = bench.step()
    peak_key, static_key = MEMORY_KEYS[source]
    peak, static = instrument.results()[peak_key], instrument.results()[static_key]
    return {"memory_source": source, "peak_bytes": peak, "static_bytes": static,
            "activation_bytes": peak - static, "nfe_forward": stats.nfe_forward,
            "nfe_backward": stats.nfe_backward}


@pytest.mark.parametrize("phase", ["train", "eval"])
@pytest.mark.parametrize(("model", "depth"), MODELS, ids=[m for m, _ in MODELS])
def test_step(benchmark, model, depth, phase):
    workload = Workload(model=model, phase=phase, batch=BATCH, seq_len=SEQ_LEN, depth=depth,
                        device=DEVICE)
    bench = Bench(workload)
    bench.warm_up()  # Adam's state and lazy buffers exist before anything is measured
    info = _memory_of_one_step(bench)

    def step() -> None:
        bench.step()
        if bench.device.type == "cuda":
            torch.cuda.synchronize(bench.device)  # time the kernels, not their launch

    benchmark.group = f"{phase} step, B{BATCH} T{SEQ_LEN}, {DEVICE}"
    benchmark(step)
    median_s = benchmark.stats.stats.median
    benchmark.extra_info.update(
        info, model=model, depth=depth, phase=phase, device=DEVICE, device_name=device_name(DEVICE),
        tokens_per_step=workload.tokens, tokens_per_s=workload.tokens / median_s,
        params=bench.num_params(),
    )
    assert info["peak_bytes"] > info["static_bytes"] > 0
