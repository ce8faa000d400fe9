"""The one stats record every model returns beside its output."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from models.solvers import SolverStats


@dataclass
class ModelStats:
    """Per-forward statistics. DEQs fill the solver fields; the backward ones appear after
    `loss.backward()` (the implicit backward solve runs then). Explicit models report their depth
    as `nfe_forward` (one layer application = one evaluation of the block)."""

    nfe_forward: int | None = None
    nfe_backward: int | None = None
    residual_forward: float | None = None  # in the solver's stop_mode
    residual_backward: float | None = None
    solver_workspace_bytes: int = 0
    forward: SolverStats | None = None
    backward: SolverStats | None = None
    memory: Any = None  # state for the next segment (detached), for models that carry one

    @property
    def diverged(self) -> bool:
        return any(s is not None and s.status == "diverged" for s in (self.forward, self.backward))
