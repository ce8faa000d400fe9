"""The verdict of a run: one line per DEQ x baseline kind, computed from the rows.

For each group of training-step pairs (a DEQ against one kind of explicit baseline at one size,
mode and batch, one memory source) it says: the best reduction and where (T, L); at each
sequence length, the depth from which the DEQ saves memory (the crossover); whether and where
the paper's 88% is reached; and the slowdown and NFE at the best point. The same lines end
`deqbench run`, open report.md and are copied into the README from the committed default run.

Crossovers are interpolated, not guessed: an explicit model's training peak is affine in its
depth (every layer keeps the same activations), so between the deepest swept depth where the
DEQ still needs more memory and the next one, where it needs less, the baseline's peak is a
straight line and the depth at which it equals the DEQ's peak (or the DEQ's peak / (1 - 88%))
is read off it. Beyond the deepest swept depth only weight-tied and checkpointed baselines are
extended, along the line through their two deepest points (their peak is exactly affine in
depth: one layer's weights, every layer's activations or checkpoints), and such a depth is
labelled "extrapolated"; an untied baseline resized to the DEQ's parameters is not affine, and
is never extended.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd

from bench.analysis import RunView
from bench.paper import CLAIM

GROUP = ["family", "deq_model", "baseline_variant", "matched", "size", "mode", "batch", "solver",
         "backward", "memory_source"]
KINDS = {"untied": "untied", "tied": "weight-tied", "ckpt": "checkpointed", "hf": "HF GPT-2"}
KIND_ORDER = list(KINDS)
AFFINE_KINDS = ("tied", "ckpt")  # peak exactly affine in depth: a crossover may be extrapolated
MAX_EXTRAPOLATION = 16  # times the deepest swept depth; beyond it the level is "not reached"
DEQ_NAMES = {"transformer": "DEQ-Transformer", "trellisnet": "DEQ-TrellisNet"}


@dataclass(frozen=True)
class Threshold:
    """Where, at one sequence length, the DEQ's reduction reaches a level (0: it saves memory at
    all; 0.88: the paper's claim), in explicit depth."""

    seq_len: int
    depth: float | None  # interpolated depth; None when the level is not reached in the sweep
    from_depth: int | None  # the smallest swept depth from which every deeper one reaches it
    swept: tuple[int, ...]  # the depths with both peaks at this sequence length
    extrapolated: bool = False  # depth lies beyond the sweep, on the baseline's affine peak

    @property
    def found(self) -> bool:
        return self.depth is not None

    @property
    def everywhere(self) -> bool:
        return self.from_depth is not None and self.from_depth == self.swept[0]

    def where(self) -> str:
        """'L≈14 at T=32', 'L≤4 at T=32' (already at the shallowest depth swept), 'L≈55
        (extrapolated) at T=32'."""
        assert self.depth is not None
        at = f"L≤{self.swept[0]}" if self.everywhere else f"L≈{_depth(self.depth)}"
        return f"{at}{' (extrapolated)' if self.extrapolated else ''} at T={self.seq_len}"


@dataclass(frozen=True)
class Verdict:
    family: str
    deq_model: str
    kind: str  # baseline variant: untied | tied | ckpt | hf
    matched: bool  # an untied baseline resized to the DEQ's parameter count (at each depth)
    size: str
    mode: str
    batch: int
    memory_source: str
    best_reduction: float
    best_seq_len: int
    best_depth: int
    crossovers: tuple[Threshold, ...]  # level 0, per sequence length
    claims: tuple[Threshold, ...]  # level 0.88, per sequence length
    slowdown: float | None  # DEQ step / baseline step at the best point (None: not timed)
    nfe_forward: float | None
    nfe_backward: float | None

    @property
    def claim_reached(self) -> bool:
        return any(c.found for c in self.claims)

    def line(self) -> str:
        name = DEQ_NAMES.get(self.family, self.deq_model)
        kind = KINDS.get(self.kind, self.kind) + (", parameter-matched" if self.matched else "")
        head = f"{name} vs {kind} ({self.size}, {self.memory_source})"
        parts = [f"best {_pct(self.best_reduction)} at T={self.best_seq_len}, L={self.best_depth}",
                 "saves memory " + _join(self.crossovers)]
        if self.claim_reached:
            parts.append(f"{100 * CLAIM:.0f}% " + _join(self.claims))
        else:
            parts.append(f"{100 * CLAIM:.0f}% not reached")
        if self.slowdown is not None:
            nfe = _nfe(self.nfe_forward, self.nfe_backward)
            speed = (f"{self.slowdown:.2f}× slower" if self.slowdown >= 1
                     else f"{1 / self.slowdown:.2f}× faster")
            parts.append(f"{speed} there" + (f" at NFE {nfe}" if nfe else ""))
        elif self.nfe_forward is not None:
            parts.append(f"NFE {_nfe(self.nfe_forward, self.nfe_backward)} there (not timed)")
        return f"{head}: " + "; ".join(parts) + "."


