"""The harness's own speed (issue 18): how much of a run is measuring, and what the rest costs.

    python -m bench.perf.harness                       # every goal, the smoke preset, 3 rounds
    python -m bench.perf.harness --goals run --preset paper --only deq-trellisnet
    python -m bench.perf.harness --against /tmp/main   # each goal paired with another checkout

Goals (targets of issue 18):
    help     `deqbench --help` wall time                                    <= 0.5 s
    figures  importing the plots and drawing the default run's figures      <= 3 s
             (as `deqbench run` does: its helpers started with the run; and, cold,
             as `deqbench plot` does)
    predict  `deqbench predict`: seconds per case (worker side)             >= 2x faster
    run      `deqbench run`: measured steps / wall time                     >= 40%
             (steps whose numbers are in the rows: memory, FLOPs, timed, predicted)
             (with where the rest goes: start-up, workers, passes, figures)

Every measurement runs in a fresh interpreter inside the checkout under test, through
`harness_probe.py`; a run's workers are clocked by `harness_clock.py` (as sitecustomize). With
`--against`, the two checkouts alternate round by round (order rotating) and each goal prints the
per-round ratio this/against: median and IQR. A run also compares the deterministic columns of the
two checkouts' results.csv (bytes, params, FLOPs, NFE): they must be identical.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
# The figures goal draws the committed default run (the run the goal is about).
DEFAULT_RUN = ROOT / "results" / "reference" / "cpu" / "default"
GOALS = ("help", "figures", "predict", "run")
TARGETS = {"help": ("help_s", "<=", 0.5), "figures": ("figures_s", "<=", 3.0),
           "run": ("measured_fraction", ">=", 0.40)}
# Columns a faster harness must leave exactly as they were.
DETERMINISTIC = ("params", "params_nonembed", "tracked_bytes", "predicted_bytes",
                 "predicted_cuda_bytes", "static_bytes", "solver_workspace_bytes", "flops_per_token",
                 "nfe_forward", "nfe_backward", "status")


# -- statistics ------------------------------------------------------------------------------------
def median_iqr(values: list[float]) -> tuple[float, float | None]:
    if not values:
        return float("nan"), None
    if len(values) < 2:
        return values[0], None
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return statistics.median(values), q3 - q1


def show(values: list[float], unit: str = " s", scale: float = 1.0) -> str:
    median, iqr = median_iqr([v * scale for v in values])
    spread = "n/a" if iqr is None else f"{iqr:.3g}"
    return f"{median:.3g}{unit} (IQR {spread}, n={len(values)})"


# -- running things in a checkout ---------------------------------------------------------------------
class Tree:
    """A checkout of the project: every probe runs with it first on PYTHONPATH."""

    def __init__(self, name: str, path: Path, work: Path) -> None:
        self.name, self.path, self.work = name, path.resolve(), work
        self.clock_dir = work / "clock"
        self.clock_dir.mkdir(parents=True, exist_ok=True)
        shutil.copy(HERE / "harness_clock.py", self.clock_dir / "sitecustomize.py")

    def env(self, clock: Path | None = None) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k != "DEQBENCH_PERF_CLOCK"}
        env["PYTHONPATH"] = os.pathsep.join([str(self.clock_dir), str(self.path),
                                             env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        if clock is not None:
            env["DEQBENCH_PERF_CLOCK"] = str(clock)
        return env

    def probe(self, *args: str, clock: Path | None = None) -> tuple[dict, float, float]:
        """(the probe's JSON, wall seconds of its interpreter from outside, CPU seconds of it
        and the processes it waited for: its workers)."""
        return self.command([sys.executable, str(HERE / "harness_probe.py"), *args], clock)

    def command(self, argv: list[str], clock: Path | None = None) -> tuple[dict, float, float]:
        t0 = time.perf_counter()
        with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
            process = subprocess.Popen(argv, cwd=self.work, env=self.env(clock), stdout=out,
                                       stderr=err, text=True)
            _, status, usage = os.wait4(process.pid, 0)
            wall = time.perf_counter() - t0
            process.returncode = os.waitstatus_to_exitcode(status)
            out.seek(0), err.seek(0)
            stdout, stderr = out.read(), err.read()
        lines = [line for line in stdout.splitlines() if line.startswith("PROBE ")]
        if process.returncode != 0 or (argv[1].endswith("harness_probe.py") and not lines):
            raise RuntimeError(f"{self.name}: {' '.join(argv[1:3])} failed ({process.returncode}):\n"
                               f"{stderr[-3000:]}")
        probe = json.loads(lines[-1][len("PROBE "):]) if lines else {}
        return probe, wall, usage.ru_utime + usage.ru_stime


def rounds_of(trees: list[Tree], rounds: int):
    """(round, tree) pairs, every round running each tree once, in a rotating order."""
    for r in range(rounds):
        shift = r % len(trees)
        for tree in trees[shift:] + trees[:shift]:
            yield r, tree


# -- goals -----------------------------------------------------------------------------------------
def goal_help(tree: Tree, r: int, args: argparse.Namespace) -> dict:
    _, wall, cpu = tree.command([sys.executable, "-m", "bench", "--help"])
    return {"help_s": wall, "help_cpu_s": cpu}


def goal_figures(tree: Tree, r: int, args: argparse.Namespace) -> dict:
    run_dir = tree.work / f"figures-{r}"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir()
    for name in ("results.csv", "env.json"):
        shutil.copy(args.figures_run / name, run_dir / name)
    out, _, _ = tree.probe("figures", str(run_dir))
    return {"figures_s": out["import_s"] + out["plot_s"], "figures_import_s": out["import_s"],
            "figures_draw_s": out["plot_s"], "figures_cpu_s": out["cpu_s"],
            "figures_cold_s": out.get("cold_s", math.nan), "figure_helpers": out.get("helpers", 0),
            "report_s": out["report_s"], "files": len(out["files"])}


def _run(tree: Tree, r: int, args: argparse.Namespace, command: str) -> dict:
    out_dir = tree.work / f"{command}-{r}"
    clock = tree.work / f"{command}-{r}.clock.jsonl"
    shutil.rmtree(out_dir, ignore_errors=True)
    clock.unlink(missing_ok=True)
    argv = [command, "--preset", args.preset, "--out", str(out_dir), "--no-progress"]
    argv += ["--only", args.only] if args.only else []
    probe, wall, cpu = tree.probe("run", *argv, clock=clock)
    events = [json.loads(line) for line in clock.read_text().splitlines()] if clock.exists() else []
    cases = [e for e in events if e["event"] == "case"]
    with open(out_dir / "results.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    result = {"wall_s": wall, "cpu_s": cpu, "rows": {row["case_id"]: row for row in rows}}
    sections: dict[str, float] = {}
    steps: dict[str, float] = {}
    for case in cases:
        for key, value in case["sections"].items():
            sections[key] = sections.get(key, 0.0) + value
        for key, value in case["steps"].items():
            steps[key] = steps.get(key, 0.0) + value
    result["sections"], result["steps"] = sections, steps
    result["cases_s"] = sum(c["total"] for c in cases)
    result["timed_steps_s"] = steps.get("timed", 0.0)
    # The steps whose numbers land in the row: tracked memory, FLOPs, timed repeats, and the
    # predicted pass (the only memory measurement of the paper-size cases; elsewhere a sample
    # that holds predicted against tracked). Warm-ups and fake builds are the cost around them.
    result["measured_steps_s"] = sum(steps.get(k, 0.0) for k in ("memory", "flops", "timed", "predict"))
    result["measured_fraction"] = result["measured_steps_s"] / wall
    result["timed_fraction"] = result["timed_steps_s"] / wall
    result["figures_s"], result["report_s"] = probe["figures_s"], probe["report_s"]
    elapsed = [float(row["elapsed_s"]) for row in rows if row.get("elapsed_s")]
    result["case_elapsed_s"] = elapsed
    result["worker_side_s"] = sum(elapsed)
    result["outside_measure_s"] = sum(elapsed) - result["cases_s"]
    # Start-up: this interpreter until the command began; the parent until its first worker;
    # each worker from its spawn to its first case's measure().
    result["startup_s"] = probe["imported"] - (probe["ended"] - wall)
    spawns = probe["spawns"]
    result["before_spawn_s"] = (spawns[0] - probe["imported"]) if spawns else 0.0
    firsts: dict[int, float] = {}
    for case in cases:
        firsts.setdefault(case["pid"], case["t_start"])
    worker_starts = [first - spawn for spawn, first in zip(spawns, sorted(firsts.values()), strict=False)]
    # Between one case's measure() and the next one's in the same worker: the row's way back
    # to the parent, its CSV line, the next case's way out, the worker's own bookkeeping.
    gaps = [b["t_start"] - a["t_end"] for a, b in itertools.pairwise(cases) if a["pid"] == b["pid"]]
    result["between_cases_s"] = sum(gaps)
    result["workers"] = len(spawns)
    result["worker_start_s"] = worker_starts
    result["outputs_s"] = probe["figures_s"] + probe["report_s"]
    return result


def goal_run(tree: Tree, r: int, args: argparse.Namespace) -> dict:
    return _run(tree, r, args, "run")


def goal_predict(tree: Tree, r: int, args: argparse.Namespace) -> dict:
    result = _run(tree, r, args, "predict")
    result["predict_case_s"] = statistics.median(result["case_elapsed_s"])
    return result


GOAL_FUNCS = {"help": goal_help, "figures": goal_figures, "predict": goal_predict, "run": goal_run}


# -- reporting ---------------------------------------------------------------------------------------
def verdict(goal: str, values: list[float]) -> str:
    if goal not in TARGETS:
        return ""
    key, op, target = TARGETS[goal]
    median = median_iqr(values)[0]
    ok = median <= target if op == "<=" else median >= target
    return f"  target {key} {op} {target:g}: {'met' if ok else 'NOT met'}"


def paired(results: dict[str, list[dict]], this: str, other: str, key: str) -> list[float]:
    return [a[key] / b[key] for a, b in zip(results[this], results[other], strict=True) if b[key]]


def per_case_ratios(results: dict[str, list[dict]], this: str, other: str) -> list[float]:
    """Worker-side seconds of each case, this/against, in the same round."""
    out = []
    for a, b in zip(results[this], results[other], strict=True):
        for case_id, row in a["rows"].items():
            other_row = b["rows"].get(case_id)
            if other_row and row.get("elapsed_s") and other_row.get("elapsed_s"):
                out.append(float(row["elapsed_s"]) / float(other_row["elapsed_s"]))
    return out


def differences(results: dict[str, list[dict]]) -> list[str]:
    """Deterministic cells that differ between any two runs (of any checkout). A column one run
    left empty is not compared (e.g. predicted bytes where only one checkout predicts)."""
    runs = [(name, i, run["rows"]) for name, rs in results.items() for i, run in enumerate(rs)]
    name0, i0, first = runs[0]
    found = []
    for name, i, rows in runs[1:]:
        for case_id in sorted(set(first) | set(rows)):
            if case_id not in first or case_id not in rows:
                found.append(f"{case_id}: only in one run")
                continue
            for col in DETERMINISTIC:
                a, b = first[case_id].get(col) or "", rows[case_id].get(col) or ""
                if a and b and float_or(a) != float_or(b):
                    found.append(f"{case_id} {col}: {name0}#{i0}={a} {name}#{i}={b}")
    return found


def float_or(text: str):
    try:
        return float(text)
    except ValueError:
        return text


def report(goal: str, results: dict[str, list[dict]], names: list[str]) -> None:
    this = names[0]
    print(f"\n## {goal}")
    keys = {"help": ["help_s", "help_cpu_s"],
            "figures": ["figures_s", "figures_import_s", "figures_draw_s", "figures_cpu_s", "figures_cold_s",
                        "figure_helpers", "report_s"],
            "predict": ["predict_case_s", "wall_s", "cpu_s", "cases_s"],
            "run": ["wall_s", "cpu_s", "measured_fraction", "timed_fraction", "measured_steps_s",
                    "timed_steps_s", "cases_s", "startup_s", "before_spawn_s", "outside_measure_s",
                    "between_cases_s",
                    "figures_s", "report_s"]}[goal]
    for name in names:
        print(f"{name}:")
        for key in keys:
            values = [r[key] for r in results[name]]
            unit, scale = ("%", 100.0) if key.endswith("fraction") else (" s", 1.0)
            print(f"  {key:<20} {show(values, unit, scale)}")
        if goal in ("run", "predict"):
            last = results[name][-1]
            sections = ", ".join(f"{k} {v:.2f}" for k, v in sorted(last["sections"].items(),
                                                                      key=lambda kv: -kv[1]))
            steps = ", ".join(f"{k} {v:.2f}" for k, v in sorted(last["steps"].items(),
                                                               key=lambda kv: -kv[1]))
            print(f"  inside measure() (last round, s): {sections}")
            print(f"  steps by pass (last round, s): {steps}")
            starts = ", ".join(f"{s:.2f}" for s in last["worker_start_s"])
            print(f"  workers: {last['workers']}, spawn -> first case (s): {starts}")
        if goal in TARGETS:
            key = TARGETS[goal][0]
            print(f" {verdict(goal, [r[key] for r in results[name]])}")
    if len(names) > 1:
        other = names[1]
        key = {"help": "help_s", "figures": "figures_s", "predict": "predict_case_s",
               "run": "wall_s"}[goal]
        print(f"ratio {this}/{other} of {key}: {show(paired(results, this, other, key), 'x')}")
        if goal == "predict":
            print(f"per-case ratio {this}/{other} (worker side): "
                  f"{show(per_case_ratios(results, this, other), 'x')}")
    if goal in ("run", "predict"):
        diffs = differences(results)
        print(f"deterministic columns ({', '.join(DETERMINISTIC)}): "
              f"{'identical in every run' if not diffs else f'{len(diffs)} differences'}")
        for line in diffs[:20]:
            print(f"  {line}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.perf.harness", description=__doc__.split("\n")[0])
    parser.add_argument("--goals", default=",".join(GOALS), help=f"comma-separated: {', '.join(GOALS)}")
    parser.add_argument("--preset", default="smoke", help="the preset run and predicted (default smoke)")
    parser.add_argument("--only", help="the cases of the preset to run (deqbench run --only)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--figures-run", type=Path, default=DEFAULT_RUN,
                        help="the run whose figures the figures goal draws (default: the committed default run)")
    parser.add_argument("--against", type=Path, help="another checkout, measured in alternating rounds")
    parser.add_argument("--keep", type=Path, help="keep the runs here (default: a temporary directory)")
    args = parser.parse_args(argv)
    goals = [g.strip() for g in args.goals.split(",") if g.strip()]
    unknown = sorted(set(goals) - set(GOALS))
    if unknown or args.rounds < 1:
        parser.error(f"unknown goal(s) {unknown}" if unknown else "--rounds must be >= 1")
    if args.against is not None and not (args.against / "bench" / "cli.py").is_file():
        parser.error(f"--against {args.against} is not a checkout of this project (no bench/cli.py)")
    work = args.keep or Path(tempfile.mkdtemp(prefix="deqbench-perf-"))
    trees = [Tree("this", ROOT, work / "this")]
    if args.against is not None:
        trees.append(Tree("against", args.against, work / "against"))
    print(f"# bench.perf.harness: preset {args.preset}{f' --only {args.only}' if args.only else ''}, "
          f"{args.rounds} round(s), {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}; "
          f"this = {ROOT}" + (f", against = {args.against}" if args.against else ""))
    for goal in goals:
        results: dict[str, list[dict]] = {t.name: [] for t in trees}
        for r, tree in rounds_of(trees, args.rounds):
            results[tree.name].append(GOAL_FUNCS[goal](tree, r, args))
        report(goal, results, [t.name for t in trees])
    if args.keep is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
