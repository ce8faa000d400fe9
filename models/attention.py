"""Causal self-attention kernels shared by the transformer family (DEQ cell and explicit layers).

Two kinds, both ending in `scaled_dot_product_attention` so that a GPU picks a fused kernel:
- `sdpa`: plain causal attention (no positional encoding: the causal mask alone tells a token
  how many tokens precede it).
- `relative`: Transformer-XL relative positions. The score of query i against key j is
      (q_i + r_w)·k_j + (q_i + r_r)·R_{i-j}
  with R the projected sinusoid of the distance i - j and r_w, r_r learned per-head biases. The
  positional term enters SDPA as an additive float mask, which also carries the causal -inf.

Keys may be preceded by M cached memory positions: query i (absolute position M + i) sees keys
0 … M + i.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

ATTENTIONS = ("relative", "sdpa")


def sinusoid(positions: Tensor, dim: int) -> Tensor:
    """Sinusoidal embedding of (K,) float positions -> (K, dim): [sin | cos] of geometric rates."""
    rates = torch.exp(torch.arange(0, dim, 2, device=positions.device, dtype=torch.float32)
                      * (-math.log(10000.0) / dim))  # (ceil(dim / 2),)
    angles = positions.float()[:, None] * rates[None]  # (K, ceil(dim / 2))
    return torch.cat((angles.sin(), angles.cos()), dim=1)[:, :dim]


def relative_distances(klen: int, device: torch.device | None = None) -> Tensor:
    """The distances the positional scores are computed against, in the order `relative_shift`
    expects: klen - 1, …, 1, 0."""
    return torch.arange(klen - 1, -1, -1, device=device)


def relative_shift(scores: Tensor) -> Tensor:
    """Re-index (…, T, K) scores from distances (K-1 … 0) to keys (0 … K-1), without a gather.

    Query i sits at absolute position K - T + i, so its score against key j is the one against
    distance K - T + i - j, found in column j + T - 1 - i of row i. Padding one zero column on the
    left and re-reading the buffer with rows one element shorter shifts row i by exactly T - 1 - i.
    Entries for keys after the query (j > K - T + i) are left-overs from the next row: mask them.
    """
    *lead, T, K = scores.shape
    padded = F.pad(scores, (1, 0))  # (…, T, K + 1)
    return padded.view(*lead, K + 1, T)[..., 1:, :].view(*lead, T, K)


def causal_allowed(qlen: int, klen: int, device: torch.device | None = None) -> Tensor:
    """(qlen, klen) bool, True where query i may see key j: j <= klen - qlen + i."""
    return torch.ones(qlen, klen, dtype=torch.bool, device=device).tril(klen - qlen)


def relative_attention(
    q: Tensor, k: Tensor, v: Tensor, r: Tensor, r_w_bias: Tensor, r_r_bias: Tensor, allowed: Tensor,
    dropout_p: float = 0.0,
) -> Tensor:
    """Transformer-XL attention.

    q (B, H, T, dh); k, v (B, H, K, dh); r (H, dh, K): projected sinusoids of the distances
    K-1 … 0, already multiplied by 1/sqrt(dh); r_w_bias, r_r_bias (H, dh); allowed (T, K) bool;
    dropout_p: element-wise dropout on the attention probabilities. Returns (B, H, T, dh).
    """
    positional = torch.matmul(q + r_r_bias[:, None], r)  # (B, H, T, K), against distances
    positional = relative_shift(positional)  # (B, H, T, K), against keys
    positional.masked_fill_(~allowed, -math.inf)  # a fresh buffer: in place is safe
    return F.scaled_dot_product_attention(q + r_w_bias[:, None], k, v, attn_mask=positional,
                                          dropout_p=dropout_p)


def causal_attention(q: Tensor, k: Tensor, v: Tensor, allowed: Tensor | None, dropout_p: float = 0.0) -> Tensor:
    """Plain causal SDPA; `allowed` (T, K) is needed only when memory makes K > T."""
    if allowed is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=dropout_p)