def verdicts(view: RunView) -> list[Verdict]:
    """One verdict per group of training pairs with at least one pair where both peaks exist."""
    p = view.train_pairs
    if p.empty:
        return []
    p = p[p["reduction"].notna()]
    p = p.assign(matched=(p["baseline_variant"] == "untied") & p["baseline_overrides"].notna())
    out = []
    for key, g in p.groupby(GROUP, dropna=False, sort=False):
        out.append(_verdict(dict(zip(GROUP, key, strict=True)), g))
    order = {k: i for i, k in enumerate(KIND_ORDER)}
    return sorted(out, key=lambda v: (v.family, _size_order(v.size), order.get(v.kind, 99),
                                      not v.matched, v.mode, v.batch, v.memory_source))


def verdict_lines(view: RunView) -> list[str]:
    return [v.line() for v in verdicts(view)]


def threshold(rows: pd.DataFrame, level: float, affine: bool = False) -> Threshold:
    """Where (in depth) the reduction reaches `level` for one sequence length's pairs; `affine`:
    the baseline's peak is affine in depth, so past the sweep it is extended (extrapolated)."""
    rows = rows.sort_values("depth")
    depths = [int(d) for d in rows["depth"]]
    base = rows["baseline_peak_bytes"].astype(float).tolist()
    deq = float(rows["deq_peak_bytes"].iloc[0])
    target = deq / (1.0 - level)  # reduction >= level  <=>  baseline peak >= target
    reached = [b >= target for b in base]
    first = len(reached)
    while first > 0 and reached[first - 1]:
        first -= 1
    seq_len = int(rows["seq_len"].iloc[0])
    if first == len(reached):  # not reached at the deepest swept depth
        if affine and len(depths) >= 2 and base[-1] > base[-2]:
            (l0, b0), (l1, b1) = (depths[-2], base[-2]), (depths[-1], base[-1])
            depth = l1 + (target - b1) / (b1 - b0) * (l1 - l0)
            if depth <= MAX_EXTRAPOLATION * l1:
                return Threshold(seq_len, depth, None, tuple(depths), extrapolated=True)
        return Threshold(seq_len, None, None, tuple(depths))
    if first == 0:
        return Threshold(seq_len, float(depths[0]), depths[0], tuple(depths))
    (l0, b0), (l1, b1) = (depths[first - 1], base[first - 1]), (depths[first], base[first])
    depth = l0 + (target - b0) / (b1 - b0) * (l1 - l0)  # b0 < target <= b1: affine in depth
    return Threshold(seq_len, depth, depths[first], tuple(depths))


def _verdict(key: dict, g: pd.DataFrame) -> Verdict:
    best = g.loc[g["reduction"].idxmax()]
    # several baseline models of one kind at one depth (none today): the thresholds use the
    # first; the best point is over all
    per_t = [h.drop_duplicates("depth") for _, h in g.groupby("seq_len", sort=True)]
    affine = key["baseline_variant"] in AFFINE_KINDS
    return Verdict(
        family=key["family"], deq_model=key["deq_model"], kind=key["baseline_variant"],
        matched=bool(key["matched"]),
        size=key["size"], mode=key["mode"], batch=int(key["batch"]),
        memory_source=key["memory_source"] if isinstance(key["memory_source"], str) else "unknown",
        best_reduction=float(best["reduction"]), best_seq_len=int(best["seq_len"]),
        best_depth=int(best["depth"]),
        crossovers=tuple(threshold(h, 0.0, affine) for h in per_t),
        claims=tuple(threshold(h, CLAIM, affine) for h in per_t),
        slowdown=_finite(best["slowdown"]), nfe_forward=_finite(best["nfe_forward"]),
        nfe_backward=_finite(best["nfe_backward"]),
    )


def _join(thresholds: Sequence[Threshold]) -> str:
    if all(t.everywhere for t in thresholds):
        depths = sorted({t.swept[0] for t in thresholds})
        where = ", ".join(f"T={t.seq_len}" for t in thresholds)
        return f"at every depth swept (L≥{depths[0]}, {where})"
    if not any(t.found for t in thresholds):
        deepest = max(t.swept[-1] for t in thresholds)
        return f"at no depth swept (up to L={deepest}, T={', '.join(str(t.seq_len) for t in thresholds)})"
    reached = [t for t in thresholds if t.found]
    missed = [t for t in thresholds if not t.found]
    text = "from " + ", ".join(t.where() for t in reached)
    if missed:
        text += "; not by " + ", ".join(f"L={t.swept[-1]} at T={t.seq_len}" for t in missed)
    return text


def _finite(x: object) -> float | None:
    try:
        v = float(x)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _depth(d: float) -> str:
    return f"{d:.0f}" if d >= 10 else f"{d:.1f}"


def _nfe(forward: float | None, backward: float | None) -> str:
    if forward is None:
        return ""
    return f"{forward:.0f}" + (f"/{backward:.0f}" if backward is not None else "")


def _size_order(size: str) -> tuple[int, str]:
    """Measured sizes first (debug, small), then the paper's."""
    return (1 if size.startswith("paper") else 0, size)
