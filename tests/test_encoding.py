"""Length-aware encoding (fastcse.encoding) and the trainer's step: same embeddings, loss and
gradients as one padded forward of the whole batch, in fewer tokens."""

import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from fastcse import encoding as enc  # noqa: E402
from fastcse.evaluation import shared_dir  # noqa: E402
from fastcse.gradcache import uncached_step  # noqa: E402
from fastcse.pooling import POOLERS, pool  # noqa: E402
from fastcse.training.batches import BatchOrder, TokenizedBatches  # noqa: E402
from fastcse.training.model import build_bert_from_scratch  # noqa: E402
from fastcse.training.step import ContrastiveStep, LossOptions  # noqa: E402

MINILM = shared_dir() / "models" / "all-MiniLM-L6-v2"
TEXTS = ["a man is playing a guitar .", "rain", "two dogs run along the beach while the sun sets over the sea",
         "the stock market fell sharply today", "a child reads", "it is raining in the city tonight , again",
         "someone is cooking pasta in a small kitchen with an old stove and a window", "birds fly south",
         "ok", "the quick brown fox jumps over the lazy dog near the river bank"]


def tiny(dropout=0.0, attention="sdpa"):
    model, tok = build_bert_from_scratch(MINILM, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
                                         max_position_embeddings=64, dropout=dropout, seed=3)
    model.config._attn_implementation = attention
    return model, tok


