"""Memory instruments: the CUDA caching allocator, and live tensor storages counted for real
(`tracked`) or over fake tensors (`predicted`).

Each reports the peak of one step after warm-up and the static part of it (params and buffers,
one gradient per trainable param, optimizer state) in the same units, so that
activation = peak - static is meaningful whichever of them is the row's `memory_source`.
"""

from __future__ import annotations

from typing import Any

import torch

from bench.measure.instrument import MEMORY, PREDICT, Instrument
from bench.measure.tracked import LiveTensorCounter
from bench.measure.workload import Bench, ObservedFakeTensorMode

# The CUDA caching allocator hands out blocks in multiples of 512 bytes (kMinBlockSize).
CUDA_ROUNDING = 512
aten = torch.ops.aten
# Real kernels of these losses write the unreduced loss into their output and then resize it to
# a scalar: the scalar keeps an input-sized storage alive (as long as the loss lives, i.e. through
# backward). Their fake (meta) versions return a 4-byte scalar.
INPUT_SIZED_LOSSES = (
    aten.mse_loss.default,
    aten.smooth_l1_loss.default,
    aten.binary_cross_entropy.default,
    aten.soft_margin_loss.default,
)


class TorchCudaMemory(Instrument):
    """`torch.cuda.max_memory_allocated/reserved` over one step, peaks reset after warm-up.

    `cuda_peak_bytes` is the allocator's peak as it is; `cuda_preexisting_bytes` is what was
    allocated before the step that is not the bench's (a cuBLAS workspace: MiBs, which dwarf a
    debug model), for comparing with `tracked`/`predicted`, which count the model's tensors only."""

    name = "torch_cuda"
    passes = (MEMORY,)

    def __init__(self) -> None:
        super().__init__()
        self._results: dict[str, Any] = {}

    def available(self, device: torch.device) -> tuple[bool, str]:
        if device.type != "cuda":
            return False, f"the workload runs on {device.type}, not CUDA"
        if not torch.cuda.is_available():  # never read the allocator without CUDA: it says 0
            return False, "torch.cuda.is_available() is False"
        return True, ""

    def start(self, bench: Bench, pass_name: str) -> None:
        ok, why = self.available(bench.device)
        if not ok:
            raise RuntimeError(f"torch_cuda cannot measure: {why}")
        torch.cuda.synchronize(bench.device)
        torch.cuda.reset_peak_memory_stats(bench.device)
        self._allocated_before = torch.cuda.memory_allocated(bench.device)
        self._retries_before = torch.cuda.memory_stats(bench.device).get("num_alloc_retries", 0)
        # What the bench holds between steps, as the allocator would round it; the rest of what
        # is allocated before the step (cuBLAS workspaces, leftovers) is no model's memory.
        state = LiveTensorCounter(CUDA_ROUNDING, device="cuda")
        state.track(*bench.state())
        self._state_bytes = state.current_bytes

    def stop(self, bench: Bench, pass_name: str) -> None:
        device = bench.device
        torch.cuda.synchronize(device)
        self._results = {
            "cuda_peak_bytes": torch.cuda.max_memory_allocated(device),
            "reserved_bytes": torch.cuda.max_memory_reserved(device),
            "cuda_allocated_before_bytes": self._allocated_before,
            "cuda_preexisting_bytes": self._allocated_before - self._state_bytes,
            "num_alloc_retries": torch.cuda.memory_stats(device).get("num_alloc_retries", 0)
            - self._retries_before,
            "cuda_static_bytes": bench.static_bytes(CUDA_ROUNDING),
        }

    def results(self) -> dict[str, Any]:
        return dict(self._results)


