"""Training configuration and `deqbench train`'s command line: the schedule, bad values refused
in the config (once), bad input exiting 2 with one line and nothing written."""

import re

import pytest

from bench import cli
from bench.cli import parse_override
from bench.train import CHECKPOINT, TrainConfig, lr_factor


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
    (tmp_path / CHECKPOINT).write_bytes(b"a run")  # a log alone: test_train_loop.py
    assert cli.main(["train", "--model", "deq-transformer", "--out", str(tmp_path)]) == 2
    assert "already holds a training run; use --resume" in capsys.readouterr().err


def test_set_values_are_typed():
    assert parse_override("mem_len=32") == ("mem_len", 32)
    assert parse_override("tol=1e-3") == ("tol", 1e-3)
    assert parse_override("weight_norm=true") == ("weight_norm", True)
    assert parse_override("solver=anderson") == ("solver", "anderson")
    assert parse_override("b_solver=none") == ("b_solver", None)


