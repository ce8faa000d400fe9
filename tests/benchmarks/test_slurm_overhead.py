"""Per-job overhead of the local SLURM test cluster: a trivial submitit job from submit to result.

    tox -e bench -- -k slurm        # or: pytest tests/benchmarks -k slurm --benchmark-enable

The case's own work is nil (pow(2, 10)), so each time is what SLURM and submitit cost per job:
sbatch, the scheduler's next 1 s tick, launch of the batch and srun steps, the job's Python start
and submitit's unpickling and result file. `result_file` polls for that file every 10 ms (what a
launcher that watches result files pays); `job_result` is submitit's `job.result()`, which polls
once a second. See tests/slurm_cluster.py for the slurm.conf chosen for speed.
"""

from __future__ import annotations

import time

import pytest
import submitit

pytestmark = pytest.mark.slurm


@pytest.fixture
def executor(slurm_cluster, tmp_path):
    ex = submitit.AutoExecutor(folder=tmp_path / "%j", cluster="slurm")
    ex.update_parameters(slurm_partition=slurm_cluster.partition, timeout_min=5)
    return ex


def test_result_file(benchmark, executor):
    def one_job():
        job = executor.submit(pow, 2, 10)
        while not job.paths.result_pickle.exists():
            time.sleep(0.01)
        return job

    job = benchmark.pedantic(one_job, rounds=10, iterations=1, warmup_rounds=1)
    assert job.result() == 1024


def test_job_result(benchmark, executor):
    result = benchmark.pedantic(
        lambda: executor.submit(pow, 2, 10).result(), rounds=10, iterations=1, warmup_rounds=1
    )
    assert result == 1024
