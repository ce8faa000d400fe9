"""Run a matrix: each case in a spawned worker process, each outcome a row, nothing lost.

The runner never measures anything itself. It hands cases to a worker (bench.worker) one at a
time and waits at most `timeout_s` for the row. A worker serves several cases only on the CPU
without a memory limit, where its history cannot change a measurement (tracked and predicted
bytes count live storages from zero, timing follows warm-up); on CUDA, or with a memory limit, every
case gets a fresh process so allocator caches, the CUDA context and address space start clean.
After any failure the worker is replaced.

The run folder (bench.rundir) is locked for the whole run; each row is written to its own file
(atomically) and merged into results.csv as it lands, so a run killed at any point keeps every
finished case, and `--resume` (same matrix, same options: checked) finishes it. Ctrl-C or SIGTERM
stops the run at once (the running case is dropped, its worker killed) and raises KeyboardInterrupt
(`Interrupted`, with the signal) to the caller.
"""

from __future__ import annotations

import contextlib
import fnmatch
import functools
import multiprocessing as mp
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench import rundir
from bench.results import COLUMNS, ENV, FAILED_STATUSES, read_env, write_json
from bench.spec import Case, Matrix

# Signals that end a worker from outside (someone, or something, killed it): its case's outcome
# is unknown, and `--resume` runs it again. Any other signal is the case crashing its worker.
KILL_SIGNALS = (signal.SIGKILL, signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)
OOM_TEXT = ("out of memory", "bad_alloc", "cannot allocate memory", "can't allocate memory", "memoryerror")


@dataclass(frozen=True)
class RunOptions:
    device: str = "cpu"
    memory_limit: int | None = None  # bytes of extra address space per case (CPU)
    instruments: tuple[str, ...] = ()  # empty: the matrix's [settings] instruments, else all the device allows
    progress: bool = True
    launcher: Any = None  # a bench.launchers.LauncherConfig; None: one local worker

    @property
    def launcher_config(self):
        from bench.launchers import LauncherConfig

        return self.launcher or LauncherConfig()


class Interrupted(KeyboardInterrupt):
    """The run was stopped by a signal (SIGINT: Ctrl-C, or SIGTERM); the rows so far are kept."""

    def __init__(self, signum: int = signal.SIGINT) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


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
    """One spawned worker process and its pipe; its stdout and stderr go to `log`. `environ`:
    variables the worker starts with (CUDA_VISIBLE_DEVICES pins it to one GPU); `device`: what it
    measures on (default the run's)."""

    def __init__(self, options: RunOptions, matrix: Matrix, log: Path,
                 environ: dict[str, str] | None = None, device: str | None = None) -> None:
        from bench.worker import serve

        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.log = log
        self.case: Case | None = None  # the case it is measuring
        self.process = ctx.Process(
            target=serve,
            args=(child, device or options.device, options.memory_limit, asdict(matrix.settings),
                  options.instruments or matrix.settings.instruments, str(log), os.getpid()),
            daemon=True,
        )
        with spawn_environment(options.memory_limit, environ):
            self.process.start()
        child.close()

    def run(self, case: Case, timeout_s: float) -> dict[str, Any]:
        self.send(case, timeout_s)
        try:
            answered = self.conn.poll(timeout_s)  # True on a row, and on EOF (a dead worker)
        except OSError:  # the pipe broke: the worker is gone
            answered = True
        return self.collect() if answered else self.expire()

    def send(self, case: Case, timeout_s: float) -> None:
        """Hand the worker a case; its row comes with `collect` once `conn` is readable (a row,
        or EOF: the worker died), else `expire` after `deadline`."""
        self.case, self.timeout_s = case, timeout_s
        self.t0 = time.monotonic()
        self.deadline = self.t0 + timeout_s
        self.log_start = _size(self.log)
        self.oom_kills = oom_kill_counters()
        with contextlib.suppress(OSError):  # a broken pipe: collect() reads the EOF
            self.conn.send(case.to_message())

    def collect(self) -> dict[str, Any]:
        with contextlib.suppress(EOFError, OSError):
            return self.conn.recv()
        self.process.join(10)
        return death_row(self.process.exitcode, time.monotonic() - self.t0, self.oom_kills,
                         oom_kill_counters(), _read_from(self.log, self.log_start))

    def expire(self) -> dict[str, Any]:
        self.kill()
        return {"status": "timeout", "elapsed_s": time.monotonic() - self.t0,
                "error": f"no result within the {self.timeout_s:g} s case time limit"}

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join(10)
        self.conn.close()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.conn.send(None)
        self.process.join(10)
        if self.process.is_alive():
            self.kill()


