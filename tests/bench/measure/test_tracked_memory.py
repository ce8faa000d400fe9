"""`tracked`: exact on hand-counted workloads; views and in-place ops count once."""

from dataclasses import dataclass

import pytest
import torch
from torch import Tensor, nn

from bench.measure import Bench, LiveTensorCounter, Workload, make_instrument
from models import ModelSpec, ModelStats, registry
from models.base import BenchModel


def test_peak_equals_hand_count_of_known_allocations():
    counter = LiveTensorCounter()
    with counter:
        a = torch.empty(1000, dtype=torch.float32)  # 4000 B, live 4000
        b = torch.empty(250, dtype=torch.float64)  # 2000 B, live 6000
        del a  # live 2000
        c = torch.empty(3, 1000, dtype=torch.int16)  # 6000 B, live 8000 = peak
        del b, c  # live 0
        d = torch.empty(1500, dtype=torch.float32)  # 6000 B, live 6000
    assert counter.peak_bytes == 8000
    assert counter.current_bytes == 6000
    del d
    assert counter.current_bytes == 0 and counter.live_storages == 0


def test_views_and_in_place_ops_count_once():
    counter = LiveTensorCounter()
    with counter:
        x = torch.zeros(64, 64)  # 16384 B
        views = [x.view(-1), x.t(), x[::2], x[1:, :3], x.unsqueeze(0), x.reshape(64, 64)]
        x.add_(1).mul_(2)
        views[1].relu_()
        torch.add(x, 1, out=x)
        assert counter.current_bytes == 16384
        y = x.t().contiguous()  # a copy: new storage
    assert counter.peak_bytes == 2 * 16384
    del views, x
    assert counter.current_bytes == 16384  # y only
    del y


def test_tracked_tensors_count_once_from_the_start_and_out_resize_is_followed():
    w, b = torch.empty(100), torch.empty(10)  # 400 B and 40 B, made before counting
    counter = LiveTensorCounter()
    counter.track(w, {"nested": [w, b], "again": w})
    assert counter.current_bytes == 440
    out = torch.empty(0)
    with counter:
        torch.mul(w, 2, out=out)  # out (seen first as 0 bytes) is resized to 400 bytes
        assert counter.current_bytes == 840
        del b
    assert counter.current_bytes == counter.peak_bytes - 40 == 800


def test_rounding_and_device_filter():
    counter = LiveTensorCounter(round_to=512)
    with counter:
        keep = [torch.empty(1), torch.empty(200)]  # 4 B -> 512, 800 B -> 1024
    assert counter.peak_bytes == 1536 and counter.unrounded_peak_bytes == 804
    other = LiveTensorCounter(device="cuda")
    with other:
        keep.append(torch.empty(1000))
    assert other.peak_bytes == 0  # CPU storages are not the CUDA device's


@dataclass(frozen=True, kw_only=True)
class HandConfig:
    d_model: int = 24
    vocab_size: int = 10
    dropout: float = 0.0


class Hand(BenchModel):
    """out = x W^T; loss = sum(out * targets): every tensor of its eval step is known."""

    def __init__(self, config: HandConfig, mode: str) -> None:
        super().__init__(config, mode)
        self.w = nn.Parameter(torch.randn(config.d_model, config.d_model))

    def forward(self, x: Tensor, targets: Tensor | None = None, memory=None):
        out = x @ self.w.T  # (B, T, d)
        return (out if targets is None else self.loss(out, targets)), ModelStats(nfe_forward=1)

    def loss(self, output: Tensor, targets: Tensor) -> Tensor:
        return (output * targets).sum()


@pytest.fixture
def hand(monkeypatch):
    monkeypatch.setattr(registry, "MODELS", dict(registry.MODELS))
    registry.register_model(ModelSpec(name="hand", family="toy", variant="untied", config=HandConfig,
                                      sizes={"debug": {}}, build=Hand))


def test_tracked_instrument_on_a_hand_counted_eval_step(hand):
    B, T, d = 3, 7, 24
    bench = Bench(Workload(model="hand", phase="eval", batch=B, seq_len=T))
    bench.warm_up()
    tracked = make_instrument("tracked")
    with tracked.observing(bench):
        bench.step()
    # live: W, x, targets (made at warm-up), out, out * targets; then the 4-byte sum
    assert tracked.results()["tracked_bytes"] == 4 * (d * d + 4 * B * T * d) + 4
    assert tracked.results()["tracked_static_bytes"] == 4 * d * d
