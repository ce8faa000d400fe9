"""The SLURM launcher: one job per case (or one job array) through submitit.AutoExecutor.

Each job measures its case in a fresh process on a compute node (bench.worker's `execute`, as a
fresh local worker does) and writes the case's row file itself: the run folder must be on a
filesystem the nodes share. The driver, holding the folder's lock, saves every submitted job id
in `slurm/jobs.jsonl` (fsynced before it waits), merges row files into results.csv as they land,
and turns a job that ended without a row into one from its SLURM end state:

    TIMEOUT, DEADLINE          timeout  (over --slurm-time)
    OUT_OF_MEMORY              oom      (over --slurm-mem; also FAILED whose log says so)
    PREEMPTED, NODE_FAIL, ...  submitted once more, then error
    CANCELLED                  killed   (someone cancelled it: `--resume` runs it again)
    FAILED, anything else      error, with the last line of the job's stderr

A driver killed or stopped leaves its jobs queued or running; `deqbench run --resume` re-attaches
to every saved job of a case without a row instead of submitting it again. (A kill between sbatch
and the save loses that one job id: the case is submitted again, and its row is written twice,
the same case either way.)
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import subprocess
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench import rundir
from bench.errors import UserError
from bench.launchers import LauncherConfig
from bench.runner import RunOptions, _row, counts_text, progress_bar
from bench.spec import Case, Matrix

FOLDER, JOBS = "slurm", "jobs.jsonl"
POLL_S = 1.0  # between accounting queries (the test cluster schedules every 1 s)
ROW_GRACE_S = 30.0  # a COMPLETED job's row file may take this long to appear (NFS attribute caches)
UNKNOWN_S = 120.0  # a saved job that neither sacct nor squeue knows for this long has vanished
ACTIVE = {"PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESIZING", "SUSPENDED",
          "COMPLETING", "CONFIGURING", "SIGNALING", "STAGE_OUT", "STOPPED", "RESV_DEL_HOLD",
          "SPECIAL_EXIT", "UNKNOWN"}
RESUBMIT = {"PREEMPTED", "NODE_FAIL", "BOOT_FAIL"}
MEMORY_WORDS = ("exceeded memory limit", "oom-kill", "out of memory", "out_of_memory", "oom_kill")
ATTEMPTS = 2  # a job lost to preemption or a node is submitted once more


# -- in the job -----------------------------------------------------------------------------------
def run_job(run_dir: str, message: dict[str, Any], device: str, memory_limit: int | None,
            settings: dict[str, Any], instruments: tuple[str, ...]) -> dict[str, Any]:
    """A SLURM job's body: measure one case, write its row file (with the job id), return it."""
    import submitit

    from bench import worker
    from bench.spec import RunSettings

    job_id = submitit.JobEnvironment().job_id
    run_settings = RunSettings(**settings)
    if run_settings.threads is not None:
        import torch

        torch.set_num_threads(run_settings.threads)
    worker._import_everything(device, instruments)
    case = Case.from_message(message)
    with worker.AddressSpaceLimit(memory_limit) as limit:
        result = worker.execute(case, device, run_settings, instruments, limit)
    row = {**_row(case, result, device), "job_id": job_id}
    return rundir.write_row(Path(run_dir), row)


# -- the driver -----------------------------------------------------------------------------------
def end_row(state: str, job: dict[str, Any], config: LauncherConfig) -> dict[str, Any] | None:
    """The row of a job that ended without writing one; None: submit it again (it was lost to
    preemption or a failed node and has attempts left)."""
    job_id, log = job["job_id"], _tail(job.get("stderr"))
    said = f"; job log: {log[-1][:200]}" if log else ""
    if state in RESUBMIT:
        if job.get("attempt", 1) < ATTEMPTS:
            return None
        return {"status": "error", "error": f"SLURM job {job_id} ended {state} on its attempt "
                f"{job.get('attempt', 1)} of {ATTEMPTS}{said}"}
    if state in ("TIMEOUT", "DEADLINE"):
        limit = f" of {config.slurm_time} min" if config.slurm_time else ""
        return {"status": "timeout", "error": f"SLURM job {job_id} reached its time limit{limit} "
                f"({state}); raise --slurm-time{said}"}
    over_memory = any(w in line.lower() for line in log for w in MEMORY_WORDS)
    if state == "OUT_OF_MEMORY" or (state == "FAILED" and over_memory):
        limit = f" (--slurm-mem {config.slurm_mem})" if config.slurm_mem else ""
        return {"status": "oom", "error": f"SLURM job {job_id} killed for memory{limit}: {state}{said}"}
    if state == "CANCELLED":
        return {"status": "killed", "error": f"SLURM job {job_id} was cancelled{said}"}
    if state == "COMPLETED":
        return {"status": "error", "error": f"SLURM job {job_id} completed but its row file never "
                "appeared: is the run folder on a filesystem the nodes share?"}
    return {"status": "error", "error": f"SLURM job {job_id} ended {state} before writing its row{said}"}


