"""Launchers: how a matrix's cases become rows. Swappable, so they sit in a registry.

    local   N spawned worker processes on this machine (bench.runner's workers), each pinned to
            one GPU (CUDA_VISIBLE_DEVICES) or, on the CPU, one torch thread each
    slurm   one SLURM job per case (or a job array) through submitit; each job writes its row file

Every launcher turns the cases it is given into rows of the same run folder (bench.rundir): row
files, merged into results.csv by the driver. `LauncherConfig` is the one record of a launcher's
options (a matrix's `[launcher]` table, overridden by the command line), validated once, here.
"""

from __future__ import annotations

import importlib
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any, Protocol

from bench.errors import SpecError

MAX_WORKERS = 256
SLURM_MEM = re.compile(r"[1-9][0-9]*[KMGT]?")  # sbatch --mem: megabytes, or a K/M/G/T suffix
SLURM_TIME = re.compile(r"(?:(\d+)-)?(?:(\d+):)?(\d+):(\d{2})")  # [D-][H:]MM:SS


@dataclass(frozen=True, kw_only=True)
class LauncherConfig:
    """A launcher and its options. Each field is a `[launcher]` key and a `--<field>` option
    (`--launcher` for `name`); SpecError names a bad one."""

    name: str = "local"
    workers: int | None = None  # local: parallel workers (default 1, or one per --gpus entry)
    gpus: tuple[int, ...] = ()  # local: CUDA device indices, one worker pinned to each
    slurm_partition: str | None = None
    slurm_gpus_per_task: int | None = None
    slurm_time: int | None = None  # minutes per job (default: the case time limit, rounded up, + 1)
    slurm_mem: str | None = None  # sbatch --mem, e.g. 4G (a case over it becomes an oom row)
    slurm_array_parallelism: int | None = None  # submit one job array, at most this many running
    slurm_setup: tuple[str, ...] = ()  # lines run in the job script before the case

    def __post_init__(self) -> None:
        if self.name not in LAUNCHERS:
            raise SpecError(f"unknown launcher {self.name!r}; valid launchers: {', '.join(LAUNCHERS)}")
        for key, low, top in (("workers", 1, MAX_WORKERS), ("slurm_gpus_per_task", 0, 64),
                              ("slurm_array_parallelism", 1, 100_000)):
            value = getattr(self, key)
            if value is not None and (not _is_int(value) or not low <= value <= top):
                raise _bad(key, f"an integer from {low} to {top}", value)
        if not isinstance(self.gpus, tuple) or not all(_is_int(g) and g >= 0 for g in self.gpus):
            raise _bad("gpus", "a list of CUDA device indices, e.g. 0,1,3", self.gpus)
        if len(set(self.gpus)) != len(self.gpus):
            raise _bad("gpus", "distinct device indices (one worker per GPU)", self.gpus)
        if self.gpus and self.workers is not None and self.workers != len(self.gpus):
            raise SpecError(f"--workers {self.workers} and --gpus {','.join(map(str, self.gpus))} "
                            f"disagree: one worker runs on each GPU; give only --gpus")
        if self.slurm_partition is not None and (not isinstance(self.slurm_partition, str)
                                                 or not re.fullmatch(r"[\w.,-]+", self.slurm_partition)):
            raise _bad("slurm_partition", "a partition name (letters, digits, _ . -)", self.slurm_partition)
        if self.slurm_time is not None and (not _is_int(self.slurm_time) or self.slurm_time < 1):
            raise _bad("slurm_time", "a positive number of minutes, or [D-][H:]MM:SS", self.slurm_time)
        if self.slurm_mem is not None and (not isinstance(self.slurm_mem, str)
                                           or not SLURM_MEM.fullmatch(self.slurm_mem)):
            raise _bad("slurm_mem", "sbatch --mem: megabytes or a size with K, M, G or T, e.g. 4G",
                       self.slurm_mem)
        if not isinstance(self.slurm_setup, tuple) or not all(
                isinstance(s, str) and s.strip() and "\n" not in s for s in self.slurm_setup):
            raise _bad("slurm_setup", "one shell line per entry, e.g. 'module load cuda'", self.slurm_setup)
        given = [f.name for f in fields(self) if f.name != "name" and getattr(self, f.name) not in
                 (None, ())]
        other = [k for k in given if k.startswith("slurm_") != (self.name == "slurm")]
        if other:
            other_name = "slurm" if self.name == "local" else "local"
            kind = "--slurm-* options go" if self.name == "local" else "--workers and --gpus go"
            raise SpecError(f"{_option(other[0])} does not apply to --launcher {self.name}: "
                            f"{kind} with --launcher {other_name}")

    @property
    def parallel(self) -> int:
        """How many cases may run at once on one machine (local); 1 for slurm (per job)."""
        if self.name != "local":
            return 1
        return len(self.gpus) or self.workers or 1

    @property
    def concurrent(self) -> bool:
        """Whether cases share a machine's cores while timed (local with several workers)."""
        return self.parallel > 1

    def record(self) -> dict[str, Any]:
        """What `--resume` must find unchanged (bench.rundir.fingerprint's options): what the
        rows depend on. Nothing for the default (one local worker), so older folders resume."""
        if self.name == "local":
            return {"workers": self.parallel} if self.concurrent else {}
        return {"launcher": self.name}

    def summary(self) -> str:
        """How the run's header says where the cases go (empty for one local worker)."""
        if self.name == "slurm":
            return " via SLURM jobs" + (f" (partition {self.slurm_partition})" if self.slurm_partition else "")
        return f" with {self.parallel} concurrent workers" if self.concurrent else ""

    def describe(self) -> dict[str, Any]:
        """env.json's `launcher`: every option, and whether timings had concurrent workers."""
        chosen = {f.name: getattr(self, f.name) for f in fields(self)
                  if getattr(self, f.name) not in (None, ())}
        return {**chosen, "workers": self.parallel, "concurrent": self.concurrent,
                "gpus": list(self.gpus), "slurm_setup": list(self.slurm_setup)}


