"""Run a matrix: each case in a spawned worker process, each outcome a row, nothing lost.

The runner never measures anything itself. It hands cases to a worker (bench.worker) one at a
time and waits at most `timeout_s` for the row. A worker serves several cases only on the CPU
without a memory limit, where its history cannot change a measurement (tracked and predicted
bytes count live storages from zero, timing follows warm-up); on CUDA, or with a memory limit, every
case gets a fresh process so allocator caches, the CUDA context and address space start clean.
After any failure the worker is replaced. Rows are appended (and fsynced) as cases end, so a
killed run keeps them and `resume` finishes it.
"""

from __future__ import annotations

import contextlib
import fnmatch
import multiprocessing as mp
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench import env as envmod
from bench.results import ENV, OK_STATUSES, append_row, finished_case_ids, write_json
from bench.spec import Case, Matrix


@dataclass(frozen=True)
class RunOptions:
    device: str = "cpu"
    memory_limit: int | None = None  # bytes of extra address space per case (CPU)
    instruments: tuple[str, ...] = ()  # empty: the matrix's [settings] instruments, else all the device allows
    progress: bool = True


def select_cases(cases: Sequence[Case], only: str | None) -> list[Case]:
    """Cases whose id matches any comma-separated pattern (substring or glob)."""
    if not only:
        return list(cases)
    patterns = [p.strip() for p in only.split(",") if p.strip()]
    return [
        c for c in cases
        if any(p in c.case_id or fnmatch.fnmatch(c.case_id, p) for p in patterns)
    ]


class _Worker:
    """One spawned worker process and its pipe."""

    def __init__(self, options: RunOptions, matrix: Matrix) -> None:
        from bench.worker import serve

        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(
            target=serve,
            args=(child, options.device, options.memory_limit, asdict(matrix.settings),
                  options.instruments or matrix.settings.instruments),
            daemon=True,
        )
        self.process.start()
        child.close()
        self.cases = 0

    def run(self, case: Case, timeout_s: float) -> dict[str, Any]:
        self.cases += 1
        t0 = time.monotonic()
        try:
            self.conn.send(case.to_message())
            answered = self.conn.poll(timeout_s)  # True on a row, and on EOF (a dead worker)
        except OSError:  # the pipe broke: the worker is gone
            answered = True
        if answered:
            with contextlib.suppress(EOFError, OSError):
                return self.conn.recv()
            self.process.join(10)
            return _death_row(self.process.exitcode, time.monotonic() - t0)
        self.kill()
        return {"status": "timeout", "elapsed_s": time.monotonic() - t0,
                "error": f"no result within the {timeout_s:g} s case time limit"}

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join(10)
        self.conn.close()

    def close(self) -> None:
        with contextlib.suppress(BrokenPipeError, OSError):
            self.conn.send(None)
        self.process.join(10)
        if self.process.is_alive():
            self.kill()


def _death_row(exitcode: int | None, elapsed: float) -> dict[str, Any]:
    if exitcode is not None and exitcode < 0:
        sig = signal.Signals(-exitcode).name if -exitcode in signal.valid_signals() else str(-exitcode)
        if -exitcode == signal.SIGKILL:
            return {"status": "oom", "elapsed_s": elapsed,
                    "error": "worker killed by SIGKILL (the OS out-of-memory killer, most likely)"}
        return {"status": "error", "elapsed_s": elapsed, "error": f"worker died from signal {sig}"}
    return {"status": "error", "elapsed_s": elapsed,
            "error": f"worker exited with code {exitcode} before reporting"}


def prepare_run_dir(out: Path, matrix: Matrix, *, resume: bool, argv: list[str] | None,
                    device: str) -> None:
    """Create the run directory and write env.json first (kept as-is when resuming)."""
    out.mkdir(parents=True, exist_ok=True)
    env_path = out / ENV
    if not (resume and env_path.exists()):
        env = envmod.capture(device, argv)
        env["matrix"] = {"name": matrix.name, "source": matrix.source, "cases": len(matrix.cases),
                         "settings": asdict(matrix.settings)}
        if matrix.settings.threads is not None:
            env["torch_threads"] = matrix.settings.threads  # what the workers use
        write_json(env_path, env)


def run_matrix(matrix: Matrix, out: Path, options: RunOptions, *, resume: bool = False,
               only: str | None = None, argv: list[str] | None = None) -> list[dict[str, Any]]:
    """Run (or finish) a matrix into `out`; returns the rows written by this call."""
    prepare_run_dir(out, matrix, resume=resume, argv=argv, device=options.device)
    done = finished_case_ids(out) if resume else set()
    todo = [c for c in select_cases(matrix.cases, only) if c.case_id not in done]
    # A worker serves several cases only where its history cannot change a measurement.
    fresh = options.device.startswith("cuda") or options.memory_limit is not None
    rows: list[dict[str, Any]] = []
    bar = _progress(len(todo), options.progress, skipped=len(done))
    worker: _Worker | None = None
    try:
        for case in todo:
            if bar is not None:
                bar.set_postfix_str(case.case_id, refresh=False)
            if worker is None:
                worker = _Worker(options, matrix)
            result = worker.run(case, matrix.settings.timeout_s)
            row = {**case.columns(), **result}
            row.setdefault("device", options.device)
            append_row(out, row)
            rows.append(row)
            healthy = result.get("status") in OK_STATUSES
            if fresh or not healthy:
                worker.close() if healthy else worker.kill()
                worker = None
            if bar is not None:
                bar.update(1)
    finally:
        if worker is not None:
            worker.close()
        if bar is not None:
            bar.close()
    return rows


def _progress(total: int, enabled: bool, skipped: int = 0):
    if not enabled:
        return None
    from tqdm import tqdm

    desc = f"cases ({skipped} already done)" if skipped else "cases"
    return tqdm(total=total, desc=desc, unit="case", file=sys.stderr, dynamic_ncols=True,
                bar_format="{desc}: {n}/{total} |{bar}| {elapsed}<{remaining} {postfix}")


def default_out_dir(root: Path = Path("results")) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = root / "runs" / stamp
    n = 1
    while out.exists():
        n += 1
        out = root / "runs" / f"{stamp}-{n}"
    return out


def default_train_dir(model: str, root: Path = Path("results/train")) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out, n = root / f"{model}-{stamp}", 1
    while out.exists():
        n += 1
        out = root / f"{model}-{stamp}-{n}"
    return out


def link_latest(out: Path, root: Path = Path("results")) -> None:
    """Point results/latest at this run (a relative symlink); best effort."""
    latest = root / "latest"
    try:
        target = out.resolve()
        if target.is_relative_to(root.resolve()):
            target = target.relative_to(root.resolve())  # the link lives inside root
        if latest.is_symlink():
            latest.unlink()
        elif latest.exists():
            return  # a real file or directory named latest: leave it alone
        latest.symlink_to(target, target_is_directory=True)
    except OSError:
        pass
