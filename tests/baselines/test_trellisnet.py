"""Explicit TrellisNet baselines: shapes and gradients, causality, agreement with the DEQ,
parameter equality and the memory-vs-depth trend."""

import math

import pytest
import torch

from bench.measure.tracked import LiveTensorCounter
from models import build_model
from tests.helpers import trellisnet_batch

EXPLICIT = ["trellisnet", "trellisnet-ckpt"]


@pytest.mark.parametrize("name", EXPLICIT)
@pytest.mark.parametrize("mode", ["lm", "core"])
@pytest.mark.parametrize("batch", [1, 3])
def test_shapes_finite_loss_and_gradients(name, mode, batch):
    model = build_model(name, mode=mode, depth=5)
    x, targets = trellisnet_batch(model, batch)
    out, stats = model(x)
    width = model.config.vocab_size if mode == "lm" else model.config.nout
    assert out.shape == (batch, 12, width) and stats.nfe_forward == 5
    loss, stats = model(x, targets)
    loss.backward()
    assert loss.ndim == 0 and torch.isfinite(loss)
    for p_name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, p_name


@pytest.mark.parametrize("segment", [0, 1, 4])
def test_checkpointing_changes_memory_not_results(segment):
    plain = build_model("trellisnet", mode="core", depth=7)
    ckpt = build_model("trellisnet-ckpt", mode="core", depth=7, ckpt_segment=segment)
    ckpt.load_state_dict(plain.state_dict())
    x, targets = trellisnet_batch(plain, 2)
    results = []
    for model in (plain, ckpt):
        loss, _ = model(x, targets)
        loss.backward()
        results.append((loss, [p.grad for p in model.parameters()]))
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=0)


@pytest.mark.parametrize("name", EXPLICIT)
def test_causal_by_perturbation(name):
    model = build_model(name, mode="core", depth=6)
    x = torch.randn(2, 16, model.config.d_model)
    x2 = x.clone()
    x2[:, 9] += 1.0
    y, y2 = model(x)[0], model(x2)[0]
    assert torch.equal(y[:, :9], y2[:, :9])
    assert (y2[:, 9:] - y[:, 9:]).abs().max() > 1e-3


def test_many_layers_approach_the_deq_output():
    deq = build_model("deq-trellisnet", mode="core", tol=1e-12, max_iter=100).double()
    x = torch.randn(2, 16, deq.config.d_model, dtype=torch.float64)
    with torch.no_grad():
        target, stats = deq(x)
        errors = {}
        for depth in (2, 8, 40):
            explicit = build_model("trellisnet", mode="core", depth=depth).double()
            explicit.load_state_dict(deq.state_dict())
            errors[depth] = (explicit(x)[0] - target).abs().max().item()
    assert stats.forward.converged
    assert errors[2] > errors[8] > errors[40]
    assert errors[40] < 1e-10 * target.abs().max().item() + 1e-12


def test_memory_carries_the_last_timestep():
    model = build_model("trellisnet", mode="core")
    x, _ = trellisnet_batch(model, 2, seq=16)
    with torch.no_grad():
        _, stats = model(x[:, :8])
        warm, _ = model(x[:, 8:], memory=stats.memory)
        cold, _ = model(x[:, 8:])
    assert stats.memory.z.shape == (2, 2 * model.config.h_size, 1)
    assert (warm - cold).abs()[:, 0].max() > 1e-4


@pytest.mark.parametrize("size", ["debug", "paper-ptb", "paper-wt103"])
def test_parameters_equal_to_the_deq(size):
    with torch.device("meta"):
        models = [build_model(name, size, mode="lm") for name in ["deq-trellisnet", *EXPLICIT]]
    shapes = [{k: v.shape for k, v in m.state_dict().items()} for m in models]
    assert shapes[0] == shapes[1] == shapes[2]
    assert len({m.num_params() for m in models}) == 1
    assert len({m.num_params(non_embedding=True) for m in models}) == 1


def test_paper_depths_and_bad_depth():
    assert build_model("trellisnet", "paper-ptb", mode="core", nhid=4, nout=4, d_model=4).config.depth == 60
    assert build_model("trellisnet-ckpt", "paper-wt103", mode="core", nhid=4, nout=4, d_model=4).config.depth == 70
    with pytest.raises(ValueError, match="depth must be >= 1"):
        build_model("trellisnet", depth=0)


def _train_step_peak(name: str, depth: int | None = None, **overrides) -> int:
    """Tracked peak bytes of a core-mode training step (forward, backward, Adam), batch 2 x seq 32,
    with parameters, gradients and Adam state counted as already there."""
    torch.manual_seed(0)
    model = build_model(name, mode="core", depth=depth, **overrides)
    x = torch.randn(2, 32, model.config.d_model)
    targets = torch.randn(2, 32, model.config.nout)
    opt = torch.optim.Adam(model.parameters())
    model(x, targets)[0].backward()  # materialise gradients and optimizer state: static memory
    opt.step()
    counter = LiveTensorCounter()
    counter.track(model, opt, x, targets)
    with counter:
        loss, _ = model(x, targets)
        loss.backward()
        opt.step()
        del loss
    return counter.peak_bytes


