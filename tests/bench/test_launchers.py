"""The launchers (bench.launchers): options, local workers in parallel, SLURM jobs on the local
test cluster (marked slurm). Rows of every launcher equal those of one local worker in their
deterministic columns; a driver SIGKILLed under SLURM and resumed re-attaches to its jobs."""

from __future__ import annotations

import json
import os
import random
import signal
import time

import pytest

from bench.cli import main
from bench.launchers import LauncherConfig, launcher_config, list_launchers
from bench.launchers.slurm import FOLDER, JOBS, end_row, saved_jobs
from bench.results import read_results
from bench.rundir import ROWS, holds_run
from tests.bench.test_runner import FAULTS, MATRIX, _deqbench, _finish
from tests.bench.test_runner_faults import DETERMINISTIC, _rows

ARGS = ("--instruments", "tracked,flops", "--no-progress", "--no-report")
SMALL = """
name = "toy-small"
[settings]
repeats = 1
threads = 1
[defaults]
seq_len = [8, 16]
batch = 2
[[sweep]]
model = ["toy-deq", "toy-tied"]
depth = 2
"""
# One case that finishes, one past its 1-minute SLURM limit, one over its SLURM memory limit.
LIMITS = """
name = "toy-limits"
[settings]
repeats = 1
threads = 1
timeout_s = 600
[defaults]
depth = 1
seq_len = 8
batch = 2
[[sweep]]
model = "toy-tied"
[[sweep]]
model = "toy-fault"
seq_len = 16
config = { fault = "sleep", seconds = 300.0 }
[[sweep]]
model = "toy-fault"
seq_len = 24
config = { fault = "hog", megabytes = 4000 }
"""


