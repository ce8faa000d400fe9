"""A solve that stopped above its tolerance is flagged, never an unmarked `ok`: the row's
`converged` column, the error note beside its numbers, the pairs, the summary `deqbench run`
prints, the report, and `deqbench check`."""

import pytest

from bench import report
from bench.analysis import RunView, summary_lines
from bench.check import case_records, compare_cases
from bench.measure.case import measure_case
from bench.results import COLUMNS, LATER_COLUMNS, append_row, read_results
from bench.spec import Case, RunSettings
from tests.bench.runs import copy_run

SETTINGS = RunSettings(warmup=1, repeats=1, threads=1)


def deq_case(phase: str, **config) -> Case:
    return Case(model="deq-transformer", family="transformer", variant="deq", phase=phase,
                seq_len=8, batch=2, solver="broyden", backward="implicit",
                overrides=tuple(sorted(config.items())))


def test_converged_is_a_later_column():
    assert "converged" in LATER_COLUMNS and COLUMNS.index("converged") > COLUMNS.index("predicted_cuda_bytes")


@pytest.mark.parametrize("phase", ["eval", "train"])
def test_a_solve_cut_at_one_iteration_is_flagged(phase):
    row = measure_case(deq_case(phase, max_iter=1, tol=0.0), "cpu", SETTINGS, ("tracked",))
    assert row["status"] == "ok" and row["nfe_forward"] == 1  # the numbers are kept ...
    assert row["converged"] == 0  # ... and say they are of a truncated solve
    assert "did not converge" in row["error"] and "max_iter" in row["error"]


def test_a_converged_solve_and_an_explicit_model():
    row = measure_case(deq_case("eval"), "cpu", SETTINGS, ("tracked",))
    assert row["status"] == "ok" and row["converged"] == 1 and not row.get("error")
    explicit = Case(model="trellisnet", family="trellisnet", variant="tied", phase="eval",
                    seq_len=8, batch=2, depth=2)
    assert measure_case(explicit, "cpu", SETTINGS, ("tracked",))["converged"] is None
    predicted = measure_case(deq_case("eval"), "cpu", SETTINGS, ("predicted",))
    assert predicted["converged"] is None  # a fake solve has no residual: unknown, not "no"


UNCONVERGED = "deq-transformer/debug/core/train/T32/B2/broyden/implicit"


@pytest.fixture
def flagged(tmp_path):
    """The quick run with one DEQ case marked unconverged (others converged)."""
    run = copy_run("quick", tmp_path / "run")
    df = read_results(run)
    df["converged"] = [None if v != "deq" else 0 if c == UNCONVERGED else 1
                       for v, c in zip(df["variant"], df["case_id"], strict=True)]
    df.to_csv(run / "results.csv", index=False)
    return run


def test_pairs_summary_and_report_show_it(flagged):
    view = RunView.load(flagged)
    p = view.pairs
    cut = p[(p["deq_model"] == "deq-transformer") & (p["phase"] == "train") & (p["seq_len"] == 32)]
    assert len(cut) and (cut["deq_converged"] == 0).all()
    assert (p.drop(cut.index)["deq_converged"] == 1).all()
    lines = summary_lines(view)
    table = [line for line in lines if line.startswith("transformer ")]
    assert all(line.rstrip().endswith("NO") == ("train" in line and " 32 " in line[16:24])
               for line in table), "\n".join(table)
    assert any(line.startswith("1 case(s) did not converge") for line in lines)
    assert any(line.strip().startswith(UNCONVERGED) for line in lines)
    md = report.render(view, report.plots.Figures())
    assert f"`{UNCONVERGED}`" in md and "did not converge" in md
    rows = [line for line in md.splitlines() if line.startswith("| train | 32 |")]
    assert rows and all("†" in line for line in rows[: len(cut)])


def test_an_older_results_csv_without_the_column_is_unflagged(tmp_path):
    view = RunView.load(copy_run("quick", tmp_path / "run"))
    assert view.pairs["deq_converged"].isna().all()
    assert not [line for line in summary_lines(view) if "did not converge" in line]


def test_check_fails_a_case_that_stopped_converging(tmp_path):
    base = case_records([{"case_id": "d", "status": "ok", "tracked_bytes": 10, "converged": 1}])
    run = case_records([{"case_id": "d", "status": "ok", "tracked_bytes": 10, "converged": 0}])
    found = {(f.metric, f.verdict) for f in compare_cases(base, run)}
    assert ("converged", "regression") in found
    assert not compare_cases(run, base) or ("converged", "improved") in {
        (f.metric, f.verdict) for f in compare_cases(run, base)}


def test_the_column_round_trips_through_results_csv(tmp_path):
    append_row(tmp_path, {"case_id": "a", "status": "ok", "converged": 0})
    append_row(tmp_path, {"case_id": "b", "status": "ok", "converged": None})
    df = read_results(tmp_path)
    assert df["converged"].iloc[0] == 0 and df["converged"].isna().iloc[1]
