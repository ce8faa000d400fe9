"""TrellisNet (Bai, Kolter, Koltun, ICLR 2019) and DEQ-TrellisNet (NeurIPS 2019).

A TrellisNet layer is one weight-shared, kernel-2 causal convolution with LSTM-style gates. The
state at every layer is z = [h; c], each of h_size = nhid + nout channels; channels-first
(B, 2 * h_size, T), the layout conv1d wants, so nothing is transposed inside the layer:

    gates_t = u_t + W_0 h_{t-1} + W_1 h_t          (4 * h_size channels: i, o, f | g)
    c_t     = sigma(f_t) * c_{t-1} + sigma(i_t) * tanh(g_t)   (c of the previous layer, one step back)
    h_t     = sigma(o_t) * tanh(c_t)

u, the input injection, is a kernel-2 causal conv of the inputs computed once per forward and
added at every layer. The output is the last nout channels of h. `deq-trellisnet` solves
z* = f(z*; u) with the DEQ engine; the explicit `trellisnet` / `trellisnet-ckpt` baselines
(baselines/trellisnet.py) apply the same cell L times. All of them are `TrellisNetModel`s and
differ only in `realise`, so their parameters are identical by construction.

Segments: the previous segment's last timestep (z and the injected input x) is the causal history
at t = -1, passed as `memory` and returned in `stats.memory`. For the DEQ this makes a split
sequence solve to exactly the same fixed point as the whole one. (The explicit model, like the
original, uses the final layer's history at every layer.)

Chunked solve (`subseq_len`, models/chunked.py), as the official DEQ-TrellisNet does (locuslab/deq
3fba434, DEQModel/models/trellisnets/deq_trellisnet_forward_backward.py, lines 30-37 and 59-66:
`uss = us[:, :, t:t+subseq_len]`, `z0_temp = res[:, :, -1:]`): the injection is computed once for
the whole segment and sliced, and chunk k's causal history is chunk k-1's last timestep (with its
gradient). So chunking changes only the solves (their size, Broyden's history, NFE), not the
equilibrium: the chunked fixed point is the whole segment's.

Options: `weight_dropout` (TrellisNet's temporal DropConnect, models/deq's WeightDrop too: a
fresh element-wise mask on the t-1 tap of both convs' weight directions v, once per forward, in
training; weight norm then normalises the dropped v); variational `dropout` / `dropouth`; heads
(models/heads.py: the full head ties its decoder to the embedding when nout == d_model, split
cuts that decoder, adaptive is Transformer-XL's).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.base import BenchModel
from models.chunked import solve_chunks
from models.deq import DEQ, DEQSettings
from models.heads import AdaptiveEmbedding, AdaptiveSoftmax, HeadSettings, SplitSoftmax
from models.registry import ModelSpec, register_model
from models.stats import ModelStats

Step = Callable[[Tensor], Tensor]  # one layer: z (B, 2H, T) -> z (B, 2H, T)
# TrellisNet's (and the DEQ-TrellisNet's) WT103 split-softmax clusters (word_wt103.py).
WT103_SPLITS = (2_800, 20_000, 76_000)


@dataclass(frozen=True, kw_only=True)
class TrellisNetShape(HeadSettings):
    """Fields every TrellisNet model shares (the DEQ and the explicit baselines)."""

    d_model: int = 8  # embedding width (ninp); the core-mode input width
    nhid: int = 8
    nout: int = 8  # output channels: the last nout of h; the LM head is tied when nout == d_model
    vocab_size: int = 64
    dropout: float = 0.0  # variational dropout on the injected input and on the output
    dropouth: float = 0.0  # variational dropout on h before the recurrent conv (one mask per forward)
    weight_dropout: float = 0.0  # temporal DropConnect on both convs (official wdrop), in training
    weight_norm: bool = True  # on both convs, per output channel
    init_std: float = 0.01  # N(0, init_std) conv weights: small enough to be contractive at init

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("dropout", "dropouth", "weight_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")

    @property
    def h_size(self) -> int:
        return self.nhid + self.nout


@dataclass(frozen=True, kw_only=True)
class DEQTrellisNetConfig(DEQSettings, TrellisNetShape):
    pretrain_depth: int = 40  # tied layers unrolled while `model.pretrain` (the official scripts: 40)


# Cell shapes shared by the whole family. PTB: embedding 400 = nout (tied decoder), nhid 1000;
# WT103: embedding 500 = nout, nhid 1500 (the DEQ-TrellisNet scripts). Dropouts from the same
# scripts (dropouti = dropout; dropouth).
# Sizes name their split-softmax clusters (cutoffs; used only with head=split|adaptive); PTB's
# 10k vocabulary has a full softmax in the official code.
SHAPES: dict[str, dict[str, object]] = {
    # debug: tiny on purpose. At batch 2 x seq 32 one layer's activations (7 * h_size * B * T
    # floats) must outweigh the weights (~8 * h_size * (h_size + d_model), x4 with grads and Adam)
    # for the memory-vs-depth trend to show; the paper sizes are far on the activation side.
    "debug": dict(d_model=8, nhid=8, nout=8, vocab_size=64, cutoffs=(8, 24), div_val=2),
    # small: the default run's measured size, where activations dominate a training step's peak
    "small": dict(d_model=64, nhid=64, nout=64, vocab_size=1024, cutoffs=(128, 512), div_val=2),
    "paper-ptb": dict(d_model=400, nhid=1000, nout=400, vocab_size=10_000, dropout=0.45, dropouth=0.28),
    "paper-wt103": dict(d_model=500, nhid=1500, nout=500, vocab_size=267_735, dropout=0.1, dropouth=0.1,
                        cutoffs=WT103_SPLITS),
}
DEQ_SIZES = {
    "debug": {**SHAPES["debug"], "pretrain_depth": 8},
    "small": {**SHAPES["small"], "pretrain_depth": 16},
    "paper-ptb": SHAPES["paper-ptb"],
    "paper-wt103": SHAPES["paper-wt103"],
    # locuslab/deq 3fba434 run_wt103_deq_trellisnet.sh: the paper-wt103 shapes, caps 45/45, chunks
    # of 50 (its segment is 100 long), 40 pretraining layers; wdrop 0 (the script's default).
    "paper-wt103-official": {**SHAPES["paper-wt103"], "max_iter": 45, "b_max_iter": 45,
                             "subseq_len": 50, "pretrain_depth": 40},
}


class TrellisNetMemory(NamedTuple):
    """Causal history: the previous segment's last timestep (detached)."""

    z: Tensor  # (B, 2H, 1): [h; c]
    x: Tensor  # (B, d_model, 1): the injected input


