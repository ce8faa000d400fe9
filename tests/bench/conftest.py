import importlib

import pytest

from models import registry

PLUGIN = "tests.bench.toy_models"


@pytest.fixture
def toy_models(monkeypatch):
    """Register the toy models here and in spawned workers (via DEQBENCH_PLUGINS)."""
    monkeypatch.setenv("DEQBENCH_PLUGINS", PLUGIN)
    registry.list_models()  # built-in families first
    monkeypatch.setattr(registry, "MODELS", dict(registry.MODELS))
    module = importlib.import_module(PLUGIN)
    importlib.reload(module)  # register into the patched dict
    return ["toy-deq", "toy-tied"]
