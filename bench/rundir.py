"""A run directory that survives any kill and several writers.

    run_dir/
      env.json        the environment; its `run` record is what `--resume` must match
      run.lock        held (fcntl.flock) by the one driver of the folder; says who that is
      rows/<h>.json   one file per case (h: a hash of its case id), written atomically
                      (write, fsync, rename): the truth about what has finished
      results.csv     the rows merged in matrix order, for readers (bench.results.read_results)
      worker.log      what workers wrote on stdout and stderr

Only the lock holder writes results.csv and env.json. Row files need no lock: each case has its
own, and a rename replaces a case's row whole, so writers on other processes or hosts (launchers
of issue 14) never tear or duplicate one. A killed driver loses at most the case it was running;
`Results.recover` rebuilds results.csv from the row files, whatever state the kill left it in.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import os
import platform
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from bench.errors import RunDirError
from bench.results import COLUMNS, ENV, KINDS, RESULTS, csv_text, read_env, read_records

try:
    import fcntl
except ImportError:  # not POSIX: no locking (one run per folder is then the user's business)
    fcntl = None  # type: ignore[assignment]

LOCK, ROWS, WORKER_LOG = "run.lock", "rows", "worker.log"


# -- the lock -------------------------------------------------------------------------------------
class RunLock:
    """An exclusive flock on run_dir/run.lock for the whole run, with its holder written inside
    (pid, host, command, since). The kernel drops a flock when its holder dies, however it
    dies, so a lock left by a killed run never blocks; the file it leaves is just stale text."""

    def __init__(self, path: Path, fd: int | None) -> None:
        self.path, self.fd = path, fd

    @classmethod
    def acquire(cls, run_dir: Path, command: str | None = None) -> RunLock:
        path = Path(run_dir) / LOCK
        if fcntl is None:
            return cls(path, None)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as err:
            raise RunDirError(f"cannot open the lock file {path}: {err.strerror}; choose another --out") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            holder = _holder_text(fd) if isinstance(err, BlockingIOError) else None
            os.close(fd)
            if holder is None and not isinstance(err, BlockingIOError):
                raise RunDirError(f"cannot lock {path} ({err.strerror}): this filesystem has no "
                                  "file locks; choose an --out on a local disk") from None
            raise RunDirError(f"{run_dir} is in use by {holder}; wait for that run to end or stop "
                              "it, or choose another --out") from None
        holder = {"pid": os.getpid(), "host": platform.node(), "command": command or "",
                  "since": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        os.fsync(fd)
        return cls(path, fd)

    def release(self) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            os.ftruncate(self.fd, 0)  # no stale holder text once the run has ended cleanly
        os.close(self.fd)  # closing the last descriptor releases the flock
        self.fd = None

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _holder_text(fd: int) -> str:
    try:
        holder = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        holder = {}
    if not isinstance(holder, dict) or "pid" not in holder:
        return "another process (it has not written its name yet)"
    text = f"pid {holder['pid']} on {holder.get('host') or '?'} since {holder.get('since') or '?'}"
    if holder.get("command"):
        text += f" ({holder['command']})"
    if holder.get("host") == platform.node() and not _alive(holder["pid"]):
        text += ", a process that has ended: a process it started still holds the lock"
    return text


def _alive(pid: Any) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (OSError, ValueError, TypeError):
        return True  # EPERM: it exists; unreadable pid: assume the worst
    return True


# -- what a folder runs ---------------------------------------------------------------------------
def fingerprint(case_ids: Sequence[str], settings: Mapping[str, Any],
                options: Mapping[str, Any], only: str | None = None) -> dict[str, Any]:
    """The `run` record of env.json: which cases (their ids, in order, hashed), the matrix's
    settings and the run options. `--resume` must select the same."""
    return json.loads(json.dumps({
        "cases": len(case_ids),
        "case_ids_sha256": hashlib.sha256("\n".join(case_ids).encode()).hexdigest(),
        "only": only, "settings": dict(settings), "options": dict(options),
    }))


def check_resume(run_dir: Path, current: Mapping[str, Any]) -> None:
    """RunDirError unless run_dir was started with the cases, settings and options of
    `current` (a folder from before this record is not checked)."""
    try:
        env = read_env(run_dir)
    except (OSError, ValueError) as err:
        raise RunDirError(f"cannot resume {run_dir}: its {ENV} is unreadable ({err}), so what it "
                          "ran is unknown; start a new folder with another --out") from None
    if not isinstance(env, Mapping):
        raise RunDirError(f"cannot resume {run_dir}: its {ENV} is not a JSON object, so what it "
                          "ran is unknown; start a new folder with another --out")
    started = env.get("run")
    if not isinstance(started, Mapping):
        return
    diffs = []
    if started.get("case_ids_sha256") != current["case_ids_sha256"]:
        diffs.append(f"the cases ({started.get('cases')} there with --only {started.get('only')!r}, "
                     f"{current['cases']} now with --only {current['only']!r})")
    for group, label in (("settings", "[settings] {}"), ("options", "--{}")):
        old, new = started.get(group) or {}, current[group]
        for key in sorted(set(old) | set(new)):
            if old.get(key) != new.get(key):
                name = label.format(key.replace("_", "-") if group == "options" else key)
                diffs.append(f"{name} ({old.get(key)!r} there, {new.get(key)!r} now)")
    if diffs:
        raise RunDirError(f"cannot resume {run_dir}: this command differs from the one that "
                          f"started it in {'; '.join(diffs)}; resume with the command it was started with "
                          f"(`{env.get('command', '?')}` plus --resume), or start a new folder "
                          "with another --out")


def check_fresh(run_dir: Path) -> None:
    """RunDirError if run_dir already holds rows (a run that another process started here)."""
    if (Path(run_dir) / RESULTS).exists() or any(_row_files(run_dir)):
        raise RunDirError(f"{run_dir} already holds a run; use --resume to finish it or choose "
                          "another --out")


def holds_run(run_dir: Path) -> bool:
    """Whether a run was started in run_dir (env.json, rows or results.csv exist)."""
    run_dir = Path(run_dir)
    return (run_dir / ENV).is_file() or (run_dir / RESULTS).is_file() or any(_row_files(run_dir))


# -- row files ------------------------------------------------------------------------------------
def row_file(run_dir: Path, case_id: str) -> Path:
    return Path(run_dir) / ROWS / f"{hashlib.sha256(case_id.encode()).hexdigest()[:24]}.json"


def write_row(run_dir: Path, row: Mapping[str, Any]) -> dict[str, Any]:
    """Write one case's row file atomically (replacing the case's earlier row); returns the
    row as it reads back (plain JSON values), which is what results.csv shows."""
    text = json.dumps(dict(row), default=_plain, sort_keys=True)
    path = row_file(run_dir, str(row["case_id"]))
    tmp = path.with_name(f".{path.stem}.{platform.node()}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(exist_ok=True)
        with tmp.open("w") as fh:
            fh.write(text + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        tmp.replace(path)  # a rename lost to a power cut loses no data: the case runs again
    except OSError as err:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise RunDirError(f"cannot write {path}: {err.strerror or err}; the rows written so far "
                          f"are kept: free the disk or fix the folder, then resume with --resume") from None
    return json.loads(text)


def read_rows(run_dir: Path) -> dict[str, dict[str, Any]]:
    """case id -> row of every readable row file (one a case; an unreadable one is skipped)."""
    rows: dict[str, dict[str, Any]] = {}
    for path in _row_files(run_dir):
        try:
            row = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(row, dict) and isinstance(row.get("case_id"), str) and \
                row_file(run_dir, row["case_id"]).name == path.name:
            rows[row["case_id"]] = row
    return rows


def _remove_stale_temporaries(run_dir: Path) -> None:
    """Half-written files of killed writers: results.csv's (only the lock holder writes it, and
    that is the caller now), and row files of dead processes on this host."""
    for tmp in run_dir.glob(f".{RESULTS}.*.tmp"):
        with contextlib.suppress(OSError):
            tmp.unlink()
    rows = run_dir / ROWS
    for tmp in rows.glob(".*.tmp") if rows.is_dir() else []:  # .<hash>.<host>.<pid>.tmp
        host, _, pid = tmp.name[1:-len(".tmp")].partition(".")[2].rpartition(".")
        if host == platform.node() and not _alive(pid):
            with contextlib.suppress(OSError):
                tmp.unlink()


def _row_files(run_dir: Path) -> Iterable[Path]:
    folder = Path(run_dir) / ROWS
    return sorted(folder.glob("*.json")) if folder.is_dir() else []


def _plain(value: Any) -> Any:
    """JSON for what a worker may send besides plain values (numpy scalars, tuples, paths)."""
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    return str(value)


# -- results.csv ----------------------------------------------------------------------------------
class Results:
    """The rows of a run, merged into results.csv in matrix order as they land. A row that comes
    after every row in the file is appended (one write); any other (a retried case, a row from
    a parallel writer) rewrites the file (write, rename). results.csv is not fsynced: the row
    files are, and a results.csv that a crash left behind is rebuilt from them on resume."""

    def __init__(self, run_dir: Path, order: Sequence[str]) -> None:
        self.run_dir = Path(run_dir)
        self.index = {case_id: i for i, case_id in enumerate(order)}
        self.rows: dict[str, dict[str, Any]] = {}
        self._tail: int | None = None  # matrix index of results.csv's last row, if appendable

    @classmethod
    def recover(cls, run_dir: Path, order: Sequence[str]) -> Results:
        """Every row the folder holds: the row files, and rows of results.csv that have none (a
        folder from before row files), which get one; then results.csv is rewritten from them,
        whatever a kill left in it (a torn line anywhere, duplicates, another order)."""
        results = cls(run_dir, order)
        rows = Path(run_dir) / ROWS
        if rows.exists() and not rows.is_dir():
            raise RunDirError(f"{rows} is not a directory (a run keeps its row files there); "
                              "move it away or choose another --out")
        _remove_stale_temporaries(Path(run_dir))
        results.rows = read_rows(run_dir)
        for row in _csv_rows(Path(run_dir) / RESULTS):
            if row["case_id"] not in results.rows:
                results.rows[row["case_id"]] = write_row(run_dir, row)
        if results.rows:
            results.rewrite()
        return results

    def add(self, row: Mapping[str, Any]) -> dict[str, Any]:
        row = write_row(self.run_dir, row)
        case_id = row["case_id"]
        replaced = case_id in self.rows
        self.rows[case_id] = row
        position = self.index.get(case_id)
        if replaced or position is None or self._tail is None or position < self._tail:
            self.rewrite()
        else:
            self._append(row)
            self._tail = position
        return row

    def ordered(self) -> list[dict[str, Any]]:
        """The rows in matrix order; rows of cases outside the matrix last."""
        end = len(self.index)
        return sorted(self.rows.values(), key=lambda r: (self.index.get(r["case_id"], end), r["case_id"]))

    def rewrite(self) -> None:
        rows = self.ordered()
        path = self.run_dir / RESULTS
        tmp = path.with_name(f".{RESULTS}.{os.getpid()}.tmp")
        try:
            with tmp.open("w", newline="") as fh:  # no fsync: the row files are the durable copy
                fh.write(csv_text(COLUMNS, rows, header=True))
            tmp.replace(path)
        except OSError as err:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise RunDirError(f"cannot write {path}: {err.strerror or err}; the rows are kept in "
                              f"{self.run_dir / ROWS}: fix the folder, then resume with --resume") from None
        positions = [self.index.get(r["case_id"]) for r in rows]
        self._tail = None if None in positions else max(positions, default=-1)

    def _append(self, row: Mapping[str, Any]) -> None:
        path = self.run_dir / RESULTS
        try:
            with path.open("a", newline="") as fh:
                fh.write(csv_text(COLUMNS, [row], header=False))
        except OSError as err:
            raise RunDirError(f"cannot write {path}: {err.strerror or err}; the rows are kept in "
                              f"{self.run_dir / ROWS}: fix the folder, then resume with --resume") from None


def _csv_rows(path: Path) -> list[dict[str, Any]]:
    """Whole rows of a results.csv, typed by the schema (a torn line anywhere is skipped)."""
    if not path.is_file():
        return []
    header, records = read_records(path)
    rows = []
    for record in records:
        row = {name: _typed(name, text) for name, text in zip(header, record, strict=True) if name in KINDS}
        if row.get("case_id"):
            rows.append(row)
    return rows


def _typed(name: str, text: str) -> Any:
    """A cell's value such that it is written back as the same text: numbers as the int or
    float the text spells (an NFE of 8 stays "8" in a float column), the rest as text."""
    if text == "":
        return None
    if KINDS[name] in ("int", "float"):
        for kind in (int, float):
            with contextlib.suppress(ValueError):
                return kind(text)
    return text
