"""Workload and Bench: what a measured step is made of."""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensor

from bench.measure import Bench, Workload, fake_device, fake_tensors
from models import model_spec


def test_workload_checks_its_fields_and_lists_valid_values():
    with pytest.raises(ValueError, match="unknown mode 'seq'; valid: core, lm"):
        Workload(model="m", mode="seq")
    with pytest.raises(ValueError, match="unknown phase 'test'; valid: train, eval"):
        Workload(model="m", phase="test")
    with pytest.raises(ValueError, match="unknown dtype 'fp8'; valid: float32, float64, bfloat16"):
        Workload(model="m", dtype="fp8")
    with pytest.raises(ValueError, match="batch must be >= 1"):
        Workload(model="m", batch=0)
    w = Workload(model="m", batch=3, seq_len=5, overrides=(("solver", "anderson"),))
    assert w.tokens == 15 and hash(w) == hash(Workload(model="m", batch=3, seq_len=5,
                                                       overrides=(("solver", "anderson"),)))


def test_train_bench_steps_update_parameters_and_leave_no_gradients(toys):
    bench = Bench(Workload(model="toy-deq", phase="train", batch=3, seq_len=5))
    assert bench.model.training and bench.inputs.shape == (3, 5, 32) and bench.targets is None
    before = [p.detach().clone() for p in bench.model.parameters()]
    stats = bench.warm_up()
    assert bench.targets.shape == (3, 5, 32) and bench.steps == 1
    assert stats.nfe_forward > 0 and stats.nfe_backward > 0
    assert all(p.grad is None for p in bench.model.parameters())
    assert all(not torch.equal(a, p) for a, p in zip(before, bench.model.parameters(), strict=True))
    state = bench.optimizer.state
    assert {"exp_avg", "exp_avg_sq"} <= set(state[next(bench.model.parameters())])


def test_eval_bench_runs_without_grad_or_optimizer(toys):
    bench = Bench(Workload(model="toy-stack", phase="eval", mode="lm", batch=2, seq_len=7))
    assert bench.optimizer is None and not bench.model.training
    assert bench.inputs.dtype == torch.long and bench.inputs.shape == (2, 7)
    assert int(bench.inputs.min()) >= 0 and int(bench.inputs.max()) < 50
    before = [p.detach().clone() for p in bench.model.parameters()]
    bench.step()
    assert all(torch.equal(a, p) for a, p in zip(before, bench.model.parameters(), strict=True))


def test_same_seed_same_bench(toys):
    a, b = (Bench(Workload(model="toy-stack", seed=7)) for _ in range(2))
    assert torch.equal(a.inputs, b.inputs)
    assert all(torch.equal(p, q) for p, q in zip(a.model.parameters(), b.model.parameters(), strict=True))
    c = Bench(Workload(model="toy-stack", seed=8))
    assert not torch.equal(a.inputs, c.inputs)


def test_static_bytes_are_params_grads_and_adam_moments(toys):
    n_params = sum(p.numel() for p in model_spec("toy-stack").build(
        model_spec("toy-stack").config(), "core").parameters())
    n_tensors = 2 + 3 * 6  # inject weight and bias; per layer 2 linears and a layer norm
    eval_bench = Bench(Workload(model="toy-stack", phase="eval"))
    assert eval_bench.static_bytes() == 4 * n_params
    train = Bench(Workload(model="toy-stack", phase="train"))
    train.warm_up()
    # fp32 params, grads, exp_avg, exp_avg_sq + Adam's one-float step counter per tensor
    assert train.static_bytes() == 16 * n_params + 4 * n_tensors
    assert train.static_bytes(round_to=512) % 512 == 0
    assert train.num_params() == n_params and train.num_params(non_embedding=True) == n_params


def test_fake_bench_holds_fake_tensors_only(toys):
    workload = Workload(model="toy-deq", phase="train", device="cuda")
    with fake_tensors():
        bench = Bench(workload, fake=True)
        bench.warm_up()
    assert all(isinstance(p, FakeTensor) for p in bench.model.parameters())
    assert isinstance(bench.inputs, FakeTensor) and isinstance(bench.targets, FakeTensor)
    expected = "cuda" if torch.cuda.is_available() else "cpu"  # fake CUDA needs a CUDA build
    assert bench.device.type == fake_device(workload).type == expected


def test_bench_builds_in_the_requested_dtype(toys):
    bench = Bench(Workload(model="toy-stack", dtype="bfloat16"))
    assert {p.dtype for p in bench.model.parameters()} == {torch.bfloat16}
    assert bench.inputs.dtype == torch.bfloat16
    bench.warm_up()
    assert bench.targets.dtype == torch.bfloat16
    assert torch.get_default_dtype() == torch.float32  # restored after the build


def test_segment_memory_is_carried_from_step_to_step():
    """Transformer-XL training attends to the previous segment: after warm-up the measured step
    must see a full memory, or mem_len would change nothing in a benchmark."""
    from bench.measure.workload import Bench, Workload

    bench = Bench(Workload(model="deq-transformer", overrides=(("mem_len", 16),), seq_len=8))
    assert bench.memory is None
    bench.step()
    first = bench.memory
    assert first is not None and first.states.shape[1] == 8  # one segment so far
    bench.step()
    assert bench.memory.states.shape[1] == 16  # full memory of mem_len positions
    assert not bench.memory.states.requires_grad
