"""Memory regression tests: this checkout's bytes against the committed baselines, and the scaling
laws that hold on any machine.

- CPU: every case of `results/baselines/cpu.json` (the smoke preset) measured in-process by the
  runner's own path, tracked bytes, FLOPs and parameter counts within 1% of the baseline, both
  ways (a number that fell means the baseline is stale); predicted bytes for a fast subset (every
  case with `-m slow`). The comparison is `bench.check.compare_cases`, the code behind
  `deqbench check`.
- Any machine: a DEQ's training peak does not grow with its effective depth (solver iterations)
  beyond Broyden's history; explicit peaks grow linearly with depth; the DEQ's saving over its
  weight-tied twin at a reference config stays above a floor.
- GPU (`-m gpu`): `torch_cuda` against `results/baselines/<device kind>.json` (5%) and against
  `predicted` (10%), over the gpu-validate preset's cases.
- The comparison bites: a model that keeps one extra activation per layer is caught.

After an intended memory change, refresh the baseline as results/baselines/README.md says.
"""

from __future__ import annotations

import functools
import gc
import math
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from bench.check import Finding, case_records, compare_cases, format_findings, load_baseline
from bench.env import device_kind
from bench.measure import Workload, measure
from bench.measure.case import case_row, measure_case_result
from bench.spec import Case, load_preset
from models import fixed_iterations, make_config, model_spec
from models.transformer import TransformerCell
from models.trellisnet import TrellisNetCell

BASELINES = Path(__file__).resolve().parents[2] / "results" / "baselines"
CPU_BASELINE = BASELINES / "cpu.json"
CPU_TOLERANCE = 0.01  # tracked and predicted bytes are exact on a CPU; 1% absorbs kernel choices
GPU_TOLERANCE = 0.05
PREDICTED_VS_CUDA = 0.10
REFRESH = "after an intended change, refresh the baseline as results/baselines/README.md says"
# Findings that fail a test. "improved" too: a deterministic number that fell means the baseline
# is stale, and a stale baseline lets the next regression through unseen.
FAILING = ("regression", "changed", "improved")
CPU_INSTRUMENTS = ("tracked", "flops")
# Predicted bytes (fake tensors) cost seconds a case. These cover both families, a DEQ's solve and
# an explicit stack's backward; every case runs with -m slow.
PREDICTED_CASES = (
    "transformer-tied/debug/core/train/T32/B2/L4",
    "trellisnet/debug/core/train/T32/B2/L4",
    "deq-transformer/debug/core/eval/T32/B2/broyden/implicit",
    "deq-trellisnet/debug/core/eval/T32/B2/broyden/implicit",
)

QUICK = load_preset("smoke")  # the preset cpu.json is made from
QUICK_CASES: dict[str, Case] = {c.case_id: c for c in QUICK.cases}
GPU_VALIDATE = load_preset("gpu-validate")  # the preset the GPU workflow runs and checks
GPU_CASES: dict[str, Case] = {c.case_id: c for c in GPU_VALIDATE.cases}


@functools.cache
def cpu_baseline() -> dict[str, Any]:
    """cpu.json, or a skip when this torch release is not the one it was made with."""
    if not CPU_BASELINE.exists():
        pytest.fail(f"{CPU_BASELINE} is missing; make it as results/baselines/README.md says")
    baseline = load_baseline(CPU_BASELINE)
    made_with = baseline["source"]["versions"]["torch"].split("+")[0]
    if made_with != torch.__version__.split("+")[0]:
        pytest.skip(f"cpu.json was made with torch {made_with}, this is torch {torch.__version__}: "
                    "its kernels may keep other tensors; refresh it (results/baselines/README.md)")
    return baseline


def _result(case: Case, device: str, settings: Any, instruments: tuple[str, ...]) -> dict[str, Any]:
    """What the runner's worker measures for `case` (here without timing), with measure()'s
    extras kept beside the row's columns."""
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()  # the allocator's peak must not include an earlier test's cache
    result = measure_case_result(case, device, settings, instruments)
    return {**result, **case.columns(), **case_row(result, device)}


def cpu_row(case_id: str, instruments: tuple[str, ...] = CPU_INSTRUMENTS) -> dict[str, Any]:
    return _cpu_row(case_id, instruments)  # one cache key however the default is passed


@functools.cache
def _cpu_row(case_id: str, instruments: tuple[str, ...]) -> dict[str, Any]:
    return _result(QUICK_CASES[case_id], "cpu", QUICK.settings, instruments)


def _with_eval_twin(case_id: str, cases: dict[str, Case], row_of) -> list[dict[str, Any]]:
    """The case's row and, for a training case, its eval twin's (for train_minus_eval_bytes)."""
    twin = case_id.replace("/train/", "/eval/", 1)
    return [row_of(case_id)] + ([row_of(twin)] if twin != case_id and twin in cases else [])


