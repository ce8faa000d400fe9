"""Counters for what a solve does besides arithmetic: host reads (syncs) and reads of Broyden's
history buffers. Deterministic, so tests hold the counts exactly."""

from __future__ import annotations

from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

aten = torch.ops.aten


class HostReads(TorchDispatchMode):
    """Counts reads of tensor values by the host: `aten._local_scalar_dense` (item(), float(),
    bool(), `if t:`) and `Tensor.tolist()`, which reads memory without dispatching an op.

    On a GPU each is a synchronisation; on a CPU it still stops the host from running ahead."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0
        self._tolist = None

    def __enter__(self):
        self.count = 0
        self._tolist = torch.Tensor.tolist
        original = self._tolist

        def counted_tolist(t, *args, **kwargs):
            self.count += 1
            return original(t, *args, **kwargs)

        torch.Tensor.tolist = counted_tolist  # type: ignore[method-assign]
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist = self._tolist  # type: ignore[method-assign]
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        if func is aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))


_FACTORIES = (aten.zeros, aten.new_zeros, aten.empty, aten.new_empty, aten.zeros_like,
              aten.empty_like, aten.full, aten.new_full)


class OpCount(TorchDispatchMode):
    """Counts every aten op dispatched inside, views included: at small states a solver's time is
    its number of ops (a few microseconds each), whatever they compute."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    @property
    def total(self) -> int:
        return sum(self.ops.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def _storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


class HistoryReads(TorchDispatchMode):
    """Counts compute ops that read Broyden's U/V history buffers.

    The buffers are recognised as the factory outputs shaped (B, memory, D). A *pass* is a
    non-view op taking, as an input (not as the tensor it writes), a view of one buffer that
    spans two or more stored pairs: one bmm over U[:, :k] is one pass over U. Ops that touch a
    single pair (writing the new u, reading it back) are counted apart, in `row_reads`: they
    move one state's worth of bytes, not the history's. `ops` says which ops made the passes."""

    def __init__(self, batch: int, memory: int, dim: int) -> None:
        super().__init__()
        self.shape = (batch, memory, dim)
        self.row = batch * dim  # elements of one pair's row across the batch
        self.buffers: set[int] = set()
        self.passes = 0
        self.row_reads = 0
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        factory = func.overloadpacket in _FACTORIES
        if factory and isinstance(out, torch.Tensor) and tuple(out.shape) == self.shape:
            self.buffers.add(_storage_key(out))
            return out
        if func.is_view or not self.buffers:
            return out
        written = {a.name for a in func._schema.arguments
                   if a.alias_info is not None and a.alias_info.is_write}
        inputs = [v for a, v in zip(func._schema.arguments, args, strict=False) if a.name not in written]
        inputs += [v for k, v in kwargs.items() if k not in written]
        spans: dict[int, int] = {}
        for value in tree_flatten(inputs)[0]:
            if isinstance(value, torch.Tensor) and value.numel() > 0:
                key = _storage_key(value)
                if key in self.buffers:
                    spans[key] = max(spans.get(key, 0), value.numel())
        for numel in spans.values():
            if numel > self.row:
                self.passes += 1
                self.ops[str(func.overloadpacket)] += 1
            else:
                self.row_reads += 1
        return out
