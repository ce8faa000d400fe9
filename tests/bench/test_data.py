import math
from pathlib import Path

import numpy as np
import pytest
import torch

from bench import data
from bench.data import (
    EOS,
    UNK,
    Batches,
    CorpusError,
    Splits,
    SyntheticSource,
    batchify,
    check_data,
    load_corpus,
    parse_synthetic,
)
from tests.bench.wikitext import WIKITEXT2


def empirical_conditional_entropy(x: np.ndarray, vocab: int, context: int) -> float:
    """Plug-in estimate of H(X_t | previous `context` symbols) from counts, in nats."""
    n = len(x) - context
    ctx = np.zeros(n, dtype=np.int64)
    for i in range(context):
        ctx = ctx * vocab + x[i : i + n]
    joint = np.bincount(ctx * vocab + x[context:], minlength=vocab ** (context + 1)).reshape(-1, vocab)
    p_joint = joint / n
    p_ctx = joint.sum(1, keepdims=True) / n
    nz = joint > 0
    return float(-(p_joint[nz] * np.log((p_joint / np.where(p_ctx > 0, p_ctx, 1))[nz])).sum())


# -- synthetic ------------------------------------------------------------------------------------
# The default source, and two others. (Very peaked rows can make a chain sticky: it mixes slowly
# and a sample's statistics wander; these mix well.)
@pytest.mark.parametrize(("vocab", "order", "alpha", "seed"), [(8, 2, 0.1, 0), (6, 1, 0.3, 3), (4, 3, 0.5, 3)])
def test_synthetic_entropy_rate_matches_a_long_sample(vocab, order, alpha, seed):
    source = SyntheticSource(vocab=vocab, order=order, alpha=alpha, seed=seed)
    x = source.sample(400_000, seed=1).numpy()
    # The plug-in estimate is biased low by about (contexts * (V - 1)) / (2 N): well under 0.01.
    assert empirical_conditional_entropy(x, vocab, order) == pytest.approx(source.entropy_rate, abs=0.01)
    # Shorter contexts (what a segment's first tokens see) match as well.
    for context in range(order):
        assert empirical_conditional_entropy(x, vocab, context) == pytest.approx(
            source.conditional_entropy(context), abs=0.01)


class HandMadeChain(SyntheticSource):
    def transitions(self) -> np.ndarray:
        return np.array([[0.9, 0.1], [0.4, 0.6]])


def test_entropy_rate_of_a_hand_made_chain():
    source = HandMadeChain(vocab=2, order=1)
    P = source.transitions()
    pi = np.array([0.8, 0.2])  # solves pi P = pi by hand: 0.8 * 0.1 = 0.2 * 0.4
    assert source.stationary() == pytest.approx(pi, abs=1e-12)
    assert source.entropy_rate == pytest.approx(-(pi[:, None] * P * np.log(P)).sum(), abs=1e-12)
    assert source.conditional_entropy(0) == pytest.approx(-(pi * np.log(pi)).sum(), abs=1e-12)


def test_segment_optimum_is_worse_than_the_rate_only_beyond_order_one():
    one, two = SyntheticSource(order=1), SyntheticSource(order=2)
    assert one.segment_entropy(32) == pytest.approx(one.entropy_rate, rel=1e-12)
    expected = (two.conditional_entropy(1) + 31 * two.entropy_rate) / 32
    assert two.segment_entropy(32) == pytest.approx(expected, rel=1e-12)
    corpus = load_corpus("synthetic")
    assert corpus.optimal_ppl(32) > corpus.optimal_ppl() == pytest.approx(math.exp(two.entropy_rate))


def test_synthetic_is_seeded_and_peaked():
    a, b = load_corpus("synthetic"), load_corpus("synthetic")
    assert torch.equal(a.train, b.train) and torch.equal(a.test, b.test)
    other = load_corpus("synthetic:seed=1")
    assert not torch.equal(a.train[:1000], other.train[:1000])
    assert a.vocab_size == 8 and len(a.train) == 200_000 and len(a.valid) == len(a.test) == 20_000
    # peaked: far below the uniform source's log V
    assert a.source.entropy_rate < 0.5 * math.log(a.vocab_size)
    assert "best achievable perplexity" in a.describe()


@pytest.mark.parametrize(
    ("spec", "message"),
    [("synthetic:colour=red", "bad synthetic option 'colour=red'"),
     ("synthetic:vocab=eight", "vocab must be int"),
     ("synthetic:vocab=1", "vocab >= 2"),
     ("synthetic:vocab=100,order=3", "too many")],
)
def test_bad_synthetic_options(spec, message):
    with pytest.raises(CorpusError, match=message):
        parse_synthetic(spec)


# -- directories ----------------------------------------------------------------------------------
def write_corpus(root: Path, pattern: str, splits=("train", "valid", "test")) -> Path:
    texts = {
        "train": "the cat sat\n\nthe dog sat on the cat\n",
        "valid": "the bird sat\n",
        "test": "a dog\n",
    }
    root.mkdir(parents=True, exist_ok=True)
    for split in splits:
        (root / pattern.format(split)).write_text(texts[split])
    return root


@pytest.mark.parametrize("pattern", ["wiki.{}.tokens", "ptb.{}.txt", "{}.txt"])
def test_directory_layouts_word_vocabulary_from_train(tmp_path, pattern):
    corpus = load_corpus(str(write_corpus(tmp_path / "c", pattern)), cache_dir=None)
    vocab = corpus.vocab
    assert vocab[:2] == [UNK, EOS]
    assert vocab[2:] == ["the", "cat", "sat", "dog", "on"]  # by count; ties by first appearance
    ids = {w: i for i, w in enumerate(vocab)}
    # every line ends in <eos>, the empty one too (AWD-LSTM's token count)
    train = [ids[w] for w in ["the", "cat", "sat", "<eos>", "<eos>", "the", "dog", "sat", "on", "the", "cat", "<eos>"]]
    assert corpus.train.tolist() == train
    assert corpus.valid.tolist() == [ids["the"], ids[UNK], ids["sat"], ids[EOS]]  # bird unseen
    assert corpus.test.tolist() == [ids[UNK], ids["dog"], ids[EOS]]


