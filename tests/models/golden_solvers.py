"""Golden NFE, residuals and gradients of the debug DEQs, computed by the engine before issue 18.

    python -m tests.models.golden_solvers      # rewrites golden_solvers.json

The committed golden_solvers.json was written by this module at commit 9ccf73f (the solvers
before the per-iteration work of issue 18); `test_solver_parity.py` holds today's engine to it.
A gradient is summarised by its norm and its projection on a fixed random direction, per
parameter: enough to see any change beyond float32 rounding.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from models import build_model

PATH = Path(__file__).with_name("golden_solvers.json")
CASES = [
    # (model, overrides): every solver, both stop modes, Broyden with a history shorter than
    # its iterations (the buffer wraps around)
    ("deq-transformer", {"solver": "broyden"}),
    ("deq-transformer", {"solver": "anderson"}),
    ("deq-transformer", {"solver": "fixed_point", "max_iter": 40, "b_max_iter": 40}),
    ("deq-transformer", {"solver": "broyden", "broyden_memory": 4, "stop_mode": "abs"}),
    ("deq-trellisnet", {"solver": "broyden"}),
    ("deq-trellisnet", {"solver": "anderson"}),
    ("deq-trellisnet", {"solver": "broyden", "b_solver": "anderson", "broyden_memory": 5}),
]


def case_id(model: str, overrides: dict) -> str:
    return model + "".join(f"/{k}={v}" for k, v in sorted(overrides.items()))


def record(model_name: str, overrides: dict, batch: int = 2, seq_len: int = 16) -> dict:
    torch.manual_seed(0)
    model = build_model(model_name, "debug", mode="core", **overrides).train()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, seq_len, model.config.d_model, generator=g)
    out, stats = model(x)
    target = torch.randn(out.shape, generator=g)
    model.loss(out, target).backward()
    params = dict(model.named_parameters())
    directions = {n: torch.randn(p.shape, generator=g) for n, p in params.items()}
    return {
        "nfe_forward": stats.nfe_forward,
        "nfe_backward": stats.nfe_backward,
        "residual_forward": stats.residual_forward,
        "residual_backward": stats.residual_backward,
        "output_projection": float((out.detach() * torch.randn(out.shape, generator=g)).sum()),
        "grad_norm": {n: float(p.grad.norm()) for n, p in params.items()},
        "grad_projection": {n: float((p.grad * directions[n]).sum()) for n, p in params.items()},
    }


def main() -> None:
    torch.set_num_threads(1)
    golden = {case_id(m, o): record(m, o) for m, o in CASES}
    PATH.write_text(json.dumps(golden, indent=1, sort_keys=True) + "\n")
    for name, r in golden.items():
        print(name, r["nfe_forward"], r["nfe_backward"], r["residual_forward"], r["residual_backward"])


if __name__ == "__main__":
    main()
