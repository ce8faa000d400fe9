import math

import pytest
import torch

from baselines import match_params
from bench.measure.tracked import LiveTensorCounter
from models import build_model
from tests.models.sequences import causal_changes, model_inputs

ATTENTIONS = ["relative", "sdpa"]
EXPLICIT = ["transformer", "transformer-tied", "transformer-ckpt"]


@pytest.mark.parametrize("mem", [0, 6])
@pytest.mark.parametrize("attention", ATTENTIONS)
@pytest.mark.parametrize("name", EXPLICIT)
def test_explicit_models_are_causal(name, attention, mem):
    model = build_model(name, mode="core", attention=attention, mem_len=mem)
    x, _ = model_inputs(model, 2, 12)
    memory = model(x)[1].memory if mem else None
    before, at = causal_changes(model, x, 5, memory)
    assert before == 0.0 and at > 1e-2


@pytest.mark.parametrize("mem", [0, 6])
@pytest.mark.parametrize("attention", ATTENTIONS)
def test_many_tied_layers_reach_the_deq_equilibrium(attention, mem):
    # The debug cell is contractive at init (plain iteration converges), so unrolling it far
    # enough must land on the fixed point the DEQ solves for.
    deq = build_model("deq-transformer", mode="core", attention=attention, mem_len=mem)
    tied = build_model("transformer-tied", mode="core", attention=attention, mem_len=mem, depth=40)
    tied.load_state_dict(deq.state_dict())
    x, _ = model_inputs(deq, 2, 16)
    memory = deq(x)[1].memory if mem else None
    z_deq, stats = deq(x, memory=memory)
    z_tied, _ = tied(x, memory=memory)
    assert stats.forward.converged
    assert (z_tied - z_deq).norm() <= 1e-3 * z_deq.norm()


def test_checkpointed_equals_tied_in_value_and_gradient():
    tied = build_model("transformer-tied", mode="core", depth=5, dropout=0.2)
    ckpt = build_model("transformer-ckpt", mode="core", depth=5, dropout=0.2)
    ckpt.load_state_dict(tied.state_dict())
    x, targets = model_inputs(tied, 2, 8)
    outputs = []
    for model in (tied, ckpt):
        torch.manual_seed(3)  # the same dropout masks
        out, stats = model(x)
        model.loss(out, targets).backward()
        outputs.append(out)
        assert stats.nfe_forward == 5
    torch.testing.assert_close(outputs[0], outputs[1])
    for (name, p), q in zip(tied.named_parameters(), ckpt.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, msg=name)


def test_untied_layers_are_distinct_and_keep_one_memory_per_layer():
    model = build_model("transformer", mode="core", depth=3, mem_len=5)
    assert len(model.layers) == 3 and model.layers[0].qkv.weight is not model.layers[1].qkv.weight
    assert all(layer.inject is None for layer in model.layers)  # Transformer-XL: no injection
    x, _ = model_inputs(model, 2, 8)
    z, stats = model(x)
    assert len(stats.memory) == 3 and all(m.shape == (2, 5, 32) for m in stats.memory)
    torch.testing.assert_close(stats.memory[0], x[:, -5:])  # layer 0's input is x
    z2, _ = model(x, memory=stats.memory)
    assert not torch.allclose(z, z2)
    with pytest.raises(ValueError, match="memory has 2 layers"):
        model(x, memory=stats.memory[:2])


def test_match_params_within_one_percent_for_depths_2_to_64():
    deq = build_model("deq-transformer", mode="core")
    goal = deq.num_params(non_embedding=True)
    for depth in range(2, 65):
        overrides = match_params(deq, depth)
        model = build_model("transformer", mode="core", depth=depth, **overrides)
        count = model.num_params(non_embedding=True)
        assert count == sum(p.numel() for p in model.parameters())  # core mode: no embedding
        assert abs(count - goal) <= 0.01 * goal, (depth, overrides, count, goal)
        assert overrides["d_inner"] >= overrides.get("d_model", 32)
    assert match_params(deq, 2) == {"d_inner": match_params(deq, 2)["d_inner"]}  # FFN first


