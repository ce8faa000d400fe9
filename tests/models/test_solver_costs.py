"""What a solve costs besides f, held exactly: host reads (GPU syncs) and passes over Broyden's
history (issue 18). The timings live in `python -m bench.perf.solvers`."""

import math
import warnings

import pytest
import torch

from bench.perf.counting import HistoryReads, HostReads
from models.deq import DEQ, DEQSettings
from models.solvers import SOLVERS, UNSTOPPABLE_CHECK_EVERY, fixed_iterations, solve
from tests.models import reference_solvers as reference
from tests.models.cells import MLPCell, contraction


def _reads(f, z0, solver, **kwargs) -> tuple[int, object]:
    with HostReads() as reads:
        _, stats = solve(f, z0, solver=solver, **kwargs)
    return reads.count, stats


@pytest.mark.parametrize("solver", sorted(SOLVERS))
def test_host_reads_per_regime(solver):
    f, z0, _, _ = contraction(d=24, batch=3, norm=0.95, dtype=torch.float32)
    count, stats = _reads(f, z0, solver, max_iter=200, tol=1e-6)
    assert count == stats.nfe  # one per iteration, none more
    for k in (3, 7):
        count, stats = _reads(f, z0, solver, max_iter=200, tol=1e-6, check_every=k)
        assert count == stats.nfe // k + 1  # one per k iterations and one at the end
    for tol in (0.0, -1.0):  # nothing to converge to: reads only to watch for divergence
        count, stats = _reads(f, z0, solver, max_iter=40, tol=tol)
        assert stats.nfe == 40 and count == 40 // UNSTOPPABLE_CHECK_EVERY + 1
    with fixed_iterations():
        count, stats = _reads(f, z0, solver, max_iter=40, tol=1e-6)
    assert stats.nfe == 40 and count == 0


def test_host_reads_counter_sees_every_kind_of_read():
    t = torch.ones(3)
    with HostReads() as reads:
        t.tolist()
        float(t.sum())
        bool(t[0] > 0)
    assert reads.count == 3


def test_deq_step_without_host_reads():
    """A whole training step (forward solve, implicit backward solve) under fixed_iterations()
    never reads the device; with tol <= 0, once per solve of fewer than 16 iterations."""
    torch.manual_seed(0)
    cell, x = MLPCell(d=16, hidden=32), torch.randn(2, 8, 16)
    for solver in sorted(SOLVERS):
        deq = DEQ(solver=solver, max_iter=12, b_max_iter=12, tol=0.0, b_tol=0.0)
        with HostReads() as reads:
            z, stats = deq(lambda z: cell(z, x), torch.zeros_like(x))
            z.square().mean().backward()
        assert (stats.nfe_forward, stats.nfe_backward, reads.count) == (12, 12, 2), solver
        with fixed_iterations(), HostReads() as reads:
            z, stats = deq(lambda z: cell(z, x), torch.zeros_like(x))
            z.square().mean().backward()
        assert (stats.nfe_forward, stats.nfe_backward, reads.count) == (12, 12, 0), solver


@pytest.mark.parametrize("solver", sorted(SOLVERS))
@pytest.mark.parametrize("k", [2, 5])
def test_check_every_stops_at_most_k_minus_one_late(solver, k):
    f, z0, _, _ = contraction(d=32, batch=4, norm=0.95, dtype=torch.float64)
    _, every = solve(f, z0, solver=solver, max_iter=300, tol=1e-9)
    z, late = solve(f, z0, solver=solver, max_iter=300, tol=1e-9, check_every=k)
    assert every.nfe <= late.nfe < every.nfe + k and late.nfe % k == 0
    assert late.converged and late.status == "converged" and late.residual <= 1e-9
    assert late.nfe == len(late.trace) and late.trace[: every.nfe] == pytest.approx(every.trace)
    # the lowest-residual iterate of all those computed, kept on the device between reads
    assert late.residual == pytest.approx(min(late.trace)) and late.best_step == 1 + min(
        range(late.nfe), key=late.trace.__getitem__)
    fz = f(z).detach()
    assert ((fz - z).norm(dim=1) / fz.norm(dim=1)).max().item() == pytest.approx(late.residual, rel=1e-5)


@pytest.mark.parametrize("solver", sorted(SOLVERS))
def test_unstoppable_tolerance_returns_what_per_iteration_checks_return(solver):
    """tol <= 0: the deferred bookkeeping keeps the same lowest-residual iterate and trace as
    the old per-iteration reads (the old solvers, which read every iteration, as reference)."""
    f, z0, _, _ = contraction(d=32, batch=4, norm=0.95, dtype=torch.float64)
    for max_iter in (5, 37):
        z, stats = solve(f, z0, solver=solver, max_iter=max_iter, tol=0.0)
        z_ref, ref = reference.solve(f, z0, solver=solver, max_iter=max_iter, tol=0.0)
        assert (stats.nfe, stats.status, stats.best_step) == (ref.nfe, ref.status, ref.best_step)
        assert stats.trace == pytest.approx(ref.trace, rel=1e-6)
        assert stats.residual == pytest.approx(ref.residual, rel=1e-6)
        torch.testing.assert_close(z, z_ref, rtol=1e-9, atol=0.0)


