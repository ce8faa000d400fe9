"""Chunked solve (`subseq_len`, models/chunked.py) in both DEQ families: what it changes, exact
gradients per chunk, per-chunk stats and memory, and the switches that ride with it."""

import pytest
import torch

from bench.measure import LiveTensorCounter, Workload, measure
from models import build_model
from models import deq as deq_module
from models.chunked import chunk_spans
from models.solvers import UNSTOPPABLE_CHECK_EVERY
from models.transformer import SegmentMemory

B, T, SUB = 2, 12, 5  # three chunks: 5, 5, 2
SPANS = [(0, 5), (5, 10), (10, 12)]
TIGHT = dict(tol=1e-12, b_tol=1e-12, max_iter=120, b_max_iter=120)
REFERENCE = dict(backward="unrolled", tol=1e-13, max_iter=400)


def _model(name, **overrides):
    torch.manual_seed(0)
    return build_model(name, mode="core", **overrides)


def _inputs(model, dtype=torch.float32, seq=T):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, seq, model.config.d_model, generator=g, dtype=dtype)
    width = getattr(model.config, "nout", model.config.d_model)
    return x, torch.randn(B, seq, width, generator=g, dtype=dtype)


def _grads(name, memory=None, **overrides):
    """Loss, output, stats, the gradient of every parameter and of the inputs, in float64."""
    model = _model(name, **overrides).double()
    x, targets = _inputs(model, torch.float64)
    x.requires_grad_()
    out, _ = model(x, memory=memory)
    loss, stats = model(x, targets=targets, memory=memory)
    loss.backward()
    return out.detach(), stats, [p.grad for p in model.parameters()], x.grad


def test_chunk_spans():
    assert chunk_spans(12, None) == [(0, 12)]
    assert chunk_spans(12, 5) == SPANS
    assert chunk_spans(12, 12) == chunk_spans(12, 40) == [(0, 12)]
    with pytest.raises(ValueError, match="subseq_len must be >= 1"):
        _model("deq-trellisnet", subseq_len=0)


@pytest.mark.parametrize("name", ["deq-transformer", "deq-trellisnet"])
def test_implicit_gradient_per_chunk_matches_the_float64_unrolled_reference(name):
    memory = None
    if name == "deq-transformer":  # with a segment memory: chunk 0 attends to it, the others not
        model = _model(name, mem_len=4).double()
        memory = model(_inputs(model, torch.float64, seq=4)[0])[1].memory
    extra = dict(mem_len=4) if name == "deq-transformer" else {}
    _, stats, grads, x_grad = _grads(name, memory, subseq_len=SUB, **extra, **TIGHT)
    _, ref_stats, ref_grads, ref_x_grad = _grads(name, memory, subseq_len=SUB, **extra, **REFERENCE)
    assert stats.chunks == ref_stats.chunks == 3 and stats.chunk_len == [5, 5, 2]
    for start, stop in SPANS:  # the gradient reaching each chunk's inputs
        got, ref = x_grad[:, start:stop], ref_x_grad[:, start:stop]
        assert (got - ref).norm() <= 1e-6 * ref.norm(), (start, stop)
    for got, ref in zip(grads, ref_grads, strict=True):
        assert (got - ref).norm() <= 1e-6 * ref.norm()


def test_trellisnet_chunks_reach_the_whole_segment_equilibrium_and_gradient():
    whole, whole_stats, grads, x_grad = _grads("deq-trellisnet", **TIGHT)
    out, stats, chunk_grads, chunk_x_grad = _grads("deq-trellisnet", subseq_len=SUB, **TIGHT)
    torch.testing.assert_close(out, whole, rtol=0, atol=1e-9)
    torch.testing.assert_close(chunk_x_grad, x_grad, rtol=1e-7, atol=1e-10)
    for got, ref in zip(chunk_grads, grads, strict=True):
        torch.testing.assert_close(got, ref, rtol=1e-7, atol=1e-10)
    assert whole_stats.chunks == 1 and stats.chunks == 3


def test_transformer_chunks_attend_to_the_previous_chunk_only():
    # mem_len 0 and two chunks: chunk 1 sees all that precedes it, as the whole segment does
    whole, _, grads, x_grad = _grads("deq-transformer", **TIGHT)
    halves, stats, half_grads, half_x_grad = _grads("deq-transformer", subseq_len=6, **TIGHT)
    assert stats.chunks == 2
    torch.testing.assert_close(halves, whole, rtol=0, atol=1e-9)
    torch.testing.assert_close(half_x_grad, x_grad, rtol=1e-6, atol=1e-10)
    for got, ref in zip(half_grads, grads, strict=True):
        torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-10)
    # three chunks: the last one attends to chunk 1 and itself, not to chunk 0
    thirds, _, _, _ = _grads("deq-transformer", subseq_len=4, **TIGHT)
    torch.testing.assert_close(thirds[:, :8], whole[:, :8], rtol=0, atol=1e-9)
    assert (thirds[:, 8:] - whole[:, 8:]).abs().max() > 1e-4
    # ... exactly what an unchunked solve of chunk 2 with chunk 1 as its memory gives
    model = _model("deq-transformer", mem_len=4, **TIGHT).double()
    x, _ = _inputs(model, torch.float64)
    with torch.no_grad():
        by_hand, _ = model(x[:, 8:], memory=SegmentMemory(thirds[:, 4:8], x[:, 4:8]))
    torch.testing.assert_close(thirds[:, 8:], by_hand, rtol=0, atol=1e-9)


