"""Values of command-line arguments checked and converted (sizes, tolerances, --set KEY=VALUE)
for bench.cli; each bad value is a UserError: one line, exit 2."""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Iterator
from typing import Any

from bench.errors import UserError

BadInput = UserError  # what a command raises for bad input: one line, exit 2


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Inside: a ValueError (a registry's unknown name, a config's bad value) is bad input."""
    try:
        yield
    except UserError:
        raise
    except ValueError as err:
        raise UserError(str(err)) from None


def parse_size(text: str) -> int:
    """'2GB', '512MiB', '1.5G', '1000000' -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMgGtT]?)(i?)[bB]?\s*", text)
    if not m:
        raise BadInput(f"bad size {text!r}; use bytes or a unit, e.g. 2GB, 512MiB")
    value, unit, binary = float(m.group(1)), m.group(2).upper(), m.group(3)
    size = int(value * (1024 if binary else 1000) ** " KMGT".index(unit or " "))
    if value <= 0 or size < 1:
        raise BadInput(f"size must be positive, got {text!r}" if value <= 0 else
                       f"size must be at least 1 byte, got {text!r}")
    if size >= 2**63:
        raise BadInput(f"size too large: {text!r} is beyond 2**63 bytes")
    return size


def parse_tolerance(text: str, option: str = "tolerance") -> float:
    """'5%' or '0.05' -> 0.05; a bare 5 (500%? 5%?) is refused as ambiguous."""
    try:
        value = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        raise BadInput(f"bad tolerance {text!r}; use a percentage like 5% or a fraction like 0.05") from None
    if not math.isfinite(value) or value < 0:
        raise BadInput(f"tolerance must be a finite, non-negative number, got {text!r}")
    if value >= 1 and not text.endswith("%"):
        raise BadInput(f"{option} {text} would be {100 * value:g}%; write {text}% (or the fraction "
                       f"{value / 100:g}), or {100 * value:g}% if you mean it")
    return value


def parse_override(text: str) -> tuple[str, Any]:
    """'mem_len=32' -> ('mem_len', 32); values are TOML literals, else strings; none -> None."""
    from bench.compat import tomllib

    key, eq, raw = text.partition("=")
    if not eq or not key.strip():
        raise BadInput(f"bad --set {text!r}; use KEY=VALUE, e.g. --set mem_len=32")
    raw = raw.strip()
    if raw.lower() == "none":
        return key.strip(), None
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.strip(), value
