"""The solvers as they were before issue 18 (commit 9ccf73f), kept verbatim as a slow reference:
the parity tests run both on the same maps and hold NFE, traces and iterates equal."""
from __future__ import annotations

import contextlib
import contextvars
import math
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
    best_step: int = 0  # f call whose iterate was returned (1-based)

    @property
    def residual(self) -> float:
        return self.rel_residual if self.stop_mode == "rel" else self.abs_residual


class _Tracker:
    """Residuals, lowest-residual iterate, stopping and divergence; shared by every solver."""

    def __init__(self, z0: Tensor, tol: float, stop_mode: str) -> None:
        self.tol, self.stop_mode = tol, stop_mode
        batch = z0.shape[0]
        # The lowest-residual iterate, (B, D). Solvers never write into an iterate after handing
        # it over, so while every sample improves this is a reference, not a copy.
        self.best_z = z0
        inf = torch.full((batch,), math.inf, device=z0.device, dtype=torch.float32)
        self.best_abs, self.best_rel = inf.clone(), inf.clone()  # (B,)
        self.trace: list[float] = []
        self.nfe = 0
        self.status = "max_iter"
        self.first_abs: float | None = None
        self.fixed = _FIXED_ITERATIONS.get()

    @property
    def workspace_bytes(self) -> int:
        return self.best_z.nbytes + self.best_abs.nbytes + self.best_rel.nbytes

    def update(self, z: Tensor, fz: Tensor, g: Tensor) -> bool:
        """Record iterate z with f(z)=fz and g=fz-z; return True when the solve should stop."""
        self.nfe += 1
        abs_res = g.float().norm(dim=1)
        rel_res = abs_res / (fz.float().norm(dim=1) + _NORM_EPS)
        res = rel_res if self.stop_mode == "rel" else abs_res
        best = self.best_rel if self.stop_mode == "rel" else self.best_abs
        if self.fixed:  # no host reads: keep the latest iterate (residuals are not looked at)
            self.best_z, self.best_abs, self.best_rel = z, abs_res, rel_res
            self.trace.append(math.nan)
            return False
        improved = res < best  # NaN never improves
        # One host sync per iteration. Divergence is judged on abs: rel saturates as z blows up.
        worst, worst_abs, all_improved = torch.stack(
            (res.max(), abs_res.max(), improved.all().to(res.dtype))).tolist()
        if all_improved:
            self.best_z, self.best_abs, self.best_rel = z, abs_res, rel_res
        else:  # some samples got worse: keep their earlier iterates
            self.best_z = torch.where(improved[:, None], z, self.best_z)
            self.best_abs = torch.where(improved, abs_res, self.best_abs)
            self.best_rel = torch.where(improved, rel_res, self.best_rel)
        self.trace.append(worst)
        if self.first_abs is None:
            self.first_abs = worst_abs
        if not math.isfinite(worst) or worst_abs > DIVERGENCE_RATIO * max(self.first_abs, 1e-30):
            self.status = "diverged"
            return True
        if worst <= self.tol:
            self.status = "converged"
            return True
        return False

    def finish(self, name: str, z0_shape: torch.Size, workspace_bytes: int) -> tuple[Tensor, SolverStats]:
        if self.fixed:
            abs_res = rel_res = math.nan
        else:
            abs_res, rel_res = torch.stack((self.best_abs.max(), self.best_rel.max())).tolist()
        best = rel_res if self.stop_mode == "rel" else abs_res
        trace_best = min(range(len(self.trace)), key=self.trace.__getitem__) if self.trace else -1
        if self.fixed:
            trace_best = len(self.trace) - 1
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
            workspace_bytes=workspace_bytes + self.workspace_bytes,
            best_step=trace_best + 1,
        )
        return self.best_z.view(z0_shape), stats


def _flat(f: Function, shape: torch.Size) -> Function:
    """f on (B, D) views of tensors shaped like z0."""
    return lambda z: f(z.view(shape)).reshape(z.shape)


