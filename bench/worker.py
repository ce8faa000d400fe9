"""The worker process: receives cases over a pipe, measures each, sends back its row.

Every failure becomes a row: out-of-memory is `oom` (with its evidence: the allocator said so,
or the case used up the `--memory-limit`), a solver that diverged is `diverged` (its measurements
kept), anything else is `error` with the exception's first line. The worker dies with the
runner that started it (Linux: PR_SET_PDEATHSIG; elsewhere a watchdog on the parent pid), leaves
Ctrl-C to the runner, and writes its stdout and stderr to the run folder's worker.log.

Under a memory limit the runner starts workers with PYTHONMALLOC=malloc: with pymalloc, once the
limit leaves no room for a new 1 MiB arena, every small-object allocation first tries (and
fails) to map one, then falls back to malloc, so a case that fills the limit with Python objects
(the fake-tensor pass does) crawls on at a failed mmap per allocation until its time limit,
instead of failing. glibc's malloc fails at once, and the case becomes an `oom` row.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import resource
import signal
import sys
import threading
import time
import traceback
from multiprocessing.connection import Connection
from typing import Any

# CUDA libraries that fail to allocate their own workspace say so with their status names.
OOM_MARKERS = ("out of memory", "can't allocate memory", "cannot allocate memory", "std::bad_alloc",
               "cublas_status_alloc_failed", "cudnn_status_alloc_failed",
               "cusolver_status_alloc_failed", "cufft_alloc_failed")
# An allocation that fails without saying so (oneDNN's "could not create a primitive" when its
# 256 KiB JIT buffer cannot be mapped; a C extension returning NULL with no exception set) still
# leaves the address space used up: less than this left under the limit when the case failed is
# the evidence that it ran out of memory.
LIMIT_EVIDENCE_BYTES = 8 << 20
# Address space mapped before the limit is set and unmapped when a case fails: room to unwind,
# describe the failure and send the row (at the limit even formatting a traceback fails).
RESERVE_BYTES = 8 << 20
PR_SET_PDEATHSIG = 1


def serve(conn: Connection, device: str, memory_limit: int | None, settings: dict[str, Any],
          instruments: tuple[str, ...], log_path: str | None = None,
          parent_pid: int | None = None) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the runner's: it kills its workers
    if parent_pid is not None:
        die_with_parent(parent_pid)
    if log_path is not None:
        _log_to(log_path)
    import torch

    from bench.spec import Case, RunSettings

    run_settings = RunSettings(**settings)
    if run_settings.threads is not None:
        torch.set_num_threads(run_settings.threads)
    _import_everything(device, instruments)
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        if message is None:
            return
        case = Case.from_message(message)
        print(f"--- {case.case_id} (worker pid {os.getpid()}, {time.strftime('%H:%M:%S')})",
              file=sys.stderr, flush=True)
        with AddressSpaceLimit(memory_limit) as limit:
            row = execute(case, device, run_settings, instruments, limit)
        try:
            conn.send(row)
        except OSError:  # the runner is gone: nobody wants the row
            return


def die_with_parent(parent_pid: int) -> None:
    """Be killed when the runner dies, even in the middle of a case. PR_SET_PDEATHSIG fires when
    the *thread* that started this process ends: start workers from the runner's main thread."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            if libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) == 0:
                if os.getppid() != parent_pid:  # it died before the prctl
                    os.kill(os.getpid(), signal.SIGKILL)
                return
        except (OSError, AttributeError):
            pass
    threading.Thread(target=_watch_parent, args=(parent_pid,), name="parent-watchdog", daemon=True).start()


