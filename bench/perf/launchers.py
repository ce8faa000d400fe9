"""What the launchers buy and cost (issue 14): wall time of a matrix with N local workers against
one, and the SLURM launcher's overhead per case.

    python -m bench.perf.launchers                           # smoke predict, --workers 2 vs 1
    python -m bench.perf.launchers --command run --only T32 --rounds 3
    python -m bench.perf.launchers --slurm                   # also: SLURM on a local test cluster

`local`: each round runs `deqbench <command> --preset P --workers N` and `--workers 1` in fresh
folders, in rotating order (bench.perf.paired's interleaving), and prints the wall ratio
workers-1 / workers-N per round: median and IQR (expect close to N on memory-only `predict`
where the cores are free; the rows' deterministic columns are compared too).

`slurm`: a run through `--launcher slurm` (on SLURM_CONF's cluster, or with --start-cluster a
throwaway one from tests/slurm_cluster.py, as root). Per case: from the job's submission (the
driver's record in slurm/jobs.jsonl) to its row file landing, minus the case's own time in the
job (`elapsed_s`): sbatch, scheduling, the job's Python and torch start-up, the row's write.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.measure.timing import summarize

ROOT = Path(__file__).resolve().parents[2]
DETERMINISTIC = ("case_id", "status", "params", "tracked_bytes", "predicted_bytes", "peak_bytes",
                 "flops_per_token")


def spread(values: list[float], unit: str = "") -> str:
    median, iqr = summarize(values)
    return f"{median:.3g}{unit} (IQR {'n/a' if iqr is None else f'{iqr:.3g}{unit}'}, n={len(values)})"


CPU_SECONDS: list[float] = []  # CPU seconds (user + sys) of each deqbench command, its workers included


def deqbench(args: list[str], out: Path, env: dict[str, str] | None = None) -> float:
    """Wall seconds of one `deqbench` command (fails loudly: a benchmark of a failed run is none);
    its CPU seconds, workers included, go to CPU_SECONDS."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "bench", *args, "--out", str(out), "--no-progress",
                           "--no-report"], cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    CPU_SECONDS.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
    if done.returncode != 0:
        raise SystemExit(f"`deqbench {' '.join(args)}` exited {done.returncode}: {done.stderr.strip()[-2000:]}")
    return seconds


def deterministic(out: Path) -> list[tuple]:
    from bench.results import read_results

    df = read_results(out)
    cols = [c for c in DETERMINISTIC if c in df.columns]
    return [tuple(map(str, r)) for r in df[cols].itertuples(index=False)]


def local(args: argparse.Namespace, root: Path) -> None:
    base = [args.command, "--preset", args.preset, *(["--only", args.only] if args.only else [])]
    variants = {1: [], args.workers: ["--workers", str(args.workers)]}
    seconds: dict[int, list[float]] = {n: [] for n in variants}
    cpu: dict[int, list[float]] = {n: [] for n in variants}
    rows: dict[int, list[tuple]] = {}
    names = list(variants)
    for round_ in range(args.rounds + 1):  # round 0 warms caches (imports, page cache), untimed
        for n in names[round_ % 2:] + names[:round_ % 2]:
            out = root / f"local-{n}-{round_}"
            elapsed = deqbench(base + variants[n], out)
            rows.setdefault(n, deterministic(out))
            if round_:
                seconds[n].append(elapsed)
                cpu[n].append(CPU_SECONDS[-1])
            shutil.rmtree(out)
    ratio = [a / b for a, b in zip(seconds[1], seconds[args.workers], strict=True)]
    print(f"local: `deqbench {' '.join(base)}` ({os.cpu_count()} cores)")
    for n in variants:  # CPU / wall: how many cores the run kept busy (its workers included)
        busy = [c / w for c, w in zip(cpu[n], seconds[n], strict=True)]
        print(f"  --workers {n:<3} wall {spread(seconds[n], ' s')}, CPU {spread(cpu[n], ' s')}, "
              f"cores busy {spread(busy)}")
    print(f"  speed-up (workers 1 / workers {args.workers}, per round): {spread(ratio, 'x')}")
    print(f"  deterministic columns identical: {rows[1] == rows[args.workers]}")