def _matrix(tmp_path, text, name="m.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


# -- options --------------------------------------------------------------------------------------
def test_the_registry_lists_both_launchers(capsys, toys):
    assert set(list_launchers()) == {"local", "slurm"}
    assert main(["list", "--json"]) == 0
    assert set(json.loads(capsys.readouterr().out)["launchers"]) == {"local", "slurm"}
    assert main(["list"]) == 0
    text = capsys.readouterr().out
    assert "launchers:" in text and "  slurm " in text


def test_the_matrix_table_gives_defaults_and_the_command_line_wins():
    config = launcher_config({"name": "slurm", "slurm_time": "1:30:10", "slurm_setup": "module load x"},
                             slurm_partition="gpu")
    assert (config.name, config.slurm_time, config.slurm_partition, config.slurm_setup) == \
        ("slurm", 91, "gpu", ("module load x",))
    assert launcher_config({"name": "slurm"}, name="local", workers=3).parallel == 3
    assert LauncherConfig().record() == {}  # one local worker: the fingerprint of before
    assert LauncherConfig(gpus=(0, 2)).record() == {"workers": 2}


@pytest.mark.parametrize("table, argv, words", [
    ("", ["--launcher", "pbs"], "unknown launcher 'pbs'; valid launchers: local, slurm"),
    ("", ["--workers", "0"], "--workers must be an integer from 1 to 256"),
    ("", ["--gpus", "0,x"], "bad --gpus '0,x'"),
    ("", ["--gpus", "0,1", "--device", "cpu"], "--gpus 0,1 needs CUDA"),
    ("", ["--workers", "2", "--gpus", "0"], "--workers 2 and --gpus 0 disagree"),
    ("", ["--slurm-time", "10"], "--slurm-time does not apply to --launcher local"),
    ("", ["--launcher", "slurm", "--workers", "2"], "--workers does not apply to --launcher slurm"),
    ("", ["--launcher", "slurm", "--slurm-time", "1:5"], "--slurm-time must be a positive number of minutes"),
    ("", ["--launcher", "slurm", "--slurm-mem", "4X"], "--slurm-mem must be sbatch --mem"),
    ("", ["--launcher", "slurm", "--slurm-partition", "a b"], "--slurm-partition must be a partition name"),
    ("", ["--launcher", "slurm", "--slurm-array-parallelism", "0"], "--slurm-array-parallelism must be"),
    ("[launcher]\nnodes = 2\n", [], "[launcher]: unknown key(s) ['nodes']; valid: name, workers"),
    ("[launcher]\nworkers = \"two\"\n", [], "--workers must be an integer"),
    ("launcher = 3\n", [], "[launcher] must be a table"),
])
def test_bad_launcher_options_are_one_line_and_write_nothing(tmp_path, capsys, toys, table, argv, words):
    matrix = _matrix(tmp_path, MATRIX + table if table.startswith("[") else table + MATRIX)
    out = tmp_path / "out"
    for command in ("run", "predict"):
        if command == "predict" and "--device" in argv:
            continue
        common = ARGS if command == "run" else ARGS[2:]  # predict has its one instrument
        assert main([command, "--matrix", str(matrix), *common, "--out", str(out), *argv]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and words in err[0], err
        assert not out.exists()


def test_slurm_end_states_become_statuses(tmp_path):
    log = tmp_path / "job.err"
    log.write_text("torch loaded\nslurmstepd: error: Job 7 exceeded memory limit (2100 > 2000), being killed\n")
    job = {"job_id": "7", "attempt": 1, "stderr": str(log)}
    config = LauncherConfig(name="slurm", slurm_time=5, slurm_mem="2G")
    assert end_row("TIMEOUT", job, config)["status"] == "timeout"
    assert "time limit of 5 min" in end_row("TIMEOUT", job, config)["error"]
    assert end_row("OUT_OF_MEMORY", job, config)["status"] == "oom"
    assert end_row("FAILED", job, config)["status"] == "oom"  # jobacct: FAILED, its log says why
    assert end_row("FAILED", {**job, "stderr": None}, config)["status"] == "error"
    assert end_row("CANCELLED", job, config)["status"] == "killed"  # resume runs it again
    for state in ("PREEMPTED", "NODE_FAIL"):
        assert end_row(state, job, config) is None  # submitted once more ...
        row = end_row(state, {**job, "attempt": 2}, config)
        assert row["status"] == "error" and "attempt 2 of 2" in row["error"]  # ... then an error


# -- local ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def one_worker(tmp_path_factory):
    """The toy matrix run by one local worker (the runner as it always was): its folder."""
    folder = tmp_path_factory.mktemp("one")
    out = folder / "run"
    code, _, err = _finish(_deqbench("run", "--matrix", str(_matrix(folder, MATRIX)), *ARGS, "--out", str(out)))
    assert code == 0, err
    return out


def test_two_local_workers_give_the_rows_of_one(tmp_path, one_worker):
    out = tmp_path / "run"
    code, _, err = _finish(_deqbench("run", "--matrix", str(_matrix(tmp_path, MATRIX)), *ARGS,
                                     "--workers", "2", "--out", str(out)))
    assert code == 0, err
    two, one = read_results(out), read_results(one_worker)
    assert two["case_id"].tolist() == one["case_id"].tolist()  # matrix order, though landed out of it
    assert two[DETERMINISTIC].equals(one[DETERMINISTIC])
    assert two["job_id"].isna().all()
    env = json.loads((out / "env.json").read_text())
    assert env["launcher"]["concurrent"] is True and env["launcher"]["workers"] == 2
    assert env["run"]["options"]["workers"] == 2 and env["matrix"]["settings"]["threads"] == 1
    assert "launcher" not in json.loads((one_worker / "env.json").read_text())
    pids = {line.split("worker pid ")[1].split(",")[0] for name in ("worker.log", "worker-1.log")
            for line in (out / name).read_text().splitlines() if "worker pid" in line}
    assert len(pids) == 2  # two workers, each with its own log
    assert main(["report", str(out)]) == 0
    report = (out / "report.md").read_text()
    assert "Timings taken with 2 concurrent workers" in report
    assert main(["report", str(one_worker)]) == 0
    assert "Timings taken with" not in (one_worker / "report.md").read_text()


def test_resume_with_another_worker_count_is_refused(tmp_path, one_worker):
    code, _, err = _finish(_deqbench("run", "--matrix", str(_matrix(tmp_path, MATRIX)), *ARGS,
                                     "--workers", "2", "--out", str(one_worker), "--resume"))
    assert code == 2 and "--workers (None there, 2 now)" in err, err


# -- slurm ----------------------------------------------------------------------------------------
def _slurm_args(cluster, *more):
    return ("--launcher", "slurm", "--slurm-partition", cluster.partition, *more)


@pytest.fixture(scope="module")
def limits_run(request, tmp_path_factory):
    """The LIMITS matrix under SLURM (1-minute, 1500 MB jobs), started before the other SLURM
    tests so that its minute past the limit overlaps them."""
    cluster = request.getfixturevalue("slurm_cluster")
    folder = tmp_path_factory.mktemp("limits")
    out = folder / "run"
    proc = _deqbench("run", "--matrix", str(_matrix(folder, LIMITS)), *ARGS,
                     *_slurm_args(cluster, "--slurm-time", "1", "--slurm-mem", "1500M"),
                     "--out", str(out), plugins=FAULTS)
    yield out, proc
    if proc.poll() is None:
        proc.kill()
        proc.communicate()


@pytest.mark.slurm
def test_slurm_rows_equal_one_local_worker(tmp_path, slurm_cluster, limits_run):
    matrix = _matrix(tmp_path, SMALL)
    local, out = tmp_path / "local", tmp_path / "slurm"
    code, _, err = _finish(_deqbench("run", "--matrix", str(matrix), *ARGS, "--out", str(local)))
    assert code == 0, err
    code, _, err = _finish(_deqbench("run", "--matrix", str(matrix), *ARGS, *_slurm_args(slurm_cluster),
                                     "--out", str(out)))
    assert code == 0, err
    rows, expected = read_results(out), read_results(local)
    assert rows[DETERMINISTIC].equals(expected[DETERMINISTIC])
    jobs = saved_jobs(out)
    assert rows["job_id"].tolist() == [jobs[c]["job_id"] for c in rows["case_id"]]
    for job_id in rows["job_id"]:
        assert slurm_cluster.job_state(job_id) == "COMPLETED"


@pytest.mark.slurm
def test_slurm_driver_sigkilled_then_resumed_reattaches(tmp_path, slurm_cluster, limits_run):
    """Three kills (while submitting, while jobs run, as a row lands) of a driver that submits a
    job array; every case ends once, no saved job is submitted again, rows as a local run's."""
    seed = int(os.environ.get("DEQBENCH_FAULT_SEED", random.randrange(2**32)))
    rng = random.Random(seed)
    matrix = _matrix(tmp_path, SMALL)
    out, local = tmp_path / "run", tmp_path / "local"
    args = ("run", "--matrix", str(matrix), *ARGS, *_slurm_args(slurm_cluster, "--slurm-array-parallelism", "2"),
            "--out", str(out))
    history = []
    for where in ("submit", "running", "row"):
        proc = _deqbench(*args, *(["--resume"] if holds_run(out) else []))
        deadline = time.monotonic() + 120
        if where == "submit":
            time.sleep(rng.uniform(1.0, 3.0))
        else:
            before = _rows(out)
            target = (lambda: saved_jobs(out)) if where == "running" else (lambda b=before: _rows(out) > b)
            while not target() and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.02)
            time.sleep(rng.uniform(0.0, 0.5))
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.communicate()
        history.append((where, _rows(out), len(saved_jobs(out)), proc.returncode))
    code, _, err = _finish(_deqbench(*args, "--resume"))
    assert code == 0, f"seed {seed}: {history}\n{err}"
    code, _, err = _finish(_deqbench("run", "--matrix", str(matrix), *ARGS, "--out", str(local)))
    assert code == 0, err
    rows = read_results(out)
    assert rows[DETERMINISTIC].equals(read_results(local)[DETERMINISTIC]), history
    assert len(list((out / ROWS).glob("*.json"))) == len(rows) == 4, history
    submitted = [json.loads(line)["case_id"] for line in (out / FOLDER / JOBS).read_text().splitlines()]
    assert sorted(submitted) == sorted(set(submitted)), f"a saved job was submitted again: {history}"
    print(f"seed {seed}: {history}")


@pytest.mark.slurm
def test_slurm_time_and_memory_limits_become_timeout_and_oom_rows(slurm_cluster, limits_run):
    out, proc = limits_run
    code, _, err = _finish(proc, timeout=400)
    assert code == 0, err
    rows = read_results(out).set_index("seq_len")
    assert rows.loc[8, "status"] == "ok"
    assert rows.loc[16, "status"] == "timeout" and "time limit of 1 min" in rows.loc[16, "error"]
    assert rows.loc[24, "status"] == "oom" and "--slurm-mem 1500M" in rows.loc[24, "error"]
    states = {n: slurm_cluster.job_state(rows.loc[n, "job_id"]) for n in (16, 24)}
    assert states[16] == "TIMEOUT", states
    assert states[24] in ("OUT_OF_MEMORY", "FAILED"), states  # FAILED: jobacct enforcement


def test_gpu_workers_are_pinned_one_per_gpu(tmp_path):
    """Without a GPU here: which CUDA_VISIBLE_DEVICES each slot's workers start with, and that a
    worker's start sees it (and the driver's environment is left as it was)."""
    from bench.launchers.local import LocalLauncher, _Slot
    from bench.runner import RunOptions, spawn_environment

    assert LocalLauncher(LauncherConfig(gpus=(0, 3))).gpus(RunOptions(device="cuda")) == [0, 3]
    assert LocalLauncher(LauncherConfig(workers=3)).gpus(RunOptions(device="cuda")) == [0, 1, 2]
    assert LocalLauncher(LauncherConfig(workers=2)).gpus(RunOptions(device="cpu")) == [None, None]
    assert LocalLauncher(LauncherConfig()).gpus(RunOptions(device="cuda:1")) == [None]  # as before
    slot = _Slot(1, 3, tmp_path)
    assert slot.environ == {"CUDA_VISIBLE_DEVICES": "3"} and slot.log == tmp_path / "worker-1.log"
    before = os.environ.get("CUDA_VISIBLE_DEVICES")
    with spawn_environment(None, slot.environ):
        assert os.environ["CUDA_VISIBLE_DEVICES"] == "3"
    assert os.environ.get("CUDA_VISIBLE_DEVICES") == before
