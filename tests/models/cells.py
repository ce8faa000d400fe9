"""Small fixed-point maps shared by the engine tests."""

from __future__ import annotations

import torch
from torch import Tensor, nn


def contraction(d: int = 32, batch: int = 4, norm: float = 0.9, dtype=torch.float64, seed: int = 0):
    """f(z) = tanh(W z + U x + b) with ||W||_2 = norm; returns (f, z0, params, x)."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(d, d, dtype=dtype, generator=g)
    W = (W / torch.linalg.matrix_norm(W, 2) * norm).requires_grad_()
    U = (torch.randn(d, d, dtype=dtype, generator=g) / d**0.5).requires_grad_()
    b = (0.1 * torch.randn(d, dtype=dtype, generator=g)).requires_grad_()
    x = torch.randn(batch, d, dtype=dtype, generator=g).requires_grad_()

    def f(z: Tensor) -> Tensor:
        return torch.tanh(z @ W.T + x @ U.T + b)

    return f, torch.zeros(batch, d, dtype=dtype), (W, U, b), x


def slow_contraction(d: int = 64, batch: int = 4, norm: float = 0.97, seed: int = 0):
    """A symmetric W with eigenvalues spread up to `norm`: plain iteration crawls at rate ~norm."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64, generator=g))
    W = Q @ torch.diag(torch.linspace(0.3, norm, d, dtype=torch.float64)) @ Q.T
    x = 0.01 * torch.randn(batch, d, dtype=torch.float64, generator=g)
    return (lambda z: torch.tanh(z @ W.T + x)), torch.zeros(batch, d, dtype=torch.float64)


class MLPCell(nn.Module):
    """A transformer-FFN-like cell on (B, T, d) sequences: f(z; x) = LN(z + FFN(z) + x)."""

    def __init__(self, d: int = 32, hidden: int = 256) -> None:
        super().__init__()
        self.ff = nn.Sequential(nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, d))
        self.ln = nn.LayerNorm(d)
        with torch.no_grad():  # keep it contractive: small output projection
            self.ff[2].weight.mul_(0.3)

    def forward(self, z: Tensor, x: Tensor) -> Tensor:
        return self.ln(0.5 * z + self.ff(z) + x)