@pytest.mark.parametrize("solver", sorted(SOLVERS))
def test_deferred_checks_still_catch_divergence_and_nan(solver):
    z, stats = solve(lambda z: 2.0 * z + 1.0, torch.zeros(3, 5), solver="fixed_point", max_iter=100,
                     tol=1e-4, check_every=4)
    assert stats.status == "diverged" and stats.nfe < 100 and stats.nfe % 4 == 0
    assert torch.isfinite(z).all()
    calls = [0]

    def f(z):
        calls[0] += 1
        return torch.full_like(z, math.nan) if calls[0] > 2 else 0.5 * z + 1.0

    z, stats = solve(f, torch.zeros(2, 4), solver=solver, max_iter=50, tol=0.0)
    assert stats.status == "diverged" and not stats.converged and stats.nfe == UNSTOPPABLE_CHECK_EVERY
    assert torch.isfinite(z).all() and math.isfinite(stats.abs_residual)


def test_check_every_is_validated_and_threaded_through_deq_settings():
    for bad in (0, -2, 1.5):
        with pytest.raises(ValueError, match="check_every"):
            DEQ(solver_options={"check_every": bad})
    deq = DEQ.from_config(DEQSettings(solver="broyden", b_solver="anderson", check_every=3))
    assert deq.solver_options == {"check_every": 3}
    assert deq.b_solver_options == {"m": 5, "check_every": 3}
    assert DEQ.from_config(DEQSettings()).solver_options == {}  # default 1: nothing passed


@pytest.mark.parametrize("memory", [None, 5])
def test_broyden_passes_over_its_history_four_times_an_iteration(memory):
    f, z0, _, _ = contraction(d=24, batch=2, norm=0.95, dtype=torch.float32)
    counts = {}
    for n in (12, 24):
        options = {} if memory is None else {"memory": memory}
        with HistoryReads(2, memory or n, 24) as counter:
            _, stats = solve(f, z0, solver="broyden", max_iter=n, tol=0.0, **options)
        assert stats.nfe == n
        counts[n] = (counter.passes, counter.row_reads)
    passes, rows = ((counts[24][i] - counts[12][i]) / 12 for i in range(2))
    assert passes == 4  # was 6 before issue 18
    assert rows == (1 if memory is None else 2)  # the new u read back (+ the pair leaving)


def test_history_counter_counts_six_passes_in_the_old_broyden():
    f, z0, _, _ = contraction(d=24, batch=2, dtype=torch.float32)
    counts = []
    for n in (12, 24):
        with HistoryReads(2, n, 24) as counter:
            _, stats = reference.solve(f, z0, solver="broyden", max_iter=n, tol=-1.0)
        assert stats.nfe == n
        counts.append(counter.passes)
    assert (counts[1] - counts[0]) / 12 == 6


@pytest.mark.gpu
@pytest.mark.parametrize("solver", sorted(SOLVERS))
def test_no_cuda_sync_under_fixed_iterations(solver):
    z0 = torch.zeros(4, 64, device="cuda")
    W = torch.randn(64, 64, device="cuda") * 0.05
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught, fixed_iterations():
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            solve(lambda z: torch.tanh(z @ W + 1.0), z0, solver=solver, max_iter=10)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert not [w for w in caught if "synchroniz" in str(w.message)]


def test_check_every_from_a_model_config():
    """The DEQ models take check_every as a config field, like every DEQSettings field."""
    from models import build_model

    x, direction = torch.randn(2, 8, 32), torch.randn(2, 8, 32)
    reads, grads = {}, {}
    for k in (1, 4):
        torch.manual_seed(0)  # the same weights
        model = build_model("deq-transformer", "debug", mode="core", check_every=k)
        assert model.deq.solver_options == ({} if k == 1 else {"check_every": 4})
        with HostReads() as counter:
            out, stats = model(x)
            (out * direction).sum().backward()  # (LN outputs make mean(z^2) nearly flat)
        reads[k] = (counter.count, stats.nfe_forward + stats.nfe_backward)
        grads[k] = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert reads[1][0] == reads[1][1]  # one read per iteration
    assert reads[4][0] <= reads[4][1] // 4 + 2  # one per 4 iterations and one per solve
    # a few more iterations at most: the same gradient to the solvers' tolerance
    assert ((grads[4] - grads[1]).norm() / grads[1].norm()).item() < 1e-3
