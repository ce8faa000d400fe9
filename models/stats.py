"""The one stats record every model returns beside its output."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from models.solvers import SolverStats


@dataclass
class ModelStats:
    """Per-forward statistics. DEQs fill the solver fields; the backward ones appear after
    `loss.backward()` (the implicit backward solve runs then). Explicit models report their depth
    as `nfe_forward` (one layer application = one evaluation of the block).

    A DEQ that solves its segment in chunks (`subseq_len`) runs one solve per chunk, one after
    the other. Then `nfe_forward` / `nfe_backward` are totals over the chunks (calls of f, each
    on one chunk), `residual_*` the worst chunk's, `forward` / `backward` the worst chunk's solve,
    and `solver_workspace_bytes` the largest single solve's workspace: only one solver runs at a
    time and its buffers are freed before the next chunk's solve starts. The per-chunk numbers
    are in the `chunk_*` lists, in chunk order. An unchunked DEQ is one chunk."""

    nfe_forward: int | None = None
    nfe_backward: int | None = None
    residual_forward: float | None = None  # in the solver's stop_mode
    residual_backward: float | None = None
    solver_workspace_bytes: int = 0
    forward: SolverStats | None = None
    backward: SolverStats | None = None
    memory: Any = None  # state for the next segment (detached), for models that carry one
    chunks: int = 1  # solves per segment (subseq_len); 1 for an unchunked DEQ and explicit models
    chunk_len: list[int] = field(default_factory=list)  # tokens per chunk
    chunk_nfe_forward: list[int] = field(default_factory=list)
    chunk_nfe_backward: list[int | None] = field(default_factory=list)  # None until backward ran
    chunk_workspace_bytes: list[int] = field(default_factory=list)  # per chunk, forward or backward

    @property
    def diverged(self) -> bool:
        return any(s is not None and s.status == "diverged" for s in (self.forward, self.backward))

    def record_forward(self, solve: SolverStats, *, workspace_bytes: int | None = None) -> int:
        """Add one forward solve (one per chunk); returns its chunk index for `record_backward`.
        `workspace_bytes` overrides the solve's own (the unrolled reference keeps none)."""
        workspace = solve.workspace_bytes if workspace_bytes is None else workspace_bytes
        self.chunk_nfe_forward.append(solve.nfe)
        self.chunk_nfe_backward.append(None)
        self.chunk_workspace_bytes.append(workspace)
        self.nfe_forward = (self.nfe_forward or 0) + solve.nfe
        self.residual_forward = _worst(self.residual_forward, solve.residual)
        if self.forward is None or not _worst_first(self.forward, solve):
            self.forward = solve
        self.solver_workspace_bytes = max(self.solver_workspace_bytes, workspace)
        return len(self.chunk_nfe_forward) - 1

    def record_backward(self, chunk: int, nfe: int, solve: SolverStats | None = None) -> None:
        """Add the backward of chunk `chunk`: its NFE and, for an implicit backward, its solve."""
        self.chunk_nfe_backward[chunk] = nfe
        self.nfe_backward = sum(n for n in self.chunk_nfe_backward if n is not None)
        if solve is None:
            return
        self.residual_backward = _worst(self.residual_backward, solve.residual)
        if self.backward is None or not _worst_first(self.backward, solve):
            self.backward = solve
        self.chunk_workspace_bytes[chunk] = max(self.chunk_workspace_bytes[chunk], solve.workspace_bytes)
        self.solver_workspace_bytes = max(self.solver_workspace_bytes, solve.workspace_bytes)


def _worst(a: float | None, b: float) -> float:
    """The larger residual; NaN (a fixed-iteration solve has none) wins, so it is never hidden."""
    if a is None:
        return b
    if math.isnan(a) or math.isnan(b):
        return math.nan
    return max(a, b)


def _worst_first(kept: SolverStats, new: SolverStats) -> bool:
    """True when `kept` stays the representative solve: its residual is strictly the worse one."""
    return not math.isnan(kept.residual) and not math.isnan(new.residual) and kept.residual > new.residual
