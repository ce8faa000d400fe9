"""A throwaway single-node SLURM cluster on localhost, for tests.

`start_cluster(root)` runs munged, MariaDB, slurmdbd, slurmctld and slurmd as root from a private
directory on free ports (Debian's `slurm-wlm`, `slurmdbd`, `munge`, `mariadb-server`, which
`.ci/run` installs), waits until the node is idle and the cluster is registered in accounting, and
returns a `SlurmCluster`; `SlurmCluster.stop()` ends every process it started, by PID.

Accounting (slurmdbd + MariaDB) is what gives jobs real end states: without it `sacct` answers
"accounting storage is disabled" and submitit reads every state as UNKNOWN.

In tests, through the session fixture `slurm_cluster` (tests/conftest.py), which also points
SLURM_CONF at the cluster for the whole session:

    def test_something(slurm_cluster, tmp_path):
        ex = submitit.AutoExecutor(folder=tmp_path / "%j", cluster="slurm")
        ex.update_parameters(slurm_partition=slurm_cluster.partition, timeout_min=1)
        job = ex.submit(pow, 2, 10)
        assert job.result() == 1024
        assert slurm_cluster.wait_state(job.job_id, {"COMPLETED", "FAILED"}) == "COMPLETED"
        subprocess.run([...], env=slurm_cluster.env)   # a driver process, same cluster

Query accounting by job id (`sacct -j`, as submitit and `SlurmCluster.sacct` do): a job that
starts in its first scheduling pass reaches the database without an eligible time, which follows
seconds later; until then a time-window listing (`sacct -a`, `-S`) leaves the job out.

Memory limits (`--mem`), `SlurmCluster.memory_enforcement`:
- "cgroup", where this process's cgroup-v1 memory controller is writable: jobs run in memory
  cgroups below this process's own (task/cgroup, ConstrainRAMSpace), the kernel OOM-kills a job
  over its limit and SLURM records OUT_OF_MEMORY, as a real cluster does: on the step that ran
  out (`123.0` under submitit's srun), and on the job itself when that is the batch step (submitit
  with slurm_use_srun=False); a job whose srun step ran out ends FAILED (its script's exit code).
- "jobacct" otherwise: jobacct_gather/linux polls RSS every second and OverMemoryKill SIGKILLs a
  step over the limit; SLURM records the step CANCELLED and the job FAILED, never OUT_OF_MEMORY
  (only a cgroup's OOM counter sets that state, slurmstepd's oom_error), and the job's stderr says
  "exceeded memory limit".

Every daemon runs in the foreground as a child of this process with PR_SET_PDEATHSIG, so a test
run killed outright (SIGKILL, or SIGTERM, which skips Python's cleanup) leaves no daemon behind.
Job processes (slurmstepd and its tasks, which slurmd detaches) are found by the cluster's
SLURM_CONF in their environment and killed by PID: by stop(), or else by a watchdog process that
gets the same death signal. Each step of a stop goes to log/stop.log.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

DAEMONS = ("munged", "mariadbd", "slurmdbd", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "srun", "squeue", "sinfo", "sacct", "sacctmgr", "scontrol", "scancel")
PARTITION = "debug"

# slurm.conf lines chosen for a fast, deterministic test cluster; each says why.
SPEED_SETTINGS = {
    # Schedule a submitted batch job at the controller's next 1 s tick, not up to 3 s later
    # (the default batch_sched_delay=3 paces back-to-back submissions); run the full pass over
    # pending jobs every tick too (default every 60 s): a job that only became eligible (a
    # requeued one, after its BeginTime) waits for that pass, as no event triggers one.
    "SchedulerParameters": "batch_sched_delay=0,sched_interval=1,sched_min_interval=0",
    "SchedulerType": "sched/builtin",  # FIFO: no backfill pass to wait for on one node
    # At a time limit or scancel: SIGTERM, then SIGKILL after KillWait s (default 30). submitit
    # ignores SIGTERM, so this is how long a timed-out or cancelled job lingers.
    "KillWait": "2",
    "OverTimeLimit": "0",  # a job is TIMEOUT the first time the controller sees it past its limit
    "MinJobAge": "600",  # finished jobs stay visible to scontrol/squeue for the whole session
    "MessageTimeout": "10",
    "TCPTimeout": "2",
    "SlurmdTimeout": "300",  # never mark the only node DOWN while the machine is busy
    "InactiveLimit": "0",
    "ReturnToService": "2",
    "JobAcctGatherFrequency": "task=1",  # sample job memory every second (OOM checks, sacct)
}


# The watchdog process (see _start_daemons): on SIGTERM, SIGKILL every process with this
# cluster's SLURM_CONF in its environment, again until a pass finds none (processes forked
# meanwhile), then remove the cluster's empty cgroups. argv: SLURM_CONF path, cgroup dir or "".
WATCHDOG = """
import os, signal, sys, time
needle, cgroups = ("SLURM_CONF=" + sys.argv[1]).encode(), sys.argv[2]
def sweep(*_):
    for _ in range(20):
        killed = 0
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                if int(pid) != os.getpid() and needle in open(
                        "/proc/" + pid + "/environ", "rb").read().split(b"\\0"):
                    os.kill(int(pid), signal.SIGKILL)
                    killed += 1
            except OSError:
                pass
        if not killed:
            break
        time.sleep(0.2)
    for top, _, _ in sorted(os.walk(cgroups) if cgroups else [], key=lambda d: -len(d[0])):
        try:
            os.rmdir(top)
        except OSError:
            pass
    sys.exit(0)
