import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from torch.utils._pytree import tree_leaves

from bench import analysis, cli, plots
from bench.data import Splits, load_corpus
from bench.results import COLUMNS, append_row, case_columns, read_results
from bench.spec import Case, RunSettings, SpecError, load_preset, parse_matrix
from bench.train import (
    CHECKPOINT,
    LOG,
    LOG_COLUMNS,
    RUN_COLUMNS,
    SUMMARY,
    TrainConfig,
    Trainer,
    fit_case,
    lr_factor,
    plot_training,
    summarize_runs,
)
from bench.worker import execute
from tests.bench.wikitext import WIKITEXT2

REPO = Path(__file__).resolve().parents[2]
# A DEQ that exercises everything resuming must restore: dropout (RNG), segment memory, the
# pretraining switch, Adam's state and the schedule.
TINY_DEQ = dict(model="deq-transformer", overrides=(("dropout", 0.1), ("mem_len", 8)), batch=4,
                data="synthetic:tokens=5000,eval_tokens=1000",
                seq_len=8, steps=12, warmup=3, pretrain_steps=3, log_every=1, threads=1)


def read_log(run_dir: Path) -> list[dict[str, str]]:
    with (run_dir / LOG).open(newline="") as fh:
        return list(csv.DictReader(fh))


def losses(run_dir: Path) -> list[float]:
    return [float(r["loss"]) for r in read_log(run_dir)]


