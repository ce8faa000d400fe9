"""The `flops` instrument: FLOPs of one step, with the formulas of `torch.utils.flop_counter`.

Those formulas know matmuls, convolutions and the CUDA attention kernels (multiply-add = 2
FLOPs); elementwise ops count nothing. A DEQ's count includes every solver iteration the step
made. Two differences from `FlopCounterMode` itself:
- no module tracker: its backward hooks break the nested `autograd.grad` of a DEQ's implicit
  backward ("A leaf node was passed to _will_engine_execute_node ..."), and only the total is
  wanted here;
- a formula for the CPU flash-attention kernel that CPU SDPA uses (PyTorch has none), with the
  CUDA kernels' convention: the full T x T score matrix, causal or not.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import (
    flop_registry,
    sdpa_backward_flop_count,
    sdpa_flop_count,
    shape_wrapper,
)

from bench.measure.instrument import FLOPS, Instrument

if TYPE_CHECKING:
    from bench.measure.workload import Bench

aten = torch.ops.aten


def _cpu_flash_forward(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)  # shapes (B, H, T, E)


def _cpu_flash_backward(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out, query, key, value)


FORMULAS = {
    **flop_registry,
    aten._scaled_dot_product_flash_attention_for_cpu: shape_wrapper(_cpu_flash_forward),
    aten._scaled_dot_product_flash_attention_for_cpu_backward: shape_wrapper(_cpu_flash_backward),
}


class FlopCounter(TorchDispatchMode):
    """Total FLOPs of the aten ops run inside `with FlopCounter() as c:` (`c.total`)."""

    def __init__(self) -> None:
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = FORMULAS.get(func.overloadpacket)
        if formula is not None:
            self.total += formula(*args, **kwargs, out_val=out)
        return out


class Flops(Instrument):
    name = "flops"
    passes = (FLOPS,)

    def __init__(self) -> None:
        super().__init__()
        self._results: dict[str, Any] = {}

    def start(self, bench: Bench, pass_name: str) -> None:
        self.counter = FlopCounter()
        self.counter.__enter__()

    def stop(self, bench: Bench, pass_name: str) -> None:
        self.counter.__exit__(None, None, None)
        total = self.counter.total
        self._results = {"flops_per_step": total, "flops_per_token": total / bench.tokens_per_step}

    def results(self) -> dict[str, Any]:
        return dict(self._results)
