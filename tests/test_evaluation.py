import math
import os
import re
import time

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import importlib  # noqa: E402

import fastcse  # noqa: E402
from fastcse.evaluation import alignment_uniformity, encode, evaluate, load_pair_file, load_task, shared_dir  # noqa: E402,E501

evaluate_module = importlib.import_module("fastcse.evaluation")
SHARED = shared_dir()
MINILM = SHARED / "models" / "all-MiniLM-L6-v2"


@pytest.mark.parametrize("task, pairs", [("STS12", 3108), ("STS13", 1500), ("STS14", 3750), ("STS15", 3000),
                                         ("STS16", 1186), ("STSBenchmark", 1379), ("STSBenchmark-dev", 1500),
                                         ("SICKRelatedness", 4927), ("SICKRelatedness-dev", 500)])
def test_senteval_layout_pair_counts(task, pairs):
    first, second, gold = load_task(task)
    assert len(first) == len(second) == len(gold) == pairs
    assert np.isfinite(gold).all() and gold.min() >= 0 and gold.max() <= 5
    assert all(first) and all(second)


def test_senteval_and_raw_stsb_are_the_same_pairs():
    _, _, gold_senteval = load_task("STSBenchmark")
    first, _, gold_raw = load_pair_file(SHARED / "data" / "sts-raw" / "STSB" / "test.tsv")
    np.testing.assert_allclose(gold_senteval, gold_raw)
    assert first[0] == "A girl is styling her hair."  # the raw file keeps case and punctuation


def test_bad_tasks_fail_before_loading_a_model(tmp_path):
    with pytest.raises(ValueError, match="unknown task 'STS17'"):
        evaluate("/nonexistent/model", ["STS17"])
    bad = tmp_path / "pairs.tsv"
    bad.write_text("a\tb\tgold\nx\ty\t1\n", encoding="utf-8")
    with pytest.raises(ValueError, match="sentence1, sentence2, score"):
        load_pair_file(bad)
    with pytest.raises(FileNotFoundError, match="SentEval"):
        load_task("STS12", data_dir=tmp_path)
    with pytest.raises(FileNotFoundError):
        evaluate(tmp_path / "no-model", ["STSBenchmark"], pooler="avg")


def test_package_exposes_the_functions():
    assert fastcse.evaluate is evaluate and fastcse.alignment_uniformity is alignment_uniformity


@pytest.fixture(scope="module")
def tiny():
    from transformers import AutoTokenizer, BertConfig, BertModel

    tok = AutoTokenizer.from_pretrained(str(MINILM))
    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                 intermediate_size=64))
    return model, tok


def test_spearman_of_cosine_against_a_direct_computation(tiny, tmp_path):
    from scipy.stats import spearmanr

    model, tok = tiny
    pairs = tmp_path / "p.csv"
    rows = [("a man plays guitar", "a man is playing a guitar", 4.8), ("a cat sleeps", "the stock market fell", 0.2),
            ("kids play soccer", "children are playing football", 4.1), ("it rains", "a dog barks loudly", 0.5),
            ("a woman cooks", "someone is cooking", 3.9)]
    pairs.write_text("sentence1,sentence2,score\n" + "".join(f"{a},{b},{s}\n" for a, b, s in rows), encoding="utf-8")
    scores = evaluate(model, [str(pairs)], tokenizer=tok, pooler="avg")
    a = encode(model, tok, [r[0] for r in rows], pooler="avg")
    b = encode(model, tok, [r[1] for r in rows], pooler="avg")
    expected = spearmanr(torch.nn.functional.cosine_similarity(a, b).numpy(), [r[2] for r in rows]).correlation
    assert scores == {"p": pytest.approx(expected * 100, abs=1e-9)}
    assert model.training  # evaluation restores the caller's mode