def padded_reference(model, tok, texts, pooler, max_length=24):
    """fastcse 0.1's encoding: the whole batch padded to its longest sequence, one forward."""
    inputs = tok(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return pool(model, dict(inputs), pooler, use_mlp=True)


def encode_in_units(model, tok, texts, encoding, pooler, plan_kwargs, max_length=24):
    ids = enc.tokenize(tok, texts, max_length)
    plan = enc.StepPlan(enc.plan_units([len(x) for x in ids], sort=encoding != "padded", **plan_kwargs))
    units = enc.build_units(ids, plan.units, encoding, tok.pad_token_id, "cpu",
                            float_mask=model.config._attn_implementation == "eager")
    return plan.to_batch_order(torch.cat([u.pool(model, pooler, use_mlp=True) for u in units])), plan


# ---- planning


@settings(max_examples=60, deadline=None)
@given(lengths=st.lists(st.integers(1, 40), min_size=1, max_size=60),
       max_sequences=st.one_of(st.none(), st.integers(1, 20)),
       max_tokens=st.one_of(st.none(), st.integers(40, 400)),
       max_padded=st.one_of(st.none(), st.integers(40, 400)))
def test_plan_units_covers_every_sequence_within_the_bounds(lengths, max_sequences, max_tokens, max_padded):
    units = enc.plan_units(lengths, max_sequences=max_sequences, max_tokens=max_tokens,
                           max_padded_tokens=max_padded)
    flat = [i for unit in units for i in unit]
    assert sorted(flat) == list(range(len(lengths)))  # a permutation: nothing dropped or repeated
    assert [lengths[i] for i in flat] == sorted(lengths)  # shortest first
    for unit in units:
        assert unit
        if max_sequences is not None:
            assert len(unit) <= max_sequences
        if max_tokens is not None:
            assert sum(lengths[i] for i in unit) <= max_tokens
        if max_padded is not None:
            assert len(unit) * max(lengths[i] for i in unit) <= max_padded
    # greedy: a unit is cut only when the next sequence would break a bound
    for unit, nxt in zip(units, units[1:]):
        grown = unit + [nxt[0]]
        assert ((max_sequences is not None and len(grown) > max_sequences)
                or (max_tokens is not None and sum(lengths[i] for i in grown) > max_tokens)
                or (max_padded is not None and len(grown) * max(lengths[i] for i in grown) > max_padded))


def test_step_plan_restores_batch_order():
    plan = enc.StepPlan([[2, 0], [3], [1]])
    units_concat = torch.tensor([[20.0], [0.0], [30.0], [10.0]])  # rows of sequences 2, 0, 3, 1
    assert plan.to_batch_order(units_concat).squeeze(1).tolist() == [0.0, 10.0, 20.0, 30.0]


def test_sorting_reduces_padded_tokens_on_real_data():
    lines = (shared_dir() / "data" / "unsup" / "mixed-104k.txt").read_text(encoding="utf-8").splitlines()[:64]
    from transformers import AutoTokenizer

    lengths = [len(x) for x in enc.tokenize(AutoTokenizer.from_pretrained(str(MINILM)), lines, 32) for _ in (0, 1)]
    padded = len(lengths) * max(lengths)
    sorted_units = enc.plan_units(lengths, max_padded_tokens=enc.SORTED_UNIT_TOKENS)
    sorted_tokens = sum(len(u) * max(lengths[i] for i in u) for u in sorted_units)
    packed = enc.pack_unit([[1] * n for n in lengths], 0, "cpu")
    assert sum(lengths) <= sorted_tokens < 0.8 * padded
    assert packed.inputs["input_ids"].numel() < 1.1 * sum(lengths)


# ---- the same embeddings as one padded forward


@pytest.mark.parametrize("pooler", POOLERS)
@pytest.mark.parametrize("encoding, plan_kwargs", [
    ("packed", {}), ("packed", {"max_sequences": 3}), ("sorted", {"max_padded_tokens": 40}),
    ("sorted", {"max_tokens": 30}), ("padded", {"max_sequences": 4})])
def test_units_give_the_padded_embeddings(pooler, encoding, plan_kwargs):
    model, tok = tiny()
    model.eval()
    with torch.no_grad():
        expected = padded_reference(model, tok, TEXTS, pooler)
        got, plan = encode_in_units(model, tok, TEXTS, encoding, pooler, plan_kwargs)
    assert len(plan.units) > 1 or encoding == "packed"
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_packed_rows_hold_several_sequences():
    model, tok = tiny()
    ids = enc.tokenize(tok, TEXTS, 24)
    unit = enc.pack_unit(ids, tok.pad_token_id, "cpu", row_tokens=32)
    rows = unit.inputs["input_ids"].shape[0]
    assert rows < len(TEXTS)  # sequences share rows, else the test shows nothing about the mask
    assert unit.inputs["input_ids"].numel() - sum(map(len, ids)) < rows * max(map(len, ids))


def test_eager_attention_takes_the_additive_mask():
    model, tok = tiny(attention="eager")
    model.eval()
    with torch.no_grad():
        expected = padded_reference(model, tok, TEXTS, "avg")
        got, _ = encode_in_units(model, tok, TEXTS, "packed", "avg", {})
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_real_minilm_packed_equals_padded():
    from transformers import AutoModel, AutoTokenizer

    model, tok = AutoModel.from_pretrained(str(MINILM)), AutoTokenizer.from_pretrained(str(MINILM))
    assert enc.resolve_encoding("auto", model) == "packed"
    model.eval()
    with torch.no_grad():
        expected = padded_reference(model, tok, TEXTS, "avg", max_length=32)
        got, _ = encode_in_units(model, tok, TEXTS, "packed", "avg", {}, max_length=32)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_encoding_choice_and_its_errors():
    model, _ = tiny()
    assert enc.resolve_encoding("auto", model) == "packed"
    model.config._attn_implementation = "flex_attention"
    assert enc.resolve_encoding("auto", model) == "sorted"
    with pytest.raises(ValueError, match="encoding='packed' needs a BERT-family encoder"):
        enc.resolve_encoding("packed", model)
    with pytest.raises(ValueError, match="encoding must be one of"):
        enc.check_encoding("jagged")


# ---- the trainer's step: loss and gradients of the whole batch


def make_step(model, encoding, views, **cache):
    return ContrastiveStep(model, "cls", encoding, views, LossOptions(0.05), None, None, torch.device("cpu"), **cache)


def reference_step(model, tok, texts, views):
    """fastcse 0.1's step: one padded forward of the example-major sequences, the loss, backward."""
    import fastcse

    model.zero_grad(set_to_none=True)
    emb = padded_reference(model, tok, texts, "cls").view(-1, views, model.config.hidden_size)
    loss = fastcse.info_nce(emb[:, 0], emb[:, 1], emb[:, 2] if views == 3 else None)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def run_step(step, model, ids):
    model.zero_grad(set_to_none=True)
    loss = step(ids)
    return loss, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.fixture(scope="module")
def minilm():
    from transformers import AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(str(MINILM))
    model.eval()  # dropout off: every layout must give the same numbers
    return model, AutoTokenizer.from_pretrained(str(MINILM))


def relative_errors(grads, expected):
    """Per parameter: max |difference| / max |expected|, skipping the key biases, whose gradient
    is zero in exact arithmetic (softmax ignores a per-query constant) and pure roundoff here."""
    assert grads.keys() == expected.keys()
    return {n: float((grads[n] - g).abs().max() / g.abs().max()) for n, g in expected.items()
            if not n.endswith("attention.self.key.bias")}


CACHES = [{}, {"mini_batch_sequences": 4}, {"mini_batch_tokens": 40}, {"mini_batch_sequences": 5, "mini_batch_tokens": 50}]


@pytest.mark.parametrize("encoding", ["packed", "sorted", "padded"])
@pytest.mark.parametrize("cache", CACHES)
def test_step_loss_and_gradients_equal_the_padded_step_fp32(encoding, cache, minilm):
    model, tok = minilm
    texts = TEXTS[:9]  # three supervised triples, example-major
    expected_loss, expected_grads = reference_step(model, tok, texts, views=3)
    step = make_step(model, encoding, 3, **cache)
    ids = enc.tokenize(tok, texts, 24)
    assert step.caching == bool(cache) and (len(step.plan(ids).units) > 1) == bool(cache)
    loss, grads = run_step(step, model, ids)
    torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=1e-6)
    worst = max(relative_errors(grads, expected_grads).items(), key=lambda kv: kv[1])
    assert worst[1] < 1e-4, worst


