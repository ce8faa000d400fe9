"""Model registry: every model, DEQ or explicit, is built by name from a named size.

    build_model("deq-transformer", "debug", mode="core")
    build_model("transformer", "paper-small", depth=16, d_inner=1024)

A model family registers a `ModelSpec` per model name: its frozen config dataclass, the named
sizes (config keyword dicts) and a builder `(config, mode) -> nn.Module`. Explicit models have a
`depth` config field; DEQs have none (their depth is the solver's business).
"""

from __future__ import annotations

import dataclasses
import importlib
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn

from models.heads import resolve_head

MODES = ("lm", "core")
VARIANTS = ("deq", "untied", "tied", "ckpt", "hf")


@dataclass(frozen=True)
class ModelSpec:
    name: str
    family: str  # "transformer" | "trellisnet" | ...
    variant: str  # one of VARIANTS: how depth is realised
    config: type  # a frozen, keyword-only dataclass
    sizes: Mapping[str, Mapping[str, Any]]
    build: Callable[[Any, str], nn.Module]
    description: str = ""

    @property
    def is_deq(self) -> bool:
        return self.variant == "deq"


MODELS: dict[str, ModelSpec] = {}
# Modules that register models when imported; loaded on first use of the registry so that
# `models` and `baselines` can import each other's building blocks without import cycles.
FAMILY_MODULES: list[str] = [
    "models.transformer",
    "baselines.transformer",
    "baselines.hf",
    "models.trellisnet",
    "baselines.trellisnet",
]
_loaded = False


def _load_families() -> None:
    """Import the built-in families, then any plugin modules named (comma-separated) in
    $DEQBENCH_PLUGINS: a user's own models register the same way and reach worker processes."""
    global _loaded
    if not _loaded:
        _loaded = True
        plugins = [m.strip() for m in os.environ.get("DEQBENCH_PLUGINS", "").split(",") if m.strip()]
        for module in [*FAMILY_MODULES, *plugins]:
            importlib.import_module(module)


def register_model(spec: ModelSpec) -> ModelSpec:
    if spec.variant not in VARIANTS:
        raise ValueError(f"model {spec.name!r}: unknown variant {spec.variant!r}; valid: {VARIANTS}")
    if "debug" not in spec.sizes:
        raise ValueError(f"model {spec.name!r} needs a CPU-sized 'debug' size")
    MODELS[spec.name] = spec
    return spec


def list_models() -> list[str]:
    _load_families()
    return sorted(MODELS)


def model_spec(name: str) -> ModelSpec:
    _load_families()
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid models: {', '.join(list_models())}")
    return MODELS[name]


def make_config(name: str, size: str = "debug", *, depth: int | None = None, **overrides: Any) -> Any:
    """The frozen config of `name` at `size`, with `depth` and type-checked field overrides."""
    spec = model_spec(name)
    if size not in spec.sizes:
        raise ValueError(f"unknown size {size!r} for {name}; valid sizes: {', '.join(spec.sizes)}")
    fields = {f.name: f for f in dataclasses.fields(spec.config)}
    if depth is not None:
        if "depth" not in fields:
            raise ValueError(f"{name} is a DEQ and takes no depth (its depth is the solver's)")
        overrides["depth"] = depth
    unknown = set(overrides) - set(fields)
    if unknown:
        raise ValueError(
            f"{name} has no config field(s) {sorted(unknown)}; valid: {', '.join(sorted(fields))}"
        )
    values = {**spec.sizes[size], **overrides}
    for key in overrides:
        _check_type(name, key, values[key], fields[key])
    return spec.config(**values)


def build_model(
    name: str, size: str = "debug", *, mode: str = "lm", depth: int | None = None, **overrides: Any
) -> nn.Module:
    """Build a registered model. `mode="lm"` takes token ids (B, T); `mode="core"` takes embedded
    inputs (B, T, config.d_model), with no embedding or softmax (the paper's memory protocol).
    A config with a `head` field gets the head the mode implies (models.heads.resolve_head:
    core -> none, lm -> full unless set), so `model.config.head` says what was built."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; valid modes: {', '.join(MODES)}")
    spec = model_spec(name)
    config = make_config(name, size, depth=depth, **overrides)
    if any(f.name == "head" for f in dataclasses.fields(config)):
        config = dataclasses.replace(config, head=resolve_head(config.head, mode))
    model = spec.build(config, mode)
    model.spec = spec
    return model


def _check_type(model: str, key: str, value: Any, field: dataclasses.Field) -> None:
    expected = field.type if isinstance(field.type, str) else getattr(field.type, "__name__", "")
    checks = {"int": int, "float": (int, float), "bool": bool, "str": str}
    kind = checks.get(expected.split("|")[0].strip())
    if kind is None or (value is None and "None" in expected):
        return
    if (isinstance(value, bool) and kind is not bool) or not isinstance(value, kind):
        raise ValueError(f"{model}.{key} must be {expected}, got {value!r}")
    if kind in (int, (int, float)) and not isinstance(value, bool) and value < 0:
        raise ValueError(f"{model}.{key} must not be negative, got {value!r}")
