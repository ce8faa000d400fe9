"""The solver_trace column: each DEQ solve's residual per function evaluation, for the
convergence figure; none for explicit models and fake (predicted) solves."""

import json

from bench.measure import Workload, measure
from bench.measure.case import measure_case
from bench.spec import Case, RunSettings


def test_trace_has_one_residual_per_evaluation_and_ends_at_the_reported_residual(toys):
    row = measure(Workload(model="toy-deq", phase="train", seq_len=8), ["tracked"])
    trace = row["solver_trace"]
    assert set(trace) == {"forward", "backward"}
    forward, backward = trace["forward"], trace["backward"]
    assert len(forward["trace"]) == row["nfe_forward"]
    assert len(backward["trace"]) == row["nfe_backward"]
    assert forward["solver"] == "broyden" and forward["stop_mode"] == "rel"
    # the solver returns its lowest-residual iterate: the trace's minimum is the row's residual
    assert abs(min(forward["trace"]) - row["residual_forward"]) <= 1e-3 * row["residual_forward"]
    assert abs(min(backward["trace"]) - row["residual_backward"]) <= 1e-3 * row["residual_backward"]
    assert forward["trace"][-1] <= forward["tol"] < forward["trace"][0]


def test_no_trace_without_a_real_solve(toys):
    assert measure(Workload(model="toy-stack", phase="train", seq_len=8), ["tracked"])["solver_trace"] is None
    assert measure(Workload(model="toy-deq", phase="train", seq_len=8), ["predicted"])["solver_trace"] is None
    assert measure(Workload(model="toy-deq", phase="eval", seq_len=8), ["tracked"])["solver_trace"].keys() == {"forward"}


def test_runner_row_holds_the_trace_as_json(toys):
    case = Case(model="toy-deq", family="toy", variant="deq", seq_len=8, batch=2, solver="anderson",
                backward="implicit")
    row = measure_case(case, "cpu", RunSettings(), ("tracked",))
    trace = json.loads(row["solver_trace"])
    assert trace["forward"]["solver"] == "anderson"
    assert len(trace["forward"]["trace"]) == row["nfe_forward"]