@pytest.mark.parametrize("pooler", ["cls", "avg_top2"])
@pytest.mark.parametrize("encoding", ["packed", "sorted"])
@pytest.mark.parametrize("cache", CACHES[:3])
def test_step_gradients_are_exact_in_fp64(encoding, cache, pooler, monkeypatch):
    """In float64 the layouts agree to roundoff on every parameter (a random tiny BERT's fp32
    gradients are too ill-conditioned to show it: its sentence embeddings are nearly parallel)."""
    monkeypatch.setattr(enc, "SORTED_UNIT_TOKENS", 40)  # uncached "sorted": several units with graph
    model, tok = tiny()
    model.double()
    texts = TEXTS[:8]
    import fastcse

    model.zero_grad(set_to_none=True)
    emb = padded_reference(model, tok, texts, pooler).view(4, 2, -1)
    fastcse.info_nce(emb[:, 0], emb[:, 1]).backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    step = ContrastiveStep(model, pooler, encoding, 2, LossOptions(0.05), None, None, torch.device("cpu"), **cache)
    assert len(step.plan(enc.tokenize(tok, texts, 24)).units) > 1 or (encoding == "packed" and not cache)
    _, grads = run_step(step, model, enc.tokenize(tok, texts, 24))
    assert max(relative_errors(grads, expected).values()) < 1e-9


def test_cached_step_with_dropout_equals_an_uncached_pass_over_the_same_units():
    model, tok = tiny(dropout=0.1)
    model.train()
    ids = [seq for seq in enc.tokenize(tok, TEXTS, 24) for _ in (0, 1)]  # two dropout views each
    step = make_step(model, "packed", 2, mini_batch_tokens=60)
    plan = step.plan(ids)
    assert len(plan.units) > 2
    torch.manual_seed(11)
    cached_loss, cached_grads = run_step(step, model, ids)
    after_cached = torch.get_rng_state()

    torch.manual_seed(11)
    model.zero_grad(set_to_none=True)
    units = enc.build_units(ids, plan.units, "packed", tok.pad_token_id, "cpu")
    plain_loss = uncached_step(step.encode, units, lambda e: step.loss(plan, e))
    plain_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert torch.equal(torch.get_rng_state(), after_cached)  # the generator ends where it would
    torch.testing.assert_close(cached_loss, plain_loss, rtol=1e-6, atol=1e-7)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(cached_grads[name], grad, rtol=1e-4, atol=1e-6)

    torch.manual_seed(12)  # a control: other dropout masks give another loss
    other_loss, _ = run_step(step, model, ids)
    assert abs(float(other_loss) - float(cached_loss)) > 1e-4


# ---- data order and tokenization ahead


