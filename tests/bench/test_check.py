import json
import math
import shutil

from bench.check import compare, load_baseline, make_baseline
from bench.cli import main
from bench.results import append_row, read_results, write_json

ROWS = [
    {"case_id": "deq/T32", "model": "deq", "status": "ok", "tracked_bytes": 1_000_000,
     "peak_bytes": 1_000_000, "params": 500, "params_nonembed": 400, "step_s_median": 0.10,
     "device": "cpu", "memory_source": "tracked"},
    {"case_id": "tied/L8", "model": "tied", "status": "ok", "tracked_bytes": 5_000_000,
     "peak_bytes": 5_000_000, "params": 500, "params_nonembed": 400, "step_s_median": 0.05,
     "device": "cpu", "memory_source": "tracked"},
]


def _run(tmp_path, name, rows, kind="cpu", device_name="Test CPU"):
    d = tmp_path / name
    d.mkdir()
    write_json(d / "env.json", {"device_kind": kind, "device_name": device_name})
    for r in rows:
        append_row(d, r)
    return d


def test_own_baseline_passes_and_six_percent_more_bytes_fails(tmp_path, capsys):
    run = _run(tmp_path, "run", ROWS)
    assert main(["baseline", str(run), "-o", str(tmp_path / "base.json")]) == 0
    assert main(["check", str(run), "--baseline", str(tmp_path / "base.json")]) == 0
    worse = [dict(ROWS[0]), {**ROWS[1], "tracked_bytes": 5_300_000}]  # +6%
    run2 = _run(tmp_path, "run2", worse)
    capsys.readouterr()
    assert main(["check", str(run2), "--baseline", str(tmp_path / "base.json")]) == 1
    out = capsys.readouterr().out
    assert "regression" in out and "tracked_bytes" in out and "tied/L8" in out and "+6.0%" in out
    assert main(["check", str(run2), "--baseline", str(tmp_path / "base.json"), "--tol-memory", "7%"]) == 0


def test_other_device_kind_is_refused(tmp_path, capsys):
    run = _run(tmp_path, "run", ROWS)
    gpu = _run(tmp_path, "gpu", ROWS, kind="h100-80gb-hbm3", device_name="NVIDIA H100 80GB HBM3")
    (tmp_path / "gpu.json").write_text(json.dumps(make_baseline(gpu)))
    assert main(["check", str(run), "--baseline", str(tmp_path / "gpu.json")]) == 2
    err = capsys.readouterr().err
    assert "h100-80gb-hbm3" in err and err.count("\n") == 1


def test_status_params_missing_and_speed(tmp_path):
    base = make_baseline(_run(tmp_path, "a", ROWS))
    rows = [{**ROWS[0], "status": "oom", "tracked_bytes": None, "params": 501, "step_s_median": 0.2}]
    findings = {(f.metric, f.verdict) for f in compare(_run(tmp_path, "b", rows), base)}
    assert ("status", "regression") in findings
    assert ("params", "changed") in findings
    assert ("step_s_median", "regression") in findings  # 2x slower > 30%
    assert ("case", "missing-in-run") in findings
    other_cpu = _run(tmp_path, "c", [{**ROWS[0], "step_s_median": 0.2}, ROWS[1]], device_name="Other CPU")
    assert not [f for f in compare(other_cpu, base) if f.metric == "step_s_median"]


def test_bad_baseline_and_tolerance_inputs(tmp_path, capsys):
    run = _run(tmp_path, "run", ROWS)
    (tmp_path / "junk.json").write_text("{not json")
    assert main(["check", str(run), "--baseline", str(tmp_path / "junk.json")]) == 2
    assert main(["check", str(run), "--baseline", str(tmp_path / "none.json")]) == 2
    assert main(["check", str(tmp_path / "nowhere"), "--baseline", str(tmp_path / "junk.json")]) == 2
    write_json(tmp_path / "ok.json", make_baseline(run))
    assert main(["check", str(run), "--baseline", str(tmp_path / "ok.json"), "--tol-memory", "lots"]) == 2
    assert load_baseline(tmp_path / "ok.json")["device_kind"] == "cpu"
    assert len(read_results(run)) == 2


