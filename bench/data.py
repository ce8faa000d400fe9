"""Corpora for training and evaluation: a synthetic source with a known optimum, or real text.

    corpus = load_corpus("synthetic")                       # seeded order-2 Markov source
    corpus = load_corpus("synthetic:vocab=16,order=1")     # options after a colon
    corpus = load_corpus("data/wikitext-2")                # a directory in a usual layout
    corpus = load_corpus("../shared/data/wikitext-2", splits=Splits("valid", None, "test"))
    train = Batches(corpus.train, batch=16, seq_len=32)     # 16 contiguous streams
    x, y = train.segment(0)                                 # (16, 32) inputs, next-token targets

**synthetic**: a random Markov chain of order k over V symbols whose transition rows are drawn
from a Dirichlet(alpha) (small alpha: a few likely successors per context). Its entropy rate is
computed exactly from the stationary distribution, so the best perplexity any model can reach is
known. One chain is sampled from stationarity and cut into train, valid and test.

**directory**: `wiki.{split}.tokens` (WikiText), `ptb.{split}.txt` (Penn Treebank) or
`{split}.txt`. Word level: whitespace tokens, `<eos>` at the end of every line (AWD-LSTM style),
a vocabulary built from the training split only, everything else `<unk>`. Token tensors are
cached under a hash of the files' contents, so a changed file is never served from a stale cache.

**batching**: a split's token stream is cut into B equal contiguous streams, one per batch row
(Transformer-XL / AWD-LSTM), and read in segments of seq_len; a segment's targets are its inputs
shifted by one, so consecutive segments of a row continue each other and segment memory is valid.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import math
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from bench.errors import CorpusError

if TYPE_CHECKING:  # imported where used: `deqbench --help` must not wait for torch
    import numpy as np
    from torch import Tensor

UNK, EOS = "<unk>", "<eos>"
LAYOUTS = ("wiki.{}.tokens", "ptb.{}.txt", "{}.txt")  # file name patterns, in lookup order
ROLES = ("train", "valid", "test")
MAX_CONTEXTS = 4096
CACHE_VERSION = 1  # bump when the tokenisation changes, so old caches are not reused


@dataclass
class Corpus:
    """Token streams (1-D int64) for the roles train / valid / test; valid or test may be None."""

    name: str
    vocab: list[str]  # id -> token
    train: Tensor
    valid: Tensor | None
    test: Tensor | None
    source: SyntheticSource | None = None  # the generator, for synthetic corpora
    files: dict[str, str] = field(default_factory=dict)  # role -> file read

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def split(self, role: str) -> Tensor | None:
        if role not in ROLES:
            raise ValueError(f"unknown split role {role!r}; valid: {', '.join(ROLES)}")
        return getattr(self, role)

    def unigram_ppl(self, role: str = "test") -> float:
        """Perplexity of the best context-free model of this split: its own unigram distribution
        (an oracle bound for models that ignore context; trained models should end well below)."""
        import torch

        stream = self.split(role)
        if stream is None:
            raise ValueError(f"corpus {self.name} has no {role} split")
        counts = torch.bincount(stream, minlength=self.vocab_size).double()
        p = counts[counts > 0] / stream.numel()
        return math.exp(-(p * p.log()).sum().item())

    def optimal_ppl(self, seq_len: int | None = None) -> float | None:
        """Synthetic only: the lowest expected perplexity any model can reach. Without `seq_len`
        (or with segment memory) it is exp(entropy rate); for segments of `seq_len` read without
        memory it is higher, as a segment's first tokens see less context than the source uses."""
        if self.source is None:
            return None
        return math.exp(self.source.segment_entropy(seq_len) if seq_len else self.source.entropy_rate)

    def describe(self) -> str:
        sizes = ", ".join(f"{r} {len(s):,}" for r in ROLES if (s := self.split(r)) is not None)
        text = f"{self.name}: vocabulary {self.vocab_size:,}; tokens {sizes}"
        if self.source is not None:
            text += (f"; entropy rate {self.source.entropy_rate:.4f} nats/token, "
                     f"best achievable perplexity {self.optimal_ppl():.3f}")
        return text


