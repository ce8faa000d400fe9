"""Training as a scenario over the bench's step: `deqbench train` and the matrix's fit cases.

    deqbench train --model deq-transformer --data synthetic --steps 1000 --out runs/deq
    deqbench train --model transformer --depth 4 --data ../shared/data/wikitext-2 \\
        --train-split valid --test-split test --steps 600
    deqbench train --resume --out runs/deq          # after an interruption

The recipe is the same for every model, so DEQs and their baselines compare at an equal budget
(`--steps`, or wall-clock `--max-seconds`): see `bench.train.loop`. A run directory holds:
- `train_log.csv`: one row per `log_every` steps (and at each evaluation), columns LOG_COLUMNS:
  step, epoch, lr, loss (mean training cross-entropy over the rows' steps, nats/token), ppl
  (exp(loss)), grad_norm (mean, before clipping), tokens_per_s (at the median of the row's
  training steps; no evaluation, checkpoint or memory-tracked step), elapsed_s (training time so
  far), pretrain (1 while DEQs unroll), nfe_forward / nfe_backward / residual_forward /
  residual_backward (means), peak_bytes and memory_source (`torch_cuda`: max allocated over the
  rows' steps; `tracked`, on the CPU: exact live tensor bytes of the sampled step in the row,
  empty for rows without one), valid_loss / valid_ppl (evaluation rows).
- `train.json`: the configuration, corpus, final perplexities, throughput, peak memory, threads,
  status, environment and command.
- `checkpoint.pt` (bench.train.checkpoint): resuming continues the exact loss curve of an
  uninterrupted run with the same seed. One is written before the first step and then every
  `checkpoint_seconds` (and `checkpoint_every` steps, at validations, at the end), so a run
  killed at any point resumes.

Modules: `config` (TrainConfig, the schedule), `loop` (Trainer), `records` (a log row's sums,
the outcome), `checkpoint`, `fit` (the runner's fit cases), `summary` (what the command prints).
"""

import importlib
from typing import Any

EXIT_INTERRUPTED = 130  # the shell's code for a SIGINT; the checkpoint is saved
# Imported on first use (PEP 562): `deqbench --help` reads TrainConfig's defaults without
# importing torch, which the loop needs.
_EXPORTS = {
    "CHECKPOINT": "checkpoint", "TrainConfig": "config", "lr_factor": "config",
    "CURVE_COLUMNS": "fit", "fit_case": "fit", "fit_config": "fit",
    "LOG": "loop", "LOG_COLUMNS": "loop", "SUMMARY": "loop", "Outcome": "records", "Trainer": "loop",
    "header_lines": "summary", "summary_lines": "summary",
}
__all__ = ["EXIT_INTERRUPTED", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"bench.train.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'bench.train' has no attribute {name!r}")
