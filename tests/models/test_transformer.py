import math

import pytest
import torch
from torch.nn.utils.parametrizations import _WeightNorm
from torch.utils._python_dispatch import TorchDispatchMode

from models import build_model, fixed_iterations
from models.attention import causal_allowed, relative_shift, sinusoid
from models.transformer import SegmentMemory, TransformerCell, TransformerConfig
from tests.models.sequences import causal_changes, model_inputs, perturbed

ATTENTIONS = ["relative", "sdpa"]


def deq(**overrides):
    return build_model("deq-transformer", "debug", mode="core", **overrides)


# -- attention pieces ---------------------------------------------------------------------------
@pytest.mark.parametrize(("qlen", "mem"), [(5, 0), (4, 3)])
def test_relative_shift_reindexes_distances_to_keys(qlen, mem):
    klen = qlen + mem
    scores = torch.randn(2, 3, qlen, klen)  # column p: distance klen - 1 - p
    shifted = relative_shift(scores)
    allowed = causal_allowed(qlen, klen)
    for i in range(qlen):
        for j in range(klen):
            if allowed[i, j]:
                distance = mem + i - j
                assert torch.equal(shifted[..., i, j], scores[..., i, klen - 1 - distance])
    assert allowed.sum() == sum(mem + i + 1 for i in range(qlen))


def test_sinusoid_rows_are_sin_and_cos_of_position():
    emb = sinusoid(torch.tensor([0.0, 3.0]), 6)
    assert emb.shape == (2, 6)
    torch.testing.assert_close(emb[0], torch.tensor([0.0, 0, 0, 1, 1, 1]))
    torch.testing.assert_close(emb[1, 0], torch.tensor(math.sin(3.0)))
    torch.testing.assert_close(emb[1, 3], torch.tensor(math.cos(3.0)))


# -- the cell -----------------------------------------------------------------------------------
@pytest.mark.parametrize("mem", [0, 4])
@pytest.mark.parametrize("attention", ATTENTIONS)
def test_cell_is_exactly_causal_in_state_and_injection(attention, mem):
    cell = TransformerCell(TransformerConfig(d_model=32, n_head=4, d_head=8, d_inner=64,
                                             attention=attention))
    B, T, t = 2, 10, 6
    x, z = torch.randn(B, T, 32), torch.randn(B, T, 32)
    memory = torch.randn(B, mem, 32) if mem else None
    with torch.no_grad():
        out = cell(z, cell.prepare(B, T, x=x, memory=memory, memory_inputs=memory))
        for z2, x2 in ((perturbed(z, t), x), (z, perturbed(x, t))):
            out2 = cell(z2, cell.prepare(B, T, x=x2, memory=memory, memory_inputs=memory))
            assert torch.equal(out2[:, :t], out[:, :t])
            assert (out2[:, t] - out[:, t]).abs().amax() > 1e-2


# -- the DEQ ------------------------------------------------------------------------------------
@pytest.mark.parametrize("attention", ATTENTIONS)
def test_debug_deq_converges_to_its_tolerance(attention):
    model = deq(attention=attention)
    x, _ = model_inputs(model, 2, 32)
    _, stats = model(x)
    assert stats.forward.converged and stats.forward.status == "converged"
    assert stats.residual_forward <= model.config.tol
    assert stats.nfe_forward < model.config.max_iter
    assert stats.solver_workspace_bytes > 0


@pytest.mark.parametrize("mem", [0, 6])
@pytest.mark.parametrize("attention", ATTENTIONS)
def test_deq_is_causal(attention, mem):
    # Every fixed-point iterate from z0 = 0 is causal: exact with a fixed iteration count (few
    # enough that the residual still falls, so the solver returns the last iterate).
    model = deq(attention=attention, mem_len=mem, solver="fixed_point", max_iter=6)
    x, _ = model_inputs(model, 2, 12)
    memory = model(x)[1].memory if mem else None
    with fixed_iterations():
        before, at = causal_changes(model, x, 5, memory)
    assert before == 0.0 and at > 1e-2
    # A solved equilibrium is causal to the solver's accuracy (Broyden mixes positions).
    model = deq(attention=attention, mem_len=mem, tol=1e-10, max_iter=60).double()
    memory = None if memory is None else SegmentMemory(*(t.double() for t in memory))
    before, at = causal_changes(model, x.double(), 5, memory)
    assert before < 1e-7 and at > 1e-2


