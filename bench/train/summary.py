"""What `deqbench train` prints: the corpus and model before, the outcome after."""

from __future__ import annotations

from bench.train.checkpoint import CHECKPOINT
from bench.train.loop import LOG, SUMMARY, Outcome, Trainer, exp


def header_lines(trainer: Trainer) -> list[str]:
    c, corpus = trainer.config, trainer.corpus
    lines = [corpus.describe()]
    if corpus.source is not None:
        lines.append(f"best achievable perplexity for segments of {c.seq_len} read without memory: "
                     f"{corpus.optimal_ppl(c.seq_len):.3f}")
    bench = trainer.bench
    depth = getattr(trainer.model.config, "depth", None)
    lines.append(
        f"{c.model} ({c.size}{f', depth {depth}' if depth else ''}): "
        f"{bench.num_params():,} parameters, {bench.num_params(non_embedding=True):,} non-embedding; "
        f"{'resuming at step ' + str(trainer.step) if trainer.step else 'training'} on {trainer.device}"
        f" ({trainer.threads} thread{'s' if trainer.threads > 1 else ''}) -> {trainer.out}")
    return lines


def summary_lines(trainer: Trainer, o: Outcome) -> list[str]:
    lines = []
    if o.status == "interrupted":
        lines.append(f"interrupted at step {o.steps}; checkpoint saved. Continue with: "
                     f"deqbench train --resume --out {trainer.out}")
        return lines
    if o.status == "diverged":
        lines.append(f"DIVERGED at step {o.steps}: the training loss or gradient is not finite")
    speed = f"{o.tokens_per_s:,.0f} tokens/s (median step)" if o.tokens_per_s else "—"
    where = (f" on steps {', '.join(map(str, o.memory_steps))}" if o.memory_source == "tracked"
             else " over all steps" if o.memory_source else "")
    peak = (f"peak {o.peak_bytes / 1e6:,.1f} MB ({o.memory_source}{where})" if o.peak_bytes
            else "peak memory not measured")
    nfe = f"; NFE {o.nfe_forward:.1f} forward" if o.nfe_forward else ""
    if o.nfe_forward and o.nfe_backward is not None:
        nfe += f" / {o.nfe_backward:.1f} backward"
    lines.append(f"{o.steps} steps in {o.train_s:,.1f} s of training: {speed}; {peak}{nfe}")
    ppl = [f"train {exp(o.train_loss):.3f}" if o.train_loss is not None else None,
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
