"""Fixed-point solvers behind one signature.

    solve(f, z0, *, solver="broyden", max_iter=30, tol=1e-4, stop_mode="rel", **options)
        -> (z, SolverStats)

Every solver looks for z with f(z) = z, tracks the residual of each sample separately, stops once
every sample meets `tol`, and returns the lowest-residual iterate it saw. NaN/Inf or a residual that
keeps growing ends the solve with `status="diverged"`; nothing raises.

Residuals of an iterate z, per sample: abs = ||f(z) - z||, rel = ||f(z) - z|| / ||f(z)||.
The solvers run under `torch.no_grad()`; the DEQ layer adds the gradient afterwards.

Host reads. Deciding to stop means reading residuals on the host: on a GPU a synchronisation that
drains the queue. The stopping test reads them once per iteration by default; `check_every=k`
(an option of every solver) reads them once per k iterations, so a solve may run up to k - 1
iterations past the one where it would have stopped (`nfe` counts them; the returned iterate is
still the lowest-residual one). With tol <= 0 no residual can meet the tolerance and only
divergence can stop a solve, so the test runs every `UNSTOPPABLE_CHECK_EVERY` iterations (or
every k, if larger). Under `fixed_iterations()` nothing is read at all. Between reads the
lowest-residual iterate is kept on the device.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor

Function = Callable[[Tensor], Tensor]
STOP_MODES = ("abs", "rel")
# A residual this many times above the first one means the iteration is running away.
DIVERGENCE_RATIO = 1e3
# Added to ||f(z)|| so that rel residuals stay finite at z = f(z) = 0.
_NORM_EPS = 1e-30
_NORM_EPS_F32 = array("f", [_NORM_EPS])[0]  # the same constant as a float32 tensor holds it
# tol <= 0: read the residuals this often, to catch divergence and fill the trace.
UNSTOPPABLE_CHECK_EVERY = 16
_FIXED_ITERATIONS = contextvars.ContextVar("fixed_iterations", default=False)


@contextlib.contextmanager
def fixed_iterations() -> Iterator[None]:
    """Run every solve for exactly max_iter evaluations, never reading a residual on the host.

    Needed under FakeTensorMode (fake tensors have no values to branch on) and wherever a
    measurement must not depend on when a solver happens to converge."""
    token = _FIXED_ITERATIONS.set(True)
    try:
        yield
    finally:
        _FIXED_ITERATIONS.reset(token)


@dataclass
class SolverStats:
    """What one solve did. Residuals are the worst sample's, for the returned iterate."""

    solver: str
    nfe: int  # calls of f actually made (not the step of the lowest residual)
    abs_residual: float
    rel_residual: float
    converged: bool
    status: str  # "converged" | "max_iter" | "diverged"
    stop_mode: str
    tol: float
    trace: list[float] = field(default_factory=list)  # worst-sample residual (stop_mode) per f call
    workspace_bytes: int = 0  # buffers the solver keeps across iterations (history, best iterate)
    best_step: int = 0  # f call whose iterate was returned (1-based; 0: not known, fixed iterations)

    @property
    def residual(self) -> float:
        return self.rel_residual if self.stop_mode == "rel" else self.abs_residual


def _rel(abs_res: list[float], f_norm: list[float]) -> list[float]:
    """abs / (||f(z)|| + eps) per sample, rounded as float32 tensors compute it (the residual
    norms are float32): the host decides exactly as a device-side comparison would. Above 1e-20
    adding eps leaves a float32 unchanged, so only tinier norms need the rounded sum."""
    return array("f", [
        a / (n if n > 1e-20 else array("f", [n + _NORM_EPS_F32])[0])
        for a, n in zip(abs_res, f_norm, strict=True)
    ]).tolist()


def _worst(values: list[float]) -> float:
    """max, NaN if any value is NaN (as Tensor.max()); residuals are >= 0, so a NaN sum says so."""
    total = sum(values)
    return total if total != total else max(values)