@pytest.mark.parametrize("name", ["deq-transformer", "deq-trellisnet"])
def test_chunks_have_their_own_solves_history_and_stats(name):
    caps = dict(tol=0.0, b_tol=0.0, max_iter=7, b_max_iter=4)  # every solve runs to its cap
    whole = _model(name, **caps)
    chunked = _model(name, subseq_len=SUB, **caps)
    chunked.load_state_dict(whole.state_dict())
    x, targets = _inputs(whole)
    for model, chunks in ((whole, 1), (chunked, 3)):
        loss, stats = model(x, targets=targets)
        loss.backward()
        assert stats.chunks == chunks and stats.chunk_nfe_forward == [7] * chunks  # caps reach the solver
        assert stats.chunk_nfe_backward == [4] * chunks
        assert stats.nfe_forward == 7 * chunks and stats.nfe_backward == 4 * chunks  # totals
        assert len(stats.chunk_workspace_bytes) == chunks
        assert stats.solver_workspace_bytes == max(stats.chunk_workspace_bytes)
    # Broyden's (u, v) history is sized by the chunk: 2 x (B, max_iter, chunk x width) floats
    width = 2 * whole.config.h_size if name == "deq-trellisnet" else whole.config.d_model
    history = [2 * B * 7 * n * width * 4 for n in (5, 5, 2)]
    # best iterate, and (tol 0: residuals read every UNSTOPPABLE_CHECK_EVERY iterations) a window
    # of three float32 rows per iteration and the best three
    residuals = (UNSTOPPABLE_CHECK_EVERY * 3 + 3) * B * 4
    tracker = [B * n * width * 4 + residuals for n in (5, 5, 2)]
    assert stats.chunk_workspace_bytes == [h + t for h, t in zip(history, tracker, strict=True)]


@pytest.mark.parametrize("name", ["deq-transformer", "deq-trellisnet"])
def test_history_is_freed_between_chunks(name):
    """A no-grad solve holds one chunk's Broyden history at a time: the chunked peak is lower
    than the whole segment's by at least the difference of their solver workspaces."""
    peaks, workspace = {}, {}
    for sub in (None, 4):
        model = _model(name, subseq_len=sub, tol=0.0, max_iter=20).eval()
        x, _ = _inputs(model, seq=16)
        counter = LiveTensorCounter()
        counter.track(model, x)
        with torch.no_grad(), counter:
            _, stats = model(x)
        peaks[sub], workspace[sub] = counter.peak_bytes, stats.solver_workspace_bytes
    fixed = (UNSTOPPABLE_CHECK_EVERY * 3 + 3) * B * 4  # the residual window: not per position
    assert workspace[4] - fixed == pytest.approx((workspace[None] - fixed) / 4, rel=1e-3)  # a quarter
    assert peaks[None] - peaks[4] >= workspace[None] - workspace[4]


@pytest.mark.parametrize("phase", ["train", "eval"])
@pytest.mark.parametrize("mode", ["core", "lm"])
@pytest.mark.parametrize("name", ["deq-transformer", "deq-trellisnet"])
def test_predicted_equals_tracked_for_a_chunked_deq(name, mode, phase):
    overrides = (("subseq_len", 8), ("tol", 0.0), ("b_tol", 0.0), ("max_iter", 4), ("b_max_iter", 4),
                 *((("mem_len", 6),) if name == "deq-transformer" else ()))
    row = measure(Workload(model=name, mode=mode, phase=phase, batch=2, seq_len=20, overrides=overrides),
                  ["tracked", "predicted"])
    assert row["predicted_bytes"] == row["tracked_bytes"]
    assert row["nfe_forward"] == 3 * 4  # three chunks of 8, 8, 4 at four iterations each


@pytest.mark.parametrize("name", ["deq-transformer", "deq-trellisnet"])
def test_empty_cache_switch_reaches_every_backward_on_cuda(name, monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append(1))
    for on_cuda, switch, expected in ((True, True, 3), (True, False, 0), (False, True, 0)):
        calls.clear()
        monkeypatch.setattr(deq_module, "_on_cuda", lambda t, on=on_cuda: on)
        model = _model(name, subseq_len=SUB, empty_cache=switch)
        x, targets = _inputs(model)
        loss, _ = model(x, targets=targets)
        assert not calls  # only in backward, as the official DummyDEQFunc.backward
        loss.backward()
        assert len(calls) == expected, (on_cuda, switch)


def test_official_sizes_carry_the_scripts_caps_and_chunks():
    with torch.device("meta"):
        transformer = build_model("deq-transformer", "paper-medium-official", mode="core")
        trellisnet = build_model("deq-trellisnet", "paper-wt103-official", mode="core")
    for model, caps, sub in ((transformer, (30, 40), 75), (trellisnet, (45, 45), 50)):
        assert (model.deq.max_iter, model.deq.b_max_iter) == caps and model.deq.subseq_len == sub
    assert build_model("deq-transformer", mode="core").deq.subseq_len is None  # default: unchunked
