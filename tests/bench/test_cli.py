"""The CLI contract: bad input exits 2 with one line, before anything runs or is written."""

import json
from pathlib import Path

import pytest
import torch

from bench.cli import main, parse_size

CPU_BASELINE = str(Path(__file__).parents[2] / "results" / "baselines" / "cpu.json")


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
    (tmp_path / "cuda.toml").write_text('[settings]\ninstruments = ["torch_cuda", "tracked"]\n'
                                        '[[sweep]]\nmodel = "trellisnet"\ndepth = 2\nseq_len = 8\nbatch = 1\n')
    done = tmp_path / "done"
    done.mkdir()
    (done / "results.csv").write_text("case_id\n")
    _bad_files(tmp_path)
    return tmp_path


NOISE = bytes(range(256)) * 8  # not UTF-8, not JSON, not CSV


def _bad_files(root):
    """Odd files and run directories a user may hand to the commands that read them."""
    from tests.bench.runs import copy_run

    copy_run("quick", root / "quick")
    (root / "binary.toml").write_bytes(NOISE)
    (root / "sweep3.toml").write_text("sweep = 3\n")
    (root / "config3.toml").write_text('[[sweep]]\nmodel = "trellisnet"\ndepth = 2\nseq_len = 8\n'
                                      'batch = 1\nconfig = 3\n')
    (root / "defaults-config.toml").write_text('[defaults]\nconfig = [1]\n[[sweep]]\nmodel = '
                                              '"trellisnet"\ndepth = 2\nseq_len = 8\nbatch = 1\n')
    binrun = copy_run("quick", root / "binrun")
    (binrun / "results.csv").write_bytes(NOISE)
    notable = copy_run("quick", root / "notable")
    (notable / "results.csv").write_text("colour,size\nred,3\n")
    (copy_run("quick", root / "emptyenv") / "env.json").write_text("")
    (copy_run("quick", root / "listenv") / "env.json").write_text("[1, 2]")
    bare = copy_run("quick", root / "bare")  # cases, but no measurement column
    (bare / "results.csv").write_text("case_id,model,status\na/T8,trellisnet,ok\nb/T8,trellisnet,ok\n")
    (copy_run("quick", root / "norows") / "results.csv").write_text(
        (root / "quick" / "results.csv").read_text().splitlines()[0] + "\n")
    (root / "outdir").mkdir()
    good = {"format": 1, "device_kind": "cpu", "device_name": "x",
            "cases": {"a": {"status": "ok", "deterministic": {"tracked_bytes": 10}, "device": {}}}}
    for name, data in {
        "list.json": [1, 2],
        "nocases.json": {**good, "cases": {}},
        "nokind.json": {**good, "device_kind": None},
        "strings.json": {**good, "cases": {"a": {"status": "ok", "deterministic": {"tracked_bytes": "big"}}}},
        "boolean.json": {**good, "cases": {"a": {"status": "ok", "device": {"peak_bytes": True}}}},
        "nan.json": {**good, "cases": {"a": {"status": "ok", "device": {"peak_bytes": float("nan")}}}},
        "notcase.json": {**good, "cases": {"a": [1]}},
        "cases-list.json": {**good, "cases": [1]},
        "oldformat.json": {**good, "format": 0},
    }.items():
        (root / name).write_text(json.dumps(data))
    (root / "binary.json").write_bytes(NOISE)
    one = '[[sweep]]\nmodel = "trellisnet"\ndepth = 2\nbatch = 1\nseq_len = '
    (root / "hugeseq.toml").write_text(one + "9223372036854775808\n")
    (root / "bigseq.toml").write_text(one + "4611686018427387904\n")
    deq = '[[sweep]]\nmodel = "deq-transformer"\nseq_len = 8\nbatch = 1\nconfig = '
    for name, config in (("dmodel0", "{ d_model = 0 }"), ("initnan", "{ init_std = nan }"),
                         ("maxiter0", "{ max_iter = 0 }"), ("tolnan", "{ tol = nan }"),
                         ("solver", '{ b_solver = "newton" }'), ("dropout", "{ dropout = 1.0 }")):
        text = deq.replace("deq-transformer", "deq-trellisnet") if name == "initnan" else deq
        (root / f"cfg-{name}.toml").write_text(text + config + "\n")
    for key, value in (("depth", "3"), ("solver", '"anderson"'), ("backward", '"phantom"')):
        model = "trellisnet" if key == "depth" else "deq-trellisnet"
        (root / f"cfg-axis-{key}.toml").write_text(
            f'[[sweep]]\nmodel = "{model}"\nseq_len = 8\nbatch = 1\ndepth = 2\nconfig = {{ {key} = {value} }}\n')
    copy_run("quick", root / "envtypes")
    (root / "envtypes" / "env.json").write_text('{"matrix": "quick", "git": "abc"}')
    (root / "threads.toml").write_text('[settings]\nthreads = 1000000\n[[sweep]]\nmodel = "trellisnet"\n'
                                       'depth = 2\nseq_len = 8\nbatch = 1\n')
    (copy_run("quick", root / "reportdir") / "report.md").mkdir()
    (copy_run("quick", root / "figfile") / "figures").write_text("not a directory")
    text = (root / "quick" / "results.csv").read_text()
    (copy_run("quick", root / "badstatus") / "results.csv").write_text(text.replace(",ok,", ",banana,", 1))
    lines = text.splitlines()
    (copy_run("quick", root / "badnum") / "results.csv").write_text(
        "\n".join([lines[0], lines[1].replace(",32,2,", ",32,-2,"), *lines[2:]]) + "\n")
    (copy_run("quick", root / "dupcols") / "results.csv").write_text(
        lines[0] + ",status\n" + "\n".join(line + ",ok" for line in lines[1:]) + "\n")
    words = " ".join(f"w{i % 50}" for i in range(3000)) + "\n"
    for name, valid, test in (("shortvalid", "a\n", words), ("emptyvalid", "", words),
                              ("shorttest", words, "b c\n")):
        (root / name).mkdir()
        for split, text in (("train", words), ("valid", valid), ("test", test)):
            (root / name / f"{split}.txt").write_text(text)
    for name, content in (("logonly", None), ("badckpt", NOISE), ("emptyckpt", b"")):
        (root / name).mkdir()
        (root / name / "train_log.csv").write_text("step,loss\n1,2.0\n")
        if content is not None:
            (root / name / "checkpoint.pt").write_bytes(content)


