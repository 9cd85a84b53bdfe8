"""fastcse.integrations.sentence_transformers.InfoNCELoss against sentence-transformers' own losses.

The model is a tiny random BERT (the all-MiniLM-L6-v2 tokenizer) wrapped as Transformer +
Pooling. Both losses embed the columns the same way, so with the same seed they draw the same
dropout masks: the comparisons run in train mode, dropout on, and must agree to float rounding.
"""

from __future__ import annotations

import copy
import csv
import itertools
import json
import math
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sentence_transformers = pytest.importorskip("sentence_transformers")

from sentence_transformers import SentenceTransformer  # noqa: E402
from sentence_transformers.base.modules import Transformer  # noqa: E402
from sentence_transformers.sentence_transformer.losses import (  # noqa: E402
    CachedGISTEmbedLoss,
    CachedMultipleNegativesRankingLoss,
    GISTEmbedLoss,
    MatryoshkaLoss,
    MultipleNegativesRankingLoss,
)
from sentence_transformers.sentence_transformer.modules import Pooling  # noqa: E402

from fastcse.evaluation import shared_dir  # noqa: E402
from fastcse import info_nce  # noqa: E402
from fastcse.integrations.sentence_transformers import InfoNCELoss  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED = shared_dir()  # $FASTCSE_SHARED, else ../shared beside the checkout
TOKENIZER = SHARED / "models" / "all-MiniLM-L6-v2"
NLI = SHARED / "data" / "nli" / "snli-dev-triples.csv"
BATCH = 6
SYMMETRIC = dict(directions=("query_to_doc", "doc_to_query"), partition_mode="per_direction")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """The tiny model's ops are far too small to split over threads, and on a loaded machine two
    OpenMP threads wait on each other at every op (10x slower here); restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_tiny_bert(path, seed: int, hidden: int = 32, max_seq_length: int = 32) -> SentenceTransformer:
    """A random 2-layer BERT of width ``hidden`` with the shared tokenizer, mean-pooled (loaded in
    eval mode, as from_pretrained leaves it)."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=hidden, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=2 * hidden, max_position_embeddings=64)
    BertModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    transformer = Transformer(str(path), max_seq_length=max_seq_length)
    return SentenceTransformer(modules=[transformer, Pooling(transformer.get_embedding_dimension(), "mean")],
                               device="cpu")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> SentenceTransformer:
    return make_tiny_bert(tmp_path_factory.mktemp("tiny-bert"), seed=0)


@pytest.fixture(scope="module")
def tiny_guide(tmp_path_factory) -> SentenceTransformer:
    """GISTEmbedLoss's guide: another random BERT (width 24), the model's tokenizer and length."""
    return make_tiny_bert(tmp_path_factory.mktemp("tiny-guide"), seed=1, hidden=24)


def nli_rows(count: int) -> list[dict[str, str]]:
    with open(NLI, newline="") as f:
        return [row for _, row in zip(range(count), csv.DictReader(f))]


def columns(num_neg: int) -> list[list[str]]:
    """(anchor, positive, negative_1..negative_k) of BATCH NLI triples; negative t is the
    contradiction of row i + t, so the columns differ."""
    rows = nli_rows(BATCH + num_neg)
    cols = [[r["sent0"] for r in rows[:BATCH]], [r["sent1"] for r in rows[:BATCH]]]
    cols += [[rows[i + t]["hard_neg"] for i in range(BATCH)] for t in range(num_neg)]
    return cols


def loss_and_grads(make_loss, model, texts, *, train=True, seed=1):
    """Runs one loss on a fresh copy of the model: (loss, {param name: grad})."""
    model = copy.deepcopy(model)
    model.train(train)
    features = [model.preprocess(column) for column in texts]
    torch.manual_seed(seed)
    loss = make_loss(model)(features, None)
    loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def assert_same(expected, actual):
    (loss_e, grads_e), (loss_a, grads_a) = expected, actual
    torch.testing.assert_close(loss_a, loss_e, rtol=1e-5, atol=1e-6)
    assert grads_a.keys() == grads_e.keys()
    assert len(grads_e) > 30  # every BERT weight got a gradient
    largest = max(grad.norm() for grad in grads_e.values())
    for name, grad in grads_e.items():
        # Relative to the whole tensor: summed gradients (e.g. token-type embeddings, one row
        # summed over every token) carry absolute rounding far above their smallest entries. The
        # floor is for gradients that are zero up to rounding (attention key biases: softmax
        # ignores them).
        error = ((grads_a[name] - grad).norm() / grad.norm().clamp_min(1e-3 * largest)).item()
        assert error < 2e-5, f"{name}: relative gradient error {error:.2e}"


