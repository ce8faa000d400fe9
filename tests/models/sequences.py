"""Inputs and perturbation checks shared by the sequence-model tests."""

from __future__ import annotations

import torch
from torch import Tensor, nn


def model_inputs(model: nn.Module, batch: int, seq_len: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """(x, targets) for a built model: token ids in lm mode, embedded inputs in core mode."""
    g = torch.Generator().manual_seed(seed)
    c = model.config
    if model.mode == "lm":
        return (torch.randint(0, c.vocab_size, (batch, seq_len), generator=g),
                torch.randint(0, c.vocab_size, (batch, seq_len), generator=g))
    x = torch.randn(batch, seq_len, c.d_model, generator=g)
    return x, torch.randn(x.shape, generator=g)


def perturbed(x: Tensor, t: int, seed: int = 1) -> Tensor:
    """x with position t (and only t) changed: a new token id or a new embedded vector."""
    y = x.clone()
    if x.dtype == torch.long:
        y[:, t] = (x[:, t] + 1) % int(x.max().item() + 2)
    else:
        y[:, t] = torch.randn(y[:, t].shape, generator=torch.Generator().manual_seed(seed), dtype=x.dtype)
    return y


def causal_changes(model: nn.Module, x: Tensor, t: int, memory: object = None) -> tuple[float, float]:
    """(largest change of outputs before t, smallest per-sample change at t) when input t changes."""
    with torch.no_grad():
        out, _ = model(x, memory=memory)
        out2, _ = model(perturbed(x, t), memory=memory)
    before = (out2[:, :t] - out[:, :t]).abs().max().item() if t else 0.0
    at = (out2[:, t] - out[:, t]).flatten(1).abs().amax(1).min().item()
    return before, at
