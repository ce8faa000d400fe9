"""Small models for harness and instrument tests, independent of the real families: a DEQ of an
FFN cell, the same cell stacked `depth` times with distinct weights (untied), and one cell
unrolled `depth` times (weight-tied). Registered for a test by the `toy_models` fixture, and in
spawned workers through DEQBENCH_PLUGINS=tests.bench.toy_plugin."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from models import DEQ, ModelSpec, ModelStats, register_model
from models.base import BenchModel
from models.deq import DEQSettings


@dataclass(frozen=True, kw_only=True)
class ToyDEQConfig(DEQSettings):
    d_model: int = 32
    d_hidden: int = 64
    vocab_size: int = 50
    dropout: float = 0.0
    max_iter: int = 12
    b_max_iter: int = 12
    pretrain_depth: int = 2
    blowup: bool = False  # f(z) = 3 z + cell(z): no fixed point iteration can reach, for `diverged`


@dataclass(frozen=True, kw_only=True)
class ToyStackConfig:
    d_model: int = 32
    d_hidden: int = 64
    vocab_size: int = 50
    dropout: float = 0.0
    depth: int = 3


class Cell(nn.Module):
    """f(z; x) = LN(0.5 z + FFN(z) + x): contractive at init (small output projection)."""

    def __init__(self, d: int, hidden: int) -> None:
        super().__init__()
        self.ff = nn.Sequential(nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, d))
        self.ln = nn.LayerNorm(d)
        self.ff[2].weight.data.mul_(0.3)

    def forward(self, z: Tensor, x: Tensor) -> Tensor:
        return self.ln(0.5 * z + self.ff(z) + x)


class _Toy(BenchModel):
    def __init__(self, config, mode: str) -> None:
        super().__init__(config, mode)
        d = config.d_model
        if mode == "lm":
            self.embedding = nn.Embedding(config.vocab_size, d)
            self.head = nn.Linear(d, config.vocab_size)
        self.inject = nn.Linear(d, d)

    def forward(self, x: Tensor, targets: Tensor | None = None, memory=None):
        x = self.embedding(x) if self.mode == "lm" else x  # (B, T, d)
        z, stats = self.core(self.inject(x))
        out = self.head(z) if self.mode == "lm" else z
        return (out if targets is None else self.loss(out, targets)), stats


class ToyDEQ(_Toy):
    def __init__(self, config: ToyDEQConfig, mode: str) -> None:
        super().__init__(config, mode)
        self.cell = Cell(config.d_model, config.d_hidden)
        self.deq = DEQ.from_config(config)

    def core(self, injection: Tensor) -> tuple[Tensor, ModelStats]:
        if self.config.blowup:
            return self.deq(lambda z: 3.0 * z + self.cell(z, injection), injection.new_zeros(injection.shape))
        return self.deq(lambda z: self.cell(z, injection), injection.new_zeros(injection.shape))


class ToyStack(_Toy):
    def __init__(self, config: ToyStackConfig, mode: str) -> None:
        super().__init__(config, mode)
        self.layers = nn.ModuleList(Cell(config.d_model, config.d_hidden) for _ in range(config.depth))

    def core(self, injection: Tensor) -> tuple[Tensor, ModelStats]:
        z = injection.new_zeros(injection.shape)
        for layer in self.layers:
            z = layer(z, injection)
        return z, ModelStats(nfe_forward=len(self.layers))


class ToyTied(_Toy):
    def __init__(self, config: ToyStackConfig, mode: str) -> None:
        super().__init__(config, mode)
        self.cell = Cell(config.d_model, config.d_hidden)

    def core(self, injection: Tensor) -> tuple[Tensor, ModelStats]:
        z = injection.new_zeros(injection.shape)
        for _ in range(self.config.depth):
            z = self.cell(z, injection)
        return z, ModelStats(nfe_forward=self.config.depth)


BIG = {"d_model": 64, "d_hidden": 256}
WIDE = {"d_model": 1024, "d_hidden": 4096}
TOY_SPECS = (
    ModelSpec(name="toy-deq", family="toy", variant="deq", config=ToyDEQConfig,
              sizes={"debug": {}, "big": BIG, "wide": {**WIDE, "max_iter": 30}}, build=ToyDEQ),
    ModelSpec(name="toy-stack", family="toy", variant="untied", config=ToyStackConfig,
              sizes={"debug": {}, "big": BIG, "wide": {**WIDE, "depth": 70}}, build=ToyStack),
    ModelSpec(name="toy-tied", family="toy", variant="tied", config=ToyStackConfig,
              sizes={"debug": {}, "big": BIG, "wide": {**WIDE, "depth": 70}}, build=ToyTied),
)
TOY_MODELS = tuple(spec.name for spec in TOY_SPECS)


def register() -> None:
    for spec in TOY_SPECS:
        register_model(spec)