@pytest.mark.parametrize("num_neg", [0, 1, 2])
@pytest.mark.parametrize("ours, theirs", [
    (dict(), dict()),
    (dict(scale=10.0), dict(scale=10.0)),
    (dict(temperature=0.1), dict(scale=10.0)),
])
def test_matches_mnrl(tiny_model, num_neg, ours, theirs):
    texts = columns(num_neg)
    expected = loss_and_grads(lambda m: MultipleNegativesRankingLoss(m, **theirs), tiny_model, texts)
    assert_same(expected, loss_and_grads(lambda m: InfoNCELoss(m, **ours), tiny_model, texts))


@pytest.mark.parametrize("num_neg", [0, 2])
def test_symmetric_matches_mnrl_both_directions(tiny_model, num_neg):
    texts = columns(num_neg)
    expected = loss_and_grads(lambda m: MultipleNegativesRankingLoss(m, **SYMMETRIC), tiny_model, texts)
    assert_same(expected, loss_and_grads(lambda m: InfoNCELoss(m, symmetric=True), tiny_model, texts))


@pytest.mark.parametrize("num_neg, symmetric, mini_batch_size", [(0, False, 4), (2, False, 4), (1, True, 2),
                                                                 (2, False, 64)])
def test_cached_matches_cached_mnrl(tiny_model, num_neg, symmetric, mini_batch_size):
    """Same mini-batches (no length sorting), same RNG replay: the gradients of CachedMNRL, dropout on."""
    texts = columns(num_neg)
    extra = SYMMETRIC if symmetric else {}
    expected = loss_and_grads(
        lambda m: CachedMultipleNegativesRankingLoss(m, mini_batch_size=mini_batch_size, **extra), tiny_model, texts)
    actual = loss_and_grads(lambda m: InfoNCELoss(m, symmetric=symmetric, mini_batch_size=mini_batch_size,
                                                  sort_by_length=False), tiny_model, texts)
    assert_same(expected, actual)


# ---------------------------------------------------------------- sentence-transformers 6 variants
_EXTRA = ("query_to_query", "doc_to_query", "doc_to_doc")
ST_VARIANTS = [dict(directions=("query_to_doc",) + extra, partition_mode=partition, hardness_mode=mode,
                    hardness_strength=strength)
               for r in range(4) for extra in itertools.combinations(_EXTRA, r)
               for partition in ("joint", "per_direction")
               for mode, strength in [(None, 0.0), ("in_batch_negatives", 9.0), ("hard_negatives", 5.0),
                                      ("all_negatives", 3.0)]]


def _mnrl_accepts(variant) -> bool:
    try:
        MultipleNegativesRankingLoss(None, **variant)
    except ValueError:
        return False
    return True


def _embedding_loss_and_grads(loss_module, embeddings):
    leaves = [e.detach().clone().requires_grad_() for e in embeddings]
    if isinstance(loss_module, InfoNCELoss):
        loss = loss_module.calculate_loss([[e] for e in leaves])
    else:
        loss = loss_module.compute_loss_from_embeddings(leaves, None)
    loss.backward()
    return loss.detach(), [e.grad for e in leaves]


@pytest.mark.parametrize("num_neg", [0, 1, 3])
def test_every_variant_mnrl_accepts_matches_it(num_neg):
    """Every combination MNRL accepts, on the same embeddings (fp64): equal loss and gradients of
    every column; every combination it refuses, refused by InfoNCELoss too (ValueError)."""
    gen = torch.Generator().manual_seed(num_neg)
    embeddings = [torch.randn(7, 12, generator=gen, dtype=torch.float64) for _ in range(2 + num_neg)]
    accepted = 0
    for variant in ST_VARIANTS:
        if not _mnrl_accepts(variant):
            with pytest.raises(ValueError, match="per_direction"):
                InfoNCELoss(None, **variant)
            continue
        accepted += 1
        theirs = _embedding_loss_and_grads(MultipleNegativesRankingLoss(None, **variant), embeddings)
        ours = _embedding_loss_and_grads(InfoNCELoss(None, **variant), embeddings)
        torch.testing.assert_close(ours[0], theirs[0], rtol=1e-10, atol=1e-10, msg=lambda m: f"{variant}: {m}")
        for got, want in zip(ours[1], theirs[1]):
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10, msg=lambda m: f"{variant}: {m}")
    assert accepted == 40  # 8 direction sets joint + 2 per_direction, x 4 hardness settings


MODEL_VARIANTS = [
    dict(directions=("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc"), partition_mode="joint"),
    dict(directions=("query_to_doc", "doc_to_query"), partition_mode="joint", hardness_mode="in_batch_negatives",
         hardness_strength=9.0),
    dict(directions=("query_to_doc", "doc_to_query"), partition_mode="per_direction",
         hardness_mode="hard_negatives", hardness_strength=5.0),
    dict(directions=("query_to_doc", "doc_to_doc"), hardness_mode="all_negatives", hardness_strength=3.0),
]


@pytest.mark.parametrize("variant", MODEL_VARIANTS, ids=["gte", "q2d+d2q-joint-inbatch", "symmetric-hard",
                                                         "q2d+d2d-all"])