def memory_mismatches(baseline: dict[str, Any], rows: list[dict[str, Any]],
                      tolerance: float) -> list[Finding]:
    """What `deqbench check` flags for these rows at `tolerance`, growth and shrinkage alike.

    Rows measured here hold no timings (timing is `deqbench check`'s job, on a quiet machine):
    memory, FLOPs, parameter counts and status are compared."""
    run = case_records(rows)
    base = {case_id: baseline["cases"][case_id] for case_id in run if case_id in baseline["cases"]}
    run = {case_id: record for case_id, record in run.items() if case_id in base}
    found = compare_cases(base, run, tol_memory=tolerance, tol_speed=math.inf)
    return [f for f in found if f.verdict in FAILING]


def _explain(findings: list[Finding]) -> str:
    return "\n".join([*format_findings(findings), REFRESH])


# -- CPU: the committed baseline ------------------------------------------------------------------
def test_cpu_baseline_is_the_smoke_preset():
    baseline = cpu_baseline()
    assert baseline["device_kind"] == "cpu" and baseline["source"]["matrix"] == "smoke"
    assert set(baseline["cases"]) == set(QUICK_CASES), f"smoke and cpu.json list other cases; {REFRESH}"
    assert {record["status"] for record in baseline["cases"].values()} == {"ok"}


@pytest.mark.parametrize("case_id", sorted(QUICK_CASES))
def test_cpu_bytes_match_the_baseline(case_id):
    baseline = cpu_baseline()
    predicted = case_id in PREDICTED_CASES
    instruments = (*CPU_INSTRUMENTS, "predicted") if predicted else CPU_INSTRUMENTS
    rows = _with_eval_twin(case_id, QUICK_CASES,
                           lambda c: cpu_row(c, instruments if c == case_id else CPU_INSTRUMENTS))
    findings = memory_mismatches(baseline, rows, CPU_TOLERANCE)
    assert not findings, _explain(findings)
    assert rows[0]["tracked_bytes"] and (rows[0]["predicted_bytes"] or not predicted)


@pytest.mark.slow
@pytest.mark.parametrize("case_id", sorted(QUICK_CASES))
def test_cpu_predicted_bytes_match_the_baseline(case_id):
    row = _result(QUICK_CASES[case_id], "cpu", QUICK.settings, ("predicted",))
    findings = memory_mismatches(cpu_baseline(), [row], CPU_TOLERANCE)
    findings = [f for f in findings if f.metric == "predicted_bytes"]
    assert not findings, _explain(findings)


# -- the comparison bites: one extra activation per layer ----------------------------------------
class _KeepExtra(torch.autograd.Function):
    """Identity that saves a copy of its input for backward: one more activation a call."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x.clone())  # one state-sized tensor: (B, T, d) or (B, 2H, T)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad


def keep_one_extra_activation_per_layer(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every layer application (the transformer cell, the TrellisNet layer: explicit layers and
    DEQ cells alike) keeps one more state-sized tensor for backward."""
    forward = TransformerCell.forward
    monkeypatch.setattr(TransformerCell, "forward",
                        lambda self, z, inputs: _KeepExtra.apply(forward(self, z, inputs)))
    prepare = TrellisNetCell.prepare

    def prepare_keeping_more(self, x, memory=None):
        layer = prepare(self, x, memory)
        return lambda z: _KeepExtra.apply(layer(z))

    monkeypatch.setattr(TrellisNetCell, "prepare", prepare_keeping_more)


def _state_bytes(model: str, batch: int, seq_len: int, **config: Any) -> int:
    """Bytes of one layer's output state in float32: (B, T, d), or TrellisNet's (B, 2H, T)."""
    cfg = make_config(model, "debug", **config)
    width = 2 * cfg.h_size if model_spec(model).family == "trellisnet" else cfg.d_model
    return 4 * batch * seq_len * width


