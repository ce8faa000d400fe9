"""Launchers: how a matrix's cases become rows. Swappable, so they sit in a registry.

    local   N spawned worker processes on this machine (bench.runner's workers), each pinned to
            one GPU (CUDA_VISIBLE_DEVICES) or, on the CPU, one torch thread each
    slurm   one SLURM job per case (or a job array) through submitit; each job writes its row file

Every launcher turns the cases it is given into rows of the same run folder (bench.rundir): row
files, merged into results.csv by the driver. `LauncherConfig` is the one record of a launcher's
options (a matrix's `[launcher]` table, overridden by the command line), validated once, here.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any, Protocol

from bench.errors import SpecError

if TYPE_CHECKING:
    from bench.rundir import Results
    from bench.runner import RunOptions
    from bench.spec import Case, Matrix

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

    def describe(self) -> dict[str, Any]:
        """env.json's `launcher`: every option, and whether timings had concurrent workers."""
        chosen = {f.name: getattr(self, f.name) for f in fields(self)
                  if getattr(self, f.name) not in (None, ())}
        return {**chosen, "workers": self.parallel, "concurrent": self.concurrent,
                "gpus": list(self.gpus), "slurm_setup": list(self.slurm_setup)}


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
    for key in ("gpus", "slurm_setup"):
        if isinstance(values.get(key), list):
            values[key] = tuple(values[key])
    if isinstance(values.get("slurm_setup"), str):
        values["slurm_setup"] = (values["slurm_setup"],)
    if "slurm_time" in values:
        values["slurm_time"] = parse_minutes(values["slurm_time"])
    return LauncherConfig(**values)


class Launcher(Protocol):
    """Runs cases into a run folder's rows. The runner holds the folder's lock, has recovered
    its rows and calls `start` (before env.json is written: workers may start meanwhile), then
    `run` with the cases still to do; `stop` ends whatever is left when the run is stopped."""

    def start(self, todo: Sequence[Case], matrix: Matrix, options: RunOptions, results: Results) -> None: ...

    def run(self, todo: Sequence[Case], matrix: Matrix, options: RunOptions, results: Results,
            done: int) -> list[dict[str, Any]]: ...

    def stop(self) -> None: ...


@dataclass(frozen=True)
class LauncherSpec:
    name: str
    description: str
    make: Callable[[LauncherConfig], Launcher] = field(repr=False)


LAUNCHERS: dict[str, LauncherSpec] = {}


def register_launcher(name: str, description: str):
    """Class decorator: `@register_launcher("local", "...")` on a class built from a config."""
    def wrap(cls):
        LAUNCHERS[name] = LauncherSpec(name, description, cls)
        return cls
    return wrap


def make_launcher(config: LauncherConfig) -> Launcher:
    return LAUNCHERS[config.name].make(config)


def list_launchers() -> dict[str, str]:
    return {name: spec.description for name, spec in LAUNCHERS.items()}


def with_threads(matrix: Matrix, config: LauncherConfig, device: str) -> Matrix:
    """Concurrent CPU workers get one torch thread each unless the matrix or --threads says how
    many (more threads than cores per worker only spin)."""
    if config.concurrent and device == "cpu" and matrix.settings.threads is None:
        return replace(matrix, settings=replace(matrix.settings, threads=1))
    return matrix


from bench.launchers import local, slurm  # noqa: E402,F401  (they register themselves)