# -- schedule and config --------------------------------------------------------------------------
def test_warmup_then_cosine_to_zero():
    assert [lr_factor(s, 0.0, 4) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor(4, 0.0, 4) == 1.0
    assert lr_factor(50, 0.5, 4) == pytest.approx(0.5)
    assert lr_factor(99, 1.0, 4) == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(0, 0.0, 0) == 1.0  # no warm-up


@pytest.mark.parametrize(("field", "value", "message"), [
    ("steps", 0, "steps must be >= 1"), ("batch", 0, "batch must be >= 1"),
    ("max_seconds", -1.0, "max_seconds must be positive"), ("lr", 0.0, "lr must be positive"),
    ("eval_tokens", 0, "eval_tokens must be >= 1"),
])
def test_config_rejects_bad_values(field, value, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(model="deq-transformer", **{field: value})


# -- the command line: bad input is one line, exit 2, nothing written -----------------------------
@pytest.mark.parametrize(("argv", "message"), [
    (["--model", "nope"], "unknown model 'nope'; valid models: .*deq-transformer"),
    (["--model", "deq-transformer", "--data", "{tmp}/missing"], "corpus directory .*missing does not exist"),
    (["--model", "deq-transformer", "--data", "{tmp}/two"], "no 'train' split in .*found test.txt, valid.txt"),
    (["--model", "deq-transformer", "--data", "synthetic:order=x"], "synthetic option order must be int"),
    (["--model", "deq-transformer", "--train-split", "valid"], "synthetic corpus has fixed .* splits"),
    (["--model", "deq-transformer", "--set", "colour=3"], r"has no config field\(s\) \['colour'\]"),
    (["--model", "deq-transformer", "--set", "mem_len"], "bad --set 'mem_len'; use KEY=VALUE"),
    (["--model", "deq-transformer", "--steps", "0"], "steps must be >= 1"),
    (["--model", "deq-transformer", "--steps", "ten"], "argument --steps: invalid int value"),
    (["--model", "transformer", "--depth", "0"], "depth must be >= 1"),
    (["--steps", "10"], "--model is required"),
    (["--resume"], "--resume needs --out"),
    (["--resume", "--out", "{tmp}/run"], "nothing to resume: .*checkpoint.pt does not exist"),
    (["--resume", "--out", "{tmp}/run", "--lr", "0.1"], "--resume continues .* drop --lr"),
    (["--model", "deq-transformer", "--device", "cuda:7"], "cuda"),
])
def test_bad_input_exits_2_with_one_line(tmp_path, capsys, argv, message):
    two = tmp_path / "two"
    two.mkdir()
    for split in ("valid", "test"):
        (two / f"{split}.txt").write_text("a b c\n")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    if "--out" not in argv and "--resume" not in argv:
        argv += ["--out", str(tmp_path / "run")]
    assert run_cli(["train", *argv, "--no-progress"]) == cli.EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert re.search(message, err), err
    assert not (tmp_path / "run").exists()  # nothing written


def run_cli(argv: list[str]) -> int:
    try:
        return cli.main(argv)
    except SystemExit as exit_:  # argparse's own usage errors
        return exit_.code


def test_an_existing_run_is_not_overwritten(tmp_path, capsys):
    (tmp_path / LOG).write_text("step\n")
    assert cli.main(["train", "--model", "deq-transformer", "--out", str(tmp_path)]) == 2
    assert "already holds a training run; use --resume" in capsys.readouterr().err


def test_set_values_are_typed():
    from bench.train import parse_override

    assert parse_override("mem_len=32") == ("mem_len", 32)
    assert parse_override("tol=1e-3") == ("tol", 1e-3)
    assert parse_override("weight_norm=true") == ("weight_norm", True)
    assert parse_override("solver=anderson") == ("solver", "anderson")
    assert parse_override("b_solver=none") == ("b_solver", None)


# -- the run: log, summary, memory, evaluation ----------------------------------------------------
def test_train_log_summary_and_checkpoint(tmp_path):
    config = TrainConfig(**{**TINY_DEQ, "steps": 8, "log_every": 4, "eval_every": 4})
    out = Trainer(config, tmp_path).run()
    rows = read_log(tmp_path)
    assert list(rows[0]) == list(LOG_COLUMNS)
    assert [int(r["step"]) for r in rows] == [4, 8]
    assert all(r["valid_ppl"] for r in rows)  # validated at step 4 and at the end
    # pretraining for 3 steps, then solving: NFE is the unrolled depth, then the solver's
    assert float(rows[0]["pretrain"]) == pytest.approx(0.75)
    assert float(rows[1]["pretrain"]) == 0.0 and float(rows[1]["nfe_backward"]) > 0
    # CPU: tracked bytes on the second step (pretraining) and the second solving step (step 5)
    assert [r["memory_source"] for r in rows] == ["tracked", "tracked"]
    assert int(rows[0]["peak_bytes"]) > 0
    summary = json.loads((tmp_path / SUMMARY).read_text())
    assert summary["config"]["model"] == "deq-transformer"
    assert summary["result"]["status"] == "ok" and summary["result"]["steps"] == 8
    assert summary["result"]["valid_ppl"] == pytest.approx(float(rows[-1]["valid_ppl"]))
    assert out.test_ppl is not None and out.unigram_ppl > 1
    assert out.peak_bytes == max(int(r["peak_bytes"]) for r in rows)
    assert (tmp_path / CHECKPOINT).exists()
    assert plot_training(tmp_path) == [tmp_path / "figures" / "training.png"]
    assert (tmp_path / "figures" / "training.png").stat().st_size > 0
    table = summarize_runs([tmp_path])
    assert list(table.columns) == list(RUN_COLUMNS)
    assert table.loc[0, "test_ppl"] == pytest.approx(out.test_ppl)
    assert table.loc[0, "train_ppl"] == pytest.approx(float(rows[-1]["ppl"]))


def test_evaluating_does_not_change_the_training_run(tmp_path):
    quiet = Trainer(TrainConfig(**TINY_DEQ), tmp_path / "a").run()
    evaluated = Trainer(TrainConfig(**{**TINY_DEQ, "eval_every": 2}), tmp_path / "b").run()
    assert losses(tmp_path / "a") == losses(tmp_path / "b")
    assert quiet.valid_ppl == evaluated.valid_ppl
    # several runs in one figure
    assert plot_training([tmp_path / "a", tmp_path / "b"], out=tmp_path / "figs") == [
        tmp_path / "figs" / "training.png"]


def test_memory_is_carried_between_segments(tmp_path):
    trainer = Trainer(TrainConfig(**{**TINY_DEQ, "steps": 2}), None)
    trainer.run()
    leaves = tree_leaves(trainer.memory)
    assert trainer.uses_memory and leaves and all(t.shape[:2] == (4, 8) for t in leaves)
    # the best perplexity with memory is the entropy rate; without it, the segment's bound
    assert trainer.optimal_ppl() == pytest.approx(trainer.corpus.optimal_ppl())
    plain = Trainer(TrainConfig(**{**TINY_DEQ, "steps": 2, "overrides": ()}), None)
    plain.run()
    assert plain.optimal_ppl() == pytest.approx(plain.corpus.optimal_ppl(8))
    assert plain.optimal_ppl() > trainer.optimal_ppl()


def test_wall_clock_budget_stops_the_run_and_ends_the_schedule():
    config = TrainConfig(model="transformer-tied", steps=100_000, max_seconds=1.0, batch=4,
                         seq_len=8, warmup=0, threads=1, data="synthetic:tokens=5000,eval_tokens=1000")
    trainer = Trainer(config, None)
    out = trainer.run()
    assert out.status == "ok" and 1 < out.steps < 100_000
    assert 1.0 <= out.train_s < 3.0
    assert trainer.optimizer.param_groups[0]["lr"] < 0.05 * config.lr  # cosine ran its course


# -- interrupt and resume -------------------------------------------------------------------------
def test_resume_reproduces_the_uninterrupted_loss_curve(tmp_path):
    config = TrainConfig(**{**TINY_DEQ, "log_every": 2})  # stopped inside a log row's steps
    Trainer(config, tmp_path / "full").run()
    stopped = Trainer(config, tmp_path / "cut").run(until=5)
    assert stopped.status == "interrupted" and stopped.steps == 5
    Trainer.resume(tmp_path / "cut").run()
    full, cut = read_log(tmp_path / "full"), read_log(tmp_path / "cut")
    assert [r["step"] for r in cut] == [r["step"] for r in full]
    assert losses(tmp_path / "cut") == pytest.approx(losses(tmp_path / "full"), rel=1e-6, abs=1e-7)
    assert float(cut[-1]["valid_ppl"]) == pytest.approx(float(full[-1]["valid_ppl"]), rel=1e-6)


def test_resume_after_a_kill_drops_rows_logged_after_the_checkpoint(tmp_path):
    Trainer(TrainConfig(**TINY_DEQ), tmp_path / "full").run()
    run = tmp_path / "killed"
    Trainer(TrainConfig(**{**TINY_DEQ, "checkpoint_every": 4}), run).run(until=8)
    with (run / LOG).open("a") as fh:  # rows a killed run logged after its last checkpoint
        fh.write("9,0,0.001,9.9,1.0,0,0,0,0,,,,,,,,\n10,0,0.001,9.9")
    Trainer.resume(run).run()
    assert losses(run) == pytest.approx(losses(tmp_path / "full"), rel=1e-6, abs=1e-7)


def test_ctrl_c_saves_a_checkpoint_and_resume_finishes_the_curve(tmp_path):
    """The real thing: SIGINT to `deqbench train`, exit 130, `--resume` from the command line."""
    args = ["--model", "deq-transformer", "--set", "dropout=0.1", "--set", "mem_len=8",
            "--batch", "4", "--seq-len", "8", "--steps", "400", "--warmup", "3",
            "--pretrain-steps", "3", "--log-every", "1", "--threads", "1", "--no-progress"]
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "bench", "train", *args, "--out", str(run)],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not ((run / LOG).exists() and len(read_log(run)) >= 4) and time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "interrupted at step" in stdout and "--resume --out" in stdout
    stopped_at = len(read_log(run))
    assert 4 <= stopped_at < 400
    # Finish fewer steps than the schedule's length would take: resume from the checkpoint, then
    # compare the curve so far with an uninterrupted run of the same configuration.
    resumed = Trainer.resume(run)
    resumed.run(until=stopped_at + 3)
    full = Trainer(resumed.config, tmp_path / "full")
    full.run(until=stopped_at + 3)
    assert losses(run) == pytest.approx(losses(tmp_path / "full"), rel=1e-6, abs=1e-7)
    assert cli.main(["train", "--resume", "--out", str(run), "--steps", "5"]) == 2


# -- quality: the synthetic optimum and real text -------------------------------------------------
def reaches_optimum(model: str, data: str, steps: int, **extra) -> tuple[float, float]:
    config = TrainConfig(model=model, data=data, steps=steps, lr=5e-3, warmup=10,
                         log_every=steps, threads=1, **extra)
    out = Trainer(config, None).run()
    return out.valid_ppl, out.optimal_ppl


@pytest.mark.parametrize("model", ["deq-transformer", "transformer-tied"])
def test_near_the_optimum_of_an_order_one_source(model):
    """The fast version: a first-order source needs no attention, only the right bigram table."""
    valid, optimum = reaches_optimum(model, "synthetic:order=1,tokens=40000,eval_tokens=8000", 80)
    assert valid < 1.10 * optimum, (valid, optimum)


@pytest.mark.slow
@pytest.mark.parametrize("model", ["deq-transformer", "transformer-tied"])
def test_near_the_optimum_of_the_default_source(model):
    """The default order-2 source: attention must find the token before the input."""
    valid, optimum = reaches_optimum(model, "synthetic", 400, batch=16, seq_len=32)
    assert valid < 1.10 * optimum, (valid, optimum)


@pytest.mark.slow
@pytest.mark.skipif(WIKITEXT2 is None, reason="no WikiText-2 copy (set DEQBENCH_DATA)")
def test_wikitext2_both_models_end_well_below_unigram(tmp_path):
    """Train on valid.txt, test on test.txt; same steps for the DEQ and the explicit model."""
    results = {}
    for model in ("deq-transformer", "transformer"):
        config = TrainConfig(model=model, data=str(WIKITEXT2), train_split="valid",
                             valid_split=None, test_split="test", steps=1000, lr=5e-3, warmup=50,
                             eval_tokens=50_000, log_every=100, threads=1)
        results[model] = Trainer(config, None).run()
    unigram = load_corpus(str(WIKITEXT2), Splits("valid", None, "test")).unigram_ppl("test")
    for model, out in results.items():
        assert out.test_ppl < 0.8 * unigram, (model, out.test_ppl, unigram)


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
    append_row(tmp_path, {**case_columns(case), **row})
    df = read_results(tmp_path)
    assert df.loc[0, "valid_ppl"] == pytest.approx(row["valid_ppl"])
    table = analysis.quality_table(df)
    assert table.loc[0, "gap"] == pytest.approx(row["valid_ppl"] / row["optimal_ppl"] - 1)
    line = next(li for li in analysis.quality_lines(df) if li.startswith("deq-transformer"))
    assert f"{row['valid_ppl']:.3f}" in line and f"{row['optimal_ppl']:.3f}" in line
    assert plot_training(tmp_path) == [tmp_path / "figures" / "training.png"]
    figures = plots.plot_run(tmp_path, only=["training_curves"])  # the report's figure
    assert [f.name for f in figures.made] == ["training_curves"]


def test_long_curves_are_thinned_for_results_csv():
    from bench.train import _thin

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


@pytest.mark.gpu
def test_cuda_runs_report_torch_cuda_peaks(tmp_path):
    config = TrainConfig(**{**TINY_DEQ, "steps": 6, "log_every": 3, "device": "cuda"})
    out = Trainer(config, tmp_path).run()
    rows = read_log(tmp_path)
    assert [r["memory_source"] for r in rows] == ["torch_cuda", "torch_cuda"]
    assert all(int(r["peak_bytes"]) > 0 for r in rows)
    assert out.memory_source == "torch_cuda" and out.peak_bytes == max(int(r["peak_bytes"]) for r in rows)
    assert len(out.curve) == 2 and out.valid_ppl is not None