def _watch_parent(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(0.5)
    os.kill(os.getpid(), signal.SIGKILL)


def _log_to(path: str) -> None:
    """stdout and stderr (Python's and C++'s: torch writes there directly) into the log."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


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


class AddressSpaceLimit:
    """While a case runs, allow `extra_bytes` of address space beyond what is mapped now (RLIMIT_AS,
    soft limit; lifted again afterwards, the hard limit never moves). None: no limit."""

    def __init__(self, extra_bytes: int | None) -> None:
        self.extra_bytes = extra_bytes
        self.limit: int | None = None
        self._reserve: mmap.mmap | None = None
        self._buffer = bytearray()
        self._saved: tuple[int, int] | None = None

    def __enter__(self) -> AddressSpaceLimit | None:
        if self.extra_bytes is None:
            return None
        self._reserve = mmap.mmap(-1, RESERVE_BYTES)  # address space only: never touched
        self._buffer = bytearray(1 << 14)  # to read VmSize at the limit without allocating
        self._saved = resource.getrlimit(resource.RLIMIT_AS)
        hard = self._saved[1]
        self.limit = _vm_size(self._buffer) + self.extra_bytes
        if hard != resource.RLIM_INFINITY:
            self.limit = min(self.limit, hard)
        resource.setrlimit(resource.RLIMIT_AS, (self.limit, hard))
        return self

    def failed(self) -> int:
        """Call when the case has failed, before anything is freed: gives the reserve back and
        returns the address space that was left under the limit at the failure (bytes)."""
        assert self.limit is not None
        try:
            used = _vm_size(self._buffer)
        except MemoryError:
            used = None
        if self._reserve is not None:
            self._reserve.close()
            self._reserve = None
            if used is None:
                used = _vm_size(self._buffer) + RESERVE_BYTES
        return self.limit - (used if used is not None else _vm_size(self._buffer))

    def __exit__(self, *exc: object) -> None:
        if self._reserve is not None:
            self._reserve.close()
            self._reserve = None
        if self._saved is not None:
            resource.setrlimit(resource.RLIMIT_AS, self._saved)


def _vm_size(buffer: bytearray) -> int:
    """This process's mapped address space (VmSize), read into `buffer` (no new allocation but
    a few small objects, so that it works at the limit)."""
    fd = os.open("/proc/self/status", os.O_RDONLY)
    try:
        n = os.readv(fd, [buffer])
    finally:
        os.close(fd)
    start = buffer.find(b"VmSize:", 0, n) + 7
    return int(buffer[start:buffer.find(b"kB", start, n)]) * 1024


def is_oom(err: BaseException) -> bool:
    """The failure says it is out of memory (this exception or one it was raised from)."""
    import torch

    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, (MemoryError, torch.cuda.OutOfMemoryError)):
            return True
        if isinstance(err, RuntimeError) and any(m in str(err).lower() for m in OOM_MARKERS):
            return True
        err = err.__cause__ or err.__context__  # type: ignore[assignment]
    return False


def execute(case: Any, device: str, settings: Any, instruments: tuple[str, ...],
            limit: AddressSpaceLimit | None = None) -> dict[str, Any]:
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
        headroom = limit.failed() if limit is not None else None  # before anything is freed
        try:
            row = failure_row(err, headroom)
        except MemoryError:
            row = {"status": "oom", "error": f"{type(err).__name__} (no memory left to describe it)"}
        with contextlib.suppress(Exception):
            traceback.clear_frames(err.__traceback__)
        del err
        _release_memory(device)
    row["elapsed_s"] = time.monotonic() - t0
    return row


def failure_row(err: BaseException, headroom: int | None = None) -> dict[str, Any]:
    """The row of a failed case: `oom` when the failure says so, or when less than
    LIMIT_EVIDENCE_BYTES of address space was left under the memory limit (`headroom`)."""
    status, evidence = ("oom", "") if is_oom(err) else ("error", "")
    if status == "error" and headroom is not None and headroom < LIMIT_EVIDENCE_BYTES:
        status = "oom"
        evidence = f" (the memory limit was reached: {max(headroom, 0)} bytes of address space left)"
    text = str(err).strip()
    first = text.splitlines()[0] if text else ""
    where = traceback.extract_tb(err.__traceback__)[-1] if err.__traceback__ else None
    origin = f" [{os.path.basename(where.filename)}:{where.lineno}]" if where else ""
    return {"status": status, "error": f"{type(err).__name__}: {first}{origin}{evidence}"}


def _release_memory(device: str) -> None:
    import gc

    gc.collect()
    if device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()