def slurm(args: argparse.Namespace, root: Path) -> None:
    cluster = None
    env = dict(os.environ)
    if args.start_cluster:
        sys.path.insert(0, str(ROOT))
        from tests.slurm_cluster import start_cluster

        cluster = start_cluster(root / "cluster")
        env["SLURM_CONF"] = str(cluster.conf)
    try:
        base = [args.command, "--preset", args.preset, *(["--only", args.only] if args.only else []),
                "--launcher", "slurm", *(["--slurm-partition", args.partition] if args.partition else []),
                *(["--slurm-array-parallelism", str(args.array)] if args.array else [])]
        local_out, out = root / "slurm-local", root / "slurm"
        local_s = deqbench(base[:base.index("--launcher")], local_out)
        wall = deqbench(base, out, env)
        from bench.launchers.slurm import saved_jobs
        from bench.results import read_results
        from bench.rundir import row_file

        df = read_results(out).set_index("case_id")
        jobs = saved_jobs(out)
        overhead, queued, in_job = [], [], []
        times = accounting([j["job_id"] for j in jobs.values()], env)
        for case_id, job in jobs.items():
            landed = row_file(out, case_id).stat().st_mtime
            case_s = float(df.loc[case_id, "elapsed_s"])
            overhead.append(landed - job["submitted"] - case_s)
            if job["job_id"] in times:  # whole seconds (sacct)
                submit, start, end = times[job["job_id"]]
                queued.append(start - submit)
                in_job.append(end - start - case_s)
        print(f"slurm: `deqbench {' '.join(base)}`: {len(df)} cases, driver wall {wall:.1f} s "
              f"(one local worker: {local_s:.1f} s)")
        print(f"  per-case overhead (submit -> row landed, minus the case's own time): {spread(overhead, ' s')}"
              f"; max {max(overhead):.2f} s")
        print(f"  of which queued (sacct Submit -> Start, whole seconds): {spread(queued, ' s')}; in the job "
              f"beyond the case (Python, torch and bench imports, row write): {spread(in_job, ' s')}")
        print(f"  driver wall beyond one local worker, per case: {(wall - local_s) / len(df):.2f} s")
        print(f"  deterministic columns identical to one local worker: "
              f"{deterministic(out) == deterministic(local_out)}")
    finally:
        if cluster is not None:
            cluster.stop()


def accounting(job_ids: list[str], env: dict[str, str]) -> dict[str, tuple[float, float, float]]:
    """job id -> (submit, start, end) in epoch seconds, from sacct."""
    import datetime as dt

    done = subprocess.run(["sacct", "-X", "-n", "-P", "-o", "JobID,Submit,Start,End", "-j", ",".join(job_ids)],
                          env=env, capture_output=True, text=True, check=False)
    times = {}
    for line in done.stdout.splitlines():
        job_id, *stamps = line.split("|")
        with contextlib.suppress(ValueError):
            times[job_id] = tuple(dt.datetime.fromisoformat(t).timestamp() for t in stamps)
    return times


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.perf.launchers", description=__doc__.splitlines()[0])
    p.add_argument("--command", choices=("predict", "run"), default="predict")
    p.add_argument("--preset", default="smoke")
    p.add_argument("--only", help="deqbench's --only (a subset of the preset)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--slurm", action="store_true", help="also measure the SLURM launcher")
    p.add_argument("--slurm-only", action="store_true", help="only the SLURM launcher")
    p.add_argument("--start-cluster", action="store_true",
                   help="with --slurm: start a throwaway local cluster (tests/slurm_cluster.py; root)")
    p.add_argument("--partition", help="with --slurm: the partition (default: the cluster's)")
    p.add_argument("--array", type=int, help="with --slurm: --slurm-array-parallelism (1: one job "
                   "at a time, so that no two jobs share the cores)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="deqbench-launchers-") as tmp:
        if not args.slurm_only:
            local(args, Path(tmp))
        if args.slurm or args.slurm_only:
            slurm(args, Path(tmp))
    print(f"# python {sys.version.split()[0]}; medians with their IQR")


if __name__ == "__main__":
    main()
