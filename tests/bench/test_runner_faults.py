"""Fault injection: the runner (`python -m bench run`) SIGKILLed at random points of a small
matrix and resumed after each kill ends with every case exactly once, with the deterministic
columns of an uninterrupted run. Set DEQBENCH_FAULT_SEED to replay a sequence of kills."""

import os
import random
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from bench.results import read_results
from bench.rundir import ROWS, holds_run
from tests.bench.test_runner import MATRIX, _deqbench, _finish

ARGS = ("--instruments", "tracked,flops", "--no-progress", "--no-report")
DETERMINISTIC = ["case_id", "status", "params", "params_nonembed", "tracked_bytes", "peak_bytes",
                 "static_bytes", "flops_per_token", "nfe_forward"]
KILLS = 12
CASES = 9


@pytest.fixture(scope="module")
def matrix_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("matrix") / "toy.toml"
    path.write_text(MATRIX)
    return path


@pytest.fixture(scope="module")
def clean(matrix_file, tmp_path_factory):
    """One uninterrupted run of the matrix: its folder."""
    out = tmp_path_factory.mktemp("clean") / "run"
    code, _, err = _finish(_deqbench("run", "--matrix", str(matrix_file), *ARGS, "--out", str(out)))
    assert code == 0, err
    df = read_results(out)
    assert len(df) == CASES and set(df["status"]) == {"ok"} and df["flops_per_token"].notna().all()
    return out


def _rows(out: Path) -> int:
    folder = out / ROWS
    return len(list(folder.glob("*.json"))) if folder.is_dir() else 0


def _holds_lock(out: Path, pid: int) -> bool:
    lock = out / "run.lock"
    return lock.exists() and f'"pid": {pid},' in lock.read_text()


def _until(condition, proc, timeout=120.0) -> None:
    """Wait for `condition` or the end of `proc`."""
    deadline = time.monotonic() + timeout
    while not condition() and proc.poll() is None:
        assert time.monotonic() < deadline, "the runner made no progress"
        time.sleep(0.005)


def _kill_and_resume(out: Path, matrix_file: Path, rng: random.Random, kills: int,
                     extra: tuple[str, ...] = (), env_extra=None) -> list[tuple]:
    """Start (or resume) the run in `out` and SIGKILL its runner, `kills` times: in its first
    second (imports, parsing, mkdir, the lock), once it holds the folder (recovery, the
    worker's start, env.json), as a row lands (the merge into results.csv), or in the next case.
    Returns (where, rows before, rows after, exit code) per kill."""
    args = ("run", "--matrix", str(matrix_file), *ARGS, *extra, "--out", str(out))
    history = []
    for i in range(kills):
        before = _rows(out)
        proc = _deqbench(*args, *(["--resume"] if holds_run(out) else []), env_extra=env_extra)
        where = ("start", "held", "row", "case")[i % 4]
        if where == "start":
            time.sleep(rng.uniform(0.0, 1.0))
        elif where == "held":
            _until(lambda proc=proc: _holds_lock(out, proc.pid), proc)
            time.sleep(rng.uniform(0.0, 0.5))
        else:
            _until(lambda target=before + 1: _rows(out) >= target, proc)
            if where == "case":
                time.sleep(rng.uniform(0.0, 0.2))
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.communicate()
        history.append((where, before, _rows(out), proc.returncode))
    return history


def test_sigkill_at_random_points_then_resume_equals_a_clean_run(tmp_path, matrix_file, clean):
    """Two run folders, killed and resumed side by side (the runner mostly waits for its worker:
    two chains use two cores), 6 kills each; then each is resumed to its end."""
    seed = int(os.environ.get("DEQBENCH_FAULT_SEED", random.randrange(2**32)))
    started = time.monotonic()
    outs = [tmp_path / f"run{n}" for n in range(2)]
    with ThreadPoolExecutor(len(outs)) as pool:
        chains = list(pool.map(lambda n: _kill_and_resume(outs[n], matrix_file, random.Random(seed + n),
                                                          KILLS // len(outs)), range(len(outs))))
        finals = list(pool.map(lambda out: _finish(_deqbench("run", "--matrix", str(matrix_file),
                                                             *ARGS, "--out", str(out), "--resume")), outs))
    history = f"seed {seed}: {chains}"
    assert sum(rc == -signal.SIGKILL for chain in chains for *_, rc in chain) >= 10, history
    full = read_results(clean)
    for out, (code, _, err) in zip(outs, finals, strict=True):
        assert code == 0, f"{history}\n{err}"
        resumed = read_results(out)
        assert resumed["case_id"].tolist() == full["case_id"].tolist(), history  # once each, in order
        assert resumed[DETERMINISTIC].equals(full[DETERMINISTIC]), history
        assert [p.name for p in (out / ROWS).iterdir() if p.name.startswith(".")] == [], history
    print(f"{sum(map(len, chains))} kills and resumes in {time.monotonic() - started:.1f} s; {history}")


def test_a_row_torn_inside_a_quoted_field_does_not_eat_a_row_on_resume(tmp_path, matrix_file, clean):
    """A folder as a kill inside a quoted cell of results.csv leaves it (two rows, the third
    torn inside its solver trace) and no row files (a folder of an older deqbench)."""
    torn = tmp_path / "torn"
    torn.mkdir()
    (torn / "env.json").write_bytes((clean / "env.json").read_bytes())
    lines = (clean / "results.csv").read_text().splitlines(keepends=True)
    assert '"{' in lines[3]
    (torn / "results.csv").write_text("".join(lines[:3]) + lines[3][:lines[3].index('"{') + 6])
    code, _, err = _finish(_deqbench("run", "--matrix", str(matrix_file), *ARGS, "--out", str(torn),
                                     "--resume"))
    assert code == 0, err
    resumed, full = read_results(torn), read_results(clean)
    assert resumed["case_id"].tolist() == full["case_id"].tolist()  # each once, matrix order
    assert resumed[DETERMINISTIC].equals(full[DETERMINISTIC])


def test_sigkill_under_two_local_workers_then_resume_equals_a_clean_run(tmp_path, matrix_file, clean):
    """The local launcher with two workers (rows land out of matrix order), 6 kills: every case
    once, in matrix order, with the deterministic columns of the one-worker run."""
    seed = int(os.environ.get("DEQBENCH_FAULT_SEED", random.randrange(2**32)))
    out, extra = tmp_path / "run", ("--workers", "2")
    chain = _kill_and_resume(out, matrix_file, random.Random(seed), KILLS // 2, extra)
    code, _, err = _finish(_deqbench("run", "--matrix", str(matrix_file), *ARGS, *extra, "--out",
                                     str(out), "--resume"))
    history = f"seed {seed}: {chain}"
    assert code == 0, f"{history}\n{err}"
    assert sum(rc == -signal.SIGKILL for *_, rc in chain) >= 4, history
    resumed, full = read_results(out), read_results(clean)
    assert resumed["case_id"].tolist() == full["case_id"].tolist(), history
    assert resumed[DETERMINISTIC].equals(full[DETERMINISTIC]), history
    assert [p.name for p in (out / ROWS).iterdir() if p.name.startswith(".")] == [], history