def test_end_to_end_on_a_real_run(tmp_path, capsys):
    """Acceptance on a real (small) run: its own baseline passes, 6% more tracked bytes in one
    case fails with that case in the table, a baseline of another device kind is refused."""
    run = tmp_path / "run"
    train, forward = "trellisnet/debug/core/train/T32/B2/L4", "trellisnet/debug/core/eval/T32/B2/L4"
    assert main(["run", "--preset", "smoke", "--only", f"{train},{forward}", "--out", str(run),
                 "--no-progress", "--no-report"]) == 0
    rows = read_results(run).to_dict("records")
    assert sorted(r["case_id"] for r in rows) == sorted([train, forward])
    assert all(r["status"] == "ok" and r["tracked_bytes"] > 0 for r in rows)
    base = tmp_path / "base.json"
    assert main(["baseline", str(run), "-o", str(base)]) == 0
    assert main(["check", str(run), "--baseline", str(base)]) == 0

    worse = tmp_path / "worse"  # the same run, one case's tracked bytes 6% higher
    worse.mkdir()
    shutil.copy(run / "env.json", worse / "env.json")
    for row in rows:
        if row["case_id"] == train:
            row["tracked_bytes"] = round(row["tracked_bytes"] * 1.06)
        append_row(worse, {k: (None if isinstance(v, float) and math.isnan(v) else v)
                           for k, v in row.items()})
    capsys.readouterr()
    assert main(["check", str(worse), "--baseline", str(base)]) == 1
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("regression")]
    assert table and all(line.endswith(train) for line in table)
    assert any("tracked_bytes" in line and "+6.0%" in line for line in table)

    gpu = json.loads(base.read_text()) | {"device_kind": "nvidia-h100-80gb-hbm3",
                                          "device_name": "NVIDIA H100 80GB HBM3"}
    (tmp_path / "gpu.json").write_text(json.dumps(gpu))
    assert main(["check", str(run), "--baseline", str(tmp_path / "gpu.json")]) == 2
    assert "nvidia-h100-80gb-hbm3" in capsys.readouterr().err


# -- a check that compared nothing is not a pass --------------------------------------------------
OTHER = [{**ROWS[0], "case_id": "other/T8"}]


def test_no_shared_case_fails_unless_allowed(tmp_path, capsys):
    base = tmp_path / "base.json"
    assert main(["baseline", str(_run(tmp_path, "a", ROWS)), "-o", str(base)]) == 0
    other = _run(tmp_path, "other", OTHER)
    capsys.readouterr()
    assert main(["check", str(other), "--baseline", str(base)]) == 1
    out = capsys.readouterr().out
    assert "compared 0 of 2 baseline cases" in out and "2 missing" in out
    assert main(["check", str(other), "--baseline", str(base), "--allow-missing"]) == 0
    assert "compared 0 of 2 baseline cases" in capsys.readouterr().out


def test_a_partial_run_fails_unless_allowed_and_a_full_one_says_so(tmp_path, capsys):
    base = tmp_path / "base.json"
    assert main(["baseline", str(_run(tmp_path, "a", ROWS)), "-o", str(base)]) == 0
    capsys.readouterr()
    assert main(["check", str(_run(tmp_path, "full", ROWS)), "--baseline", str(base)]) == 0
    assert "compared 2 of 2 baseline cases" in capsys.readouterr().out
    half = _run(tmp_path, "half", ROWS[:1])
    assert main(["check", str(half), "--baseline", str(base)]) == 1
    out = capsys.readouterr().out
    assert "compared 1 of 2 baseline cases" in out and "1 missing" in out and "--allow-missing" in out
    assert main(["check", str(half), "--baseline", str(base), "--allow-missing"]) == 0
