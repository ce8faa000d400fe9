"""Where a case's time goes, clocked inside the worker: bench.perf.harness copies this file as
`sitecustomize.py` into a directory on PYTHONPATH, so every interpreter of a run (the spawned
workers too) loads it at start-up. It changes nothing until the measurement modules are imported,
then wraps a few functions (by name, where they exist: any checkout of the project works):

    protocol.measure   one JSON line per case into $DEQBENCH_PERF_CLOCK: the case's seconds,
                       split by what ran (build, warmup, predict, memory, flops, timed, gc, ...)
    protocol.run_pass  a pass; Bench.step / warm_up / __init__ inside it: steps by pass
    gc.collect         (as protocol calls it) the collections between passes

Standalone on purpose: it must not import the project (that would move the imports it clocks).
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.util
import json
import os
import sys
import time

PATH = os.environ.get("DEQBENCH_PERF_CLOCK")
_label: list[str] = []  # the innermost section running now
_case: dict | None = None


def _emit(record: dict) -> None:
    with open(PATH, "a") as fh:
        fh.write(json.dumps(record) + "\n")


@contextlib.contextmanager
def _section(name: str):
    t0 = time.perf_counter()
    _label.append(name)
    try:
        yield
    finally:
        _label.pop()
        if _case is not None:
            sections = _case["sections"]
            sections[name] = sections.get(name, 0.0) + time.perf_counter() - t0


def _patch_protocol(module) -> None:
    measure, run_pass = getattr(module, "measure", None), getattr(module, "run_pass", None)
    if measure is not None:
        def timed_measure(workload, *args, **kwargs):
            global _case
            _case = {"event": "case", "pid": os.getpid(), "t_start": time.time(), "sections": {},
                     "steps": {}, "nsteps": {}, "model": workload.model, "phase": workload.phase,
                     "seq_len": workload.seq_len, "depth": workload.depth}
            t0 = time.perf_counter()
            try:
                return measure(workload, *args, **kwargs)
            finally:
                _case["total"] = time.perf_counter() - t0
                _case["t_end"] = time.time()
                _emit(_case)
                _case = None

        module.measure = timed_measure
    if run_pass is not None:
        def timed_run_pass(bench, instruments, pass_name, *args, **kwargs):
            name = "predict" if pass_name == "predict" or getattr(bench, "fake", False) else pass_name
            with _section(name):
                return run_pass(bench, instruments, pass_name, *args, **kwargs)

        module.run_pass = timed_run_pass
    gc_module = getattr(module, "gc", None)
    if gc_module is not None:
        class TimedGc:
            def __getattr__(self, name):
                return getattr(gc_module, name)

            def collect(self, *args):
                with _section("gc"):
                    return gc_module.collect(*args)

        module.gc = TimedGc()


def _patch_workload(module) -> None:
    bench = getattr(module, "Bench", None)
    if bench is None:
        return
    init, step, warm_up = bench.__init__, bench.step, bench.warm_up

    def timed_init(self, *args, **kwargs):
        with _section("build-fake" if kwargs.get("fake") else "build"):
            init(self, *args, **kwargs)

    def timed_warm_up(self, *args, **kwargs):
        inside = _label[-1] if _label else ""
        name = "warmup-fake" if self.fake else (f"{inside}-warmup" if inside else "warmup")
        with _section(name):
            return warm_up(self, *args, **kwargs)

    def timed_step(self, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return step(self, *args, **kwargs)
        finally:
            if _case is not None:
                name = _label[-1] if _label else "other"
                _case["steps"][name] = _case["steps"].get(name, 0.0) + time.perf_counter() - t0
                _case["nsteps"][name] = _case["nsteps"].get(name, 0) + 1

    bench.__init__, bench.step, bench.warm_up = timed_init, timed_step, timed_warm_up


PATCHES = {"bench.measure.protocol": _patch_protocol, "bench.measure.workload": _patch_workload}


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs a patch right after the module it names has executed."""

    def find_spec(self, name, path, target=None):
        if name not in PATCHES:
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_patch(module):
            exec_module(module)
            PATCHES[name](module)

        spec.loader.exec_module = exec_then_patch
        return spec


if PATH:
    sys.meta_path.insert(0, _AfterImport())
    _emit({"event": "start", "pid": os.getpid(), "t": time.time(), "argv": sys.argv[:1]})
