"""Tiny registered models for harness tests (loaded through DEQBENCH_PLUGINS)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from models import DEQ, ModelSpec, ModelStats, register_model
from models.base import BenchModel
from models.deq import DEQSettings


@dataclass(frozen=True, kw_only=True)
class ToyConfig:
    d_model: int = 16
    vocab_size: int = 50
    dropout: float = 0.0
    depth: int = 2


@dataclass(frozen=True, kw_only=True)
class ToyDEQConfig(DEQSettings):
    d_model: int = 16
    vocab_size: int = 50
    dropout: float = 0.0
    max_iter: int = 20
    b_max_iter: int = 20
    pretrain_depth: int = 2
    blowup: bool = False  # a non-contractive cell, to exercise the diverged status


class _Toy(BenchModel):
    def __init__(self, config, mode):
        super().__init__(config, mode)
        d = config.d_model
        if mode == "lm":
            self.embedding = nn.Embedding(config.vocab_size, d)
            self.head = nn.Linear(d, config.vocab_size)
        self.cell = nn.Linear(d, d)
        with torch.no_grad():
            self.cell.weight.mul_(0.3)

    def _in(self, x: Tensor) -> Tensor:
        return self.embedding(x) if self.mode == "lm" else x

    def _out(self, h: Tensor, targets: Tensor | None, stats: ModelStats):
        out = self.head(h) if self.mode == "lm" else h
        return (out if targets is None else self.loss(out, targets)), stats


class ToyTied(_Toy):
    def forward(self, x, targets=None, memory=None):
        u = self._in(x)
        h = torch.zeros_like(u)
        for _ in range(self.config.depth):
            h = torch.tanh(self.cell(h) + u)
        return self._out(h, targets, ModelStats(nfe_forward=self.config.depth))


class ToyDEQ(_Toy):
    def __init__(self, config, mode):
        super().__init__(config, mode)
        self.deq = DEQ.from_config(config)

    def forward(self, x, targets=None, memory=None):
        u = self._in(x)
        scale = 3.0 if self.config.blowup else 1.0
        z, stats = self.deq(lambda h: scale * h + torch.tanh(self.cell(h) + u) if self.config.blowup
                            else torch.tanh(self.cell(h) + u), torch.zeros_like(u))
        return self._out(z, targets, stats)


register_model(ModelSpec(name="toy-deq", family="toy", variant="deq", config=ToyDEQConfig,
                         sizes={"debug": {}, "big": {"d_model": 64}}, build=ToyDEQ))
register_model(ModelSpec(name="toy-tied", family="toy", variant="tied", config=ToyConfig,
                         sizes={"debug": {}, "big": {"d_model": 64}}, build=ToyTied))
