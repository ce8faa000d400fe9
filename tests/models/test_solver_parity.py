"""Issue 18's rewrite of the solvers' inner loops changes their cost, not their results.

Two references: the solvers as they were (`reference_solvers.py`, verbatim), run on the same
maps, and golden NFE and gradients of the debug DEQs computed by them (`golden_solvers.json`).
Fixed point and Anderson do the same arithmetic as before and match bit for bit; Broyden's
algebra is rearranged (fewer passes over its history), so its iterates match to rounding and its
NFE exactly in float64; in float32 the golden models' NFE match and gradients agree to 1e-5."""

import json

import pytest
import torch

from models.solvers import fixed_iterations, solve
from tests.models import reference_solvers as reference
from tests.models.cells import contraction, slow_contraction
from tests.models.golden_solvers import CASES, PATH, case_id, record

SETUPS = [
    ("fixed_point", {}),
    ("fixed_point", {"tau": 0.6}),
    ("anderson", {}),
    ("anderson", {"m": 3, "beta": 0.7}),
    ("broyden", {}),
    ("broyden", {"memory": 4}),  # the history wraps around
]


def _both(f, z0, solver, options, **kwargs):
    return (solve(f, z0, solver=solver, **kwargs, **options),
            reference.solve(f, z0, solver=solver, **kwargs, **options))


@pytest.mark.parametrize(("solver", "options"), SETUPS)
@pytest.mark.parametrize("stop_mode", ["abs", "rel"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_same_solve_as_before(solver, options, stop_mode, dtype):
    tol = 1e-6 if dtype == torch.float32 else 1e-11
    for seed in range(3):
        f, z0, _, _ = contraction(d=40, batch=3, norm=0.95, dtype=dtype, seed=seed)
        (z, stats), (z_ref, ref) = _both(f, z0, solver, options, max_iter=60, tol=tol, stop_mode=stop_mode)
        if solver != "broyden":  # the same arithmetic: the same bits
            assert torch.equal(z, z_ref) and stats.trace == ref.trace
        elif dtype == torch.float64:
            assert stats.nfe == ref.nfe
            torch.testing.assert_close(z, z_ref, rtol=1e-12, atol=0)
        else:  # float32 Broyden: rounding may move the step where tol is crossed by one
            assert abs(stats.nfe - ref.nfe) <= 1
            torch.testing.assert_close(z, z_ref, rtol=1e-5, atol=1e-6)
        assert (stats.status, stats.workspace_bytes) == (ref.status, ref.workspace_bytes)


@pytest.mark.parametrize("solver", ["broyden", "anderson"])
def test_same_nfe_on_a_slow_map_and_at_max_iter(solver):
    f, z0 = slow_contraction(norm=0.97)
    # Broyden's rounding differences grow by the map's conditioning (1 / (1 - 0.97)) over ~60
    # steps: the iterates agree to well within their distance from the fixed point
    rtol = 0.0 if solver == "anderson" else 1e-6
    (z, stats), (z_ref, ref) = _both(f, z0, solver, {}, max_iter=300, tol=1e-9, stop_mode="rel")
    assert stats.nfe == ref.nfe and stats.best_step == ref.best_step
    torch.testing.assert_close(z, z_ref, rtol=rtol, atol=0.0)
    # stopped by the cap, with the lowest-residual iterate returned
    (z, stats), (z_ref, ref) = _both(f, z0, solver, {}, max_iter=9, tol=1e-9, stop_mode="rel")
    assert stats.status == ref.status == "max_iter" and stats.best_step == ref.best_step
    torch.testing.assert_close(z, z_ref, rtol=rtol, atol=0.0)


def test_fixed_iterations_as_before():
    f, z0, _, _ = contraction(dtype=torch.float32)
    for solver in ("fixed_point", "anderson", "broyden"):
        with fixed_iterations():
            z, stats = solve(f, z0, solver=solver, max_iter=6, tol=1.0)
        with reference.fixed_iterations():
            z_ref, ref = reference.solve(f, z0, solver=solver, max_iter=6, tol=1.0)
        assert stats.nfe == ref.nfe == 6 and stats.workspace_bytes == ref.workspace_bytes
        torch.testing.assert_close(z, z_ref, rtol=1e-5, atol=1e-6)


GOLDEN = json.loads(PATH.read_text())


@pytest.mark.parametrize(("model", "overrides"), CASES, ids=[case_id(m, o) for m, o in CASES])
def test_debug_deq_nfe_and_gradients_as_before(model, overrides):
    now, before = record(model, overrides), GOLDEN[case_id(model, overrides)]
    assert (now["nfe_forward"], now["nfe_backward"]) == (before["nfe_forward"], before["nfe_backward"])
    for key in ("grad_norm", "grad_projection"):
        for name, value in before[key].items():
            assert now[key][name] == pytest.approx(value, rel=1e-5, abs=1e-9), (key, name)
    assert now["output_projection"] == pytest.approx(before["output_projection"], rel=1e-5)
    # residuals of the returned iterates, near float32's floor: close, not equal
    assert now["residual_forward"] == pytest.approx(before["residual_forward"], rel=0.05)
    assert now["residual_backward"] == pytest.approx(before["residual_backward"], rel=0.05)
