"""One measurement of bench.perf.harness, run as a script inside the checkout under test (its
directory first on PYTHONPATH), so that two checkouts can be compared round by round. Prints one
JSON line. Standalone: it uses only the project's public entry points, which every checkout has.

    python harness_probe.py run ARGS...      `deqbench ARGS` in this process (run or predict):
                                             wall time, spawn times, figures and report
    python harness_probe.py figures RUN_DIR  import the plotting package, draw a run's figures
                                             (as `deqbench run` does, then as `deqbench plot`)
"""

from __future__ import annotations

import json
import sys
import time


def probe_run(argv: list[str]) -> dict:
    import multiprocessing.process

    started = time.time()
    spawns: list[float] = []
    start = multiprocessing.process.BaseProcess.start

    def recorded_start(self):
        if self.name != "deqbench-figures":  # workers only: the figures' helpers start too
            spawns.append(time.time())
        return start(self)

    multiprocessing.process.BaseProcess.start = recorded_start
    from bench import cli, plots, report

    outputs: dict[str, float] = {"figures_s": 0.0, "report_s": 0.0}
    plot_run, write_report = plots.plot_run, report.write_report

    def timed(fn, key):
        def inner(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                outputs[key] += time.perf_counter() - t0
        return inner

    plots.plot_run = timed(plot_run, "figures_s")
    report.write_report = timed(write_report, "report_s")
    imported = time.time()
    code = cli.main(argv)
    ended = time.time()
    return {"code": code, "started": started, "imported": imported, "ended": ended,
            "spawns": spawns, **outputs}


def probe_figures(run_dir: str) -> dict:
    """The figures as `deqbench run` draws them (its pool of helpers started with the run, so
    warm by the end: given a few untimed seconds here), then as `deqbench plot` does (the pool
    started on the spot) into a copy of the run. Checkouts without a pool draw alone, twice."""
    import shutil

    t0 = time.perf_counter()
    c0 = time.process_time()
    from bench import plots

    t1 = time.perf_counter()
    start = getattr(plots, "FigurePool", None)
    pool = start.start() if start else None
    helpers = pool.size if pool else 0
    time.sleep(3.0 if pool else 0.0)  # the run's cases go on meanwhile
    t2 = time.perf_counter()
    figures = plots.plot_run(run_dir, **({"pool": pool} if pool else {}))
    t3 = time.perf_counter()
    cpu = time.process_time() - c0
    from bench import report

    report.write_report(run_dir)
    t4 = time.perf_counter()
    cold_dir = run_dir.rstrip("/") + "-cold"
    shutil.rmtree(cold_dir, ignore_errors=True)
    shutil.copytree(run_dir, cold_dir, ignore=shutil.ignore_patterns("figures", "report.md"))
    t5 = time.perf_counter()
    if pool:
        pool.close()
        with start.start() as cold_pool:
            plots.plot_run(cold_dir, pool=cold_pool)
    else:
        plots.plot_run(cold_dir)
    t6 = time.perf_counter()
    return {"import_s": t1 - t0, "plot_s": t3 - t2, "report_s": t4 - t3, "cpu_s": cpu,
            "cold_s": t6 - t5, "helpers": helpers,
            "files": sorted(f for fig in figures.made for f in fig.files)}


if __name__ == "__main__":
    kind, rest = sys.argv[1], sys.argv[2:]
    result = probe_run(rest) if kind == "run" else probe_figures(rest[0])
    print("PROBE " + json.dumps(result))
