"""The local launcher: N spawned workers on this machine, one case each at a time.

Each worker slot is a bench.runner worker; with `--gpus 0,1,3` (or `--workers N` on CUDA: GPUs
0..N-1) slot i starts its workers with CUDA_VISIBLE_DEVICES set to its GPU, so a case has one
GPU to itself and its allocator peaks and NVML readings are its own. On the CPU the workers share
the cores (one torch thread each, bench.launchers.with_threads): memory columns stay exact, step
times are taken beside other cases (env.json's launcher says `concurrent`; the report marks them).

The driver (main thread: workers must be started from it, see bench.worker.die_with_parent)
waits on every busy worker's pipe at once; each row is written to its row file and merged into
results.csv as it lands. One worker (the default) is the runner as it always was.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence
from multiprocessing.connection import wait
from typing import Any

from bench import rundir
from bench.launchers import LauncherConfig
from bench.results import OK_STATUSES
from bench.runner import RunOptions, _row, _Worker, counts_text, fresh_workers, progress_bar
from bench.spec import Case, Matrix


class _Slot:
    """Where one case at a time runs: a log, the variables its workers start with, and its
    current worker (None until needed, and after a failure or a fresh-worker case)."""

    def __init__(self, index: int, gpu: int | None, run_dir) -> None:
        name = rundir.WORKER_LOG if index == 0 else f"worker-{index}.log"
        self.log = run_dir / name  # a log per slot: a death row quotes only its own worker
        self.environ = {"CUDA_VISIBLE_DEVICES": str(gpu)} if gpu is not None else None
        self.worker: _Worker | None = None

    def spawn(self, options: RunOptions, matrix: Matrix) -> _Worker:
        if self.worker is None:
            device = "cuda" if self.environ and options.device.startswith("cuda") else None
            self.worker = _Worker(options, matrix, self.log, self.environ, device)
        return self.worker


class LocalLauncher:
    def __init__(self, config: LauncherConfig) -> None:
        self.config = config
        self.slots: list[_Slot] = []

    def gpus(self, options: RunOptions) -> list[int | None]:
        if not options.device.startswith("cuda") or (self.config.parallel == 1 and not self.config.gpus):
            return [None] * self.config.parallel  # one worker keeps the run's device as given
        return list(self.config.gpus or range(self.config.parallel))

    def start(self, todo: Sequence[Case], matrix: Matrix, options: RunOptions,
              results: rundir.Results) -> None:
        self.slots = [_Slot(i, gpu, results.run_dir) for i, gpu in enumerate(self.gpus(options))]
        for slot in self.slots[:len(todo)]:
            slot.spawn(options, matrix)

    def run(self, todo: Sequence[Case], matrix: Matrix, options: RunOptions,
            results: rundir.Results, done: int) -> list[dict[str, Any]]:
        if not self.slots:
            self.start(todo, matrix, options, results)
        fresh = fresh_workers(options)
        queue, busy = deque(todo), []  # busy: slots measuring a case
        rows: list[dict[str, Any]] = []
        bar = progress_bar(len(todo), options.progress, skipped=done)
        try:
            while queue or busy:
                for slot in self.slots:
                    if queue and slot not in busy:
                        slot.spawn(options, matrix).send(queue.popleft(), matrix.settings.timeout_s)
                        busy.append(slot)
                if bar is not None:
                    bar.set_postfix_str(counts_text(len(busy), len(queue), len(rows)), refresh=True)
                soonest = min(slot.worker.deadline for slot in busy)
                ready = wait([slot.worker.conn for slot in busy], max(0.0, soonest - time.monotonic()))
                now = time.monotonic()
                for slot in list(busy):
                    worker = slot.worker
                    if worker.conn in ready:
                        result = worker.collect()
                    elif now >= worker.deadline:
                        result = worker.expire()
                    else:
                        continue
                    busy.remove(slot)
                    rows.append(results.add(_row(worker.case, result, options.device)))
                    healthy = result.get("status") in OK_STATUSES
                    if fresh or not healthy:
                        worker.close() if healthy else worker.kill()
                        slot.worker = None
                    if bar is not None:
                        bar.set_postfix_str(counts_text(len(busy), len(queue), len(rows)), refresh=False)
                        bar.update(1)
        except BaseException:  # stopped: the running cases are dropped, now
            for slot in busy:
                slot.worker.kill()
                slot.worker = None
            raise
        finally:
            for slot in self.slots:  # idle workers (the run ended, or was stopped) end now
                if slot.worker is not None:
                    slot.worker.close()
                    slot.worker = None
            if bar is not None:
                bar.close()
        return rows

    def stop(self) -> None:
        """Workers that `run` did not end (it never ran: env.json could not be written) are killed."""
        for slot in self.slots:
            if slot.worker is not None:
                slot.worker.kill()
                slot.worker = None
