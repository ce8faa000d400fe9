from pathlib import Path

import pytest

from bench.cli import main
from models import registry
from tests.bench import toy_models as toys_module
from tests.bench.runs import copy_run

PLUGIN = "tests.bench.toy_plugin"

@pytest.fixture(scope="session")
def quick_report(tmp_path_factory) -> Path:
    """The quick run's figures and report.md, made once from the copied CSV alone by
    `deqbench report`; tests read it and never change it (copy it first)."""
    run_dir = copy_run("quick", tmp_path_factory.mktemp("quick"))
    assert main(["report", str(run_dir)]) == 0
    return run_dir


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
