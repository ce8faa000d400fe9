"""Parameter matching: the config overrides that size an untied explicit baseline of a given
depth to its family's DEQ (non-embedding parameters), counted on meta tensors."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any


def matched_overrides(family: str, model: str, size: str, depth: int, notes: list[str]) -> tuple[tuple[str, Any], ...]:
    """Config overrides sizing an untied baseline of this depth to its family's DEQ. Where no
    config of that depth is small enough, the case runs at its size's own config, with a note
    (the params columns show the mismatch)."""
    try:
        return _match(family, model, size, depth)
    except ValueError as err:
        notes.append(f"not parameter-matched: {err}")
        return ()


@functools.cache
def _match(family: str, model: str, size: str, depth: int) -> tuple[tuple[str, Any], ...]:
    from baselines import MATCHERS

    match_params = MATCHERS.get(family)
    if match_params is None:
        raise ValueError(f"no parameter matcher for the {family} family; {model} runs at its size's config")
    target = _deq_params(family, size)
    if target is None:
        return ()
    with _meta():  # parameter counts without allocating anything
        overrides = match_params(target, depth, model=model, size=size)
    return tuple(sorted(overrides.items()))


@functools.cache
def _deq_params(family: str, size: str) -> int | None:
    from models import build_model, list_models, model_spec

    deqs = [n for n in list_models() if model_spec(n).family == family and model_spec(n).is_deq]
    if not deqs or size not in model_spec(deqs[0]).sizes:
        return None
    with _meta():
        return build_model(deqs[0], size, mode="core").num_params(non_embedding=True)


@contextlib.contextmanager
def _meta() -> Iterator[None]:
    """Models built on the meta device, their initialisers skipped: a meta tensor has no values
    to fill, and the meta kernels of normal_/uniform_ run Python decompositions (matching the
    quick preset's baselines spent 3 s of a run's start in them; counts are unchanged)."""
    import torch
    from torch.overrides import TorchFunctionMode

    init = torch.nn.init
    skipped = {init.normal_, init.uniform_, init.zeros_, init.ones_, init.constant_,
               init.trunc_normal_, init.kaiming_uniform_, init.kaiming_normal_, init.xavier_uniform_,
               init.xavier_normal_, init.orthogonal_, torch.Tensor.normal_, torch.Tensor.uniform_,
               torch.Tensor.zero_, torch.Tensor.fill_}

    class SkipInit(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func in skipped:
                return args[0] if args else kwargs["tensor"]
            if func is torch.norm_except_dim:  # weight norm's g: only its shape matters here
                return _norm_shape(*args, **kwargs)
            return func(*args, **kwargs)

    with torch.device("meta"), SkipInit():
        yield


def _norm_shape(v, pow: float = 2, dim: int = 0):
    """torch.norm_except_dim's result on the meta device, without its Python decomposition
    (whose import, torch._refs, cost ~1.4 s of every run's start for weight norm's g): size 1
    in every dimension but `dim` (dim -1: one norm of everything, a scalar)."""
    import torch

    shape = [] if dim == -1 else [n if i == dim % v.dim() else 1 for i, n in enumerate(v.shape)]
    return torch.empty(shape, dtype=v.dtype, device="meta")