def variational_dropout(x: Tensor, p: float, training: bool) -> Tensor:
    """Dropout with one mask per sample and channel, shared over time. x: (B, C, T)."""
    if not training or p == 0.0:
        return x
    return x * _mask(x, x.shape[1], p)


def _mask(like: Tensor, channels: int, p: float) -> Tensor:
    """A scaled Bernoulli keep-mask (B, channels, 1)."""
    return like.new_empty(like.shape[0], channels, 1).bernoulli_(1.0 - p).div_(1.0 - p)


class CausalConv(nn.Module):
    """Weights of a kernel-2 causal conv, (out, in, 2); tap 0 looks at t-1, tap 1 at t.

    With weight norm the weight is g * v / ||v|| per output channel. `effective_weight()` computes
    it; the cell calls it once per forward, never per layer or per solver iteration."""

    def __init__(self, d_in: int, d_out: int, *, bias: bool, weight_norm: bool, init_std: float) -> None:
        super().__init__()
        self.weight_norm = weight_norm
        v = torch.empty(d_out, d_in, 2).normal_(0.0, init_std)
        if weight_norm:
            self.weight_v = nn.Parameter(v)
            self.weight_g = nn.Parameter(v.norm(dim=(1, 2), keepdim=True))  # (out, 1, 1): w = v at init
        else:
            self.weight = nn.Parameter(v)
        self.bias = nn.Parameter(torch.empty(d_out).normal_(0.0, init_std)) if bias else None

    def effective_weight(self, weight_dropout: float = 0.0) -> Tensor:
        """The conv weight; `weight_dropout` > 0 drops elements of its t-1 tap (of v under weight
        norm, which then normalises what is left), as TrellisNet's temporal WeightDrop."""
        v = self.weight_v if self.weight_norm else self.weight
        if weight_dropout > 0.0:
            v = torch.cat((F.dropout(v[:, :, :1], weight_dropout), v[:, :, 1:]), dim=2)
        if not self.weight_norm:
            return v
        return v * (self.weight_g / v.norm(dim=(1, 2), keepdim=True))


