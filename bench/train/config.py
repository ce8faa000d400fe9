"""The configuration of a training run: the one source of its defaults (the CLI overrides them)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from bench.data import Splits
from bench.errors import CorpusError
from bench.spec import MAX_THREADS

if TYPE_CHECKING:
    from bench.data import Corpus
    from bench.measure.workload import Workload


def option(default: Any, help: str) -> Any:
    """A field that is also a `deqbench train` option (`--train-split` for train_split)."""
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Everything a training run depends on. Invalid values raise ValueError naming the field."""

    model: str
    size: str = option("debug", "named size")
    depth: int | None = option(None, "layers of an explicit model (default: the size's)")
    overrides: tuple[tuple[str, Any], ...] = ()  # model config fields (vocab_size comes from data)
    data: str = option("synthetic", "synthetic, synthetic:KEY=VALUE,... (keys: {synthetic}), or a "
                       "directory with {{train,valid,test}}.txt, wiki.*.tokens or ptb.*.txt")
    train_split: str = option("train", "split to train on")
    valid_split: str | None = option("valid", "split to validate on, or none (default valid; "
                                     "none when training on valid)")
    test_split: str | None = option("test", "split to test on at the end, or none (default test; "
                                    "none when training on test)")
    max_vocab: int | None = option(None, "keep only the most frequent words (the rest are <unk>)")
    steps: int = option(1000, "training steps: the schedule's length")
    max_seconds: float | None = option(None, "wall-clock budget of training steps (the schedule "
                                       "follows it); stops at --steps or here, whichever comes first")
    batch: int = option(16, "streams per batch")
    seq_len: int = option(32, "tokens per segment")
    eval_batch: int | None = option(None, "streams when evaluating (default: --batch)")
    eval_tokens: int | None = option(None, "at most this many tokens per evaluation (default: "
                                     "the whole split)")
    # 5e-3 suits the debug sizes; the paper trained its sizes at ~2.5e-4
    lr: float = option(5e-3, "peak Adam learning rate")
    warmup: int = option(50, "linear warm-up steps")
    clip: float = option(0.5, "gradient-norm clip, 0 = off")
    weight_decay: float = option(0.0, "Adam weight decay")
    pretrain_steps: int | None = option(None, "DEQs: first steps with unrolled tied layers "
                                        "(default: 10%% of the budget)")
    eval_every: int = option(0, "validate every N steps; 0 = at the end only")
    log_every: int = option(10, "steps per train_log.csv row")
    checkpoint_every: int = option(0, "steps between checkpoints; 0 = at validations and the end")
    # Besides those, one before the first step and one every checkpoint_seconds: a run killed
    # at any moment (SIGKILL, a lost machine) resumes, losing at most that much training.
    checkpoint_seconds: float = option(60.0, "also checkpoint when this many seconds passed since "
                                       "the last one (and before the first step); 0 = off")
    seed: int = option(0, "seed of initialisation and dropout")
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # On a CPU one thread by default: debug-sized steps gain nothing from more, and on shared
    # cores a second thread made single steps 100x slower.
    threads: int | None = option(None, "torch intra-op threads (default: 1 on a CPU, torch's "
                                 "default on CUDA)")

    def __post_init__(self) -> None:
        for key, value in self.overrides:  # fields the run sets itself would be overridden
            if key == "vocab_size":
                raise ValueError("vocab_size comes from the corpus; drop --set vocab_size (a "
                                 "directory's vocabulary: --max-vocab; synthetic: synthetic:vocab=N)")
            if key == "depth":
                raise ValueError(f"depth is an option of its own: use --depth {value}, not --set depth={value}")
        for name in ("steps", "batch", "seq_len", "log_every"):
            _check_int(name, getattr(self, name), low=1)
        for name in ("warmup", "eval_every", "checkpoint_every", "seed"):
            _check_int(name, getattr(self, name), low=0)
        for name in ("eval_batch", "eval_tokens", "max_vocab", "depth", "threads", "pretrain_steps"):
            value = getattr(self, name)
            if value is not None:
                _check_int(name, value, low=0 if name == "pretrain_steps" else 1)
        if self.threads is not None and self.threads > MAX_THREADS:
            raise ValueError(f"threads must be <= {MAX_THREADS}, got {self.threads}")
        if self.max_seconds is not None and not (_finite(self.max_seconds) and self.max_seconds > 0):
            raise ValueError(f"max_seconds must be positive and finite, got {self.max_seconds}")
        if not (_finite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be positive and finite, got {self.lr}")
        for name in ("clip", "weight_decay", "checkpoint_seconds"):
            value = getattr(self, name)
            if not (_finite(value) and value >= 0):
                raise ValueError(f"{name} must be a non-negative finite number, got {value}")

    @property
    def splits(self) -> Splits:
        return Splits(self.train_split, self.valid_split, self.test_split)

    def check_corpus(self, corpus: Corpus) -> None:
        """Every split this run reads is long enough for its batches: a short valid or test
        split fails here, before the first step, not at the end of training (CorpusError)."""
        from bench.data import Batches

        for role in ("train", "valid", "test"):
            stream = corpus.split(role)
            batch = self.batch if role == "train" else self.eval_batch or self.batch
            try:
                if stream is not None:
                    Batches(stream, batch, self.seq_len)
            except CorpusError as err:
                fix = "--batch" if role == "train" else f"--eval-batch, or --{role}-split none"
                raise CorpusError(f"the {role} split of {corpus.name} is too short: {err}; give a "
                                  f"smaller --seq-len or {fix}") from None

    def workload(self, device: str, vocab_size: int) -> Workload:
        """The training step as a bench workload: lm mode, the corpus's vocabulary."""
        from bench.measure.workload import Workload

        overrides = {**dict(self.overrides), "vocab_size": vocab_size}
        return Workload(model=self.model, size=self.size, mode="lm", phase="train",
                        batch=self.batch, seq_len=self.seq_len, depth=self.depth,
                        overrides=tuple(sorted(overrides.items())), device=device, seed=self.seed)

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["overrides"] = [list(kv) for kv in self.overrides]
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> TrainConfig:
        d = dict(d)
        d["overrides"] = tuple(tuple(kv) for kv in d.get("overrides", ()))
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_int(name: str, value: Any, *, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value!r}")


def lr_factor(step: int, progress: float, warmup: int) -> float:
    """Linear warm-up over `warmup` steps, then cosine from 1 to 0 over the rest of the budget.
    `progress` in [0, 1] is the fraction of the budget spent (steps, or seconds when timed)."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
