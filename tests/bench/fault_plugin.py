"""DEQBENCH_PLUGINS entry point for runner fault tests: the toy models, plus `toy-fault`, an
explicit toy whose real forward pass misbehaves as its config says (fake tensors pass through,
so `predicted` is unaffected):

    fault = "sleep"    sleep `seconds` in every forward (a case that is still running)
    fault = "sigkill"  the worker kills itself with SIGKILL (no out-of-memory involved)
    fault = "noisy"    30 lines on stderr, then a RuntimeError with a two-line message
    fault = "hog"      touch `megabytes` of memory 10 MB at a time (slowly enough for SLURM's 1 s
                       RSS poll to catch it), then go on as usual
"""

from __future__ import annotations

import os
import signal
import sys
import time
from dataclasses import dataclass

from torch import Tensor
from torch._subclasses.fake_tensor import FakeTensor

from models import ModelSpec, ModelStats, register_model
from tests.bench.toy_models import Cell, ToyStackConfig, _Toy, register

NOISE_LINES = 30


@dataclass(frozen=True, kw_only=True)
class ToyFaultConfig(ToyStackConfig):
    fault: str = ""
    seconds: float = 0.0
    megabytes: int = 0


class ToyFault(_Toy):
    def __init__(self, config: ToyFaultConfig, mode: str) -> None:
        super().__init__(config, mode)
        self.cell = Cell(config.d_model, config.d_hidden)

    def core(self, injection: Tensor) -> tuple[Tensor, ModelStats]:
        if not isinstance(injection, FakeTensor):
            self._misbehave()
        z = injection.new_zeros(injection.shape)
        for _ in range(self.config.depth):
            z = self.cell(z, injection)
        return z, ModelStats(nfe_forward=self.config.depth)

    def _misbehave(self) -> None:
        fault = self.config.fault
        if fault == "sleep":
            time.sleep(self.config.seconds)
        elif fault == "sigkill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif fault == "hog":
            chunks = []
            for _ in range(self.config.megabytes // 10):
                chunks.append(b"x" * (10 << 20))
                time.sleep(0.02)
            del chunks
        elif fault == "noisy":
            for i in range(NOISE_LINES):
                print(f"toy-fault noise line {i}", file=sys.stderr, flush=True)
            raise RuntimeError("toy-fault failed on purpose\nsecond line of the message")


register()
register_model(ModelSpec(name="toy-fault", family="toyfault", variant="tied", config=ToyFaultConfig,
                         sizes={"debug": {}}, build=ToyFault))