class TrackedMemory(Instrument):
    """Peak live bytes of a real step, counted storage by storage (exact on any device)."""

    name = "tracked"
    passes = (MEMORY,)
    round_to = 1
    counter_class = LiveTensorCounter

    def __init__(self) -> None:
        super().__init__()
        self.counter: LiveTensorCounter | None = None
        self._results: dict[str, Any] = {}

    def start(self, bench: Bench, pass_name: str) -> None:
        self.counter = self.counter_class(self.round_to, device=bench.device.type)
        self.counter.track(*bench.state())  # what lives across steps is live when the step starts
        self.counter.__enter__()

    def stop(self, bench: Bench, pass_name: str) -> None:
        assert self.counter is not None, "stop() without start()"
        self.counter.__exit__(None, None, None)
        self._results = self._report(bench, self.counter)

    def _report(self, bench: Bench, counter: LiveTensorCounter) -> dict[str, Any]:
        return {
            "tracked_bytes": counter.peak_bytes,
            "tracked_static_bytes": bench.static_bytes(self.round_to),
        }

    def results(self) -> dict[str, Any]:
        return dict(self._results)


class FakeStepCounter(LiveTensorCounter):
    """The live-storage counter for fake tensors, with fake outputs' storages made as large as
    the real kernels' where the two are known to differ (`INPUT_SIZED_LOSSES`).

    Hosted by the fake mode (`ObservedFakeTensorMode.observer`, see `observe`) or, over any other
    FakeTensorMode, entered as a dispatch mode of its own (slower: a round trip per op)."""

    def observe(self, func, args, kwargs, run):
        """One op as the hosting fake mode runs it: `run()` gives its fake result."""
        self._see_all(args)
        self._see_all(kwargs.values())
        out = self._as_real(func, args, kwargs, run())
        self._see_all(out if isinstance(out, (tuple, list)) else (out,))
        return out

    def _call(self, func, args, kwargs):
        return self._as_real(func, args, kwargs, func(*args, **kwargs))

    @staticmethod
    def _as_real(func, args, kwargs, out):
        if func in INPUT_SIZED_LOSSES and _argument(func, args, kwargs, "reduction") != 0:
            out.untyped_storage().resize_(args[0].numel() * out.element_size())  # no data: meta
        return out


def _argument(func, args: tuple, kwargs: dict, name: str) -> Any:
    for i, arg in enumerate(func._schema.arguments):
        if arg.name == name:
            return args[i] if i < len(args) else kwargs.get(name, arg.default_value)
    raise KeyError(name)


class PredictedMemory(TrackedMemory):
    """The tracked counter over a bench of fake tensors: the peak a step would have, without
    allocating it. `measure()` builds the fake bench (inside `fake_tensors()`: no data, solvers at
    exactly max_iter iterations).

    Two counts: `predicted_bytes`, exact live bytes (what `tracked` would count), and
    `predicted_cuda_bytes`, every storage rounded up to 512 B as CUDA's caching allocator hands
    them out (what torch_cuda's max_memory_allocated would say; on small tensors the two differ
    by tens of percent)."""

    name = "predicted"
    passes = (PREDICT,)
    round_to = CUDA_ROUNDING
    counter_class = FakeStepCounter
    _host: ObservedFakeTensorMode | None = None  # the fake mode hosting the counter

    def start(self, bench: Bench, pass_name: str) -> None:
        if not bench.fake:
            raise RuntimeError("predicted measures a fake bench: Bench(workload, fake=True)")
        self._host = torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.FAKE)
        if not isinstance(self._host, ObservedFakeTensorMode) or self._host.observer is not None:
            self._host = None
            super().start(bench, pass_name)
            return
        self.counter = self.counter_class(self.round_to, device=bench.device.type)
        self.counter.track(*bench.state())
        self._host.observer = self.counter

    def stop(self, bench: Bench, pass_name: str) -> None:
        if self._host is None:
            super().stop(bench, pass_name)
            return
        self._host.observer = None
        self._host = None
        assert self.counter is not None
        self._results = self._report(bench, self.counter)

    def _report(self, bench: Bench, counter: LiveTensorCounter) -> dict[str, Any]:
        return {
            "predicted_bytes": counter.unrounded_peak_bytes,
            "predicted_static_bytes": bench.static_bytes(),
            "predicted_cuda_bytes": counter.peak_bytes,
            "predicted_cuda_static_bytes": bench.static_bytes(CUDA_ROUNDING),
            "predicted_device": str(bench.device),
        }
