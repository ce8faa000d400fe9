"""The figures by name: each drawing function registers itself with its heading, in report order
(the order of registration). A draw function takes the run's view and returns (figure, caption,
notes), or raises `Skip` saying why the run has nothing for it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bench.analysis import RunView

Draw = Callable[[RunView], tuple[Any, str, list[str]]]


@dataclass(frozen=True)
class FigureSpec:
    name: str  # file stem under figures/
    heading: str  # the report's section heading
    draw: Draw


FIGURES: dict[str, FigureSpec] = {}


def figure(name: str, heading: str) -> Callable[[Draw], Draw]:
    def register(draw: Draw) -> Draw:
        if name in FIGURES:
            raise ValueError(f"figure {name!r} is registered twice")
        FIGURES[name] = FigureSpec(name, heading, draw)
        return draw

    return register