# -- synthetic ------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class SyntheticSource:
    """A stationary Markov chain of order `order` over `vocab` symbols with Dirichlet(alpha)
    transition rows; the same seed gives the same chain and the same samples."""

    vocab: int = 8
    order: int = 2
    alpha: float = 0.1  # Dirichlet concentration: small = peaked rows, low entropy
    seed: int = 0
    tokens: int = 200_000  # training tokens; valid and test get eval_tokens each
    eval_tokens: int = 20_000

    def __post_init__(self) -> None:
        if (self.vocab < 2 or self.order < 1 or not 0 < self.alpha < math.inf or self.tokens < 2
                or self.eval_tokens < 2):
            raise CorpusError("synthetic corpus needs vocab >= 2, order >= 1, alpha > 0 (finite), tokens >= 2 "
                              f"and eval_tokens >= 2, got {self}")
        if self.vocab**self.order > MAX_CONTEXTS:  # the stationary solve is dense in contexts
            raise CorpusError(f"synthetic corpus: vocab**order = {self.vocab**self.order} contexts "
                              f"is too many (at most {MAX_CONTEXTS}); lower vocab or order")

    @property
    def num_contexts(self) -> int:
        return self.vocab**self.order

    def transitions(self) -> np.ndarray:
        """(V^k, V) next-symbol probabilities; context index = sum of x_{t-i} V^(i-1) in base V
        with the newest symbol least significant."""
        import numpy as np

        rng = np.random.default_rng([self.seed, 0])
        rows = rng.gamma(self.alpha, size=(self.num_contexts, self.vocab))
        rows += 1e-12  # no row of exact zeros, however small alpha is
        return rows / rows.sum(1, keepdims=True)

    def next_context(self) -> np.ndarray:
        """(V^k, V) context index after seeing symbol v in context c."""
        import numpy as np

        c = np.arange(self.num_contexts)[:, None]
        return (c * self.vocab) % self.num_contexts + np.arange(self.vocab)[None]

    def stationary(self) -> np.ndarray:
        """(V^k,) stationary distribution over contexts: solves pi = pi P, sum(pi) = 1."""
        import numpy as np

        P, nxt = self.transitions(), self.next_context()
        n = self.num_contexts
        M = np.zeros((n, n))
        np.add.at(M, (np.repeat(np.arange(n), self.vocab), nxt.ravel()), P.ravel())  # context chain
        A = np.vstack([M.T - np.eye(n), np.ones((1, n))])
        b = np.zeros(n + 1)
        b[-1] = 1.0
        pi = np.linalg.lstsq(A, b, rcond=None)[0]
        return np.clip(pi, 0.0, None) / np.clip(pi, 0.0, None).sum()

    @property
    def entropy_rate(self) -> float:
        """H(X_t | X_{t-k..t-1}) in nats: sum over contexts of pi(c) H(P[c])."""
        return self.conditional_entropy(self.order)

    def conditional_entropy(self, context: int) -> float:
        """H(X_t | the previous `context` symbols) under stationarity, in nats. For context <
        order it is a difference of block entropies of the stationary context distribution."""
        import numpy as np

        context = min(context, self.order)
        if context == self.order:
            P, pi = self.transitions(), self.stationary()
            return float(-(pi[:, None] * P * np.log(P)).sum())
        blocks = self.stationary().reshape((self.vocab,) * self.order)  # axes: oldest .. newest
        return _entropy(blocks.sum(tuple(range(self.order - context - 1))).ravel()) - _entropy(
            blocks.sum(tuple(range(self.order - context))).ravel())

    def segment_entropy(self, seq_len: int) -> float:
        """Mean best loss over a segment read without memory: position j predicts from j + 1
        symbols of context (its input and those before it in the segment)."""
        return sum(self.conditional_entropy(j + 1) for j in range(seq_len)) / seq_len

    def sample(self, n: int, seed: int) -> Tensor:
        """n consecutive symbols of the chain started from its stationary distribution."""
        import numpy as np
        import torch

        rng = np.random.default_rng([self.seed, 1, seed])
        cum = np.cumsum(self.transitions(), 1)
        cum[:, -1] = 1.0
        cum_rows, nxt = cum.tolist(), self.next_context().tolist()
        pi = self.stationary()
        context = int(rng.choice(self.num_contexts, p=pi))
        out = [0] * n
        last = self.vocab - 1
        for i, u in enumerate(rng.random(n).tolist()):  # a plain loop: ~0.3 us per symbol
            v = min(bisect.bisect_right(cum_rows[context], u), last)
            out[i] = v
            context = nxt[context][v]
        return torch.tensor(out, dtype=torch.long)

    def corpus(self) -> Corpus:
        return _synthetic_corpus(self)

    def _generate(self) -> Corpus:
        stream = self.sample(self.tokens + 2 * self.eval_tokens, seed=0)
        train, valid, test = stream.split([self.tokens, self.eval_tokens, self.eval_tokens])
        name = (f"synthetic(vocab={self.vocab}, order={self.order}, alpha={self.alpha:g}, "
                f"seed={self.seed})")
        return Corpus(name=name, vocab=[str(i) for i in range(self.vocab)], train=train.clone(),
                      valid=valid.clone(), test=test.clone(), source=self)


@functools.lru_cache(maxsize=4)
def _synthetic_corpus(source: SyntheticSource) -> Corpus:
    """Generated once per process and source (a second of pure Python per 200k tokens)."""
    return source._generate()


