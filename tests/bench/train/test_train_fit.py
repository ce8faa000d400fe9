"""Fit cases of a benchmark matrix (bench.train.fit): a model trained to the matrix's budget is
one results.csv row with perplexities beside the usual columns."""

import pytest

from bench import analysis, plots
from bench.analysis import RunView
from bench.results import COLUMNS, append_row
from bench.spec import Case, RunSettings, SpecError, load_preset, parse_matrix
from bench.train import fit_case
from bench.train.fit import _thin
from bench.worker import execute


# -- the benchmark runner: fit cases --------------------------------------------------------------
def test_fit_case_is_a_results_row_with_perplexity(tmp_path):
    case = Case(model="deq-transformer", family="transformer", variant="deq", mode="lm",
                phase="fit", seq_len=8, batch=4, solver="anderson", backward="implicit")
    settings = RunSettings(fit_steps=6, fit_data="synthetic:tokens=5000,eval_tokens=500")
    row = execute(case, "cpu", settings, ())
    assert row["status"] == "ok", row
    assert set(row) <= set(COLUMNS)
    assert row["train_steps"] == 6 and row["train_s"] > 0
    assert 1.0 < row["optimal_ppl"] < row["valid_ppl"]
    assert row["memory_source"] == "tracked" and row["peak_bytes"] > 0
    assert row["nfe_forward"] > 0 and row["tokens_per_s"] > 0
    curve = row["train_curve"]
    assert curve["step"] == [1, 2, 3, 4, 5, 6] and len(curve["loss"]) == 6
    assert curve["valid_ppl"][-1] == pytest.approx(row["valid_ppl"], rel=1e-5)  # the final one
    append_row(tmp_path, {**case.columns(), **row})
    view = RunView.load(tmp_path)
    assert view.df.loc[0, "valid_ppl"] == pytest.approx(row["valid_ppl"])
    assert view.quality.loc[0, "gap"] == pytest.approx(row["valid_ppl"] / row["optimal_ppl"] - 1)
    line = next(li for li in analysis.quality_lines(view) if li.startswith("deq-transformer"))
    assert f"{row['valid_ppl']:.3f}" in line and f"{row['optimal_ppl']:.3f}" in line
    figures = plots.plot_run(view, only=["training_curves"])  # the report's figure
    assert [f.name for f in figures.made] == ["training_curves"]


def test_long_curves_are_thinned_for_results_csv():
    rows = [{"step": i} for i in range(1, 790)]
    kept = _thin(rows)
    assert len(kept) <= 101 and kept[0]["step"] == 1 and kept[-1]["step"] == 789
    assert _thin(rows[:50]) == rows[:50]


def test_fit_cases_with_a_time_budget():
    case = Case(model="transformer-tied", family="transformer", variant="tied", mode="lm",
                phase="fit", seq_len=8, batch=4, depth=2)
    row = fit_case(case, "cpu", RunSettings(fit_seconds=0.5, fit_data="synthetic:tokens=5000,eval_tokens=1000"))
    assert row["status"] == "ok" and 0.5 <= row["train_s"] < 2.0 and row["train_steps"] > 1


def test_fit_phase_in_a_matrix():
    m = parse_matrix({"settings": {"fit_steps": 10},
                      "defaults": {"seq_len": 8, "batch": 2, "depth": 2, "size": "debug"},
                      "sweep": [{"family": "transformer", "variant": ["deq", "tied"],
                                 "mode": ["core", "lm"], "phase": ["train", "fit"]}]})
    fit = [c for c in m.cases if c.phase == "fit"]
    assert {c.mode for c in fit} == {"lm"} and len(fit) == 2
    assert "fit cases train on tokens: they run in lm mode only" in m.notes
    assert m.settings.fit_steps == 10


@pytest.mark.parametrize(("settings", "message"), [
    ({"fit_steps": 0}, "fit_steps must be a positive integer"),
    ({"fit_seconds": "1m"}, "fit_seconds must be a positive number"),
    ({"fit_data": "/nowhere/at/all"}, "fit_data: corpus directory /nowhere/at/all does not exist"),
    ({"fit_data": "synthetic:order=0"}, "fit_data: synthetic corpus needs"),
])
def test_bad_fit_settings(settings, message):
    with pytest.raises(SpecError, match=message):
        parse_matrix({"settings": settings, "defaults": {"seq_len": 8, "batch": 2},
                      "sweep": [{"model": "deq-transformer", "mode": "lm", "phase": "fit"}]})


@pytest.mark.parametrize("preset", ["train-quality", "train-quality-time"])
def test_training_presets_compare_each_deq_with_its_baselines(preset):
    m = load_preset(preset)
    assert {c.phase for c in m.cases} == {"fit"} and {c.mode for c in m.cases} == {"lm"}
    assert {c.variant for c in m.cases} >= {"deq", "untied", "tied"}
    shapes = {(c.seq_len, c.batch, c.size) for c in m.cases}
    assert len(shapes) == 1  # one shape, one budget: an equal-budget comparison
    assert (m.settings.fit_seconds is not None) == (preset == "train-quality-time")


