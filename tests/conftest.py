import gc

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


def pytest_sessionstart(session):
    """Freeze what the imports made (torch, fake tensors, dynamo: ~300k objects) so that the
    gc.collect() calls of the measurements walk only what a test made."""
    import torch._dynamo  # the first optimizer step imports it anyway
    import torch._subclasses.fake_tensor  # noqa: F401

    gc.collect()
    gc.freeze()
