"""`deqbench train`: train one model on a corpus; perplexity, speed and memory as it learns.

    deqbench train --model deq-transformer --data synthetic --steps 1000 --out runs/deq
    deqbench train --model transformer --depth 4 --data ../shared/data/wikitext-2 \\
        --train-split valid --test-split test --steps 600
    deqbench train --resume --out runs/deq          # after an interruption

The recipe is the same for every model, so DEQs and their baselines compare at an equal budget
(`--steps`, or wall-clock `--max-seconds`): Adam, linear warm-up then cosine decay to zero,
gradient-norm clipping, segment memory carried from step to step for models that return one
(`stats.memory` goes back in as `memory=`; reset at each pass over the data), and for DEQs the
paper's pretraining phase: `model.pretrain = True` (a few tied layers unrolled instead of solving)
for the first steps, then the equilibrium solve.

A run directory holds:
- `train_log.csv`: one row per `log_every` steps (and at each evaluation), columns LOG_COLUMNS:
  step, epoch, lr, loss (mean training cross-entropy over the rows' steps, nats/token), ppl
  (exp(loss)), grad_norm (mean, before clipping), tokens_per_s (training steps only: no
  evaluation, checkpoint or memory-tracked step), elapsed_s (training time so far), pretrain (1
  while DEQs unroll), nfe_forward / nfe_backward / residual_forward / residual_backward (means),
  peak_bytes and memory_source (`torch_cuda`: max allocated over the rows' steps; `tracked`, on
  the CPU: exact live tensor bytes of the sampled step in the row, empty for rows without one),
  valid_loss / valid_ppl (evaluation rows).
- `train.json`: the configuration, corpus, final perplexities, throughput, peak memory, status,
  environment and command.
- `checkpoint.pt`: model, optimizer, step, data position, segment memory, running sums and RNG
  states; resuming continues the exact loss curve of an uninterrupted run with the same seed.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import hashlib
import importlib
import json
import math
import signal
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from bench.data import Batches, Corpus, CorpusError, Splits, load_corpus

LOG, SUMMARY, CHECKPOINT = "train_log.csv", "train.json", "checkpoint.pt"
LOG_COLUMNS = ("step", "epoch", "lr", "loss", "ppl", "grad_norm", "tokens_per_s", "elapsed_s",
               "pretrain", "nfe_forward", "nfe_backward", "residual_forward", "residual_backward",
               "peak_bytes", "memory_source", "valid_loss", "valid_ppl")
# The log columns a fit case keeps in results.csv's `train_curve` (JSON: column -> values).
CURVE_COLUMNS = ("step", "elapsed_s", "loss", "tokens_per_s", "peak_bytes", "nfe_forward",
                 "nfe_backward", "residual_forward", "residual_backward", "valid_ppl")
CHECKPOINT_VERSION = 1
TIMED_STEP_CAP = 1_000_000  # steps allowed to a run budgeted in seconds only
EXIT_INTERRUPTED = 130  # the shell's code for a SIGINT; the checkpoint is saved


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Everything a training run depends on; the one source of defaults (the CLI overrides)."""

    model: str
    size: str = "debug"
    depth: int | None = None  # explicit models; None = the size's depth
    overrides: tuple[tuple[str, Any], ...] = ()  # model config fields (vocab_size comes from data)
    data: str = "synthetic"  # synthetic[:options] or a directory
    train_split: str = "train"
    valid_split: str | None = "valid"  # None: no validation
    test_split: str | None = "test"
    max_vocab: int | None = None
    steps: int = 1000  # the schedule's length; training stops here at the latest
    max_seconds: float | None = None  # wall-clock budget of training steps; schedule follows it
    batch: int = 16
    seq_len: int = 32
    eval_batch: int | None = None  # None: batch
    eval_tokens: int | None = None  # cap on target tokens per evaluation; None: the whole split
    lr: float = 5e-3  # suits the debug sizes; the paper trained its sizes at ~2.5e-4
    warmup: int = 50  # steps of linear warm-up
    clip: float = 0.5  # gradient-norm clipping; 0 = off
    weight_decay: float = 0.0
    pretrain_steps: int | None = None  # DEQs: steps unrolled first; None = 10% of the budget
    eval_every: int = 0  # steps between validations; 0 = only at the end
    log_every: int = 10
    checkpoint_every: int = 0  # steps between checkpoints; 0 = at evaluations and the end
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    threads: int | None = None  # torch intra-op threads; None = torch's default

    def __post_init__(self) -> None:
        positive = ("steps", "batch", "seq_len", "log_every")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup", "eval_every", "checkpoint_every", "seed"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("eval_batch", "eval_tokens", "max_vocab", "pretrain_steps", "depth", "threads"):
            value = getattr(self, name)
            if value is not None and value < (0 if name == "pretrain_steps" else 1):
                raise ValueError(f"{name} must be >= {0 if name == 'pretrain_steps' else 1}, got {value}")
        if self.max_seconds is not None and self.max_seconds <= 0:
            raise ValueError(f"max_seconds must be positive, got {self.max_seconds}")
        if not self.lr > 0 or self.clip < 0 or self.weight_decay < 0:
            raise ValueError("lr must be positive, clip and weight_decay non-negative")

    @property
    def splits(self) -> Splits:
        return Splits(self.train_split, self.valid_split, self.test_split)

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["overrides"] = [list(kv) for kv in self.overrides]
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> TrainConfig:
        d = dict(d)
        d["overrides"] = tuple(tuple(kv) for kv in d.get("overrides", ()))
        return cls(**d)


