"""Live tensor storages, counted exactly: the `tracked` memory instrument's engine.

A `TorchDispatchMode` sees every aten op. Each storage an op reads or writes is counted from the
moment it first appears until its Python object is finalized (storages keep one Python object per
StorageImpl, so the finalizer fires exactly when the memory is released). Views and in-place ops
share their storage and are counted once. Tensors that exist before counting starts (parameters,
optimizer state, inputs) are added with `track()`.

Under `FakeTensorMode` the same counter sees fake storages, which is how `predicted` works.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


def _storage_of(t: torch.Tensor) -> torch.UntypedStorage | None:
    try:
        return t.untyped_storage()
    except (RuntimeError, NotImplementedError):  # sparse, nested or storage-less subclasses
        return None


class LiveTensorCounter(TorchDispatchMode):
    """Counts bytes of live storages; `peak_bytes` is the high-water mark since the last reset.

    `round_to` rounds every storage up to a multiple (512 mimics CUDA's caching allocator)."""

    def __init__(self, round_to: int = 1) -> None:
        super().__init__()
        self.round_to = round_to
        self.current_bytes = 0
        self.peak_bytes = 0
        self._live: dict[int, int] = {}  # storage key -> bytes counted
        self._lock = threading.Lock()

    # -- public -------------------------------------------------------------------------------
    def track(self, *objs: Any) -> None:
        """Count tensors that already exist (nested lists, dicts, modules, optimizers welcome)."""
        for obj in objs:
            for t in _tensors_in(obj):
                self._see(t)

    def reset_peak(self) -> None:
        self.peak_bytes = self.current_bytes

    @property
    def live_storages(self) -> int:
        return len(self._live)

    # -- dispatch -----------------------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        leaves, _ = tree_flatten((args, kwargs))
        for t in leaves:
            if isinstance(t, torch.Tensor):
                self._see(t)
        out = func(*args, **(kwargs or {}))
        leaves, _ = tree_flatten(out)
        for t in leaves:
            if isinstance(t, torch.Tensor):
                self._see(t)
        return out

    # -- bookkeeping --------------------------------------------------------------------------
    def _rounded(self, nbytes: int) -> int:
        r = self.round_to
        return nbytes if r <= 1 else -(-nbytes // r) * r

    def _see(self, t: torch.Tensor) -> None:
        storage = _storage_of(t)
        if storage is None:
            return
        key = storage._cdata
        nbytes = self._rounded(storage.nbytes())
        with self._lock:
            known = self._live.get(key)
            if known is None:
                self._live[key] = nbytes
                weakref.finalize(storage, self._release, key)
            elif known != nbytes:  # resized in place (resize_, out= ops)
                self._live[key] = nbytes
            else:
                return
            self.current_bytes += nbytes - (known or 0)
            if self.current_bytes > self.peak_bytes:
                self.peak_bytes = self.current_bytes

    def _release(self, key: int) -> None:
        with self._lock:
            nbytes = self._live.pop(key, 0)
            self.current_bytes -= nbytes


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
