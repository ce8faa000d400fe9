"""Live tensor storages, counted exactly: the `tracked` memory instrument's engine.

A `TorchDispatchMode` sees every aten op. Each storage an op reads or writes is counted from the
moment it first appears until its Python object is finalized (storages keep one Python object per
StorageImpl, so the finalizer fires exactly when the memory is released). Views and in-place ops
share their storage and are counted once. Tensors that exist before counting starts (parameters,
optimizer state, inputs) are added with `track()`.

Under `FakeTensorMode` the same counter sees fake storages, which is how `predicted` works.
With `round_to` the counter keeps two tallies: bytes rounded up per storage (what an allocator
with that granularity hands out) and the exact bytes (`unrounded_peak_bytes`).
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode


def _storage_of(t: torch.Tensor) -> torch.UntypedStorage | None:
    try:
        return t.untyped_storage()
    except (RuntimeError, NotImplementedError):  # sparse, nested or storage-less subclasses
        return None


class LiveTensorCounter(TorchDispatchMode):
    """Counts bytes of live storages; `peak_bytes` is the high-water mark since the last reset.

    `round_to` rounds every storage up to a multiple (512 mimics CUDA's caching allocator).
    `device` ("cuda", "cpu", ...) counts only storages of tensors on that device type, e.g. to
    leave out the CPU step counters of a CUDA optimizer."""

    def __init__(self, round_to: int = 1, device: str | None = None) -> None:
        super().__init__()
        self.round_to = round_to
        self.device = device
        self.current_bytes = 0
        self.peak_bytes = 0
        self.unrounded_current_bytes = 0
        self.unrounded_peak_bytes = 0
        self._live: dict[int, tuple[int, int]] = {}  # storage key -> (bytes, rounded bytes)
        self._lock = threading.Lock()

    # -- public -------------------------------------------------------------------------------
    def track(self, *objs: Any) -> None:
        """Count tensors that already exist (nested lists, dicts, modules, optimizers welcome)."""
        for obj in objs:
            for t in _tensors_in(obj):
                self._see(t)

    def reset_peak(self) -> None:
        self.peak_bytes = self.current_bytes
        self.unrounded_peak_bytes = self.unrounded_current_bytes

    @property
    def live_storages(self) -> int:
        return len(self._live)

    # -- dispatch -----------------------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        # aten schemas nest at most one level (Tensor[] / Tensor?[]): no pytree walk needed
        self._see_all(args)
        self._see_all(kwargs.values())
        out = self._call(func, args, kwargs)
        self._see_all(out if isinstance(out, (tuple, list)) else (out,))
        return out

    def _call(self, func, args, kwargs):
        """Run the op (the hook where a subclass may adjust what it returns)."""
        return func(*args, **kwargs)

    # -- bookkeeping --------------------------------------------------------------------------
    def _see_all(self, items: Iterable[Any]) -> None:
        for x in items:
            if isinstance(x, torch.Tensor):
                self._see(x)
            elif isinstance(x, (tuple, list)):
                for y in x:
                    if isinstance(y, torch.Tensor):
                        self._see(y)

    def _rounded(self, nbytes: int) -> int:
        r = self.round_to
        return nbytes if r <= 1 else -(-nbytes // r) * r

    def _see(self, t: torch.Tensor) -> None:
        if self.device is not None and t.device.type != self.device:
            return
        storage = _storage_of(t)
        if storage is None:
            return
        key = storage._cdata
        nbytes = storage.nbytes()
        known = self._live.get(key)
        if known is not None and known[0] == nbytes:  # the common case: already counted
            return
        counted = (nbytes, self._rounded(nbytes))
        with self._lock:
            if known is None:
                weakref.finalize(storage, self._release, key)
            # else: resized in place (resize_, out= ops)
            self._live[key] = counted
            old_bytes, old_rounded = known or (0, 0)
            self.current_bytes += counted[1] - old_rounded
            self.unrounded_current_bytes += nbytes - old_bytes
            self.peak_bytes = max(self.peak_bytes, self.current_bytes)
            self.unrounded_peak_bytes = max(self.unrounded_peak_bytes, self.unrounded_current_bytes)

    def _release(self, key: int) -> None:
        with self._lock:
            nbytes, rounded = self._live.pop(key, (0, 0))
            self.current_bytes -= rounded
            self.unrounded_current_bytes -= nbytes


def _tensors_in(obj: Any) -> Iterable[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
        if obj.grad is not None:
            yield obj.grad
    elif isinstance(obj, torch.nn.Module):
        yield from _tensors_in(list(obj.parameters()) + list(obj.buffers()))
    elif isinstance(obj, torch.optim.Optimizer):
        yield from _tensors_in(list(obj.state.values()))
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors_in(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors_in(v)
