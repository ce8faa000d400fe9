"""The training loop: the bench's own step on real data, observed by the bench's instruments.

`Trainer` only orchestrates: the step is `bench.measure.Bench.step()` (the step every benchmark
row measures) fed with the corpus's segments; live bytes come from the `tracked` instrument on
a few sampled steps (CPU) or `torch_cuda` over each log row's steps (CUDA); step times are
summarised by `bench.measure.timing.step_statistics`, the function behind every row's timing
columns. What the loop adds is the recipe: Adam with linear warm-up then cosine decay, gradient
clipping, segment memory carried between steps (reset at each pass over the data), the DEQ
pretraining phase (`model.pretrain = True`: tied layers unrolled instead of solving), periodic
validation, checkpoints and a log.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import signal
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from bench.data import Batches, Corpus, load_corpus
from bench.errors import CheckpointError
from bench.measure.instrument import MEMORY
from bench.measure.memory import TorchCudaMemory, TrackedMemory
from bench.measure.timing import step_statistics
from bench.measure.workload import Bench
from bench.results import csv_text
from bench.train.checkpoint import (
    LOG,
    corpus_digest,
    load_checkpoint,
    pack_memory,
    unpack_memory,
    write_checkpoint,
)
from bench.train.config import TrainConfig, lr_factor
from bench.train.records import Outcome, Sums, exp

SUMMARY = "train.json"
LOG_COLUMNS = ("step", "epoch", "lr", "loss", "ppl", "grad_norm", "tokens_per_s", "elapsed_s",
               "pretrain", "nfe_forward", "nfe_backward", "residual_forward", "residual_backward",
               "peak_bytes", "memory_source", "valid_loss", "valid_ppl")
SOLVER_STATS = ("nfe_forward", "nfe_backward", "residual_forward", "residual_backward")


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
        threads = c.threads if c.threads is not None else (1 if self.device.type == "cpu" else None)
        if threads is not None:
            torch.set_num_threads(threads)
        self.threads = torch.get_num_threads()
        self.corpus = corpus if corpus is not None else load_corpus(c.data, c.splits, max_vocab=c.max_vocab)
        c.check_corpus(self.corpus)
        self.bench = Bench(c.workload(str(self.device), self.corpus.vocab_size), lr=c.lr,
                           weight_decay=c.weight_decay, clip=c.clip, grad_norm=True, keep_loss=True)
        self.model = self.bench.model
        self.optimizer = self.bench.optimizer
        assert self.optimizer is not None  # a train-phase bench has one
        self.is_deq = self.model.spec.is_deq
        self.train_data = Batches(self.corpus.train, c.batch, c.seq_len)
        # Data position and state carried between steps (the segment memory is the bench's).
        self.step = 0
        self.epoch = 0
        self.position = 0
        self.elapsed = 0.0
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
        self._saved_at = _now()  # when the last checkpoint was written (checkpoint_seconds)
        self._cuda_window: TorchCudaMemory | None = None  # torch_cuda over this log row's steps
        on_cuda = self.device.type == "cuda"
        wanted = memory_instruments if memory_instruments is not None else ("torch_cuda", "tracked")
        self.memory_source = ("torch_cuda" if on_cuda and "torch_cuda" in wanted
                              else "tracked" if not on_cuda and "tracked" in wanted else None)

    # -- checkpoints ---------------------------------------------------------------------------
    @classmethod
    def resume(cls, out: Path, *, progress: bool = False, device: str | None = None,
               command: list[str] | None = None) -> Trainer:
        state = load_checkpoint(out)
        config = TrainConfig.from_json(state["config"])
        if device is not None:
            config = dataclasses.replace(config, device=device)
        trainer = cls(config, out, progress=progress, command=command)
        if state["corpus_digest"] != corpus_digest(trainer.corpus):
            raise CheckpointError(f"the corpus {config.data} changed since {out} was checkpointed; "
                                  "resume needs the same data")
        trainer._load_state(state)
        trainer._truncate_log()
        return trainer

    def state(self) -> dict[str, Any]:
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        return {
            "config": self.config.to_json(), "corpus_digest": corpus_digest(self.corpus),
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "step": self.step, "epoch": self.epoch, "position": self.position,
            "elapsed": self.elapsed, "memory": pack_memory(self.bench.memory), "rng": rng,
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
        self.bench.memory = unpack_memory(s["memory"], self.device)
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
        if self.out is not None:
            write_checkpoint(self.out, self.state())
            self._saved_at = _now()

    def _truncate_log(self) -> None:
        """Drop log rows written after the checkpoint (a run killed between checkpoints)."""
        import csv

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
        if self.step == 0:  # a run killed before any other checkpoint still resumes
            self.save_checkpoint()
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
                checkpoint_now = (c.checkpoint_every and self.step % c.checkpoint_every == 0) or (
                    not c.checkpoint_every and evaluate) or (
                    c.checkpoint_seconds and _now() - self._saved_at >= c.checkpoint_seconds)
                if checkpoint_now and not last:
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
        c, bench, model = self.config, self.bench, self.model
        model.train()
        pretrain = self._pretraining()
        if hasattr(model, "pretrain"):
            model.pretrain = pretrain
        for group in self.optimizer.param_groups:
            group["lr"] = c.lr * lr_factor(self.step, self.progress_fraction, c.warmup)
        x, y = self.train_data.segment(self.position)
        bench.feed(x, y)
        tracked = TrackedMemory() if self._track_this_step(pretrain) else None
        if self.memory_source == "torch_cuda" and self.sums.steps == 0:
            self._cuda_window = TorchCudaMemory()
            self._cuda_window.start(bench, MEMORY)
        _sync(self.device)
        t0 = time.perf_counter()
        if tracked is not None:
            tracked.start(bench, MEMORY)
        stats = bench.step()
        if tracked is not None:
            tracked.stop(bench, MEMORY)
        _sync(self.device)
        seconds = time.perf_counter() - t0
        assert bench.loss is not None and bench.grad_norm is not None
        loss_value, grad_norm = bench.loss.item(), float(bench.grad_norm)
        bench.loss = bench.grad_norm = None  # nothing of this step outlives it
        self.elapsed += seconds
        self.step += 1
        s = self.sums
        s.steps += 1
        s.loss += loss_value
        s.grad_norm += grad_norm
        s.tokens += y.numel()
        if tracked is None:
            s.times.append(seconds)
            self.step_times.append(seconds)
        else:
            peak = tracked.results()["tracked_bytes"]
            s.peak_bytes = max(s.peak_bytes or 0, peak)
            self.peaks.append((self.step, peak))
        s.add_stat("pretrain", float(pretrain))
        for name in SOLVER_STATS:
            s.add_stat(name, getattr(stats, name))
        if stats.memory is not None:
            self.uses_memory = True
        self.position += 1
        if self.position == self.train_data.full:  # a pass over the data: start the streams again
            self.position, self.epoch, bench.memory = 0, self.epoch + 1, None
        if not (math.isfinite(loss_value) and math.isfinite(grad_norm)):
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
        return mean, exp(mean)

    # -- logging -------------------------------------------------------------------------------
    def _log_row(self, validate: bool) -> None:
        s = self.sums
        if s.steps == 0:
            return
        loss = s.loss / s.steps
        peak = s.peak_bytes
        if self._cuda_window is not None:  # read before evaluating: training steps only
            self._cuda_window.stop(self.bench, MEMORY)
            peak = self._cuda_window.results()["cuda_peak_bytes"]
            self.peaks.append((self.step, peak))
            self._cuda_window = None
        valid = None
        if validate and self.corpus.valid is not None:
            valid = self.evaluate(self.corpus.valid)
            self.last_valid = valid
        row = {
            "step": self.step, "epoch": self.epoch,
            "lr": self.optimizer.param_groups[0]["lr"], "loss": loss, "ppl": exp(loss),
            "grad_norm": s.grad_norm / s.steps,
            "tokens_per_s": step_statistics(s.times, self.tokens_per_step).get("tokens_per_s"),
            "elapsed_s": self.elapsed, "pretrain": s.mean("pretrain"),
            **{n: s.mean(n) for n in SOLVER_STATS},
            "peak_bytes": peak, "memory_source": self.memory_source if peak is not None else None,
            "valid_loss": valid[0] if valid else None, "valid_ppl": valid[1] if valid else None,
        }
        self.curve.append(row)
        self._last_row = row
        self.sums = Sums()
        if self.out is not None:
            path = self.out / LOG
            new = not path.exists() or path.stat().st_size == 0
            with path.open("a", newline="") as fh:
                fh.write(csv_text(LOG_COLUMNS, [row], header=new))

    @property
    def tokens_per_step(self) -> int:
        return self.config.batch * self.config.seq_len

    def _postfix(self) -> str:
        s = self.sums
        parts = [f"loss {s.loss / s.steps:.3f}" if s.steps else ""]
        speed = step_statistics(s.times, self.tokens_per_step).get("tokens_per_s")
        if speed:
            parts.append(f"{speed:,.0f} tok/s")
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
        timing = step_statistics(self.step_times, self.tokens_per_step)
        last = self._last_row
        return Outcome(
            status=self.status, steps=self.step, train_s=self.elapsed,
            train_loss=self.curve[-1]["loss"] if self.curve else None,
            valid_ppl=self.last_valid[1] if self.last_valid else None,
            test_ppl=test[1] if test else None, optimal_ppl=self.optimal_ppl(),
            unigram_ppl=self.corpus.unigram_ppl("test") if self.corpus.test is not None else None,
            tokens_per_s=timing.get("tokens_per_s"), step_s_median=timing.get("step_s_median"),
            step_s_iqr=timing.get("step_s_iqr"),
            peak_bytes=max(b for _, b in self.peaks) if self.peaks else None,
            memory_source=self.memory_source if self.peaks else None,
            memory_steps=[step for step, _ in self.peaks],
            **{n: last.get(n) for n in SOLVER_STATS},
            params=self.bench.num_params(), params_nonembed=self.bench.num_params(non_embedding=True),
            threads=self.threads, curve=list(self.curve),
        )

    def _write_summary(self, outcome: Outcome) -> None:
        if self.out is None:
            return
        from bench.env import capture
        from bench.results import write_json

        corpus = self.corpus
        summary = {
            "config": self.config.to_json(),
            "model_config": dataclasses.asdict(self.model.config),
            "corpus": {"name": corpus.name, "files": corpus.files, "vocab_size": corpus.vocab_size,
                       "tokens": {r: len(s) for r in ("train", "valid", "test")
                                  if (s := corpus.split(r)) is not None},
                       "entropy_rate": corpus.source.entropy_rate if corpus.source else None},
            "result": dataclasses.asdict(outcome) | {"curve": None},
            "command": self.command,
            "env": capture(str(self.device), self.command),
        }
        write_json(self.out / SUMMARY, summary)


def _now() -> float:
    return time.monotonic()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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