def test_truncated_dimensions_score_the_first_coordinates(tiny, tmp_path):
    from scipy.stats import spearmanr

    from fastcse.evaluation import score_names

    model, tok = tiny
    rows = [("a man plays guitar", "a man is playing a guitar", 4.8), ("a cat sleeps", "the stock market fell", 0.2),
            ("kids play soccer", "children are playing football", 4.1), ("it rains", "a dog barks loudly", 0.5),
            ("a woman cooks", "someone is cooking", 3.9), ("two birds fly", "a plane lands", 1.1)]
    paths = []
    for name in ("p", "q"):
        path = tmp_path / f"{name}.csv"
        path.write_text("sentence1,sentence2,score\n" + "".join(f"{a},{b},{s}\n" for a, b, s in rows),
                        encoding="utf-8")
        paths.append(str(path))
        rows = rows[::-1][:5]
    scores = evaluate(model, paths, tokenizer=tok, pooler="avg", truncate_dims=(16, 4))
    assert list(scores) == score_names(paths, (16, 4)) == ["p", "q", "avg", "p@16", "q@16", "avg@16", "p@4", "q@4",
                                                           "avg@4"]
    pairs = load_pair_file(paths[0])
    a, b = (encode(model, tok, texts, pooler="avg") for texts in pairs[:2])
    for dim in (16, 4):
        cosine = torch.nn.functional.cosine_similarity(a[:, :dim], b[:, :dim])
        assert scores[f"p@{dim}"] == pytest.approx(spearmanr(cosine.numpy(), pairs[2]).correlation * 100, abs=1e-9)
        assert scores[f"avg@{dim}"] == pytest.approx((scores[f"p@{dim}"] + scores[f"q@{dim}"]) / 2, abs=1e-9)
    assert {k: scores[k] for k in ("p", "q", "avg")} == evaluate(model, paths, tokenizer=tok, pooler="avg")
    with pytest.raises(ValueError, match=r"truncate_dims must not exceed the embeddings' dim 32, got \(64,\)"):
        evaluate(model, paths, tokenizer=tok, pooler="avg", truncate_dims=(64,))
    with pytest.raises(ValueError, match=r"truncate_dims must be positive ints, got \(0,\)"):
        evaluate(model, paths, tokenizer=tok, pooler="avg", truncate_dims=(0,))


def test_no_truncation_below_the_model_maximum(tiny):
    model, tok = tiny
    long = " ".join(["word"] * 300)  # 302 tokens: past 256 (sentence-transformers' default) and 32
    cut = " ".join(["word"] * 40)
    emb = encode(model, tok, [long, cut], pooler="avg")
    assert not torch.allclose(emb[0], emb[1])


def test_alignment_uniformity_definitions(tiny):
    model, tok = tiny
    out = alignment_uniformity(model, tokenizer=tok, split="dev", pooler="avg")
    first, second, gold = load_task("STSBenchmark-dev")
    keep = gold > 4
    a = torch.nn.functional.normalize(encode(model, tok, [s for s, k in zip(first, keep) if k], pooler="avg"), dim=-1)
    b = torch.nn.functional.normalize(encode(model, tok, [s for s, k in zip(second, keep) if k], pooler="avg"), dim=-1)
    assert out["alignment"] == pytest.approx(float((a - b).pow(2).sum(-1).mean()), rel=1e-5)
    with pytest.raises(ValueError, match="split"):
        alignment_uniformity(model, tokenizer=tok, split="train")


E1, E2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])


def test_alignment_and_uniformity_formulas_on_known_vectors():
    # Unit vectors at 90 and 180 degrees: squared distances 2 and 4.
    a, b = torch.stack([E1, E1, E2]), torch.stack([E2, -E1, E2])
    assert evaluate_module.alignment(a, b) == pytest.approx((2 + 4 + 0) / 3)
    square = torch.stack([E1, E2, -E1, -E2])  # 6 pairs: four at distance^2 2, two at 4
    assert evaluate_module.uniformity(square) == pytest.approx(math.log((4 * math.exp(-4) + 2 * math.exp(-8)) / 6))
    assert evaluate_module.uniformity(torch.stack([E1, E1])) == pytest.approx(0.0)  # collapsed: the worst


def test_alignment_uniformity_on_a_stubbed_encoder(monkeypatch):
    """Positives are the pairs scored above the threshold; uniformity runs over distinct sentences;
    embeddings are normalized first (the stub returns them at length 3)."""
    vectors = {"a": E1, "b": E1, "c": E2, "d": -E1}
    pairs = (["a", "a", "c"], ["b", "c", "d"], np.array([5.0, 4.5, 1.0]))
    monkeypatch.setattr(evaluate_module, "load_task", lambda task, data_dir=None: pairs)
    monkeypatch.setattr(evaluate_module, "load_model", lambda *args, **kwargs: (None, None))
    monkeypatch.setattr(evaluate_module, "encode",
                        lambda model, tok, sentences, **kwargs: torch.stack([3 * vectors[s] for s in sentences]))
    out = alignment_uniformity("stub", pooler="avg")
    assert out["alignment"] == pytest.approx((0 + 2) / 2)  # (a, b) and (a, c); (c, d) scores 1 < 4
    # distinct sentences a, b, c, d: squared distances 0 (a-b), 2 (a-c, b-c, c-d) and 4 (a-d, b-d)
    assert out["uniformity"] == pytest.approx(math.log((1 + 3 * math.exp(-4) + 2 * math.exp(-8)) / 6))


