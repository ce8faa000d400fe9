"""DEQ-Transformer (Bai et al. 2019): one transformer cell driven to its equilibrium.

    z* = f(z*; x),  f(z; x) = LN(h + FFN(h)),  h = LN(z + Attention(z; x))   (post-LN)

The input injection is a projection of x to 3·H·dh added to the cell's QKV projection, so x
enters every application of f. `TransformerCell` is also the block of the explicit baselines in
`baselines/transformer.py` (untied, weight-tied unrolled, checkpointed): all share this code.

Everything f needs besides z (injection, positional keys, weight-normed weights, memory keys and
values, dropout masks) is computed once per forward by `TransformerCell.prepare`, never once per
solver iteration: f itself is a handful of matmuls.

Options: attention `relative` (Transformer-XL) or `sdpa`; `pre_ln`; `weight_norm`; dropout
`dropout_style` = `variational` (the DEQ code's: one mask per sequence and channel on the
attention and FFN outputs, fixed across solver iterations, time steps and chunks) or
`elementwise` (Transformer-XL's: fresh masks at every application on the attention output, the
FFN hidden and the FFN output, and `dropatt` on the attention probabilities; a DEQ with it has
no fixed point to converge to, so it is for the explicit baselines); segment memory `mem_len`
(the previous segments' equilibrium states and their inputs, detached: extra keys and values,
the injection included as for any position); heads (models/heads.py); `model.pretrain = True`
unrolls `pretrain_depth` applications of f instead of solving (the paper's warm-up).

Chunked solve (`subseq_len`, models/chunked.py), as the official DEQ-Transformer does
(locuslab/deq 3fba434, DEQModel/models/transformers/deq_transformer_forward_backward.py, lines
33-42 and 66-75: `z0_temp = res` after each chunk, `uss` = the injection of the previous
`prev_len` positions and the chunk's own): chunk 0 attends to the segment memory and to itself
(causally); chunk k >= 1 attends to chunk k-1's equilibrium states (keys and values from those
states plus their own injection, with gradient) and to itself, but not to the segment memory or
to chunks before k-1. So with mem_len 0 and at most two chunks the chunked equilibrium is the
whole segment's; otherwise later chunks see a shorter context (at most 2 · subseq_len keys).
Relative positions count from each chunk's first key. Dropout masks and weight-normed weights
are shared by all chunks (drawn and computed once per forward), the next segment's memory is the
tail of the whole segment, and pretraining (unrolled layers) is never chunked: all as in the
official code.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import weight_norm

from models.attention import (
    ATTENTIONS,
    causal_allowed,
    causal_attention,
    relative_attention,
    relative_distances,
    sinusoid,
)
from models.base import BenchModel
from models.chunked import solve_chunks
from models.deq import DEQ, DEQSettings
from models.heads import AdaptiveEmbedding, AdaptiveSoftmax, HeadSettings, SplitSoftmax
from models.registry import ModelSpec, register_model
from models.stats import ModelStats

WT103_VOCAB = 267_735  # WikiText-103 word vocabulary (the paper used an adaptive softmax)
WT103_CUTOFFS = (20_000, 40_000, 200_000)  # Transformer-XL's and the DEQ code's adaptive clusters
DROPOUT_STYLES = ("variational", "elementwise")
# Init: weight std = gain / sqrt(fan_in). A post-LN cell contracts only where its sublayer outputs
# are dominated by what z does not change (LN(z + a) has gain ~1/std(z + a) along z). So the
# projections that read z are small (0.16: Transformer-XL's std 0.02 at d=64) and the injection and
# attention output large: the debug cell converges in ~10 Broyden steps and under plain iteration.
INIT_GAINS = {"qkv": 0.16, "r_net": 0.16, "inject": 2.0, "out": 2.0, "ff1": 0.5, "ff2": 1.0}


@dataclass(frozen=True, kw_only=True)
class TransformerConfig(HeadSettings):
    """The cell's shape and options, shared by the DEQ and every explicit baseline."""

    d_model: int = 64  # width of z and of core-mode inputs
    n_head: int = 4
    d_head: int = 16
    d_inner: int = 256  # FFN width
    attention: str = "relative"  # one of ATTENTIONS
    pre_ln: bool = False
    ln_affine: bool = False  # the DEQ paper's layer norms have no affine part
    weight_norm: bool = False
    dropout: float = 0.0  # rate of the attention-output and FFN dropouts (see dropout_style)
    dropout_style: str = "variational"  # one of DROPOUT_STYLES
    dropatt: float = 0.0  # attention-probability dropout (Transformer-XL's; elementwise only)
    mem_len: int = 0  # cached positions of the previous segment; 0 = no memory

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.dropout_style not in DROPOUT_STYLES:
            raise ValueError(f"unknown dropout_style {self.dropout_style!r}; valid: {', '.join(DROPOUT_STYLES)}")
        if not 0.0 <= self.dropatt < 1.0:
            raise ValueError(f"dropatt must be in [0, 1), got {self.dropatt}")
        if self.dropatt > 0 and self.dropout_style != "elementwise":
            raise ValueError("dropatt (dropout on attention probabilities, fresh every call) needs "
                             "dropout_style='elementwise'")
        if self.attention not in ATTENTIONS:
            raise ValueError(f"unknown attention {self.attention!r}; valid: {', '.join(ATTENTIONS)}")
        for name in ("d_model", "n_head", "d_head", "d_inner"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")


@dataclass(frozen=True, kw_only=True)
class DEQTransformerConfig(DEQSettings, TransformerConfig):
    b_max_iter: int = 35  # the language-model scripts' backward cap
    pretrain_depth: int = 2  # layers unrolled while model.pretrain is True


@dataclass
class CellInputs:
    """What f needs besides z, prepared once per forward. Shapes: B batch, T segment length,
    M memory length, K = M + T keys, H heads, dh head width, d model width."""

    weights: dict[str, Tensor]  # effective (weight-normed) projection weights
    injection: Tensor | None  # (B, T, 3·H·dh), added to the QKV projection
    memory_kv: Tensor | None  # (B, M, 2, H, dh): keys and values of the memory positions
    positions: Tensor | None  # relative: (H, dh, K), projected distance sinusoids / sqrt(dh)
    allowed: Tensor | None  # (T, K) bool causal mask; None: plain causal (sdpa without memory)
    attn_mask: Tensor | None  # (B, 1, d) variational dropout mask on the attention output
    ffn_mask: Tensor | None  # (B, 1, d) variational dropout mask on the FFN output
    dropout: float = 0.0  # elementwise style in training: fresh masks at this rate
    dropatt: float = 0.0  # elementwise style in training: attention-probability dropout


class TransformerCell(nn.Module):
    """One transformer layer; with `inject=True` it is the DEQ cell f(z; x)."""

    def __init__(self, config: TransformerConfig, inject: bool = True) -> None:
        super().__init__()
        c = self.config = config
        d, hd = c.d_model, c.n_head * c.d_head
        self.qkv = nn.Linear(d, 3 * hd, bias=False)
        self.inject = nn.Linear(d, 3 * hd) if inject else None
        self.out = nn.Linear(hd, d, bias=False)
        self.ff1 = nn.Linear(d, c.d_inner)
        self.ff2 = nn.Linear(c.d_inner, d)
        if c.attention == "relative":
            self.r_net = nn.Linear(d, hd, bias=False)
            self.r_w_bias = nn.Parameter(torch.zeros(c.n_head, c.d_head))
            self.r_r_bias = nn.Parameter(torch.zeros(c.n_head, c.d_head))
        self.ln_attn = nn.LayerNorm(d, elementwise_affine=c.ln_affine)
        self.ln_ff = nn.LayerNorm(d, elementwise_affine=c.ln_affine)
        for name, linear in self._linears().items():
            nn.init.normal_(linear.weight, std=INIT_GAINS[name] / linear.in_features**0.5)
            if linear.bias is not None:
                nn.init.zeros_(linear.bias)
            if c.weight_norm:
                weight_norm(linear, dim=0)  # weight = g · v / ||v|| per output row

    def _linears(self) -> dict[str, nn.Linear]:
        names = ("qkv", "inject", "out", "ff1", "ff2", "r_net")
        return {n: m for n in names if isinstance(m := getattr(self, n, None), nn.Linear)}

    # -- once per forward ---------------------------------------------------------------------
    def prepare(
        self, batch: int, seq_len: int, *, x: Tensor | None = None, memory: Tensor | None = None,
        memory_inputs: Tensor | None = None, reuse: CellInputs | None = None,
    ) -> CellInputs:
        """x (B, T, d) feeds the injection (None for a cell without one); memory (B, M, d): the
        states of the memory positions; memory_inputs (B, M, d): their inputs (with injection).
        `reuse`: another prepare's weights and dropout masks (the chunks of one forward)."""
        c = self.config
        # Reading a weight-normed weight recomputes it: read each once, with grad, here.
        if reuse is None:
            weights = {name: linear.weight for name, linear in self._linears().items()}
        else:
            weights = reuse.weights
        param = weights["qkv"]
        injection = None
        if self.inject is not None:
            injection = F.linear(x, weights["inject"], self.inject.bias)  # (B, T, 3·H·dh)
        memory_kv = None
        mem = 0 if memory is None else memory.shape[1]
        if mem:
            kv = slice(c.n_head * c.d_head, None)  # the K and V rows of the projections
            memory_kv = F.linear(self._norm_in(memory), weights["qkv"][kv])  # (B, M, 2·H·dh)
            if self.inject is not None:
                memory_kv = memory_kv + F.linear(memory_inputs, weights["inject"][kv], self.inject.bias[kv])
            memory_kv = memory_kv.view(batch, mem, 2, c.n_head, c.d_head)
        klen = mem + seq_len
        positions = None
        allowed = causal_allowed(seq_len, klen, param.device) if mem or c.attention == "relative" else None
        if c.attention == "relative":
            pos = sinusoid(relative_distances(klen, param.device), c.d_model).to(param.dtype)
            r = F.linear(pos, weights["r_net"]).view(klen, c.n_head, c.d_head)  # (K, H, dh)
            positions = r.permute(1, 2, 0) * c.d_head**-0.5  # (H, dh, K)
        attn_mask = ffn_mask = None
        elementwise = self.training and c.dropout_style == "elementwise"
        if reuse is not None:
            attn_mask, ffn_mask = reuse.attn_mask, reuse.ffn_mask
        elif self.training and c.dropout > 0 and not elementwise:
            keep = 1.0 - c.dropout
            shape = (batch, 1, c.d_model)
            attn_mask = torch.empty(shape, device=param.device, dtype=param.dtype).bernoulli_(keep) / keep
            ffn_mask = torch.empty(shape, device=param.device, dtype=param.dtype).bernoulli_(keep) / keep
        return CellInputs(weights, injection, memory_kv, positions, allowed, attn_mask, ffn_mask,
                          dropout=c.dropout if elementwise else 0.0, dropatt=c.dropatt if elementwise else 0.0)

    # -- f: once per solver iteration ---------------------------------------------------------
    def forward(self, z: Tensor, inputs: CellInputs) -> Tensor:
        """z (B, T, d) -> (B, T, d)."""
        if self.config.pre_ln:
            h = z + self._attend(self.ln_attn(z), inputs)
            return h + self._feed_forward(self.ln_ff(h), inputs)
        h = self.ln_attn(z + self._attend(z, inputs))
        return self.ln_ff(h + self._feed_forward(h, inputs))

    def _attend(self, z: Tensor, s: CellInputs) -> Tensor:
        c = self.config
        B, T, _ = z.shape
        qkv = F.linear(z, s.weights["qkv"])  # (B, T, 3·H·dh)
        if s.injection is not None:
            qkv.add_(s.injection)  # linear's backward does not need its output: in place is safe
        q, k, v = qkv.view(B, T, 3, c.n_head, c.d_head).unbind(2)  # (B, T, H, dh) each
        if s.memory_kv is not None:
            mem_k, mem_v = s.memory_kv.unbind(2)  # (B, M, H, dh)
            k, v = torch.cat((mem_k, k), 1), torch.cat((mem_v, v), 1)  # (B, K, H, dh)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T|K, dh)
        if c.attention == "relative":
            a = relative_attention(q, k, v, s.positions, self.r_w_bias, self.r_r_bias, s.allowed, s.dropatt)
        else:
            a = causal_attention(q, k, v, s.allowed, s.dropatt)
        a = F.linear(a.transpose(1, 2).reshape(B, T, -1), s.weights["out"])  # (B, T, d)
        if s.dropout:
            return F.dropout(a, s.dropout)
        return a if s.attn_mask is None else a.mul_(s.attn_mask)

    def _feed_forward(self, h: Tensor, s: CellInputs) -> Tensor:
        hidden = F.linear(h, s.weights["ff1"], self.ff1.bias).relu_()  # (B, T, d_inner)
        if s.dropout:
            hidden = F.dropout(hidden, s.dropout)
        out = F.linear(hidden, s.weights["ff2"], self.ff2.bias)  # (B, T, d)
        if s.dropout:
            return F.dropout(out, s.dropout)
        return out if s.ffn_mask is None else out.mul_(s.ffn_mask)

    def _norm_in(self, x: Tensor) -> Tensor:
        """What the QKV projection sees of a state x: x itself (post-LN) or LN(x) (pre-LN)."""
        return self.ln_attn(x) if self.config.pre_ln else x


class SegmentMemory(NamedTuple):
    """What a segment attends to of the previous ones: the last mem_len positions, detached."""

    states: Tensor  # (B, M, d) equilibrium states (the keys and values are computed from them)
    inputs: Tensor  # (B, M, d) the inputs that produced them (their injection enters K and V)


def next_memory(memory: Tensor | None, z: Tensor, mem_len: int) -> Tensor | None:
    """The last mem_len positions of [memory; z], detached: the next segment's memory."""
    if mem_len == 0:
        return None
    full = z if memory is None else torch.cat((memory, z), 1)
    return full[:, -mem_len:].detach()


def next_segment_memory(memory: SegmentMemory | None, z: Tensor, x: Tensor, mem_len: int) -> SegmentMemory | None:
    """The next SegmentMemory after a segment with inputs x (B, T, d) and states z (B, T, d)."""
    if mem_len == 0:
        return None
    if memory is None:
        return SegmentMemory(next_memory(None, z, mem_len), next_memory(None, x, mem_len))
    return SegmentMemory(next_memory(memory.states, z, mem_len), next_memory(memory.inputs, x, mem_len))


class TransformerModel(BenchModel):
    """Embedding, core and head around any transformer core; subclasses implement `core`.

    Heads: full = an embedding and an untied output layer; split = the same output layer cut
    into clusters (plus tombstones); adaptive = Transformer-XL's, tied (models/heads.py)."""

    def __init__(self, config: TransformerConfig, mode: str) -> None:
        super().__init__(config, mode)
        c, head = config, self.head_name
        if head in ("full", "split"):
            self.embedding = nn.Embedding(c.vocab_size, c.d_model)
            self.head = nn.Linear(c.d_model, c.vocab_size)
            if head == "split":
                self.head = SplitSoftmax(self.head, c.cutoffs)
        elif head == "adaptive":
            self.embedding = AdaptiveEmbedding(c.vocab_size, c.d_model, c.cutoffs, c.div_val)
            self.head = AdaptiveSoftmax(self.embedding, c.vocab_size, c.cutoffs, c.d_model)

    def core(self, x: Tensor, memory: object) -> tuple[Tensor, ModelStats]:
        raise NotImplementedError

    def forward(
        self, x: Tensor, targets: Tensor | None = None, memory: object = None
    ) -> tuple[Tensor, ModelStats]:
        if memory is not None and self.config.mem_len == 0:
            raise ValueError(f"{type(self).__name__} has mem_len=0: it takes no memory")
        h = self.embedding(x) if self.mode == "lm" else x  # (B, T, d)
        z, stats = self.core(h, memory)
        return self.decode(z, targets), stats


class DEQTransformer(TransformerModel):
    def __init__(self, config: DEQTransformerConfig, mode: str) -> None:
        super().__init__(config, mode)
        self.cell = TransformerCell(config, inject=True)
        self.deq = DEQ.from_config(config)
        self.pretrain = False  # True: unroll pretrain_depth layers of f instead of solving

    def core(self, x: Tensor, memory: SegmentMemory | None) -> tuple[Tensor, ModelStats]:
        B, T, _ = x.shape
        states, memory_inputs = memory_parts(memory)
        if self.pretrain:  # never chunked, as in the official code
            inputs = self.cell.prepare(B, T, x=x, memory=states, memory_inputs=memory_inputs)
            z = torch.zeros_like(x)  # (B, T, d)
            for _ in range(self.config.pretrain_depth):
                z = self.cell(z, inputs)
            stats = ModelStats(nfe_forward=self.config.pretrain_depth)
        else:
            shared: list[CellInputs] = []  # chunk 0's weights and dropout masks, for every chunk
            spans: list[tuple[int, int]] = []

            def chunk(start: int, stop: int, previous: Tensor | None):
                if previous is None:  # chunk 0 attends to the segment memory
                    mem, mem_inputs = states, memory_inputs
                else:  # later chunks to the previous chunk's equilibrium (with its gradient)
                    mem, mem_inputs = previous, x[:, slice(*spans[-1])]
                xs = x if (start, stop) == (0, T) else x[:, start:stop]  # (B, T_chunk, d)
                inputs = self.cell.prepare(B, stop - start, x=xs, memory=mem, memory_inputs=mem_inputs,
                                           reuse=shared[0] if shared else None)
                if not shared:  # nothing chunk-sized: that goes with chunk 0's f
                    shared.append(dataclasses.replace(inputs, injection=None, memory_kv=None,
                                                      positions=None, allowed=None))
                spans.append((start, stop))
                return (lambda z: self.cell(z, inputs)), torch.zeros_like(xs)

            z, stats = solve_chunks(self.deq, T, chunk, dim=1)
        stats.memory = next_segment_memory(memory, z, x, self.config.mem_len)
        return z, stats


def memory_parts(memory: SegmentMemory | None) -> tuple[Tensor | None, Tensor | None]:
    """(states, inputs) of a SegmentMemory, or (None, None); prepare takes them apart."""
    if memory is None:
        return None, None
    if not isinstance(memory, SegmentMemory):
        raise TypeError(f"memory must be the SegmentMemory a previous segment returned, got {type(memory).__name__}")
    return memory.states, memory.inputs


def cell_fields(size: dict) -> dict:
    """The TransformerConfig part of a size (drops solver fields): to build the same cell."""
    names = {f.name for f in dataclasses.fields(TransformerConfig)}
    return {k: v for k, v in size.items() if k in names}


# Non-embedding parameter counts (core mode) are checked against PAPER.md in the tests. Every
# size names its adaptive clusters (cutoffs, div_val); they are used only with head=adaptive|split.
DEQ_TRANSFORMER_SIZES: dict[str, dict] = {
    # weight norm as in the paper sizes: without it the debug cell drifts out of its contraction
    # within a few hundred training steps (every solve then hits its iteration caps)
    "debug": dict(d_model=32, n_head=4, d_head=8, d_inner=128, vocab_size=256, weight_norm=True,
                  cutoffs=(32, 128), div_val=2),
    # small: the default run's measured size, where activations dominate a training step's peak
    "small": dict(d_model=128, n_head=4, d_head=32, d_inner=512, vocab_size=1024, weight_norm=True,
                  cutoffs=(128, 512), div_val=2),
    # 4.5M: the small DEQ-Transformer (WT103); a wide FFN carries most parameters.
    "paper-small": dict(
        d_model=256, n_head=8, d_head=32, d_inner=7_650, vocab_size=WT103_VOCAB, weight_norm=True,
        dropout=0.05, mem_len=150, cutoffs=WT103_CUTOFFS, div_val=4,
    ),
    # 43M: the medium DEQ-Transformer, at the official WT103 width (10 heads x 70).
    "paper-medium": dict(
        d_model=700, n_head=10, d_head=70, d_inner=27_900, vocab_size=WT103_VOCAB, weight_norm=True,
        dropout=0.05, mem_len=150, cutoffs=WT103_CUTOFFS, div_val=4,
    ),
    # 71M: the 2019 WT103 script as it stands (locuslab/deq 3fba434, run_wt103_deq_transformer.sh):
    # d_inner 48000, adaptive div_val 4, caps 30/40, the 150-token segment solved in chunks of 75.
    "paper-medium-official": dict(
        d_model=700, n_head=10, d_head=70, d_inner=48_000, vocab_size=WT103_VOCAB, weight_norm=True,
        dropout=0.05, mem_len=150, cutoffs=WT103_CUTOFFS, div_val=4, max_iter=30, b_max_iter=40,
        subseq_len=75,
    ),
}

register_model(ModelSpec(
    name="deq-transformer", family="transformer", variant="deq", config=DEQTransformerConfig,
    sizes=DEQ_TRANSFORMER_SIZES, build=DEQTransformer,
    description="one post-LN transformer cell solved to equilibrium (Bai et al. 2019)",
))