def test_one_extra_activation_per_layer_is_caught(monkeypatch):
    """The regression tests' comparison on models changed to keep one more activation per layer.
    Every training case whose memory that raises is flagged. Eval steps keep nothing for backward
    and per-layer checkpointing drops what a layer keeps (recomputing it), so those are unchanged
    and rightly not flagged. In a DEQ the change is one tensor beside Broyden's history (about 1%
    of the peak), flagged by `train_minus_eval_bytes`: what training adds to a forward pass."""
    baseline = cpu_baseline()
    ids = sorted(c for c in QUICK_CASES if "/T32/" in c)  # both phases, every model: seconds
    before = {c: cpu_row(c)["tracked_bytes"] for c in ids}
    assert not memory_mismatches(baseline, [cpu_row(c) for c in ids], CPU_TOLERANCE)

    keep_one_extra_activation_per_layer(monkeypatch)
    rows = {c: _result(QUICK_CASES[c], "cpu", QUICK.settings, ("tracked",)) for c in ids}
    findings = memory_mismatches(baseline, list(rows.values()), CPU_TOLERANCE)
    print("\n".join(format_findings(findings)))
    train = {c for c in ids if QUICK_CASES[c].phase == "train"}
    immune = {c for c in train if QUICK_CASES[c].model == "transformer-ckpt"}
    assert {f.case_id for f in findings} == train - immune, _explain(findings)
    assert {f.verdict for f in findings} == {"regression"}
    for case_id in ids:
        case = QUICK_CASES[case_id]
        grown = rows[case_id]["tracked_bytes"] - before[case_id]
        state = _state_bytes(case.model, case.batch, case.seq_len, **case.model_kwargs())
        if case_id not in train or case_id in immune:
            assert grown == 0, case_id
        elif case.is_deq:  # implicit backward keeps one application of f: one tensor more
            assert grown == state, case_id
            metrics = {f.metric for f in findings if f.case_id == case_id}
            assert "train_minus_eval_bytes" in metrics, case_id  # the peak too where it is > 1%
        elif case.model == "trellisnet-ckpt":  # a segment's extras while it is recomputed
            assert 0 < grown < case.depth * state, (case_id, grown)
        else:  # every layer's extra but the last one's (freed first in backward) at the peak
            assert (case.depth - 1) * state <= grown <= case.depth * state, (case_id, grown)


# -- scaling laws that hold on any machine --------------------------------------------------------
B, T = 2, 32
ITERATIONS = [4, 8, 16, 32, 64]  # a DEQ's effective depth: forward and backward solver steps
DEPTHS = [8, 16, 32, 64]
DEQS = ["deq-transformer", "deq-trellisnet"]


def _train_step(model: str, *, depth: int | None = None, **overrides: Any) -> dict[str, Any]:
    workload = Workload(model=model, phase="train", batch=B, seq_len=T, depth=depth,
                        overrides=tuple(sorted(overrides.items())))
    return measure(workload, ["tracked"])


def _slope(xs: list[int], ys: list[int]) -> float:
    """Least-squares slope of log y over log x."""
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly, strict=True)) / sum((a - mx) ** 2 for a in lx)


def _deq_sweep(model: str, solver: str) -> list[dict[str, Any]]:
    """Training steps with exactly n forward and n backward solver iterations (no early stop)."""
    with fixed_iterations():
        rows = [_train_step(model, solver=solver, max_iter=n, b_max_iter=n) for n in ITERATIONS]
    assert [(r["nfe_forward"], r["nfe_backward"]) for r in rows] == [(n, n) for n in ITERATIONS]
    return rows


@pytest.mark.parametrize("solver", ["anderson", "fixed_point"])
@pytest.mark.parametrize("model", DEQS)
def test_deq_training_peak_is_flat_in_solver_iterations(model, solver):
    """A DEQ's effective depth is its iteration count. Implicit backward keeps one application of
    f however many there are, and these solvers' workspaces do not grow with them: the log-log
    slope of the training peak over iterations (4 to 64, forward and backward) is below 0.1."""
    peaks = [r["tracked_bytes"] for r in _deq_sweep(model, solver)]
    assert _slope(ITERATIONS, peaks) < 0.1, peaks


@pytest.mark.parametrize("model", DEQS)
def test_broyden_training_peak_grows_by_exactly_its_history(model):
    """Broyden preallocates its low-rank history U, V (B, cap, D) for its iteration cap: the peak
    grows by exactly 2·B·D·4 bytes an iteration of cap, and without that history it is flat."""
    rows = _deq_sweep(model, "broyden")
    peaks = [r["tracked_bytes"] for r in rows]
    history = [r["solver_workspace_bytes"] for r in rows]
    per_iteration = 2 * _state_bytes(model, B, T)  # U and V rows: 2 x (B, D) float32
    for n, peak, workspace in zip(ITERATIONS, peaks, history, strict=True):
        assert workspace - history[0] == (n - ITERATIONS[0]) * per_iteration
        assert peak - peaks[0] == workspace - history[0]
    assert _slope(ITERATIONS, peaks) > 0.1  # the history is memory the DEQ pays for
    assert _slope(ITERATIONS, [p - w for p, w in zip(peaks, history, strict=True)]) < 0.1


