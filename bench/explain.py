"""`deqbench explain`: every PAPER.md pair rebuilt from our modern measurement, one named factor
at a time, up to the paper's number; what no factor explains is left as the residual.

    deqbench explain [--preset paper-audit] [--out D]    # results.csv, explain.csv, report.md

The chain of a pair (`chains()`): ours-modern (the `paper-*` sizes, core mode) -> official sizes
-> the official implementation (element-wise dropout, auxiliary losses, weight dropout, solver
caps and empty_cache) -> chunked solve -> heads as the paper measured them (the baseline with
embedding and output layer, the DEQ without) -> device overhead (CUDA allocator cache, CUDA
context: GPU columns only) -> paper. Each step names the case of each side, so its bytes are a
results.csv row (`predicted` on a CPU; `torch_cuda` on a GPU) and its Δ the difference of two
rows; a step whose factor does not apply to a side keeps that side's case (Δ = 0) and says why.

One design decision of the heads (models/heads.py) matters here: the official adaptive and split
softmaxes gather the positions whose target falls in each tail cluster, so their shapes depend
on the data and fake tensors cannot follow them; ours normalise each tail cluster for every
position (recomputed in backward). So our heads' memory does not include the official code's
data-dependent tail memory, and that part of the paper's baselines stays in the residual.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.analysis import EXPLAIN, NOT_MEASURED
from bench.errors import SpecError
from bench.paper import GB, PAIRS, PaperPair
from bench.results import csv_text, number

if TYPE_CHECKING:
    import pandas as pd

    from bench.analysis import RunView
    from bench.spec import Case, Matrix

DEQ = "locuslab/deq@3fba434 DEQModel/"
XL = "kimiyoung/transformer-xl@44781ed pytorch/"
TN = "locuslab/trellisnet@ec1de0a TrellisNet/"
# The chain's steps in order: name -> (what changes, the config fields it may change).
FACTORS: dict[str, tuple[str, tuple[str, ...]]] = {
    "modern": ("ours, modern: paper-* sizes, core mode", ()),
    "sizes": ("official sizes", ("d_model", "nhid", "nout", "n_head", "d_head", "d_inner")),
    "dropout": ("element-wise dropout (Transformer-XL)", ("dropout_style", "dropatt")),
    "aux": ("auxiliary losses (TrellisNet)", ("aux_weight", "aux_every")),
    "weight-dropout": ("weight dropout (TrellisNet)", ("weight_dropout",)),
    "caps": ("DEQ iteration caps; empty_cache in every backward", ("max_iter", "b_max_iter", "empty_cache")),
    "chunk": ("chunked solve (subseq_len)", ("subseq_len",)),
    "heads": ("heads as the paper measured: baseline with embedding and output layer, DEQ without",
              ("mode", "head")),
}
# Device overhead, from the heads step's rows: name -> (what, source, how, the columns it needs).
DEVICE: dict[str, tuple[str, str, str, tuple[str, ...]]] = {
    "allocator-cache": ("CUDA caching allocator: reserved − allocated", "torch_cuda",
                        "reserved_bytes − peak_bytes", ("reserved_bytes",)),
    "cuda-context": ("CUDA context and memory outside the allocator (what nvidia-smi adds)", "nvml",
                     "nvml_process_bytes + nvml_process_baseline_bytes − reserved_bytes",
                     ("nvml_process_bytes", "nvml_process_baseline_bytes", "reserved_bytes")),
}
COLUMNS = (
    "pair", "order", "step", "kind", "factor", "baseline_case", "deq_case",
    "delta_baseline_bytes", "delta_deq_bytes", "baseline_bytes", "deq_bytes", "reduction",
    "residual_baseline_bytes", "residual_deq_bytes", "residual_reduction_points",
    "source", "evidence_baseline", "evidence_deq", "note",
)


# -- the chains ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Side:
    """One side of a step: a case of the paper protocol (seq 150, batch 15, one training step)."""

    model: str
    size: str
    depth: int | None = None
    mode: str = "core"
    config: tuple[tuple[str, Any], ...] = ()

    def but(self, *, size: str | None = None, mode: str | None = None, **config: Any) -> Side:
        """This side with another size or mode and these config fields set (None removes one)."""
        fields = {**dict(self.config), **config}
        return dataclasses.replace(self, size=size or self.size, mode=mode or self.mode,
                                   config=tuple(sorted((k, v) for k, v in fields.items() if v is not None)))

    def case(self) -> Case:
        from bench.paper import PROTOCOL
        from bench.spec import Case
        from models import model_spec

        spec = model_spec(self.model)
        return Case(model=self.model, family=spec.family, variant=spec.variant, size=self.size,
                    mode=self.mode, phase="train", seq_len=PROTOCOL["seq_len"], batch=PROTOCOL["batch"],
                    depth=self.depth, solver="broyden" if spec.is_deq else None,
                    backward="implicit" if spec.is_deq else None, overrides=self.config)


def side(model: str, size: str, depth: int | None = None, mode: str = "core", **config: Any) -> Side:
    return Side(model, size, depth, mode).but(**config)


@dataclass(frozen=True)
class Step:
    name: str  # a key of FACTORS
    baseline: Side
    deq: Side
    evidence_baseline: str  # the official file (and lines) the step follows, or why it does not apply
    evidence_deq: str


@dataclass(frozen=True)
class Chain:
    pair: PaperPair
    steps: tuple[Step, ...]
    same_head: tuple[Side, Side]  # like for like: both sides with the head the paper's baseline had

    @property
    def no_head(self) -> tuple[Side, Side]:
        """Like for like without heads: the last step before `heads` (both in core mode)."""
        last = [s for s in self.steps if s.name != "heads"][-1]
        return last.baseline, last.deq


def _chain(key: str, baseline: Side, deq: Side, changes: Mapping[str, tuple], same_head: Side) -> Chain:
    """A pair's steps in FACTORS order; changes[step] = (baseline side or None for unchanged,
    deq side or None, evidence baseline, evidence DEQ)."""
    pair = next(p for p in PAIRS if p.key == key)
    steps = [Step("modern", baseline, deq, "ours (bench/presets/paper.toml)", "ours (bench/presets/paper.toml)")]
    for name in list(FACTORS)[1:]:
        b, d, eb, ed = changes[name]
        if name == "heads" and b is not None and dict(b.config).get("head") in ("adaptive", "split"):
            eb += CLUSTERED
        steps.append(Step(name, b or steps[-1].baseline, d or steps[-1].deq, eb, ed))
    return Chain(pair, tuple(steps), (steps[-1].baseline, same_head))


NA = "does not apply to this side"
CLUSTERED = ("; ours normalises every tail cluster at every position (models/heads.py), the official code "
             "gathers the positions whose target falls in a tail cluster: that data-dependent memory is not "
             "in ours")
DEQ_CORE = "stays in core mode: the paper's DEQ peaks leave no room for embedding and output layer (PAPER.md)"
XL_CAPS = (f"{DEQ}run_wt103_deq_transformer.sh:30-31 (--f_thres 30 --b_thres 40), the repository's "
           f"one DEQ-Transformer script; {DEQ}modules/deq.py:72 (torch.cuda.empty_cache() in every backward)")
XL_CHUNK = (f"{DEQ}run_wt103_deq_transformer.sh:32 (--subseq_len 75); "
            f"models/transformers/deq_transformer_forward_backward.py:34-43, 67-76")
XL_DROPOUT = (f"{XL}mem_transformer.py:42-47 (nn.Dropout on the FFN hidden and output), :282 (attention "
              "output); run_wt103_base.sh:15-16 (dropout 0.1, dropatt 0.0)")
XL_TIED = (f"the DEQ code's weight-tied stack ({DEQ}models/transformers/deq_transformer.py:361-368) "
           "applies the DEQ cell with its variational dropout, as ours")
XL_NO_SIZE = "no official small size is published: ours kept"


def _xl_chains() -> list[Chain]:
    def deq_steps(deq: Side) -> tuple[Side, Side]:
        caps = deq.but(max_iter=30, b_max_iter=40, empty_cache=True)
        return caps, caps.but(subseq_len=75)

    chains = []
    deq = side("deq-transformer", "paper-small")
    caps, chunk = deq_steps(deq)
    for key, base, dropped, dropout_why in (
        ("xl-small-tied16", side("transformer-tied", "paper-small", 16), None, XL_TIED),
        ("xl-small-4", side("transformer", "paper-small", 4),
         side("transformer", "paper-small", 4, dropout_style="elementwise"), XL_DROPOUT),
    ):
        last = dropped or base
        chains.append(_chain(key, base, deq, {
            "sizes": (None, None, XL_NO_SIZE, XL_NO_SIZE),
            "dropout": (dropped, None, dropout_why, "variational, one mask per solve (the DEQ code's)"),
            "aux": (None, None, NA, NA), "weight-dropout": (None, None, NA, NA),
            "caps": (None, caps, NA, XL_CAPS), "chunk": (None, chunk, NA, XL_CHUNK),
            "heads": (last.but(mode="lm", head="adaptive"), None,
                      f"{XL}train.py:197-202 (adaptive input and softmax, cutoffs 20k/40k/200k; "
                      f"{DEQ}deq_transformer.py:237, 268 for the tied stack)", DEQ_CORE),
        }, chunk.but(mode="lm", head="adaptive")))
    base, deq = side("transformer", "paper-medium", 16), side("deq-transformer", "paper-medium")
    caps, chunk = deq_steps(deq)
    official = side("transformer", "paper-medium-official", 16)
    chains.append(_chain("xl-medium-16", base, deq, {
        "sizes": (None, None, f"{XL}run_wt103_base.sh:10-14 (16 × 410, 10 heads × 41, d_inner 2100): ours",
                  "no published script for the 43M model (d_inner 48,000 in run_wt103_deq_transformer.sh:17 "
                  "is the 70M adaptive one): ours kept"),
        "dropout": (official, None, XL_DROPOUT, "variational, one mask per solve (the DEQ code's)"),
        "aux": (None, None, NA, NA), "weight-dropout": (None, None, NA, NA),
        "caps": (None, caps, NA, XL_CAPS), "chunk": (None, chunk, NA, XL_CHUNK),
        "heads": (official.but(mode="lm", head="adaptive"), None,
                  f"{XL}train.py:197-202 (adaptive input and softmax, cutoffs 20k/40k/200k); run_wt103_base.sh:9",
                  DEQ_CORE),
    }, chunk.but(mode="lm", head="adaptive")))
    return chains


TN_CAPS = (f"{DEQ}run_wt103_deq_trellisnet.sh:22-23 (--f_thres 45 --b_thres 45); "
           f"modules/deq.py:72 (torch.cuda.empty_cache() in every backward)")
TN_CHUNK = (f"{DEQ}run_wt103_deq_trellisnet.sh:21 (--subseq_len 50, of its 100-token segments: 3 chunks "
            "of the paper protocol's 150); "
            "models/trellisnets/deq_trellisnet_forward_backward.py:31-38, 60-67")
TN_SPLIT = (f"{TN}word_WT103/word_wt103.py:181-185 (SplitCrossEntropyLoss, splits 2800/20000/76000), "
            ":286-294 (the aux losses through it)")


def _trellis_chains() -> list[Chain]:
    chains = []
    deq = side("deq-trellisnet", "paper-wt103")
    caps = deq.but(max_iter=45, b_max_iter=45, empty_cache=True)
    chunk = side("deq-trellisnet", "paper-wt103-official", empty_cache=True)
    for key, model in (("trellis-wt103", "trellisnet"), ("trellis-wt103-ckpt", "trellisnet-ckpt")):
        aux = side(model, "paper-wt103-official", 70)
        ckpt = "; no repository holds the checkpointed TrellisNet: the plain one's recipe" if "ckpt" in model else ""
        chains.append(_chain(key, side(model, "paper-wt103", 70), deq, {
            "sizes": (aux.but(aux_weight=0.0), None,
                      f"{TN}word_WT103/word_wt103.py:22-27 (emsize 512, nhid 1600, nout 512){ckpt}",
                      f"{DEQ}run_wt103_deq_trellisnet.sh:10-12 (d_embed 500, nhid 1500, nout 500): ours"),
            "dropout": (None, None, "TrellisNet's dropouts are variational already (as ours)", NA),
            "aux": (aux, None, f"{TN}word_WT103/word_wt103.py:71-74 (--aux 0.1 --aux_freq 25), :286-297; "
                               "trellisnet.py:156", NA),
            "weight-dropout": (None, None, f"{TN}word_WT103/word_wt103.py:47 (--wdrop 0.0)", NA),
            "caps": (None, caps, NA, TN_CAPS), "chunk": (None, chunk, NA, TN_CHUNK),
            "heads": (aux.but(mode="lm", head="split"), None, TN_SPLIT, DEQ_CORE),
        }, chunk.but(mode="lm", head="split")))
    base, deq = side("trellisnet", "paper-ptb", 60), side("deq-trellisnet", "paper-ptb")
    aux = base.but(aux_weight=0.05, aux_every=12)
    wdrop = side("trellisnet", "paper-ptb-official", 60)
    caps = deq.but(empty_cache=True)
    chunk = caps.but(subseq_len=50)
    no_ptb = f"no PTB DEQ code ({DEQ}train_trellisnet.py:24-26: --dataset choices ['wt103'])"
    chains.append(_chain("trellis-ptb", base, deq, {
        "sizes": (None, None, f"{TN}word_PTB/word_ptb.py:22-27 (emsize 400, nhid 1000, nout 400): ours",
                  f"{no_ptb}: ours kept"),
        "dropout": (None, None, "TrellisNet's dropouts are variational already (as ours)", NA),
        "aux": (aux, None, f"{TN}word_PTB/word_ptb.py:81-84 (--aux 0.05 --aux_freq 12)", NA),
        "weight-dropout": (wdrop, None, f"{TN}word_PTB/word_ptb.py:47 (--wdrop 0.5), model.py:7 (WeightDrop)", NA),
        "caps": (None, caps, NA, f"{no_ptb}; the published scripts all override its 50/80 defaults, so ours "
                                 f"(30/40) are kept; modules/deq.py:72 (empty_cache)"),
        "chunk": (None, chunk, NA, f"{no_ptb}; train_trellisnet.py:56 (its default --subseq_len 50)"),
        "heads": (wdrop.but(mode="lm", head="full"), None,
                  f"{TN}word_PTB/word_ptb.py:192 (nn.CrossEntropyLoss over the 10k vocabulary)", DEQ_CORE),
    }, chunk.but(mode="lm", head="full")))
    return chains


@functools.cache
def chains() -> tuple[Chain, ...]:
    """One chain per PAPER.md pair, in bench.paper.PAIRS order."""
    built = {c.pair.key: c for c in (*_trellis_chains(), *_xl_chains())}
    return tuple(built[p.key] for p in PAIRS)


def chain_cases() -> list[Case]:
    """Every case the chains need, once each, in chain order (the paper-audit preset's cases)."""
    sides = [s for c in chains() for step in c.steps for s in (step.baseline, step.deq)]
    sides += [s for c in chains() for s in c.same_head]
    return list(dict.fromkeys(s.case() for s in sides))


def check_matrix(matrix: Matrix) -> None:
    """SpecError unless the matrix holds every case of the chains (e.g. the paper-audit preset)."""
    have = {c.case_id for c in matrix.cases}
    missing = [c.case_id for c in chain_cases() if c.case_id not in have]
    if missing:
        raise SpecError(f"{matrix.name} lacks {len(missing)} of the {len(chain_cases())} cases the "
                        f"chains need (first: {missing[0]}); use --preset paper-audit")


# -- the table -----------------------------------------------------------------------------------
def explain_table(df: pd.DataFrame) -> list[dict[str, Any]]:
    """explain.csv's rows from a run's results (RunView.df): per pair its chain, the device steps,
    the paper and the like-for-like reductions. Bytes are the rows' peak_bytes (their
    memory_source); a case missing or failed leaves its cells empty and says so."""
    by_id = {row["case_id"]: row for row in df.to_dict("records")}
    out: list[dict[str, Any]] = []
    for chain in chains():
        pair = chain.pair
        rows: list[dict[str, Any]] = []
        previous: tuple | None = None
        for step in chain.steps:
            found = [_row(by_id, s.case()) for s in (step.baseline, step.deq)]
            after = tuple(_peak(r) for r in found)
            delta = None if previous is None else tuple(_minus(a, p) for a, p in zip(after, previous, strict=True))
            rows.append(_record(pair, len(rows), step.name, "chain", FACTORS[step.name][0],
                                (step.baseline.case().case_id, step.deq.case().case_id), after, _sources(found),
                                (step.evidence_baseline, step.evidence_deq), _missing(found), delta))
            previous = after
        last = chain.steps[-1]
        cases = (last.baseline.case().case_id, last.deq.case().case_id)
        found = [_row(by_id, c) for c in cases]
        for name, (what, source, how, needs) in DEVICE.items():
            extra = tuple(_device_bytes(name, r) for r in found)
            if any(e is None for e in extra):
                gone = [c for c in needs if not any(r is not None and number(r.get(c)) is not None for r in found)]
                rows.append(_record(pair, len(rows), name, "device", what, cases, previous, NOT_MEASURED, (how, how),
                                    f"needs a CUDA run: no {', '.join(gone or needs)} in these rows; residual unchanged"))
                continue
            previous = tuple(_plus(p, e) for p, e in zip(previous, extra, strict=True))
            rows.append(_record(pair, len(rows), name, "device", what, cases, previous, source, (how, how), delta=extra))
        rows.append(_record(pair, len(rows), "paper", "paper", f"{pair.label} (PAPER.md, table {pair.table})", ("", ""),
                            (pair.baseline_gb * GB, pair.deq_gb * GB), "paper", ("bench/paper.py", "bench/paper.py"),
                            "GB = 10⁹ bytes, as bench.paper reads the table"))
        for step, (b, d), what in (("same-head", chain.same_head, "both sides with the head"),
                                   ("no-head", chain.no_head, "both without heads (core mode)")):
            found = [_row(by_id, s.case()) for s in (b, d)]
            head = dict(b.config).get("head")
            rows.append(_record(pair, len(rows), step, "like-for-like", f"{what}" + (f" ({head})" if head else ""),
                                (b.case().case_id, d.case().case_id), tuple(_peak(r) for r in found), _sources(found),
                                ("the chain's last sides", "the chain's last sides"), _missing(found)))
        out += rows
    return out


def _record(pair: PaperPair, order: int, step: str, kind: str, factor: str, cases: tuple[str, str],
            after: tuple, source: str, evidence: tuple[str, str], note: str = "",
            delta: tuple | None = None) -> dict[str, Any]:
    """One explain.csv row: the bytes of each side after the step, its Δ, the reduction and the
    residual to the paper."""
    (b, d), paper = after, (pair.baseline_gb * GB, pair.deq_gb * GB)
    return {
        "pair": pair.key, "order": order, "step": step, "kind": kind, "factor": factor,
        "baseline_case": cases[0], "deq_case": cases[1],
        "delta_baseline_bytes": None if delta is None else delta[0],
        "delta_deq_bytes": None if delta is None else delta[1],
        "baseline_bytes": b, "deq_bytes": d, "reduction": _reduction(b, d),
        "residual_baseline_bytes": _minus(paper[0], b), "residual_deq_bytes": _minus(paper[1], d),
        "residual_reduction_points": _points(pair.reduction, _reduction(b, d)),
        "source": source, "evidence_baseline": evidence[0], "evidence_deq": evidence[1], "note": note,
    }


def _row(by_id: Mapping[str, Mapping[str, Any]], case: Case | str) -> Mapping[str, Any] | None:
    return by_id.get(case if isinstance(case, str) else case.case_id)


def _peak(row: Mapping[str, Any] | None) -> int | None:
    from bench.results import OK_STATUSES

    if row is None or row.get("status") not in OK_STATUSES:
        return None
    return number(row.get("peak_bytes"))


def _device_bytes(name: str, row: Mapping[str, Any] | None) -> int | None:
    if row is None or row.get("memory_source") != "torch_cuda":
        return None
    peak, reserved = number(row.get("peak_bytes")), number(row.get("reserved_bytes"))
    if name == "allocator-cache":
        return None if peak is None or reserved is None else reserved - peak
    process, baseline = number(row.get("nvml_process_bytes")), number(row.get("nvml_process_baseline_bytes"))
    return None if None in (process, baseline, reserved) else process + baseline - reserved


def _sources(rows: list[Mapping[str, Any] | None]) -> str:
    sources = sorted({str(r["memory_source"]) for r in rows if r is not None and _peak(r) is not None})
    return "/".join(sources) if sources else "missing"


def _missing(rows: list[Mapping[str, Any] | None]) -> str:
    notes = []
    for who, r in zip(("baseline", "DEQ"), rows, strict=True):
        if r is None:
            notes.append(f"{who} case not in results.csv")
        elif _peak(r) is None:
            notes.append(f"{who} case {r.get('status')}: {r.get('error') or 'no peak'}")
    return "; ".join(notes)


def _minus(a: Any, b: Any) -> Any:
    return None if a is None or b is None else a - b


def _plus(a: Any, b: Any) -> Any:
    return None if a is None or b is None else a + b


def _reduction(baseline: Any, deq: Any) -> float | None:
    return None if baseline is None or deq is None or not baseline else 1.0 - deq / baseline


def _points(paper: float, ours: float | None) -> float | None:
    return None if ours is None else 100.0 * (paper - ours)


def write_explain(run_dir: str | Path, rows: list[dict[str, Any]]) -> Path:
    path = Path(run_dir) / EXPLAIN
    path.write_text(csv_text(COLUMNS, rows, header=True))
    return path


def run(matrix: Matrix, out: Path, device: str, *, progress: bool, argv: list[str],
        resume: bool = False) -> RunView:
    """The matrix through the runner (predicted on a CPU, every instrument on a GPU), then
    explain.csv, figures and report.md; prints each pair's summary. `resume` finishes the cases
    `out` lacks (none, for a finished `deqbench run --preset paper-audit`). Returns the run's view."""
    from bench import plots, report
    from bench.analysis import RunView
    from bench.runner import RunOptions, run_matrix

    check_matrix(matrix)  # before anything is written: every case of the chains, or exit 2
    instruments = ("predicted",) if device == "cpu" else ()
    print(f"explaining {len(PAIRS)} paper pairs: {len(matrix.cases)} cases of {matrix.name} on {device} "
          f"({'predicted' if instruments else 'every instrument'}) -> {out}", flush=True)
    with plots.FigurePool.start() as pool:  # its helpers import matplotlib while the workers start
        run_matrix(matrix, out, RunOptions(device=device, instruments=instruments, progress=progress),
                   resume=resume, argv=argv)
        view = RunView.load(out)
        write_explain(out, explain_table(view.df))
        view = RunView.load(out)
        plots.plot_run(view, pool=pool)
    report.write_report(out)
    from bench.explain_text import summary_lines

    for line in summary_lines(view.explain):
        print(line)
    print(f"\nexplain.csv, figures and report.md: {out}")
    return view