@pytest.mark.parametrize("mini_batch_size", [None, 4])
def test_variants_match_mnrl_on_a_model(tiny_model, variant, mini_batch_size):
    """Parameter gradients of a BERT, dropout on: MNRL (or CachedMNRL with the same mini-batches)."""
    texts = columns(2)
    if mini_batch_size is None:
        expected = loss_and_grads(lambda m: MultipleNegativesRankingLoss(m, **variant), tiny_model, texts)
    else:
        expected = loss_and_grads(lambda m: CachedMultipleNegativesRankingLoss(m, mini_batch_size=mini_batch_size,
                                                                               **variant), tiny_model, texts)
    actual = loss_and_grads(lambda m: InfoNCELoss(m, mini_batch_size=mini_batch_size, sort_by_length=False,
                                                  **variant), tiny_model, texts)
    assert_same(expected, actual)


@pytest.mark.parametrize("budget", [40, 90])
def test_token_budget_matches_cached_mnrl_token_budget(tiny_model, budget):
    """mini_batch_num_tokens: CachedMNRL's token-bounded mini-batches, dropout on."""
    texts = columns(1)
    expected = loss_and_grads(lambda m: CachedMultipleNegativesRankingLoss(
        m, mini_batch_size=BATCH, mini_batch_num_tokens=budget), tiny_model, texts)
    actual = loss_and_grads(lambda m: InfoNCELoss(m, mini_batch_num_tokens=budget, sort_by_length=False),
                            tiny_model, texts)
    assert_same(expected, actual)


@pytest.mark.parametrize("cache", [dict(mini_batch_size=2), dict(mini_batch_size=4, symmetric=True),
                                   dict(mini_batch_num_tokens=40), dict(mini_batch_num_tokens=70)])
def test_length_sorted_mini_batches_give_the_batch_loss(tiny_model, cache):
    """Sorted mini-batches (the default): the loss and gradients of the whole batch, i.e. of the
    uncached MNRL (dropout off, so that which rows share a forward cannot matter)."""
    texts = columns(2)
    extra = SYMMETRIC if cache.get("symmetric") else {}
    expected = loss_and_grads(lambda m: MultipleNegativesRankingLoss(m, **extra), tiny_model, texts, train=False)
    actual = loss_and_grads(lambda m: InfoNCELoss(m, **cache), tiny_model, texts, train=False)
    assert_same(expected, actual)


def test_length_sorted_mini_batches_pad_fewer_tokens(tiny_model):
    """The forwards of the sorted cached loss see fewer (padded) tokens than CachedMNRL's."""
    texts = [[t for t in column] for column in columns(1)]
    texts = [column * 4 for column in texts]  # 24 rows a column: several mini-batches of 4

    def padded_tokens(make_loss):
        model = copy.deepcopy(tiny_model)
        seen = []
        hook = model[0].auto_model.embeddings.register_forward_hook(lambda mod, args, out: seen.append(out.shape[:2]))
        features = [model.preprocess(column) for column in texts]
        make_loss(model)(features, None).backward()
        hook.remove()
        return sum(rows * length for rows, length in seen)

    sorted_tokens = padded_tokens(lambda m: InfoNCELoss(m, mini_batch_size=4))
    theirs = padded_tokens(lambda m: CachedMultipleNegativesRankingLoss(m, mini_batch_size=4))
    assert sorted_tokens < 0.85 * theirs


