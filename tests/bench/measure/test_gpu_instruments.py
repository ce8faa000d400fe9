"""The real NVML and CUDA allocator paths (need a GPU; skipped elsewhere)."""

import pytest

from bench.measure import Workload, measure
from models import list_models

pytestmark = pytest.mark.gpu
CUDA = "cuda"


def test_nvml_process_memory_holds_at_least_what_the_allocator_reserved(toys):
    # big enough that allocator segments, not the context, dominate
    workload = Workload(model="toy-stack", size="wide", phase="train", batch=8, seq_len=64,
                        depth=4, device=CUDA)
    row = measure(workload, ["torch_cuda", "nvml"])
    assert row["reserved_bytes"] >= row["peak_bytes"] > 0
    assert row["nvml_process_bytes"] is not None, row["notes"]
    assert row["nvml_process_bytes"] >= row["reserved_bytes"], row
    assert row["nvml_device_bytes"] >= row["reserved_bytes"]


def test_energy_per_token_over_a_window_of_a_second(toys):
    row = measure(Workload(model="toy-stack", phase="train", device=CUDA), ["nvml", "timing"])
    if "energy counter unavailable" in row["notes"]:
        pytest.skip(row["notes"])
    assert row["energy_j_per_token"] > 0 and row["nvml_energy_window_s"] >= 1.0


def _predicted_vs_cuda(name: str, phase: str, **kw) -> None:
    workload = Workload(model=name, phase=phase, batch=8, seq_len=64, device=CUDA, **kw)
    row = measure(workload, ["torch_cuda", "predicted"])
    model_peak = row["peak_bytes"] - row["cuda_preexisting_bytes"]  # less the cuBLAS workspace
    assert row["predicted_cuda_bytes"] == pytest.approx(model_peak, rel=0.10), row


@pytest.mark.parametrize("phase", ["train", "eval"])
@pytest.mark.parametrize("name", ["toy-deq", "toy-stack"])
def test_predicted_within_10_percent_of_torch_cuda_for_the_toys(toys, name, phase):
    _predicted_vs_cuda(name, phase)


@pytest.mark.parametrize("phase", ["train", "eval"])
@pytest.mark.parametrize("name", list_models())
def test_predicted_within_10_percent_of_torch_cuda_for_every_registered_model(name, phase):
    _predicted_vs_cuda(name, phase)
