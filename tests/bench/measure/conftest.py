import pytest

from models import registry
from tests.bench.measure.toys import TOY_SPECS


@pytest.fixture
def toys(monkeypatch):
    """The toy models registered for one test (the registry is restored afterwards)."""
    registry.list_models()  # load the real families first, so the copy holds them
    monkeypatch.setattr(registry, "MODELS", dict(registry.MODELS))
    for spec in TOY_SPECS:
        registry.register_model(spec)