def test_cached_scales_with_upstream_gradient(tiny_model):
    """The replay hook multiplies by the gradient flowing into the loss (gradient accumulation, AMP scaling)."""
    texts = columns(1)
    full = loss_and_grads(lambda m: InfoNCELoss(m, mini_batch_size=4), tiny_model, texts)
    halved = loss_and_grads(lambda m: (lambda f, labels: InfoNCELoss(m, mini_batch_size=4)(f, labels) * 0.5),
                            tiny_model, texts)
    for name, grad in full[1].items():
        torch.testing.assert_close(halved[1][name], grad * 0.5, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("mini_batch_size", [None, 4])
def test_inside_matryoshka_loss(tiny_model, mini_batch_size):
    """MatryoshkaLoss wraps calculate_loss for gradient-cached losses and the model's forward otherwise."""
    texts = columns(1)
    dims = [32, 16, 8]
    if mini_batch_size is None:
        inner = lambda m: MultipleNegativesRankingLoss(m)  # noqa: E731
    else:
        inner = lambda m: CachedMultipleNegativesRankingLoss(m, mini_batch_size=mini_batch_size)  # noqa: E731
    expected = loss_and_grads(lambda m: MatryoshkaLoss(m, inner(m), dims), tiny_model, texts)
    actual = loss_and_grads(lambda m: MatryoshkaLoss(m, InfoNCELoss(m, mini_batch_size=mini_batch_size,
                                                                  sort_by_length=False), dims), tiny_model, texts)
    assert_same(expected, actual)



# ---------------------------------------------------------------- Matryoshka as InfoNCELoss's own keywords
def mnrl(mini_batch_size, **kwargs):
    """MNRL, or CachedMNRL with these mini-batches: a factory of the model."""
    if mini_batch_size is None:
        return lambda m: MultipleNegativesRankingLoss(m, **kwargs)
    return lambda m: CachedMultipleNegativesRankingLoss(m, mini_batch_size=mini_batch_size, **kwargs)


def seeded(make_loss, seed):
    """make_loss with Python's RNG (MatryoshkaLoss's n_dims_per_step draw) seeded just before the step."""
    def make(model):
        random.seed(seed)
        return make_loss(model)
    return make


@pytest.mark.parametrize("mini_batch_size", [None, 4])
@pytest.mark.parametrize("num_neg, dims, weights", [(0, [32, 16, 8], None), (1, [8, 32, 20], [0.5, 1.0, 2.0]),
                                                    (2, [16, 4], [1.0, 0.25])])
def test_matryoshka_keywords_match_matryoshka_loss(tiny_model, mini_batch_size, num_neg, dims, weights):
    """InfoNCELoss(matryoshka_dims=...) is MatryoshkaLoss(MNRL) and MatryoshkaLoss(CachedMNRL) (the
    same mini-batches), dropout on; dims in any order, the model's width listed or not."""
    texts = columns(num_neg)
    expected = loss_and_grads(lambda m: MatryoshkaLoss(m, mnrl(mini_batch_size)(m), dims, weights), tiny_model,
                              texts)
    actual = loss_and_grads(lambda m: InfoNCELoss(m, mini_batch_size=mini_batch_size, sort_by_length=False,
                                                  matryoshka_dims=dims, matryoshka_weights=weights),
                            tiny_model, texts)
    assert_same(expected, actual)


@pytest.mark.parametrize("mini_batch_size", [None, 2])
def test_matryoshka_with_a_variant_matches(tiny_model, mini_batch_size):
    variant = dict(directions=("query_to_doc", "doc_to_query"), partition_mode="per_direction",
                   hardness_mode="hard_negatives", hardness_strength=5.0)
    texts, dims = columns(1), [32, 8]
    expected = loss_and_grads(lambda m: MatryoshkaLoss(m, mnrl(mini_batch_size, **variant)(m), dims), tiny_model,
                              texts)
    actual = loss_and_grads(lambda m: InfoNCELoss(m, mini_batch_size=mini_batch_size, sort_by_length=False,
                                                  matryoshka_dims=dims, **variant), tiny_model, texts)
    assert_same(expected, actual)


@pytest.mark.parametrize("mini_batch_size", [None, 4])
def test_n_dims_per_step_draws_matryoshka_loss_dimensions(tiny_model, mini_batch_size):
    """Same seed, same dimensions (and so the same loss and gradients); the draw is a real subset."""
    texts, dims, weights = columns(1), [32, 24, 16, 8, 4], [1.0, 2.0, 3.0, 4.0, 5.0]
    full = loss_and_grads(lambda m: InfoNCELoss(m, matryoshka_dims=dims, matryoshka_weights=weights), tiny_model,
                          texts)
    for seed in (0, 1):
        expected = loss_and_grads(seeded(lambda m: MatryoshkaLoss(m, mnrl(mini_batch_size)(m), dims, weights,
                                                                  n_dims_per_step=2), seed), tiny_model, texts)
        actual = loss_and_grads(seeded(lambda m: InfoNCELoss(m, mini_batch_size=mini_batch_size, sort_by_length=False,
                                                             matryoshka_dims=dims, matryoshka_weights=weights,
                                                             n_dims_per_step=2), seed), tiny_model, texts)
        assert_same(expected, actual)
        assert actual[0] < full[0] - 1.0  # two of the five weighted losses


def test_matryoshka_in_the_trainer(tiny_model, tmp_path):
    """A few SentenceTransformerTrainer steps with the cached Matryoshka loss: finite, and it learns."""
    from datasets import Dataset
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments

    rows = nli_rows(32)
    dataset = Dataset.from_dict({key: [r[key] for r in rows] for key in ("sent0", "sent1", "hard_neg")})
    model = copy.deepcopy(tiny_model)
    args = SentenceTransformerTrainingArguments(
        output_dir=str(tmp_path), num_train_epochs=4, per_device_train_batch_size=16, learning_rate=5e-4,
        warmup_steps=0, logging_steps=1, save_strategy="no", report_to=[], seed=0, use_cpu=True,
        dataloader_drop_last=True, disable_tqdm=True)
    loss = InfoNCELoss(model, mini_batch_size=8, matryoshka_dims=(32, 16, 8), matryoshka_weights=(1.0, 0.5, 0.5))
    trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=dataset, loss=loss)
    trainer.train()
    logged = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == 8 and all(math.isfinite(v) for v in logged)
    assert sum(logged[-2:]) < sum(logged[:2])