def test_missing_split_says_what_was_looked_for(tmp_path):
    root = write_corpus(tmp_path / "c", "{}.txt", splits=("valid", "test"))
    with pytest.raises(CorpusError, match=r"no 'train' split in .*looked for wiki.train.tokens, "
                       r"ptb.train.txt, train.txt; found test.txt, valid.txt"):
        load_corpus(str(root), cache_dir=None)
    with pytest.raises(CorpusError, match="no 'train' split"):
        check_data(str(root))
    # naming the splits to use works with only two files
    corpus = load_corpus(str(root), Splits.for_training_on("valid"), cache_dir=None)
    assert corpus.valid is None and corpus.test is not None
    assert corpus.vocab == [UNK, EOS, "the", "bird", "sat"]
    check_data(str(root), Splits.for_training_on("valid"))


def test_unreadable_files_and_missing_directory(tmp_path):
    root = write_corpus(tmp_path / "c", "{}.txt")
    (root / "valid.txt").write_bytes(b"caf\xe9 au lait\n")  # latin-1, not UTF-8
    with pytest.raises(CorpusError, match=r"valid.txt is not UTF-8 text"):
        load_corpus(str(root), cache_dir=None)
    with pytest.raises(CorpusError, match=r"corpus directory .*nowhere does not exist"):
        load_corpus(str(tmp_path / "nowhere"))
    empty = tmp_path / "e"
    empty.mkdir()
    (empty / "train.txt").write_text("\n\n")
    with pytest.raises(CorpusError, match="holds no words"):
        load_corpus(str(empty), Splits("train", None, None), cache_dir=None)


def test_cache_is_keyed_by_file_contents(tmp_path, monkeypatch):
    root = write_corpus(tmp_path / "c", "{}.txt")
    cache = tmp_path / "cache"
    first = load_corpus(str(root), cache_dir=cache)
    assert len(list(cache.glob("corpus-*.pt"))) == 1

    def no_reading(path):
        raise AssertionError("tokenised again despite the cache")

    monkeypatch.setattr(data, "read_words", no_reading)
    again = load_corpus(str(root), cache_dir=cache)
    assert again.vocab == first.vocab and torch.equal(again.train, first.train)
    monkeypatch.undo()
    (root / "test.txt").write_text("the cat\n")  # a changed file is never served stale
    changed = load_corpus(str(root), cache_dir=cache)
    assert changed.test.tolist() == [changed.vocab.index("the"), changed.vocab.index("cat"), 1]


def test_max_vocab_keeps_the_most_frequent(tmp_path):
    corpus = load_corpus(str(write_corpus(tmp_path / "c", "{}.txt")), max_vocab=4, cache_dir=None)
    assert corpus.vocab == [UNK, EOS, "the", "cat"]
    assert (corpus.train == 0).sum().item() == 4  # sat x2, dog, on


def test_unigram_perplexity():
    corpus = load_corpus("synthetic:vocab=4,order=1")
    corpus.test = torch.arange(4).repeat(100)  # uniform over 4 symbols
    assert corpus.unigram_ppl("test") == pytest.approx(4.0)
    corpus.test = torch.tensor([0, 0, 0, 1])
    p = np.array([0.75, 0.25])
    assert corpus.unigram_ppl("test") == pytest.approx(math.exp(-(p * np.log(p)).sum()))


# -- batching -------------------------------------------------------------------------------------
def test_batchify_gives_contiguous_streams():
    stream = torch.arange(103)
    rows = batchify(stream, 4)
    assert rows.shape == (4, 25)
    for b in range(4):
        assert rows[b].tolist() == list(range(25 * b, 25 * (b + 1)))
    with pytest.raises(CorpusError, match="too short for batch 60"):
        batchify(stream, 60)


def test_segments_are_shifted_pairs_that_continue_each_other():
    stream = torch.arange(4 * 26)
    batches = Batches(stream, batch=4, seq_len=8)  # rows of 26: 25 targets -> 3 full + 1 of 1
    assert (batches.full, batches.total, batches.tokens) == (3, 4, 100)
    segments = list(batches)
    assert [x.shape for x, _ in segments] == [(4, 8)] * 3 + [(4, 1)]
    for x, y in segments:
        assert torch.equal(y, x + 1)  # the next token of a contiguous stream
    inputs = torch.cat([x for x, _ in segments], dim=1)
    assert torch.equal(inputs, batches.data[:, :-1])  # segments tile each row exactly
    assert sum(y.numel() for _, y in segments) == batches.tokens
    with pytest.raises(IndexError):
        batches.segment(4)
    with pytest.raises(CorpusError, match="too short for seq_len 64"):
        Batches(stream, batch=4, seq_len=64)


@pytest.mark.skipif(WIKITEXT2 is None, reason="no WikiText-2 copy (set DEQBENCH_DATA)")
def test_shared_wikitext2_trains_on_valid():
    corpus = load_corpus(str(WIKITEXT2), Splits.for_training_on("valid", "valid", "test"), cache_dir=None)
    # AWD-LSTM's token counts for WikiText-2 (words plus one <eos> per line)
    assert len(corpus.train) == 217_646 and len(corpus.test) == 245_569
    assert corpus.valid is None
    assert 10_000 < corpus.vocab_size < 20_000
    assert 200 < corpus.unigram_ppl("test") < 1000