class TrellisNetCell(nn.Module):
    """The shared layer. `prepare` hoists everything that does not change with depth (injection,
    weight norm, dropout mask, history) and returns the layer as a function of z alone."""

    def __init__(self, config: TrellisNetShape) -> None:
        super().__init__()
        self.h_size, self.nout = config.h_size, config.nout
        self.dropouth, self.weight_dropout = config.dropouth, config.weight_dropout
        gates = 4 * config.h_size
        opts = dict(weight_norm=config.weight_norm, init_std=config.init_std)
        # One bias serves both convs (two would only add up): it lives on the injection, added once.
        self.inject = CausalConv(config.d_model, gates, bias=True, **opts)
        self.recur = CausalConv(config.h_size, gates, bias=False, **opts)

    def initial_state(self, x: Tensor) -> Tensor:
        return x.new_zeros(x.shape[0], 2 * self.h_size, x.shape[2])  # (B, 2H, T)

    def prepare(self, x: Tensor, memory: TrellisNetMemory | None = None) -> Prepared:
        """x: injected input (B, d_model, T). Returns f: z (B, 2H, T) -> z (B, 2H, T), which also
        gives the layer over any span of the sequence (`Prepared.span`, for a chunked solve)."""
        H = self.h_size
        if memory is None:  # the sequence starts here: zero history
            batch = x.shape[0]
            memory = TrellisNetMemory(x.new_zeros(batch, 2 * H, 1), x.new_zeros(batch, x.shape[1], 1))
        drop = self.weight_dropout if self.training else 0.0
        w_rec = self.recur.effective_weight(drop)  # (4H, H, 2)
        x = torch.cat((memory.x, x), dim=2)  # (B, d, T + 1): x_{-1}, ..., x_{T-1}
        u = F.conv1d(x, self.inject.effective_weight(drop), self.inject.bias)  # (B, 4H, T)
        # (B, H, 1): one mask for every layer / solver iteration / chunk of this forward
        mask = _mask(u, H, self.dropouth) if self.training and self.dropouth > 0.0 else None
        return Prepared(u, w_rec, mask, memory.z, H)

    def output(self, z: Tensor) -> Tensor:
        return z[:, self.h_size - self.nout : self.h_size]  # (B, nout, T): the last nout channels of h


class Prepared:
    """One forward's layer: callable on the whole sequence's z (B, 2H, T); `span(start, stop,
    history)` is the same layer on positions [start, stop) with the causal history (B, 2H, 1)
    at start - 1 (a chunk of the solve). The injection, weights and mask are shared by all.

    `inputs` are the tensors it closes over that may carry a gradient (the mask never does), and
    `on(inputs)` the same layer on others: the DEQ's implicit backward applies it once to cuts of
    them, so that the step never differentiates the layer with respect to z* (models/deq.py)."""

    def __init__(self, u: Tensor, w_rec: Tensor, mask: Tensor | None, history: Tensor, H: int) -> None:
        self.u, self.w_rec, self.mask, self.history, self.H = u, w_rec, mask, history, H
        self._whole = _layer(u, w_rec, mask, history, H)

    def __call__(self, z: Tensor) -> Tensor:
        return self._whole(z)

    @property
    def inputs(self) -> tuple[Tensor, Tensor, Tensor]:
        return self.u, self.w_rec, self.history

    def on(self, inputs: tuple[Tensor, Tensor, Tensor]) -> Prepared:
        u, w_rec, history = inputs
        return Prepared(u, w_rec, self.mask, history, self.H)

    def span(self, start: int, stop: int, history: Tensor) -> Prepared:
        return Prepared(self.u[:, :, start:stop], self.w_rec, self.mask, history, self.H)


def _layer(u: Tensor, w_rec: Tensor, mask: Tensor | None, history: Tensor, H: int) -> Step:
    """The TrellisNet layer on u's positions (B, 4H, T'), history (B, 2H, 1) = z one step before."""
    h_prev0, c_prev0 = history.split(H, dim=1)  # (B, H, 1) each: h_{-1}, c_{-1}

    def layer(z: Tensor) -> Tensor:
        h, c = z.split(H, dim=1)  # (B, H, T) views; backward joins their grads with one cat
        h = torch.cat((h_prev0, h), dim=2)  # (B, H, T + 1): h_{-1}, ..., h_{T-1}
        if mask is not None:
            h = h.mul_(mask)  # in place on the fresh cat: no second copy
        # W_0 h_{t-1} + W_1 h_t + u_t; add_ in place: conv1d's backward does not need its output
        i, o, f, g = _lstm_gates(F.conv1d(h, w_rec).add_(u), H)
        c_prev = torch.cat((c_prev0, c[:, :, :-1]), dim=2)  # c of the previous layer, at t - 1
        c = torch.addcmul(i * g, f, c_prev)
        h = o * torch.tanh(c)
        return torch.cat((h, c), dim=1)

    return layer


