"""Output heads (models/heads.py): exactness against a by-hand softmax, every head on every model,
names, and predicted == tracked memory."""

import pytest
import torch
import torch.nn.functional as F

from bench.measure import Workload, measure
from models import build_model, heads, list_models, model_spec
from models.heads import AdaptiveEmbedding, AdaptiveSoftmax, SplitSoftmax
from tests.models.sequences import model_inputs

V, D, N = 40, 12, 64
CUTOFFS = (6, 15, 30)


def _reference_log_probs(h, clusters, cutoffs, vocab):
    """Full-vocabulary log-probabilities (N, V) written out by hand: log p(w) is the head
    softmax's log-prob of w (head words) or of w's cluster, plus w's log-prob in its cluster."""
    bounds = [0, *cutoffs, vocab]
    out = torch.empty(h.shape[0], vocab, dtype=torch.float64)
    head = clusters[0]
    x = h if head.proj is None else h @ head.proj
    head_lp = torch.log_softmax(x @ head.weight.T + head.bias, dim=1)
    out[:, : bounds[1]] = head_lp[:, : bounds[1]]
    for i in range(1, len(bounds) - 1):
        c = clusters[i]
        x = h if c.proj is None else h @ c.proj
        tail = torch.log_softmax(x @ c.weight.T + c.bias, dim=1)
        out[:, bounds[i] : bounds[i + 1]] = head_lp[:, bounds[1] + i - 1, None] + tail
    return out


def _randomised(module):
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in module.parameters():  # zero-initialised cluster vectors would hide mistakes
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5)
    return module


def _head(name):
    """(softmax, the modules holding all its parameters: the tied embedding included)."""
    if name == "split":
        softmax = SplitSoftmax(torch.nn.Linear(D, V), CUTOFFS)
        return softmax, torch.nn.ModuleList([softmax])
    div_val = 1 if name == "adaptive-div1" else 2
    emb = AdaptiveEmbedding(V, D, CUTOFFS, div_val)
    softmax = AdaptiveSoftmax(emb, V, CUTOFFS, 7 if name == "adaptive-narrow-hidden" else D)
    return softmax, torch.nn.ModuleList([emb, softmax])


