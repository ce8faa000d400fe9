"""Figures drawn side by side: helper processes that each take the next undrawn figure.

matplotlib draws in one thread, ~0.5 s of CPU a figure (text layout and the Agg pass), so the
eight figures of the default run cost ~4.5 s on one core while the others idle. A pool of spawned
helpers shares that work with the caller: every drawer (the caller and each helper) claims the
next figure by a shared counter, so a slow figure never leaves the others waiting.

    pool = FigurePool.start()          # early (`deqbench run` starts it with the run: it imports
    plot_run(run_dir, pool=pool)       # matplotlib and pandas, ~1.2 s, while the workers start)
    pool.close()

A helper that dies or breaks its pipe costs nothing but time: the caller draws whatever no
helper returned. A helper never writes index.json; the caller merges in registry order.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import threading
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from bench.plots.draw import Drawn

MAX_HELPERS = 3  # a run has ~8-14 figures: more drawers than that wait on each other's claims
RESULT_WAIT_S = 120.0  # a helper silent this long after the last claim is given up on


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def default_helpers() -> int:
    """One helper per CPU beyond the caller's, at most MAX_HELPERS; none on one CPU."""
    return max(0, min(usable_cpus() - 1, MAX_HELPERS))


class FigurePool:
    """Spawned helper processes, idle until `draw` hands them a run."""

    def __init__(self, helpers: list[tuple[Any, Connection]], counter: Any) -> None:
        self._helpers = helpers
        self._counter = counter  # the next figure to claim, shared by every drawer
        self._used = False  # never asked to draw: close() kills the helpers (maybe still importing)
        # The caller draws too: matplotlib (~0.4 s) is imported meanwhile, in a thread that
        # waits on imports, not on the caller (whose main thread waits on its workers).
        self._warm = threading.Thread(target=_import_pyplot, name="deqbench-figures-import", daemon=True)
        self._warm.start()

    @classmethod
    def start(cls, helpers: int | None = None) -> FigurePool:
        """Start `helpers` processes (default: default_helpers()); zero makes an empty pool,
        which draws everything in the caller."""
        from bench.runner import spawn_environment

        n = default_helpers() if helpers is None else helpers
        ctx = mp.get_context("spawn")
        counter = ctx.Value("i", 0)
        started = []
        for _ in range(n):
            conn, child = ctx.Pipe()
            process = ctx.Process(target=_serve, args=(child, counter), daemon=True,
                                  name="deqbench-figures")
            try:
                with spawn_environment(None):  # SIGINT ignored there: Ctrl-C is the caller's
                    process.start()
            except OSError:  # no process to be had: the caller draws alone
                conn.close()
                break
            child.close()
            started.append((process, conn))
        return cls(started, counter)

    @property
    def size(self) -> int:
        return len(self._helpers)

    def draw(self, run_dir: Path, names: Sequence[str], formats: Sequence[str],
             draw_one: Callable[[str], Drawn]) -> list[Drawn]:
        """Draw `names` into run_dir/figures with the helpers and `draw_one` (the caller's own
        drawer); returns what each figure became, in the order of `names`. An OSError from any
        drawer (a full disk) is raised here, after every drawer has stopped."""
        self._used = True
        self._warm.join()
        with self._counter.get_lock():
            self._counter.value = 0
        job = (str(run_dir), list(names), list(formats))
        busy = []
        for _, conn in self._helpers:
            with contextlib.suppress(OSError):
                conn.send(job)
                busy.append(conn)
        done: dict[str, Drawn] = {}
        error: OSError | None = None
        try:
            while (i := _claim(self._counter)) < len(names):
                done[names[i]] = draw_one(names[i])
        except OSError as err:
            error = err
            _claim(self._counter, everything=len(names))
        for conn in busy:
            answer = _receive(conn)
            if isinstance(answer, tuple) and answer and answer[0] == "oserror":
                error = error or OSError(*answer[1:])
            elif isinstance(answer, list):
                done.update((drawn[0], drawn) for drawn in answer)
        if error is not None:
            raise error
        # whatever a helper claimed but never returned (it died): drawn here, in order
        return [done[name] if name in done else draw_one(name) for name in names]

    def close(self, wait: bool = True) -> None:
        """End the helpers: idle ones exit at once, a stuck one is killed; wait=False (or a
        pool never asked to draw: a run that failed or was stopped) kills them all now."""
        wait = wait and self._used
        for _, conn in self._helpers:
            with contextlib.suppress(OSError):
                conn.send(None)
            conn.close()
        for process, _ in self._helpers:
            process.join(5 if wait else 0)
            if process.is_alive():
                process.kill()
                process.join(5)
        self._helpers = []

    def __enter__(self) -> FigurePool:
        return self

    def __exit__(self, kind: type[BaseException] | None, *exc: object) -> None:
        self.close(wait=kind is None)


def _import_pyplot() -> None:
    from bench.plots.style import pyplot

    pyplot()


def _claim(counter: Any, everything: int | None = None) -> int:
    """The index of the next figure to draw (shared by every drawer); `everything`: claim all
    of that many, so that the other drawers stop after their current figure."""
    with counter.get_lock():
        i = counter.value
        counter.value = i + 1 if everything is None else max(i, everything)
    return i


def _receive(conn: Connection) -> Any:
    try:
        if conn.poll(RESULT_WAIT_S):
            return conn.recv()
    except (EOFError, OSError):
        pass
    return None


def _serve(conn: Connection, counter: Any) -> None:
    """A helper: import what drawing needs now (the pool starts early), then draw the figures
    it claims for each run it is handed, until told to stop."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the caller's: it closes the pool
    from bench.analysis import RunView
    from bench.plots.draw import draw_figure

    _import_pyplot()
    while True:
        try:
            job = conn.recv()
        except (EOFError, OSError):
            return
        if job is None:
            return
        run_dir, names, formats = job
        drawn: list[Drawn] = []
        try:
            run = RunView.load(run_dir)
            while (i := _claim(counter)) < len(names):
                drawn.append(draw_figure(run, names[i], Path(run_dir), tuple(formats)))
            answer: Any = drawn
        except OSError as err:
            _claim(counter, everything=len(names))
            answer = ("oserror", err.errno, err.strerror, err.filename)
        except Exception:  # the caller draws what this helper did not return
            answer = drawn
        try:
            conn.send(answer)
        except OSError:
            return