def _tail(path: str | None, lines: int = 20) -> list[str]:
    if not path:
        return []
    with contextlib.suppress(OSError), open(path, "rb") as fh:
        fh.seek(max(0, os.fstat(fh.fileno()).st_size - 8192))
        return [ln.strip() for ln in fh.read().decode(errors="replace").splitlines() if ln.strip()][-lines:]
    return []


def job_states(job_ids: Iterable[str]) -> dict[str, str]:
    """SLURM's state of each job ("CANCELLED by 0" -> "CANCELLED"): accounting (sacct), else the
    queue (squeue); a job neither knows is left out."""
    ids = sorted(set(job_ids))
    if not ids:
        return {}
    states: dict[str, str] = {}
    sacct = _client("sacct", "-X", "-n", "-P", "-o", "JobID,State", "-j", ",".join(ids))
    for line in (sacct or "").splitlines():
        job_id, _, state = line.partition("|")
        if job_id in ids and state:
            states[job_id] = state.split()[0]
    missing = [i for i in ids if i not in states]
    if missing:
        queue = _client("squeue", "-h", "-r", "-o", "%i|%T") or ""
        for line in queue.splitlines():
            job_id, _, state = line.partition("|")
            if job_id in missing and state:
                states[job_id] = state.split()[0]
    return states


