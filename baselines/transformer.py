"""Explicit-depth baselines of the transformer family, built from the DEQ's own cell.

- `transformer`: Transformer-XL, L distinct layers. Layer 0 reads the input, no layer has an
  injection; with `mem_len` each layer attends to the previous segment's inputs to that layer.
- `transformer-tied`: the DEQ cell f(z; x) applied L times from z0 = 0: the same parameters, the
  same injection and the same memory (the previous segment's final states and inputs) as
  `deq-transformer`,
  so with many layers it computes the DEQ's equilibrium by plain iteration.
- `transformer-ckpt`: `transformer-tied` with each application under non-reentrant activation
  checkpointing: only the layer inputs are kept; each layer is recomputed in backward.

`match_params` sizes an untied baseline of any depth to a DEQ's parameter count.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from models.base import BenchModel
from models.registry import ModelSpec, build_model, make_config, register_model
from models.stats import ModelStats
from models.transformer import (
    DEQ_TRANSFORMER_SIZES,
    WT103_CUTOFFS,
    WT103_VOCAB,
    SegmentMemory,
    TransformerCell,
    TransformerConfig,
    TransformerModel,
    cell_fields,
    memory_parts,
    next_memory,
    next_segment_memory,
)


@dataclass(frozen=True, kw_only=True)
class ExplicitTransformerConfig(TransformerConfig):
    depth: int = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.depth < 1:
            raise ValueError(f"depth must be >= 1, got {self.depth}")


class UntiedTransformer(TransformerModel):
    """L distinct layers; `memory` is a list of L (B, M, d) tensors (one per layer) or None."""

    def __init__(self, config: ExplicitTransformerConfig, mode: str) -> None:
        super().__init__(config, mode)
        self.layers = nn.ModuleList(TransformerCell(config, inject=False) for _ in range(config.depth))

    def core(self, x: Tensor, memory: list[Tensor] | None) -> tuple[Tensor, ModelStats]:
        B, T, _ = x.shape
        if memory is not None and len(memory) != len(self.layers):
            raise ValueError(f"memory has {len(memory)} layers, the model {len(self.layers)}")
        z, next_states = x, []
        for i, layer in enumerate(self.layers):
            mem = None if memory is None else memory[i]
            next_states.append(next_memory(mem, z, self.config.mem_len))  # the input to layer i
            z = layer(z, layer.prepare(B, T, memory=mem))
        return z, ModelStats(nfe_forward=len(self.layers),
                             memory=next_states if self.config.mem_len else None)


class TiedTransformer(TransformerModel):
    """The DEQ cell unrolled `depth` times; `memory` is a SegmentMemory, as for the DEQ."""

    def __init__(self, config: ExplicitTransformerConfig, mode: str, checkpointed: bool = False) -> None:
        super().__init__(config, mode)
        self.cell = TransformerCell(config, inject=True)
        self.checkpointed = checkpointed

    def core(self, x: Tensor, memory: SegmentMemory | None) -> tuple[Tensor, ModelStats]:
        B, T, _ = x.shape
        states, memory_inputs = memory_parts(memory)
        # Shared by every layer: the injection, positions, weights, memory keys and values.
        inputs = self.cell.prepare(B, T, x=x, memory=states, memory_inputs=memory_inputs)
        z = torch.zeros_like(x)  # (B, T, d)
        for _ in range(self.config.depth):
            if self.checkpointed and torch.is_grad_enabled():
                z = checkpoint(self.cell, z, inputs, use_reentrant=False)
            else:
                z = self.cell(z, inputs)
        return z, ModelStats(nfe_forward=self.config.depth,
                             memory=next_segment_memory(memory, z, x, self.config.mem_len))


def match_params(
    target: int | BenchModel,
    depth: int,
    *,
    model: str = "transformer",
    size: str = "debug",
    tol: float = 0.01,
    min_ffn_ratio: float = 1.0,
    **fixed: Any,
) -> dict[str, int]:
    """Config overrides giving the untied baseline `model` at `depth` a non-embedding parameter
    count within `tol` of `target` (a count, or a built model such as the DEQ):

        build_model(model, size, depth=depth, **fixed, **match_params(deq, depth, size=size, **fixed))

    The FFN width `d_inner` moves first. When even an FFN `min_ffn_ratio` times as wide as the
    model is too many parameters (deep, narrow targets), or one FFN unit is too coarse a step,
    `d_model` shrinks too (with `d_head` in proportion, or in multiples of `n_head` where the
    model has no `d_head`): the widest model that fits wins.

    Counts come from depth-1 and depth-2 builds with d_inner 1 and 2, extrapolated: parameters
    grow linearly in depth and in d_inner, as in any stack of identical layers.
    """
    goal = target.num_params(non_embedding=True) if isinstance(target, BenchModel) else int(target)
    base = make_config(model, size, depth=depth, **fixed)
    has_head_width = hasattr(base, "d_head")
    widths = [w for w in range(base.d_model, 0, -1) if has_head_width or w % base.n_head == 0]

    def resize(width: int) -> dict[str, int]:
        if width == base.d_model:
            return {}
        if has_head_width:
            return {"d_model": width, "d_head": max(1, round(base.d_head * width / base.d_model))}
        return {"d_model": width}

    @functools.cache
    def line(width: int) -> tuple[int, int]:
        """(fixed_part, per_unit): parameters = fixed_part + per_unit * d_inner at this width."""
        def count(layers: int, ffn: int) -> int:
            return _count(model, size, layers, {**fixed, **resize(width), "d_inner": ffn})

        one, two = (count(1, ffn) + (depth - 1) * (count(2, ffn) - count(1, ffn)) for ffn in (1, 2))
        return one - (two - one), two - one

    def min_ffn(width: int) -> int:
        return max(1, round(min_ffn_ratio * width))

    def fits(width: int) -> bool:
        fixed_part, per_unit = line(width)
        return fixed_part + per_unit * min_ffn(width) <= goal * (1 + tol) and per_unit <= 2 * tol * goal

    if not fits(widths[-1]):
        raise ValueError(f"{model} at depth {depth} cannot be made as small as {goal} parameters")
    lo, hi = 0, len(widths) - 1  # widths descend: find the first (widest) that fits
    while lo < hi:
        mid = (lo + hi) // 2
        if fits(widths[mid]):
            hi = mid
        else:
            lo = mid + 1
    width = widths[lo]
    fixed_part, per_unit = line(width)
    return {**resize(width), "d_inner": max(min_ffn(width), round((goal - fixed_part) / per_unit))}


def _count(model: str, size: str, depth: int, overrides: dict[str, Any]) -> int:
    return build_model(model, size, mode="core", depth=depth, **overrides).num_params(non_embedding=True)


# Transformer-XL shapes. Non-embedding counts are checked against PAPER.md in the tests.
# Adaptive clusters as Transformer-XL's WT103 base script (div_val 1: one table, no projections).
TRANSFORMER_SIZES: dict[str, dict] = {
    "debug": dict(d_model=32, n_head=4, d_head=8, d_inner=128, vocab_size=256, ln_affine=True,
                  depth=4, cutoffs=(32, 128), div_val=2),
    "small": dict(d_model=128, n_head=4, d_head=32, d_inner=512, vocab_size=1024, ln_affine=True,
                  depth=4, cutoffs=(128, 512), div_val=2),
    # 4.9M: "Transformer-XL small, 4 layers", at the small DEQ's width.
    "paper-small": dict(d_model=256, n_head=8, d_head=32, d_inner=1_750, vocab_size=WT103_VOCAB,
                        ln_affine=True, dropout=0.1, mem_len=150, depth=4, cutoffs=WT103_CUTOFFS),
    # 44M: Transformer-XL base on WT103 (16 layers, 410 wide, 10 heads x 41, FFN 2100).
    "paper-medium": dict(d_model=410, n_head=10, d_head=41, d_inner=2_100, vocab_size=WT103_VOCAB,
                         ln_affine=True, dropout=0.1, mem_len=150, depth=16, cutoffs=WT103_CUTOFFS),
    # The same shape as kimiyoung/transformer-xl's pytorch/run_wt103_base.sh runs it: element-wise
    # dropout 0.1 (FFN hidden and output, attention output), dropatt 0.0 as in the script.
    "paper-medium-official": dict(
        d_model=410, n_head=10, d_head=41, d_inner=2_100, vocab_size=WT103_VOCAB, ln_affine=True,
        dropout=0.1, dropout_style="elementwise", dropatt=0.0, mem_len=150, depth=16,
        cutoffs=WT103_CUTOFFS,
    ),
}
# The DEQ's own cell: the paper's weight-tied baseline has 16 layers.
TIED_DEPTHS = {"debug": 4, "small": 16, "paper-small": 16, "paper-medium": 16,
               "paper-medium-official": 16}
TIED_SIZES: dict[str, dict] = {
    name: {**cell_fields(size), "depth": TIED_DEPTHS[name]} for name, size in DEQ_TRANSFORMER_SIZES.items()
}

register_model(ModelSpec(
    name="transformer", family="transformer", variant="untied", config=ExplicitTransformerConfig,
    sizes=TRANSFORMER_SIZES, build=UntiedTransformer,
    description="Transformer-XL: L distinct layers of the DEQ's block, no injection",
))
register_model(ModelSpec(
    name="transformer-tied", family="transformer", variant="tied", config=ExplicitTransformerConfig,
    sizes=TIED_SIZES, build=TiedTransformer,
    description="the deq-transformer cell unrolled L times (same parameters and injection)",
))
register_model(ModelSpec(
    name="transformer-ckpt", family="transformer", variant="ckpt", config=ExplicitTransformerConfig,
    sizes=TIED_SIZES, build=lambda config, mode: TiedTransformer(config, mode, checkpointed=True),
    description="transformer-tied with non-reentrant activation checkpointing per layer",
))

__all__ = ["ExplicitTransformerConfig", "TiedTransformer", "UntiedTransformer", "match_params"]
