"""`flops` against analytic counts; `timing`'s statistics, warm-up and noise warning."""

import time

import pytest
import torch
import torch.nn.functional as F

from bench.measure import Workload, make_instrument, measure, run_pass
from bench.measure.flops import FlopCounter
from bench.measure.instrument import TIMED
from bench.measure.timing import NoisyTimingWarning, Timing, summarize
from models import ModelStats, list_models, make_config


def test_toy_stack_flops_match_the_hand_count(toys):
    # core mode, d 32, FFN 64, 3 layers: per token the injection (d x d) and two FFN matmuls a
    # layer, 2 FLOPs per multiply-add
    d, h, depth = 32, 64, 3
    forward = 2 * d * d + depth * 2 * (d * h + h * d)
    eval_row = measure(Workload(model="toy-stack", phase="eval"), ["flops"])
    assert eval_row["flops_per_token"] == forward
    # backward: a weight gradient for every matmul, an input gradient where the input needs one
    # (not x, not the first layer's z0 = 0): 2 x 3 layers - 1 input-gradient matmul of d x h
    backward = 2 * d * d + (2 * depth * 2 - 1) * 2 * d * h
    train_row = measure(Workload(model="toy-stack", phase="train"), ["flops"])
    assert train_row["flops_per_token"] == forward + backward


def test_cpu_flash_attention_is_counted():
    B, H, T, E = 2, 3, 16, 8
    q = torch.randn(B, H, T, E, requires_grad=True)
    with FlopCounter() as forward:
        out = F.scaled_dot_product_attention(q, q, q, is_causal=True)
    assert forward.total == 2 * (2 * B * H * T * T * E)  # Q K^T and (scores) V, dense
    with FlopCounter() as backward:
        out.sum().backward()
    assert backward.total >= 2 * forward.total


def _transformer_analytic_flops_per_token(c, seq_len: int) -> int:
    """Eval forward of the explicit transformer in core mode, per token: for each layer the QKV
    projection, the output projection, the FFN, and attention over K = seq_len keys (no memory at
    debug): Q K^T and scores V, plus the relative positional scores Q R^T and the projection of
    the K distance sinusoids (once per forward). Dense T x K scores, as the kernels compute."""
    hd, K = c.n_head * c.d_head, seq_len + c.mem_len
    per_token = 2 * c.d_model * 3 * hd + 2 * hd * c.d_model + 2 * 2 * c.d_model * c.d_inner
    per_token += 2 * 2 * K * hd  # Q K^T, scores V
    per_forward = 0
    if c.attention == "relative":
        per_token += 2 * K * hd  # (q + r_r) R^T
        per_forward = 2 * K * c.d_model * hd  # r_net over the K sinusoids, shared by the batch
    return c.depth * per_token, c.depth * per_forward


@pytest.mark.skipif("transformer" not in list_models(), reason="the transformer model is not registered")
@pytest.mark.parametrize("attention", ["relative", "sdpa"])
def test_transformer_eval_flops_within_5_percent_of_analytic(attention):
    B, T = 2, 32
    config = make_config("transformer", "debug", attention=attention)
    per_token, per_forward = _transformer_analytic_flops_per_token(config, T)
    analytic = per_token + per_forward / (B * T)
    row = measure(Workload(model="transformer", phase="eval", batch=B, seq_len=T,
                           overrides=(("attention", attention),)), ["flops"])
    assert row["flops_per_token"] == pytest.approx(analytic, rel=0.05)


def test_summary_is_median_and_interquartile_range():
    assert summarize([5.0, 1.0, 4.0, 2.0, 3.0]) == (3.0, 2.0)
    assert summarize([0.5]) == (0.5, None)


class SleepyBench:
    def __init__(self, durations):
        self.device, self.fake, self.steps, self.tokens_per_step = torch.device("cpu"), False, 0, 64
        self.durations = durations

    def step(self):
        time.sleep(self.durations[self.steps % len(self.durations)])
        self.steps += 1
        return ModelStats()

    def warm_up(self, steps=1):
        for _ in range(steps):
            self.step()


def test_timing_warms_up_repeats_and_flags_noise():
    timing = Timing(warmup=3, repeats=8)
    bench = SleepyBench([0.005, 0.04])  # alternating: IQR/median far above 10%
    run_pass(bench, [timing], TIMED)
    assert bench.steps == 3 + 8 and len(timing.seconds) == 8
    with pytest.warns(NoisyTimingWarning, match="IQR/median"):
        r = timing.results()
    assert r["timing_steps"] == 8 and 0.005 <= r["step_s_median"] <= 0.1
    assert r["tokens_per_s"] == pytest.approx(64 / r["step_s_median"])
    assert r["step_s_iqr"] > 0.1 * r["step_s_median"] and timing.notes
    assert r["timing_noisy"] is True  # the row is marked, for the report


def test_steady_steps_are_not_noisy(monkeypatch):
    ticks = iter(range(1000))  # a clock whose every step takes exactly 10 ms
    monkeypatch.setattr(time, "perf_counter", lambda: 0.01 * next(ticks))
    timing = Timing(warmup=0, repeats=6)
    bench = SleepyBench([0.0])
    timing.start(bench, TIMED)
    for _ in range(6):
        timing.before_step(bench)
        timing.after_step(bench)
    r = timing.results()
    assert r["step_s_median"] == pytest.approx(0.01) and r["timing_noisy"] is False


def test_timing_options_are_checked_and_registered():
    with pytest.raises(ValueError, match="repeats >= 1"):
        Timing(repeats=0)
    assert isinstance(make_instrument("timing", repeats=3), Timing)
