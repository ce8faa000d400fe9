import pytest

from models import registry
from tests.bench import toy_models as toys_module

PLUGIN = "tests.bench.toy_plugin"


@pytest.fixture
def toy_models(monkeypatch):
    """The toy models, registered for one test here (the registry is restored afterwards) and in
    the workers it spawns (through DEQBENCH_PLUGINS)."""
    monkeypatch.setenv("DEQBENCH_PLUGINS", PLUGIN)
    registry.list_models()  # load the real families first, so the copy holds them
    monkeypatch.setattr(registry, "MODELS", dict(registry.MODELS))
    toys_module.register()
    return toys_module.TOY_MODELS


@pytest.fixture
def toys(toy_models):
    return toy_models
