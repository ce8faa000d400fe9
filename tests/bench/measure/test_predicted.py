"""`predicted` (fake tensors, no allocation) against `tracked` (a real step), and at paper sizes."""

import dataclasses
import os
import threading
import time

import pytest
import torch

from bench.measure import Bench, Workload, fake_tensors, make_instrument, measure
from models import list_models, model_spec
from tests.bench.toy_models import TOY_MODELS

REGISTERED = list_models()  # the real families; empty until they are merged into this tree
PAPER_SIZES = [(m, s) for m in REGISTERED for s in model_spec(m).sizes if s.startswith("paper")]
ITERATIONS = 6


def _like_for_like(name: str) -> tuple[tuple[str, float], ...]:
    """A prediction runs every solve for max_iter iterations; tol 0 makes the real step do the
    same, so both count the same work (memory that grows with NFE, as under `unrolled`). Few
    iterations keep the test fast: buffers are sized by max_iter, so nothing else changes."""
    fields = {f.name for f in dataclasses.fields(model_spec(name).config)}
    wanted = {"tol": 0.0, "b_tol": 0.0, "max_iter": ITERATIONS, "b_max_iter": ITERATIONS}
    return tuple((key, value) for key, value in wanted.items() if key in fields)


def _compare(name: str, phase: str, mode: str, overrides=()) -> dict:
    workload = Workload(model=name, phase=phase, mode=mode, batch=2, seq_len=32,
                        overrides=(*_like_for_like(name), *overrides))
    row = measure(workload, ["tracked", "predicted"])
    # exact: the same storages live at every moment of the step, fake or real
    assert row["predicted_bytes"] == row["tracked_bytes"], (name, phase, mode)
    assert row["predicted_static_bytes"] == row["tracked_static_bytes"], (name, phase, mode)
    return row


@pytest.mark.parametrize("phase", ["train", "eval"])
@pytest.mark.parametrize("name", [m for m in REGISTERED if model_spec(m).variant != "hf"])
def test_predicted_matches_tracked_for_every_registered_model(name, phase):
    # core mode, the paper's protocol; lm mode's embedding, head and cross-entropy are covered
    # by the toy models below
    _compare(name, phase, "core")


@pytest.mark.parametrize("phase", ["train", "eval"])
@pytest.mark.parametrize("name", [m for m in REGISTERED if model_spec(m).variant == "hf"])
def test_predicted_of_hf_models_overestimates_only_by_the_mask(name, phase):
    """transformers treats a FakeTensor as "tracing" and then materialises the causal mask that
    a real step leaves to SDPA's is_causal: the fake step holds a few T x T temporaries more."""
    B, T = 2, 32
    row = measure(Workload(model=name, phase=phase, batch=B, seq_len=T), ["tracked", "predicted"])
    gap = row["predicted_bytes"] - row["tracked_bytes"]
    assert 0 <= gap <= 4 * 4 * B * T * T, gap  # a few float (B, 1, T, T) masks at most


@pytest.mark.parametrize("phase", ["train", "eval"])
@pytest.mark.parametrize("mode", ["core", "lm"])
@pytest.mark.parametrize("name", TOY_MODELS)
def test_predicted_matches_tracked_for_the_toy_models(toys, name, mode, phase):
    row = _compare(name, phase, mode)
    # beside the exact count, one rounded like CUDA's allocator: every storage a multiple of 512
    assert row["predicted_cuda_bytes"] % 512 == 0 and row["predicted_cuda_static_bytes"] % 512 == 0
    assert row["predicted_cuda_bytes"] >= row["predicted_bytes"]
    assert row["tracked_static_bytes"] < row["tracked_bytes"]


def _state(bench: Bench) -> list:
    """Every tensor that lives across steps, as (where, shape, dtype): model, optimizer state
    (per parameter, by key), inputs, targets, segment memory."""
    out = [("param", tuple(t.shape), t.dtype) for t in (*bench.model.parameters(), *bench.model.buffers())]
    for i, p in enumerate(bench.model.parameters()):
        state = bench.optimizer.state.get(p, {}) if bench.optimizer else {}
        out += [(f"optimizer {i} {k}", tuple(v.shape), v.dtype) for k, v in sorted(state.items())]
    extra = [("inputs", bench.inputs), ("targets", bench.targets)]
    memory = bench.memory
    if memory is not None:  # a model's own record of tensors (SegmentMemory, TrellisNetMemory, ...)
        fields = vars(memory) if hasattr(memory, "__dict__") else dict(enumerate(memory))
        extra += [(f"memory {k}", v) for k, v in fields.items()]
    out += [(k, None if v is None else tuple(v.shape), None if v is None else v.dtype) for k, v in extra]
    return out


def _primed_or_warmed(workload: Workload, prime: bool) -> tuple[dict, list]:
    with fake_tensors():
        bench = Bench(workload, fake=True)
        bench.prime() if prime else bench.warm_up()
        state = _state(bench)
        predicted = make_instrument("predicted")
        with predicted.observing(bench):
            bench.step()
    return predicted.results(), state


