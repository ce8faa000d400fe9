"""bench.matching counts parameters on the meta device: the counts must be those of the real
models, weight norm's g included (its norm is shaped, not computed, there)."""

import pytest
import torch

from bench import matching
from models import build_model


@pytest.mark.parametrize(("shape", "dim"), [((5, 3), 0), ((5, 3), 1), ((5, 3), -1), ((4, 2, 3), 2)])
def test_norm_shape_is_norm_except_dims(shape, dim):
    v = torch.randn(shape)
    assert tuple(matching._norm_shape(v, 2, dim).shape) == tuple(torch.norm_except_dim(v, 2, dim).shape)


@pytest.mark.parametrize(("family", "model", "size"), [("transformer", "deq-transformer", "debug"),
                                                       ("transformer", "deq-transformer", "small"),
                                                       ("trellisnet", "deq-trellisnet", "debug")])
def test_meta_counts_equal_real_models(family, model, size):
    real = build_model(model, size, mode="core")
    assert any("parametrizations" in name for name, _ in real.named_parameters()) == (family == "transformer")
    assert matching._deq_params(family, size) == real.num_params(non_embedding=True)
