"""Chunked solve: a segment's equilibrium found chunk by chunk, as the official DEQ language
models do (locuslab/deq at 3fba434, DEQModel/models/*/deq_*_forward_backward.py: the loop
`for t in range(0, seq_len, subseq_len)`; their WT103 scripts use subseq_len 75 for the
DEQ-Transformer with a 150-token segment and 50 for DEQ-TrellisNet with 100).

    z, stats = solve_chunks(deq, length, chunk, dim=1)

`chunk(start, stop, previous)` returns (f, z0) for positions [start, stop) given the previous
chunk's output `previous` (None for the first chunk). Each chunk is one DEQ call: its own
forward solve, and its own implicit backward solve when the gradient arrives. What that means:

- Solver memory is per chunk: Broyden's (u, v) history is sized (B, max_iter, chunk · d) and
  freed when the chunk's solve returns, before the next one starts; the adjoint solves run one
  chunk at a time in reverse order. `ModelStats.solver_workspace_bytes` is the largest single
  solve's workspace, the `chunk_*` lists hold each chunk's NFE and workspace.
- Gradients are exact for the chunked model: chunk k's equilibrium depends on chunk k-1's output
  through f (as memory or causal history), so backward flows from chunk k's adjoint solve into
  chunk k-1's output and on into its own adjoint solve, as in the official backward, where each
  chunk's differentiable application takes the previous chunk's result `res` (with its graph).
- What a chunk depends on is the family's business (its `chunk` function): for DEQ-TrellisNet
  nothing changes (the causal history is the previous chunk's last timestep: the chunked fixed
  point is the whole segment's); for the DEQ-Transformer a chunk attends to less (see
  models/transformer.py).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from models.deq import DEQ
from models.solvers import Function
from models.stats import ModelStats

Chunk = Callable[[int, int, Tensor | None], tuple[Function, Tensor]]


def chunk_spans(length: int, subseq_len: int | None) -> list[tuple[int, int]]:
    """[start, stop) of each chunk of a `length`-position segment; one span when unchunked."""
    step = length if subseq_len is None else min(subseq_len, length)
    return [(start, min(start + step, length)) for start in range(0, length, step)]


def solve_chunks(deq: DEQ, length: int, chunk: Chunk, dim: int) -> tuple[Tensor, ModelStats]:
    """Solve the chunks of a segment in order and join their equilibria along `dim`."""
    spans = chunk_spans(length, deq.subseq_len)
    stats = ModelStats(chunks=len(spans))
    outputs: list[Tensor] = []
    previous = None
    for start, stop in spans:
        f, z0 = chunk(start, stop, previous)
        previous, _ = deq(f, z0, stats)
        outputs.append(previous)
        stats.chunk_len.append(stop - start)
    if len(outputs) == 1:
        return outputs[0], stats
    return torch.cat(outputs, dim=dim), stats
