
import pytest
import torch

from bench.measure.tracked import LiveTensorCounter
from models.deq import BACKWARDS, DEQ
from models.solvers import SOLVERS
from tests.models.cells import MLPCell, contraction


def _grads(deq: DEQ, dtype, loss_kind: str = "mse", batch: int = 4, d: int = 32):
    f, z0, params, x = contraction(d=d, batch=batch, dtype=dtype)
    z, stats = deq(f, z0)
    target = torch.randn(z.shape, dtype=dtype, generator=torch.Generator().manual_seed(1))
    # "mean-large": a mean over a large tensor, so gradients are of order 1 / numel
    loss = ((z - target) ** 2).sum() if loss_kind == "mse" else (z * target).mean()
    loss.backward()
    return [t.grad.clone() for t in (*params, x)], stats


def _max_rel_err(grads, ref):
    return max(((g - r).norm() / r.norm()).item() for g, r in zip(grads, ref, strict=True))


REFERENCE = dict(backward="unrolled", max_iter=500, tol=0.0)


@pytest.mark.parametrize("solver", sorted(SOLVERS))
def test_implicit_gradient_matches_unrolled_float64(solver):
    ref, _ = _grads(DEQ(**REFERENCE), torch.float64)
    tight = dict(tol=1e-12, b_tol=1e-12, max_iter=300, b_max_iter=300)
    grads, stats = _grads(DEQ(solver=solver, b_solver=solver, **tight), torch.float64)
    assert _max_rel_err(grads, ref) <= 1e-6
    assert stats.nfe_backward is not None and stats.nfe_backward > 0
    assert stats.backward.converged and stats.residual_backward <= 1e-12


@pytest.mark.parametrize("b_solver", sorted(SOLVERS))
@pytest.mark.parametrize("loss_kind", ["mse", "mean-large"])
def test_implicit_gradient_float32_default_tolerances(b_solver, loss_kind):
    # "mean-large": batch 64 x d 256 and a mean loss, so dL/dz ~ 6e-5 per element
    shape = dict(batch=64, d=256) if loss_kind == "mean-large" else {}
    ref, _ = _grads(DEQ(**REFERENCE), torch.float32, loss_kind, **shape)
    grads, stats = _grads(DEQ(b_solver=b_solver), torch.float32, loss_kind, **shape)
    assert _max_rel_err(grads, ref) <= 1e-3
    assert stats.forward.converged


def test_phantom_one_step_is_jacobian_free():
    f, z0, (W, _, _, ), _ = contraction()
    z, stats = DEQ(backward="phantom", phantom_steps=1)(f, z0)
    z.sum().backward()
    jfb = W.grad.clone()
    W.grad = None
    z_star, _ = DEQ().solve_forward(f, z0)
    f(z_star.detach()).sum().backward()  # one application from z*, by hand
    torch.testing.assert_close(jfb, W.grad)
    assert stats.nfe_backward == 1


def test_phantom_many_damped_steps_approach_implicit():
    ref, _ = _grads(DEQ(**REFERENCE), torch.float64)
    few, _ = _grads(DEQ(backward="phantom", phantom_steps=2, tol=1e-10), torch.float64)
    many, _ = _grads(DEQ(backward="phantom", phantom_steps=60, phantom_tau=0.8, tol=1e-10), torch.float64)
    assert _max_rel_err(many, ref) < 1e-4 < _max_rel_err(few, ref)


def test_no_grad_and_batch_one():
    f, z0, params, _ = contraction(batch=1)
    with torch.no_grad():
        z, stats = DEQ()(f, z0)
    assert not z.requires_grad and z.shape == (1, 32)
    assert stats.nfe_backward is None and stats.forward.converged
    z, stats = DEQ()(f, z0)
    z.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in params)


def test_implicit_backward_twice_with_retained_graph():
    f, z0, (W, _, _), _ = contraction()
    z, _ = DEQ(tol=1e-10, b_tol=1e-10)(f, z0)
    z.sum().backward(retain_graph=True)
    once = W.grad.clone()
    z.sum().backward()
    torch.testing.assert_close(W.grad, 2 * once)