signal.signal(signal.SIGTERM, sweep)
while True:
    signal.pause()
"""


class SlurmUnavailable(RuntimeError):
    """The SLURM packages are missing, or the cluster cannot run here (the reason says which)."""


def missing_reason() -> str | None:
    """Why a local cluster cannot run on this machine, or None if it can be tried."""
    missing = [name for name in (*DAEMONS, *CLIENTS) if shutil.which(name) is None]
    if missing:
        return (
            f"SLURM test cluster: {', '.join(missing)} not installed "
            "(apt-get install slurm-wlm slurmdbd munge mariadb-server; .ci/run does this)"
        )
    if os.geteuid() != 0:
        return "SLURM test cluster: the daemons must run as root (slurmd launches jobs as any user)"
    return None


@dataclass
class SlurmCluster:
    root: Path
    name: str
    conf: Path
    env: dict[str, str]  # os.environ plus SLURM_CONF: for the clients and any subprocess
    partition: str = PARTITION
    cpus: int = 8
    memory_mb: int = 16384
    memory_enforcement: str = "jobacct"  # "cgroup" or "jobacct", see the module docstring
    startup_s: float = 0.0
    startup_phases: dict[str, float] = field(default_factory=dict)  # seconds until each was ready
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    _cgroup_dir: Path | None = None

    # --- clients ----------------------------------------------------------------------------
    def run(self, *args: str, check: bool = True, timeout: float = 60) -> str:
        """Run a SLURM client (`cluster.run("squeue", "-h")`) against this cluster; its stdout."""
        out = subprocess.run(
            args, env=self.env, capture_output=True, text=True, timeout=timeout, check=False
        )
        if check and out.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} exited {out.returncode}: {out.stderr.strip()}")
        return out.stdout

    def sacct(self, job_id: str | int) -> dict[str, dict[str, str]]:
        """The latest accounting rows of a job, its steps and array tasks, keyed by JobID
        ("123", "123.batch", "123.0", "123_4")."""
        return {row["JobID"]: row for row in self.sacct_history(job_id, duplicates=False)}

    def sacct_history(self, job_id: str | int, duplicates: bool = True) -> list[dict[str, str]]:
        """Every accounting row of a job in order, earlier runs of a requeued job included
        (their State is REQUEUED)."""
        fields = ("JobID", "State", "ExitCode", "Start", "End", "Elapsed", "MaxRSS", "ReqMem")
        args = ["sacct", "-j", str(job_id), "-P", "-n", "-o", ",".join(fields)]
        text = self.run(*args, *(["--duplicates"] if duplicates else []))
        return [dict(zip(fields, line.split("|"), strict=True)) for line in text.splitlines()]

    def job_state(self, job_id: str | int) -> str:
        """The job's state in accounting, first word only ("CANCELLED by 0" -> "CANCELLED")."""
        row = self.sacct(job_id).get(str(job_id))
        return row["State"].split()[0] if row else "UNKNOWN"

    def wait_state(
        self, job_id: str | int, states: set[str], timeout: float = 150, poll: float = 0.25
    ) -> str:
        """Wait until accounting shows one of `states` for the job; return it."""
        deadline = time.monotonic() + timeout
        state = "UNKNOWN"
        while time.monotonic() < deadline:
            state = self.job_state(job_id)
            if state in states:
                return state
            time.sleep(poll)
        raise TimeoutError(f"job {job_id} still {state} after {timeout:.0f} s, wanted {states}")

    def idle(self) -> bool:
        return self.run("sinfo", "-h", "-N", "-o", "%T", check=False).strip() == "idle"

    def logs(self, lines: int = 30) -> str:
        """The tail of every daemon log, for failure messages."""
        parts = []
        for log in sorted((self.root / "log").glob("*.log")):
            tail = log.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"--- {log.name}\n" + "\n".join(tail))
        return "\n".join(parts)

    # --- teardown ---------------------------------------------------------------------------
    def stop(self, timeout: float = 10) -> None:
        """Cancel every job, then end every process this cluster started, by PID. What it did,
        and how long each step took, goes to log/stop.log."""
        if not self.procs:
            return
        t0 = time.monotonic()
        done = []

        def note(what: str) -> None:
            done.append(f"{time.monotonic() - t0:6.2f} s  {what}")

        if self.procs.get("slurmctld") and self.procs["slurmctld"].poll() is None:
            with contextlib.suppress(Exception):
                self.run("scancel", "--quiet", "--full", "--partition", self.partition,
                         check=False, timeout=10)
                # Wait for the cancellations to register, not for the jobs to finish COMPLETING
                # (a step whose srun is gone takes seconds to give up): what is left is killed.
                deadline = time.monotonic() + 5
                left = "?"
                while left and time.monotonic() < deadline:
                    left = self.run("squeue", "-h", "-t", "PD,CF,R,S", "-o", "%i %T",
                                    check=False, timeout=5).strip()
                    time.sleep(0.1 if left else 0)
                note(f"cancelled every job{f' (still queued: {left})' if left else ''}")
        # Job processes (slurmstepd and its tasks, detached from slurmd) first: with steps still
        # being killed, slurmd takes seconds to shut down. Then the daemons; then anything left
        # with this cluster's environment (a helper a daemon forked, such as slurmscriptd).
        self._kill_leftovers(note, jobs_only=True)
        for name in reversed(list(self.procs)):  # slurmd first, munged last
            with contextlib.suppress(Exception):  # whatever happens, go on to the next one
                note(f"{name} (pid {self.procs[name].pid}) {_terminate(self.procs[name], timeout)}")
        self._kill_leftovers(note, jobs_only=False)
        if self._cgroup_dir is not None:
            _remove_cgroups(self._cgroup_dir, self.name)
        self.procs.clear()
        for bulky in ("mysql", "spool", "state"):  # ~40 MB of InnoDB files; logs and confs stay
            shutil.rmtree(self.root / bulky, ignore_errors=True)
        note("removed the database, spool and state directories")
        with contextlib.suppress(OSError):
            (self.root / "log" / "stop.log").write_text("\n".join(done) + "\n")

    def _kill_leftovers(self, note, *, jobs_only: bool, timeout: float = 5) -> None:
        """SIGKILL the processes, other than the daemons, that have this cluster's SLURM_CONF in
        their environment (jobs inherit it from sbatch; daemons pass it to what they fork), and
        wait until they are gone. `jobs_only`: slurmstepd and job tasks (SLURM_JOB_ID set) only."""
        daemons = {proc.pid for proc in self.procs.values() if proc.poll() is None}
        pids = [pid for pid, environ in _procs_with_env("SLURM_CONF", str(self.conf)).items()
                if pid not in daemons
                and (not jobs_only or _comm(pid) == "slurmstepd"
                     or any(var.startswith(b"SLURM_JOB_ID=") for var in environ))]
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and any(map(_alive, pids)):
            time.sleep(0.05)  # gone, so their cgroups can be removed
        if pids:
            note(f"killed {'job ' if jobs_only else ''}processes {pids}")

    def __enter__(self) -> SlurmCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_cluster(
    root: Path,
    *,
    cpus: int = 8,
    memory_mb: int = 16384,
    def_mem_per_cpu_mb: int = 2048,
    memory_enforcement: str = "auto",
    extra_conf: dict[str, str | None] | None = None,
    timeout: float = 60,
) -> SlurmCluster:
    """Start a fresh cluster under `root` (an empty private directory) and wait until it is usable.

    `cpus`/`memory_mb` are what the node offers (more than the machine has is fine: slurmd is told
    to trust the config); a job without `--mem` gets `def_mem_per_cpu_mb` per CPU.
    `memory_enforcement`: "cgroup", "jobacct" or "auto" (cgroup where possible).
    `extra_conf` adds or overrides slurm.conf lines (e.g. other SchedulerParameters); a value of
    None drops a line, leaving SLURM's default.
    Raises SlurmUnavailable when it cannot run here, RuntimeError (with the logs) when a daemon
    does not come up.
    """
    reason = missing_reason()
    if reason:
        raise SlurmUnavailable(reason)
    t0 = time.monotonic()
    root = Path(root).resolve()
    for sub in ("etc", "log", "run", "munge", "mysql", "state", "spool", "cgroup"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    os.chmod(root, 0o700)  # munged refuses a socket directory others can write to
    name = "deq" + secrets.token_hex(4)
    ports = _free_ports(4)
    conf = root / "etc" / "slurm.conf"
    env = {**os.environ, "SLURM_CONF": str(conf)}
    for var in ("SLURM_JOB_ID", "SLURM_JOBID", "SLURM_CLUSTER_NAME"):  # not a job of an outer one
        env.pop(var, None)

    if memory_enforcement not in ("auto", "cgroup", "jobacct"):
        raise ValueError(f"memory_enforcement={memory_enforcement!r}: auto, cgroup or jobacct")
    cgroup_dir = None
    if memory_enforcement in ("auto", "cgroup"):
        cgroup_dir = _own_memory_cgroup()
        if cgroup_dir is None and memory_enforcement == "cgroup":
            raise SlurmUnavailable("SLURM test cluster: no writable cgroup-v1 memory controller")
    enforcement = "cgroup" if cgroup_dir is not None else "jobacct"

    munge_socket = root / "munge" / "munge.socket"
    _write_munge_key(root / "munge" / "munge.key")
    _write_slurmdbd_conf(root, munge_socket, dbd_port=ports[2], mysql_port=ports[3])
    settings = _slurm_settings(
        root, name, munge_socket, ctld_port=ports[0], slurmd_port=ports[1], dbd_port=ports[2],
        def_mem_per_cpu_mb=def_mem_per_cpu_mb, enforcement=enforcement,
    )
    settings.update(extra_conf or {})
    settings = {key: value for key, value in settings.items() if value is not None}
    # The node is named after the cluster: Debian's slurmd puts jobs in cgroups named
    # slurm_<node>, so concurrent clusters never share one.
    node_line = (
        f"NodeName={name} NodeHostname={socket.gethostname()} NodeAddr=127.0.0.1 "
        f"CPUs={cpus} RealMemory={memory_mb} State=UNKNOWN"
    )
    part_line = f"PartitionName={PARTITION} Nodes={name} Default=YES MaxTime=INFINITE State=UP"
    conf.write_text(
        "\n".join([*(f"{k}={v}" for k, v in settings.items()), node_line, part_line]) + "\n"
    )
    if cgroup_dir is not None:
        # slurmd puts jobs under <CgroupMountpoint>/memory/slurm_<node>/; pointing "memory" at
        # this process's own memory cgroup keeps every job inside it (and within its limits).
        (root / "cgroup" / "memory").symlink_to(cgroup_dir)
        (root / "etc" / "cgroup.conf").write_text(
            "CgroupPlugin=cgroup/v1\n"
            f"CgroupMountpoint={root / 'cgroup'}\n"
            "CgroupAutomount=no\n"
            "ConstrainRAMSpace=yes\n"
            "AllowedRAMSpace=100\n"
            "ConstrainSwapSpace=no\n"
            "ConstrainCores=no\n"
            "ConstrainDevices=no\n"
        )

    cluster = SlurmCluster(
        root=root, name=name, conf=conf, env=env, cpus=cpus, memory_mb=memory_mb,
        memory_enforcement=enforcement, _cgroup_dir=cgroup_dir,
    )
    try:
        _start_daemons(cluster, munge_socket, ports, timeout)
    except BaseException:
        cluster.stop()
        raise
    cluster.startup_s = time.monotonic() - t0
    return cluster


# --- configuration --------------------------------------------------------------------------


def _slurm_settings(
    root: Path, name: str, munge_socket: Path, *, ctld_port: int, slurmd_port: int,
    dbd_port: int, def_mem_per_cpu_mb: int, enforcement: str,
) -> dict[str, str]:
    host = socket.gethostname()
    settings = {
        "ClusterName": name,
        "SlurmctldHost": f"{host}(127.0.0.1)",
        "SlurmctldPort": str(ctld_port),
        "SlurmdPort": str(slurmd_port),
        "SlurmUser": "root",
        "SlurmdUser": "root",
        "AuthType": "auth/munge",
        "CredType": "cred/munge",
        # cred_expire (default 120 s, minimum 5) is also how long a requeued job waits before it
        # may start again (slurmctld sets its begin time to now + cred_expire + 1).
        "AuthInfo": f"socket={munge_socket},cred_expire=10",
        "StateSaveLocation": str(root / "state"),
        "SlurmdSpoolDir": str(root / "spool" / "%n"),
        "SlurmctldPidFile": str(root / "run" / "slurmctld.pid"),
        "SlurmdPidFile": str(root / "run" / "slurmd.pid"),
        "SlurmctldLogFile": str(root / "log" / "slurmctld.log"),
        "SlurmdLogFile": str(root / "log" / "slurmd.log"),
        "SlurmctldDebug": "info",
        "SlurmdDebug": "info",
        "MailProg": "/bin/true",
        "MpiDefault": "none",
        # Job ids that no concurrent test cluster on this machine shares (cgroup paths, logs).
        "FirstJobId": str(random.randint(10_000, 60_000_000)),
        "ProctrackType": "proctrack/linuxproc",  # no cgroup freezer needed
        "SelectType": "select/cons_tres",
        "SelectTypeParameters": "CR_Core_Memory",  # memory is allocated, so --mem is a limit
        "DefMemPerCPU": str(def_mem_per_cpu_mb),
        "SlurmdParameters": "config_overrides",  # trust CPUs/RealMemory above over the hardware
        "JobAcctGatherType": "jobacct_gather/linux",
        "AccountingStorageType": "accounting_storage/slurmdbd",
        "AccountingStorageHost": "127.0.0.1",
        "AccountingStoragePort": str(dbd_port),
        # Clients and slurmctld sign their messages to slurmdbd with the munge socket given here
        # (AuthInfo covers only the rest); without it they look for the system munged.
        "AccountingStoragePass": f"socket={munge_socket}",
        "JobCompType": "jobcomp/none",
        **SPEED_SETTINGS,
    }
    if enforcement == "cgroup":
        settings["TaskPlugin"] = "task/cgroup"  # the kernel enforces --mem; OOM -> OUT_OF_MEMORY
    else:
        settings["TaskPlugin"] = "task/none"
        settings["JobAcctGatherParams"] = "OverMemoryKill"  # kill a step over --mem (polled RSS)
    return settings


def _write_slurmdbd_conf(root: Path, munge_socket: Path, *, dbd_port: int, mysql_port: int):
    path = root / "etc" / "slurmdbd.conf"
    path.write_text(
        "\n".join([
            "AuthType=auth/munge",
            f"AuthInfo=socket={munge_socket}",
            "DbdHost=localhost",
            "DbdAddr=127.0.0.1",
            f"DbdPort={dbd_port}",
            "SlurmUser=root",
            f"PidFile={root / 'run' / 'slurmdbd.pid'}",
            f"LogFile={root / 'log' / 'slurmdbd.log'}",
            "DebugLevel=info",
            "StorageType=accounting_storage/mysql",
            "StorageHost=127.0.0.1",
            f"StoragePort={mysql_port}",
            "StorageUser=root",  # the private MariaDB runs with --skip-grant-tables
            "StorageLoc=slurm_acct_db",
        ]) + "\n"
    )
    os.chmod(path, 0o600)  # slurmdbd refuses a config others can read (it may hold a password)


def _write_munge_key(path: Path) -> None:
    path.write_bytes(secrets.token_bytes(1024))
    os.chmod(path, 0o400)


# --- processes ------------------------------------------------------------------------------


def _start_daemons(cluster: SlurmCluster, munge_socket: Path, ports: list[int], timeout: float):
    root, env = cluster.root, cluster.env
    start = _Starter(cluster, timeout)

    # First, the watchdog: the daemons die with this process (PR_SET_PDEATHSIG), but slurmd
    # detaches slurmstepd and the jobs; when this process dies without stop() (SIGKILL, or a
    # SIGTERM, which skips Python's cleanup), the watchdog gets SIGTERM and kills those by PID.
    cgroups = cluster._cgroup_dir / f"slurm_{cluster.name}" if cluster._cgroup_dir else ""
    start("watchdog", [sys.executable, "-c", WATCHDOG, str(cluster.conf), str(cgroups)],
          ready=lambda: True)

    start("munged", [
        "munged", "--foreground", "--force", f"--socket={munge_socket}",
        f"--key-file={root / 'munge' / 'munge.key'}", f"--pid-file={root / 'run' / 'munged.pid'}",
        f"--log-file={root / 'log' / 'munged.log'}", f"--seed-file={root / 'munge' / 'seed'}",
    ], ready=munge_socket.exists)

    # A private MariaDB: empty datadir, TCP on 127.0.0.1 only, no grant tables (nothing else can
    # reach it), small InnoDB files and no fsync (a test database that dies with the session).
    start("mariadbd", [
        "mariadbd", "--no-defaults", f"--datadir={root / 'mysql'}", "--user=root",
        f"--socket={root / 'run' / 'mysqld.sock'}", f"--port={ports[3]}",
        "--bind-address=127.0.0.1", f"--pid-file={root / 'run' / 'mysqld.pid'}",
        f"--log-error={root / 'log' / 'mariadbd.log'}", "--skip-grant-tables",
        "--skip-name-resolve", "--skip-log-bin", "--innodb-buffer-pool-size=64M",
        "--innodb-log-file-size=16M", "--innodb-flush-log-at-trx-commit=0",
        "--innodb-doublewrite=0", "--innodb-flush-method=nosync", "--max-connections=50",
    ], ready=lambda: _port_open(ports[3]))

    start("slurmdbd", ["slurmdbd", "-D"], ready=lambda: _port_open(ports[2]))
    # Register the cluster before slurmctld starts, so its first connection is accepted.
    started = deadline = time.monotonic()
    deadline += timeout
    while True:
        out = subprocess.run(
            ["sacctmgr", "-i", "add", "cluster", cluster.name], env=env, capture_output=True,
            text=True, timeout=30, check=False,
        )
        if out.returncode == 0 or "already exists" in out.stdout + out.stderr:
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"sacctmgr add cluster failed: {out.stderr}\n{cluster.logs()}")
        time.sleep(0.2)
    cluster.startup_phases["sacctmgr add cluster"] = time.monotonic() - started

    start("slurmctld", ["slurmctld", "-D", "-i"], ready=lambda: _port_open(ports[0]))
    start("slurmd", ["slurmd", "-D", "-N", cluster.name], ready=cluster.idle)

    # Warm-up, so that no test pays it: slurmctld schedules its first batch job only ~3 s after
    # it starts (batch_sched_delay's default of 3 s holds until the first scheduling pass reads
    # SchedulerParameters). An srun and a batch job whose COMPLETED row proves launch, both kinds
    # of job and accounting end to end.
    started = time.monotonic()
    cluster.run("srun", "--job-name=warm-up", "true", timeout=timeout)
    warm_up = cluster.run(
        "sbatch", "--parsable", "--job-name=warm-up", f"--output={root / 'log' / 'warm-up.out'}",
        "--wrap", "true",
    ).strip()
    try:
        cluster.wait_state(warm_up, {"COMPLETED"}, timeout=timeout, poll=0.05)
    except TimeoutError as err:
        raise RuntimeError(f"{err}\n{cluster.logs()}") from None
    cluster.startup_phases["warm-up jobs"] = time.monotonic() - started

    clusters = cluster.run("sacctmgr", "-n", "-P", "list", "cluster", "format=cluster")
    if cluster.name not in clusters.split():
        raise RuntimeError(f"cluster {cluster.name} is not registered in accounting: {clusters}")