@pytest.mark.parametrize("block", [heads.TAIL_BLOCK, 4])
@pytest.mark.parametrize("name", ["adaptive-div1", "adaptive-div2", "adaptive-narrow-hidden", "split"])
def test_clustered_loss_equals_the_full_softmax_of_its_clusters(name, block, monkeypatch):
    monkeypatch.setattr(heads, "TAIL_BLOCK", block)  # 4: tail normalisers over several blocks
    head, holder = _head(name)
    _randomised(holder)
    width = 7 if name == "adaptive-narrow-hidden" else D
    g = torch.Generator().manual_seed(0)
    h = torch.randn(2, N // 2, width, generator=g, requires_grad=True)
    targets = torch.randint(0, V, (2, N // 2), generator=g)
    targets[0, :4] = torch.tensor([0, CUTOFFS[0], CUTOFFS[1], V - 1])  # every cluster, both ends
    loss = head(h, targets)
    loss.backward()
    params = list(holder.parameters())
    got = [h.grad, *(p.grad for p in params)]  # None: the embedding's own projection 0

    for p in params:
        p.grad = None
    holder.double()
    h64 = h.detach().double().requires_grad_()
    ref_lp = _reference_log_probs(h64.reshape(-1, width), head.clusters(), CUTOFFS, V)
    torch.testing.assert_close(ref_lp.exp().sum(1), torch.ones(N, dtype=torch.float64))
    ref = -ref_lp.gather(1, targets.reshape(-1, 1)).mean()
    ref.backward()
    assert abs(loss.item() - ref.item()) <= 1e-5
    for g32, p in zip(got, [h64, *params], strict=True):
        assert (g32 is None) == (p.grad is None)
        if g32 is not None:
            torch.testing.assert_close(g32.double(), p.grad, rtol=1e-4, atol=1e-6)
    # without targets: the same distribution, as log-probabilities over the vocabulary
    with torch.no_grad():
        lp = head(h64)
    torch.testing.assert_close(lp.reshape(-1, V).double(), ref_lp)


def test_adaptive_embedding_looks_up_each_cluster_table():
    emb = AdaptiveEmbedding(V, D, CUTOFFS, 2)
    assert emb.widths == [12, 6, 3, 1]
    tokens = torch.tensor([[0, 5, 6, 14, 15, 29, 30, 39]])
    out = emb(tokens)
    for t, vec in zip(tokens[0].tolist(), out[0], strict=True):
        i = sum(t >= c for c in CUTOFFS)
        lo = (0, *CUTOFFS)[i]
        by_hand = emb.projs[i] @ emb.tables[i].weight[t - lo] * D**0.5
        torch.testing.assert_close(vec, by_hand)
    one_table = AdaptiveEmbedding(V, D, CUTOFFS, 1)
    torch.testing.assert_close(one_table(tokens), one_table.tables[0].weight[tokens] * D**0.5)


def test_adaptive_softmax_ties_tables_and_tail_projections():
    emb = AdaptiveEmbedding(V, D, CUTOFFS, 2)
    head = AdaptiveSoftmax(emb, V, CUTOFFS, D)
    clusters = head.clusters()
    assert clusters[1].weight is emb.tables[1].weight and clusters[1].proj is emb.projs[1]
    assert clusters[0].proj is not emb.projs[0]  # Transformer-XL: the head projection is its own
    own = sum(p.numel() for p in head.parameters())
    assert own == V + 3 * (D + 1) + D * D  # word biases, cluster vectors + biases, head projection


LM_HEADS = ["full", "adaptive", "split"]


@pytest.mark.parametrize("head", LM_HEADS)
@pytest.mark.parametrize("name", list_models())
def test_every_head_on_every_model_trains(name, head):
    model = build_model(name, mode="lm", head=head)
    assert model.config.head == head and model.head_name == head
    x, targets = model_inputs(model, 2, 8)
    out, _ = model(x)
    assert out.shape == (2, 8, model.config.vocab_size)
    loss, _ = model(x, targets=targets)
    torch.testing.assert_close(loss, model.loss(out, targets))  # log-probs: the same cross-entropy
    loss.backward()
    unused = {id(p) for p in model.gpt2.transformer.wte.parameters()} if head != "full" and name == "gpt2" else set()
    for pname, p in model.named_parameters():
        if id(p) in unused:  # GPT-2's one-row word table: the head brings its own input side
            continue
        assert p.grad is not None and torch.isfinite(p.grad).all(), f"{name}/{head}: {pname}"
    if head != "full":
        with torch.no_grad():  # log-probabilities over the whole vocabulary
            torch.testing.assert_close(out.exp().sum(-1), torch.ones(2, 8))


@pytest.mark.parametrize("name", list_models())
def test_the_head_changes_parameters_and_output_not_the_core(name):
    built = {head: build_model(name, mode="lm", head=head) for head in LM_HEADS}
    core = build_model(name, mode="core")
    counts = {head: m.num_params() for head, m in built.items()}
    assert len(set(counts.values())) == 3, counts  # each head is its own parameters
    c = core.config
    split_extra = len(c.cutoffs) * (getattr(c, "nout", c.d_model) + 1)  # the tombstones
    if name == "gpt2":  # + the decoder bias GPT-2's lm_head lacks, + the unused one-row word table
        split_extra += c.vocab_size + c.d_model
    assert counts["split"] - counts["full"] == split_extra
    assert len({m.num_params(non_embedding=True) for m in built.values()}) == 1
    assert built["full"].num_params(non_embedding=True) == core.num_params(non_embedding=True)
    x, _ = model_inputs(built["full"], 2, 8)
    for head in ("adaptive", "split"):
        torch.manual_seed(0)
        other = build_model(name, mode="lm", head=head)
        assert not torch.allclose(other(x)[0].log_softmax(-1), built["full"](x)[0].log_softmax(-1))


@pytest.mark.parametrize(
    ("mode", "head", "message"),
    [
        ("lm", "hierarchical", "unknown head 'hierarchical'; valid heads: none, full, adaptive, split"),
        ("core", "adaptive", "head 'adaptive' needs mode 'lm'.*head 'none'"),
        ("lm", "none", "head 'none' is core mode's.*valid heads in lm mode: full, adaptive, split"),
    ],
)
def test_heads_that_do_not_exist_or_contradict_the_mode_are_refused(mode, head, message):
    for name in ("deq-transformer", "trellisnet", "gpt2"):
        with pytest.raises(ValueError, match=message):
            build_model(name, mode=mode, head=head)


def test_head_defaults_follow_the_mode_and_bad_cutoffs_are_refused():
    assert build_model("transformer", mode="core").config.head == "none"
    assert build_model("transformer", mode="lm").config.head == "full"
    assert build_model("transformer", mode="core", head="none").config.head == "none"
    with pytest.raises(ValueError, match="must lie below vocab_size 256"):
        build_model("transformer", mode="lm", head="adaptive", cutoffs=(32, 300))
    with pytest.raises(ValueError, match="strictly increasing"):
        build_model("transformer", mode="lm", head="split", cutoffs=(64, 32))
    with pytest.raises(ValueError, match="without a dimension"):
        build_model("trellisnet", mode="lm", head="adaptive", cutoffs=(8, 16, 24, 32), div_val=2)
    # cutoffs and div_val reach the head and the adaptive input
    split = build_model("deq-trellisnet", mode="lm", head="split", cutoffs=(4, 40))
    assert split.head.bounds == [(0, 4), (4, 40), (40, 64)] and split.head.tombstones.shape == (2, 8)
    adaptive = build_model("transformer", mode="lm", head="adaptive", cutoffs=(16,), div_val=4)
    assert [t.weight.shape for t in adaptive.embedding.tables] == [(16, 32), (240, 8)]
    # cutoffs from a TOML list, and large ones harmless when no clustered head uses them
    assert build_model("transformer", mode="lm", cutoffs=[8, 24]).config.cutoffs == (8, 24)
    assert build_model("transformer", mode="lm", vocab_size=16).config.cutoffs == (32, 128)


def _like_for_like(name):
    if not model_spec(name).is_deq:
        return ()
    return (("tol", 0.0), ("b_tol", 0.0), ("max_iter", 6), ("b_max_iter", 6))


# Every (model, head) in train; eval for one model of each kind by default, all with -m slow (a
# measurement is ~1-2 s on two shared cores).
EVAL_BY_DEFAULT = ("deq-transformer", "trellisnet", "gpt2")
CASES = [
    pytest.param(name, head, phase, marks=[] if phase == "train" or name in EVAL_BY_DEFAULT else [pytest.mark.slow])
    for name in list_models() for head in LM_HEADS for phase in ("train", "eval")
]


@pytest.mark.parametrize(("name", "head", "phase"), CASES)
def test_predicted_equals_tracked_for_every_head(name, head, phase):
    workload = Workload(model=name, phase=phase, mode="lm", batch=2, seq_len=16,
                        overrides=(*_like_for_like(name), ("head", head)))
    row = measure(workload, ["tracked", "predicted"])
    gap = row["predicted_bytes"] - row["tracked_bytes"]
    if model_spec(name).variant == "hf":  # HF builds a causal mask fake tensors count once more
        assert 0 <= gap <= 4 * 2 * 16 * 16, gap
    else:
        assert gap == 0, (row["predicted_bytes"], row["tracked_bytes"])


def test_tail_normaliser_gradcheck():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 3, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(9, 3, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(9, dtype=torch.float64, generator=g, requires_grad=True)
    torch.autograd.gradcheck(heads._TailLogNormalizer.apply, (x, w, b))
    torch.testing.assert_close(heads._TailLogNormalizer.apply(x, w, b).float(),
                               F.linear(x, w, b).logsumexp(1).float())
