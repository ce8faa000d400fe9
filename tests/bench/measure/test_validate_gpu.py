"""The GPU validation script's CPU side: it runs, degrades without CUDA, and judges gaps."""

import csv
import json

import pytest

from bench.measure import RESULT_COLUMNS
from bench.measure.validate_gpu import gaps, main


def test_without_cuda_it_runs_the_cpu_instruments_and_skips_the_check(toys, tmp_path, capsys):
    code = main(["--out", str(tmp_path), "--device", "cuda", "--models", "toy-stack",
                 "--batch", "2", "--seq-len", "8", "--repeats", "2"])
    assert code == 0
    out = capsys.readouterr().out
    assert "CUDA is not available here" in out
    rows = list(csv.DictReader((tmp_path / "instruments.csv").open()))
    assert [(r["model"], r["phase"]) for r in rows] == [("toy-stack", "train"), ("toy-stack", "eval")]
    assert set(RESULT_COLUMNS) <= set(rows[0])
    for r in rows:
        assert r["device"] == "cpu" and r["check"] == "skipped: no torch_cuda number"
        assert int(r["tracked_bytes"]) > 0 and int(r["predicted_bytes"]) > 0
        assert r["reserved_bytes"] == "" and r["nvml_process_bytes"] == ""  # empty, never 0
        assert "torch_cuda unavailable" in r["notes"]
    env = json.loads((tmp_path / "env.json").read_text())
    assert env["device"] == "cpu" and env["versions"]["torch"] and "available" in env["nvml"]
    assert "toy-stack train" in (tmp_path / "summary.md").read_text()


def test_unknown_model_is_bad_input(tmp_path, capsys):
    assert main(["--out", str(tmp_path), "--models", "no-such-model"]) == 2
    assert "unknown models ['no-such-model']; registered:" in capsys.readouterr().err


def test_gaps_and_the_tolerance_check():
    row = {"cuda_peak_bytes": 1100, "cuda_preexisting_bytes": 100, "predicted_cuda_bytes": 1050,
           "reserved_bytes": 2000, "nvml_process_bytes": 2600, "nvml_process_baseline_bytes": 500}
    g = gaps(row, tolerance=0.10)
    assert g["predicted_vs_cuda"] == pytest.approx(0.05) and g["check"] == "pass"
    assert g["predicted_vs_cuda_raw"] == pytest.approx(-50 / 1100)
    assert g["reserved_minus_allocated_bytes"] == 900 and g["nvml_minus_reserved_bytes"] == 600
    assert g["cuda_context_bytes"] == 500
    assert gaps({**row, "predicted_cuda_bytes": 1200}, tolerance=0.10)["check"] == "fail"
    assert gaps({"error": "OutOfMemoryError: ..."}, 0.1)["check"] == "error"
    assert gaps({"predicted_cuda_bytes": 5}, 0.1)["check"] == "skipped: no torch_cuda number"


def test_a_validation_cut_short_keeps_the_cases_it_finished(toys, tmp_path, monkeypatch):
    """tools/gpu_check.sh ends a step at its budget with SIGINT: the rows so far stay on disk."""
    import bench.measure.validate_gpu as validate

    real, calls = validate.run_case, []

    def second_is_interrupted(workload, instruments):
        calls.append(workload.phase)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(workload, instruments)

    monkeypatch.setattr(validate, "run_case", second_is_interrupted)
    with pytest.raises(KeyboardInterrupt):
        main(["--out", str(tmp_path), "--device", "cpu", "--models", "toy-stack", "--batch", "2",
              "--seq-len", "8", "--repeats", "2"])
    rows = list(csv.DictReader((tmp_path / "instruments.csv").open()))
    assert [(r["model"], r["phase"]) for r in rows] == [("toy-stack", "train")]
    assert json.loads((tmp_path / "env.json").read_text())["device"] == "cpu"