@pytest.mark.slow
def test_minilm_mean_pooling_reproduces_its_published_stsb_score():
    """The evaluator agrees with an independent one: 82.03 is all-MiniLM-L6-v2's published STS-B test figure."""
    started = time.perf_counter()
    scores = evaluate(MINILM, [str(SHARED / "data" / "sts-raw" / "STSB" / "test.tsv")], pooler="avg")
    seconds = time.perf_counter() - started
    assert round(scores["test"], 2) == 82.03
    # pooler="auto" reads the model's sentence-transformers pooling config (mean tokens)
    assert evaluate_module.resolve_pooler("auto", MINILM) == "avg"
    print(f"all-MiniLM-L6-v2 STS-B test: {scores['test']:.2f} in {seconds:.1f} s")


@pytest.mark.parametrize("name, content, line, what", [
    ("p.csv", b"sentence1,sentence2,score\na,b,1\nan apple, a pear,b,2\n", 3, "4 fields but the header has 3"),
    ("p.tsv", b"sentence1\tsentence2\tscore\na\tb\t1\n\nonly\t2\n", 4, "2 fields but the header has 3"),
    ("p.csv", b'sentence1,sentence2,score\n"open,b,1\nc,d,2\ne,",3\n', 2, "unbalanced quote"),
    ("p.tsv", b"sentence1\tsentence2\tscore\na\tb\t1\nna\xefve\tc\t2\n", 3, "not UTF-8"),
    ("p.tsv", b"sentence1\tsentence2\tscore\na\tb\t1\nc\td\thigh\n", 3, "score 'high' is not a number"),
])
def test_malformed_pair_files_name_the_line(tmp_path, name, content, line, what):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ValueError, match=rf"{name}, line {line}: .*{what}"):
        load_pair_file(path)


def test_tsv_pair_file_keeps_bare_quotes(tmp_path):
    path = tmp_path / "q.tsv"
    path.write_text('sentence1\tsentence2\tscore\n"Hi," she said.\the said "no\t2.5\n', encoding="utf-8")
    first, second, gold = load_pair_file(path)
    assert first == ['"Hi," she said.'] and second == ['he said "no'] and gold.tolist() == [2.5]


@pytest.fixture
def hub_calls(monkeypatch):
    """Stubs transformers' loaders: records what would be fetched, fetches nothing."""
    import transformers

    calls = []

    def fake_from_pretrained(name, *args, **kwargs):
        calls.append(str(name))
        raise OSError("stub: not fetched")

    for cls in (transformers.AutoModel, transformers.AutoTokenizer):
        monkeypatch.setattr(cls, "from_pretrained", staticmethod(fake_from_pretrained))
    return calls


@pytest.mark.parametrize("name", ["./models/nope", "/abs/missing", "~/fastcse-no-such-model", "runs/nope",
                                  "runs/nope/best", "my models/nope", "org/name/", "..\\nope"])
def test_a_missing_local_model_path_is_not_tried_as_a_hub_id(tmp_path, monkeypatch, hub_calls, name):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()  # "runs/nope" exists partially: a local path, not the Hub id of org "runs"
    with pytest.raises(FileNotFoundError, match=re.escape(repr(name))):
        evaluate_module.load_model(name)
    assert hub_calls == []


@pytest.mark.parametrize("name", ["org/name", "bert-base-uncased", "sentence-transformers/all-MiniLM-L6-v2"])
def test_hub_ids_still_go_to_transformers(tmp_path, monkeypatch, hub_calls, name):
    monkeypatch.chdir(tmp_path)
    for switch in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):  # online: the Hub is transformers' to ask
        monkeypatch.delenv(switch, raising=False)
    with pytest.raises(OSError, match="stub"):
        evaluate_module.load_model(name)
    assert hub_calls == [name]


@pytest.mark.parametrize("switch", ["HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"])
def test_offline_a_hub_id_missing_from_the_cache_fails_at_once(tmp_path, monkeypatch, hub_calls, switch):
    monkeypatch.chdir(tmp_path)
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(switch, "1")
    with pytest.raises(FileNotFoundError, match="'no_such_dir/best' is not a local folder and not in the local "
                                                "Hugging Face cache"):
        evaluate_module.load_model("no_such_dir/best")
    assert hub_calls == []  # transformers never asked: no retries, no traceback
    monkeypatch.setattr(evaluate_module, "_in_hub_cache", lambda name: True)  # a cached model still loads offline
    with pytest.raises(OSError, match="stub"):
        evaluate_module.load_model("org/name")
    assert hub_calls == ["org/name"]


def test_a_home_relative_model_path_is_expanded(tmp_path, monkeypatch, hub_calls):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}", encoding="utf-8")
    with pytest.raises(OSError, match="stub"):
        evaluate_module.load_model("~/model")
    assert hub_calls == [str(tmp_path / "model")]
