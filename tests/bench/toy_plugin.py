"""DEQBENCH_PLUGINS entry point: registers the toy models in the process that imports it."""

from tests.bench.toy_models import register

register()