LAUNCHER_KEYS = tuple(f.name for f in fields(LauncherConfig))  # `--launcher` for name, else --<key>


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _option(key: str) -> str:
    return "--launcher" if key == "name" else f"--{key.replace('_', '-')}"


def _bad(key: str, what: str, value: Any) -> SpecError:
    return SpecError(f"{_option(key)} must be {what}, got {value!r}")


def parse_minutes(value: Any) -> int:
    """A SLURM time limit in whole minutes: an integer, or [D-][H:]MM:SS (rounded up)."""
    if _is_int(value) or (isinstance(value, str) and value.strip().isdigit()):
        return int(value)
    match = SLURM_TIME.fullmatch(value.strip()) if isinstance(value, str) else None
    if not match:
        raise _bad("slurm_time", "a positive number of minutes, or [D-][H:]MM:SS", value)
    days, hours, minutes, seconds = (int(g or 0) for g in match.groups())
    return (days * 24 + hours) * 60 + minutes + math.ceil(seconds / 60)


def launcher_config(table: Mapping[str, Any] | None = None, where: str = "[launcher]",
                    **overrides: Any) -> LauncherConfig:
    """A LauncherConfig from a matrix's `[launcher]` table and the command line's options (those
    not None win); SpecError names an unknown key or a bad value."""
    table = dict(table or {})
    valid = [f.name for f in fields(LauncherConfig)]
    unknown = sorted(set(table) - set(valid))
    if unknown:
        raise SpecError(f"{where}: unknown key(s) {unknown}; valid: {', '.join(valid)}")
    values = {**table, **{k: v for k, v in overrides.items() if v not in (None, ())}}
    if isinstance(values.get("gpus"), str):  # --gpus 0,1,3
        parts = [p.strip() for p in values["gpus"].split(",")]
        if not all(p.isdigit() for p in parts):
            raise SpecError(f"bad --gpus {values['gpus']!r}; use CUDA device indices, e.g. --gpus 0,1,3")
        values["gpus"] = tuple(int(p) for p in parts)
    for key in ("gpus", "slurm_setup"):
        if isinstance(values.get(key), list):
            values[key] = tuple(values[key])
    if isinstance(values.get("slurm_setup"), str):
        values["slurm_setup"] = (values["slurm_setup"],)
    if "slurm_time" in values:
        values["slurm_time"] = parse_minutes(values["slurm_time"])
    return LauncherConfig(**values)