# ---------------------------------------------------------------- guided false negatives (GISTEmbedLoss)
CONTRASTS = [(False, False), (True, False), (False, True), (True, True)]
# Margins that leave out some of the keys, not all: the tiny guide's cosines lie within ~0.15 of
# each row's positive cosine t_i (~0.95); these leave out about half of them.
STRATEGIES = [("absolute", 0.02), ("relative", 0.01)]


def gist(guide, mini_batch_size, **kwargs):
    """GISTEmbedLoss, or CachedGISTEmbedLoss with these mini-batches: a factory of the model."""
    if mini_batch_size is None:
        return lambda m: GISTEmbedLoss(m, guide, **kwargs)
    return lambda m: CachedGISTEmbedLoss(m, guide, mini_batch_size=mini_batch_size, **kwargs)


def guided(guide, mini_batch_size, **kwargs):
    return lambda m: InfoNCELoss(m, guide=guide, mini_batch_size=mini_batch_size, sort_by_length=False, **kwargs)


@pytest.mark.parametrize("mini_batch_size", [None, 2])
@pytest.mark.parametrize("num_neg", [0, 1])
@pytest.mark.parametrize("contrast_anchors, contrast_positives", CONTRASTS)
@pytest.mark.parametrize("strategy, margin", STRATEGIES)
def test_guide_matches_gist_embed_loss(tiny_model, tiny_guide, mini_batch_size, num_neg, contrast_anchors,
                                       contrast_positives, strategy, margin):
    """InfoNCELoss(guide=...) is GISTEmbedLoss (and CachedGISTEmbedLoss, same mini-batches), at
    their defaults otherwise (temperature 0.01), dropout on in the model."""
    texts = columns(num_neg)
    options = dict(margin_strategy=strategy, margin=margin, contrast_anchors=contrast_anchors,
                   contrast_positives=contrast_positives)
    expected = loss_and_grads(gist(tiny_guide, mini_batch_size, **options), tiny_model, texts)
    actual = loss_and_grads(guided(tiny_guide, mini_batch_size, **options), tiny_model, texts)
    assert_same(expected, actual)


def test_guide_leaves_out_keys(tiny_model, tiny_guide):
    """The margins above leave out some keys and keep others: neither MNRL with GISTEmbedLoss's
    blocks (nothing left out) nor only the targets (every negative left out)."""
    texts = columns(1)
    blocks = dict(temperature=0.01, directions=("query_to_doc", "query_to_query"))
    unmasked = loss_and_grads(lambda m: InfoNCELoss(m, **blocks), tiny_model, texts, train=False)[0]
    for strategy, margin in STRATEGIES:
        masked = loss_and_grads(lambda m: InfoNCELoss(m, guide=tiny_guide, margin=margin, margin_strategy=strategy,
                                                      contrast_positives=False, temperature=0.01),
                                tiny_model, texts, train=False)[0]
        assert 0.05 < masked < unmasked - 0.05, (strategy, masked, unmasked)


def test_guide_with_dropout_in_the_guide(tiny_model, tiny_guide):
    """A guide in train mode draws dropout too: in step 1 each mini-batch's guide forward comes right
    after the model's, as in CachedGISTEmbedLoss, so the draws (and the replay's) are the same."""
    guide = copy.deepcopy(tiny_guide).train()
    texts = columns(1)
    for mini_batch_size in (None, 2):
        expected = loss_and_grads(gist(guide, mini_batch_size), tiny_model, texts)
        assert_same(expected, loss_and_grads(guided(guide, mini_batch_size), tiny_model, texts))


@pytest.mark.skipif(
    tuple(int(part) for part in sentence_transformers.__version__.split(".")[:2]) < (6, 3),
    reason="the peer fails here, not fastcse: sentence-transformers 6.0.1's CachedGISTEmbedLoss calls .to() on "
           "every field its guide's preprocess returns, strings included (checked against 6.3.0)")
def test_guide_that_retokenizes(tmp_path, tiny_model):
    """A guide that reads fewer tokens than the model re-tokenizes the decoded text, as GISTEmbedLoss."""
    guide = make_tiny_bert(tmp_path / "short-guide", seed=2, hidden=16, max_seq_length=12)
    texts = columns(1)
    for mini_batch_size in (None, 4):
        expected = loss_and_grads(gist(guide, mini_batch_size, margin=0.0), tiny_model, texts)
        assert_same(expected, loss_and_grads(guided(guide, mini_batch_size, margin=0.0), tiny_model, texts))


@pytest.mark.parametrize("cache", [dict(mini_batch_size=2), dict(mini_batch_num_tokens=40)])
def test_guide_with_length_sorted_mini_batches(tiny_model, tiny_guide, cache):
    """Sorted mini-batches: the guide's rows go back to row order with the model's (dropout off,
    so the whole-batch GISTEmbedLoss is the reference)."""
    texts = columns(1)
    expected = loss_and_grads(gist(tiny_guide, None), tiny_model, texts, train=False)
    actual = loss_and_grads(lambda m: InfoNCELoss(m, guide=tiny_guide, **cache), tiny_model, texts, train=False)
    assert_same(expected, actual)


