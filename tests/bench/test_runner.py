"""The runner end to end, in real spawned workers, on the toy models (fast)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.results import read_results

ROOT = Path(__file__).resolve().parents[2]
MATRIX = """
name = "toy"
[settings]
repeats = 1
threads = 1
[defaults]
seq_len = [8, 16, 24]
batch = 2
[[sweep]]
model = ["toy-deq", "toy-tied"]
depth = [2, 4]
"""


def _deqbench(*args, env_extra=None, **kwargs):
    env = {**os.environ, "DEQBENCH_PLUGINS": "tests.bench.toy_plugin", "PYTHONPATH": str(ROOT),
           **(env_extra or {})}
    return subprocess.Popen([sys.executable, "-m", "bench", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def _finish(proc, timeout=240):
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


@pytest.fixture
def matrix_file(tmp_path):
    path = tmp_path / "toy.toml"
    path.write_text(MATRIX)
    return path


def test_sigkill_then_resume_equals_a_clean_run(tmp_path, matrix_file):
    args = ("run", "--matrix", str(matrix_file), "--instruments", "tracked", "--no-progress",
            "--no-report")
    clean = tmp_path / "clean"
    code, _, err = _finish(_deqbench(*args, "--out", str(clean)))
    assert code == 0, err
    full = read_results(clean)
    assert len(full) == 9 and set(full["status"]) == {"ok"}

    killed = tmp_path / "killed"
    proc = _deqbench(*args, "--out", str(killed))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # kill once some, not all, rows are in
        csv = killed / "results.csv"
        if csv.exists() and csv.read_text().count("\n") >= 3:
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()
    partial = read_results(killed)  # readable, finished rows only
    assert 2 <= len(partial) < 9 and set(partial["status"]) == {"ok"}
    before = set(partial["case_id"])

    code, _, err = _finish(_deqbench(*args, "--out", str(killed), "--resume"))
    assert code == 0, err
    resumed = read_results(killed)
    assert sorted(resumed["case_id"]) == sorted(full["case_id"])  # nothing twice, nothing lost
    assert resumed["case_id"].is_unique
    assert set(resumed["case_id"]) - before == set(full["case_id"]) - before
    key = ["case_id", "tracked_bytes", "params"]
    assert (resumed[key].sort_values("case_id").reset_index(drop=True)
            .equals(full[key].sort_values("case_id").reset_index(drop=True)))


def test_case_over_memory_limit_is_an_oom_row_and_the_run_goes_on(tmp_path):
    matrix = tmp_path / "big.toml"
    matrix.write_text("""
[settings]
repeats = 1
threads = 1
[defaults]
batch = 64
[[sweep]]
model = "toy-tied"
depth = 2
seq_len = [4096, 8]
size = "big"
""")
    out = tmp_path / "run"
    code, stdout, err = _finish(_deqbench("run", "--matrix", str(matrix), "--out", str(out),
                                          "--memory-limit", "40MB", "--instruments", "tracked",
                                          "--no-progress", "--no-report"))
    assert code == 0, err
    df = read_results(out).set_index("seq_len")
    assert df.loc[4096, "status"] == "oom"  # 64 x 4096 x 64 floats = 67 MB per activation
    assert "memory" in df.loc[4096, "error"].lower()
    assert df.loc[8, "status"] == "ok" and df.loc[8, "tracked_bytes"] > 0
    assert "1 case(s) not ok" in stdout


def test_diverging_solver_is_a_row_not_a_crash(tmp_path):
    matrix = tmp_path / "div.toml"
    matrix.write_text("""
[settings]
repeats = 1
threads = 1
[[sweep]]
model = "toy-deq"
seq_len = 8
batch = 2
solver = "fixed_point"
config = { blowup = true }
""")
    out = tmp_path / "run"
    code, _, err = _finish(_deqbench("run", "--matrix", str(matrix), "--out", str(out),
                                     "--instruments", "tracked", "--no-progress", "--no-report"))
    assert code == 0, err
    row = read_results(out).iloc[0]
    assert row["status"] == "diverged" and row["tracked_bytes"] > 0