def test_batch_order_is_computed_once_per_epoch(monkeypatch):
    import fastcse.data as datalib

    calls = []
    real = datalib.batch_order
    monkeypatch.setattr(datalib, "batch_order", lambda *a, **k: calls.append(k["epoch"]) or real(*a, **k))
    order = BatchOrder(num_examples=40, batch_size=8, seed=5)
    got = [order(step) for step in range(12)]  # 5 steps per epoch: epochs 0, 1, 2
    assert calls == [0, 1, 2]
    assert got[7] == (1, real(40, 8, seed=5, epoch=1)[2])


def test_tokenized_batches_are_prepared_one_step_ahead():
    _, tok = tiny()
    sentences = [f"sentence {i} " + "word " * (i % 7) for i in range(20)]
    order = BatchOrder(len(sentences), 4, seed=1)
    batches = TokenizedBatches(sentences, "unsup", tok, 16, order, (0, 4), total_steps=5)
    try:
        epoch, ids = batches(0)
        assert 1 in batches._ahead  # the next step is already being tokenized
        expected = [seq for seq in enc.tokenize(tok, [sentences[i] for i in order(0)[1]], 16) for _ in (0, 1)]
        assert (epoch, ids) == (0, expected)
        assert batches(1) == (0, [s for s in enc.tokenize(tok, [sentences[i] for i in order(1)[1]], 16)
                                  for _ in (0, 1)])
    finally:
        batches.close()


# ---- train(): the token budget and the encoding choice, end to end


SENTENCES = [f"sentence {i} " + "with more words " * (i % 5) for i in range(24)]


def train_tiny(tmp_path, **kwargs):
    from fastcse.training import train

    args = dict(batch_size=8, max_steps=2, eval_data=None, progress=False, output_dir=tmp_path / "out",
                learning_rate=1e-3)
    return train(tiny(dropout=0.1), SENTENCES, **dict(args, **kwargs))


@pytest.mark.parametrize("value", [0, -3, 2.5, True, "512"])
def test_mini_batch_tokens_must_be_a_positive_int(tmp_path, value):
    with pytest.raises(ValueError, match="mini_batch_tokens must be an int >= 1"):
        train_tiny(tmp_path, mini_batch_tokens=value)
    assert not (tmp_path / "out").exists()


def test_mini_batch_tokens_below_the_longest_sequence_fails_before_training(tmp_path):
    longest = max(len(x) for x in enc.tokenize(tiny()[1], SENTENCES, 32))
    with pytest.raises(ValueError, match=rf"mini_batch_tokens \(5\) is smaller than the longest sequence.*"
                                         rf"\({longest} tokens\)"):
        train_tiny(tmp_path, mini_batch_tokens=5)
    assert not (tmp_path / "out").exists()  # refused before the output folder is touched
    train_tiny(tmp_path, mini_batch_tokens=longest, max_steps=1)  # the longest sequence alone fits


@pytest.mark.parametrize("encoding", ["auto", "packed", "sorted", "padded"])
def test_token_budget_training_runs_cached_chunks(tmp_path, monkeypatch, encoding):
    import json

    import fastcse.training.step as trainer

    chunk_counts = []
    real = trainer.cached_step

    def counting(encode, units, loss_fn, **kw):
        chunk_counts.append(len(units))
        return real(encode, units, loss_fn, **kw)

    monkeypatch.setattr(trainer, "cached_step", counting)
    result = train_tiny(tmp_path, mini_batch_tokens=40, encoding=encoding)
    assert chunk_counts and all(n > 1 for n in chunk_counts)  # the budget cut each batch into chunks
    losses = [json.loads(x)["loss"] for x in open(result.metrics_path, encoding="utf-8")]
    assert len(losses) == 2 and all(0 < x < 10 for x in losses)


def test_packed_encoding_on_a_model_that_cannot_pack_fails_before_training(tmp_path):
    from fastcse.training import train

    model, tok = tiny()
    model.config._attn_implementation = "flex_attention"
    with pytest.raises(ValueError, match="encoding='packed' needs a BERT-family encoder"):
        train((model, tok), SENTENCES, batch_size=8, max_steps=1, eval_data=None, progress=False,
              output_dir=tmp_path / "out", encoding="packed")
    assert not (tmp_path / "out").exists()
