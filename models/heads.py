"""Output heads: what turns token ids into the core's inputs and its outputs into a loss.

    head = "none"      core mode: embedded inputs (B, T, d) in, the last hidden state out
    head = "full"      token embedding + one softmax over the whole vocabulary
    head = "adaptive"  Transformer-XL's adaptive input and adaptive softmax (Baevski & Auli;
                       Grave et al.): the vocabulary in clusters split at `cutoffs`, cluster i
                       `d // div_val**i` wide, output tables tied to the input tables
    head = "split"     TrellisNet's split softmax (AWD-LSTM's SplitCrossEntropyLoss): the full
                       head's output layer cut at `cutoffs`, one extra "tombstone" logit per tail
                       cluster in the head softmax; the plain token embedding

`head` relates to the model's `mode`: core mode is head `none` and nothing else; lm mode (token
ids (B, T)) takes `full` (its default), `adaptive` or `split`. `resolve_head` says so in its
errors.

Both clustered heads compute p(w) = p_head(cluster(w)) · p_cluster(w | cluster), exactly: the
loss equals the cross-entropy of the full distribution those clusters define. Unlike the
official code (Transformer-XL's ProjectedAdaptiveLogSoftmax, TrellisNet's splitcross.py) they
never select the positions whose target falls in a cluster (nonzero / masked_select): a row
count that depends on the targets' values is unknowable to fake tensors, so `predicted` could
not see these heads. Instead, every shape here depends only on (B, T) and the cutoffs:
- the head cluster (shortlist + one logit per tail cluster) as in the official code: its
  (B·T, cutoffs[0] + clusters) log-probabilities are kept for backward;
- each tail cluster's log-normaliser for every position, computed in column blocks of
  `TAIL_BLOCK` words and recomputed in backward (`_TailLogNormalizer`): (B·T,) kept, not
  (B·T, cluster size); the target word's logit from one gathered row per position.
So the head's memory does not depend on the data; the official code's tail memory (rows of
the tail clusters' targets × cluster size) does, and is not counted here.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

HEADS = ("none", "full", "adaptive", "split")
LM_HEADS = ("full", "adaptive", "split")
CLUSTERED = ("adaptive", "split")
TAIL_BLOCK = 8192  # words per block of a tail cluster's log-normaliser (bounds its transient)


@dataclass(frozen=True, kw_only=True)
class HeadSettings:
    """The head fields every model config shares. `cutoffs` and `div_val` are named data per
    size; they matter only to the clustered heads (`adaptive`, `split`)."""

    vocab_size: int = 256
    head: str | None = None  # None: the mode's (core -> none, lm -> full); see resolve_head
    cutoffs: tuple[int, ...] = ()  # first word of each tail cluster, increasing, < vocab_size
    div_val: int = 1  # adaptive: cluster i is d // div_val**i wide (1: one table, no projections)

    def __post_init__(self) -> None:
        check_head(self.head)
        # a list from TOML, or None: no tail clusters
        object.__setattr__(self, "cutoffs", tuple(self.cutoffs or ()))
        cutoffs = self.cutoffs
        if any(isinstance(c, bool) or not isinstance(c, int) for c in cutoffs):
            raise ValueError(f"cutoffs must be ints, got {cutoffs!r}")
        if list(cutoffs) != sorted(set(cutoffs)) or (cutoffs and cutoffs[0] < 1):
            raise ValueError(f"cutoffs must be positive and strictly increasing, got {cutoffs!r}")
        if self.div_val < 1:
            raise ValueError(f"div_val must be >= 1, got {self.div_val}")
        if self.head in CLUSTERED and cutoffs and cutoffs[-1] >= self.vocab_size:
            v = self.vocab_size
            example = f", e.g. ({max(1, v // 4)}, {max(2, v // 2)})" if v >= 4 else ""
            raise ValueError(f"cutoffs {cutoffs} must lie below vocab_size {v}: choose smaller "
                             f"cutoffs{example}, or () for a single cluster")


def check_head(head: str | None) -> None:
    if head is not None and head not in HEADS:
        raise ValueError(f"unknown head {head!r}; valid heads: {', '.join(HEADS)}")


def resolve_head(head: str | None, mode: str) -> str:
    """The head a model of `mode` builds: None picks the mode's default; a head that
    contradicts the mode is an error naming the valid ones."""
    check_head(head)
    if head is None:
        return "none" if mode == "core" else "full"
    if mode == "core" and head != "none":
        raise ValueError(f"head {head!r} needs mode 'lm' (token ids in, a loss over the vocabulary "
                         "out); core mode takes embedded inputs and has head 'none'")
    if mode == "lm" and head == "none":
        raise ValueError(f"head 'none' is core mode's (embedded inputs, no output layer); "
                         f"valid heads in lm mode: {', '.join(LM_HEADS)}")
    return head


def cluster_bounds(vocab: int, cutoffs: tuple[int, ...]) -> list[tuple[int, int]]:
    """[first, last + 1) word of each cluster: the head cluster, then the tails."""
    edges = (0, *cutoffs, vocab)
    return list(itertools.pairwise(edges))


def cluster_widths(d: int, n_clusters: int, div_val: int) -> list[int]:
    widths = [d // div_val**i for i in range(n_clusters)]
    if widths[-1] < 1:
        raise ValueError(f"div_val {div_val} leaves cluster {n_clusters - 1} of a {d}-wide model "
                         "without a dimension; use fewer cutoffs or a smaller div_val")
    return widths


class AdaptiveEmbedding(nn.Module):
    """Transformer-XL's adaptive input: tokens (B, T) -> (B, T, d) · sqrt(d).

    div_val 1: one (vocab, d) table. Otherwise cluster i has its own (size_i, d // div_val**i)
    table and a (d, width_i) projection up to d; every position looks up every cluster (index
    clamped into it) and keeps its own cluster's vector, so shapes do not depend on the tokens.
    Initialised so that each cluster's scaled vector has unit variance, like the full head's
    nn.Embedding."""

    def __init__(self, vocab: int, d: int, cutoffs: tuple[int, ...], div_val: int) -> None:
        super().__init__()
        self.d, self.scale, self.div_val = d, d**0.5, div_val
        self.bounds = cluster_bounds(vocab, cutoffs) if div_val > 1 else [(0, vocab)]
        self.widths = cluster_widths(d, len(self.bounds), div_val)
        self.tables = nn.ModuleList(nn.Embedding(hi - lo, w) for (lo, hi), w in zip(self.bounds, self.widths, strict=True))
        self.projs = nn.ParameterList(
            nn.Parameter(torch.randn(d, w) * w**-0.5) for w in self.widths
        ) if div_val > 1 else nn.ParameterList()
        for table in self.tables:
            nn.init.normal_(table.weight, std=d**-0.5)

    def forward(self, tokens: Tensor) -> Tensor:
        if self.div_val == 1:
            return self.tables[0](tokens) * self.scale
        out = None
        for (lo, hi), table, proj in zip(self.bounds, self.tables, self.projs, strict=True):
            inside = ((tokens >= lo) & (tokens < hi)).unsqueeze(-1)  # (B, T, 1)
            vectors = F.linear(table((tokens - lo).clamp(0, hi - lo - 1)), proj)  # (B, T, d)
            vectors = torch.where(inside, vectors, 0.0)
            out = vectors if out is None else out + vectors
        return out * self.scale


@dataclass
class Cluster:
    """One cluster's output layer: logits = proj(h) @ weight.T + bias."""

    weight: Tensor  # (words, width)
    bias: Tensor  # (words,)
    proj: Tensor | None  # (d_hidden, width), or None when h is already `width` wide


class ClusteredSoftmax(nn.Module):
    """The exact two-level softmax both clustered heads share (see the module docstring).

    forward(h (B, T, d), targets (B, T)) -> mean negative log-likelihood;
    forward(h) -> log-probabilities (B, T, vocab), every cluster evaluated densely."""

    def __init__(self, vocab: int, cutoffs: tuple[int, ...]) -> None:
        super().__init__()
        self.vocab, self.cutoffs = vocab, cutoffs
        self.bounds = cluster_bounds(vocab, cutoffs)

    def clusters(self) -> list[Cluster]:
        """Cluster 0 first, its weight and bias with one row per tail cluster appended."""
        raise NotImplementedError

    def forward(self, hidden: Tensor, targets: Tensor | None = None) -> Tensor:
        h = hidden.reshape(-1, hidden.shape[-1])  # (N, d)
        clusters = self.clusters()
        shortlist = self.bounds[0][1]
        head_lp = F.log_softmax(_wide(_logits(h, clusters[0])), dim=-1)  # (N, shortlist + tails)
        if targets is None:
            parts = [head_lp[:, :shortlist]]
            for i, cluster in enumerate(clusters[1:]):
                tail = F.log_softmax(_wide(_logits(h, cluster)), dim=-1)
                parts.append(head_lp[:, shortlist + i, None] + tail)
            return torch.cat(parts, dim=-1).view(*hidden.shape[:-1], self.vocab)
        t = targets.reshape(-1)  # (N,)
        which = torch.zeros_like(t)  # the cluster of each target: 0 = head
        for cutoff in self.cutoffs:
            which += t >= cutoff
        column = torch.where(which == 0, t, shortlist + which - 1)
        logp = head_lp.gather(1, column[:, None]).squeeze(1)  # (N,)
        for i, (cluster, (lo, hi)) in enumerate(zip(clusters[1:], self.bounds[1:], strict=True), 1):
            x = h if cluster.proj is None else F.linear(h, cluster.proj.t())  # (N, width)
            local = (t - lo).clamp(0, hi - lo - 1)
            target_logit = (x * F.embedding(local, cluster.weight)).sum(-1) + cluster.bias.gather(0, local)
            normaliser = _TailLogNormalizer.apply(x, cluster.weight, cluster.bias)  # (N,)
            logp = logp + torch.where(which == i, _wide(target_logit) - normaliser, 0.0)
        return -logp.mean()


def _wide(t: Tensor) -> Tensor:
    """Half-precision logits in float32 for the softmax (as the full head's loss); else as is."""
    return t.float() if t.element_size() < 4 else t


def _logits(h: Tensor, cluster: Cluster) -> Tensor:
    x = h if cluster.proj is None else F.linear(h, cluster.proj.t())
    return F.linear(x, cluster.weight, cluster.bias)


class _TailLogNormalizer(torch.autograd.Function):
    """log Σ_j exp(x · w_j + b_j) over one tail cluster, (N, width) -> (N,), in blocks of
    TAIL_BLOCK words; backward recomputes each block's softmax instead of keeping (N, words)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
        lse = x.new_full((x.shape[0],), -math.inf, dtype=_wide(x).dtype)
        for start in range(0, weight.shape[0], TAIL_BLOCK):
            block = slice(start, start + TAIL_BLOCK)
            logits = _wide(torch.addmm(bias[block], x, weight[block].t()))  # (N, block)
            lse = torch.logaddexp(lse, logits.logsumexp(dim=1))
        ctx.save_for_backward(x, weight, bias, lse)
        return lse

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, weight, bias, lse = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad
        grad_x = torch.zeros_like(x) if need_x else None
        grad_w = torch.empty_like(weight) if need_w else None
        grad_b = torch.empty_like(bias) if need_b else None
        for start in range(0, weight.shape[0], TAIL_BLOCK):
            block = slice(start, start + TAIL_BLOCK)
            logits = _wide(torch.addmm(bias[block], x, weight[block].t()))
            p = logits.sub_(lse[:, None]).exp_().mul_(grad[:, None]).to(x.dtype)  # softmax · grad
            if need_x:
                grad_x.addmm_(p, weight[block])
            if need_w:
                torch.mm(p.t(), x, out=grad_w[block])
            if need_b:
                grad_b[block] = p.sum(0)
        return grad_x, grad_w, grad_b


class AdaptiveSoftmax(ClusteredSoftmax):
    """Transformer-XL's adaptive softmax, tied to an AdaptiveEmbedding (its tables are the output
    weights, as with tie_weight). Own parameters: one bias per word, the tail clusters' logit
    vectors and biases in the head (zero-initialised, as Transformer-XL's cluster_weight), and
    the projections from the hidden width d_hidden to each cluster's width where they differ:
    div_val 1 needs one only when d_hidden != d; with div_val > 1 the head cluster has its own and
    the tails reuse the embedding's (Transformer-XL's tie_projs for WT103) when d_hidden == d."""

    def __init__(self, embedding: AdaptiveEmbedding, vocab: int, cutoffs: tuple[int, ...], d_hidden: int) -> None:
        super().__init__(vocab, cutoffs)
        self.embedding = [embedding]  # a list: the tables are the embedding's parameters, not ours
        n = len(self.bounds)
        width0 = embedding.widths[0]
        self.bias = nn.Parameter(torch.zeros(vocab))
        self.cluster_weight = nn.Parameter(torch.zeros(n - 1, width0))
        self.cluster_bias = nn.Parameter(torch.zeros(n - 1))
        self.projs = nn.ParameterList()
        self.proj_of: list[int | None] = []  # per cluster: an index into self.projs, or None
        for i in range(n):
            width = width0 if embedding.div_val == 1 else embedding.widths[i]
            if embedding.div_val == 1 and d_hidden == width:
                self.proj_of.append(None)
            elif embedding.div_val == 1 and i > 0:
                self.proj_of.append(self.proj_of[0])
            elif i > 0 and d_hidden == embedding.d:
                self.proj_of.append(-i)  # the embedding's projection i (tied)
            else:
                self.projs.append(nn.Parameter(torch.randn(d_hidden, width) * d_hidden**-0.5))
                self.proj_of.append(len(self.projs) - 1)

    def clusters(self) -> list[Cluster]:
        emb = self.embedding[0]
        out = []
        for i, (lo, hi) in enumerate(self.bounds):
            weight = emb.tables[0].weight[lo:hi] if emb.div_val == 1 else emb.tables[i].weight
            bias = self.bias[lo:hi]
            if i == 0:
                weight = torch.cat((weight, self.cluster_weight))
                bias = torch.cat((bias, self.cluster_bias))
            k = self.proj_of[i]
            proj = None if k is None else (emb.projs[-k] if k < 0 else self.projs[k])
            out.append(Cluster(weight, bias, proj))
        return out


class SplitSoftmax(ClusteredSoftmax):
    """TrellisNet's split softmax over an existing output layer `decoder` (the full head's, tied
    or not as there): the clusters are slices of its weight and bias; own parameters are the
    tombstones, one (d_hidden,) vector and one bias per tail cluster (zero-initialised)."""

    def __init__(self, decoder: nn.Linear, cutoffs: tuple[int, ...]) -> None:
        super().__init__(decoder.out_features, cutoffs)
        self.decoder = decoder
        self.tombstones = nn.Parameter(torch.zeros(len(cutoffs), decoder.in_features))
        self.tombstone_bias = nn.Parameter(torch.zeros(len(cutoffs)))

    def clusters(self) -> list[Cluster]:
        w, b = self.decoder.weight, self.decoder.bias
        out = []
        for i, (lo, hi) in enumerate(self.bounds):
            weight, bias = w[lo:hi], b[lo:hi]
            if i == 0:
                weight = torch.cat((weight, self.tombstones))
                bias = torch.cat((bias, self.tombstone_bias))
            out.append(Cluster(weight, bias, None))
        return out