class _Tracker:
    """Residuals, lowest-residual iterate, stopping and divergence; shared by every solver.

    Per iteration on the device: two norms, stacked as one (2, B) float32 tensor [abs; ||f(z)||].
    Checked every iteration, that tensor is the one thing read; the comparisons run on the host.
    Deferred (check_every > 1, or tol <= 0), each iteration's norms go into a window read once it
    is full, and the comparison with the best so far runs on the device."""

    def __init__(self, z0: Tensor, tol: float, stop_mode: str, check_every: int = 1,
                 keep_iterate: bool = True) -> None:
        """keep_iterate=False: the caller wants residuals only (no lowest-residual iterate kept
        on the device between host reads: it would cost a copy of the state)."""
        if not isinstance(check_every, int) or check_every < 1:
            raise ValueError(f"check_every must be an integer >= 1, got {check_every!r}")
        self.tol, self.stop_mode, self.rel = tol, stop_mode, stop_mode == "rel"
        self.keep_iterate = keep_iterate
        batch = z0.shape[0]
        self.dims = tuple(range(1, z0.dim()))  # per-sample norms over everything but the batch
        self.to_float = z0.dtype == torch.float64  # residuals are float32 whatever the state's dtype
        self.widen = None if z0.dtype in (torch.float32, torch.float64) else torch.float32
        # The lowest-residual iterate. Solvers never write into an iterate after handing it over,
        # so while every sample improves this is a reference, not a copy.
        self.best_z = z0
        self.best_norms = torch.full((2, batch), math.inf, device=z0.device, dtype=torch.float32)
        self.best_abs, self.best_rel = [math.inf] * batch, [math.inf] * batch  # host copies
        self.trace: list[float] = []
        self.nfe = 0
        self.status = "max_iter"
        self.first_abs: float | None = None
        self.fixed = _FIXED_ITERATIONS.get()
        self.every = check_every if tol > 0 else max(check_every, UNSTOPPABLE_CHECK_EVERY)
        # Fixed iterations (a prediction) take the deferred path wherever a real solve would, so
        # both hold the same window and the same lowest-residual iterate: predicted == tracked.
        self.deferred = self.every > 1
        if self.deferred:  # residuals wait on the device until the next read
            # rows [abs; ||f(z)||; the residual of stop_mode], per iteration and for the best
            self.window = torch.empty((self.every, 3, batch), device=z0.device, dtype=torch.float32)
            self.best_norms = torch.full((3, batch), math.inf, device=z0.device, dtype=torch.float32)
            self.filled = 0

    @property
    def workspace_bytes(self) -> int:
        return self.best_z.nbytes + self.best_norms.nbytes + (self.window.nbytes if self.deferred else 0)

    def update(self, z: Tensor, fz: Tensor, g: Tensor) -> bool:
        """Record iterate z with f(z)=fz and g=fz-z; return True when the solve should stop."""
        self.nfe += 1
        if self.to_float:
            g, fz = g.float(), fz.float()
        norm, dims, widen = torch.linalg.vector_norm, self.dims, self.widen
        g_norm, f_norm = norm(g, dim=dims, dtype=widen), norm(fz, dim=dims, dtype=widen)  # (B,)
        if self.deferred:
            return self._defer(z, g_norm, f_norm)
        norms = torch.stack((g_norm, f_norm))  # (2, B)
        if self.fixed:  # no host reads: keep the latest iterate (residuals are not looked at)
            self.best_z, self.best_norms = z, norms
            self.trace.append(math.nan)
            return False
        abs_res, f_norms = norms.tolist()  # the iteration's one host read
        rel_res = _rel(abs_res, f_norms)
        res, best = (rel_res, self.best_rel) if self.rel else (abs_res, self.best_abs)
        improved = list(map(float.__lt__, res, best))  # NaN never improves
        if all(improved):
            self.best_z, self.best_norms = z, norms
            self.best_abs, self.best_rel = abs_res, rel_res
        elif any(improved):  # some samples got worse: keep their earlier iterates
            mask = torch.tensor(improved, device=z.device)
            self.best_z = torch.where(mask.view(-1, *[1] * (z.dim() - 1)), z, self.best_z)
            self.best_norms = torch.where(mask, norms, self.best_norms)
            self.best_abs = [a if i else b for i, a, b in zip(improved, abs_res, self.best_abs, strict=True)]
            self.best_rel = [r if i else b for i, r, b in zip(improved, rel_res, self.best_rel, strict=True)]
        verdict = self._verdict(res, abs_res)
        if verdict is not None:
            self.status = verdict
            return True
        return False

    def _verdict(self, res: list[float], abs_res: list[float]) -> str | None:
        """Trace one iteration; "diverged" or "converged" when it ends the solve."""
        worst, worst_abs = _worst(res), _worst(abs_res)
        self.trace.append(worst)
        if self.first_abs is None:
            self.first_abs = worst_abs
        # Divergence is judged on abs: rel saturates as z blows up.
        if not math.isfinite(worst) or worst_abs > DIVERGENCE_RATIO * max(self.first_abs, 1e-30):
            return "diverged"
        if worst <= self.tol:
            return "converged"
        return None

    def _defer(self, z: Tensor, g_norm: Tensor, f_norm: Tensor) -> bool:
        """Keep the lowest-residual iterate on the device; read the window when it is full."""
        res = g_norm / (f_norm + _NORM_EPS) if self.rel else g_norm
        row = self.window[self.filled]
        torch.stack((g_norm, f_norm, res), out=row)
        improved = res < self.best_norms[2]  # NaN never improves
        if self.keep_iterate:
            self.best_z = torch.where(improved.view(-1, *[1] * (z.dim() - 1)), z, self.best_z)
        self.best_norms = torch.where(improved, row, self.best_norms)
        self.filled += 1
        if self.fixed:  # never read: the window is only filled, as a real solve fills it
            self.trace.append(math.nan)
            self.filled %= self.every
            return False
        return self.filled == self.every and self._read_window(self.window.tolist())

    def _read_window(self, rows: list[list[list[float]]]) -> bool:
        """Judge the iterations read from the window, in order; the first verdict stands."""
        self.filled = 0
        for abs_res, f_norm, _ in rows:
            verdict = self._verdict(_rel(abs_res, f_norm) if self.rel else abs_res, abs_res)
            if verdict is not None and self.status == "max_iter":
                self.status = verdict
        return self.status != "max_iter"

    def finish(self, name: str, z0_shape: torch.Size, workspace_bytes: int) -> tuple[Tensor, SolverStats]:
        workspace_bytes += self.workspace_bytes
        if self.fixed:
            abs_res = rel_res = math.nan
        else:
            if self.deferred:  # one read: what is left of the window, and the returned iterate's norms
                *rows, best = torch.cat((self.window[: self.filled], self.best_norms[None])).tolist()
                self._read_window(rows)  # empty if the solve stopped at a read
                self.best_abs, self.best_rel = best[0], _rel(best[0], best[1])
            abs_res, rel_res = _worst(self.best_abs), _worst(self.best_rel)
        best = rel_res if self.stop_mode == "rel" else abs_res
        trace_best = min(range(len(self.trace)), key=self.trace.__getitem__) if self.trace else -1
        if self.fixed:  # the latest iterate, or (deferred) the lowest-residual one, unknown here
            trace_best = -1 if self.deferred else len(self.trace) - 1
        stats = SolverStats(
            solver=name,
            nfe=self.nfe,
            abs_residual=abs_res,
            rel_residual=rel_res,
            converged=self.status == "converged" or best <= self.tol,
            status="converged" if best <= self.tol else self.status,
            stop_mode=self.stop_mode,
            tol=self.tol,
            trace=self.trace,
            workspace_bytes=workspace_bytes,
            best_step=trace_best + 1,
        )
        return self.best_z.view(z0_shape), stats