def test_non_contractive_cell_reports_diverged():
    x = torch.ones(2, 8, requires_grad=True)
    z, stats = DEQ(solver="fixed_point", max_iter=200)(lambda z: 2.0 * z + x, torch.zeros(2, 8))
    assert stats.forward.status == "diverged" and not stats.forward.converged and stats.diverged
    assert torch.isfinite(z).all()


def test_unknown_names_list_valid_choices():
    with pytest.raises(ValueError, match="implicit, phantom, unrolled"):
        DEQ(backward="adjoint")
    with pytest.raises(ValueError, match="broyden"):
        DEQ(b_solver="lbfgs")
    with pytest.raises(ValueError, match="stop_mode"):
        DEQ(stop_mode="max")
    assert set(BACKWARDS) == {"implicit", "phantom", "unrolled"}


B, T, D, HIDDEN = 4, 16, 32, 256


def _train_step_peak(deq: DEQ) -> tuple[int, object]:
    """Tracked peak bytes of a training step (forward, backward, Adam) on a (B, T, D) cell."""
    torch.manual_seed(0)
    cell = MLPCell(d=D, hidden=HIDDEN)
    x = torch.randn(B, T, D)
    opt = torch.optim.Adam(cell.parameters())
    cell(x, x).sum().backward()  # materialise grads and optimizer state: static memory
    opt.step()
    counter = LiveTensorCounter()
    counter.track(cell, x, opt)
    with counter:
        z, stats = deq(lambda z: cell(z, x), torch.zeros_like(x))
        z.square().mean().backward()
        opt.step()
        del z
    return counter.peak_bytes, stats


@pytest.mark.parametrize("solver", ["fixed_point", "anderson"])
def test_implicit_memory_independent_of_iterations(solver):
    peaks = [_train_step_peak(DEQ(solver=solver, max_iter=n, tol=0.0, b_max_iter=n, b_tol=0.0))[0]
             for n in (10, 100)]
    assert peaks[0] == peaks[1]


@pytest.mark.parametrize("solver", ["fixed_point", "anderson", "broyden"])
def test_implicit_memory_over_jacobian_free_is_bounded(solver):
    """Implicit pays, over JFB, only for what the adjoint solve must hold while its VJPs run on
    the retained graph: the backward solver's workspace, a few state-sized vectors (iterate,
    dL/dz, VJP output) and one hidden activation that plain backprop would already have freed.
    A second copy of f's graph (recomputing f in backward) would break this bound."""
    implicit, stats = _train_step_peak(DEQ(solver=solver, max_iter=10, tol=0.0, b_max_iter=10, b_tol=0.0))
    jfb, _ = _train_step_peak(DEQ(solver=solver, backward="phantom", max_iter=10, tol=0.0))
    state, hidden = B * T * D * 4, B * T * HIDDEN * 4
    assert 0 <= implicit - jfb <= stats.backward.workspace_bytes + 4 * state + hidden


def test_unrolled_memory_grows_linearly_with_iterations():
    peaks = {n: _train_step_peak(DEQ(backward="unrolled", max_iter=n, tol=0.0))[0] for n in (10, 20, 40)}
    per_iter = (peaks[40] - peaks[20]) / 20
    assert per_iter == pytest.approx((peaks[20] - peaks[10]) / 10, rel=0.02)
    assert per_iter >= B * T * HIDDEN * 4  # at least the hidden activation of every iteration
    implicit, _ = _train_step_peak(DEQ(max_iter=40, tol=0.0))
    assert peaks[40] > 3 * implicit


def test_from_config_passes_solver_memory_options():
    from models.deq import DEQSettings

    deq = DEQ.from_config(DEQSettings(solver="broyden", b_solver="anderson", broyden_memory=6, anderson_m=3))
    assert deq.solver_options == {"memory": 6} and deq.b_solver_options == {"m": 3}
    f, z0, _, _ = contraction(dtype=torch.float32)
    _, few = DEQ.from_config(DEQSettings(broyden_memory=4, max_iter=30, tol=0.0)).solve_forward(f, z0)
    _, all_ = DEQ.from_config(DEQSettings(max_iter=30, tol=0.0)).solve_forward(f, z0)
    history = 2 * z0.numel() * 4  # one (u, v) pair of (B, D) float32
    assert all_.workspace_bytes - few.workspace_bytes == (30 - 4) * history
