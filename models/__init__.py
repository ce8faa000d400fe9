"""DEQ engine (solvers, implicit backward) and the DEQ models, behind one registry."""

from models.deq import BACKWARDS, DEQ
from models.heads import HEADS, resolve_head
from models.registry import (
    MODELS,
    ModelSpec,
    build_model,
    list_models,
    make_config,
    model_spec,
    register_model,
)
from models.solvers import SOLVERS, SolverStats, fixed_iterations, solve
from models.stats import ModelStats

__all__ = [
    "BACKWARDS",
    "DEQ",
    "HEADS",
    "MODELS",
    "SOLVERS",
    "ModelSpec",
    "ModelStats",
    "SolverStats",
    "build_model",
    "fixed_iterations",
    "list_models",
    "make_config",
    "model_spec",
    "register_model",
    "resolve_head",
    "solve",
]
