"""What every benchmarked model shares: its config, its mode and head, and the forward contract.

    output, stats = model(x, targets=None, memory=None)

- lm mode: x is token ids (B, T); the head (`config.head`: full, adaptive or split, see
  models/heads.py) turns the core's output into logits (full) or log-probabilities (adaptive,
  split) (B, T, vocab), or the mean cross-entropy when `targets` (B, T) are given.
- core mode (head `none`): x is embedded input (B, T, config.d_model); output is the last hidden
  state (B, T, d_out), or the mean squared error against `targets` of that shape.
- `stats` is a `ModelStats`; models that carry state across segments (Transformer-XL memory,
  TrellisNet's causal history) take it as `memory` and return the next one in `stats.memory`.
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from models.heads import ClusteredSoftmax, resolve_head


class BenchModel(nn.Module):
    """Base class: subclasses set `self.config`, `self.mode` and the modules named in
    `embedding_names` (input embedding, output head), which non-embedding counts exclude."""

    embedding_names: tuple[str, ...] = ("embedding", "head")

    def __init__(self, config: Any, mode: str) -> None:
        super().__init__()
        self.config = config
        self.mode = mode
        self.head_name = resolve_head(getattr(config, "head", None), mode)

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameters (shared ones once). `non_embedding=True` leaves out every parameter of the
        modules in `embedding_names`, i.e. the core alone, whatever the head:
        - none: nothing to leave out (core mode has no embedding or output layer);
        - full: the token embedding and the output layer (weight, bias; one table when tied);
        - adaptive: the adaptive input (its cluster tables and projections) and the adaptive
          softmax (word biases, tail-cluster vectors and biases, its own projections);
        - split: the token embedding, the output layer and the tombstone vectors and biases."""
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

    def decode(self, h: Tensor, targets: Tensor | None = None) -> Tensor:
        """The head on the core's output h (B, T, d): the mean loss against `targets`, else the
        output itself (logits, log-probabilities, or h in core mode)."""
        head = getattr(self, "head", None)
        if isinstance(head, ClusteredSoftmax):
            return head(h, targets)
        out = h if head is None else head(h)
        return out if targets is None else self.loss(out, targets)