@contextlib.contextmanager
def spawn_environment(memory_limit: int | None, environ: dict[str, str] | None = None) -> Iterator[None]:
    """What a worker inherits at its start: SIGINT ignored (a terminal's Ctrl-C reaches the whole
    process group; the runner handles it and kills the worker), `environ`, and under a memory
    limit PYTHONMALLOC=malloc (see bench.worker). A Ctrl-C meanwhile waits (blocked) for the runner."""
    main = threading.current_thread() is threading.main_thread()
    blocked = main and hasattr(signal, "pthread_sigmask")
    if blocked:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    handler = signal.signal(signal.SIGINT, signal.SIG_IGN) if main else None
    environ = {**(environ or {}), **({"PYTHONMALLOC": "malloc"} if memory_limit is not None else {})}
    saved = {key: os.environ.get(key) for key in environ}
    os.environ.update(environ)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        if main:
            signal.signal(signal.SIGINT, handler)
        if blocked:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def death_row(exitcode: int | None, elapsed: float, oom_before: dict[str, int],
              oom_after: dict[str, int], log: str = "") -> dict[str, Any]:
    """The row of a worker that died before reporting. `oom` only with evidence: the kernel's
    oom_kill counters went up meanwhile, or the worker's last words say memory ran out."""
    words = [line.strip() for line in log.splitlines() if line.strip() and not line.startswith("--- ")]
    last = words[-1] if words else ""  # the worker's last words (not the header of its case)
    said = f"; worker.log: {last[:200]}" if last else ""
    out_of_memory = any(m in log.lower() for m in OOM_TEXT)
    row: dict[str, Any] = {"elapsed_s": elapsed}
    if exitcode is not None and exitcode < 0:
        sig = signal.Signals(-exitcode) if -exitcode in signal.valid_signals() else None
        name = sig.name if sig else f"signal {-exitcode}"
        grown = [k for k, v in oom_after.items() if v > oom_before.get(k, v)]
        if grown:
            return {**row, "status": "oom", "error": f"worker killed by {name}: the kernel's OOM "
                    f"killer ({', '.join(grown)} oom_kill went up){said}"}
        if out_of_memory:
            return {**row, "status": "oom", "error": f"worker died from {name} out of memory{said}"}
        if sig in KILL_SIGNALS:
            return {**row, "status": "killed", "error": f"worker killed by {name}; no sign of "
                    f"running out of memory (oom_kill counters unchanged){said}"}
        return {**row, "status": "error", "error": f"worker crashed ({name}){said}"}
    status = "oom" if out_of_memory else "error"
    return {**row, "status": status, "error": f"worker exited with code {exitcode} before reporting{said}"}


def oom_kill_counters() -> dict[str, int]:
    """The kernel's counts of OOM kills that this machine exposes: /proc/vmstat (whole machine)
    and this process's memory cgroup (v2 memory.events, v1 memory.oom_control)."""
    counts = {}
    for path in ("/proc/vmstat", *_cgroup_oom_files()):
        with contextlib.suppress(OSError, ValueError), open(path) as fh:
            for line in fh:
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    counts[path] = int(value)
    return counts


@functools.cache
def _cgroup_oom_files() -> tuple[str, ...]:
    files = []
    with contextlib.suppress(OSError), open("/proc/self/cgroup") as fh:
        for line in fh:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            if controllers == "":
                where, name = Path("/sys/fs/cgroup"), "memory.events"
            elif "memory" in controllers.split(","):
                where, name = Path("/sys/fs/cgroup/memory"), "memory.oom_control"
            else:
                continue
            for folder in (where / path.lstrip("/"), where):  # inside a container: its root
                if (folder / name).is_file():
                    files.append(str(folder / name))
                    break
    return tuple(files)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _read_from(path: Path, offset: int, most: int = 1 << 16) -> str:
    try:
        with path.open("rb") as fh:
            fh.seek(max(offset, _size(path) - most))
            return fh.read().decode(errors="replace")
    except OSError:
        return ""


def run_record(cases: Sequence[Case], matrix: Matrix, options: RunOptions, only: str | None) -> dict[str, Any]:
    """What `--resume` must find unchanged: env.json's `run` (bench.rundir.fingerprint)."""
    run_options = {"device": options.device, "memory_limit": options.memory_limit,
                   "instruments": list(options.instruments or matrix.settings.instruments),
                   **options.launcher_config.record()}
    return rundir.fingerprint([c.case_id for c in cases], asdict(matrix.settings), run_options, only)


