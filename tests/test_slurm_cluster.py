"""The local SLURM test cluster gives the end states a real cluster gives, through submitit.

These test the infrastructure (tests/slurm_cluster.py, fixture `slurm_cluster`); the launcher's
own tests reuse the fixture. SLURM checks time limits every 30 s (PERIODIC_TIMEOUT, compiled in),
so a job with the minimum limit of 1 minute ends TIMEOUT 60-90 s after it starts: the over-running
jobs are submitted before this module's first test and checked by its last ones.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.slurm_cluster import missing_reason, start_cluster

# Dependencies of the project, but not of a machine that installs it with --no-deps (a GPU image:
# tools/gpu_check.sh): there `pytest -m gpu` must still collect this module.
cloudpickle = pytest.importorskip("cloudpickle")
submitit = pytest.importorskip("submitit")

pytestmark = pytest.mark.slurm

# The job functions below travel by value, so a job does not import this module (or pytest).
cloudpickle.register_pickle_by_value(sys.modules[__name__])

FINISHED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL"}


def executor(cluster, folder: Path, **params):
    ex = submitit.AutoExecutor(folder=folder / "%j", cluster="slurm")
    ex.update_parameters(
        **{"slurm_partition": cluster.partition, "timeout_min": 1, "slurm_mem": "200M", **params}
    )
    return ex


def submitit_state(job) -> str:
    """submitit's reading of the job's state, from a fresh sacct call ("CANCELLED by 0" ->
    "CANCELLED")."""
    job.get_info(mode="force")
    return job.state.split()[0]


def wait_running(cluster, job, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while cluster.job_state(job.job_id) != "RUNNING":
        assert time.monotonic() < deadline, f"job {job.job_id} did not start: {cluster.logs()}"
        time.sleep(0.1)


def hog_memory(total_mb: int = 2000, chunk_mb: int = 10) -> int:
    """Touch memory 10 MB at a time, slowly enough for a 1 s RSS poll to catch it."""
    chunks = []
    for _ in range(total_mb // chunk_mb):
        chunks.append(b"x" * (chunk_mb << 20))
        time.sleep(0.02)
    return len(chunks)


def run_twice(marker: str) -> int:
    """Count this start in `marker`; the first run waits to be requeued, the second returns."""
    with open(marker, "a") as f:
        f.write("run\n")
    runs = len(Path(marker).read_text().splitlines())
    if runs == 1:
        time.sleep(300)
    return runs


@pytest.fixture(scope="module", autouse=True)
def overrunning(slurm_cluster, tmp_path_factory):
    """Jobs that sleep past their 1-minute limit, started first so their wait overlaps the other
    tests. SLURM sends submitit's warning signal (--signal=USR2@90, no "B:") to job steps only:
    `no-warning` (slurm_signal_delay_s=0) and `batch-step` (slurm_use_srun=False: no step, as the
    slurm launcher runs its jobs) never get it, so SLURM kills them at their limit. (A job under
    submitit's srun gets the signal at a time-limit check and may FAIL before its limit; whether
    it does depends on when that check falls on a loaded machine, so it is not tested: the
    launcher does not use srun.)"""
    folder = tmp_path_factory.mktemp("overrunning")
    params = {"no-warning": {"slurm_signal_delay_s": 0}, "batch-step": {"slurm_use_srun": False}}
    jobs = {name: executor(slurm_cluster, folder, **p).submit(time.sleep, 300)
            for name, p in params.items()}
    yield jobs
    for job in jobs.values():
        job.cancel(check=False)


def test_cluster_is_up_with_accounting(slurm_cluster):
    assert slurm_cluster.idle()
    clusters = slurm_cluster.run("sacctmgr", "-n", "-P", "list", "cluster", "format=cluster")
    assert slurm_cluster.name in clusters.split()
    assert slurm_cluster.partition in slurm_cluster.run("sinfo", "-h", "-o", "%R")


def test_map_array_returns_results(slurm_cluster, tmp_path):
    ex = executor(slurm_cluster, tmp_path, slurm_array_parallelism=3)
    jobs = ex.map_array(pow, [1, 2, 3], [2, 2, 2])
    assert [job.result() for job in jobs] == [1, 4, 9]
    assert len({job.job_id.split("_")[0] for job in jobs}) == 1  # one array, three tasks
    for job in jobs:
        assert slurm_cluster.wait_state(job.job_id, FINISHED) == "COMPLETED"
        assert submitit_state(job) == "COMPLETED"


@pytest.mark.parametrize("use_srun", [False, True], ids=["batch-step", "srun-step"])
def test_memory_limit_kills_the_job(slurm_cluster, tmp_path, use_srun):
    """--mem 100M, 2 GB touched. With cgroups the kernel OOM-kills it: OUT_OF_MEMORY on the step
    that ran the function, and on the job when that step is the batch script (slurm_use_srun=
    False); through submitit's default srun the batch script only sees srun fail, so the job row
    is FAILED. Without cgroups SLURM's RSS poll kills the step: FAILED, with the reason in stderr."""
    job = executor(slurm_cluster, tmp_path, slurm_mem="100M", slurm_use_srun=use_srun).submit(
        hog_memory
    )
    state = slurm_cluster.wait_state(job.job_id, FINISHED, timeout=60)
    step = slurm_cluster.sacct(job.job_id)[f"{job.job_id}.{'0' if use_srun else 'batch'}"]
    if slurm_cluster.memory_enforcement == "cgroup":
        assert step["State"] == "OUT_OF_MEMORY"
        assert state == ("FAILED" if use_srun else "OUT_OF_MEMORY")
        assert "oom-kill event" in job.stderr()
    else:
        assert state == "FAILED"
        assert step["State"].startswith("CANCELLED")
        assert "exceeded memory limit" in job.stderr()
    assert submitit_state(job) == state
    assert not job.paths.result_pickle.exists()  # job.result() raises UncompletedJobError


