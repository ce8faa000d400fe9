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
    mem_len: int = 0  # a count whose default is 0 may be 0
    window: int | None = None  # None or a size
    scale: float = 1.0


class Toy(BenchModel):
    def __init__(self, config, mode):
        super().__init__(config, mode)
        self.embedding = nn.Embedding(10, config.d_model)
        self.layers = nn.ModuleList(nn.Linear(config.d_model, config.d_model) for _ in range(config.depth))


@pytest.fixture
def toy(monkeypatch):
    registry.list_models()  # the real families first: loaded into the copy, they would vanish
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
        (dict(name="toy", d_model=0), "toy.d_model must be >= 1, got 0"),
        (dict(name="toy", depth=0), "toy.depth must be >= 1, got 0"),
        (dict(name="toy", window=0), "toy.window must be >= 1, got 0"),
        (dict(name="toy", mem_len=-1), "toy.mem_len must be >= 0, got -1"),
        (dict(name="toy", scale=float("nan")), "toy.scale must be a finite number, got nan"),
        (dict(name="toy", scale=float("inf")), "toy.scale must be a finite number, got inf"),
        (dict(name="toy", dropout=1.0), r"toy.dropout must be in \[0, 1\) \(a probability\), got 1.0"),
        (dict(name="toy", dropout=float("nan")), "toy.dropout must be a finite number"),
        (dict(name="toy", depth=2.5), "toy.depth must be int"),
        (dict(name="toy", dropout="x"), "toy.dropout must be float"),
        (dict(name="toy", depth=-1), "toy.depth must be >= 1, got -1"),
    ],
)
def test_bad_names_and_values_list_valid_choices(toy, kwargs, message):
    with pytest.raises(ValueError, match=message):
        registry.build_model(**kwargs)


def test_zero_where_the_default_is_zero_and_none_where_allowed(toy):
    assert registry.make_config("toy", mem_len=0, window=None, scale=0.0).mem_len == 0
    assert registry.make_config("toy", window=3).window == 3


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize(("name", "overrides", "message"), [
    ("deq-transformer", dict(d_model=0), "d_model must be >= 1, got 0"),
    ("deq-trellisnet", dict(d_model=0), "deq-trellisnet.d_model must be >= 1, got 0"),
    ("trellisnet", dict(nhid=0), "trellisnet.nhid must be >= 1, got 0"),
    ("deq-trellisnet", dict(init_std=NAN), "deq-trellisnet.init_std must be a finite number, got nan"),
    ("deq-transformer", dict(max_iter=0), "deq-transformer.max_iter must be >= 1, got 0"),
    ("deq-transformer", dict(tol=NAN), "deq-transformer.tol must be a finite number, got nan"),
    ("deq-trellisnet", dict(b_tol=INF), "deq-trellisnet.b_tol must be a finite number, got inf"),
    ("deq-transformer", dict(solver="newton"), "deq-transformer: unknown solver 'newton'; valid solvers"),
    ("deq-transformer", dict(b_solver="newton"), "deq-transformer: unknown solver 'newton'"),
    ("deq-trellisnet", dict(backward="adjoint"), "deq-trellisnet: unknown backward 'adjoint'"),
    ("deq-transformer", dict(stop_mode="max"), "deq-transformer: unknown stop_mode 'max'"),
    ("deq-transformer", dict(phantom_tau=1.5), r"deq-transformer: phantom_tau must be in \(0, 1\]"),
    ("deq-transformer", dict(broyden_memory=0), "deq-transformer.broyden_memory must be >= 1, got 0"),
    ("deq-transformer", dict(anderson_m=0), "deq-transformer.anderson_m must be >= 1, got 0"),
    ("gpt2", dict(dropout=NAN), "gpt2.dropout must be a finite number, got nan"),
    ("gpt2", dict(dropout=1.5), r"gpt2.dropout must be in \[0, 1\) \(a probability\), got 1.5"),
    ("gpt2", dict(n_head=0), "gpt2.n_head must be >= 1, got 0"),
    ("transformer", dict(vocab_size=0), "transformer.vocab_size must be >= 1, got 0"),
])
def test_real_configs_refuse_values_that_would_fail_in_the_worker(name, overrides, message):
    """Each of these passed the old type check and failed (or ran wrongly) only when the model
    was built or stepped in a worker; now make_config, the one place every value goes through,
    refuses it with the model and field in the message."""
    with pytest.raises(ValueError, match=message):
        registry.make_config(name, "debug", **overrides)


def test_registered_models_have_debug_size_and_known_variant():
    assert {"deq-transformer", "deq-trellisnet", "transformer", "trellisnet"} <= set(registry.list_models())
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
