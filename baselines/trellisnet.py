"""Explicit TrellisNet baselines: the DEQ-TrellisNet layer unrolled L times.

- `trellisnet`: L layers, one set of weights (TrellisNet is weight-shared across depth), autograd
  through all of them: activations grow linearly with L.
- `trellisnet-ckpt`: the same with non-reentrant activation checkpointing over segments of
  `ckpt_segment` layers (0: round(sqrt(L)), Chen et al.'s schedule): only each segment's input
  state is kept, and one segment is recomputed at a time in backward, so memory grows ~sqrt(L).
  `ckpt_segment=1` checkpoints every layer (still linear in L, with a smaller slope).

The cell, the embedding, the head and the sizes are models/trellisnet.py's, so parameters equal
the DEQ's exactly at every size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from models.registry import ModelSpec, register_model
from models.stats import ModelStats
from models.trellisnet import SHAPES, Step, TrellisNetModel, TrellisNetShape


@dataclass(frozen=True, kw_only=True)
class TrellisNetConfig(TrellisNetShape):
    depth: int = 8


@dataclass(frozen=True, kw_only=True)
class TrellisNetCkptConfig(TrellisNetConfig):
    ckpt_segment: int = 0  # layers per checkpointed segment; 0 = round(sqrt(depth))


# The paper's explicit depths: 60 layers on PTB, 70 on WT103.
SIZES = {
    "debug": {**SHAPES["debug"], "depth": 8},
    "small": {**SHAPES["small"], "depth": 16},
    "paper-ptb": {**SHAPES["paper-ptb"], "depth": 60},
    "paper-wt103": {**SHAPES["paper-wt103"], "depth": 70},
}


class TrellisNet(TrellisNetModel):
    """`depth` applications of the shared TrellisNet layer from z = 0."""

    def __init__(self, config: TrellisNetConfig, mode: str) -> None:
        if config.depth < 1:
            raise ValueError(f"trellisnet.depth must be >= 1, got {config.depth}")
        super().__init__(config, mode)

    def realise(self, layer: Step, z0: Tensor) -> tuple[Tensor, ModelStats]:
        z = z0
        del z0  # let the zero state go once the first layer has used it
        for _ in range(self.config.depth):
            z = layer(z)
        return z, ModelStats(nfe_forward=self.config.depth)


class CheckpointedTrellisNet(TrellisNet):
    """`depth` layers in checkpointed segments of `segment_length` layers."""

    @property
    def segment_length(self) -> int:
        config = self.config
        return config.ckpt_segment or max(1, round(math.sqrt(config.depth)))

    def realise(self, layer: Step, z0: Tensor) -> tuple[Tensor, ModelStats]:
        if not torch.is_grad_enabled():
            return super().realise(layer, z0)

        def run(z: Tensor, n: int) -> Tensor:
            for _ in range(n):
                z = layer(z)
            return z

        z, depth, k = z0, self.config.depth, self.segment_length
        for start in range(0, depth, k):
            z = checkpoint(run, z, min(k, depth - start), use_reentrant=False)
        return z, ModelStats(nfe_forward=depth)


register_model(ModelSpec(
    name="trellisnet", family="trellisnet", variant="tied", config=TrellisNetConfig,
    sizes=SIZES, build=TrellisNet,
    description="TrellisNet: the weight-shared layer unrolled `depth` times",
))
register_model(ModelSpec(
    name="trellisnet-ckpt", family="trellisnet", variant="ckpt", config=TrellisNetCkptConfig,
    sizes=SIZES, build=CheckpointedTrellisNet,
    description="TrellisNet with activation checkpointing over ~sqrt(depth)-layer segments",
))
