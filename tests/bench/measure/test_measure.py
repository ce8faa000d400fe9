"""measure(): the instrument registry, the passes, and the result columns it owns."""

import pytest
import torch

from bench.measure import (
    RESULT_COLUMNS,
    Instrument,
    Workload,
    default_instruments,
    list_instruments,
    make_instrument,
    make_instruments,
    measure,
    register_instrument,
)
from bench.measure.instrument import MEMORY


def test_instruments_by_name_and_unknown_names_listed():
    assert list_instruments() == ["flops", "nvml", "predicted", "timing", "torch_cuda", "tracked"]
    with pytest.raises(ValueError, match="unknown instrument 'nvidia'; valid instruments: flops, nvml, "
                                         "predicted, timing, torch_cuda, tracked"):
        make_instruments(["tracked", "nvidia"])
    assert default_instruments("cpu") == ["tracked", "predicted", "flops", "timing"]
    assert default_instruments("cuda:1")[:2] == ["torch_cuda", "nvml"]
    with pytest.raises(ValueError, match="needs a name and passes"):
        register_instrument(type("Nameless", (Instrument,), {}))


def test_unknown_instrument_fails_before_anything_runs(toys, monkeypatch):
    monkeypatch.setattr("bench.measure.protocol.Bench", None)  # building anything would crash
    with pytest.raises(ValueError, match="unknown instrument"):
        measure(Workload(model="toy-stack"), ["tracked", "bogus"])
    with pytest.raises(ValueError, match="warmup must be >= 1"):
        measure(Workload(model="toy-stack"), ["tracked"], warmup=0)


def test_cpu_row_owns_every_column_and_gpu_ones_are_empty_with_reasons(toys, monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("read torch.cuda on a CPU workload")

    monkeypatch.setattr(torch.cuda, "max_memory_allocated", never)
    instruments = ["torch_cuda", "nvml", "tracked", "predicted", "flops",
                   make_instrument("timing", warmup=1, repeats=3)]
    row = measure(Workload(model="toy-deq", phase="train"), instruments)
    assert list(row)[: len(RESULT_COLUMNS)] == list(RESULT_COLUMNS)
    for column in ("reserved_bytes", "nvml_process_bytes", "nvml_device_bytes", "energy_j_per_token"):
        assert row[column] is None  # never 0
    assert "torch_cuda unavailable: the workload runs on cpu" in row["notes"]
    assert "nvml unavailable: the workload runs on cpu" in row["notes"]
    assert row["memory_source"] == "tracked" and row["peak_bytes"] == row["tracked_bytes"]
    assert row["activation_bytes"] == row["peak_bytes"] - row["static_bytes"] > 0
    assert row["predicted_bytes"] > 0 and row["flops_per_token"] > 0
    assert row["step_s_median"] > 0 and row["tokens_per_s"] > 0 and row["timing_steps"] == 3
    assert row["nfe_forward"] > 0 and row["nfe_backward"] > 0 and 0 <= row["residual_forward"] < 1e-3
    assert row["params"] == row["params_nonembed"] > 0 and row["diverged"] is False


def test_solver_workspace_is_broydens_history(toys):
    B, T, d, iters = 2, 32, 32, 12  # toy-deq debug: Broyden, max_iter = b_max_iter = 12
    row = measure(Workload(model="toy-deq", phase="train", batch=B, seq_len=T), ["tracked"])
    history = 2 * B * iters * T * d * 4  # U and V: (B, max_iter, T*d) fp32 each
    best = B * T * d * 4 + 2 * B * 4  # lowest-residual iterate and its residuals
    assert row["solver_workspace_bytes"] == history + best
    explicit = measure(Workload(model="toy-stack", phase="train"), ["tracked"])
    assert explicit["solver_workspace_bytes"] == 0 and explicit["residual_forward"] is None


def test_predict_only_builds_nothing_real(toys, monkeypatch):
    import bench.measure.protocol as protocol

    real_bench = protocol.Bench

    def fake_only(workload, *, fake=False):
        assert fake, "a real model was built for a prediction"
        return real_bench(workload, fake=True)

    monkeypatch.setattr(protocol, "Bench", fake_only)
    row = measure(Workload(model="toy-deq", phase="train"), ["predicted"])
    assert row["memory_source"] == "predicted" and row["peak_bytes"] == row["predicted_bytes"]
    assert row["nfe_forward"] == 12 and row["residual_forward"] is None  # fixed iterations
    assert row["tracked_bytes"] is None and row["step_s_median"] is None
    assert row["predict_s"] > 0


def test_memory_instruments_share_one_step_after_warm_up(toys):
    seen = []

    @register_instrument
    class Spy(Instrument):
        name, passes = "spy", (MEMORY,)

        def start(self, bench, pass_name):
            seen.append(("start", bench.steps, bench.optimizer.state != {}))

        def stop(self, bench, pass_name):
            seen.append(("stop", bench.steps))

    try:
        measure(Workload(model="toy-stack"), ["tracked", "spy"], warmup=2)
    finally:
        from bench.measure import INSTRUMENTS

        INSTRUMENTS.pop("spy")
    assert seen == [("start", 2, True), ("stop", 3)]
