"""The worker process: receives cases over a pipe, measures each, sends back its row.

Every failure becomes a row: out-of-memory (CPU allocator, CUDA, an address-space limit) is
`oom`, a solver that diverged is `diverged` (its measurements kept), anything else is `error`
with the exception's first line.
"""

from __future__ import annotations

import os
import resource
import time
import traceback
from multiprocessing.connection import Connection
from typing import Any

OOM_MARKERS = ("out of memory", "can't allocate memory", "cannot allocate memory", "std::bad_alloc")


def serve(conn: Connection, device: str, memory_limit: int | None, settings: dict[str, Any],
          instruments: tuple[str, ...]) -> None:
    if memory_limit is not None:
        _limit_address_space(memory_limit)
    from bench.spec import Case, RunSettings

    run_settings = RunSettings(**settings)
    if run_settings.threads is not None:
        import torch

        torch.set_num_threads(run_settings.threads)
    while True:
        try:
            message = conn.recv()
        except EOFError:
            return
        if message is None:
            return
        message["overrides"] = tuple(tuple(kv) for kv in message.get("overrides", ()))
        case = Case(**message)
        conn.send(execute(case, device, run_settings, instruments))


def _limit_address_space(extra_bytes: int) -> None:
    """Allow this process `extra_bytes` of address space beyond what torch's import mapped."""
    # Map torch's libraries first, so the limit is on what the case itself adds.
    import torch.nn.functional  # noqa: F401

    vm_size = 0
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmSize:"):
                vm_size = int(line.split()[1]) * 1024
    limit = vm_size + extra_bytes
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def is_oom(err: BaseException) -> bool:
    if isinstance(err, MemoryError):
        return True
    try:
        import torch

        if isinstance(err, torch.cuda.OutOfMemoryError):
            return True
    except ImportError:
        pass
    text = str(err).lower()
    return isinstance(err, RuntimeError) and any(m in text for m in OOM_MARKERS)


def execute(case: Any, device: str, settings: Any, instruments: tuple[str, ...]) -> dict[str, Any]:
    if case.phase == "fit":  # a training run to a budget (bench.train), not a measured step
        from bench.train import fit_case as measure_case
    else:
        from bench.measure.case import measure_case

    t0 = time.monotonic()
    try:
        row = measure_case(case, device, settings, instruments)
    except BaseException as err:  # every failure must become a row
        if isinstance(err, KeyboardInterrupt):
            raise
        status = "oom" if is_oom(err) else "error"
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        where = traceback.extract_tb(err.__traceback__)[-1] if err.__traceback__ else None
        origin = f" [{os.path.basename(where.filename)}:{where.lineno}]" if where else ""
        row = {"status": status, "error": f"{type(err).__name__}: {first}{origin}"}
        _release_memory(device)
    row["elapsed_s"] = time.monotonic() - t0
    return row


def _release_memory(device: str) -> None:
    import gc

    gc.collect()
    if device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()