def write_env(out: Path, matrix: Matrix, run: dict[str, Any], *, resume: bool,
              argv: list[str] | None, device: str, launcher: dict[str, Any] | None = None) -> None:
    """env.json: written when a run starts; a resume adds itself to `resumes`."""
    from bench import env as envmod

    command = " ".join(argv if argv is not None else sys.argv)
    env = read_env(out) if resume else {}
    if isinstance(env, dict) and env:
        env.setdefault("resumes", []).append({"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": command})
    else:
        env = envmod.capture(device, argv)
        env["matrix"] = {"name": matrix.name, "source": matrix.source, "cases": len(matrix.cases),
                         "settings": asdict(matrix.settings)}
        env["run"] = run
        if matrix.settings.threads is not None:
            env["torch_threads"] = matrix.settings.threads  # what the workers use
        if launcher:
            env["launcher"] = launcher  # bench.launchers.LauncherConfig.describe()
    write_json(out / ENV, env)


def run_matrix(matrix: Matrix, out: Path, options: RunOptions, *, resume: bool = False,
               retry_failed: bool = False, only: str | None = None, argv: list[str] | None = None,
               on_start: Callable[[], None] | None = None) -> list[dict[str, Any]]:
    """Run (or finish) a matrix into `out`; returns the rows written by this call. A resume runs
    the cases without a row and those whose worker was killed; `retry_failed` also those that
    failed (oom, error, timeout). RunDirError (before anything is written) if `out` is in use,
    or was started with other cases or options; `on_start` is called once those checks pass."""
    from bench.launchers import make_launcher, with_threads

    config = options.launcher_config
    matrix = with_threads(matrix, config, options.device)
    cases = select_cases(matrix.cases, only)
    run = run_record(cases, matrix, options, only)
    if resume:
        rundir.check_resume(out, run)
    out.mkdir(parents=True, exist_ok=True)
    command = " ".join(argv if argv is not None else sys.argv)
    with rundir.RunLock.acquire(out, command), _signals_interrupt():
        if resume:
            rundir.check_resume(out, run)  # again, now that nobody else can change it
        else:
            rundir.check_fresh(out)
        results = rundir.Results.recover(out, [c.case_id for c in cases])
        if on_start is not None:
            on_start()
        again = set(FAILED_STATUSES) if retry_failed else {"killed"}
        todo = [c for c in cases
                if c.case_id not in results.rows or results.rows[c.case_id].get("status") in again]
        launcher = make_launcher(config)
        try:
            if todo:
                launcher.start(todo, matrix, options, results)  # workers start meanwhile
            write_env(out, matrix, run, resume=resume, argv=argv, device=options.device,
                      launcher=config.describe() if config.record() else None)
            return launcher.run(todo, matrix, options, results, done=len(cases) - len(todo))
        finally:
            launcher.stop()


def fresh_workers(options: RunOptions) -> bool:
    """Whether every case needs a fresh worker: on CUDA (allocator caches, the context) and under
    a memory limit (address space). On the CPU a worker's history cannot change a measurement
    (tracked and predicted bytes count live storages from zero, timing follows warm-up)."""
    return options.device.startswith("cuda") or options.memory_limit is not None


def _row(case: Case, result: dict[str, Any], device: str) -> dict[str, Any]:
    """The case's columns and the worker's result; a column the schema lacks is named in `error`
    rather than lost silently or failing the run."""
    row = {**case.columns(), **{k: v for k, v in result.items() if k in COLUMNS}}
    unknown = sorted(set(result) - set(COLUMNS))
    if unknown:
        row["error"] = "; ".join(filter(None, [row.get("error"), f"unknown result column(s) {unknown} dropped"]))
    row.setdefault("device", device)
    if row.get("status") is None:
        row["status"] = "error"
    return row


@contextlib.contextmanager
def _signals_interrupt() -> Iterator[None]:
    """SIGINT and SIGTERM raise `Interrupted` in the main thread while the run goes on."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: Any) -> None:
        raise Interrupted(signum)

    saved = {s: signal.signal(s, interrupt) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)


def interrupted_line(out: Path, args: Sequence[str], out_given: bool) -> str:
    """What an interrupted `deqbench run` says: the rows kept, and the command that finishes it."""
    again = [a for a in args if a != "--retry-failed"]
    again += ["--resume"] * ("--resume" not in again) + ["--out", str(out)] * (not out_given)
    return (f"interrupted; {len(rundir.read_rows(out))} case row(s) kept in {out}; finish with "
            f"`deqbench {' '.join(again)}`")


def progress_bar(total: int, enabled: bool, skipped: int = 0):
    """The run's one bar (tqdm on stderr), or None; launchers put running / queued counts in its
    postfix (`counts_text`)."""
    if not enabled:
        return None
    from tqdm import tqdm

    desc = f"cases ({skipped} already done)" if skipped else "cases"
    return tqdm(total=total, desc=desc, unit="case", file=sys.stderr, dynamic_ncols=True,
                bar_format="{desc}: {n}/{total} |{bar}| {elapsed}<{remaining} {postfix}")


def counts_text(running: int, queued: int, done: int) -> str:
    return f"running {running}, queued {queued}, done {done}"


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