@pytest.mark.parametrize("model", ["transformer-tied", "transformer", "trellisnet"])
def test_explicit_training_peak_is_linear_in_depth(model):
    """Every layer keeps its activations for backward: log-log slope 0.8–1.2 over depth 8 to 64
    (below 1 by what does not grow with depth: inputs, the loss, a tied model's parameters)."""
    peaks = [_train_step(model, depth=d)["tracked_bytes"] for d in DEPTHS]
    assert 0.8 <= _slope(DEPTHS, peaks) <= 1.2, peaks


def test_checkpointed_transformer_keeps_one_input_per_layer():
    """Per-layer checkpointing keeps each layer's input (B, T, d) and nothing else per layer."""
    peaks = {d: _train_step("transformer-ckpt", depth=d)["tracked_bytes"] for d in (8, 16)}
    assert peaks[16] - peaks[8] == 8 * _state_bytes("transformer-ckpt", B, T)


# DEQ-Transformer against its 16-layer weight-tied twin, the smoke preset's largest debug cases
# (seq 128, batch 2): 64.8% less at the training peak with torch 2.13.0.
REFERENCE = ("deq-transformer/debug/core/train/T128/B2/broyden/implicit",
             "transformer-tied/debug/core/train/T128/B2/L16")
REFERENCE_FLOOR = 0.60


def test_memory_reduction_at_the_reference_config():
    deq, tied = (cpu_row(case_id)["tracked_bytes"] for case_id in REFERENCE)
    assert 1 - deq / tied > REFERENCE_FLOOR, (deq, tied)


# The paper's protocol (seq 150, batch 15, core mode), predicted without allocating: measured
# 67.8% (transformer small vs 16 tied layers; paper 83.8%) and 50.0% (TrellisNet PTB vs 60 layers;
# paper 85.9%) with torch 2.13.0. Broyden's history keeps ours below the paper's.
PAPER_PAIRS = [
    ("deq-transformer", "transformer-tied", "paper-small", 16, 0.60),
    ("deq-trellisnet", "trellisnet", "paper-ptb", 60, 0.45),
]


@pytest.mark.slow
@pytest.mark.parametrize(("deq", "explicit", "size", "depth", "floor"), PAPER_PAIRS)
def test_memory_reduction_at_the_paper_protocol(deq, explicit, size, depth, floor):
    def predicted(model: str, depth: int | None) -> int:
        workload = Workload(model=model, size=size, batch=15, seq_len=150, depth=depth)
        return measure(workload, ["predicted"])["predicted_bytes"]

    deq_bytes, explicit_bytes = predicted(deq, None), predicted(explicit, depth)
    assert 1 - deq_bytes / explicit_bytes > floor, (deq_bytes, explicit_bytes)


# -- GPU: torch_cuda against the runner's baseline and against predicted -------------------------
@functools.cache
def gpu_baseline() -> dict[str, Any]:
    # DEQBENCH_GPU_BASELINE: another file, e.g. the one tools/gpu_check.sh has just made by running
    # the preset in fresh workers, which these in-process measurements then have to agree with
    path = Path(os.environ.get("DEQBENCH_GPU_BASELINE") or BASELINES / f"{device_kind('cuda')}.json")
    if not path.exists():
        pytest.skip(f"no baseline for this GPU ({path.name}): run the gpu-validate preset and "
                    "commit one (results/baselines/README.md)")
    return load_baseline(path)


@functools.cache
def cuda_row(case_id: str) -> dict[str, Any]:
    instruments = ("torch_cuda", "tracked", "predicted", "flops")
    return _result(GPU_CASES[case_id], "cuda", GPU_VALIDATE.settings, instruments)


@pytest.mark.gpu
@pytest.mark.parametrize("case_id", sorted(GPU_CASES))
def test_torch_cuda_matches_the_gpu_baseline(case_id):
    baseline = gpu_baseline()
    rows = _with_eval_twin(case_id, GPU_CASES, cuda_row)
    assert rows[0]["memory_source"] == "torch_cuda"
    # Reserved bytes depend on the caching allocator's history in this process: the workflow's
    # `deqbench check` compares them, case by case in fresh processes.
    findings = [f for f in memory_mismatches(baseline, rows, GPU_TOLERANCE)
                if f.metric != "reserved_bytes"]
    assert not findings, _explain(findings)


@pytest.mark.gpu
@pytest.mark.parametrize("case_id", sorted(GPU_CASES))
def test_torch_cuda_within_10_percent_of_predicted(case_id):
    row = cuda_row(case_id)
    model_peak = row["peak_bytes"] - row["cuda_preexisting_bytes"]  # less cuBLAS's workspace
    assert row["predicted_cuda_bytes"] == pytest.approx(model_peak, rel=PREDICTED_VS_CUDA), row
