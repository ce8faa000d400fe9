"""The verdict on a synthetic results.csv whose answer is known by construction: every number in
every line is checked against values worked out by hand here."""

import pytest

from bench.analysis import RunView
from bench.results import append_row
from bench.verdict import threshold, verdict_lines, verdicts

DEQ = {"family": "transformer", "model": "deq-transformer", "variant": "deq", "size": "small",
       "mode": "core", "phase": "train", "batch": 2, "solver": "broyden", "backward": "implicit",
       "status": "ok", "memory_source": "tracked"}
# Baseline peaks affine in depth, so the crossovers are known exactly:
# T=64:  DEQ 100; tied 50 + 12.5 (L - 4): equal at L = 8; 88% needs 833.3 > 800 at L=64: never.
# T=256: DEQ 200; tied 100, 400 at L=4, 16, then 2000 at L=64: equal at L = 4 + 100/25 = 8;
#        88% needs 1666.7: L = 16 + (1666.7 - 400) / (1600 / 48) = 54.
# untied: below the DEQ's peak nowhere (saves at every depth); ckpt: above it nowhere in the
# sweep. Past the sweep tied and ckpt peaks are extended along their two deepest points
# (extrapolated): tied T=64 reaches 88% (833.3) at L = 64 + 33.3 / 12.5 = 66.7; ckpt (slope
# 40/48 per layer) saves memory from L = 64 + 10 / (40/48) = 76 and reaches 88% at
# L = 64 + 743.3 / (40/48) = 956 (within 16 x 64 = 1024 layers; beyond it: not reached).
PEAKS = {
    ("tied", 64): {4: 50, 16: 200, 64: 800},
    ("tied", 256): {4: 100, 16: 400, 64: 2000},
    ("untied", 64): {4: 120, 16: 300, 64: 900},
    ("ckpt", 64): {4: 40, 16: 50, 64: 90},
}
DEQ_PEAK = {64: 100, 256: 200}
MODEL = {"tied": "transformer-tied", "untied": "transformer", "ckpt": "transformer-ckpt"}


def row(**fields):
    r = {**fields}
    r["case_id"] = "/".join(str(fields.get(k)) for k in ("model", "seq_len", "depth", "phase"))
    return r


@pytest.fixture
def view(tmp_path):
    for t, peak in DEQ_PEAK.items():
        append_row(tmp_path, row(**DEQ, seq_len=t, peak_bytes=peak, step_s_median=0.4 * t / 64,
                                 nfe_forward=12.0, nfe_backward=20.0))
    for (kind, t), peaks in PEAKS.items():
        for depth, peak in peaks.items():
            matched = {"overrides": {"d_inner": 1000 // depth}} if kind == "untied" else {}
            append_row(tmp_path, row(**{**DEQ, "variant": kind, "model": MODEL[kind], "solver": None,
                                        "backward": None}, seq_len=t, depth=depth, peak_bytes=peak,
                                     **matched,
                                     step_s_median=(0.001 if kind == "ckpt" else 0.01) * depth * t / 64))
    return RunView.load(tmp_path)


def test_crossovers_and_the_claim_are_interpolated_in_depth(view):
    by_kind = {v.kind: v for v in verdicts(view)}
    assert list(by_kind) == ["untied", "tied", "ckpt"]  # the report's order of kinds
    tied = by_kind["tied"]
    assert tied.best_reduction == pytest.approx(0.9) and (tied.best_seq_len, tied.best_depth) == (256, 64)
    (c64, c256) = tied.crossovers
    assert (c64.seq_len, c64.from_depth, c64.depth) == (64, 16, pytest.approx(8.0))
    assert (c256.seq_len, c256.from_depth, c256.depth) == (256, 16, pytest.approx(8.0))
    (k64, k256) = tied.claims
    assert k64.from_depth is None and k64.extrapolated and k64.depth == pytest.approx(64 + (100 / 0.12 - 800) / 12.5)
    assert k256.from_depth == 64 and k256.depth == pytest.approx(16 + (200 / 0.12 - 400) / (1600 / 48))
    # slowdown at the best point: DEQ 0.4 * 4 = 1.6 s against 0.01 * 64 * 4 = 2.56 s
    assert tied.slowdown == pytest.approx(1.6 / 2.56)
    assert (tied.nfe_forward, tied.nfe_backward) == (12.0, 20.0)


def test_lines_say_every_number(view):
    lines = verdict_lines(view)
    assert lines == [
        "DEQ-Transformer vs untied, parameter-matched (small, tracked): best 88.9% at T=64, L=64; saves memory at "
        "every depth swept (L≥4, T=64); 88% from L≈59 at T=64; 1.60× faster there at NFE 12/20.",
        "DEQ-Transformer vs weight-tied (small, tracked): best 90.0% at T=256, L=64; saves memory "
        "from L≈8.0 at T=64, L≈8.0 at T=256; 88% from L≈67 (extrapolated) at T=64, L≈54 at T=256; "
        "1.60× faster there at NFE 12/20.",
        "DEQ-Transformer vs checkpointed (small, tracked): best -11.1% at T=64, L=64; saves memory "
        "from L≈76 (extrapolated) at T=64; 88% from L≈956 (extrapolated) at T=64; 6.25× slower there "
        "at NFE 12/20.",
    ]


def test_untied_claim_interpolation():
    # untied at T=64: 88% needs 833.3, between 300 (L=16) and 900 (L=64): L = 16 + 533.3 / 12.5
    import pandas as pd

    rows = pd.DataFrame({"depth": [4, 16, 64], "baseline_peak_bytes": [120, 300, 900],
                         "deq_peak_bytes": [100] * 3, "seq_len": [64] * 3})
    t = threshold(rows, 0.88)
    assert t.from_depth == 64 and t.depth == pytest.approx(16 + (100 / 0.12 - 300) / 12.5)
    assert threshold(rows, 0.0).everywhere
    # an untied (resized) baseline is not affine in depth: never extended past the sweep
    assert threshold(rows, 0.95).depth is None and threshold(rows, 0.95, affine=True).extrapolated


def test_extrapolation_stops_at_sixteen_times_the_sweep():
    import pandas as pd

    rows = pd.DataFrame({"depth": [4, 16], "baseline_peak_bytes": [40, 41],
                         "deq_peak_bytes": [100] * 2, "seq_len": [64] * 2})
    assert threshold(rows, 0.0, affine=True).depth is None  # L = 16 + 59 * 12 = 724 > 256
    rows["baseline_peak_bytes"] = [40, 60]
    t = threshold(rows, 0.0, affine=True)
    assert t.extrapolated and t.depth == pytest.approx(16 + 40 / (20 / 12))


def test_failed_baselines_and_untimed_runs(view, tmp_path):
    df = view.df.copy()
    df["step_s_median"] = None  # predicted runs have no times
    v = RunView.of(df, {}, None)
    assert all(x.slowdown is None for x in verdicts(v))
    assert "NFE 12/20 there (not timed)" in verdict_lines(v)[0]
    empty = RunView.of(df[df["variant"] != "deq"], {}, None)
    assert verdicts(empty) == []