def _lstm_gates(pre: Tensor, H: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """i, o, f (sigmoid) and g (tanh) from (B, 4H, T) pre-activations laid out [i, o, f | g].

    A function of its own so that nothing keeps the 4H pre-activations alive after it returns
    (backward needs only the activations). split, not slicing: backward builds the 4H grad once."""
    sig, g = pre.split((3 * H, H), dim=1)
    i, o, f = torch.sigmoid(sig).chunk(3, dim=1)
    return i, o, f, torch.tanh(g)


class TrellisNetModel(BenchModel):
    """Embedding -> TrellisNet cell at some depth -> last nout channels of h -> LM head.

    Subclasses say how depth is realised (`realise`): a DEQ solve or L unrolled layers. An
    explicit one may hand back intermediate states for auxiliary losses (`aux`)."""

    def __init__(self, config: TrellisNetShape, mode: str) -> None:
        super().__init__(config, mode)
        self.cell = TrellisNetCell(config)
        c, head = config, self.head_name
        if head in ("full", "split"):
            self.embedding = nn.Embedding(c.vocab_size, c.d_model)
            self.head = nn.Linear(c.nout, c.vocab_size)
            nn.init.uniform_(self.embedding.weight, -0.1, 0.1)
            nn.init.zeros_(self.head.bias)
            if c.nout == c.d_model:  # tied decoder, as in the paper
                self.head.weight = self.embedding.weight
            if head == "split":
                self.head = SplitSoftmax(self.head, c.cutoffs)
        elif head == "adaptive":
            self.embedding = AdaptiveEmbedding(c.vocab_size, c.d_model, c.cutoffs, c.div_val)
            self.head = AdaptiveSoftmax(self.embedding, c.vocab_size, c.cutoffs, c.nout)

    def realise(self, layer: Prepared, z0: Tensor, aux: list[Tensor] | None = None) -> tuple[Tensor, ModelStats]:
        raise NotImplementedError

    def forward(
        self, x: Tensor, targets: Tensor | None = None, memory: TrellisNetMemory | None = None
    ) -> tuple[Tensor, ModelStats]:
        if self.mode == "lm":
            x = self.embedding(x)  # (B, T, d_model)
        x = variational_dropout(x.transpose(1, 2), self.config.dropout, self.training)  # (B, d, T)
        aux_weight = getattr(self.config, "aux_weight", 0.0)
        aux = [] if aux_weight > 0 and self.training and targets is not None else None
        z, stats = self.realise(self.cell.prepare(x, memory), self.cell.initial_state(x), aux)
        # clone: a view would keep the whole (B, 2H, T) state alive until the next segment
        stats.memory = TrellisNetMemory(z[:, :, -1:].detach().clone(), x[:, :, -1:].detach().clone())
        out = self.decode(self._output(z), targets)
        if aux:  # TrellisNet's deep supervision: loss + aux_weight * sum of the aux layers' losses
            out = out + aux_weight * sum(self.decode(self._output(a), targets) for a in aux)
        return out, stats

    def _output(self, z: Tensor) -> Tensor:
        out = variational_dropout(self.cell.output(z), self.config.dropout, self.training)
        return out.transpose(1, 2)  # (B, T, nout)


class DEQTrellisNet(TrellisNetModel):
    """The TrellisNet layer solved to its fixed point (chunk by chunk with `subseq_len`). While
    `pretrain` is True (the first training steps in the paper), `pretrain_depth` tied layers are
    unrolled instead, never chunked."""

    def __init__(self, config: DEQTrellisNetConfig, mode: str) -> None:
        if config.pretrain_depth < 1:
            raise ValueError(f"deq-trellisnet.pretrain_depth must be >= 1, got {config.pretrain_depth}")
        super().__init__(config, mode)
        self.pretrain = False  # set by the trainer for the first steps; applies in train and eval
        self.deq = DEQ.from_config(config)

    def realise(self, layer: Prepared, z0: Tensor, aux: list[Tensor] | None = None) -> tuple[Tensor, ModelStats]:
        if self.pretrain:
            z = z0
            for _ in range(self.config.pretrain_depth):
                z = layer(z)
            return z, ModelStats(nfe_forward=self.config.pretrain_depth)
        T = z0.shape[2]

        def chunk(start: int, stop: int, previous: Tensor | None):
            if (start, stop) == (0, T):
                return layer, z0
            history = layer.history if previous is None else previous[:, :, -1:]  # (B, 2H, 1)
            return layer.span(start, stop, history), z0[:, :, start:stop]

        return solve_chunks(self.deq, T, chunk, dim=2)


register_model(ModelSpec(
    name="deq-trellisnet", family="trellisnet", variant="deq", config=DEQTrellisNetConfig,
    sizes=DEQ_SIZES, build=DEQTrellisNet,
    description="TrellisNet layer (weight-shared kernel-2 causal conv, LSTM gates) at its fixed point",
))