@pytest.mark.parametrize("mini_batch_size", [None, 2])
def test_self_guided_is_the_model_as_its_own_guide(tiny_model, mini_batch_size):
    """guide=None with a margin: the model's own cosines decide, i.e. a guide equal to the model
    (dropout off, so that both embed alike); it leaves keys out (the loss drops)."""
    texts = columns(1)
    options = dict(margin=0.0, contrast_anchors=True, contrast_positives=True, temperature=0.05)
    expected = loss_and_grads(lambda m: InfoNCELoss(m, guide=tiny_model, mini_batch_size=mini_batch_size, **options),
                              tiny_model, texts, train=False)
    actual = loss_and_grads(lambda m: InfoNCELoss(m, mini_batch_size=mini_batch_size, **options), tiny_model, texts,
                            train=False)
    assert_same(expected, actual)
    unmasked = loss_and_grads(lambda m: InfoNCELoss(m, contrast_anchors=True, contrast_positives=True),
                              tiny_model, texts, train=False)
    assert actual[0] < unmasked[0] - 0.05


@pytest.mark.parametrize("mini_batch_size", [None, 2])
def test_guide_with_matryoshka_matches_matryoshka_gist(tiny_model, tiny_guide, mini_batch_size):
    """matryoshka_dims with a guide: MatryoshkaLoss around (Cached)GISTEmbedLoss (the guide's
    embeddings untruncated), one fused call per dimension."""
    texts, dims, weights = columns(1), [32, 12], [1.0, 0.5]
    expected = loss_and_grads(lambda m: MatryoshkaLoss(m, gist(tiny_guide, mini_batch_size)(m), dims, weights),
                              tiny_model, texts)
    actual = loss_and_grads(guided(tiny_guide, mini_batch_size, matryoshka_dims=dims, matryoshka_weights=weights),
                            tiny_model, texts)
    assert_same(expected, actual)

def test_guide_under_no_grad(tiny_model, tiny_guide):
    texts = columns(1)
    model = copy.deepcopy(tiny_model).eval()
    features = [model.preprocess(column) for column in texts]
    with torch.no_grad():
        theirs = GISTEmbedLoss(model, tiny_guide)(features, None)
        plain = InfoNCELoss(model, guide=tiny_guide)([dict(f) for f in features], None)
        cached = InfoNCELoss(model, guide=tiny_guide, mini_batch_size=4)([dict(f) for f in features], None)
    torch.testing.assert_close(plain, theirs)
    torch.testing.assert_close(cached, theirs)

def hand_written_simcse(model, hard_negative_weight):
    """SimCSE's weighted loss written out on MNRL's candidate layout: pos, then negative column 1, 2, ...
    (negative t of anchor i at column B + t*B + i)."""

    def loss_fn(features, labels):
        anchor, *candidate_columns = [F.normalize(model(f)["sentence_embedding"], dim=-1) for f in features]
        candidates = torch.cat(candidate_columns)
        logits = anchor @ candidates.T / 0.05
        batch, num_neg = anchor.shape[0], len(candidate_columns) - 1
        bias = torch.zeros_like(logits)
        for t in range(num_neg):
            bias[torch.arange(batch), batch + t * batch + torch.arange(batch)] = hard_negative_weight
        return F.cross_entropy(logits + bias, torch.arange(batch))

    return loss_fn


@pytest.mark.parametrize("mini_batch_size", [None, 4])
def test_hard_negative_weight_on_own_negatives(tiny_model, mini_batch_size):
    """The weight lands on anchor i's own negatives in every negative column (dropout off: the
    hand-written loss embeds each column in its own forward)."""
    texts = columns(2)
    weight = math.log(2.0)
    expected = loss_and_grads(lambda m: hand_written_simcse(m, weight), tiny_model, texts, train=False)
    actual = loss_and_grads(lambda m: InfoNCELoss(m, hard_negative_weight=weight, mini_batch_size=mini_batch_size),
                            tiny_model, texts, train=False)
    assert_same(expected, actual)
    unweighted = loss_and_grads(lambda m: InfoNCELoss(m), tiny_model, texts, train=False)
    assert actual[0] > unweighted[0] + 1e-3


def test_gather_without_distributed_is_local(tiny_model):
    texts = columns(1)
    expected = loss_and_grads(lambda m: InfoNCELoss(m), tiny_model, texts)
    assert_same(expected, loss_and_grads(lambda m: InfoNCELoss(m, gather_across_devices=True), tiny_model, texts))


def test_no_grad_returns_the_loss(tiny_model):
    """Evaluation (the Trainer's eval loop) runs the loss under no_grad; the cached path skips the hook."""
    texts = columns(1)
    model = copy.deepcopy(tiny_model).eval()
    features = [model.preprocess(column) for column in texts]
    with torch.no_grad():
        plain = InfoNCELoss(model)(features, None)
        cached = InfoNCELoss(model, mini_batch_size=4)(features, None)
        theirs = MultipleNegativesRankingLoss(model)(features, None)
    torch.testing.assert_close(plain, theirs)
    torch.testing.assert_close(cached, theirs)