def launcher_device(requested: str, config: LauncherConfig) -> str:
    """The device cases run on. SLURM jobs run on other machines: `auto` is CUDA where the jobs
    get GPUs (--slurm-gpus-per-task), and this machine need not have one. Local GPU workers need
    the GPUs they are pinned to. SpecError (or ValueError: no such device) otherwise."""
    if config.name == "slurm":
        if requested == "auto":
            return "cuda" if config.slurm_gpus_per_task else "cpu"
        if requested not in ("cpu", "cuda"):
            raise SpecError(f"--device {requested} with --launcher slurm: use cpu or cuda (a job "
                            "sees the GPUs SLURM gives it, --slurm-gpus-per-task)")
        return requested
    from bench.env import resolve_device

    device = resolve_device(requested)
    if config.gpus and not device.startswith("cuda"):
        raise SpecError(f"--gpus {','.join(map(str, config.gpus))} needs CUDA, but the run is on "
                        f"{device}; drop --gpus (use --workers N on the CPU) or use --device cuda")
    if device.startswith("cuda") and config.concurrent:
        import torch

        if device != "cuda":
            raise SpecError(f"--device {device} pins the run to one GPU; with several workers use "
                            "--device cuda and --gpus to choose them")
        count = torch.cuda.device_count()
        missing = [g for g in (config.gpus or range(config.parallel)) if g >= count]
        if missing:
            raise SpecError(f"GPU(s) {missing} do not exist: {count} CUDA device(s) present; "
                            "one worker runs per GPU (--gpus 0,1,... or --workers up to that)")
    return device


class Launcher(Protocol):
    """Runs cases (bench.spec.Case) into a run folder's rows (bench.rundir.Results). The runner
    holds the folder's lock, has recovered its rows and calls `start` (before env.json is
    written: workers may start meanwhile), then `run` with the cases still to do, which returns
    the rows it wrote; `stop` ends whatever is left when the run is stopped."""

    def start(self, todo: Sequence[Any], matrix: Any, options: Any, results: Any) -> None: ...

    def run(self, todo: Sequence[Any], matrix: Any, options: Any, results: Any,
            done: int) -> list[dict[str, Any]]: ...

    def stop(self) -> None: ...


@dataclass(frozen=True)
class LauncherSpec:
    name: str
    description: str
    target: str  # "module:Class", imported when a run uses it (a launcher imports the runner)


LAUNCHERS: dict[str, LauncherSpec] = {spec.name: spec for spec in (
    LauncherSpec("local", "worker processes on this machine: --workers N (CPU), or one per GPU "
                          "with --gpus 0,1,3 (CUDA_VISIBLE_DEVICES)", "bench.launchers.local:LocalLauncher"),
    LauncherSpec("slurm", "one SLURM job per case (or a job array) through submitit; jobs write "
                          "their rows to the shared run folder", "bench.launchers.slurm:SlurmLauncher"),
)}


def register_launcher(name: str, description: str, target: str) -> None:
    """Add a launcher: `target` is "module:Class", a class built from a LauncherConfig."""
    LAUNCHERS[name] = LauncherSpec(name, description, target)


def make_launcher(config: LauncherConfig) -> Launcher:
    module, _, cls = LAUNCHERS[config.name].target.partition(":")
    return getattr(importlib.import_module(module), cls)(config)


def list_launchers() -> dict[str, str]:
    return {name: spec.description for name, spec in LAUNCHERS.items()}


def with_threads(matrix: Any, config: LauncherConfig, device: str) -> Any:
    """Concurrent CPU workers get one torch thread each unless the matrix or --threads says how
    many (more threads than cores per worker only spin)."""
    if config.concurrent and device == "cpu" and matrix.settings.threads is None:
        return replace(matrix, settings=replace(matrix.settings, threads=1))
    return matrix