def _flat(f: Function, shape: torch.Size) -> Function:
    """f on (B, D) or (B, 1, D) views of tensors shaped like z0."""
    return lambda z: f(z.view(shape)).reshape(z.shape)


def fixed_point(
    f: Function, z0: Tensor, *, max_iter: int, tol: float, stop_mode: str, tau: float = 1.0,
    check_every: int = 1,
) -> tuple[Tensor, SolverStats]:
    """Damped fixed-point iteration z <- (1 - tau) z + tau f(z)."""
    z = z0.reshape(z0.shape[0], -1)
    f_flat, track = _flat(f, z0.shape), _Tracker(z, tol, stop_mode, check_every)
    for _ in range(max_iter):
        fz = f_flat(z)
        if track.update(z, fz, fz - z):
            break
        z = fz if tau == 1.0 else torch.lerp(z, fz, tau)
        del fz  # not needed while f runs
    return track.finish("fixed_point", z0.shape, 0)


class _Window:
    """Views into Anderson's buffers for one window size n, made once: a view costs as much as the
    arithmetic at small states. `slot(i)` adds those of the slot an iteration writes, reused every
    m iterations."""

    def __init__(self, F: Tensor, G: Tensor, A: Tensor, rhs: Tensor, ridge: Tensor, n: int):
        self.buffers, self.n = (F, G, A), n
        self.F, self.G = F.narrow(1, 0, n), G.narrow(1, 0, n)  # (B, n, D)
        self.G_t = self.G.mT  # (B, D, n)
        self.system = A.narrow(1, 0, n + 1).narrow(2, 0, n + 1)
        self.diag = self.system.diagonal(dim1=1, dim2=2)[:, None, 1:]  # (B, 1, n): ||g_i||^2
        self.rhs, self.ridge = rhs.narrow(1, 0, n + 1), ridge[: n + 1, : n + 1]
        self.slots: dict[int, tuple[Tensor, Tensor, Tensor, Tensor]] = {}

    def slot(self, i: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """f_i and g_i (B, 1, D), and row and column i of the Gram block, both as (B, 1, n)."""
        views = self.slots.get(i)
        if views is None:
            F, G, A = self.buffers
            row = A.narrow(1, 1 + i, 1).narrow(2, 1, self.n)
            col = A.narrow(2, 1 + i, 1).narrow(1, 1, self.n).mT
            views = self.slots[i] = (F.narrow(1, i, 1), G.narrow(1, i, 1), row, col)
        return views


def anderson(
    f: Function,
    z0: Tensor,
    *,
    max_iter: int,
    tol: float,
    stop_mode: str,
    m: int = 5,
    lam: float = 1e-4,
    beta: float = 1.0,
    check_every: int = 1,
) -> tuple[Tensor, SolverStats]:
    """Anderson acceleration with a window of m past iterates.

    The least-squares mixing weights solve min ||sum_i alpha_i g_i|| s.t. sum alpha = 1, with a
    ridge term lam * mean_i ||g_i||^2: relative to the residuals' own scale, so a backward solve
    on tiny gradients (a mean-reduced loss) mixes as well as one on large ones.
    """
    batch = z0.shape[0]
    z = z0.reshape(batch, 1, -1)  # (B, 1, D): rows, so each product is one bmm without reshapes
    dim = z.shape[2]
    f_flat, track = _flat(f, z0.shape), _Tracker(z, tol, stop_mode, check_every)
    F = z.new_zeros(batch, m, dim)  # f(z_i) for the window
    G = z.new_zeros(batch, m, dim)  # g_i = f(z_i) - z_i
    # Bordered normal equations [[0, 1^T], [1, G G^T + ridge]] in float64: tiny and ill-scaled.
    A = torch.zeros(batch, m + 1, m + 1, dtype=torch.float64, device=z.device)
    A[:, 0, 1:] = 1.0
    A[:, 1:, 0] = 1.0
    rhs = torch.zeros(batch, m + 1, 1, dtype=torch.float64, device=z.device)
    rhs[:, 0] = 1.0
    ridge = torch.eye(m + 1, dtype=torch.float64, device=z.device)
    ridge[0, 0] = 0.0
    windows: dict[int, _Window] = {}
    for k in range(max_iter):
        fz = f_flat(z)
        n = min(k + 1, m)
        w = windows.get(n)
        if w is None:
            w = windows[n] = _Window(F, G, A, rhs, ridge, n)
        f_slot, g_slot, row, col = w.slot(k % m)
        g = torch.sub(fz, z, out=g_slot)  # straight into the window: no second copy
        if track.update(z, fz, g):
            break
        f_slot.copy_(fz)
        # <g, g_i> for the window: one (1, D) x (D, n) GEMM per sample, widened as it is stored
        gram = torch.bmm(g, w.G_t)  # (B, 1, n)
        row.copy_(gram)
        col.copy_(gram)
        if n == 1:
            z = fz if beta == 1.0 else z + beta * g
            del fz  # in F now: not needed while f runs
            continue
        scale = w.diag.mean(2, keepdim=True).add_(1e-300)  # (B, 1, 1)
        system = torch.addcmul(w.system, scale, w.ridge, value=lam)
        # never raises; on a CPU its kernel checks the LU pivots with two reads of its own (CUDA's
        # does not), about a third of an Anderson iteration's overhead at small states
        solution = torch.linalg.solve_ex(system, w.rhs)[0]  # (B, n + 1, 1)
        alpha = solution.to(z.dtype).mT.narrow(2, 1, n)  # (B, 1, n): converted whole, then viewed
        # z_next = sum_i alpha_i (z_i + beta g_i) = alpha F - (1 - beta) alpha G
        z = torch.bmm(alpha, w.F)
        if beta != 1.0:
            z = z - (1.0 - beta) * torch.bmm(alpha, w.G)
        del fz, gram, system, solution, alpha  # not needed while f runs
    workspace = F.nbytes + G.nbytes + A.nbytes + rhs.nbytes
    return track.finish("anderson", z0.shape, workspace)


def broyden(
    f: Function,
    z0: Tensor,
    *,
    max_iter: int,
    tol: float,
    stop_mode: str,
    memory: int | None = None,
    check_every: int = 1,
) -> tuple[Tensor, SolverStats]:
    """Broyden's "good" method on g(z) = f(z) - z with a low-rank inverse Jacobian.

    J^-1 ~ -I + sum_i u_i v_i^T, the u_i and v_i kept in preallocated (B, memory, D) buffers
    (memory defaults to max_iter; older pairs are overwritten when it is smaller). That history
    is the memory a DEQ pays for Broyden: 2 * B * memory * D elements.

    An iteration passes over the history four times (dz . u_i, g . v_i, and the two sums they
    weight). The step dz that led to g was made as -J^-1 g_prev with the history as it stands,
    so J^-1 dg = J^-1 g + dz: the update's u, v . dg and v . g follow from the new step
    -J^-1 g and two dot products, with no pass for dg and none for the updated step.
    """
    batch = z0.shape[0]
    z = z0.reshape(batch, 1, -1)  # (B, 1, D): rows, so each product is one bmm without reshapes
    dim = z.shape[2]
    memory = max_iter if memory is None else memory
    f_flat, track = _flat(f, z0.shape), _Tracker(z, tol, stop_mode, check_every)
    # Only pairs already written are ever read: no need to zero the buffers (at paper sizes
    # they are hundreds of MB).
    U = z.new_empty(batch, memory, dim)
    V = z.new_empty(batch, memory, dim)

    fz = f_flat(z)
    g = fz - z
    stop = track.update(z, fz, g)
    dz = g  # the step: -J^-1 g with J^-1 = -I
    n = 0  # pairs stored
    while not stop and track.nfe < max_iter:
        z = z + dz
        del fz, g  # not needed while f runs (the tracker keeps what it needs)
        fz = f_flat(z)
        g = fz - z
        stop = track.update(z, fz, g)
        if stop or track.nfe >= max_iter:
            break
        dz = _broyden_update(U, V, n, dz, g)
        n += 1
    return track.finish("broyden", z0.shape, U.nbytes + V.nbytes)


def _broyden_update(U: Tensor, V: Tensor, n: int, dz: Tensor, g: Tensor) -> Tensor:
    """Store pair n + 1 for the step dz that led to residual g; return the next step -J^-1 g.

    Its temporaries die on return, before the next call of f (which, in a backward solve, is a
    VJP holding the graph: the moment a DEQ's memory peaks)."""
    memory = U.shape[1]
    k, slot, wraps = min(n, memory), n % memory, n >= memory
    u_slot, v_slot = U.narrow(1, slot, 1), V.narrow(1, slot, 1)  # (B, 1, D)
    if k:
        Uk, Vk = U.narrow(1, 0, k), V.narrow(1, 0, k)  # (B, k, D)
        dzU = torch.bmm(dz, Uk.mT)  # (B, 1, k): dz . u_i
        gV = torch.bmm(g, Vk.mT)  # (B, 1, k): v_i . g
        # v^T = dz^T J^-1 = -dz^T + (dz . u_i) v_i^T. Computed apart and copied: a bmm into a
        # strided slot computes apart and copies anyway, and the slot may still be read.
        v = torch.baddbmm(dz, dzU, Vk, beta=-1)
        step = torch.baddbmm(g, gV, Uk, alpha=-1)  # -J^-1 g = g - u_i (v_i . g)
    else:
        v, step = torch.neg(dz), g
    # dz - J^-1 dg = step, v . dg = dz . (dz - step), v . g = -dz . step
    dz_t = dz.mT
    dz_step = torch.bmm(step, dz_t)  # (B, 1, 1)
    v_dg = torch.baddbmm(dz_step, dz, dz_t, beta=-1)
    # A vanishing v . dg (its reciprocal overflows) means no information: skip the update (u = 0).
    inverse = v_dg.reciprocal_().nan_to_num_(0.0, 0.0, 0.0)
    new_step = step
    if wraps:  # the pair in `slot` leaves the history: take its term out of the step
        new_step = torch.addcmul(step, u_slot, gV.narrow(2, slot, 1))
    v_slot.copy_(v)
    torch.mul(step, inverse, out=u_slot)  # u = (dz - J^-1 dg) / (v . dg)
    # the step with the new pair: -J^-1 g - u (v . g)
    return torch.addcmul(new_step, u_slot, dz_step)


SOLVERS: dict[str, Callable[..., tuple[Tensor, SolverStats]]] = {}


def register_solver(name: str, fn: Callable[..., tuple[Tensor, SolverStats]]) -> None:
    SOLVERS[name] = fn


register_solver("broyden", broyden)
register_solver("anderson", anderson)
register_solver("fixed_point", fixed_point)


def check_solver(name: str) -> str:
    if name not in SOLVERS:
        raise ValueError(f"unknown solver {name!r}; valid solvers: {', '.join(sorted(SOLVERS))}")
    return name


def check_stop_mode(stop_mode: str) -> str:
    if stop_mode not in STOP_MODES:
        raise ValueError(f"unknown stop_mode {stop_mode!r}; valid: {', '.join(STOP_MODES)}")
    return stop_mode


def solver_options(name: str) -> tuple[str, ...]:
    """Keyword options a solver accepts beyond the common ones."""
    code = SOLVERS[check_solver(name)].__code__
    names = code.co_varnames[code.co_argcount : code.co_argcount + code.co_kwonlyargcount]
    return tuple(n for n in names if n not in ("max_iter", "tol", "stop_mode"))


def check_options(name: str, options: dict[str, float] | None) -> dict[str, float]:
    """Solver options, refusing unknown keys (never silently ignored)."""
    options = dict(options or {})
    unknown = set(options) - set(solver_options(name))
    if unknown:
        raise ValueError(
            f"solver {name!r} has no option(s) {sorted(unknown)}; "
            f"valid: {list(solver_options(name)) or 'none'}"
        )
    every = options.get("check_every", 1)
    if not isinstance(every, int) or every < 1:
        raise ValueError(f"check_every must be an integer >= 1, got {every!r}")
    return options


def solve(
    f: Function,
    z0: Tensor,
    *,
    solver: str = "broyden",
    max_iter: int = 30,
    tol: float = 1e-4,
    stop_mode: str = "rel",
    **options: float,
) -> tuple[Tensor, SolverStats]:
    """Find z = f(z) from z0 (shape (B, ...)); see the module docstring."""
    check_solver(solver)
    check_stop_mode(stop_mode)
    check_options(solver, options)
    if max_iter < 1:
        raise ValueError(f"max_iter must be >= 1, got {max_iter}")
    with torch.no_grad():
        return SOLVERS[solver](f, z0, max_iter=max_iter, tol=tol, stop_mode=stop_mode, **options)
