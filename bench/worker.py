"""The worker process: receives cases over a pipe, measures each, sends back its row.

Every failure becomes a row: out-of-memory (CPU allocator, CUDA, an address-space limit) is
`oom`, a solver that diverged is `diverged` (its measurements kept), anything else is `error`
with the exception's first line.
"""

from __future__ import annotations

import contextlib
import os
import resource
import time
import traceback
from collections.abc import Iterator
from multiprocessing.connection import Connection
from typing import Any

OOM_MARKERS = ("out of memory", "can't allocate memory", "cannot allocate memory", "std::bad_alloc")


def serve(conn: Connection, device: str, memory_limit: int | None, settings: dict[str, Any],
          instruments: tuple[str, ...]) -> None:
    import torch

    from bench.spec import Case, RunSettings

    run_settings = RunSettings(**settings)
    if run_settings.threads is not None:
        torch.set_num_threads(run_settings.threads)
    _import_everything(device, instruments)
    while True:
        try:
            message = conn.recv()
        except EOFError:
            return
        if message is None:
            return
        case = Case.from_message(message)
        with _address_space_limit(memory_limit):
            row = execute(case, device, run_settings, instruments)
        conn.send(row)


def _import_everything(device: str, instruments: tuple[str, ...]) -> None:
    """Import what measuring imports lazily (model families, instruments, NVML, fake tensors),
    so that a memory limit applies to the case's own allocations, not to module loading; then
    freeze what exists (torch, sympy, ...: ~300k objects), so that the collections between passes
    walk only what the cases made (0.15-0.3 s each otherwise)."""
    import gc

    import torch._subclasses.fake_tensor
    import torch.utils.flop_counter

    import bench.env  # noqa: F401
    from bench.measure import default_instruments, make_instrument
    from bench.measure.case import measure_case  # noqa: F401
    from models import list_models

    list_models()
    for name in instruments or default_instruments(device):
        make_instrument(name).available(torch.device(device))
    # The first optimizer step imports torch._dynamo (sympy, mpmath, ...): take it now.
    param = torch.zeros(1, requires_grad=True)
    param.sum().backward()
    torch.optim.Adam([param]).step()
    del param
    gc.collect()
    gc.freeze()


@contextlib.contextmanager
def _address_space_limit(extra_bytes: int | None) -> Iterator[None]:
    """While a case runs, allow `extra_bytes` of address space beyond what is mapped now; the
    soft limit is lifted again afterwards (the hard limit never moves)."""
    if extra_bytes is None:
        yield
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    vm_size = 0
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmSize:"):
                vm_size = int(line.split()[1]) * 1024
    resource.setrlimit(resource.RLIMIT_AS, (vm_size + extra_bytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def is_oom(err: BaseException) -> bool:
    import torch

    if isinstance(err, (MemoryError, torch.cuda.OutOfMemoryError)):
        return True
    text = str(err).lower()
    return isinstance(err, RuntimeError) and any(m in text for m in OOM_MARKERS)


def execute(case: Any, device: str, settings: Any, instruments: tuple[str, ...]) -> dict[str, Any]:
    if case.phase == "fit":  # a training run to a budget (bench.train), not a measured step
        from bench.train.fit import fit_case as measure_case
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