def test_variational_dropout_masks_stay_fixed_while_solving():
    model = deq(dropout=0.3)
    x, _ = model_inputs(model, 2, 16)
    out1, stats = model(x)
    # A mask redrawn at every application of f would leave no fixed point to converge to.
    assert stats.forward.converged
    out2, _ = model(x)
    assert not torch.allclose(out1, out2)  # a fresh mask per forward
    twin = deq(dropout=0.0)
    twin.load_state_dict(model.state_dict())
    model.eval(), twin.eval()
    torch.testing.assert_close(model(x)[0], twin(x)[0])  # no dropout in eval


def test_segment_memory_is_the_detached_tail_of_the_equilibrium():
    model = deq(mem_len=6)
    x, _ = model_inputs(model, 2, 4)
    z, stats = model(x)
    states, inputs = stats.memory
    assert states.shape == inputs.shape == (2, 4, 32) and not states.requires_grad
    torch.testing.assert_close(states, z.detach())
    torch.testing.assert_close(inputs, x)
    x2, _ = model_inputs(model, 2, 4, seed=1)
    z2, stats2 = model(x2, memory=stats.memory)
    torch.testing.assert_close(stats2.memory.states, torch.cat((z, z2), 1)[:, -6:].detach())
    torch.testing.assert_close(stats2.memory.inputs, torch.cat((x, x2), 1)[:, -6:])
    assert not torch.allclose(z2, model(x2)[0])  # the memory is attended to
    # Memory positions get the injection of their own inputs, like any position.
    other_inputs = stats.memory._replace(inputs=torch.randn(2, 4, 32))
    assert not torch.allclose(z2, model(x2, memory=other_inputs)[0])
    with pytest.raises(ValueError, match="mem_len=0"):
        deq()(x, memory=stats.memory)


def test_pretraining_unrolls_pretrain_depth_applications():
    model = deq(pretrain_depth=3)
    x, targets = model_inputs(model, 2, 8)
    model.pretrain = True
    z, stats = model(x)
    assert stats.nfe_forward == 3 and stats.forward is None
    inputs = model.cell.prepare(2, 8, x=x)
    by_hand = torch.zeros_like(x)
    for _ in range(3):
        by_hand = model.cell(by_hand, inputs)
    torch.testing.assert_close(z, by_hand)
    loss, _ = model(x, targets=targets)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    model.pretrain = False
    assert model(x)[1].forward is not None


def test_weight_norm_weights_are_computed_once_per_forward(monkeypatch):
    calls = []
    original = _WeightNorm.forward
    monkeypatch.setattr(_WeightNorm, "forward", lambda self, g, v: calls.append(1) or original(self, g, v))
    model = deq(weight_norm=True)
    x, targets = model_inputs(model, 2, 8)
    calls.clear()
    loss, stats = model(x, targets=targets)
    loss.backward()
    assert stats.nfe_forward > 3 and stats.nfe_backward > 1
    assert len(calls) == 6  # qkv, inject, out, ff1, ff2, r_net: once each, whatever the NFE
    names = [n for n, _ in model.named_parameters()]
    assert "cell.qkv.parametrizations.weight.original0" in names  # g
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_implicit_gradient_matches_unrolled(attention):
    def grads(**solver):
        torch.manual_seed(0)
        model = deq(attention=attention, mem_len=4, **solver).double()
        x, targets = model_inputs(model, 2, 8)
        x, targets = x.double(), targets.double()
        memory = model(x)[1].memory
        loss, _ = model(x, targets=targets, memory=memory)
        loss.backward()
        return [p.grad for p in model.parameters()]

    reference = grads(backward="unrolled", max_iter=300, tol=1e-13)
    implicit = grads(tol=1e-12, b_tol=1e-12, max_iter=100, b_max_iter=100)
    for g, r in zip(implicit, reference, strict=True):
        assert (g - r).norm() <= 1e-6 * r.norm()


