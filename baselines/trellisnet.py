"""Explicit TrellisNet baselines: the DEQ-TrellisNet layer unrolled L times.

- `trellisnet`: L layers, one set of weights (TrellisNet is weight-shared across depth), autograd
  through all of them: activations grow linearly with L.
- `trellisnet-ckpt`: the same with non-reentrant activation checkpointing over segments of
  `ckpt_segment` layers (0: round(sqrt(L)), Chen et al.'s schedule): only each segment's input
  state is kept, and one segment is recomputed at a time in backward, so memory grows ~sqrt(L).
  `ckpt_segment=1` checkpoints every layer (still linear in L, with a smaller slope).

The cell, the embedding, the head and the sizes are models/trellisnet.py's, so parameters equal
the DEQ's exactly at every size.

Auxiliary losses (TrellisNet's deep supervision, locuslab/trellisnet word_WT103/word_wt103.py
and trellisnet.py): with `aux_weight` > 0, in training, the output of every `aux_every`-th layer
(layers aux_every, 2·aux_every, …, the last one included when the depth is a multiple, as there)
goes through its own output dropout and the head, and the loss is
    loss(final) + aux_weight · Σ_j loss(aux_j)
(the official `raw_loss + args.aux * sum(...)`, unnormalised). WT103 runs aux 0.1 every 25
layers, PTB 0.05 every 12.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from models.registry import ModelSpec, register_model
from models.stats import ModelStats
from models.trellisnet import SHAPES, WT103_SPLITS, Prepared, TrellisNetModel, TrellisNetShape


@dataclass(frozen=True, kw_only=True)
class TrellisNetConfig(TrellisNetShape):
    depth: int = 8
    aux_weight: float = 0.0  # weight of the auxiliary losses (official --aux); 0 = none
    aux_every: int = 25  # an auxiliary loss after every aux_every-th layer (official --aux_freq)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.aux_every < 1:
            raise ValueError(f"aux_every must be >= 1, got {self.aux_every}")


@dataclass(frozen=True, kw_only=True)
class TrellisNetCkptConfig(TrellisNetConfig):
    ckpt_segment: int = 0  # layers per checkpointed segment; 0 = round(sqrt(depth))


# The paper's explicit depths: 60 layers on PTB, 70 on WT103 (the official scripts default to 58
# and 75 levels).
SIZES = {
    "debug": {**SHAPES["debug"], "depth": 8},
    "small": {**SHAPES["small"], "depth": 16},
    "paper-ptb": {**SHAPES["paper-ptb"], "depth": 60},
    "paper-wt103": {**SHAPES["paper-wt103"], "depth": 70},
    # locuslab/trellisnet word_PTB/word_ptb.py defaults: the paper-ptb shapes with wdrop 0.5 and
    # aux 0.05 every 12 layers (its embedding dropout 0.1 is not modelled).
    "paper-ptb-official": {**SHAPES["paper-ptb"], "depth": 60, "weight_dropout": 0.5,
                           "aux_weight": 0.05, "aux_every": 12},
    # word_WT103/word_wt103.py defaults: emsize 512, nhid 1600 + nout 512 (44.4M non-embedding),
    # dropouts 0.1, wdrop 0, aux 0.1 every 25 layers, split softmax at 2800/20000/76000.
    "paper-wt103-official": dict(d_model=512, nhid=1600, nout=512, vocab_size=267_735, dropout=0.1,
                                 dropouth=0.1, cutoffs=WT103_SPLITS, depth=70, aux_weight=0.1,
                                 aux_every=25),
}


class TrellisNet(TrellisNetModel):
    """`depth` applications of the shared TrellisNet layer from z = 0."""

    def __init__(self, config: TrellisNetConfig, mode: str) -> None:
        if config.depth < 1:
            raise ValueError(f"trellisnet.depth must be >= 1, got {config.depth}")
        super().__init__(config, mode)

    def realise(self, layer: Prepared, z0: Tensor, aux: list[Tensor] | None = None) -> tuple[Tensor, ModelStats]:
        z = z0
        del z0  # let the zero state go once the first layer has used it
        for i in range(1, self.config.depth + 1):
            z = layer(z)
            if aux is not None and i % self.config.aux_every == 0:
                aux.append(z)
        return z, ModelStats(nfe_forward=self.config.depth)


class CheckpointedTrellisNet(TrellisNet):
    """`depth` layers in checkpointed segments of `segment_length` layers."""

    @property
    def segment_length(self) -> int:
        config = self.config
        return config.ckpt_segment or max(1, round(math.sqrt(config.depth)))

    def realise(self, layer: Prepared, z0: Tensor, aux: list[Tensor] | None = None) -> tuple[Tensor, ModelStats]:
        if not torch.is_grad_enabled():
            return super().realise(layer, z0, aux)

        def run(z: Tensor, n: int) -> Tensor:
            for _ in range(n):
                z = layer(z)
            return z

        def run_with_aux(z: Tensor, first: int, n: int) -> tuple[Tensor, ...]:
            states = []  # the segment's aux-layer outputs: outputs of the checkpoint too
            for i in range(first, first + n):
                z = layer(z)
                if i % self.config.aux_every == 0:
                    states.append(z)
            return (z, *states)

        z, depth, k = z0, self.config.depth, self.segment_length
        for start in range(0, depth, k):
            n = min(k, depth - start)
            if aux is None:
                z = checkpoint(run, z, n, use_reentrant=False)
            else:
                z, *states = checkpoint(run_with_aux, z, start + 1, n, use_reentrant=False)
                aux.extend(states)
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
