"""Cases and matrices: what a benchmark run measures.

A case is one model at one shape and phase. A matrix (TOML) lists axes whose values multiply out:

    name = "smoke"
    description = "..."
    [settings]                 # how cases run (see RunSettings)
    repeats = 5
    [defaults]                 # axis values shared by every sweep
    size = "debug"
    phase = ["train", "eval"]
    [[sweep]]                  # one product of axes; a matrix may hold several
    family = ["transformer", "trellisnet"]
    variant = ["deq", "tied", "ckpt"]
    seq_len = [32, 128]
    depth = [4, 16]

`phase = "fit"` trains the model from scratch (lm mode only) for the matrix's `fit_steps` or
`fit_seconds` on `fit_data` and records its perplexity (bench.train): every model of a matrix gets
the same budget, so DEQs and their baselines compare at equal steps or equal wall-clock.

`[settings] predicted` says which cases the `predicted` instrument (fake tensors) measures beside
the real passes when a run uses the device's default instruments: a "sample" by default (the first
case of each model, size and mode, and every case beyond the debug size), "all" or "none".
`tracked` is exact on any device, so a prediction of every case only doubles a CPU run; the sample
keeps it honest against `tracked` in every run (the report lists the rows that have both), and
`deqbench predict` predicts every case.

`model = [...]` may replace family x variant, and `config = { max_iter = 50 }` sets model config
fields (not multiplied; checked against each model's config); `instruments = ["predicted"]`
measures a sweep's cases with those instruments only (e.g. paper sizes that do not fit here, in
seconds and without allocating), and `match_params = false` keeps a sweep's untied baselines at
their size's own shape (the paper's). DEQs have no depth and explicit models no solver or backward, so
those axes do not multiply the cases they don't apply to. Untied explicit baselines are
parameter-matched to their family's DEQ unless `settings.match_params = false`.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.compat import tomllib
from bench.errors import CorpusError, SpecError
from bench.matching import matched_overrides

if TYPE_CHECKING:
    from bench.measure.workload import Workload

PRESET_DIR = Path(__file__).parent / "presets"
AXES = ("family", "variant", "model", "solver", "backward", "depth", "seq_len", "batch", "size",
        "mode", "phase")
# Not multiplied, the same for every case of a sweep: config (model config overrides) and
# instruments (how its cases are measured, e.g. ["predicted"] for sizes that do not fit here),
# match_params (the sweep's own [settings] match_params, e.g. false for the paper's shapes).
KEYS = (*AXES, "config", "instruments", "match_params")
PHASES = ("train", "eval", "fit")
PREDICTED = ("sample", "all", "none")  # RunSettings.predicted
MODES = ("core", "lm")
DTYPES = ("float32", "float64", "bfloat16", "float16")  # bench.measure.workload.DTYPES' names
MAX_THREADS = 1024  # torch intra-op threads: a typo like 1000000 would start that many threads


@dataclass(frozen=True, kw_only=True)
class Case:
    model: str
    family: str
    variant: str
    size: str = "debug"
    mode: str = "core"
    phase: str = "train"
    seq_len: int
    batch: int
    depth: int | None = None  # explicit models only
    solver: str | None = None  # DEQs only
    backward: str | None = None  # DEQs only
    overrides: tuple[tuple[str, Any], ...] = ()  # model config overrides, e.g. parameter matching
    # Measure it with `predicted` too where the run uses the device's default instruments (the
    # matrix's [settings] predicted sample); not part of the case id.
    predict: bool = True
    # the sweep's instruments; empty: the run's (--instruments, [settings], the device's own)
    instruments: tuple[str, ...] = ()

    @property
    def is_deq(self) -> bool:
        return self.variant == "deq"

    @property
    def case_id(self) -> str:
        parts = [self.model, self.size, self.mode, self.phase, f"T{self.seq_len}", f"B{self.batch}"]
        parts += [self.solver or "", self.backward or ""] if self.is_deq else [f"L{self.depth}"]
        parts += [f"{k}={v}" for k, v in self.overrides]
        return "/".join(p for p in parts if p)

    def model_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for models.build_model beyond name, size and mode."""
        kwargs: dict[str, Any] = dict(self.overrides)
        if self.is_deq:
            kwargs.update(solver=self.solver, backward=self.backward)
        else:
            kwargs["depth"] = self.depth
        return kwargs

    def twin(self, phase: str) -> Case:
        """The same model at the same shape in another phase (a training case's eval twin)."""
        return dataclasses.replace(self, phase=phase)

    def columns(self) -> dict[str, Any]:
        """The case's own results.csv columns (bench.results.CASE_COLUMNS and `overrides`)."""
        return {
            "case_id": self.case_id, "family": self.family, "model": self.model,
            "variant": self.variant, "solver": self.solver, "backward": self.backward,
            "depth": self.depth, "seq_len": self.seq_len, "batch": self.batch, "size": self.size,
            "mode": self.mode, "phase": self.phase, "overrides": dict(self.overrides) or None,
        }

    def workload(self, device: str, settings: RunSettings) -> Workload:
        """The measured step of this case (a `fit` case's is its training step)."""
        from bench.measure.workload import Workload

        overrides = dict(self.overrides)
        if self.is_deq:
            overrides.update(solver=self.solver, backward=self.backward)
        return Workload(
            model=self.model, size=self.size, mode=self.mode,
            phase="train" if self.phase == "fit" else self.phase, batch=self.batch,
            seq_len=self.seq_len, depth=self.depth, overrides=tuple(sorted(overrides.items())),
            device=device, dtype=settings.dtype, seed=settings.seed,
        )

    def to_message(self) -> dict[str, Any]:
        """Plain data for a pipe or a JSON file; `Case.from_message` reads it back."""
        return dataclasses.asdict(self)

    @classmethod
    def from_message(cls, message: Mapping[str, Any]) -> Case:
        fields = dict(message)
        fields["overrides"] = tuple(tuple(kv) for kv in fields.get("overrides", ()))
        return cls(**fields)


