"""Benchmarks run only when asked (`tox -e bench`, or `pytest tests/benchmarks --benchmark-enable`):
pyproject's `--benchmark-disable` keeps them out of the test suite's few minutes."""

from pathlib import Path

import pytest

HERE = Path(__file__).parent


def pytest_collection_modifyitems(config, items):
    if config.getoption("benchmark_enable") or not config.getoption("benchmark_disable"):
        return
    skip = pytest.mark.skip(reason="benchmark: run with tox -e bench (or --benchmark-enable)")
    for item in items:
        if HERE in Path(item.path).parents:
            item.add_marker(skip)
