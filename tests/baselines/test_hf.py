import pytest
import torch

from baselines.hf import GPT2_SIZES
from baselines.transformer import TRANSFORMER_SIZES
from models import build_model
from tests.models.sequences import causal_changes, model_inputs


@pytest.mark.parametrize("mode", ["lm", "core"])
def test_gpt2_builds_offline_and_trains_a_step(mode, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = build_model("gpt2", mode=mode)
    assert type(model.gpt2).__name__ == "GPT2LMHeadModel"
    hf = model.gpt2.config
    assert (hf.n_embd, hf.n_layer, hf.n_head, hf.n_inner) == (32, 4, 4, 128)
    x, targets = model_inputs(model, 2, 16)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(2):
        loss, stats = model(x, targets=targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert stats.nfe_forward == 4 and losses[1] < losses[0]


def test_core_mode_takes_inputs_embeds_and_skips_word_embeddings():
    model = build_model("gpt2", mode="core")
    assert model.embedding.weight.shape == (1, 32)  # no word-embedding table to speak of
    x, _ = model_inputs(model, 2, 8)
    out, _ = model(x)
    assert out.shape == (2, 8, 32)
    out.square().mean().backward()
    assert model.embedding.weight.grad is None
    lm = build_model("gpt2", mode="lm")
    assert lm.embedding.weight.shape == (256, 32) and lm.gpt2.lm_head.weight is lm.embedding.weight


@pytest.mark.parametrize("mode", ["lm", "core"])
def test_gpt2_is_causal(mode):
    model = build_model("gpt2", mode=mode).eval()
    x, _ = model_inputs(model, 2, 12)
    before, at = causal_changes(model, x, 5)
    assert before < 1e-6 and at > 1e-3
    with pytest.raises(ValueError, match="no memory"):
        model(x, memory=torch.zeros(2, 4, 32))


def test_gpt2_sizes_are_the_transformer_sizes():
    for name, size in GPT2_SIZES.items():
        for key in ("d_model", "n_head", "d_inner", "depth"):
            assert size[key] == TRANSFORMER_SIZES[name][key]
    with torch.device("meta"):
        model = build_model("gpt2", "paper-small", mode="core")
    # Transformer-XL small's shape: within 10% of its 4.9M (GPT-2 has no positional projection
    # but learned positions and biases).
    assert abs(model.num_params(non_embedding=True) - 4.9e6) <= 0.1 * 4.9e6