def test_config_errors_list_valid_choices():
    with pytest.raises(ValueError, match="unknown attention 'rope'; valid: relative, sdpa"):
        deq(attention="rope")
    with pytest.raises(ValueError, match="takes no depth"):
        build_model("deq-transformer", depth=4)


# -- dropout styles -----------------------------------------------------------------------------
class _RandomDraws(TorchDispatchMode):
    """Shapes of the tensors every random op fills (dropout masks, whichever kernel draws them)."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name.startswith(("bernoulli", "native_dropout", "rand")):
            self.shapes.append(tuple(args[0].shape))
        return out


def _draws(model, x):
    with _RandomDraws() as draws:
        model(x)
    return sorted(draws.shapes)


def test_dropout_style_decides_which_masks_are_drawn():
    B, T, c = 2, 8, deq().config
    x, _ = model_inputs(deq(), B, T)
    variational = build_model("transformer-tied", mode="core", depth=3, dropout=0.2)
    elementwise = build_model("transformer-tied", mode="core", depth=3, dropout=0.2,
                              dropout_style="elementwise", dropatt=0.1)
    # variational: one (B, 1, d) mask for the attention output and one for the FFN output, for
    # every layer of the forward (drawn once in prepare)
    assert _draws(variational, x) == [(B, 1, c.d_model)] * 2
    # elementwise (Transformer-XL): fresh masks at every layer, the FFN hidden and the attention
    # probabilities included
    shapes = _draws(elementwise, x)
    K = T  # no memory: keys = the segment
    assert shapes.count((B, T, c.d_inner)) == 3 and shapes.count((B, T, c.d_model)) == 6
    assert shapes.count((B, c.n_head, T, K)) == 3 and len(shapes) == 12
    plain = build_model("transformer-tied", mode="core", depth=3, dropout=0.2, dropout_style="elementwise")
    assert (B, c.n_head, T, K) not in _draws(plain, x)  # dropatt 0: no attention-probability masks
    for model in (variational, elementwise):
        model.eval()
        assert _draws(model, x) == []
    twin = build_model("transformer-tied", mode="core", depth=3).eval()
    twin.load_state_dict(elementwise.state_dict())
    torch.testing.assert_close(elementwise(x)[0], twin(x)[0])  # no dropout in eval


def test_dropout_style_errors_list_valid_choices():
    with pytest.raises(ValueError, match="unknown dropout_style 'gaussian'; valid: variational, elementwise"):
        deq(dropout_style="gaussian")
    with pytest.raises(ValueError, match=r"dropatt .* needs dropout_style=.elementwise."):
        build_model("transformer", mode="core", dropatt=0.1)


def test_official_deq_size_is_the_2019_script():
    with torch.device("meta"):
        core = build_model("deq-transformer", "paper-medium-official", mode="core")
        lm = build_model("deq-transformer", "paper-medium-official", mode="lm", head="adaptive")
    c = core.config
    assert (c.d_model, c.n_head, c.d_head, c.d_inner, c.div_val) == (700, 10, 70, 48_000, 4)
    assert c.cutoffs == (20_000, 40_000, 200_000) and c.subseq_len == 75 and c.dropout == 0.05
    # the paper's "DEQ-Transformer medium adaptive, 70M" (non-embedding)
    assert abs(core.num_params() - 70e6) <= 0.03 * 70e6
    assert lm.num_params(non_embedding=True) == core.num_params()
    widths = [t.weight.shape[1] for t in lm.embedding.tables]
    assert widths == [700, 175, 43, 10]  # d_embed // div_val**i
