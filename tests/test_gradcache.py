"""Gradient caching gives the gradients of the uncached step, dropout included."""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from fastcse import gradcache, info_nce  # noqa: E402
from fastcse.evaluation import shared_dir  # noqa: E402
from fastcse.gradcache import cached_step, split_chunks, uncached_step  # noqa: E402
from fastcse.pooling import pool  # noqa: E402

TOKENIZER = shared_dir() / "models" / "all-MiniLM-L6-v2"
SENTENCES = ["a man is playing a guitar .", "a woman slices an onion", "two dogs run on the beach",
             "the stock market fell sharply today", "a child reads a book", "it is raining in the city",
             "someone is cooking pasta in a small kitchen", "birds fly south"]


def tiny_bert(dropout: float):
    from transformers import AutoTokenizer, BertConfig, BertModel

    tok = AutoTokenizer.from_pretrained(str(TOKENIZER))
    cfg = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    torch.manual_seed(1)
    model = BertModel(cfg).double()  # float64: the comparisons test the algorithm, not roundoff
    model.train()
    return model, tok


def make_step(model, tok, views, pooler="cls"):
    def tokenize(rows):
        inputs = tok(list(rows), padding="max_length", max_length=16, truncation=True, return_tensors="pt")
        return {k: v.repeat_interleave(views, dim=0) for k, v in inputs.items()}

    def encode(inputs):
        emb = pool(model, inputs, pooler, use_mlp=True)
        return emb.view(-1, views, emb.shape[-1])

    def loss_fn(emb):
        negative = emb[:, 2] if views == 3 else None
        return info_nce(emb[:, 0], emb[:, 1], negative, temperature=0.05,
                        hard_negative_weight=0.5 if views == 3 else 0.0)

    return tokenize, encode, loss_fn


def grads(model):
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


def assert_same_grads(a, b, rtol=1e-9, atol=1e-11):
    assert a.keys() == b.keys() and len(a) > 10
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("views", [2, 3])
@pytest.mark.parametrize("mini", [1, 3, 4])
def test_dropout_off_cached_equals_full_batch(views, mini):
    model, tok = tiny_bert(dropout=0.0)
    tokenize, encode, loss_fn = make_step(model, tok, views)
    full = uncached_step(encode, [tokenize(SENTENCES)], loss_fn)
    g_full = grads(model)
    cached = cached_step(encode, [tokenize(c) for c in split_chunks(SENTENCES, mini)], loss_fn)
    g_cached = grads(model)
    torch.testing.assert_close(cached, full, rtol=1e-12, atol=1e-12)
    assert_same_grads(g_cached, g_full)


def test_dropout_on_cached_equals_uncached_pass_over_same_chunks():
    model, tok = tiny_bert(dropout=0.3)
    tokenize, encode, loss_fn = make_step(model, tok, views=2)
    chunks = [tokenize(c) for c in split_chunks(SENTENCES, 3)]
    torch.manual_seed(123)
    loss_ref = uncached_step(encode, chunks, loss_fn)
    g_ref = grads(model)
    rng_after_ref = torch.get_rng_state()
    torch.manual_seed(123)
    loss_cached = cached_step(encode, chunks, loss_fn)
    g_cached = grads(model)
    torch.testing.assert_close(loss_cached, loss_ref, rtol=1e-12, atol=1e-12)
    assert_same_grads(g_cached, g_ref)
    # The generator ends where the uncached step leaves it: cached and uncached runs stay in step.
    assert torch.equal(torch.get_rng_state(), rng_after_ref)


def test_dropout_on_without_rng_replay_gives_other_grads(monkeypatch):
    """The control for the test above: if the replay drew fresh dropout masks, it would fail."""
    model, tok = tiny_bert(dropout=0.3)
    tokenize, encode, loss_fn = make_step(model, tok, views=2)
    chunks = [tokenize(c) for c in split_chunks(SENTENCES, 3)]
    torch.manual_seed(123)
    uncached_step(encode, chunks, loss_fn)
    g_ref = grads(model)
    monkeypatch.setattr(gradcache.RandomState, "restore", lambda self: None)
    torch.manual_seed(123)
    cached_step(encode, chunks, loss_fn)
    g_cached = grads(model)
    with pytest.raises(AssertionError):
        assert_same_grads(g_cached, g_ref)


def test_both_dropout_views_differ_and_are_replayed():
    """Unsupervised SimCSE's two views of one sentence come from one forward with different masks."""
    model, tok = tiny_bert(dropout=0.3)
    tokenize, encode, _ = make_step(model, tok, views=2)
    inputs = tokenize(SENTENCES[:2])
    state = gradcache.RandomState()
    with torch.no_grad():
        first = encode(inputs)
    state.restore()
    with torch.no_grad():
        again = encode(inputs)
    assert not torch.allclose(first[:, 0], first[:, 1])  # the views differ: dropout is the augmentation
    assert torch.equal(first, again)  # and the replay reproduces both


def test_split_chunks_and_empty():
    assert split_chunks(list(range(7)), 3) == [[0, 1, 2], [3, 4, 5], [6]]
    assert split_chunks(list(range(4)), None) == [[0, 1, 2, 3]]
    assert split_chunks(list(range(4)), 8) == [[0, 1, 2, 3]]
    with pytest.raises(ValueError, match="at least one"):
        cached_step(lambda c: c, [], lambda e: e.sum())
