"""Small helpers shared by tests of several packages."""

import torch
from torch import Tensor

from models.base import BenchModel


def trellisnet_batch(model: BenchModel, batch: int, seq: int = 12) -> tuple[Tensor, Tensor]:
    """Seeded (inputs, targets) for a TrellisNet-family model: token ids in `lm` mode, features
    of width d_model and nout in `core` mode."""
    c, g = model.config, torch.Generator().manual_seed(1)
    if model.mode == "lm":
        return (torch.randint(0, c.vocab_size, (batch, seq), generator=g),
                torch.randint(0, c.vocab_size, (batch, seq), generator=g))
    return torch.randn(batch, seq, c.d_model, generator=g), torch.randn(batch, seq, c.nout, generator=g)