def fixed_point(
    f: Function, z0: Tensor, *, max_iter: int, tol: float, stop_mode: str, tau: float = 1.0
) -> tuple[Tensor, SolverStats]:
    """Damped fixed-point iteration z <- (1 - tau) z + tau f(z)."""
    z = z0.reshape(z0.shape[0], -1)
    f_flat, track = _flat(f, z0.shape), _Tracker(z, tol, stop_mode)
    for _ in range(max_iter):
        fz = f_flat(z)
        if track.update(z, fz, fz - z):
            break
        z = fz if tau == 1.0 else torch.lerp(z, fz, tau)
    return track.finish("fixed_point", z0.shape, 0)


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
) -> tuple[Tensor, SolverStats]:
    """Anderson acceleration with a window of m past iterates.

    The least-squares mixing weights solve min ||sum_i alpha_i g_i|| s.t. sum alpha = 1, with a
    ridge term lam * mean_i ||g_i||^2: relative to the residuals' own scale, so a backward solve
    on tiny gradients (a mean-reduced loss) mixes as well as one on large ones.
    """
    z = z0.reshape(z0.shape[0], -1)
    batch, dim = z.shape
    f_flat, track = _flat(f, z0.shape), _Tracker(z, tol, stop_mode)
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
    for k in range(max_iter):
        fz = f_flat(z)
        slot, n = k % m, min(k + 1, m)
        g = torch.sub(fz, z, out=G[:, slot])  # straight into the window: no second copy
        if track.update(z, fz, g):
            break
        F[:, slot] = fz
        # <g, g_i> for the window; as (1, D) x (D, n) it is one cheap GEMM per sample.
        gram_row = torch.bmm(g.unsqueeze(1), G[:, :n].transpose(1, 2)).squeeze(1).double()  # (B, n)
        A[:, 1 + slot, 1 : n + 1] = gram_row
        A[:, 1 : n + 1, 1 + slot] = gram_row
        if n == 1:
            z = fz if beta == 1.0 else z + beta * g
            continue
        system = A[:, : n + 1, : n + 1]
        scale = torch.diagonal(system, dim1=1, dim2=2)[:, 1:].mean(1) + 1e-300  # (B,)
        system = system + (lam * scale)[:, None, None] * ridge[: n + 1, : n + 1]
        alpha = torch.linalg.solve(system, rhs[:, : n + 1])[:, 1:, 0].to(z.dtype)  # (B, n)
        alpha = alpha.unsqueeze(1)  # (B, 1, n)
        # z_next = sum_i alpha_i (z_i + beta g_i) = alpha F - (1 - beta) alpha G
        z = torch.bmm(alpha, F[:, :n]).squeeze(1)
        if beta != 1.0:
            z = z - (1.0 - beta) * torch.bmm(alpha, G[:, :n]).squeeze(1)
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
) -> tuple[Tensor, SolverStats]:
    """Broyden's "good" method on g(z) = f(z) - z with a low-rank inverse Jacobian.

    J^-1 ~ -I + sum_i u_i v_i^T, the u_i and v_i kept in preallocated (B, memory, D) buffers
    (memory defaults to max_iter; older pairs are overwritten when it is smaller). That history
    is the memory a DEQ pays for Broyden: 2 * B * memory * D elements.
    """
    z = z0.reshape(z0.shape[0], -1)
    batch, dim = z.shape
    memory = max_iter if memory is None else memory
    f_flat, track = _flat(f, z0.shape), _Tracker(z, tol, stop_mode)
    U = z.new_zeros(batch, memory, dim)
    V = z.new_zeros(batch, memory, dim)
    tiny = torch.finfo(z.dtype).tiny

    fz = f_flat(z)
    g = fz - z
    stop = track.update(z, fz, g)
    step = g  # -J^-1 g with J^-1 = -I
    n = 0  # pairs stored
    while not stop and track.nfe < max_iter:
        z = z + step
        fz = f_flat(z)
        g_new = fz - z
        stop = track.update(z, fz, g_new)
        if stop or track.nfe >= max_iter:
            break
        dg = g_new - g
        g = g_new
        k = min(n, memory)
        Uk, Vk = U[:, :k], V[:, :k]
        dz = step.unsqueeze(1)  # (B, 1, D)
        # v^T = dz^T J^-1 = -dz^T + (dz . u_i) v_i^T
        vT = torch.baddbmm(dz, torch.bmm(dz, Uk.transpose(1, 2)), Vk, beta=-1)  # (B, 1, D)
        # J^-1 dg = -dg + u_i (v_i . dg)
        dg3 = dg.unsqueeze(1)
        jdg = torch.baddbmm(dg3, torch.bmm(dg3, Vk.transpose(1, 2)), Uk, beta=-1)
        denom = torch.bmm(vT, dg3.transpose(1, 2))  # (B, 1, 1)
        # A vanishing denominator means no information in this step: skip its update (u = 0).
        denom = torch.where(denom.abs() > tiny, denom, torch.full_like(denom, math.inf))
        u = (dz - jdg) / denom
        slot = n % memory
        U[:, slot] = u.squeeze(1)
        V[:, slot] = vT.squeeze(1)
        n += 1
        k = min(n, memory)
        Uk, Vk = U[:, :k], V[:, :k]
        g3 = g.unsqueeze(1)
        # step = -J^-1 g = g - u_i (v_i . g)
        step = torch.baddbmm(g3, torch.bmm(g3, Vk.transpose(1, 2)), Uk, alpha=-1).squeeze(1)
    return track.finish("broyden", z0.shape, U.nbytes + V.nbytes)


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
