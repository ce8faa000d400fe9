"""bench.perf.harness: its statistics, its comparison of two runs' deterministic columns, and one
goal end to end (the speed targets themselves are the benchmark's to print, not a test's)."""

from pathlib import Path

from bench.perf import harness
from bench.plots.pool import default_helpers


def test_median_iqr_and_rotating_rounds(tmp_path):
    assert harness.median_iqr([1.0, 2.0, 3.0, 4.0, 100.0]) == (3.0, 2.0)
    assert harness.median_iqr([5.0]) == (5.0, None)
    a, b = (harness.Tree(name, Path(harness.ROOT), tmp_path / name) for name in ("a", "b"))
    order = [(r, t.name) for r, t in harness.rounds_of([a, b], 3)]
    assert order == [(0, "a"), (0, "b"), (1, "b"), (1, "a"), (2, "a"), (2, "b")]
    assert (tmp_path / "a" / "clock" / "sitecustomize.py").read_text().startswith('"""Where')


def test_differences_name_every_changed_deterministic_cell():
    row = {"case_id": "x", "tracked_bytes": "100", "params": "7", "predicted_bytes": "",
           "step_s_median": "0.1"}
    same = {**row, "step_s_median": "0.3", "predicted_bytes": "120"}  # a time; a cell one run lacks
    grown = {**row, "tracked_bytes": "101"}
    assert harness.differences({"this": [{"rows": {"x": row}}], "against": [{"rows": {"x": same}}]}) == []
    found = harness.differences({"this": [{"rows": {"x": row}}], "against": [{"rows": {"x": grown}}]})
    assert found == ["x tracked_bytes: this#0=100 against#0=101"]
    assert harness.differences({"this": [{"rows": {"x": row}}], "against": [{"rows": {}}]}) == [
        "x: only in one run"]


def test_help_goal_end_to_end(capsys):
    assert harness.main(["--goals", "help", "--rounds", "1"]) == 0
    out = capsys.readouterr().out
    assert "## help" in out and "help_s" in out and "target help_s <= 0.5" in out


def test_figures_goal_draws_with_the_runs_helpers(capsys):
    """The figures goal draws a run's figures as `deqbench run` does (its pool of helpers) and
    again cold, as `deqbench plot` does; here on the small quick run."""
    quick = Path(harness.ROOT) / "tests" / "bench" / "data" / "quick"
    assert harness.main(["--goals", "figures", "--rounds", "1", "--figures-run", str(quick)]) == 0
    out = capsys.readouterr().out
    assert "figures_cold_s" in out and "target figures_s <= 3" in out
    helpers = float(out.split("figure_helpers")[1].split()[0])
    assert helpers == default_helpers()