class _Starter:
    def __init__(self, cluster: SlurmCluster, timeout: float):
        self.cluster, self.timeout = cluster, timeout

    def __call__(self, name: str, cmd: list[str], ready) -> None:
        log = open(self.cluster.root / "log" / f"{name}.out", "wb")  # noqa: SIM115
        with log:
            proc = subprocess.Popen(
                cmd, env=self.cluster.env, stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, cwd=self.cluster.root, start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        self.cluster.procs[name] = proc
        started = time.monotonic()
        deadline = started + self.timeout
        while not ready():
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited {proc.returncode}:\n{self._log(name)}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} not ready after {self.timeout:.0f} s:\n{self._log(name)}")
            time.sleep(0.05)
        self.cluster.startup_phases[name] = time.monotonic() - started

    def _log(self, name: str) -> str:
        out = (self.cluster.root / "log" / f"{name}.out").read_text(errors="replace")
        return out[-3000:] + "\n" + self.cluster.logs()


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the test process dies, even by SIGKILL. (The
    signal comes when the thread that started it ends: start clusters from the main thread.)"""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _terminate(proc: subprocess.Popen, timeout: float) -> str:
    """SIGTERM, then SIGKILL after `timeout` s; says how it ended."""
    if proc.poll() is not None:
        return f"had exited ({proc.returncode})"
    proc.terminate()
    try:
        proc.wait(timeout)
        return "stopped by SIGTERM"
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout)
        return f"killed: SIGTERM did not stop it within {timeout:.0f} s"


def _procs_with_env(var: str, value: str) -> dict[int, list[bytes]]:
    """Processes (not this one) whose environment has var=value: pid -> environment."""
    needle = f"{var}={value}".encode()
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if needle in environ:
            found[int(entry.name)] = environ
    return found


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    """Running, or at least not yet a zombie (a killed job process waits for init to reap it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


# --- cgroups --------------------------------------------------------------------------------


def _own_memory_cgroup() -> Path | None:
    """This process's cgroup-v1 memory directory, if we may create cgroups below it."""
    try:
        own = Path("/proc/self/cgroup").read_text().splitlines()
        mounts = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return None
    # "cgroup /sys/fs/cgroup/memory cgroup rw,relatime,memory 0 0"
    mount = next((m.split()[1] for m in mounts if m.split()[2] == "cgroup"
                  and "memory" in m.split()[3].split(",")), None)
    path = next((line.split(":", 2)[2] for line in own
                 if "memory" in line.split(":", 2)[1].split(",")), None)
    if mount is None or path is None:
        return None  # cgroup v2 only (slurm 22.05's cgroup/v2 wants systemd), or none
    base = Path(mount) / path.lstrip("/")
    probe = base / f"deqbench-probe-{os.getpid()}"
    try:
        probe.mkdir()
        probe.rmdir()
    except OSError:
        return None
    return base if (base / "memory.limit_in_bytes").exists() else None


def _remove_cgroups(base: Path, node: str) -> None:
    """Remove the empty cgroups slurmd left under base/slurm_<node> (Debian builds slurm with
    multiple-slurmd support, which names the top cgroup after the node), deepest first."""
    top = base / f"slurm_{node}"
    if not top.is_dir():
        return
    for dirpath, _, _ in sorted(os.walk(top), key=lambda d: -d[0].count("/")):
        with contextlib.suppress(OSError):
            os.rmdir(dirpath)
