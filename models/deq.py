"""The DEQ layer: solve z* = f(z*) without a graph, then attach a gradient.

    deq = DEQ(solver="broyden", backward="implicit")
    z_star, stats = deq(f, z0)   # f closes over the input injection and the parameters

Backward modes (registry `BACKWARDS`):
- `implicit`: one differentiable application z = f(z*), followed by an identity node whose
  backward solves the adjoint fixed point g = J^T g + dL/dz (J = df/dz at z*) with a backward
  solver. The graph of that one application is the only graph kept; its VJPs are reused, never
  recomputed. The outer backward through that graph also computes g^T df/dz*, which nothing
  uses (about one VJP more), unless f names the tensors it closes over (`f.inputs`) and can be
  rebuilt on others (`f.on(inputs)`), as models/trellisnet.py's layer: then it is applied to
  cuts of them (`_Cut`), and the identity node hands g^T df/d(inputs) on by itself.
- `phantom`: k damped steps z <- (1 - tau) z + tau f(z) from z* with grad; k=1, tau=1 is
  Jacobian-free backprop.
- `unrolled`: autograd through plain fixed-point iterations from z0 (the reference; memory O(k)).
  Differentiating through Broyden's or Anderson's own updates is not what anyone means by the
  reference, so `unrolled` always iterates z <- f(z), up to max_iter or tol.

`DEQ(f, z0, stats)` adds its solves to a `ModelStats`; a segment solved in chunks
(`subseq_len`, models/chunked.py) is one call per chunk into the same record.
`empty_cache=True` calls `torch.cuda.empty_cache()` at the start of every implicit backward on
CUDA, as the 2019 DEQ code does in each backward (modules/deq.py, DummyDEQFunc.backward): it
returns the allocator's cached blocks, which lowers reserved memory, not allocated memory.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.autograd.graph import GradientEdge, get_gradient_edge

from models.solvers import (
    Function,
    SolverStats,
    _Tracker,
    check_options,
    check_solver,
    check_stop_mode,
    solve,
)
from models.stats import ModelStats


@dataclass(frozen=True, kw_only=True)
class DEQSettings:
    """The solver and gradient fields every DEQ model config shares (the benchmark's solver and
    backward axes override them by these names)."""

    solver: str = "broyden"
    backward: str = "implicit"
    max_iter: int = 30
    tol: float = 1e-4
    stop_mode: str = "rel"
    b_solver: str | None = None  # None: same as solver
    b_max_iter: int = 40
    b_tol: float = 1e-6
    phantom_steps: int = 1
    phantom_tau: float = 1.0
    # Solver memory: Broyden keeps this many (u, v) pairs (None: max_iter, i.e. all of them);
    # Anderson mixes this many past iterates. Both are workspace the DEQ pays for.
    broyden_memory: int | None = None
    anderson_m: int = 5
    # The segment solved chunk by chunk, subseq_len positions at a time (None: all at once), as
    # the official DEQ language models do (models/chunked.py says what changes).
    subseq_len: int | None = None
    empty_cache: bool = False  # torch.cuda.empty_cache() in every implicit backward on CUDA
    # Read residuals on the host (a GPU sync) every k solver iterations instead of every one; a
    # solve then stops up to k - 1 iterations late. Forward and backward solves alike.
    check_every: int = 1


class DEQ:
    """A configured equilibrium solve with a chosen gradient; holds no parameters."""

    def __init__(
        self,
        solver: str = "broyden",
        backward: str = "implicit",
        max_iter: int = 30,
        tol: float = 1e-4,
        stop_mode: str = "rel",
        b_solver: str | None = None,
        b_max_iter: int = 40,
        b_tol: float = 1e-6,
        phantom_steps: int = 1,
        phantom_tau: float = 1.0,
        solver_options: dict[str, float] | None = None,
        b_solver_options: dict[str, float] | None = None,
        subseq_len: int | None = None,
        empty_cache: bool = False,
    ) -> None:
        self.solver = check_solver(solver)
        self.b_solver = check_solver(b_solver or solver)
        if backward not in BACKWARDS:
            raise ValueError(f"unknown backward {backward!r}; valid: {', '.join(sorted(BACKWARDS))}")
        self.backward = backward
        self.stop_mode = check_stop_mode(stop_mode)
        for name, value in (("max_iter", max_iter), ("b_max_iter", b_max_iter), ("phantom_steps", phantom_steps)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if not 0.0 < phantom_tau <= 1.0:
            raise ValueError(f"phantom_tau must be in (0, 1], got {phantom_tau}")
        if subseq_len is not None and subseq_len < 1:
            raise ValueError(f"subseq_len must be >= 1 or None (the whole segment), got {subseq_len}")
        self.subseq_len, self.empty_cache = subseq_len, empty_cache
        self.max_iter, self.tol = max_iter, tol
        self.b_max_iter, self.b_tol = b_max_iter, b_tol
        self.phantom_steps, self.phantom_tau = phantom_steps, phantom_tau
        self.solver_options = check_options(self.solver, solver_options)
        self.b_solver_options = check_options(
            self.b_solver, b_solver_options if b_solver_options is not None
            else (solver_options if self.b_solver == self.solver else None)
        )

    @classmethod
    def from_config(cls, config: DEQSettings) -> DEQ:
        def options(solver: str) -> dict[str, float]:
            found: dict[str, float] = {}
            if solver == "broyden" and config.broyden_memory is not None:
                found["memory"] = config.broyden_memory
            if solver == "anderson":
                found["m"] = config.anderson_m
            if config.check_every != 1:
                found["check_every"] = config.check_every
            return found

        b_solver = config.b_solver or config.solver
        return cls(
            solver=config.solver, backward=config.backward, max_iter=config.max_iter,
            tol=config.tol, stop_mode=config.stop_mode, b_solver=b_solver,
            b_max_iter=config.b_max_iter, b_tol=config.b_tol, phantom_steps=config.phantom_steps,
            phantom_tau=config.phantom_tau, solver_options=options(config.solver),
            b_solver_options=options(b_solver), subseq_len=config.subseq_len,
            empty_cache=config.empty_cache,
        )

    def __repr__(self) -> str:
        return (
            f"DEQ(solver={self.solver!r}, backward={self.backward!r}, max_iter={self.max_iter}, "
            f"tol={self.tol}, stop_mode={self.stop_mode!r}, b_solver={self.b_solver!r}, "
            f"b_max_iter={self.b_max_iter}, b_tol={self.b_tol}, subseq_len={self.subseq_len})"
        )

    def solve_forward(self, f: Function, z0: Tensor) -> tuple[Tensor, SolverStats]:
        return solve(
            f, z0.detach(), solver=self.solver, max_iter=self.max_iter, tol=self.tol,
            stop_mode=self.stop_mode, **self.solver_options,
        )

    def __call__(self, f: Function, z0: Tensor, stats: ModelStats | None = None) -> tuple[Tensor, ModelStats]:
        """z* = f(z*) from z0, with this DEQ's gradient; the solves are added to `stats` (a new
        record when None)."""
        stats = ModelStats() if stats is None else stats
        if torch.is_grad_enabled() and self.backward == "unrolled":
            return _unrolled(self, f, z0, stats)
        z_star, forward = self.solve_forward(f, z0)
        stats.record_forward(forward)
        if not torch.is_grad_enabled():
            return z_star, stats
        return BACKWARDS[self.backward](self, f, z_star, stats)


class _AdjointSolve(torch.autograd.Function):
    """Identity forward; backward replaces dL/dz by the solution g of g = J^T g + dL/dz.

    J^T g is a VJP through the saved graph of z_out = f(z_in), with retain_graph so the outer
    backward can go through the same graph afterwards. Being an autograd node (not a tensor hook
    closing over z_out) it forms no reference cycle: the graph dies with the step."""

    @staticmethod
    def forward(ctx, z_out: Tensor, z_in: Tensor, deq: DEQ, stats: ModelStats, chunk: int) -> Tensor:
        ctx.save_for_backward(z_out)
        ctx.z_in, ctx.deq, ctx.stats, ctx.chunk = z_in, deq, stats, chunk
        return z_out.view_as(z_out)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        (z_out,) = ctx.saved_tensors
        g = _solve_adjoint(z_out, ctx.z_in, grad, ctx.deq, ctx.stats, ctx.chunk)
        return g, None, None, None, None


class _AdjointSolveCut(torch.autograd.Function):
    """_AdjointSolve for an f applied to cuts (`_Cut`) of the `inputs` it closes over.

    That graph leads to z_in and the cuts only, and this node is not attached to it: the node
    differentiates z_out with respect to the cuts (`edges`: the partial derivatives the outer
    backward would have taken) and hands the gradients on to the inputs. Nothing computes
    g^T df/dz_in."""

    @staticmethod
    def forward(ctx, graph: tuple[Tensor, Tensor, list[GradientEdge | None]], deq: DEQ,
                stats: ModelStats, chunk: int, *inputs: Tensor) -> Tensor:
        ctx.graph, ctx.deq, ctx.stats, ctx.chunk = graph, deq, stats, chunk
        return graph[0].detach()

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        z_out, z_in, edges = ctx.graph
        g = _solve_adjoint(z_out, z_in, grad, ctx.deq, ctx.stats, ctx.chunk)
        keep = _keep_graph()  # if not, free the graph on the way, as the outer backward would
        wanted = [e for e in edges if e is not None]
        found = iter(torch.autograd.grad(z_out, wanted, g, retain_graph=keep, allow_unused=True))
        if not keep:
            del ctx.graph
        return None, None, None, None, *(None if e is None else next(found) for e in edges)


class _Cut(torch.autograd.Function):
    """x as a new graph input: a view whose node holds nothing and leads only to `anchor` (an
    empty leaf), so a graph built on it ends there and keeps x's memory no longer than its own
    nodes need it (a detached leaf would: its gradient accumulator holds it)."""

    @staticmethod
    def forward(ctx, anchor: Tensor, x: Tensor) -> Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[None, None]:
        return None, None  # never reached: gradients are taken at its edge


def _solve_adjoint(z_out: Tensor, z_in: Tensor, grad: Tensor, deq: DEQ, stats: ModelStats,
                   chunk: int) -> Tensor:
    """g = J^T g + grad, with VJPs through the graph of z_out = f(z_in) (kept for later)."""
    if deq.empty_cache and _on_cuda(grad):
        torch.cuda.empty_cache()

    def adjoint(g: Tensor) -> Tensor:  # g -> J^T g + dL/dz
        (vjp,) = torch.autograd.grad(z_out, z_in, g, retain_graph=True)
        return vjp.add_(grad)

    g, backward = solve(
        adjoint, grad, solver=deq.b_solver, max_iter=deq.b_max_iter, tol=deq.b_tol,
        stop_mode=deq.stop_mode, **deq.b_solver_options,
    )
    stats.record_backward(chunk, backward.nfe, backward)
    return g


def _keep_graph() -> bool:
    """Whether the running backward keeps its graph (retain_graph=True); True where this torch
    cannot say (the query is private; AOTAutograd asks it the same way)."""
    query = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    return True if query is None else bool(query())


def _on_cuda(t: Tensor) -> bool:
    return t.is_cuda


def _implicit(deq: DEQ, f: Function, z_star: Tensor, stats: ModelStats) -> tuple[Tensor, ModelStats]:
    z_in = z_star.detach().requires_grad_()
    chunk = len(stats.chunk_nfe_forward) - 1  # the solve just recorded
    inputs = tuple(getattr(f, "inputs", ()))
    if any(t.requires_grad for t in inputs):
        # cut, so that the graph holds partial derivatives only: an input may depend on another
        # (a chunk's history on the weights, through the previous chunk's solve)
        anchor = z_in.new_empty(0).requires_grad_()
        cut = tuple(_Cut.apply(anchor, t.detach()) if t.requires_grad else t for t in inputs)
        z_out = f.on(cut)(z_in)  # the one application whose graph backward uses
        edges = [get_gradient_edge(c) if t.requires_grad else None
                 for c, t in zip(cut, inputs, strict=True)]
        return _AdjointSolveCut.apply((z_out, z_in, edges), deq, stats, chunk, *inputs), stats
    z_out = f(z_in)  # the one application whose graph backward uses
    if not z_out.requires_grad:
        return z_out, stats
    # The outer backward also accumulates a gradient into this helper leaf; drop it at once.
    z_in.register_post_accumulate_grad_hook(_drop_grad)
    return _AdjointSolve.apply(z_out, z_in, deq, stats, chunk), stats


def _drop_grad(t: Tensor) -> None:
    t.grad = None


def _phantom(deq: DEQ, f: Function, z_star: Tensor, stats: ModelStats) -> tuple[Tensor, ModelStats]:
    z, tau = z_star.detach(), deq.phantom_tau
    for _ in range(deq.phantom_steps):
        z = f(z) if tau == 1.0 else torch.lerp(z, f(z), tau)
    stats.record_backward(len(stats.chunk_nfe_forward) - 1, deq.phantom_steps)
    return z, stats


def _unrolled(deq: DEQ, f: Function, z0: Tensor, stats: ModelStats) -> tuple[Tensor, ModelStats]:
    z = z0
    flat = z0.reshape(z0.shape[0], -1)
    track = _Tracker(flat.detach(), deq.tol, deq.stop_mode, keep_iterate=False)  # stats only
    for _ in range(deq.max_iter):
        fz = f(z)
        with torch.no_grad():
            stop = track.update(z.detach().reshape(flat.shape), fz.detach().reshape(flat.shape),
                                (fz - z).detach().reshape(flat.shape))
        z = fz
        if stop:
            break
    _, forward = track.finish("fixed_point", z0.shape, 0)
    # no solver state beyond the graph; backward runs through the same iterations
    chunk = stats.record_forward(forward, workspace_bytes=0)
    stats.record_backward(chunk, forward.nfe)
    return z, stats


BACKWARDS: dict[str, Callable[..., tuple[Tensor, ModelStats]]] = {
    "implicit": _implicit,
    "phantom": _phantom,
}


def register_backward(name: str, fn: Callable[..., tuple[Tensor, ModelStats]]) -> None:
    BACKWARDS[name] = fn


register_backward("unrolled", _unrolled)
