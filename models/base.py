"""What every benchmarked model shares: its config, its mode, and the forward contract.

    output, stats = model(x, targets=None, memory=None)

- lm mode: x is token ids (B, T); output is logits (B, T, vocab), or the mean cross-entropy when
  `targets` (B, T) are given.
- core mode: x is embedded input (B, T, config.d_model); output is the last hidden state
  (B, T, d_out), or the mean squared error against `targets` of that shape.
- `stats` is a `ModelStats`; models that carry state across segments (Transformer-XL memory,
  TrellisNet's causal history) take it as `memory` and return the next one in `stats.memory`.
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn


class BenchModel(nn.Module):
    """Base class: subclasses set `self.config`, `self.mode` and the modules named in
    `embedding_names` (token embedding, LM head), which non-embedding counts exclude."""

    embedding_names: tuple[str, ...] = ("embedding", "head")

    def __init__(self, config: Any, mode: str) -> None:
        super().__init__()
        self.config = config
        self.mode = mode

    def num_params(self, non_embedding: bool = False) -> int:
        params = {id(p): p for p in self.parameters()}
        if non_embedding:
            for name in self.embedding_names:
                module = getattr(self, name, None)
                if module is not None:
                    for p in module.parameters():
                        params.pop(id(p), None)
        return sum(p.numel() for p in params.values())

    def loss(self, output: Tensor, targets: Tensor) -> Tensor:
        if self.mode == "lm":
            return F.cross_entropy(output.flatten(0, 1).float(), targets.flatten())
        return F.mse_loss(output.float(), targets.float())