def test_memory_trend_with_depth():
    peaks = {name: {depth: _train_step_peak(name, depth) for depth in (8, 64)} for name in EXPLICIT}
    slope = {name: math.log(p[64] / p[8]) / math.log(64 / 8) for name, p in peaks.items()}
    deq = _train_step_peak("deq-trellisnet")
    assert 0.8 <= slope["trellisnet"] <= 1.2, slope
    assert slope["trellisnet-ckpt"] < 0.6, slope
    assert deq < 0.5 * peaks["trellisnet"][64], (deq, peaks)
    # What each extra layer keeps for backward, float32: the h window (H, T+1) the conv reads,
    # the sigmoid gates i, o, f (3H), tanh g (H), c_{t-1} (H) and tanh c (H). Nothing else.
    B, T, H = 2, 32, build_model("trellisnet").config.h_size
    per_layer = 4 * B * (H * (T + 1) + 6 * H * T)
    assert peaks["trellisnet"][64] - peaks["trellisnet"][8] == 56 * per_layer
    # sqrt(L) segments beat checkpointing every layer (which keeps every layer's input state)
    assert peaks["trellisnet-ckpt"][64] < _train_step_peak("trellisnet-ckpt", 64, ckpt_segment=1)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["deq-trellisnet", *EXPLICIT])
def test_runs_on_cuda_as_on_cpu(name):
    model = build_model(name, mode="core")
    x, targets = trellisnet_batch(model, 2)
    cpu_loss, _ = model(x, targets)
    model.cuda()
    loss, stats = model(x.cuda(), targets.cuda())
    loss.backward()
    torch.testing.assert_close(loss.cpu(), cpu_loss, rtol=1e-3, atol=1e-6)  # cuDNN may use TF32
    assert stats.memory.z.is_cuda and all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("name", EXPLICIT)
@pytest.mark.parametrize("mode", ["lm", "core"])
def test_auxiliary_losses_add_weighted_losses_of_every_aux_every_th_layer(name, mode):
    depth, every, weight = 7, 3, 0.25  # aux layers 3 and 6
    plain = build_model(name, mode=mode, depth=depth)
    aux = build_model(name, mode=mode, depth=depth, aux_weight=weight, aux_every=every)
    aux.load_state_dict(plain.state_dict())
    x, targets = trellisnet_batch(plain, 2)
    loss, _ = aux(x, targets)
    loss.backward()
    by_hand = plain(x, targets)[0]
    for layers in (3, 6):
        partial = build_model("trellisnet", mode=mode, depth=layers)
        partial.load_state_dict(plain.state_dict())
        by_hand = by_hand + weight * partial(x, targets)[0]
    torch.testing.assert_close(loss, by_hand)
    assert loss > plain(x, targets)[0]
    aux.eval()  # evaluation: the final layer's loss alone, as the official evaluate()
    torch.testing.assert_close(aux(x, targets)[0], plain.eval()(x, targets)[0])
    out, _ = aux(x)
    assert out.shape[:2] == (2, 12)


def test_auxiliary_losses_through_checkpointed_segments_match_plain():
    plain = build_model("trellisnet", mode="lm", depth=9, aux_weight=0.1, aux_every=2, head="split")
    ckpt = build_model("trellisnet-ckpt", mode="lm", depth=9, aux_weight=0.1, aux_every=2, head="split")
    ckpt.load_state_dict(plain.state_dict())
    x, targets = trellisnet_batch(plain, 2)
    results = []
    for model in (plain, ckpt):
        loss, _ = model(x, targets)
        loss.backward()
        results.append((loss, [p.grad for p in model.parameters()]))
    torch.testing.assert_close(results[0], results[1])


def test_official_sizes_are_the_scripts():
    with torch.device("meta"):
        wt103 = build_model("trellisnet", "paper-wt103-official", mode="lm", head="split")
        ptb = build_model("trellisnet", "paper-ptb-official", mode="core")
    c = wt103.config
    assert (c.d_model, c.nhid, c.nout, c.depth, c.aux_weight, c.aux_every) == (512, 1600, 512, 70, 0.1, 25)
    # "~44M non-embedding" (the paper: 45M): two kernel-2 convs, weight-norm g's and one bias
    h = c.nhid + c.nout
    assert wt103.num_params(non_embedding=True) == 2 * 4 * h * 512 + 2 * 4 * h * h + 3 * 4 * h == 44_360_448
    # 180M in all, the TrellisNet paper's WT103 count: tied 267,735 x 512 table, its bias, tombstones
    assert abs(wt103.num_params() - 180e6) <= 0.01 * 180e6
    assert (ptb.config.weight_dropout, ptb.config.aux_weight, ptb.config.aux_every) == (0.5, 0.05, 12)
    with pytest.raises(ValueError, match="aux_every must be >= 1"):
        build_model("trellisnet", aux_every=0)
