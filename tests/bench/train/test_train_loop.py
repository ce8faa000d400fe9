"""The training loop (bench.train.loop): the bench's step on real data, its log, evaluation,
checkpoints, interrupt and resume, and how close it gets to a known optimum."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from torch.utils._pytree import tree_leaves

from bench import cli
from bench.data import Splits, load_corpus
from bench.train import CHECKPOINT, LOG, LOG_COLUMNS, SUMMARY, TrainConfig, Trainer
from tests.bench.wikitext import WIKITEXT2

REPO = Path(__file__).resolve().parents[3]
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
    assert summary["result"]["threads"] == 1  # one intra-op thread on a CPU unless asked


def test_timing_columns_are_the_median_and_inclusive_quartiles_of_the_steps():
    """The same statistics as every measured row: numpy's linear percentiles are the inclusive
    quartiles; tokens/s is at the median step, not a mean."""
    trainer = Trainer(TrainConfig(**{**TINY_DEQ, "steps": 9, "pretrain_steps": 0}), None)
    out = trainer.run()
    times = np.array(trainer.step_times)
    assert len(times) == 9 - 2  # two tracked steps are left out of timing
    q1, median, q3 = np.percentile(times, [25, 50, 75])
    assert out.step_s_median == pytest.approx(median)
    assert out.step_s_iqr == pytest.approx(q3 - q1)
    assert out.tokens_per_s == pytest.approx(4 * 8 / median)


def test_evaluating_does_not_change_the_training_run(tmp_path):
    quiet = Trainer(TrainConfig(**TINY_DEQ), tmp_path / "a").run()
    evaluated = Trainer(TrainConfig(**{**TINY_DEQ, "eval_every": 2}), tmp_path / "b").run()
    assert losses(tmp_path / "a") == losses(tmp_path / "b")
    assert quiet.valid_ppl == evaluated.valid_ppl


def test_memory_is_carried_between_segments(tmp_path):
    trainer = Trainer(TrainConfig(**{**TINY_DEQ, "steps": 2}), None)
    trainer.run()
    leaves = tree_leaves(trainer.bench.memory)
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


class Killed(BaseException):
    """What a SIGKILL looks like from inside: the run ends mid-step, no handler runs."""


def kill_at(monkeypatch, step: int) -> None:
    """Make the training step `step` (1-based) end the process's work as a SIGKILL would."""
    real = Trainer._train_step

    def step_or_die(self):
        if self.step + 1 == step:
            raise Killed
        real(self)

    monkeypatch.setattr(Trainer, "_train_step", step_or_die)


def test_a_run_killed_before_any_checkpoint_resumes_from_its_first_step(tmp_path, monkeypatch):
    """Default checkpointing (no --checkpoint-every, no evaluation): killed at step 5, the run
    has a checkpoint from before its first step and continues the exact curve."""
    config = TrainConfig(**{**TINY_DEQ, "checkpoint_seconds": 3600.0})
    Trainer(config, tmp_path / "full").run()
    with monkeypatch.context() as m:
        kill_at(m, 5)
        with pytest.raises(Killed):
            Trainer(config, tmp_path / "killed").run()
    assert len(read_log(tmp_path / "killed")) == 4  # the log went on; the checkpoint did not
    resumed = Trainer.resume(tmp_path / "killed")
    assert resumed.step == 0
    resumed.run()
    assert losses(tmp_path / "killed") == pytest.approx(losses(tmp_path / "full"), rel=1e-6, abs=1e-7)


def test_checkpoints_on_a_wall_clock_interval_by_default(tmp_path, monkeypatch):
    assert TrainConfig(model="deq-transformer").checkpoint_seconds > 0  # on unless asked otherwise
    clock = iter(range(0, 10_000, 10))  # every look at the clock: 10 s later
    monkeypatch.setattr("bench.train.loop._now", lambda: float(next(clock)))
    config = TrainConfig(**{**TINY_DEQ, "checkpoint_seconds": 25.0})
    with monkeypatch.context() as m:
        kill_at(m, 9)
        with pytest.raises(Killed):
            Trainer(config, tmp_path / "run").run()
    step = Trainer.resume(tmp_path / "run").step
    assert 3 <= step < 9  # a recent checkpoint, not the one before the first step
    assert TrainConfig(**{**TINY_DEQ, "checkpoint_seconds": 0.0}).checkpoint_seconds == 0.0


def test_a_log_without_a_checkpoint_says_what_to_do(tmp_path, capsys):
    (tmp_path / LOG).write_text("step\n1\n")
    for argv in (["--resume"], ["--model", "deq-transformer"]):
        assert cli.main(["train", *argv, "--out", str(tmp_path), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1, err
        assert f"{tmp_path} holds {LOG} but no {CHECKPOINT}" in err and "delete it" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == [LOG]


def _train_until_logged(args: list[str], run, rows: int) -> subprocess.Popen:
    """`deqbench train ARGS --out RUN` in a subprocess, returned once its log has `rows` rows."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "bench", "train", *args, "--out", str(run)],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not ((run / LOG).exists() and len(read_log(run)) >= rows) and time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.1)
    return proc


def test_ctrl_c_saves_a_checkpoint_and_resume_finishes_the_curve(tmp_path):
    """The real thing: SIGINT to `deqbench train`, exit 130, `--resume` from the command line."""
    args = ["--model", "deq-transformer", "--set", "dropout=0.1", "--set", "mem_len=8",
            "--batch", "4", "--seq-len", "8", "--steps", "400", "--warmup", "3",
            "--pretrain-steps", "3", "--log-every", "1", "--threads", "1", "--no-progress"]
    run = tmp_path / "run"
    proc = _train_until_logged(args, run, rows=4)
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


def test_sigkill_with_default_checkpointing_resumes_from_the_command_line(tmp_path):
    """The real thing: SIGKILL to `deqbench train` with no checkpoint option, then `--resume`."""
    args = ["--model", "deq-transformer", "--batch", "4", "--seq-len", "8", "--steps", "400",
            "--warmup", "3", "--pretrain-steps", "3", "--log-every", "1", "--threads", "1",
            "--data", "synthetic:tokens=5000,eval_tokens=1000", "--no-progress"]
    run = tmp_path / "run"
    proc = _train_until_logged(args, run, rows=4)
    proc.kill()
    proc.communicate(timeout=60)
    assert (run / CHECKPOINT).exists() and len(read_log(run)) >= 4
    resumed = Trainer.resume(run)
    start = resumed.step  # 0 (the checkpoint before the first step), unless 60 s went by
    assert [int(r["step"]) for r in read_log(run)] == list(range(1, start + 1))  # later rows dropped
    done = resumed.run(until=start + 2)
    assert done.status == "interrupted" and done.steps == start + 2
    assert [int(r["step"]) for r in read_log(run)] == list(range(1, start + 3))


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


@pytest.mark.gpu
def test_cuda_runs_report_torch_cuda_peaks(tmp_path):
    config = TrainConfig(**{**TINY_DEQ, "steps": 6, "log_every": 3, "device": "cuda"})
    out = Trainer(config, tmp_path).run()
    rows = read_log(tmp_path)
    assert [r["memory_source"] for r in rows] == ["torch_cuda", "torch_cuda"]
    assert all(int(r["peak_bytes"]) > 0 for r in rows)
    assert out.memory_source == "torch_cuda" and out.peak_bytes == max(int(r["peak_bytes"]) for r in rows)
    assert len(out.curve) == 2 and out.valid_ppl is not None
