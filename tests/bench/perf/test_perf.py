"""The bench.perf benchmarks run, and their exact counts hold (timings are their job, not ours)."""

import pytest
import torch

from bench.perf import deq_step, solvers


def test_solver_benchmark_runs_and_counts(capsys):
    assert solvers.main(["--repeats", "3", "--iters", "8", "--dim", "64", "--skip-bandwidth"]) == 0
    out = capsys.readouterr().out
    assert "broyden / fixed_point overhead per iteration" in out and "1 intra-op thread" in out
    assert solvers.history_reads() == (4, 1)
    assert solvers.history_reads(memory=5) == (4, 2)
    counts = solvers.host_reads(iters=12)
    for s in solvers.SOLVERS:
        assert counts[("tol > 0", s)] == 12 and counts[("fixed_iterations()", s)] == 0
        assert counts[("tol = 0", s)] == counts[("tol < 0", s)] == 1
        assert counts[("tol > 0, check_every=4", s)] == 4


def test_trivial_map_keeps_every_solver_busy():
    f, z0 = solvers.trivial_map(2, 256)
    for s in solvers.SOLVERS:
        assert solvers._solve(f, z0, s, 30)[1].nfe == 30


def test_deq_step_floor_is_measured_from_the_step_itself():
    result = deq_step.measure("deq-trellisnet", "debug", 2, 8, repeats=2, warmup=1)
    assert result.nfe_forward > 0 and result.nfe_backward > 0
    assert len(result.step) == len(result.floor) == 2 and all(r > 0 for r in result.ratio)
    step_ops, floor_ops = result.ops
    assert step_ops > floor_ops > 0  # the solvers' own ops, beyond f, its VJPs and the rest
    assert sum(result.beyond.values()) == step_ops - floor_ops and result.beyond["aten.bmm"] > 0
    parts = result.parts
    for i in range(2):
        assert result.floor[i] == pytest.approx(parts["outer"][i] + parts["f"][i] + parts["vjp"][i])


def test_torchdeq_overhead_compares_equal_nfe():
    pytest.importorskip("torchdeq")
    from bench.peers.torchdeq_compare import solver_overhead

    torch.set_num_threads(1)
    rows = solver_overhead(batch=2, seq=8, d=16, iters=6, reps=2)
    for solver in ("broyden", "anderson", "fixed_point"):
        ours, theirs = (next(r for r in rows if r["impl"] == impl and r["solver"] == solver)
                        for impl in ("deq-bench", "torchdeq"))
        assert ours["nfe"] == theirs["nfe"] >= 6
