"""How a failed case or a dead worker becomes a row, and a worker's ties to its runner, without
running a case."""

import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from bench.runner import death_row
from bench.worker import LIMIT_EVIDENCE_BYTES, failure_row

ROOT = Path(__file__).resolve().parents[2]
VMSTAT = "/proc/vmstat"


def _raised(err: BaseException) -> BaseException:
    try:
        raise err
    except BaseException as caught:
        return caught


def test_a_failure_is_oom_only_with_evidence():
    primitive = _raised(RuntimeError("could not create a primitive"))
    assert failure_row(primitive)["status"] == "error"  # no memory limit: no evidence
    assert failure_row(primitive, headroom=LIMIT_EVIDENCE_BYTES * 4)["status"] == "error"
    row = failure_row(primitive, headroom=213_568)  # oneDNN could not map its 256 KiB JIT buffer
    assert row["status"] == "oom" and "213568 bytes of address space left" in row["error"]
    assert row["error"].startswith("RuntimeError: could not create a primitive [test_worker.py:")
    assert failure_row(_raised(MemoryError()))["status"] == "oom"
    try:
        try:
            raise MemoryError
        except MemoryError as inner:
            raise SystemError("error return without exception set") from inner
    except SystemError as outer:
        assert failure_row(outer)["status"] == "oom"  # raised from an out-of-memory
    alloc = _raised(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 8 bytes"))
    assert failure_row(alloc)["status"] == "oom"


def test_a_dead_worker_is_oom_only_with_evidence():
    kill = -int(signal.SIGKILL)
    row = death_row(kill, 1.0, {VMSTAT: 14}, {VMSTAT: 14}, "--- case (worker pid 1, 10:00:00)\n")
    assert row["status"] == "killed" and "SIGKILL" in row["error"] and "worker.log" not in row["error"]
    row = death_row(kill, 1.0, {VMSTAT: 14}, {VMSTAT: 15})
    assert row["status"] == "oom" and "/proc/vmstat oom_kill went up" in row["error"]
    abort = "terminate called after throwing an instance of 'std::bad_alloc'\n  what():  std::bad_alloc\n"
    row = death_row(-int(signal.SIGABRT), 1.0, {}, {}, abort)
    assert row["status"] == "oom" and "worker.log: what():  std::bad_alloc" in row["error"]
    assert death_row(-int(signal.SIGSEGV), 1.0, {}, {})["status"] == "error"  # a crash, not a kill
    assert death_row(-int(signal.SIGTERM), 1.0, {}, {})["status"] == "killed"
    row = death_row(1, 1.0, {}, {}, "Traceback ...\nModuleNotFoundError: No module named 'plugin'\n")
    assert row["status"] == "error" and row["error"].endswith("No module named 'plugin'")


def test_the_watchdog_kills_a_worker_whose_runner_died():
    """The portable fallback of PR_SET_PDEATHSIG: a thread that watches the parent's pid."""
    code = textwrap.dedent("""
        import os, subprocess, sys, time
        child = subprocess.Popen([sys.executable, "-c", (
            "import os, threading, time\\n"
            "from bench.worker import _watch_parent\\n"
            "threading.Thread(target=_watch_parent, args=(os.getppid(),), daemon=True).start()\\n"
            "time.sleep(120)\\n")])
        print(child.pid, flush=True)
        time.sleep(120)
    """)
    runner = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    worker = int(runner.stdout.readline())
    time.sleep(0.5)  # the watchdog is running
    runner.kill()
    runner.wait()
    deadline = time.monotonic() + 10
    while _alive(worker):
        assert time.monotonic() < deadline, "the worker outlived its runner"
        time.sleep(0.05)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_the_memory_limit_holds_only_while_a_case_runs_and_says_what_was_left():
    code = textwrap.dedent("""
        import resource
        from bench.worker import AddressSpaceLimit
        before = resource.getrlimit(resource.RLIMIT_AS)
        with AddressSpaceLimit(64 << 20) as limit:
            try:
                block = bytearray(256 << 20)
            except MemoryError:
                left = limit.failed()
        assert resource.getrlimit(resource.RLIMIT_AS) == before
        block = bytearray(256 << 20)  # fine again
        print(left)
    """)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert 0 < int(out.stdout) <= 64 << 20  # some of the 64 MB was left: a 256 MB block did not fit
