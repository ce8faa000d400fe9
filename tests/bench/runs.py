"""Run directories for tests: copies of real runner output kept in tests/bench/data."""

import shutil
from pathlib import Path

DATA = Path(__file__).parent / "data"  # results.csv + env.json of real runs (quick, paper)


def copy_run(name: str, dest: Path) -> Path:
    """A copy of tests/bench/data/<name> (results.csv and env.json only) at `dest`."""
    dest.mkdir(parents=True, exist_ok=True)
    for f in ("results.csv", "env.json"):
        shutil.copy(DATA / name / f, dest / f)
    return dest
