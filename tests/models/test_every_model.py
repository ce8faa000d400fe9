"""One test for the whole model registry: every model, both modes, batch 1 and > 1."""

import pytest
import torch

from models import ModelStats, build_model, list_models
from tests.models.sequences import model_inputs

SEQ_LEN = 8


def _embedding_params(model) -> set[int]:
    ids = set()
    for name in model.embedding_names:
        module = getattr(model, name, None)
        if module is not None:
            ids |= {id(p) for p in module.parameters()}
    return ids


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("mode", ["lm", "core"])
@pytest.mark.parametrize("name", list_models())
def test_shapes_loss_and_gradients(name, mode, batch):
    model = build_model(name, "debug", mode=mode)
    x, targets = model_inputs(model, batch, SEQ_LEN)
    out, stats = model(x)
    assert isinstance(stats, ModelStats) and stats.nfe_forward >= 1
    if mode == "lm":
        assert out.shape == (batch, SEQ_LEN, model.config.vocab_size)
    else:
        assert out.shape[:2] == (batch, SEQ_LEN)
        targets = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
    loss, _ = model(x, targets=targets)
    assert loss.ndim == 0 and torch.isfinite(loss)
    torch.testing.assert_close(loss, model.loss(out, targets))
    loss.backward()
    # In core mode the word embedding and LM head are not part of the computation.
    frozen = _embedding_params(model) if mode == "core" else set()
    for pname, p in model.named_parameters():
        if id(p) in frozen:
            continue
        assert p.grad is not None, f"{name}: no gradient for {pname}"
        assert torch.isfinite(p.grad).all(), f"{name}: non-finite gradient for {pname}"
        assert p.grad.abs().sum() > 0, f"{name}: zero gradient for {pname}"


@pytest.mark.parametrize("name", list_models())
def test_reported_parameter_counts(name):
    model = build_model(name, "debug", mode="lm")
    assert model.num_params() == sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    embedding = sum(p.numel() for p in {id(p): p for p in model.parameters()
                                       if id(p) in _embedding_params(model)}.values())
    assert embedding > 0
    assert model.num_params(non_embedding=True) == model.num_params() - embedding


@pytest.mark.gpu
@pytest.mark.parametrize("name", list_models())
def test_cuda_step_agrees_with_cpu(name):
    model = build_model(name, "debug", mode="core").eval()
    x, _ = model_inputs(model, 2, 16)
    with torch.no_grad():
        expected, _ = model(x)
    model.cuda()
    with torch.no_grad():
        out, _ = model(x.cuda())
    torch.testing.assert_close(out.cpu(), expected, rtol=1e-3, atol=1e-3)
    model.train()
    out, _ = model(x.cuda())
    loss = model.loss(out, torch.randn_like(out))
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters()
                                        if p.grad is not None)