@dataclass(frozen=True, kw_only=True)
class RunSettings:
    """How the cases of a matrix run; validated once, here (SpecError names the bad field)."""

    warmup: int = 1  # steps before any measurement (also materialises optimizer state)
    repeats: int = 5  # timed steps per case
    timeout_s: float = 300.0  # per case, from the worker receiving it to its row
    match_params: bool = True  # size untied baselines to their DEQ's non-embedding parameters
    instruments: tuple[str, ...] = ()  # empty: every instrument the device allows
    dtype: str = "float32"
    seed: int = 0
    # torch intra-op threads in the worker; None keeps torch's default (all cores). Debug-sized
    # tensors gain nothing from more threads, and on shared cores a second thread can make a
    # step 100x slower (spin-waiting), so small presets say 1.
    threads: int | None = None
    # fit cases (phase "fit"): the training budget and corpus; None = bench.train's default
    fit_steps: int | None = None
    fit_seconds: float | None = None  # a wall-clock budget; fit_steps then only caps the steps
    fit_data: str = "synthetic"
    fit_lr: float | None = None
    # Which cases `predicted` measures beside the real passes: "sample", "all" or "none" (above).
    predicted: str = "sample"

    def __post_init__(self) -> None:
        def bad(key: str, what: str) -> SpecError:
            return SpecError(f"[settings] {key} must be {what}, got {getattr(self, key)!r}")

        for key, low in (("warmup", 0), ("repeats", 1), ("seed", 0)):
            if not _is_int(getattr(self, key)) or getattr(self, key) < low:
                raise bad(key, "a positive integer" if low else "a non-negative integer")
        if self.threads is not None and (not _is_int(self.threads) or not 1 <= self.threads <= MAX_THREADS):
            raise bad("threads", f"a positive integer up to {MAX_THREADS}")
        for key, kind in (("timeout_s", "number"), ("fit_steps", "integer"),
                          ("fit_seconds", "number"), ("fit_lr", "number")):
            value = getattr(self, key)
            if value is None and key != "timeout_s":
                continue
            ok = _is_int(value) if kind == "integer" else _is_number(value)
            if not ok or not value > 0:
                raise bad(key, f"a positive {kind}" + (" (finite)" if kind == "number" else ""))
        if not isinstance(self.match_params, bool):
            raise bad("match_params", "true or false")
        if self.predicted not in PREDICTED:
            raise bad("predicted", f"one of {', '.join(PREDICTED)}")
        if self.dtype not in DTYPES:
            raise bad("dtype", f"one of {', '.join(DTYPES)}")
        if not isinstance(self.instruments, tuple) or not all(isinstance(n, str) for n in self.instruments):
            raise bad("instruments", "a list of instrument names")
        _check_instruments(self.instruments, "[settings]")
        if not isinstance(self.fit_data, str):
            raise bad("fit_data", "a string: synthetic[:options] or a directory")
        if self.fit_data != "synthetic":
            from bench.data import check_data

            try:
                check_data(self.fit_data)
            except CorpusError as err:
                raise SpecError(f"[settings] fit_data: {err}") from None


