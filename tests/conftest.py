import os

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if "slow" not in (config.getoption("-m") or ""):  # slow tests run only when asked: -m slow
        skip_slow = pytest.mark.skip(reason="slow: run with -m slow")
        for item in items:
            if "slow" in item.keywords:
                item.add_marker(skip_slow)
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Test tensors are tiny: a second intra-op thread only adds contention (on two shared
    cores it made steps up to 100x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A fresh single-node SLURM cluster with accounting (tests/slurm_cluster.py), started on first
    use and stopped, by PID, at the end of the session. SLURM_CONF points at it for the session, so
    submitit and any subprocess talk to it; `slurm_cluster.env` is that environment and
    `slurm_cluster.partition` its partition. Skips where the packages are not installed or the
    cluster cannot start; with DEQBENCH_REQUIRE_SLURM=1 (.ci/run sets it once apt installed them)
    that is a failure instead. DEQBENCH_SLURM_MEMORY=jobacct tests the cgroup-less memory limits
    on a machine that has cgroups (default: auto)."""
    from tests.slurm_cluster import SlurmUnavailable, start_cluster

    def unavailable(reason: str):
        if os.environ.get("DEQBENCH_REQUIRE_SLURM") == "1":
            pytest.fail(f"{reason} (DEQBENCH_REQUIRE_SLURM=1)", pytrace=False)
        pytest.skip(reason)

    try:
        cluster = start_cluster(
            tmp_path_factory.mktemp("slurm"),
            memory_enforcement=os.environ.get("DEQBENCH_SLURM_MEMORY", "auto"),
        )
    except SlurmUnavailable as err:
        unavailable(str(err))
    except RuntimeError as err:
        unavailable(f"SLURM test cluster did not start: {err}")
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("SLURM_CONF", str(cluster.conf))
            yield cluster
    finally:
        cluster.stop()
