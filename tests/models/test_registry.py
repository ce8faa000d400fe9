from dataclasses import dataclass

import pytest
from torch import nn

from models import registry
from models.base import BenchModel


@dataclass(frozen=True, kw_only=True)
class ToyConfig:
    d_model: int = 8
    depth: int = 2
    dropout: float = 0.0


class Toy(BenchModel):
    def __init__(self, config, mode):
        super().__init__(config, mode)
        self.embedding = nn.Embedding(10, config.d_model)
        self.layers = nn.ModuleList(nn.Linear(config.d_model, config.d_model) for _ in range(config.depth))


@pytest.fixture
def toy(monkeypatch):
    monkeypatch.setattr(registry, "MODELS", dict(registry.MODELS))
    registry.register_model(registry.ModelSpec(
        name="toy", family="toy", variant="untied", config=ToyConfig,
        sizes={"debug": {"d_model": 8}, "big": {"d_model": 16, "depth": 4}}, build=Toy,
    ))


def test_build_with_size_depth_and_override(toy):
    m = registry.build_model("toy", "big", mode="core", depth=3, dropout=0.1)
    assert m.config == ToyConfig(d_model=16, depth=3, dropout=0.1)
    assert m.mode == "core" and m.spec.name == "toy"
    assert m.num_params() == 10 * 16 + 3 * (16 * 16 + 16)
    assert m.num_params(non_embedding=True) == 3 * (16 * 16 + 16)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(name="nope"), "unknown model 'nope'; valid models: .*toy"),
        (dict(name="toy", size="huge"), "unknown size 'huge' for toy; valid sizes: debug, big"),
        (dict(name="toy", mode="seq"), "unknown mode 'seq'; valid modes: lm, core"),
        (dict(name="toy", width=3), r"no config field\(s\) \['width'\]; valid: d_model, depth, dropout"),
        (dict(name="toy", depth=2.5), "toy.depth must be int"),
        (dict(name="toy", dropout="x"), "toy.dropout must be float"),
        (dict(name="toy", depth=-1), "must not be negative"),
    ],
)
def test_bad_names_and_values_list_valid_choices(toy, kwargs, message):
    with pytest.raises(ValueError, match=message):
        registry.build_model(**kwargs)


def test_registered_models_have_debug_size_and_known_variant():
    for name in registry.list_models():
        spec = registry.model_spec(name)
        assert "debug" in spec.sizes and spec.variant in registry.VARIANTS


@pytest.fixture
def fresh_registry(monkeypatch):
    """The registry as on first use: families and plugins not loaded yet (restored afterwards)."""
    registry.list_models()
    monkeypatch.setattr(registry, "MODELS", dict(registry.MODELS))
    monkeypatch.setattr(registry, "_loaded", False)


def test_a_plugin_that_is_not_there_is_one_clear_error(fresh_registry, monkeypatch):
    monkeypatch.setenv("DEQBENCH_PLUGINS", "nonexistent.module")
    with pytest.raises(registry.PluginError, match=r"nonexistent\.module.*DEQBENCH_PLUGINS") as err:
        registry.list_models()
    assert "\n" not in str(err.value) and isinstance(err.value, ValueError)
    with pytest.raises(registry.PluginError):  # every later use says so too, never a half registry
        registry.model_spec("deq-transformer")


def test_a_plugin_that_fails_on_import_names_the_module_and_the_error(fresh_registry, monkeypatch, tmp_path):
    (tmp_path / "broken_plugin.py").write_text("import math\nraise RuntimeError('no GPU here\\nsecond line')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("DEQBENCH_PLUGINS", "broken_plugin")
    with pytest.raises(registry.PluginError, match=r"broken_plugin.*RuntimeError: no GPU here") as err:
        registry.list_models()
    assert "second line" not in str(err.value)
