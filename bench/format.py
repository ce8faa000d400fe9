"""How numbers are shown in the terminal and in report.md (one place, so they agree)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from bench.results import number

DASH = "—"  # a value that does not exist (never shown as 0)


def fmt(value: Any, spec: str) -> str:
    """`format(value, spec)`, or a dash for a missing value."""
    v = number(value)
    return DASH if v is None else format(v, spec)


def format_bytes(n: Any) -> str:
    """Decimal units, as the paper's GB: 2.27 GB, 676 MB."""
    v = number(n)
    if v is None:
        return DASH
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(v) >= scale:
            return f"{v / scale:.2f} {unit}"
    return f"{v:.0f} B"


def format_pct(x: Any) -> str:
    v = number(x)
    return DASH if v is None else f"{100 * v:.1f}%"


def format_ratio(x: Any) -> str:
    v = number(x)
    return DASH if v is None else f"{v:.2f}×"


def format_nfe(forward: Any, backward: Any) -> str:
    f, b = number(forward), number(backward)
    if f is None:
        return DASH
    return f"{f:.0f}/{DASH if b is None else f'{b:.0f}'}"


def format_count(x: Any) -> str:
    return fmt(x, ",.0f")


def format_gb(x: Any) -> str:
    v = number(x)
    return DASH if v is None else f"{v:.1f} GB"


def md_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    def cell(v: Any) -> str:
        return str(v).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return lines