@pytest.mark.parametrize("mode", ["core", "lm"])
@pytest.mark.parametrize("name", [*REGISTERED, *TOY_MODELS])
def test_prime_leaves_what_a_warm_up_step_leaves(toys, name, mode):
    """`predicted` primes its fake bench (a forward, then Adam's step on zero gradients of the
    parameters the loss reaches) instead of running a whole warm-up step: the same tensors live
    afterwards (gpt2's core mode leaves its token embedding without a gradient, hence without Adam
    state), and the step counted after it has the same static bytes and peak."""
    workload = Workload(model=name, mode=mode, phase="train", batch=2, seq_len=16,
                        overrides=_like_for_like(name))
    (primed, primed_state), (warmed, warmed_state) = (_primed_or_warmed(workload, p) for p in (True, False))
    assert primed_state == warmed_state
    assert any(k.startswith("optimizer") for k, _, _ in primed_state)
    for key in ("predicted_bytes", "predicted_static_bytes", "predicted_cuda_bytes"):
        assert primed[key] == warmed[key], key


def test_prime_is_for_fake_benches_only():
    with pytest.raises(RuntimeError, match="fake"):
        Bench(Workload(model=REGISTERED[0])).prime()


def test_predicted_counts_the_same_stacked_on_any_fake_mode(toys):
    """Hosted by the bench's fake mode or entered over a plain FakeTensorMode, one count."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from models import fixed_iterations

    workload = Workload(model="toy-deq", phase="train", batch=2, seq_len=8)
    results = []
    for mode in (fake_tensors(), FakeTensorMode(allow_non_fake_inputs=True)):
        with mode, fixed_iterations():
            bench = Bench(workload, fake=True)
            bench.prime()
            predicted = make_instrument("predicted")
            with predicted.observing(bench):
                bench.step()
            results.append(predicted.results())
    assert results[0] == results[1]
    assert torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.FAKE) is None


@pytest.mark.parametrize(
    "overrides",
    [(("solver", "anderson"),), (("solver", "fixed_point"),), (("backward", "phantom"),),
     (("backward", "unrolled"),)],
    ids=lambda o: "-".join(str(v) for _, v in o),
)
def test_predicted_matches_tracked_for_deq_solvers_and_backwards(toys, overrides):
    row = _compare("toy-deq", "train", "core", overrides)
    assert row["nfe_forward"] == ITERATIONS and row["nfe_backward"] is not None


class RssPeak:
    """Peak growth of this process's resident memory while the block runs (Linux /proc)."""

    def __enter__(self):
        self.base = self.peak = self._rss()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._done.set()
        self._thread.join()
        self.growth = max(self.peak, self._rss()) - self.base

    def _run(self):
        while not self._done.wait(0.01):
            self.peak = max(self.peak, self._rss())

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _predict_paper(name: str, size: str, phase: str = "train") -> tuple[dict, float, int]:
    workload = Workload(model=name, size=size, mode="core", phase=phase, batch=15, seq_len=150)
    started = time.perf_counter()
    with RssPeak() as rss:
        row = measure(workload, ["predicted"])
    return row, time.perf_counter() - started, rss.growth


needs_proc = pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs Linux /proc")


@needs_proc
def test_predicted_70_layer_stack_at_paper_shape_is_fast_and_allocates_nothing(toys):
    # 70 layers of d 1024 / FFN 4096 (~590M params) at the paper's protocol: B 15, T 150, core
    row, seconds, growth = _predict_paper("toy-stack", "wide")
    n_params = 70 * (2 * 1024 * 4096 + 4096 + 1024 + 2 * 1024) + 1024 * 1024 + 1024
    # params, grads and Adam's two moments, fp32: 16 bytes a parameter (+ 512-byte rounding)
    assert row["static_bytes"] == pytest.approx(16 * n_params, rel=1e-3)
    assert row["peak_bytes"] > row["static_bytes"] > 5e9  # far beyond this machine's memory
    assert row["memory_source"] == "predicted" and row["nfe_forward"] == 70
    assert seconds < 60 and growth < 1e9, (seconds, growth)


@needs_proc
@pytest.mark.slow
@pytest.mark.parametrize(("name", "size"), PAPER_SIZES)
def test_predicted_paper_sizes_of_registered_models(name, size):
    """e.g. 70-layer TrellisNet at paper-wt103: seconds, not gigabytes."""
    row, seconds, growth = _predict_paper(name, size)
    print(f"{name} {size}: predicted {row['predicted_bytes'] / 1e9:.2f} GB "
          f"(static {row['static_bytes'] / 1e9:.2f} GB) in {seconds:.1f} s, RSS +{growth / 1e6:.0f} MB")
    assert row["peak_bytes"] > row["static_bytes"] > 0
    assert seconds < 60 and growth < 1e9, (seconds, growth)
