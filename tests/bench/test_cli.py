"""The CLI contract: bad input exits 2 with one line, before anything runs or is written."""

import json

import pytest
import torch

from bench.cli import main, parse_size


def _snapshot(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a-file").write_text("not a directory")
    (tmp_path / "bad.toml").write_text("[[sweep]\nmodel = ")
    (tmp_path / "nomodel.toml").write_text('[[sweep]]\nmodel = "resnet"\nseq_len = 8\nbatch = 1\n')
    (tmp_path / "nosolver.toml").write_text(
        '[[sweep]]\nmodel = "deq-transformer"\nseq_len = 8\nbatch = 1\nsolver = "newton"\n')
    (tmp_path / "zero.toml").write_text('[[sweep]]\nmodel = "deq-transformer"\nseq_len = 0\nbatch = 1\n')
    (tmp_path / "column.toml").write_text('[[sweep]]\nmodel = "deq-transformer"\nseq_len = 8\nbatch = 1\nwidth = 3\n')
    done = tmp_path / "done"
    done.mkdir()
    (done / "results.csv").write_text("case_id\n")
    return tmp_path


BAD = [
    (["run", "--preset", "nope"], "unknown preset 'nope'; valid presets:"),
    (["run", "--matrix", "missing.toml"], "cannot read matrix file"),
    (["run", "--matrix", "bad.toml"], "does not parse as TOML"),
    (["run", "--matrix", "nomodel.toml"], "unknown model 'resnet'; valid: "),
    (["run", "--matrix", "nosolver.toml"], "unknown solver 'newton'; valid: anderson, broyden, fixed_point"),
    (["run", "--matrix", "zero.toml"], "seq_len must be positive integers, got 0"),
    (["run", "--matrix", "column.toml"], r"unknown key(s) ['width']"),
    (["run", "--device", "tpu"], "unknown device 'tpu'; valid: auto, cpu, cuda, cuda:N"),
    (["run", "--device", "cuda:x"], "bad device 'cuda:x'"),
    (["run", "--instruments", "tracked,sonar"], "unknown instrument 'sonar'; valid instruments: "),
    (["run", "--threads", "0"], "--threads must be >= 1"),
    (["run", "--memory-limit", "lots"], "bad size 'lots'"),
    (["run", "--memory-limit", "0"], "size must be positive"),
    (["run", "--out", "a-file/run"], "is not a directory"),
    (["run", "--out", "done"], "already holds results.csv; use --resume"),
    (["run", "--resume", "--out", "nothing-here"], "nothing to resume"),
    (["run", "--only", "no-such-case"], "matches no case of default"),
    (["run", "--preset", "smoke", "--matrix", "bad.toml"], "give --preset or --matrix, not both"),
    (["run", "--colour"], "unrecognized arguments: --colour"),
    (["predict", "--preset", "nope"], "unknown preset 'nope'"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
]
if not torch.cuda.is_available():
    BAD.append((["run", "--device", "cuda"], "CUDA is not available"))


@pytest.mark.parametrize(("argv", "message"), BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(workdir, capsys, argv, message):
    before = _snapshot(workdir)
    assert exit_code(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
    assert _snapshot(workdir) == before  # nothing written, no results/ created


def exit_code(argv: list[str]) -> int:
    """main()'s return value, or the code of the SystemExit argparse raises for usage errors."""
    try:
        return main(argv)
    except SystemExit as exit_:
        return exit_.code


@pytest.mark.parametrize(("text", "value"), [("2GB", 2_000_000_000), ("512MiB", 512 * 2**20),
                                             ("1.5G", 1_500_000_000), ("1000", 1000)])
def test_parse_size(text, value):
    assert parse_size(text) == value


def test_list_json_names_models_presets_solvers_instruments(capsys):
    assert main(["list", "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert {"deq-transformer", "transformer", "deq-trellisnet", "trellisnet"} <= set(listing["models"])
    assert "smoke" in listing["presets"] and listing["presets"]["default"]["cases"] > 0
    assert listing["solvers"] == ["anderson", "broyden", "fixed_point"]
    assert {"tracked", "predicted", "torch_cuda", "nvml", "flops", "timing"} <= set(listing["instruments"])