GATHER_WORKER = """
import json, sys, copy
import torch, torch.distributed as dist
from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer.losses import (CachedMultipleNegativesRankingLoss,
                                                               MultipleNegativesRankingLoss)
from fastcse.distributed import exit_worker
from fastcse.integrations.sentence_transformers import InfoNCELoss

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
base = SentenceTransformer(sys.argv[1], device="cpu")
texts = json.loads(sys.argv[2])
share = len(texts[0]) // world
local = [column[rank * share:(rank + 1) * share] for column in texts]
SYMMETRIC = dict(directions=("query_to_doc", "doc_to_query"), partition_mode="per_direction")
GTE = dict(directions=("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc"), partition_mode="joint",
           hardness_mode="all_negatives", hardness_strength=3.0)

def run(make_loss):
    model = copy.deepcopy(base).train()
    features = [model.preprocess(column) for column in local]
    torch.manual_seed(10 + rank)
    loss = make_loss(model)(features, None)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

report = {}
for name, theirs, ours in [
    ("plain", lambda m: MultipleNegativesRankingLoss(m, gather_across_devices=True),
     lambda m: InfoNCELoss(m, gather_across_devices=True)),
    ("symmetric", lambda m: MultipleNegativesRankingLoss(m, gather_across_devices=True, **SYMMETRIC),
     lambda m: InfoNCELoss(m, symmetric=True, gather_across_devices=True)),
    ("cached", lambda m: CachedMultipleNegativesRankingLoss(m, mini_batch_size=2, gather_across_devices=True),
     lambda m: InfoNCELoss(m, mini_batch_size=2, gather_across_devices=True, sort_by_length=False)),
    ("gte", lambda m: MultipleNegativesRankingLoss(m, gather_across_devices=True, **GTE),
     lambda m: InfoNCELoss(m, gather_across_devices=True, **GTE)),
]:
    (loss_e, grads_e), (loss_a, grads_a) = run(theirs), run(ours)
    largest = max(g.norm() for g in grads_e.values())
    error = max(((grads_a[k] - g).norm() / g.norm().clamp_min(1e-3 * largest)).item() for k, g in grads_e.items())
    dist.all_reduce(loss_e)  # MNRL returns the local mean; fastcse the global one
    report[name] = dict(error=error, keys_equal=grads_a.keys() == grads_e.keys(),
                        theirs=loss_e.item() / world, ours=loss_a.item())
if rank == 0:
    print(json.dumps(report))
exit_worker()
"""


def test_gather_across_devices_matches_mnrl_on_two_ranks(tiny_model, tmp_path):
    """Two gloo ranks, each with half the batch: the same per-rank parameter gradients as MNRL's
    (and CachedMNRL's) gather_across_devices, and the global loss value on every rank."""
    pytest.importorskip("fastcse.distributed")
    model_path = tmp_path / "model"
    tiny_model.save(str(model_path))
    (tmp_path / "worker.py").write_text(GATHER_WORKER)
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(tmp_path / "worker.py"), str(model_path), json.dumps(columns(1)[:3])],
        capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    for name, outcome in report.items():
        assert outcome["keys_equal"], name
        assert outcome["error"] < 2e-5, (name, outcome)
        assert outcome["ours"] == pytest.approx(outcome["theirs"], rel=1e-5), (name, outcome)


@pytest.mark.parametrize("kwargs, match", [
    (dict(temperature=0.05, scale=20.0), "temperature or scale"),
    (dict(temperature=0.0), "temperature must be a finite positive"),
    (dict(scale=-1.0), "scale must be a finite positive"),
    (dict(mini_batch_size=0), "mini_batch_size must be None"),
    (dict(mini_batch_size=2.5), "mini_batch_size must be None"),
    (dict(hard_negative_weight=float("nan")), "hard_negative_weight must be a finite"),
    (dict(mini_batch_num_tokens=0), "mini_batch_num_tokens must be None or a positive int"),
    (dict(directions=("query_to_doc", "query_to_query"), partition_mode="per_direction"), "per_direction"),
    (dict(directions=("doc_to_query",)), "must include 'query_to_doc'"),
    (dict(directions=("query_to_doc", "doc_to_doc", "doc_to_doc")), "twice"),
    (dict(hardness_mode="hardest"), "hardness_mode must be None or one of"),
    (dict(hardness_mode="all_negatives", hardness_strength=-1.0), "hardness_strength must be"),
    (dict(symmetric=True, partition_mode="per_direction"), "give either symmetric"),
    (dict(matryoshka_dims=(64, 16)), "matryoshka_dims must hold ints in \\[1, 32\\]"),
    (dict(matryoshka_dims=(16, 8), matryoshka_weights=(1.0,)),
     "matryoshka_weights must be None or one number per dimension \\(2\\)"),
    (dict(matryoshka_dims=(16, 8), n_dims_per_step=0), "n_dims_per_step must be -1"),
    (dict(n_dims_per_step=2), "n_dims_per_step was given without matryoshka_dims"),
    (dict(margin=0.1, margin_strategy="proportional"), "margin_strategy must be one of"),
    (dict(margin=float("inf")), "margin must be a finite number"),
    (dict(contrast_positives=True, directions=("query_to_doc", "doc_to_doc")), "contrast_positives=True"),
    (dict(contrast_anchors=False, directions=("query_to_doc", "query_to_query")), "contrast_anchors=False"),
    (dict(contrast_anchors=True, symmetric=True), "with symmetric=True set both to False"),
    (dict(contrast_positives=True, hardness_mode="all_negatives", hardness_strength=1.0), "use neither"),
    (dict(contrast_positives=True, hard_negative_weight=0.5), "use neither"),
])
def test_bad_arguments(tiny_model, kwargs, match):
    with pytest.raises(ValueError, match=match):
        InfoNCELoss(tiny_model, **kwargs)


