"""`gpt2`: Hugging Face's GPT2LMHeadModel, built from a GPT2Config (random init, no download).

The off-the-shelf explicit transformer a user would otherwise train, sized by the family's named
sizes (width, heads, FFN width, depth of `transformer`). In core mode it takes `inputs_embeds`
and returns the last hidden state: the LM head is never run, and the word-embedding table
shrinks to one row, so that core-mode memory holds no word embeddings (the paper's protocol).
Learned position embeddings stay: they are part of what core mode runs.

Heads: `full` is GPT2LMHeadModel's own (tied lm_head, no bias). `adaptive` and `split` feed
GPT-2's transformer through `inputs_embeds` from models/heads.py's input side (the one-row
word table stays unused, as in core mode) and put that head on its last hidden state; the split
head's decoder is tied to its embedding, as GPT-2 ties, with a zero-initialised bias.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from torch import Tensor, nn

from baselines.transformer import TRANSFORMER_SIZES
from models.base import BenchModel
from models.heads import AdaptiveEmbedding, AdaptiveSoftmax, HeadSettings, SplitSoftmax
from models.registry import ModelSpec, register_model
from models.stats import ModelStats


@dataclass(frozen=True, kw_only=True)
class GPT2BenchConfig(HeadSettings):
    d_model: int = 64
    n_head: int = 4
    d_inner: int = 256
    depth: int = 4
    dropout: float = 0.0
    n_positions: int = 1024

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.d_model % self.n_head:
            raise ValueError(f"d_model {self.d_model} must be a multiple of n_head {self.n_head}")


class GPT2(BenchModel):
    # Word embeddings (tied with the LM head), or this head's own input and output side;
    # position embeddings count as non-embedding.
    embedding_names = ("embedding", "inputs", "head")

    def __init__(self, config: GPT2BenchConfig, mode: str) -> None:
        super().__init__(config, mode)
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # built from a config: never reach the hub
        from transformers import GPT2Config, GPT2LMHeadModel  # slow import: only when built

        c, head = config, self.head_name
        vocab = c.vocab_size if head == "full" else 1
        hf_config = GPT2Config(
            vocab_size=vocab, n_positions=config.n_positions, n_embd=config.d_model,
            n_layer=config.depth, n_head=config.n_head, n_inner=config.d_inner,
            resid_pdrop=config.dropout, embd_pdrop=config.dropout, attn_pdrop=config.dropout,
            bos_token_id=vocab - 1, eos_token_id=vocab - 1, use_cache=False,
            attn_implementation="sdpa",
        )
        self.gpt2 = GPT2LMHeadModel(hf_config)
        if head == "split":
            self.inputs = nn.Embedding(c.vocab_size, c.d_model)
            nn.init.normal_(self.inputs.weight, std=hf_config.initializer_range)  # as GPT-2's wte
            decoder = nn.Linear(c.d_model, c.vocab_size)
            decoder.weight = self.inputs.weight
            nn.init.zeros_(decoder.bias)
            self.head = SplitSoftmax(decoder, c.cutoffs)
        elif head == "adaptive":
            self.inputs = AdaptiveEmbedding(c.vocab_size, c.d_model, c.cutoffs, c.div_val)
            self.head = AdaptiveSoftmax(self.inputs, c.vocab_size, c.cutoffs, c.d_model)

    @property
    def embedding(self) -> nn.Module:
        return self.gpt2.transformer.wte

    def forward(
        self, x: Tensor, targets: Tensor | None = None, memory: object = None
    ) -> tuple[Tensor, ModelStats]:
        if memory is not None:
            raise ValueError("gpt2 carries no memory across segments")
        stats = ModelStats(nfe_forward=self.config.depth)
        if self.head_name in ("adaptive", "split"):
            h = self.gpt2.transformer(inputs_embeds=self.inputs(x)).last_hidden_state  # (B, T, d)
            return self.decode(h, targets), stats
        if self.mode == "lm":
            out = self.gpt2(input_ids=x).logits  # (B, T, vocab)
        else:
            out = self.gpt2.transformer(inputs_embeds=x).last_hidden_state  # (B, T, d)
        if targets is not None:
            return self.loss(out, targets), stats
        return out, stats


_GPT2_FIELDS = ("vocab_size", "d_model", "n_head", "d_inner", "depth", "dropout", "cutoffs", "div_val")
# The -official sizes differ from theirs in Transformer-XL's implementation only: not GPT-2's.
GPT2_SIZES: dict[str, dict] = {
    name: {k: v for k, v in size.items() if k in _GPT2_FIELDS}
    for name, size in TRANSFORMER_SIZES.items() if not name.endswith("-official")
}

register_model(ModelSpec(
    name="gpt2", family="transformer", variant="hf", config=GPT2BenchConfig, sizes=GPT2_SIZES,
    build=GPT2, description="transformers' GPT2LMHeadModel from a GPT2Config (no download)",
))