def instrument_list(text: str | None, device: str, settings: RunSettings) -> tuple[str, ...]:
    """The instruments of a run: `--instruments` (comma-separated), else the matrix's
    [settings] instruments, else () for all the device allows. Every name is known and given
    once, and each one asked for by name runs on the device: a number asked for that cannot
    exist is bad input, not an empty column."""
    import torch

    from bench.measure import check_instrument, make_instrument

    names = list(settings.instruments)
    if text is not None:
        names = [n.strip() for n in text.split(",") if n.strip()]
        twice = sorted({n for n in names if names.count(n) > 1})
        if not names or twice:
            raise SpecError(f"--instruments names {', '.join(twice) + ' twice' if twice else 'no instrument'}; "
                            "give a comma-separated list, e.g. tracked,timing")
        try:
            names = [check_instrument(n) for n in names]
        except ValueError as err:
            raise SpecError(str(err)) from None
    for name in names:
        ok, why = make_instrument(name).available(torch.device(device))
        if not ok:
            raise SpecError(f"instrument {name} cannot run on {device} ({why}); drop it from "
                            "--instruments / [settings] instruments, or run on a device that has it")
    return tuple(names)


def _check_instruments(names: tuple[str, ...], where: str) -> None:
    if not all(isinstance(n, str) for n in names):
        raise SpecError(f"{where} instruments must be a list of instrument names, got {list(names)!r}")
    if names:
        from bench.measure import list_instruments

        unknown = [n for n in names if n not in list_instruments()]
        if unknown:
            raise SpecError(f"{where} instruments: unknown instrument(s) {unknown}; "
                            f"valid: {', '.join(list_instruments())}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class Matrix:
    name: str
    description: str
    cases: tuple[Case, ...]
    settings: RunSettings = field(default_factory=RunSettings)
    source: str = ""
    notes: tuple[str, ...] = ()  # e.g. family x variant combinations that do not exist
    launcher: Mapping[str, Any] = field(default_factory=dict)  # [launcher]: defaults the CLI overrides


def catalog() -> dict[str, Any]:
    """Every name a matrix can use (`deqbench list`): models with their family, variant and
    sizes; presets with their case counts; solvers, backward modes, instruments."""
    from bench.launchers import list_launchers
    from bench.measure import list_instruments
    from models import BACKWARDS, SOLVERS, list_models, model_spec

    models = {name: {"family": (s := model_spec(name)).family, "variant": s.variant,
                     "sizes": list(s.sizes), "description": s.description} for name in list_models()}
    presets = {name: {"description": (m := load_preset(name)).description, "cases": len(m.cases)}
               for name in list_presets()}
    return {"models": models, "presets": presets, "solvers": sorted(SOLVERS),
            "backwards": sorted(BACKWARDS), "instruments": list_instruments(),
            "launchers": list_launchers()}


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.toml"))


def load_preset(name: str) -> Matrix:
    path = PRESET_DIR / f"{name}.toml"
    if not path.is_file():
        raise SpecError(f"unknown preset {name!r}; valid presets: {', '.join(list_presets())}")
    return load_matrix(path)


def load_matrix(path: str | Path) -> Matrix:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise SpecError(f"cannot read matrix file {path}: {err.strerror or err}") from None
    except UnicodeDecodeError as err:
        raise SpecError(f"matrix file {path} is not UTF-8 text ({err.reason} at byte {err.start}): "
                        "a matrix is a TOML file") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise SpecError(f"matrix file {path} does not parse as TOML: {err}") from None
    return parse_matrix(data, source=str(path), default_name=path.stem)


def parse_matrix(data: Mapping[str, Any], source: str = "", default_name: str = "matrix") -> Matrix:
    where = source or "matrix"
    _no_unknown(data, ("name", "description", "settings", "defaults", "sweep", "launcher"), where)
    settings = _settings(data.get("settings", {}), where)
    launcher = data.get("launcher", {})
    if not isinstance(launcher, Mapping):
        raise SpecError(f"{where}: [launcher] must be a table, e.g. [launcher] name = \"local\", got {launcher!r}")
    from bench.launchers import launcher_config

    launcher_config(launcher, f"{where} [launcher]")  # checked now: a bad key fails before anything runs
    defaults = data.get("defaults", {})
    _no_unknown(defaults, KEYS, f"{where} [defaults]")
    _config_table(defaults, f"{where} [defaults]")
    sweeps = data.get("sweep", [])
    if isinstance(sweeps, Mapping):
        sweeps = [sweeps]
    if not isinstance(sweeps, list) or not all(isinstance(s, Mapping) for s in sweeps):
        raise SpecError(f"{where}: [[sweep]] must be tables of axes, got {sweeps!r}")
    if not sweeps:
        raise SpecError(f"{where} has no [[sweep]] table: nothing to run")
    cases: list[Case] = []
    notes: list[str] = []
    for i, sweep in enumerate(sweeps):
        _no_unknown(sweep, KEYS, f"{where} [[sweep]] #{i + 1}")
        _config_table(sweep, f"{where} [[sweep]] #{i + 1}")
        axes = {**defaults, **sweep, "config": {**defaults.get("config", {}), **sweep.get("config", {})}}
        cases += _expand(axes, settings, f"{where} [[sweep]] #{i + 1}", notes)
    unique = tuple(dict.fromkeys(cases))  # keep order, drop repeats across sweeps
    if not unique:
        raise SpecError(f"{where} expands to no cases")
    unique = predicted_sample(unique, settings.predicted)
    return Matrix(
        name=str(data.get("name", default_name)), description=str(data.get("description", "")),
        cases=unique, settings=settings, source=source, notes=tuple(dict.fromkeys(notes)),
        launcher=dict(launcher),
    )


CONFIG_AXES = ("depth", "solver", "backward")  # model config fields that are axes of a case


def _config_table(table: Mapping[str, Any], where: str) -> None:
    config = table.get("config", {})
    if not isinstance(config, Mapping):
        raise SpecError(f"{where}: config must be a table of model config fields, e.g. "
                        f"config = {{ max_iter = 30 }}; got {config!r}")
    axis = next((k for k in CONFIG_AXES if k in config), None)
    if axis:  # the axis would silently win over it (and the case id would say otherwise)
        raise SpecError(f"{where}: config: {axis} is an axis of the matrix: give {axis} = "
                        f"{config[axis]!r} in the sweep (or [defaults]), not in config")


def predicted_sample(cases: Iterable[Case], policy: str) -> tuple[Case, ...]:
    """The cases with `predict` set by the [settings] predicted policy: "all", "none", or a
    "sample": the first case of each model, size and mode (every model's prediction is held
    against its tracked bytes in every run; a preset listing train first checks the harder
    phase), and every case beyond the debug size (where a real step may not fit, or takes long,
    the prediction is what the row can rely on)."""
    seen: set[tuple[str, str, str]] = set()
    out = []
    for case in cases:
        key = (case.model, case.size, case.mode)
        predict = policy == "all" or (policy == "sample" and (key not in seen or case.size != "debug"))
        seen.add(key)
        out.append(dataclasses.replace(case, predict=predict))
    return tuple(out)


def _settings(raw: Mapping[str, Any], where: str) -> RunSettings:
    fields = [f.name for f in dataclasses.fields(RunSettings)]
    _no_unknown(raw, fields, f"{where} [settings]")
    values = dict(raw)
    if "instruments" in values:
        values["instruments"] = tuple(_as_list(values["instruments"]))
    try:
        return RunSettings(**values)
    except SpecError as err:
        raise SpecError(f"{where} {err}") from None


def _expand(axes: Mapping[str, Any], settings: RunSettings, where: str, notes: list[str]) -> list[Case]:
    from models import BACKWARDS, SOLVERS, make_config, model_spec, resolve_head

    models = _models_for(axes, where, notes)
    config = axes.get("config", {})  # a table: parse_matrix checked it
    instruments = tuple(_as_list(axes.get("instruments", [])))
    _check_instruments(instruments, where)
    match_params = axes.get("match_params", settings.match_params)
    if not isinstance(match_params, bool):
        raise SpecError(f"{where}: match_params must be true or false, got {match_params!r}")
    lists = {k: _as_list(v) for k, v in axes.items()
             if k not in ("family", "variant", "model", "config", "instruments", "match_params")}
    for key in ("seq_len", "batch", "depth"):
        for v in lists.get(key, []):
            if isinstance(v, bool) or not isinstance(v, int) or not 0 < v < 2**31:
                raise SpecError(f"{where}: {key} must be positive integers below 2**31, got {v!r}")
    for key in ("seq_len", "batch"):
        if not lists.get(key):
            raise SpecError(f"{where}: no {key} given (set it in [defaults] or the sweep)")
    _check_names(lists.get("solver", []), sorted(SOLVERS), "solver", where)
    _check_names(lists.get("backward", []), sorted(BACKWARDS), "backward", where)
    _check_names(lists.get("phase", ["train"]), PHASES, "phase", where)
    _check_names(lists.get("mode", ["core"]), MODES, "mode", where)
    cases = []
    for name in models:
        spec = model_spec(name)
        sizes = lists.get("size", ["debug"])
        _check_names(sizes, list(spec.sizes), f"size for {name}", where)
        depths = [None] if spec.is_deq else lists.get("depth") or [None]
        if not spec.is_deq and depths == [None]:
            raise SpecError(f"{where}: explicit model {name} needs a depth axis")
        solvers = lists.get("solver", ["broyden"]) if spec.is_deq else [None]
        backwards = lists.get("backward", ["implicit"]) if spec.is_deq else [None]
        for size in sizes:
            try:
                built = make_config(name, size, **dict(config))
                for mode in lists.get("mode", ["core"]):  # a head the mode contradicts fails here
                    resolve_head(getattr(built, "head", None), mode)
            except ValueError as err:
                raise SpecError(f"{where}: config: {err}") from None
        for size, mode, phase, seq_len, batch, depth, solver, backward in itertools.product(
            sizes, lists.get("mode", ["core"]), lists.get("phase", ["train"]), lists["seq_len"],
            lists["batch"], depths, solvers, backwards,
        ):
            if phase == "fit" and mode != "lm":
                notes.append("fit cases train on tokens: they run in lm mode only")
                continue
            case = Case(model=name, family=spec.family, variant=spec.variant, size=size, mode=mode,
                        phase=phase, seq_len=seq_len, batch=batch, depth=depth, solver=solver,
                        backward=backward, overrides=tuple(sorted(config.items())),
                        instruments=instruments)
            if match_params and spec.variant == "untied" and not config:
                case = dataclasses.replace(case, overrides=matched_overrides(
                    case.family, case.model, case.size, case.depth, notes))
            cases.append(case)
    return cases


def _models_for(axes: Mapping[str, Any], where: str, notes: list[str]) -> list[str]:
    from models import list_models, model_spec
    from models.registry import VARIANTS

    known = list_models()
    if "model" in axes:
        if "family" in axes or "variant" in axes:
            raise SpecError(f"{where}: give either model or family/variant, not both")
        names = _as_list(axes["model"])
        _check_names(names, known, "model", where)
        return names
    families = sorted({model_spec(n).family for n in known})
    fams = _as_list(axes.get("family", families))
    _check_names(fams, families, "family", where)
    wanted = _as_list(axes.get("variant", list(VARIANTS)))
    _check_names(wanted, VARIANTS, "variant", where)
    names = []
    for fam in fams:
        for var in wanted:
            match = [n for n in known if model_spec(n).family == fam and model_spec(n).variant == var]
            if not match:
                notes.append(f"no {var} variant in the {fam} family")
            names += match
    return names


def _check_names(values: Iterable[Any], valid: Iterable[str], what: str, where: str) -> None:
    valid = list(valid)
    for v in values:
        if v not in valid:
            raise SpecError(f"{where}: unknown {what} {v!r}; valid: {', '.join(map(str, valid))}")


def _no_unknown(table: Any, allowed: Iterable[str], where: str) -> None:
    if not isinstance(table, Mapping):
        raise SpecError(f"{where} must be a table")
    unknown = sorted(set(table) - set(allowed))
    if unknown:
        raise SpecError(f"{where}: unknown key(s) {unknown}; valid: {', '.join(allowed)}")


def _as_list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, (list, tuple)) else [value]