def test_match_params_at_paper_width_moves_only_the_ffn():
    with torch.device("meta"):
        deq = build_model("deq-transformer", "paper-small", mode="core")
    goal = deq.num_params(non_embedding=True)
    overrides = match_params(deq, 4, size="paper-small")
    assert set(overrides) == {"d_inner"}
    with torch.device("meta"):
        model = build_model("transformer", "paper-small", mode="core", **overrides)
    assert abs(model.num_params(non_embedding=True) - goal) <= 0.01 * goal


# Non-embedding (core-mode) parameter counts and default depths, against PAPER.md.
PAPER = [
    ("deq-transformer", "paper-small", 4.5e6, None),
    ("transformer", "paper-small", 4.9e6, 4),
    ("transformer-tied", "paper-small", 4.5e6, 16),
    ("transformer-ckpt", "paper-small", 4.5e6, 16),
    ("transformer", "paper-medium", 44e6, 16),
    ("deq-transformer", "paper-medium", 43e6, None),
]


@pytest.mark.parametrize(("name", "size", "paper", "depth"), PAPER)
def test_paper_sizes_match_the_paper_counts(name, size, paper, depth):
    with torch.device("meta"):
        model = build_model(name, size, mode="core")
    assert abs(model.num_params(non_embedding=True) - paper) <= 0.1 * paper
    assert getattr(model.config, "depth", None) == depth


def test_tied_and_checkpointed_sizes_are_the_deq_cell():
    for size in ("debug", "paper-small", "paper-medium"):
        with torch.device("meta"):
            deq = build_model("deq-transformer", size, mode="core")
            tied = build_model("transformer-tied", size, mode="core")
        assert tied.num_params() == deq.num_params()
        assert [n for n, _ in tied.named_parameters()] == [n for n, _ in deq.named_parameters()]


def _train_step_peak(name: str, depth: int | None = None) -> int:
    """Tracked peak bytes of forward + backward + SGD step: core mode, batch 2, seq 32."""
    torch.manual_seed(0)
    model = build_model(name, mode="core", depth=depth)
    x, targets = model_inputs(model, 2, 32)
    # SGD: static memory (parameters, no optimizer state) stays small next to activations.
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    counter = LiveTensorCounter()
    counter.track(model, opt, x, targets)
    with counter:
        loss, _ = model(x, targets=targets)
        loss.backward()
        opt.step()
        opt.zero_grad()
        del loss
    return counter.peak_bytes


def test_memory_trend_with_depth():
    slope = {}
    for name in ("transformer-tied", "transformer-ckpt"):
        peaks = {depth: _train_step_peak(name, depth) for depth in (4, 32)}
        slope[name] = math.log(peaks[32] / peaks[4]) / math.log(32 / 4)
        if name == "transformer-tied":
            tied_at_32 = peaks[32]
    assert 0.8 <= slope["transformer-tied"] <= 1.2, slope
    assert slope["transformer-ckpt"] < 0.6, slope
    assert _train_step_peak("deq-transformer") < 0.5 * tied_at_32


def test_official_transformer_xl_size_is_the_base_script():
    with torch.device("meta"):
        xl = build_model("transformer", "paper-medium-official", mode="lm", head="adaptive")
        tied = build_model("transformer-tied", "paper-medium-official", mode="core")
    c = xl.config
    assert (c.depth, c.d_model, c.d_inner, c.dropout_style, c.dropatt, c.div_val) == (16, 410, 2100, "elementwise", 0.0, 1)
    # Transformer-XL's own count for its WT103 base model: 151M with the adaptive softmax (tied)
    assert abs(xl.num_params() - 151e6) <= 0.01 * 151e6
    assert tied.config.depth == 16 and tied.config.d_inner == 48_000  # the DEQ code's stacked cell