def _entropy(p: np.ndarray) -> float:
    import numpy as np

    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


SYNTHETIC_KEYS = {"vocab": int, "order": int, "alpha": float, "seed": int, "tokens": int,
                  "eval_tokens": int}


def parse_synthetic(spec: str) -> SyntheticSource:
    """'synthetic' or 'synthetic:vocab=8,order=1,alpha=0.2,seed=3,tokens=100000'."""
    _, _, options = spec.partition(":")
    values: dict[str, int | float] = {}
    for item in filter(None, (s.strip() for s in options.split(","))):
        key, eq, raw = item.partition("=")
        if not eq or key not in SYNTHETIC_KEYS:
            raise CorpusError(f"bad synthetic option {item!r}; use key=value with keys "
                              f"{', '.join(SYNTHETIC_KEYS)}, e.g. synthetic:vocab=8,order=1")
        try:
            values[key] = SYNTHETIC_KEYS[key](raw)
        except ValueError:
            raise CorpusError(f"synthetic option {key} must be {SYNTHETIC_KEYS[key].__name__}, "
                              f"got {raw!r}") from None
    return SyntheticSource(**values)


# -- text directories -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Splits:
    """Which file split plays each role; valid or test may be None (not evaluated)."""

    train: str = "train"
    valid: str | None = "valid"
    test: str | None = "test"

    @classmethod
    def for_training_on(cls, train: str = "train", valid: str | None = "valid",
                        test: str | None = "test") -> Splits:
        """Defaults that never evaluate on the split trained on (e.g. train on `valid`)."""
        return cls(train, None if valid == train else valid, None if test == train else test)


def find_split(directory: Path, split: str) -> Path:
    for pattern in LAYOUTS:
        path = directory / pattern.format(split)
        if path.is_file():
            return path
    looked = ", ".join(p.format(split) for p in LAYOUTS)
    present = sorted(p.name for p in directory.iterdir() if p.is_file()) if directory.is_dir() else []
    raise CorpusError(f"no {split!r} split in {directory} (looked for {looked}; found "
                      f"{', '.join(present) or 'no files'}); name another split or none for it")