TRAIN = ["train", "--model", "deq-transformer", "--steps", "2", "--no-progress", "--out", "trained"]
BAD = [
    (["run", "--preset", "nope"], "unknown preset 'nope'; valid presets:"),
    (["run", "--matrix", "missing.toml"], "cannot read matrix file"),
    (["run", "--matrix", "bad.toml"], "does not parse as TOML"),
    (["run", "--matrix", "nomodel.toml"], "unknown model 'resnet'; valid: "),
    (["run", "--matrix", "nosolver.toml"], "unknown solver 'newton'; valid: anderson, broyden, fixed_point"),
    (["run", "--matrix", "zero.toml"], "seq_len must be positive integers below 2**31, got 0"),
    (["run", "--matrix", "column.toml"], r"unknown key(s) ['width']"),
    (["run", "--device", "tpu"], "unknown device 'tpu'; valid: auto, cpu, cuda, cuda:N"),
    (["run", "--device", "cuda:x"], "bad device 'cuda:x'"),
    (["run", "--instruments", "tracked,sonar"], "unknown instrument 'sonar'; valid instruments: "),
    (["run", "--threads", "0"], "threads must be a positive integer up to 1024, got 0"),
    (["run", "--memory-limit", "lots"], "bad size 'lots'"),
    (["run", "--memory-limit", "0"], "size must be positive"),
    (["run", "--out", "a-file/run"], "is not a directory"),
    (["run", "--out", "done"], "already holds results.csv; use --resume"),
    (["run", "--resume", "--out", "nothing-here"], "nothing to resume"),
    (["run", "--only", "no-such-case"], "matches no case of default"),
    (["run", "--preset", "smoke", "--matrix", "bad.toml"], "give --preset or --matrix, not both"),
    (["run", "--colour"], "unrecognized arguments: --colour"),
    (["run", "--device", "cpu", "--instruments", "torch_cuda"],
     "instrument torch_cuda cannot run on cpu (the workload runs on cpu, not CUDA); drop it"),
    (["run", "--device", "cpu", "--instruments", "tracked,nvml"], "instrument nvml cannot run on cpu"),
    (["run", "--device", "cpu", "--matrix", "cuda.toml"], "instrument torch_cuda cannot run on cpu"),
    (["run", "--matrix", "binary.toml"], "matrix file binary.toml is not UTF-8 text"),
    (["run", "--matrix", "sweep3.toml"], "[[sweep]] must be tables of axes, got 3"),
    (["run", "--matrix", "config3.toml"], "config must be a table of model config fields"),
    (["run", "--matrix", "defaults-config.toml"], "config must be a table of model config fields"),
    (["run", "--matrix", "quick"], "cannot read matrix file quick"),
    (["plot", "binrun"], "binrun/results.csv is not a results table"),
    (["report", "binrun"], "binrun/results.csv is not a results table"),
    (["baseline", "binrun", "-o", "b.json"], "binrun/results.csv is not a results table"),
    (["check", "binrun", "--baseline", CPU_BASELINE], "is not a results table"),
    (["plot", "notable"], "notable/results.csv is not a results table (no case_id, status column"),
    (["report", "emptyenv"], "emptyenv/env.json is not a JSON object"),
    (["plot", "listenv"], "listenv/env.json is not a JSON object"),
    (["baseline", "emptyenv", "-o", "b.json"], "emptyenv/env.json is not a JSON object"),
    (["baseline", "quick", "-o", "outdir"], "-o outdir is a directory; give a file path"),
    (["baseline", "quick", "-o", "a-file/b.json"], "is not a directory"),
    (["baseline", "bare", "-o", "b.json"], "has no measurement in any of its 2 case(s)"),
    (["baseline", "norows", "-o", "b.json"], "norows has no case"),
    (["baseline", "nowhere", "-o", "b.json"], "nowhere/results.csv does not exist"),
    (["check", "quick", "--baseline", "list.json"], "list.json is not a deq-bench baseline"),
    (["check", "quick", "--baseline", "cases-list.json"], "is not a deq-bench baseline"),
    (["check", "quick", "--baseline", "oldformat.json"], "is not a deq-bench baseline"),
    (["check", "quick", "--baseline", "nocases.json"], "baseline nocases.json holds no case"),
    (["check", "quick", "--baseline", "nokind.json"], "names no device kind (device_kind is None)"),
    (["check", "quick", "--baseline", "strings.json"], "case 'a': tracked_bytes = 'big' is not a finite number"),
    (["check", "quick", "--baseline", "boolean.json"], "peak_bytes = True is not a finite number"),
    (["check", "quick", "--baseline", "nan.json"], "peak_bytes = nan is not a finite number"),
    (["check", "quick", "--baseline", "notcase.json"], "case 'a' is not a case record"),
    (["check", "quick", "--baseline", "binary.json"], "baseline binary.json is not valid JSON"),
    (["check", "quick", "--baseline", "quick"], "cannot read baseline quick"),
    (["check", "quick", "--baseline", CPU_BASELINE, "--tol-speed", "nan"],
     "tolerance must be a finite, non-negative number, got 'nan'"),
    (["check", "quick", "--baseline", CPU_BASELINE, "--tol-memory", "inf%"], "finite"),
    (["check", "quick", "--baseline", CPU_BASELINE, "--tol-memory=-5%"], "non-negative"),
    (["check", "quick"], "the following arguments are required: --baseline"),
    (["plot", "a-file"], "a-file/results.csv does not exist"),
    ([*TRAIN, "--data", "shortvalid"], "the valid split of shortvalid is too short: a split of 2 tokens"),
    ([*TRAIN, "--data", "emptyvalid"], "the valid split of emptyvalid is too short"),
    ([*TRAIN, "--data", "shorttest"], "the test split of shorttest is too short"),
    ([*TRAIN, "--data", "shorttest", "--test-split", "none", "--seq-len", "5000"], "the train split"),
    (["train", "--resume", "--out", "logonly"], "logonly holds train_log.csv but no checkpoint.pt"),
    (["train", "--model", "deq-transformer", "--out", "logonly"], "delete it to start again"),
    (["train", "--resume", "--out", "badckpt"], "cannot read checkpoint badckpt/checkpoint.pt"),
    (["train", "--resume", "--out", "emptyckpt"], "cannot read checkpoint emptyckpt/checkpoint.pt"),
    ([*TRAIN, "--lr", "inf"], "lr must be positive and finite, got inf"),
    ([*TRAIN, "--lr", "nan"], "lr must be positive and finite, got nan"),
    ([*TRAIN, "--lr", "1e400"], "lr must be positive and finite, got inf"),
    ([*TRAIN, "--max-seconds", "nan"], "max_seconds must be positive and finite, got nan"),
    ([*TRAIN, "--max-seconds", "inf"], "max_seconds must be positive and finite"),
    ([*TRAIN, "--clip", "nan"], "clip must be a non-negative finite number, got nan"),
    ([*TRAIN, "--weight-decay", "inf"], "weight_decay must be a non-negative finite number"),
    ([*TRAIN, "--checkpoint-seconds", "nan"], "checkpoint_seconds must be a non-negative finite"),
    ([*TRAIN, "--checkpoint-seconds", "-1"], "checkpoint_seconds must be a non-negative finite"),
    (["run", "--preset", ""], "argument --preset is empty"),
    (["run", "--out", ""], "argument --out is empty"),
    (["run", "--only", " "], "argument --only is empty"),
    (["run", "--matrix", ""], "argument --matrix is empty"),
    (["run", "--instruments", ""], "argument --instruments is empty"),
    (["run", "--instruments", ",,"], "--instruments names no instrument"),
    (["run", "--instruments", "tracked,timing,tracked"], "--instruments names tracked twice"),
    (["run", "--memory-limit", "0.1"], "size must be at least 1 byte, got '0.1'"),
    (["run", "--memory-limit", "99999999999999999999TB"], "size too large"),
    (["run", "--matrix", "hugeseq.toml"], "seq_len must be positive integers below 2**31, got 9223372036854775808"),
    (["run", "--matrix", "bigseq.toml"], "below 2**31"),
    (["plot", "badstatus"], "badstatus/results.csv case row 1 (deq-transformer/debug/core/train/T32/B2/broyden/"
                            "implicit): status 'banana' is not one of ok, "),
    (["report", "badnum"], "badnum/results.csv case row 1 (deq-transformer/debug/core/train/T32/B2/broyden/"
                           "implicit): batch -2 is not a positive integer"),
    (["check", "dupcols", "--baseline", CPU_BASELINE], "dupcols/results.csv is not a results table "
                                                       "(column status appears twice)"),
    (["baseline", "", "-o", "b.json"], "argument run_dir is empty"),
    (["check", "quick", "--baseline", ""], "argument --baseline is empty"),
    ([*TRAIN, "--data", ""], "argument --data is empty"),
    ([*TRAIN, "--valid-split", ""], "argument --valid-split is empty"),
    (["train", "--model", "", "--out", "trained"], "argument --model is empty"),
    (["env", "--device", ""], "argument --device is empty"),
    (["run", "--matrix", "cfg-dmodel0.toml"], "config: deq-transformer.d_model must be >= 1, got 0"),
    (["run", "--matrix", "cfg-initnan.toml"], "deq-trellisnet.init_std must be a finite number, got nan"),
    (["run", "--matrix", "cfg-maxiter0.toml"], "deq-transformer.max_iter must be >= 1, got 0"),
    (["run", "--matrix", "cfg-tolnan.toml"], "deq-transformer.tol must be a finite number, got nan"),
    (["run", "--matrix", "cfg-solver.toml"], "deq-transformer: unknown solver 'newton'"),
    (["run", "--matrix", "cfg-dropout.toml"], "dropout must be in [0, 1) (a probability), got 1.0"),
    (["predict", "--matrix", "cfg-maxiter0.toml"], "deq-transformer.max_iter must be >= 1, got 0"),
    ([*TRAIN, "--set", "d_model=0"], "deq-transformer.d_model must be >= 1, got 0"),
    ([*TRAIN, "--set", "max_iter=0"], "deq-transformer.max_iter must be >= 1, got 0"),
    ([*TRAIN, "--set", "tol=nan"], "deq-transformer.tol must be a finite number, got nan"),
    ([*TRAIN, "--set", "b_tol=inf"], "deq-transformer.b_tol must be a finite number, got inf"),
    ([*TRAIN, "--set", "solver=newton"], "unknown solver 'newton'"),
    ([*TRAIN, "--set", "dropout=2"], "dropout must be in [0, 1) (a probability), got 2"),
    ([*TRAIN, "--set", "=3"], "bad --set '=3'; use KEY=VALUE"),
    (["run", "--matrix", "cfg-axis-depth.toml"], "config: depth is an axis of the matrix: give depth = "),
    (["run", "--matrix", "cfg-axis-solver.toml"], "config: solver is an axis of the matrix"),
    (["run", "--matrix", "cfg-axis-backward.toml"], "config: backward is an axis of the matrix"),
    (["report", "envtypes"], "envtypes/env.json: matrix is 'quick', not a table"),
    (["check", "quick", "--baseline", CPU_BASELINE, "--tol-memory", "5"],
     "--tol-memory 5 would be 500%; write 5% (or the fraction 0.05)"),
    (["check", "quick", "--baseline", CPU_BASELINE, "--tol-speed", "1"], "would be 100%"),
    ([*TRAIN, "--data", "synthetic:alpha=inf"], "alpha > 0 (finite)"),
    ([*TRAIN, "--set", "vocab_size=0"], "vocab_size comes from the corpus; drop --set vocab_size"),
    (["train", "--model", "transformer", "--set", "depth=3", "--out", "trained"],
     "depth is an option of its own: use --depth 3, not --set depth=3"),
    (["run", "--threads", "1000000"], "threads must be a positive integer up to 1024, got 1000000"),
    (["run", "--matrix", "threads.toml"], "threads must be a positive integer up to 1024"),
    ([*TRAIN, "--threads", "100000"], "threads must be <= 1024, got 100000"),
    (["baseline", "quick", "-o", "quick/results.csv"], "quick/results.csv exists and is not a deq-bench "
                                                      "baseline; refusing to overwrite it"),
    (["baseline", "quick", "-o", "bad.toml"], "refusing to overwrite it"),
    (["plot", "figfile"], "cannot write figfile/figures: File exists; move it out of the way"),
    (["report", "reportdir"], "reportdir/report.md is a directory; move it out of the way"),
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


# Bad input through the environment: (variable, value, argv, message).
BAD_ENV = [
    ("DEQBENCH_PLUGINS", "nonexistent.module", ["list"], "plugin module 'nonexistent.module'"),
    ("DEQBENCH_PLUGINS", "nonexistent.module", ["run"], "named in DEQBENCH_PLUGINS"),
    ("DEQBENCH_PLUGINS", "nonexistent.module", ["predict", "--preset", "smoke"], "DEQBENCH_PLUGINS"),
    ("DEQBENCH_PLUGINS", "nonexistent.module", ["train", "--model", "deq-transformer"], "DEQBENCH_PLUGINS"),
    ("DEQBENCH_PLUGINS", "os,,nonexistent", ["list", "--json"], "plugin module 'nonexistent'"),
]


@pytest.mark.parametrize(("var", "value", "argv", "message"), BAD_ENV,
                         ids=[f"{v}={x} {' '.join(a)}" for v, x, a, _ in BAD_ENV])
def test_bad_environment_exits_2_with_one_line_and_writes_nothing(workdir, capsys, monkeypatch,
                                                                  var, value, argv, message):
    from models import registry

    registry.list_models()  # restored afterwards: the real families, loaded once
    monkeypatch.setattr(registry, "MODELS", dict(registry.MODELS))
    monkeypatch.setattr(registry, "_loaded", False)
    monkeypatch.setenv(var, value)
    before = _snapshot(workdir)
    assert exit_code(argv) == 2
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and message in captured.err, captured.err
    assert captured.out == ""
    assert _snapshot(workdir) == before


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


# -- outputs that cannot be written: a full disk, a read-only or forbidden folder ------------------
def _refuse(code):
    def write(self, *args, **kwargs):
        import os

        target = self if not isinstance(self, (str, bytes)) and hasattr(self, "parts") else args[0]
        raise OSError(code, os.strerror(code), str(target))
    return write


UNWRITABLE = [
    (["plot", "quick"], "matplotlib.figure.Figure.savefig", "ENOSPC", "No space left on device"),
    (["report", "quick"], "matplotlib.figure.Figure.savefig", "ENOSPC", "free some space"),
    (["plot", "quick"], "pathlib.Path.mkdir", "EROFS", "quick/figures: Read-only file system"),
    (["report", "quick"], "pathlib.Path.mkdir", "EACCES", "choose a directory you can write to"),
    (["baseline", "quick", "-o", "b.json"], "pathlib.Path.write_text", "ENOSPC", "b.json.tmp: No space"),
    (["baseline", "quick", "-o", "b.json"], "pathlib.Path.write_text", "EDQUOT", "free some space"),
]


@pytest.mark.parametrize(("argv", "target", "code", "message"), UNWRITABLE,
                         ids=[f"{' '.join(a)} {c}" for a, _, c, _ in UNWRITABLE])
def test_unwritable_outputs_are_one_line(workdir, capsys, monkeypatch, argv, target, code, message):
    import errno

    monkeypatch.setattr(target, _refuse(getattr(errno, code)))
    before = _snapshot(workdir)
    assert exit_code(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
    assert _snapshot(workdir) == before  # no half file, no .tmp left behind


def test_outputs_of_a_finished_run_that_cannot_be_written_are_a_one_line_warning(workdir, capsys,
                                                                                monkeypatch):
    import errno

    from bench import cli

    monkeypatch.setattr("matplotlib.figure.Figure.savefig", _refuse(errno.ENOSPC))
    cli._outputs(workdir / "quick")  # what `deqbench run` does after its last case; it exits 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "No space left on device" in err and "deqbench report" in err, err
    assert "[Errno" not in err and "OSError" not in err
