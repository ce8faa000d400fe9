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


FAULTS = "tests.bench.fault_plugin"  # the toys and toy-fault (sleeps, kills itself, fails noisily)
TOY_ARGS = ("--instruments", "tracked", "--no-progress", "--no-report")


def _deqbench(*args, env_extra=None, plugins="tests.bench.toy_plugin", **kwargs):
    env = {**os.environ, "DEQBENCH_PLUGINS": plugins, "PYTHONPATH": str(ROOT), **(env_extra or {})}
    return subprocess.Popen([sys.executable, "-m", "bench", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def _wait_for(condition, timeout=120, what="a condition"):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _files(run_dir):
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


def _children(pid):
    """Pids of the live processes whose parent is `pid` (Linux /proc)."""
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            kids.append(int(stat.parent.name))
    return kids


def _alive(pid):
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return False
    return fields[0] != "Z"


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


def test_resume_refuses_another_selection_or_setting_and_writes_nothing(tmp_path, matrix_file):
    out = tmp_path / "run"
    code, _, err = _finish(_deqbench("run", "--matrix", str(matrix_file), *TOY_ARGS, "--only", "T8",
                                     "--out", str(out)))
    assert code == 0, err
    assert len(read_results(out)) == 3
    before = _files(out)
    for other in (("--only", "T16"), ("--only", "T8", "--threads", "2")):
        code, _, err = _finish(_deqbench("run", "--matrix", str(matrix_file), *TOY_ARGS, *other,
                                         "--out", str(out), "--resume"))
        assert code == 2, err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("deqbench: error: cannot resume"), err
        assert "another --out" in lines[0] and "--only T8" in lines[0]  # the command it started with
        assert _files(out) == before  # nothing written
    assert "[settings] threads (1 there, 2 now)" in lines[0]


def test_a_busy_folder_is_refused_naming_its_holder_and_workers_die_with_their_runner(tmp_path):
    matrix = tmp_path / "slow.toml"
    matrix.write_text(SLOW)
    out = tmp_path / "run"
    runner = _deqbench("run", "--matrix", str(matrix), *TOY_ARGS, "--out", str(out), plugins=FAULTS)
    try:
        lock = out / "run.lock"
        _wait_for(lambda: lock.exists() and f'"pid": {runner.pid}' in lock.read_text(), what="the lock")
        _wait_for(lambda: "toy-fault" in _text(out / "worker.log"), what="the slow case to start")
        for resume in ((), ("--resume",)):
            code, _, err = _finish(_deqbench("run", "--matrix", str(matrix), *TOY_ARGS, "--out",
                                             str(out), *resume, plugins=FAULTS))
            lines = err.strip().splitlines()
            assert code == 2 and len(lines) == 1, err
            assert f"in use by pid {runner.pid} on " in lines[0] and " since " in lines[0], err
            assert "deqbench run --matrix" in lines[0]  # the holder's command
        workers = _children(runner.pid)
        assert workers, "the runner has no worker"
        os.kill(runner.pid, signal.SIGKILL)
        runner.communicate()
        _wait_for(lambda: not any(_alive(w) for w in workers), timeout=5, what="the workers to die")
    finally:
        if runner.poll() is None:
            runner.kill()
            runner.communicate()
    from bench.rundir import RunLock

    RunLock.acquire(out).release()  # the dead runner's lock does not block


SLOW = """
[settings]
repeats = 1
threads = 1
[[sweep]]
model = "toy-fault"
depth = 1
seq_len = 8
batch = 2
config = { fault = "sleep", seconds = 60.0 }
"""


def _text(path):
    return path.read_text() if path.exists() else ""


FAULTY = """
[settings]
repeats = 1
threads = 1
[defaults]
seq_len = 8
batch = 2
depth = 1
[[sweep]]
model = "toy-fault"
config = { fault = "sigkill" }
[[sweep]]
model = "toy-fault"
config = { fault = "noisy" }
[[sweep]]
model = "toy-tied"
"""


def test_a_killed_worker_is_killed_not_oom_and_failed_rows_run_again_when_asked(tmp_path):
    matrix = tmp_path / "faulty.toml"
    matrix.write_text(FAULTY)
    out = tmp_path / "run"
    args = ("run", "--matrix", str(matrix), *TOY_ARGS, "--out", str(out))
    code, stdout, err = _finish(_deqbench(*args, plugins=FAULTS))
    assert code == 0, err
    df = read_results(out).set_index("model")
    rows = read_results(out)
    status = dict(zip(rows["case_id"], rows["status"], strict=True))
    killed = next(c for c in status if "sigkill" in c)
    noisy = next(c for c in status if "noisy" in c)
    assert status[killed] == "killed", status  # no sign of out-of-memory: not `oom`
    error = rows.set_index("case_id").loc[killed, "error"]
    assert "SIGKILL" in error and "oom" not in error.lower().replace("oom_kill", ""), error
    assert status[noisy] == "error" and df.loc["toy-tied", "status"] == "ok"
    # the noisy case's 30 lines went to worker.log, not the terminal; its row keeps the first line
    assert "noise line" not in err + stdout and "Traceback" not in err
    log = (out / "worker.log").read_text()
    assert log.count("toy-fault noise line") == 30
    assert rows.set_index("case_id").loc[noisy, "error"].startswith(
        "RuntimeError: toy-fault failed on purpose [fault_plugin.py:")

    def runs_of(case_id):
        return (out / "worker.log").read_text().count(f"--- {case_id} (")

    code, _, err = _finish(_deqbench(*args, "--resume", plugins=FAULTS))
    assert code == 0, err
    assert (runs_of(killed), runs_of(noisy)) == (2, 1)  # a killed case runs again; a failed one not
    code, _, err = _finish(_deqbench(*args, "--resume", "--retry-failed", plugins=FAULTS))
    assert code == 0, err
    tied = next(c for c in status if c.startswith("toy-tied/"))
    assert (runs_of(killed), runs_of(noisy), runs_of(tied)) == (3, 2, 1)
    again = read_results(out)
    assert again["case_id"].tolist() == rows["case_id"].tolist()  # replaced, not duplicated
    assert len(list((out / "rows").iterdir())) == 3


def test_ctrl_c_exits_130_with_one_line_and_resume_finishes(tmp_path, matrix_file):
    out = tmp_path / "run"
    args = ("run", "--matrix", str(matrix_file), *TOY_ARGS, "--out", str(out))
    proc = _deqbench(*args, start_new_session=True)  # its own process group, like a terminal's
    _wait_for(lambda: _text(out / "results.csv").count("\n") >= 3, what="two rows")
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C does: the whole group, workers included
    code, stdout, err = _finish(proc)
    assert code == 130, err
    assert "Traceback" not in err + stdout
    lines = [line for line in err.splitlines() if not line.startswith("running ")]
    assert len(lines) == 1 and lines[0].startswith("deqbench: interrupted;"), err
    assert f"--out {out} --resume" in lines[0]
    kept = len(read_results(out))
    assert 2 <= kept < 9
    code, _, err = _finish(_deqbench(*args, "--resume"))
    assert code == 0, err
    resumed = read_results(out)
    assert len(resumed) == 9 and resumed["case_id"].is_unique


def test_a_tiny_memory_limit_gives_oom_rows_not_a_timeout_or_an_error(tmp_path):
    """The issue's command: the DEQ's fake-tensor pass used to crawl at the limit until the
    case's time limit (pymalloc retrying a 1 MiB arena per allocation), and TrellisNet's conv
    failed as oneDNN's 'could not create a primitive' (its JIT buffer could not be mapped)."""
    out = tmp_path / "m1"
    only = "deq-transformer/debug/core/train/T128,trellisnet/debug/core/eval/T32/B2/L4"
    started = time.monotonic()
    code, _, err = _finish(_deqbench("run", "--preset", "smoke", "--only", only, "--memory-limit",
                                     "1MB", "--out", str(out), "--no-progress", "--no-report"))
    assert code == 0, err
    rows = read_results(out).set_index("model")
    assert rows["status"].to_dict() == {"deq-transformer": "oom", "trellisnet": "oom"}, rows["error"]
    assert time.monotonic() - started < 100  # never the 120 s time limit