def read_words(path: Path) -> list[list[str]]:
    """Lines of whitespace-separated words, each ending in <eos>."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise CorpusError(f"{path} is not UTF-8 text ({err.reason} at byte {err.start})") from None
    except OSError as err:
        raise CorpusError(f"cannot read {path}: {err.strerror or err}") from None
    return [[*line.split(), EOS] for line in text.splitlines()]


def build_vocab(lines: list[list[str]], max_size: int | None = None) -> list[str]:
    """<unk>, <eos>, then words by descending count (ties: first appearance); at most max_size."""
    counts = Counter(w for line in lines for w in line)
    words = [w for w, _ in counts.most_common() if w not in (UNK, EOS)]  # most_common is stable
    vocab = [UNK, EOS, *words]
    return vocab if max_size is None else vocab[:max_size]


def encode(lines: list[list[str]], vocab: list[str]) -> Tensor:
    import torch

    index = {w: i for i, w in enumerate(vocab)}
    unk = index[UNK]
    return torch.tensor([index.get(w, unk) for line in lines for w in line], dtype=torch.long)


def default_cache_dir() -> Path | None:
    root = os.environ.get("DEQBENCH_CACHE") or os.environ.get("XDG_CACHE_HOME")
    return Path(root) / "deqbench" if root else Path.home() / ".cache" / "deqbench"


def load_text_corpus(directory: Path, splits: Splits = Splits(), max_vocab: int | None = None,
                     cache_dir: Path | None = None) -> Corpus:
    if not directory.is_dir():
        raise CorpusError(_no_directory(directory))
    if max_vocab is not None and max_vocab < 2:
        raise CorpusError(f"max_vocab must be at least 2 (<unk>, <eos>), got {max_vocab}")
    files = {role: find_split(directory, name) for role, name in
             (("train", splits.train), ("valid", splits.valid), ("test", splits.test)) if name}
    digest = hashlib.sha256(f"v{CACHE_VERSION} max_vocab={max_vocab}".encode())
    for role, path in files.items():
        digest.update(f"{role}:".encode())
        digest.update(_file_hash(path).encode())
    key = digest.hexdigest()[:24]
    cached = _read_cache(cache_dir, key)
    if cached is None:
        train_lines = read_words(files["train"])
        if len(train_lines) == 0 or all(len(line) == 1 for line in train_lines):
            raise CorpusError(f"training split {files['train']} holds no words")
        vocab = build_vocab(train_lines, max_vocab)
        streams = {"train": encode(train_lines, vocab)}
        for role in ("valid", "test"):
            if role in files:
                streams[role] = encode(read_words(files[role]), vocab)
        cached = {"vocab": vocab, "streams": streams}
        _write_cache(cache_dir, key, cached)
    streams = cached["streams"]
    return Corpus(name=str(directory), vocab=cached["vocab"], train=streams["train"],
                  valid=streams.get("valid"), test=streams.get("test"),
                  files={role: str(p) for role, p in files.items()})


def _file_hash(path: Path) -> str:
    h = hashlib.sha256()
    try:
        with path.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    except OSError as err:
        raise CorpusError(f"cannot read {path}: {err.strerror or err}") from None
    return h.hexdigest()


def _read_cache(cache_dir: Path | None, key: str) -> dict | None:
    import torch

    if cache_dir is None:
        return None
    path = cache_dir / f"corpus-{key}.pt"
    try:
        return torch.load(path, weights_only=True) if path.is_file() else None
    except Exception:  # a damaged cache is rebuilt, never fatal
        return None


def _write_cache(cache_dir: Path | None, key: str, data: dict) -> None:
    """Best effort: a read-only or missing cache directory only costs re-tokenising next time."""
    import torch

    if cache_dir is None:
        return
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = cache_dir / f"corpus-{key}.pt.{os.getpid()}.tmp"
        torch.save(data, tmp)
        tmp.replace(cache_dir / f"corpus-{key}.pt")
    except OSError:
        pass


def check_data(spec: str, splits: Splits | None = None) -> None:
    """The cheap checks of `load_corpus`, reading nothing: options parse, files exist."""
    if spec == "synthetic" or spec.startswith("synthetic:"):
        parse_synthetic(spec)
        return
    directory = Path(spec).expanduser()
    if not directory.is_dir():
        raise CorpusError(_no_directory(directory))
    splits = splits or Splits()
    for name in (splits.train, splits.valid, splits.test):
        if name:
            find_split(directory, name)


def _no_directory(directory: Path) -> str:
    return (f"corpus directory {directory} does not exist; give a directory with train/valid/test "
            f"files ({', '.join(LAYOUTS)}) or 'synthetic'")


def load_corpus(spec: str, splits: Splits | None = None, *, max_vocab: int | None = None,
                cache_dir: Path | str | None = "default") -> Corpus:
    """`synthetic[:options]` or a directory. `splits` picks files for the roles (directories)."""
    if spec == "synthetic" or spec.startswith("synthetic:"):
        if splits not in (None, Splits()):
            raise CorpusError("the synthetic corpus has fixed train/valid/test splits; drop the split options")
        if max_vocab is not None:
            raise CorpusError("the synthetic corpus's vocabulary is an option of its own: synthetic:vocab=N")
        return parse_synthetic(spec).corpus()
    cache = default_cache_dir() if cache_dir == "default" else (Path(cache_dir) if cache_dir else None)
    return load_text_corpus(Path(spec).expanduser(), splits or Splits(), max_vocab, cache)


# -- batching -------------------------------------------------------------------------------------
def batchify(stream: Tensor, batch: int) -> Tensor:
    """(N,) -> (B, N // B): row b is the b-th contiguous slice of the stream (the tail dropped)."""
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    per_row = stream.numel() // batch
    if per_row < 2:
        raise CorpusError(f"a split of {stream.numel()} tokens is too short for batch {batch}: "
                          "each of the batch's streams needs at least 2 tokens")
    return stream[: per_row * batch].view(batch, per_row)


class Batches:
    """Segments of B contiguous streams: segment i is columns [i T, (i + 1) T) as inputs and the
    same shifted by one as targets. `full` segments all have length T (training); eval also reads
    the shorter last one."""

    def __init__(self, stream: Tensor, batch: int, seq_len: int) -> None:
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        self.data = batchify(stream, batch)  # (B, N)
        self.batch, self.seq_len = batch, seq_len
        targets = self.data.shape[1] - 1  # the last column is only ever a target
        self.full = targets // seq_len
        self.total = -(-targets // seq_len)
        if self.full < 1:
            raise CorpusError(f"a split of {stream.numel()} tokens gives batch {batch} streams of "
                              f"{self.data.shape[1]} tokens: too short for seq_len {seq_len}")

    @property
    def tokens(self) -> int:
        """Target tokens over all segments."""
        return self.batch * (self.data.shape[1] - 1)

    def segment(self, i: int) -> tuple[Tensor, Tensor]:
        start = i * self.seq_len
        end = min(start + self.seq_len, self.data.shape[1] - 1)
        if not 0 <= start < end:
            raise IndexError(f"segment {i} out of range ({self.total} segments)")
        return self.data[:, start:end], self.data[:, start + 1 : end + 1]  # (B, T) each

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        """Every segment in order, the short last one included."""
        for i in range(self.total):
            yield self.segment(i)