def test_guide_symmetric_needs_the_contrasts_off(tiny_model, tiny_guide):
    """With a guide the contrasts default to GISTEmbedLoss's (on), which symmetric=True refuses."""
    with pytest.raises(ValueError, match="with symmetric=True set both to False"):
        InfoNCELoss(tiny_model, guide=tiny_guide, symmetric=True)
    loss = InfoNCELoss(tiny_model, guide=tiny_guide, symmetric=True, contrast_anchors=False, contrast_positives=False)
    assert loss.temperature == 0.01 and loss.margin == 0.0
    with pytest.raises(TypeError, match="contrast_anchors must be a bool"):
        InfoNCELoss(tiny_model, contrast_anchors="yes")


def test_bad_columns(tiny_model):
    model = copy.deepcopy(tiny_model)
    anchor, positive = columns(0)
    with pytest.raises(ValueError, match="needs \\(anchor, positive"):
        InfoNCELoss(model)([model.preprocess(anchor)], None)
    with pytest.raises(ValueError, match="hard_negative_weight=0.5 applies to hard negatives"):
        InfoNCELoss(model, hard_negative_weight=0.5)([model.preprocess(anchor), model.preprocess(positive)], None)


def test_importing_fastcse_does_not_need_sentence_transformers():
    """Simulates the package's absence: fastcse imports, the integration says how to install it;
    and an installed version that is too old gets an upgrade hint."""
    code = textwrap.dedent("""
        import sys
        sys.modules["sentence_transformers"] = None  # makes `import sentence_transformers` raise ImportError
        import fastcse, fastcse.integrations
        assert "sentence_transformers" not in [m for m in sys.modules if sys.modules[m] is not None]
        try:
            import fastcse.integrations.sentence_transformers
        except ImportError as exc:
            print(exc)
        else:
            raise SystemExit("the import should have failed")
        # An installed sentence-transformers without the GradCache engine (< 6.0).
        del sys.modules["sentence_transformers"]
        import sentence_transformers
        sys.modules["sentence_transformers.base.losses"] = None
        try:
            import fastcse.integrations.sentence_transformers
        except ImportError as exc:
            print(exc)
        else:
            raise SystemExit("the import should have failed")
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    missing, too_old = result.stdout.strip().splitlines()[-2:]
    assert "not installed" in missing and "pip install 'fastcse[sentence-transformers]'" in missing
    assert "needs sentence-transformers >= 6.0, found 6." in too_old and "pip install -U" in too_old


def test_trainer_run_improves_training_loss(tiny_model, tmp_path):
    """A short SentenceTransformerTrainer run with the cached fastcse loss on the shared NLI triples."""
    from datasets import Dataset
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments

    rows = nli_rows(96)
    dataset = Dataset.from_dict({key: [r[key] for r in rows] for key in ("sent0", "sent1", "hard_neg")})
    model = copy.deepcopy(tiny_model)

    def loss_on_training_set():
        model.eval()
        features = [model.preprocess(dataset[key]) for key in ("sent0", "sent1", "hard_neg")]
        with torch.no_grad():
            return InfoNCELoss(model)(features, None).item()

    before = loss_on_training_set()
    args = SentenceTransformerTrainingArguments(
        output_dir=str(tmp_path), num_train_epochs=3, per_device_train_batch_size=16, learning_rate=5e-4,
        warmup_steps=0, logging_steps=1, save_strategy="no", report_to=[], seed=0, use_cpu=True,
        dataloader_drop_last=True, disable_tqdm=True)
    trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=dataset,
                                         loss=InfoNCELoss(model, mini_batch_size=8))
    trainer.train()
    logged = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    after = loss_on_training_set()
    assert len(logged) == 18 and all(math.isfinite(v) for v in logged)
    assert sum(logged[-6:]) / 6 < sum(logged[:6]) / 6
    assert after < before - 0.1, (before, after)