def _client(*args: str) -> str | None:
    try:
        out = subprocess.run(args, capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout if out.returncode == 0 else None


def saved_jobs(run_dir: Path) -> dict[str, dict[str, Any]]:
    """case id -> the latest job submitted for it (slurm/jobs.jsonl; a torn last line is skipped)."""
    jobs: dict[str, dict[str, Any]] = {}
    with contextlib.suppress(OSError), (run_dir / FOLDER / JOBS).open() as fh:
        for line in fh:
            with contextlib.suppress(ValueError):
                job = json.loads(line)
                if isinstance(job, dict) and isinstance(job.get("case_id"), str):
                    jobs[job["case_id"]] = job
    return jobs


class SlurmLauncher:
    def __init__(self, config: LauncherConfig) -> None:
        self.config = config
        self.executor = None

    def start(self, todo: Sequence[Case], matrix: Matrix, options: RunOptions,
              results: rundir.Results) -> None:
        pass  # nothing to warm up: the jobs start on the cluster

    def _executor(self, run_dir: Path, matrix: Matrix):
        if self.executor is not None:
            return self.executor
        try:
            import submitit
        except ImportError:
            raise UserError("--launcher slurm needs submitit: pip install submitit") from None
        c = self.config
        minutes = c.slurm_time or math.ceil(matrix.settings.timeout_s / 60) + 1
        params: dict[str, Any] = {"timeout_min": minutes, "slurm_use_srun": False,
                                  "slurm_job_name": f"deqbench-{matrix.name}"}
        # slurm_use_srun=False: the case runs in the batch step, so TIMEOUT and OUT_OF_MEMORY land
        # on the job's own accounting row (under srun the step ends FAILED; tests/slurm_cluster.py)
        for key, value in (("slurm_partition", c.slurm_partition), ("slurm_mem", c.slurm_mem),
                           ("slurm_gpus_per_task", c.slurm_gpus_per_task),
                           ("slurm_array_parallelism", c.slurm_array_parallelism)):
            if value is not None:
                params[key] = value
        if c.slurm_setup:
            params["slurm_setup"] = list(c.slurm_setup)
        self.executor = submitit.AutoExecutor(folder=run_dir / FOLDER / "%j", cluster="slurm")
        self.executor.update_parameters(**params)
        return self.executor

    def _submit(self, cases: Sequence[Case], attempts: dict[str, int], matrix: Matrix,
                options: RunOptions, run_dir: Path) -> list[dict[str, Any]]:
        """Submit cases (one job array when --slurm-array-parallelism is given) and save the job
        ids before returning them."""
        if not cases:
            return []
        executor = self._executor(run_dir, matrix)
        instruments = tuple(options.instruments or matrix.settings.instruments)
        args = [(str(run_dir), c.to_message(), options.device, options.memory_limit,
                 asdict(matrix.settings), instruments) for c in cases]
        try:
            if self.config.slurm_array_parallelism:
                with executor.batch():
                    submitted = [executor.submit(run_job, *a) for a in args]
            else:
                submitted = [executor.submit(run_job, *a) for a in args]
        except Exception as err:  # sbatch refused (a bad partition, no such GPU): one line
            text = str(err).strip().splitlines()
            raise UserError(f"sbatch refused the job: {text[-1] if text else type(err).__name__}; "
                            "check --slurm-partition, --slurm-gpus-per-task, --slurm-mem") from None
        jobs = [{"case_id": c.case_id, "job_id": str(j.job_id), "attempt": attempts.get(c.case_id, 1),
                 "stderr": str(j.paths.stderr), "submitted": time.time()}
                for c, j in zip(cases, submitted, strict=True)]
        folder = run_dir / FOLDER
        folder.mkdir(exist_ok=True)
        with (folder / JOBS).open("a") as fh:
            fh.write("".join(json.dumps(j) + "\n" for j in jobs))
            fh.flush()
            os.fsync(fh.fileno())
        return jobs

    def run(self, todo: Sequence[Case], matrix: Matrix, options: RunOptions,
            results: rundir.Results, done: int) -> list[dict[str, Any]]:
        run_dir = results.run_dir
        saved = saved_jobs(run_dir)
        # Re-attach to a saved job of a case without a row (it may still be queued or running,
        # or have ended while no driver watched); a case whose row is retried gets a new job.
        attach = [saved[c.case_id] for c in todo if c.case_id in saved and c.case_id not in results.rows]
        by_id = {c.case_id: c for c in todo}
        fresh = [c for c in todo if c.case_id not in {j["case_id"] for j in attach}]
        outstanding = {j["case_id"]: j for j in attach}
        bar = progress_bar(len(todo), options.progress, skipped=done)
        rows: list[dict[str, Any]] = []
        try:
            for job in self._submit(fresh, {}, matrix, options, run_dir):
                outstanding[job["case_id"]] = job
            ended: dict[str, float] = {}  # case id -> when its job was first seen ended without a row
            unknown: dict[str, float] = {}
            while outstanding:
                states = job_states(j["job_id"] for j in outstanding.values())
                now, again = time.monotonic(), []
                for case_id, job in list(outstanding.items()):
                    row = _landed(run_dir, case_id, job["job_id"])
                    state = states.get(job["job_id"])
                    if row is None and state is None:
                        unknown.setdefault(case_id, now)
                        if now - unknown[case_id] < UNKNOWN_S:
                            continue
                        state = "VANISHED"
                    if row is None and state in ACTIVE:
                        continue
                    if row is None:
                        # ended: a row written just before the end may still be on its way
                        ended.setdefault(case_id, now)
                        if state == "COMPLETED" and now - ended[case_id] < ROW_GRACE_S:
                            continue
                        if now - ended[case_id] < 2 * POLL_S:
                            continue
                        result = end_row(state, job, self.config)
                        if result is None:
                            again.append(by_id[case_id])
                            del outstanding[case_id]
                            continue
                        row = {**_row(by_id[case_id], result, options.device), "job_id": job["job_id"]}
                    del outstanding[case_id]
                    rows.append(results.add(row))
                    if bar is not None:
                        bar.set_postfix_str(counts_text(0, len(outstanding), len(rows)), refresh=False)
                        bar.update(1)
                attempts = {c.case_id: _attempt(run_dir, c.case_id) + 1 for c in again}
                for job in self._submit(again, attempts, matrix, options, run_dir):
                    outstanding[job["case_id"]] = job
                if bar is not None:
                    running = sum(states.get(j["job_id"]) == "RUNNING" for j in outstanding.values())
                    bar.set_postfix_str(counts_text(running, len(outstanding) - running, len(rows)),
                                        refresh=True)
                if outstanding:
                    time.sleep(POLL_S)
        finally:
            if bar is not None:
                bar.close()
        return rows

    def stop(self) -> None:
        pass  # jobs go on: `--resume` re-attaches to them (scancel them to drop them)


def _attempt(run_dir: Path, case_id: str) -> int:
    return saved_jobs(run_dir).get(case_id, {}).get("attempt", 1)


def _landed(run_dir: Path, case_id: str, job_id: str) -> dict[str, Any] | None:
    """The case's row file, if the job `job_id` wrote it (a retried case's old row does not count)."""
    try:
        row = json.loads(rundir.row_file(run_dir, case_id).read_text())
    except (OSError, ValueError):
        return None
    return row if isinstance(row, dict) and row.get("job_id") == job_id else None
