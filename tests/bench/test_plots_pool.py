"""Figures drawn side by side (bench.plots.pool): the same figures, index and pixels as one
process draws; a helper that dies costs nothing but time; a full disk is still one OSError."""

import errno
import multiprocessing as mp
import os
import signal
import time

import matplotlib.image
import numpy as np
import pytest

from bench import plots
from bench.plots.pool import FigurePool
from tests.bench.runs import copy_run

NAMES = ["memory_vs_seq_len", "reduction", "speed", "memory_breakdown", "paper_pairs"]


def claim_everything_then_die(conn, counter) -> None:
    """A helper that takes every figure and dies without drawing one (spawned: module level)."""
    conn.recv()
    with counter.get_lock():
        counter.value = 1_000
    os._exit(3)


def test_a_pool_draws_what_one_process_draws(tmp_path):
    alone = copy_run("quick", tmp_path / "alone")
    shared = copy_run("quick", tmp_path / "shared")
    expected = plots.plot_run(alone)
    with FigurePool.start(helpers=1) as pool:
        assert pool.size == 1
        got = plots.plot_run(shared, pool=pool)
        again = plots.plot_run(shared, only=NAMES, pool=pool)  # a pool serves several runs
    assert [(f.name, f.caption, f.files) for f in got.made] == [(f.name, f.caption, f.files) for f in expected.made]
    assert got.skipped == expected.skipped and got.notes == expected.notes
    assert [f.name for f in again.made] == [n for n in plots.FIGURES if n in NAMES and n != "paper_pairs"]
    assert (shared / "figures" / "index.json").read_text() == (alone / "figures" / "index.json").read_text()
    for figure in expected.made:
        a = matplotlib.image.imread(alone / figure.files[0])
        b = matplotlib.image.imread(shared / figure.files[0])
        assert a.shape == b.shape and np.array_equal(a, b), figure.name


def test_what_a_dead_helper_claimed_is_drawn_by_the_caller(tmp_path):
    run_dir = copy_run("quick", tmp_path / "run")
    ctx = mp.get_context("spawn")
    counter = ctx.Value("i", 0)
    conn, child = ctx.Pipe()
    process = ctx.Process(target=claim_everything_then_die, args=(child, counter), daemon=True)
    process.start()
    child.close()
    with FigurePool([(process, conn)], counter) as pool:
        figures = plots.plot_run(run_dir, only=NAMES, pool=pool)
    assert process.exitcode == 3  # it did die, having claimed everything
    assert [f.name for f in figures.made] == [n for n in plots.FIGURES if n in NAMES and n != "paper_pairs"]
    assert all((run_dir / f.files[0]).stat().st_size > 30_000 for f in figures.made)
    assert "paper's protocol" in figures.skipped["paper_pairs"]


def test_a_full_disk_in_a_helper_is_the_callers_oserror(tmp_path):
    """The helper meets the full disk (the caller holds the first figure until the helper has
    claimed the second, the unwritable one): its OSError crosses the pipe and is raised here,
    once every drawer has stopped."""
    run_dir = copy_run("quick", tmp_path / "run")
    (run_dir / "figures").mkdir()
    (run_dir / "figures" / "reduction.png").mkdir()  # savefig cannot write there
    names = ["memory_vs_seq_len", "reduction"]
    with FigurePool.start(helpers=1) as pool:
        def caller(name):  # never meets the disk: it waits for the helper's claim, draws nothing
            deadline = time.monotonic() + 60
            while pool._counter.value < 2 and time.monotonic() < deadline:
                time.sleep(0.01)
            return name, [], "", [], "held by the test"

        with pytest.raises(OSError) as raised:
            pool.draw(run_dir, names, ("png",), caller)
    assert raised.value.errno == errno.EISDIR and "reduction.png" in str(raised.value)


def test_an_unused_pool_ends_at_once():
    pool = FigurePool.start(helpers=1)
    processes = [p for p, _ in pool._helpers]
    pool.close()  # never asked to draw: killed, not waited for while it imports matplotlib
    assert [p.exitcode for p in processes] == [-signal.SIGKILL]
    assert FigurePool.start(helpers=0).size == 0
