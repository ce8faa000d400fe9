"""How a CUDA failure reads as a row, faked on the CPU: every wording of out-of-memory the CUDA
stack uses is `oom` (a row, the run goes on), other CUDA errors are `error`."""

import pytest
import torch

from bench.spec import load_preset
from bench.worker import execute, is_oom

CUDA_OOM = ("CUDA out of memory. Tried to allocate 200.00 GiB. GPU 0 has a total capacity of "
            "139.81 GiB of which 138.20 GiB is free. Including non-PyTorch memory, this process "
            "has 1.55 GiB memory in use.")


@pytest.mark.parametrize("err", [
    torch.cuda.OutOfMemoryError(CUDA_OOM),                   # the caching allocator
    RuntimeError("CUDA error: out of memory\nCUDA kernel errors might be asynchronously reported"),
    RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"),
    RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED"),  # a library's own workspace
])
def test_cuda_out_of_memory_in_each_of_its_wordings_is_oom(err):
    assert is_oom(err)


@pytest.mark.parametrize("text", [
    "CUDA error: an illegal memory access was encountered",
    "CUDA error: CUBLAS_STATUS_EXECUTION_FAILED when calling `cublasSgemm( handle, ...)`",
])
def test_other_cuda_errors_are_errors(text):
    assert not is_oom(RuntimeError(text))


def test_a_cuda_oom_in_a_case_is_a_one_line_oom_row(monkeypatch):
    def out_of_memory(*args):
        raise torch.cuda.OutOfMemoryError(CUDA_OOM + "\nSee documentation for Memory Management")

    monkeypatch.setattr("bench.measure.case.measure_case", out_of_memory)
    preset = load_preset("gpu-validate")
    row = execute(preset.cases[0], "cuda", preset.settings, ())  # empty_cache: a no-op here
    assert row["status"] == "oom" and row["elapsed_s"] >= 0
    assert row["error"].startswith("OutOfMemoryError: CUDA out of memory. Tried to allocate 200.00 GiB")
    assert "\n" not in row["error"]