# -- schedule -------------------------------------------------------------------------------------
def lr_factor(step: int, progress: float, warmup: int) -> float:
    """Linear warm-up over `warmup` steps, then cosine from 1 to 0 over the rest of the budget.
    `progress` in [0, 1] is the fraction of the budget spent (steps, or seconds when timed)."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


# -- the run --------------------------------------------------------------------------------------
@dataclass
class Sums:
    """Running sums over the steps of the current log row (saved in checkpoints)."""

    steps: int = 0
    loss: float = 0.0
    grad_norm: float = 0.0
    tokens: int = 0
    timed_s: float = 0.0  # duration of the untracked steps
    timed_tokens: int = 0
    stats: dict[str, list[float]] = field(default_factory=dict)
    peak_bytes: int | None = None

    def add_stat(self, name: str, value: float | None) -> None:
        if value is not None and math.isfinite(value):
            self.stats.setdefault(name, []).append(float(value))

    def mean(self, name: str) -> float | None:
        values = self.stats.get(name)
        return sum(values) / len(values) if values else None


@dataclass
class Outcome:
    """What a finished (or stopped) run measured."""

    status: str  # ok | diverged | interrupted
    steps: int
    train_s: float
    train_loss: float | None
    valid_ppl: float | None
    test_ppl: float | None
    optimal_ppl: float | None
    unigram_ppl: float | None
    tokens_per_s: float | None
    step_s_median: float | None
    step_s_iqr: float | None
    peak_bytes: int | None
    memory_source: str | None
    memory_steps: list[int]  # tracked: the sampled steps; torch_cuda: the log rows' last steps
    nfe_forward: float | None
    nfe_backward: float | None
    residual_forward: float | None
    residual_backward: float | None
    params: int
    params_nonembed: int
    curve: list[dict[str, Any]]  # the train_log.csv rows


class Trainer:
    """One training run: `Trainer(config, out).run()`; `Trainer.resume(out).run()` continues it.

    `out=None` keeps everything in memory (the benchmark runner's fit cases)."""

    def __init__(self, config: TrainConfig, out: Path | None = None, *, corpus: Corpus | None = None,
                 progress: bool = False, memory_instruments: tuple[str, ...] | None = None,
                 command: list[str] | None = None) -> None:
        from bench.env import resolve_device

        self.config = c = config
        self.out = Path(out) if out is not None else None
        self.progress = progress
        self.command = command
        self.device = torch.device(resolve_device(c.device))
        if c.threads is not None:
            torch.set_num_threads(c.threads)
        self.corpus = corpus if corpus is not None else load_corpus(c.data, c.splits, max_vocab=c.max_vocab)
        torch.manual_seed(c.seed)
        self.model = build_for(c, self.corpus.vocab_size).to(self.device)
        self.is_deq = self.model.spec.is_deq
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=c.lr, weight_decay=c.weight_decay)
        self.train_data = Batches(self.corpus.train, c.batch, c.seq_len)
        # Data position and state carried between steps.
        self.step = 0
        self.epoch = 0
        self.position = 0
        self.elapsed = 0.0
        self.memory: Any = None
        self.sums = Sums()
        self.step_times: list[float] = []
        self.curve: list[dict[str, Any]] = []  # the log rows so far
        self.last_valid: tuple[float, float] | None = None
        self._last_row: dict[str, Any] = {}  # the latest train_log.csv row
        self.peaks: list[tuple[int, int]] = []  # (step, peak bytes): tracked steps or log rows
        self.uses_memory = False
        self.solving_since: int | None = None  # first step that solved (DEQs after pretraining)
        self.status = "ok"
        self._stop = False
        on_cuda = self.device.type == "cuda"
        wanted = memory_instruments if memory_instruments is not None else ("torch_cuda", "tracked")
        self.memory_source = ("torch_cuda" if on_cuda and "torch_cuda" in wanted
                              else "tracked" if not on_cuda and "tracked" in wanted else None)

    # -- checkpoints ---------------------------------------------------------------------------
    @classmethod
    def resume(cls, out: Path, *, progress: bool = False, device: str | None = None,
               command: list[str] | None = None) -> Trainer:
        path = Path(out) / CHECKPOINT
        if not path.is_file():
            raise CorpusError(f"nothing to resume: {path} does not exist")
        try:
            state = torch.load(path, weights_only=True, map_location="cpu")
        except Exception as err:  # any unreadable checkpoint is a user-facing error
            raise CorpusError(f"cannot read checkpoint {path}: {err}") from None
        if state.get("version") != CHECKPOINT_VERSION:
            raise CorpusError(f"{path} is a checkpoint of another format (version {state.get('version')})")
        config = TrainConfig.from_json(state["config"])
        if device is not None:
            config = dataclasses.replace(config, device=device)
        trainer = cls(config, out, progress=progress, command=command)
        if state["corpus_digest"] != corpus_digest(trainer.corpus):
            raise CorpusError(f"the corpus {config.data} changed since {path} was written; "
                              "resume needs the same data")
        trainer._load_state(state)
        trainer._truncate_log()
        return trainer

    def _state(self) -> dict[str, Any]:
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        return {
            "version": CHECKPOINT_VERSION, "config": self.config.to_json(),
            "corpus_digest": corpus_digest(self.corpus),
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "step": self.step, "epoch": self.epoch, "position": self.position,
            "elapsed": self.elapsed, "memory": pack_memory(self.memory), "rng": rng,
            "sums": dataclasses.asdict(self.sums), "step_times": self.step_times,
            "curve": self.curve, "last_valid": self.last_valid,
            "peaks": [list(p) for p in self.peaks], "uses_memory": self.uses_memory,
            "solving_since": self.solving_since,
        }

    def _load_state(self, s: dict[str, Any]) -> None:
        self.model.load_state_dict(s["model"])
        self.optimizer.load_state_dict(s["optimizer"])
        self.step, self.epoch, self.position = s["step"], s["epoch"], s["position"]
        self.elapsed = s["elapsed"]
        self.memory = unpack_memory(s["memory"], self.device)
        self.sums = Sums(**s["sums"])
        self.step_times = list(s["step_times"])
        self.curve = list(s["curve"])
        self.last_valid = tuple(s["last_valid"]) if s["last_valid"] is not None else None
        self.peaks = [tuple(p) for p in s["peaks"]]
        self.uses_memory = s["uses_memory"]
        self.solving_since = s["solving_since"]
        torch.set_rng_state(s["rng"]["torch"])
        if "cuda" in s["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(s["rng"]["cuda"])

    def save_checkpoint(self) -> None:
        if self.out is None:
            return
        tmp = self.out / f"{CHECKPOINT}.tmp"
        torch.save(self._state(), tmp)
        tmp.replace(self.out / CHECKPOINT)

    def _truncate_log(self) -> None:
        """Drop log rows written after the checkpoint (a run killed between checkpoints)."""
        path = self.out / LOG if self.out else None
        if path is None or not path.exists():
            return
        with path.open(newline="") as fh:
            rows = list(csv.reader(fh))
        keep = [rows[0]] + [r for r in rows[1:] if len(r) == len(rows[0]) and int(r[0]) <= self.step]
        with path.open("w", newline="") as fh:
            csv.writer(fh, lineterminator="\n").writerows(keep)

    # -- training ------------------------------------------------------------------------------
    @property
    def progress_fraction(self) -> float:
        c = self.config
        by_steps = self.step / c.steps
        return max(by_steps, self.elapsed / c.max_seconds) if c.max_seconds else by_steps

    def _pretraining(self) -> bool:
        if not self.is_deq or not hasattr(self.model, "pretrain"):
            return False
        if self.config.pretrain_steps is not None:
            return self.step < self.config.pretrain_steps
        return self.progress_fraction < 0.1

    def _budget_left(self) -> bool:
        c = self.config
        return self.step < c.steps and (c.max_seconds is None or self.elapsed < c.max_seconds)

    def request_stop(self) -> None:
        """Stop after the current step, saving a checkpoint (what Ctrl-C does)."""
        self._stop = True

    def run(self, *, until: int | None = None) -> Outcome:
        """Train until the budget is spent (or step `until`, or a stop request); then evaluate
        valid and test unless stopped early."""
        c = self.config
        if self.out is not None:
            self.out.mkdir(parents=True, exist_ok=True)
        bar = self._bar()
        with _stop_on_sigint(self.request_stop):
            while self._budget_left() and self.status != "diverged":
                if self._stop or (until is not None and self.step >= until):
                    self.status = "interrupted"
                    break
                self._train_step()
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix_str(self._postfix(), refresh=False)
                last = not self._budget_left() or self.status == "diverged"
                evaluate = bool(c.eval_every and self.step % c.eval_every == 0) and not last
                if self.step % c.log_every == 0 or last or evaluate:
                    self._log_row(validate=evaluate or (last and self.status == "ok"))
                checkpoint = (c.checkpoint_every and self.step % c.checkpoint_every == 0) or (
                    not c.checkpoint_every and evaluate)
                if checkpoint and not last:
                    self.save_checkpoint()
        if bar is not None:
            bar.close()
        if self.status == "interrupted":
            self.save_checkpoint()  # the partial log row's sums live on in it
            return self.outcome()
        test = None
        if self.status == "ok" and self.corpus.test is not None:
            test = self.evaluate(self.corpus.test)
        self.save_checkpoint()
        outcome = self.outcome(test=test)
        self._write_summary(outcome)
        return outcome

    def _train_step(self) -> None:
        c = self.config
        model = self.model
        model.train()
        pretrain = self._pretraining()
        if hasattr(model, "pretrain"):
            model.pretrain = pretrain
        for group in self.optimizer.param_groups:
            group["lr"] = c.lr * lr_factor(self.step, self.progress_fraction, c.warmup)
        x, y = (t.to(self.device) for t in self.train_data.segment(self.position))
        tracked = self._track_this_step(pretrain)
        counter = None
        if tracked:
            from bench.measure.tracked import LiveTensorCounter

            counter = LiveTensorCounter()
            counter.track(model, self.optimizer, x, y, self.memory)
        if self.device.type == "cuda" and self.sums.steps == 0 and self.memory_source:
            torch.cuda.reset_peak_memory_stats(self.device)
        _sync(self.device)
        t0 = time.perf_counter()
        with counter if counter is not None else contextlib.nullcontext():
            loss, stats = model(x, targets=y, memory=self.memory)
            loss.backward()
            params = [p for p in model.parameters() if p.grad is not None]
            if c.clip:
                grad_norm = torch.nn.utils.clip_grad_norm_(params, c.clip)
            else:
                grad_norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        _sync(self.device)
        seconds = time.perf_counter() - t0
        loss_value = loss.item()
        del loss
        self.elapsed += seconds
        self.step += 1
        s = self.sums
        s.steps += 1
        s.loss += loss_value
        s.grad_norm += float(grad_norm)
        tokens = y.numel()
        s.tokens += tokens
        if counter is None:
            s.timed_s += seconds
            s.timed_tokens += tokens
            self.step_times.append(seconds)
        else:
            s.peak_bytes = max(s.peak_bytes or 0, counter.peak_bytes)
            self.peaks.append((self.step, counter.peak_bytes))
        s.add_stat("pretrain", float(pretrain))
        for name in ("nfe_forward", "nfe_backward", "residual_forward", "residual_backward"):
            s.add_stat(name, getattr(stats, name))
        if stats.memory is not None:
            self.uses_memory = True
        self.memory = stats.memory
        self.position += 1
        if self.position == self.train_data.full:  # a pass over the data: start the streams again
            self.position, self.epoch, self.memory = 0, self.epoch + 1, None
        if not (math.isfinite(loss_value) and math.isfinite(float(grad_norm))):
            self.status = "diverged"  # parameters are no longer finite: nothing left to learn

    def _track_this_step(self, pretrain: bool) -> bool:
        """CPU: count live bytes on the second step of training and the second step that solves
        (Adam's state exists by then; for DEQs pretraining and solving differ), and on the last
        step of the step budget. Counting slows a step, so these steps are left out of timing."""
        if self.memory_source != "tracked":
            return False
        if not pretrain and self.solving_since is None:
            self.solving_since = self.step
        marks = {1, self.config.steps - 1}
        if self.solving_since is not None:
            marks.add(self.solving_since + 1)
        return self.step in marks

    def evaluate(self, stream: Tensor) -> tuple[float, float]:
        """(mean cross-entropy in nats, perplexity) over the split, segment memory carried; the
        RNG is forked so evaluating never changes the training run."""
        c = self.config
        batches = Batches(stream, c.eval_batch or c.batch, c.seq_len)
        model = self.model
        model.eval()
        if hasattr(model, "pretrain"):
            model.pretrain = self._pretraining()
        total, count, memory = 0.0, 0, None
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            for x, y in batches:
                x, y = x.to(self.device), y.to(self.device)
                loss, stats = model(x, targets=y, memory=memory)
                total += loss.item() * y.numel()
                count += y.numel()
                memory = stats.memory
                if c.eval_tokens is not None and count >= c.eval_tokens:
                    break
        model.train()
        mean = total / count
        return mean, math.exp(min(mean, 700.0))

    # -- logging -------------------------------------------------------------------------------
    def _log_row(self, validate: bool) -> None:
        s = self.sums
        if s.steps == 0:
            return
        loss = s.loss / s.steps
        peak = s.peak_bytes
        if self.memory_source == "torch_cuda":  # read before evaluating: training steps only
            peak = torch.cuda.max_memory_allocated(self.device)
            self.peaks.append((self.step, peak))
        valid = None
        if validate and self.corpus.valid is not None:
            valid = self.evaluate(self.corpus.valid)
            self.last_valid = valid
        row = {
            "step": self.step, "epoch": self.epoch,
            "lr": self.optimizer.param_groups[0]["lr"], "loss": loss, "ppl": _exp(loss),
            "grad_norm": s.grad_norm / s.steps,
            "tokens_per_s": s.timed_tokens / s.timed_s if s.timed_s > 0 else None,
            "elapsed_s": self.elapsed, "pretrain": s.mean("pretrain"),
            **{n: s.mean(n) for n in ("nfe_forward", "nfe_backward", "residual_forward", "residual_backward")},
            "peak_bytes": peak, "memory_source": self.memory_source if peak is not None else None,
            "valid_loss": valid[0] if valid else None, "valid_ppl": valid[1] if valid else None,
        }
        self.curve.append(row)
        self._last_row = row
        self.sums = Sums()
        if self.out is not None:
            _append_csv(self.out / LOG, row)

    def _postfix(self) -> str:
        s = self.sums
        parts = [f"loss {s.loss / s.steps:.3f}" if s.steps else ""]
        if s.timed_s:
            parts.append(f"{s.timed_tokens / s.timed_s:,.0f} tok/s")
        nfe = s.mean("nfe_forward")
        if nfe is not None:
            parts.append(f"nfe {nfe:.1f}/{s.mean('nfe_backward') or 0:.1f}")
        if self.last_valid:
            parts.append(f"valid ppl {self.last_valid[1]:.2f}")
        return " ".join(p for p in parts if p)

    def _bar(self):
        if not self.progress:
            return None
        from tqdm import tqdm

        return tqdm(total=self.config.steps, initial=self.step, desc=self.config.model, unit="step",
                    file=sys.stderr, dynamic_ncols=True)

    def optimal_ppl(self) -> float | None:
        """The synthetic corpus's best perplexity for how this model reads it (with or without
        segment memory)."""
        return self.corpus.optimal_ppl(None if self.uses_memory else self.config.seq_len)

    def outcome(self, test: tuple[float, float] | None = None) -> Outcome:
        times = sorted(self.step_times)
        median = statistics.median(times) if times else None
        iqr = None
        if len(times) >= 4:
            q = statistics.quantiles(times, n=4)
            iqr = q[2] - q[0]
        tokens = self.config.batch * self.config.seq_len
        last = self._last_row
        return Outcome(
            status=self.status, steps=self.step, train_s=self.elapsed,
            train_loss=self.curve[-1]["loss"] if self.curve else None,
            valid_ppl=self.last_valid[1] if self.last_valid else None,
            test_ppl=test[1] if test else None, optimal_ppl=self.optimal_ppl(),
            unigram_ppl=self.corpus.unigram_ppl("test") if self.corpus.test is not None else None,
            tokens_per_s=tokens * len(times) / sum(times) if times else None,
            step_s_median=median, step_s_iqr=iqr,
            peak_bytes=max(b for _, b in self.peaks) if self.peaks else None,
            memory_source=self.memory_source if self.peaks else None,
            memory_steps=[step for step, _ in self.peaks],
            nfe_forward=last.get("nfe_forward"), nfe_backward=last.get("nfe_backward"),
            residual_forward=last.get("residual_forward"),
            residual_backward=last.get("residual_backward"),
            params=_num_params(self.model, False), params_nonembed=_num_params(self.model, True),
            curve=list(self.curve),
        )

    def _write_summary(self, outcome: Outcome) -> None:
        if self.out is None:
            return
        from bench.env import capture
        from bench.results import write_json

        summary = {
            "config": self.config.to_json(),
            "model_config": dataclasses.asdict(self.model.config),
            "corpus": {"name": self.corpus.name, "files": self.corpus.files,
                       "vocab_size": self.corpus.vocab_size,
                       "tokens": {r: len(s) for r in ("train", "valid", "test")
                                  if (s := self.corpus.split(r)) is not None},
                       "entropy_rate": self.corpus.source.entropy_rate if self.corpus.source else None},
            "result": dataclasses.asdict(outcome) | {"curve": None},
            "command": self.command,
            "env": capture(str(self.device), self.command),
        }
        write_json(self.out / SUMMARY, summary)


# -- helpers --------------------------------------------------------------------------------------
def build_for(config: TrainConfig, vocab_size: int) -> nn.Module:
    """The model in lm mode with the corpus's vocabulary."""
    from models import build_model

    overrides = dict(config.overrides)
    overrides["vocab_size"] = vocab_size
    return build_model(config.model, config.size, mode="lm", depth=config.depth, **overrides)


def corpus_digest(corpus: Corpus) -> str:
    h = hashlib.sha256("\n".join(corpus.vocab).encode())
    for role in ("train", "valid", "test"):
        stream = corpus.split(role)
        h.update(role.encode())
        if stream is not None:
            h.update(stream.numpy().tobytes())
    return h.hexdigest()


def _num_params(model: nn.Module, non_embedding: bool) -> int:
    count = getattr(model, "num_params", None)
    if count is not None:
        return count(non_embedding=non_embedding)
    return sum(p.numel() for p in model.parameters())


def _exp(x: float) -> float:
    return math.exp(min(x, 700.0))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def pack_memory(obj: Any) -> Any:
    """Segment memory (tensors in tuples, named tuples, lists, dicts) as plain containers of CPU
    tensors that `torch.load(weights_only=True)` reads back; named tuples keep their class name."""
    if obj is None or isinstance(obj, Tensor):
        return None if obj is None else obj.detach().cpu()
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        kind = type(obj)
        return {"namedtuple": [f"{kind.__module__}:{kind.__qualname__}", [pack_memory(v) for v in obj]]}
    if isinstance(obj, (list, tuple)):
        return {type(obj).__name__: [pack_memory(v) for v in obj]}
    if isinstance(obj, dict):
        return {"dict": {k: pack_memory(v) for k, v in obj.items()}}
    raise TypeError(f"cannot checkpoint segment memory of type {type(obj).__name__}")


def unpack_memory(obj: Any, device: torch.device) -> Any:
    if obj is None or isinstance(obj, Tensor):
        return None if obj is None else obj.to(device)
    ((kind, payload),) = obj.items()
    if kind == "namedtuple":
        module, _, name = payload[0].partition(":")
        cls: Any = importlib.import_module(module)
        for part in name.split("."):
            cls = getattr(cls, part)
        return cls(*(unpack_memory(v, device) for v in payload[1]))
    if kind == "dict":
        return {k: unpack_memory(v, device) for k, v in payload.items()}
    values = [unpack_memory(v, device) for v in payload]
    return tuple(values) if kind == "tuple" else values


def _thin(rows: list[dict[str, Any]], most: int = 100) -> list[dict[str, Any]]:
    """At most about `most` evenly spaced rows, the last one always kept (a time budget logs
    every 10 steps however many steps it reaches; results.csv needs a curve, not the log)."""
    if len(rows) <= most:
        return rows
    every = -(-len(rows) // most)
    kept = rows[::every]
    return kept if kept[-1] is rows[-1] else [*kept, rows[-1]]


def _round(value: Any) -> Any:
    """Six significant digits: enough for a curve, a tenth of the JSON."""
    return float(f"{value:.6g}") if isinstance(value, float) else value


def _cell(value: Any) -> str:
    if value is None:
        return ""
    return repr(value) if isinstance(value, float) else str(value)


def _append_csv(path: Path, row: dict[str, Any]) -> None:
    new = not path.exists() or path.stat().st_size == 0
    with path.open("a", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        if new:
            writer.writerow(LOG_COLUMNS)
        writer.writerow([_cell(row.get(col)) for col in LOG_COLUMNS])


@contextlib.contextmanager
def _stop_on_sigint(stop: Callable[[], None]) -> Iterator[None]:
    """First Ctrl-C: finish the current step, checkpoint, stop. A second one: stop at once."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        stop()
        signal.signal(signal.SIGINT, previous)

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def read_log(run_dir: Path):
    """The train log of a run directory as a DataFrame."""
    import pandas as pd

    return pd.read_csv(Path(run_dir) / LOG)


# -- benchmark runner: fit cases ------------------------------------------------------------------
def fit_config(case: Any, device: str, settings: Any) -> TrainConfig:
    """A runner case of phase `fit` as a training run: the case's model, shape and overrides,
    the matrix's budget (`fit_steps`, and `fit_seconds` when set) and corpus."""
    kwargs = case.model_kwargs()
    depth = kwargs.pop("depth", None)
    budget: dict[str, Any] = {}
    if settings.fit_seconds:
        budget["max_seconds"] = float(settings.fit_seconds)
        budget["steps"] = settings.fit_steps or TIMED_STEP_CAP
    elif settings.fit_steps:
        budget["steps"] = settings.fit_steps
    if settings.fit_lr:
        budget["lr"] = float(settings.fit_lr)
    config = TrainConfig(
        model=case.model, size=case.size, depth=depth, overrides=tuple(sorted(kwargs.items())),
        data=settings.fit_data, batch=case.batch, seq_len=case.seq_len, seed=settings.seed,
        device=device, **budget,
    )
    # About 50 curve points for a step budget; a time budget's step count is not known ahead.
    log_every = TrainConfig.log_every if settings.fit_seconds else max(1, config.steps // 50)
    return dataclasses.replace(config, log_every=log_every)


def fit_case(case: Any, device: str, settings: Any, instruments: tuple[str, ...] = ()) -> dict[str, Any]:
    """Train the case's model from scratch for the matrix's budget; one results.csv row with
    its perplexities and the run's speed, memory and solver statistics."""
    from bench.env import device_name

    if instruments == ("predicted",):  # `deqbench predict`: a fit case's memory is its train step's
        from bench.measure.case import measure_case

        return measure_case(dataclasses.replace(case, phase="train"), device, settings, instruments)
    memory = tuple(i for i in instruments if i in ("torch_cuda", "tracked")) if instruments else None
    trainer = Trainer(fit_config(case, device, settings), None, memory_instruments=memory)
    o = trainer.run()
    return {
        "status": "ok" if o.status == "ok" else "diverged", "device": device,
        "device_name": device_name(device), "params": o.params, "params_nonembed": o.params_nonembed,
        "memory_source": o.memory_source, "peak_bytes": o.peak_bytes,
        "tracked_bytes": o.peak_bytes if o.memory_source == "tracked" else None,
        "step_s_median": o.step_s_median, "step_s_iqr": o.step_s_iqr, "tokens_per_s": o.tokens_per_s,
        "nfe_forward": o.nfe_forward, "nfe_backward": o.nfe_backward,
        "residual_forward": o.residual_forward, "residual_backward": o.residual_backward,
        "valid_ppl": o.valid_ppl, "test_ppl": o.test_ppl, "optimal_ppl": o.optimal_ppl,
        "train_steps": o.steps, "train_s": o.train_s,
        "train_curve": {col: [_round(row.get(col)) for row in _thin(o.curve)] for col in CURVE_COLUMNS},
        "error": None if o.status == "ok" else f"training loss or gradient not finite at step {o.steps}",
    }


# -- tables of runs -------------------------------------------------------------------------------
RUN_COLUMNS = ("model", "size", "depth", "overrides", "data", "train_split", "test_split", "steps", "batch",
               "seq_len", "lr", "params", "params_nonembed", "train_s", "tokens_per_s",
               "step_s_median", "peak_bytes", "memory_source", "nfe_forward", "nfe_backward",
               "train_ppl", "valid_ppl", "test_ppl", "unigram_ppl", "optimal_ppl", "status",
               "device_name", "run", "command")


def summarize_runs(run_dirs: list[str | Path]):
    """One row per finished `deqbench train` directory (from its train.json): a table to compare
    runs or to commit as reference numbers."""
    import pandas as pd

    rows = []
    for run in map(Path, run_dirs):
        summary = json.loads((run / SUMMARY).read_text())
        config, result = summary["config"], summary["result"]
        env = summary.get("env") or {}
        rows.append({
            **{k: config.get(k) for k in ("model", "size", "depth", "data", "train_split",
                                           "test_split", "batch", "seq_len", "lr")},
            "depth": summary.get("model_config", {}).get("depth", config.get("depth")),
            "overrides": json.dumps(dict(config.get("overrides") or [])) if config.get("overrides") else None,
            **{k: result.get(k) for k in ("params", "params_nonembed", "train_s", "tokens_per_s",
                                           "step_s_median", "peak_bytes", "memory_source",
                                           "nfe_forward", "nfe_backward", "valid_ppl", "test_ppl",
                                           "unigram_ppl", "optimal_ppl", "status", "steps")},
            "train_ppl": _exp(result["train_loss"]) if result.get("train_loss") is not None else None,
            "device_name": env.get("device_name"), "run": str(run),
            "command": " ".join(summary.get("command") or []) or None,
        })
    return pd.DataFrame(rows, columns=list(RUN_COLUMNS))


# -- figures --------------------------------------------------------------------------------------
def plot_training(run_dir: str | Path | list[str | Path], out: str | Path | None = None) -> list[Path]:
    """Training curves as PNG: perplexity against step and against training seconds.

    `run_dir` is a `deqbench train` directory (train_log.csv), a benchmark run whose results.csv
    has fit rows (their `train_curve`), or a list of these drawn together; figures go to `out`
    (default: the first directory's figures/). Returns the files written (none without data)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dirs = [Path(d) for d in run_dir] if isinstance(run_dir, list) else [Path(run_dir)]
    curves = {label: c for d in run_dirs for label, c in _curves(d).items()}
    if not curves:
        return []
    out = Path(out) if out is not None else run_dirs[0] / "figures"
    out.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for label, c in curves.items():
        for ax, x in zip(axes, (c["step"], c["elapsed_s"]), strict=True):
            (line,) = ax.plot(x, c["ppl"], label=f"{label} (train)")
            if c.get("valid_ppl"):
                vx = c["valid_step"] if ax is axes[0] else c["valid_elapsed_s"]
                ax.plot(vx, c["valid_ppl"], "o", color=line.get_color(), label=f"{label} (valid)")
            if c.get("test_ppl"):
                ax.plot(x[-1:], [c["test_ppl"]], "x", color=line.get_color(), markersize=9,
                        label=f"{label} (test, end)")
    optimum = next((c["optimal_ppl"] for c in curves.values() if c.get("optimal_ppl")), None)
    for ax, xlabel in zip(axes, ("step", "training seconds"), strict=True):
        if optimum:
            ax.axhline(optimum, color="black", linestyle="--", linewidth=1, label="best achievable")
        ax.set_xlabel(xlabel)
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("perplexity")
    axes[1].legend(fontsize="small")
    fig.suptitle("training curves")
    fig.tight_layout()
    path = out / "training.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return [path]


def _curves(run_dir: Path) -> dict[str, dict[str, Any]]:
    """label -> {"step", "elapsed_s", "ppl", optionally "valid_*", "optimal_ppl"}."""
    import pandas as pd

    if (run_dir / LOG).exists():
        log = pd.read_csv(run_dir / LOG)
        summary = json.loads((run_dir / SUMMARY).read_text()) if (run_dir / SUMMARY).exists() else {}
        label = summary.get("config", {}).get("model", run_dir.name)
        valid = log.dropna(subset=["valid_ppl"])
        return {label: {
            "step": log["step"].tolist(), "elapsed_s": log["elapsed_s"].tolist(),
            "ppl": log["ppl"].tolist(), "valid_step": valid["step"].tolist(),
            "valid_elapsed_s": valid["elapsed_s"].tolist(), "valid_ppl": valid["valid_ppl"].tolist(),
            "optimal_ppl": summary.get("result", {}).get("optimal_ppl"),
            "test_ppl": summary.get("result", {}).get("test_ppl"),
        }}
    from bench.results import RESULTS, read_results

    if not (run_dir / RESULTS).exists():
        return {}
    df = read_results(run_dir)
    if "train_curve" not in df:
        return {}
    curves = {}
    for r in df[df["train_curve"].notna()].itertuples():
        log = pd.DataFrame(json.loads(r.train_curve))
        if log.empty:
            continue
        label = r.model if pd.isna(r.depth) else f"{r.model} L{r.depth:.0f}"
        valid = log.dropna(subset=["valid_ppl"])
        curves[f"{label} T{r.seq_len}"] = {
            "step": log["step"].tolist(), "elapsed_s": log["elapsed_s"].tolist(),
            "ppl": [_exp(v) for v in log["loss"]], "valid_step": valid["step"].tolist(),
            "valid_elapsed_s": valid["elapsed_s"].tolist(), "valid_ppl": valid["valid_ppl"].tolist(),
            "optimal_ppl": r.optimal_ppl if pd.notna(r.optimal_ppl) else None,
        }
    return curves


# -- command line ---------------------------------------------------------------------------------
# (option, TrainConfig field, type): given options override the config's defaults.
OPTIONS: tuple[tuple[str, str, Callable[[str], Any]], ...] = (
    ("--size", "size", str), ("--depth", "depth", int), ("--data", "data", str),
    ("--train-split", "train_split", str), ("--valid-split", "valid_split", str),
    ("--test-split", "test_split", str), ("--max-vocab", "max_vocab", int),
    ("--steps", "steps", int), ("--max-seconds", "max_seconds", float), ("--batch", "batch", int),
    ("--seq-len", "seq_len", int), ("--eval-batch", "eval_batch", int),
    ("--eval-tokens", "eval_tokens", int), ("--lr", "lr", float), ("--warmup", "warmup", int),
    ("--clip", "clip", float), ("--weight-decay", "weight_decay", float),
    ("--pretrain-steps", "pretrain_steps", int), ("--eval-every", "eval_every", int),
    ("--log-every", "log_every", int), ("--checkpoint-every", "checkpoint_every", int),
    ("--seed", "seed", int), ("--threads", "threads", int),
)
HELP = {
    "size": "named size", "depth": "layers of an explicit model (default: the size's)",
    "data": "synthetic, synthetic:KEY=VALUE,... (keys: {synthetic}), or a directory with "
            "{{train,valid,test}}.txt, wiki.*.tokens or ptb.*.txt",
    "train_split": "split to train on",
    "valid_split": "split to validate on, or none (default valid; none when training on valid)",
    "test_split": "split to test on at the end, or none (default test; none when training on test)",
    "max_vocab": "keep only the most frequent words (the rest are <unk>)",
    "steps": "training steps: the schedule's length",
    "max_seconds": "wall-clock budget of training steps (the schedule follows it); "
                   "stops at --steps or here, whichever comes first",
    "batch": "streams per batch", "seq_len": "tokens per segment",
    "eval_batch": "streams when evaluating (default: --batch)",
    "eval_tokens": "at most this many tokens per evaluation (default: the whole split)",
    "lr": "peak Adam learning rate", "warmup": "linear warm-up steps",
    "clip": "gradient-norm clip, 0 = off", "weight_decay": "Adam weight decay",
    "pretrain_steps": "DEQs: first steps with unrolled tied layers (default: 10%% of the budget)",
    "eval_every": "validate every N steps; 0 = at the end only",
    "log_every": "steps per train_log.csv row",
    "checkpoint_every": "steps between checkpoints; 0 = at validations and the end",
    "seed": "seed of initialisation and dropout",
    "threads": "torch intra-op threads (default: torch's; 1 is fastest for debug sizes on shared cores)",
}


def _help(dest: str) -> str:
    """The option's help with TrainConfig's default (the one source of defaults) appended."""
    from bench.data import SYNTHETIC_KEYS, SyntheticSource

    text = HELP[dest]
    if dest == "data":
        defaults = SyntheticSource()
        text = text.format(synthetic=", ".join(f"{k} ({getattr(defaults, k)})" for k in SYNTHETIC_KEYS))
    default = TrainConfig.__dataclass_fields__[dest].default
    if "default" not in text and default is not None:
        text += f" (default {default})"
    return text


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train", help="train a model on a corpus: perplexity, speed and memory as it learns",
        description="Train one model (lm mode) with Adam, warm-up + cosine, clipping and, for "
                    "DEQs, unrolled pretraining; writes train_log.csv, train.json and a checkpoint.")
    p.add_argument("--model", help="a registered model (deqbench list)")
    for option, dest, kind in OPTIONS:
        p.add_argument(option, dest=dest, type=kind, default=None, help=_help(dest))
    p.add_argument("--set", dest="set_", action="append", default=[], metavar="KEY=VALUE",
                   help="model config override, repeatable, e.g. --set mem_len=32 --set solver=anderson")
    p.add_argument("--device", default=None, help="auto | cpu | cuda | cuda:N (default auto)")
    p.add_argument("--out", help="run directory (default results/train/<model>-<timestamp>)")
    p.add_argument("--resume", action="store_true", help="continue the interrupted run in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)


def parse_override(text: str) -> tuple[str, Any]:
    """'mem_len=32' -> ('mem_len', 32); values are TOML literals, else strings; none -> None."""
    import tomllib

    from bench.cli import BadInput

    key, eq, raw = text.partition("=")
    if not eq or not key.strip():
        raise BadInput(f"bad --set {text!r}; use KEY=VALUE, e.g. --set mem_len=32")
    raw = raw.strip()
    if raw.lower() == "none":
        return key.strip(), None
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.strip(), value


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    from bench.cli import BadInput

    if not args.model:
        raise BadInput("--model is required (`deqbench list` shows the models)")
    values = {dest: getattr(args, dest) for _, dest, _ in OPTIONS if getattr(args, dest) is not None}
    train = values.get("train_split", "train")
    for role in ("valid", "test"):  # never evaluate on the split trained on, unless asked to
        key = f"{role}_split"
        if key in values:
            values[key] = None if values[key].lower() == "none" else values[key]
        elif train == role:
            values[key] = None
    if args.device is not None:
        values["device"] = args.device
    overrides = tuple(parse_override(s) for s in args.set_)
    try:
        return TrainConfig(model=args.model, overrides=overrides, **values)
    except ValueError as err:
        raise BadInput(str(err)) from None


def cmd_train(args: argparse.Namespace) -> int:
    from bench.cli import BadInput, check_writable_dir, resolve_device_arg

    command = ["deqbench", *sys.argv[1:]]
    if args.device is not None:
        resolve_device_arg(args.device)
    try:
        if args.resume:
            if not args.out:
                raise BadInput("--resume needs --out: the run directory to continue")
            given = [opt for opt, dest, _ in OPTIONS if getattr(args, dest) is not None]
            given += ["--model"] * bool(args.model) + ["--set"] * bool(args.set_)
            if given:
                raise BadInput(f"--resume continues {args.out} with the settings it started with; "
                               f"drop {', '.join(given)}")
            trainer = Trainer.resume(Path(args.out), progress=not args.no_progress,
                                     device=args.device, command=command)
        else:
            config = config_from_args(args)
            from models import model_spec

            model_spec(config.model)  # an unknown name fails here, listing the valid ones
            out = Path(args.out) if args.out else default_out_dir(config.model)
            if (out / CHECKPOINT).exists() or (out / LOG).exists():
                raise BadInput(f"{out} already holds a training run; use --resume to continue it "
                               "or choose another --out")
            check_writable_dir(out)
            trainer = Trainer(config, out, progress=not args.no_progress, command=command)
    except (CorpusError, ValueError) as err:
        raise BadInput(str(err)) from None
    for line in header_lines(trainer):
        print(line, file=sys.stderr)
    outcome = trainer.run()
    for line in summary_lines(trainer, outcome):
        print(line)
    return EXIT_INTERRUPTED if outcome.status == "interrupted" else 0


def default_out_dir(model: str, root: Path = Path("results/train")) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out, n = root / f"{model}-{stamp}", 1
    while out.exists():
        n += 1
        out = root / f"{model}-{stamp}-{n}"
    return out


def header_lines(trainer: Trainer) -> list[str]:
    c, corpus = trainer.config, trainer.corpus
    lines = [corpus.describe()]
    if corpus.source is not None:
        lines.append(f"best achievable perplexity for segments of {c.seq_len} read without memory: "
                     f"{corpus.optimal_ppl(c.seq_len):.3f}")
    model = trainer.model
    depth = getattr(model.config, "depth", None)
    lines.append(
        f"{c.model} ({c.size}{f', depth {depth}' if depth else ''}): "
        f"{_num_params(model, False):,} parameters, {_num_params(model, True):,} non-embedding; "
        f"{'resuming at step ' + str(trainer.step) if trainer.step else 'training'} on {trainer.device}"
        f" -> {trainer.out}")
    return lines


def summary_lines(trainer: Trainer, o: Outcome) -> list[str]:
    lines = []
    if o.status == "interrupted":
        lines.append(f"interrupted at step {o.steps}; checkpoint saved. Continue with: "
                     f"deqbench train --resume --out {trainer.out}")
        return lines
    if o.status == "diverged":
        lines.append(f"DIVERGED at step {o.steps}: the training loss or gradient is not finite")
    speed = f"{o.tokens_per_s:,.0f} tokens/s" if o.tokens_per_s else "—"
    where = (f" on steps {', '.join(map(str, o.memory_steps))}" if o.memory_source == "tracked"
             else " over all steps" if o.memory_source else "")
    peak = (f"peak {o.peak_bytes / 1e6:,.1f} MB ({o.memory_source}{where})" if o.peak_bytes
            else "peak memory not measured")
    nfe = f"; NFE {o.nfe_forward:.1f} forward" if o.nfe_forward else ""
    if o.nfe_forward and o.nfe_backward is not None:
        nfe += f" / {o.nfe_backward:.1f} backward"
    lines.append(f"{o.steps} steps in {o.train_s:,.1f} s of training: {speed}; {peak}{nfe}")
    ppl = [f"train {_exp(o.train_loss):.3f}" if o.train_loss is not None else None,
           f"valid {o.valid_ppl:.3f}" if o.valid_ppl else None,
           f"test {o.test_ppl:.3f}" if o.test_ppl else None]
    lines.append("perplexity: " + ", ".join(p for p in ppl if p))
    reached = o.valid_ppl or o.test_ppl
    if o.optimal_ppl and reached:
        lines.append(f"best achievable: {o.optimal_ppl:.3f} ({reached / o.optimal_ppl - 1:+.1%} to go)")
    if o.unigram_ppl and o.test_ppl:
        lines.append(f"unigram perplexity of the test text: {o.unigram_ppl:.1f} "
                     f"(test is {o.test_ppl / o.unigram_ppl:.1%} of it)")
    if trainer.out is not None:
        lines.append(f"run: {trainer.out} ({LOG}, {SUMMARY}, {CHECKPOINT})")
    return lines
