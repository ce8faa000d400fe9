"""One measurement of bench.perf.harness, run as a script inside the checkout under test (its
directory first on PYTHONPATH), so that two checkouts can be compared round by round. Prints one
JSON line. Standalone: it uses only the project's public entry points, which every checkout has.

    python harness_probe.py run ARGS...      `deqbench ARGS` in this process (run or predict):
                                             wall time, spawn times, figures and report
    python harness_probe.py figures RUN_DIR  import the plotting package, draw a run's figures
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
    t0 = time.perf_counter()
    c0 = time.process_time()
    from bench import plots

    t1 = time.perf_counter()
    figures = plots.plot_run(run_dir)
    t2 = time.perf_counter()
    cpu = time.process_time() - c0
    from bench import report

    report.write_report(run_dir)
    t3 = time.perf_counter()
    return {"import_s": t1 - t0, "plot_s": t2 - t1, "report_s": t3 - t2, "cpu_s": cpu,
            "files": sorted(f for fig in figures.made for f in fig.files)}


if __name__ == "__main__":
    kind, rest = sys.argv[1], sys.argv[2:]
    result = probe_run(rest) if kind == "run" else probe_figures(rest[0])
    print("PROBE " + json.dumps(result))