def test_requeue_runs_the_job_again(slurm_cluster, tmp_path):
    marker = tmp_path / "runs.txt"
    job = executor(slurm_cluster, tmp_path).submit(run_twice, str(marker))
    wait_running(slurm_cluster, job)
    while not marker.exists():
        time.sleep(0.1)
    slurm_cluster.run("scontrol", "requeue", job.job_id)
    assert job.result() == 2  # the second run saw both starts
    # The result file lands before the job ends: wait for accounting to say so.
    assert slurm_cluster.wait_state(job.job_id, FINISHED) == "COMPLETED"
    runs = [row["State"] for row in slurm_cluster.sacct_history(job.job_id)
            if row["JobID"] == job.job_id]
    assert runs == ["REQUEUED", "COMPLETED"]  # sacct --duplicates keeps the first run


def test_scancel_of_a_running_job(slurm_cluster, tmp_path):
    job = executor(slurm_cluster, tmp_path).submit(time.sleep, 300)
    wait_running(slurm_cluster, job)
    started = time.monotonic()
    slurm_cluster.run("scancel", job.job_id)
    assert slurm_cluster.wait_state(job.job_id, FINISHED, timeout=30) == "CANCELLED"
    assert time.monotonic() - started < 10  # KillWait=2: SIGTERM (ignored by submitit), SIGKILL
    assert submitit_state(job) == "CANCELLED"


def test_a_second_cluster_runs_beside_and_stops_clean(slurm_cluster):
    """Ports, paths, job ids and cgroups are private to each cluster, and stop() leaves nothing."""
    if missing_reason():
        pytest.skip(missing_reason())
    with tempfile.TemporaryDirectory(prefix="slurm-second-") as root:
        second = start_cluster(Path(root))
        with second:
            assert second.conf != slurm_cluster.conf
            job = second.run("sbatch", "--parsable", "-o", "/dev/null", "--wrap", "sleep 300")
            second.wait_state(job.strip(), {"RUNNING"}, timeout=30)
            pids = [proc.pid for proc in second.procs.values()]
        assert not [pid for pid in pids if Path(f"/proc/{pid}").exists()]
        assert not [p for p in Path("/proc").glob("[0-9]*") if _has_conf(p, second.conf)]
    assert slurm_cluster.partition in slurm_cluster.run("sinfo", "-h", "-o", "%R")  # still serves


def _has_conf(proc: Path, conf: Path) -> bool:
    try:
        return f"SLURM_CONF={conf}".encode() in (proc / "environ").read_bytes().split(b"\0")
    except OSError:
        return False


@pytest.mark.parametrize("name", ["no-warning", "batch-step"])
def test_time_limit_ends_in_timeout(slurm_cluster, overrunning, name):
    job = overrunning[name]
    assert slurm_cluster.wait_state(job.job_id, FINISHED, timeout=150) == "TIMEOUT"
    assert submitit_state(job) == "TIMEOUT"
    elapsed = slurm_cluster.sacct(job.job_id)[job.job_id]["Elapsed"]
    assert "00:01:00" <= elapsed <= "00:01:45"  # the 1-minute limit, seen within one 30 s check
