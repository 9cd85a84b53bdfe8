"""The trainer end to end on tiny from-scratch BERTs: results, checkpoints, resume, bad input."""

import json
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import fastcse  # noqa: E402
import fastcse.trainer as train_module  # noqa: E402
from fastcse.evaluation import encode, shared_dir  # noqa: E402
from fastcse.trainer import build_bert_from_scratch, save_checkpoint, train  # noqa: E402

SHARED = shared_dir()
TOKENIZER = SHARED / "models" / "all-MiniLM-L6-v2"
NLI = SHARED / "data" / "nli" / "snli-dev-triples.csv"
SENTENCES = [f"sentence number {i} is about {w} and {v}" for i, (w, v) in
             enumerate(zip(["cats", "dogs", "rain", "music", "bread", "trains", "rivers", "books"] * 6,
                           ["the sea", "a city", "old songs", "red cars", "snow", "tea", "clocks", "maps"] * 6))]


def tiny(**kw):
    return build_bert_from_scratch(TOKENIZER, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64,
                                   max_position_embeddings=128, **kw)


@pytest.fixture(scope="module")
def dev_pairs(tmp_path_factory):
    """40 STS-B dev pairs: enough for a Spearman, cheap to evaluate."""
    src = (SHARED / "data" / "sts-raw" / "STSB" / "dev.tsv").read_text(encoding="utf-8").splitlines()
    path = tmp_path_factory.mktemp("dev") / "dev40.tsv"
    path.write_text("\n".join(src[:41]) + "\n", encoding="utf-8")
    return str(path)


def weights(model_path):
    from safetensors.torch import load_file

    return load_file(os.path.join(model_path, "model.safetensors"))


def test_unsup_run_saves_a_loadable_best_model_and_metrics(tmp_path, dev_pairs):
    from transformers import AutoModel, AutoTokenizer

    result = train(tiny(), SENTENCES, batch_size=8, max_steps=4, eval_steps=2, eval_data=dev_pairs,
                   output_dir=tmp_path / "run", learning_rate=1e-3, progress=False)
    assert result.steps == 4
    assert [h["step"] for h in result.history] == [0, 2, 4]  # before training, every eval_steps
    assert result.best_metric == max(h["metric"] for h in result.history)
    assert result.model_path == str(tmp_path / "run" / "best")
    lines = [json.loads(x) for x in open(result.metrics_path, encoding="utf-8")]
    assert [x["step"] for x in lines if "loss" in x] == [1, 2, 3, 4]
    assert all(x["loss"] > 0 and x["sentences_per_second"] > 0 for x in lines if "loss" in x)
    assert [x["step"] for x in lines if "eval" in x] == [0, 2, 4]
    model = AutoModel.from_pretrained(result.model_path)
    tok = AutoTokenizer.from_pretrained(result.model_path)
    record = json.loads(open(os.path.join(result.model_path, "fastcse.json")).read())
    # unsupervised cls: the MLP head trains, evaluation uses the raw [CLS] (mlp_only_train)
    assert record["step"] == result.best_step and record["eval_pooler"] == "cls_before_pooler"
    again = fastcse.evaluate(result.model_path, [dev_pairs])
    assert again["dev40"] == pytest.approx(result.best_metric, abs=1e-6)
    assert not any(name.startswith(".") for name in os.listdir(tmp_path / "run"))  # no temporary folders left
    assert model.config.hidden_size == 32 and tok is not None


def test_training_changes_the_weights_and_learns(tmp_path):
    model, tok = tiny(seed=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = train((model, tok), SENTENCES, batch_size=16, max_steps=6, eval_data=None, learning_rate=1e-3,
                   output_dir=tmp_path / "run", progress=False)
    losses = [json.loads(x)["loss"] for x in open(result.metrics_path, encoding="utf-8")]
    assert losses[-1] < losses[0]  # the contrastive task gets easier as the encoder trains
    after = weights(result.model_path)
    assert result.model_path == str(tmp_path / "run" / "last")
    assert any(not torch.equal(before[k], after[k]) for k in after if k in before)


def test_cached_training_equals_uncached_with_dropout_off(tmp_path, monkeypatch):
    # SGD instead of AdamW for this comparison: Adam normalizes each element, so fp32 roundoff in a
    # near-zero gradient becomes a step of +-lr; SGD keeps weight differences proportional to
    # gradient differences.
    monkeypatch.setattr(torch.optim, "AdamW", lambda groups, lr: torch.optim.SGD(groups, lr=lr))
    runs, losses = {}, {}
    for mini in (None, 3):
        res = train(tiny(dropout=0.0), SENTENCES, batch_size=12, mini_batch_size=mini, max_steps=3,
                    eval_data=None, learning_rate=0.5, output_dir=tmp_path / f"run{mini}", progress=False)
        runs[mini] = weights(res.model_path)
        losses[mini] = [json.loads(x)["loss"] for x in open(res.metrics_path, encoding="utf-8")]
    assert losses[3] == pytest.approx(losses[None], rel=1e-5)
    moved = 0
    start = tiny(dropout=0.0)[0].state_dict()
    for name in runs[None]:
        torch.testing.assert_close(runs[3][name], runs[None][name], rtol=1e-5, atol=1e-6)
        moved += not torch.equal(runs[None][name], start[name])
    assert moved > 10  # the comparison is between trained weights, not two copies of the start


def test_resume_continues_to_the_same_weights(tmp_path, monkeypatch):
    common = dict(batch_size=8, mini_batch_size=4, max_steps=4, eval_steps=2, eval_data=None, learning_rate=1e-3,
                  progress=False, seed=7)
    straight = train(tiny(), SENTENCES, output_dir=tmp_path / "straight", **common)

    real_step = train_module.cached_step
    calls = {"n": 0}

    def crash_on_third(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("simulated crash")
        return real_step(*a, **k)

    monkeypatch.setattr(train_module, "cached_step", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        train(tiny(), SENTENCES, output_dir=tmp_path / "resumed", **common)
    monkeypatch.setattr(train_module, "cached_step", real_step)
    resumed = train(tiny(), SENTENCES, output_dir=tmp_path / "resumed", resume_from=tmp_path / "resumed", **common)
    assert resumed.steps == 4
    a, b = weights(straight.model_path), weights(resumed.model_path)
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=0)
    steps = [json.loads(x)["step"] for x in open(resumed.metrics_path, encoding="utf-8")]
    assert steps == [1, 2, 3, 4]  # the crashed run's records past its checkpoint are gone
    with pytest.raises(ValueError, match="batch_size"):
        train(tiny(), SENTENCES, output_dir=tmp_path / "resumed", resume_from=tmp_path / "resumed",
              **dict(common, batch_size=4, mini_batch_size=None))


def test_supervised_with_hard_negatives_and_sentence_transformers_export(tmp_path, dev_pairs):
    SentenceTransformer = pytest.importorskip("sentence_transformers").SentenceTransformer

    result = train(tiny(), NLI, mode="sup", batch_size=8, max_steps=2, eval_steps=2, eval_data=dev_pairs,
                   hard_negative_weight=0.5, output_dir=tmp_path / "sup", progress=False)
    record = json.loads(open(os.path.join(result.model_path, "fastcse.json")).read())
    assert record["eval_pooler"] == "cls" and record["mode"] == "sup"  # sup keeps the MLP head at evaluation
    from transformers import AutoModel, AutoTokenizer

    model, tok = AutoModel.from_pretrained(result.model_path), AutoTokenizer.from_pretrained(result.model_path)
    sentences = ["a man is playing a guitar .", "two dogs run on the beach ."]
    ours = encode(model, tok, sentences, pooler="cls")
    st = SentenceTransformer(result.model_path, device="cpu")
    theirs = torch.as_tensor(st.encode(sentences, convert_to_numpy=True))
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("pooler", ["avg", "cls_before_pooler"])
def test_sentence_transformers_pooling_matches(tmp_path, pooler):
    SentenceTransformer = pytest.importorskip("sentence_transformers").SentenceTransformer
    from transformers import AutoModel, AutoTokenizer

    model, tok = tiny()
    save_checkpoint(tmp_path / "m", model, tok, {"eval_pooler": pooler})
    sentences = ["a short one .", "a rather longer sentence with several more words in it ."]
    ours = encode(AutoModel.from_pretrained(tmp_path / "m"), AutoTokenizer.from_pretrained(tmp_path / "m"),
                  sentences, pooler=pooler)
    theirs = torch.as_tensor(SentenceTransformer(str(tmp_path / "m"), device="cpu").encode(sentences))
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-5)


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    model, tok = tiny()
    save_checkpoint(tmp_path / "best", model, tok, {"eval_pooler": "avg", "step": 1})
    before = weights(tmp_path / "best")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)

    def crash(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(tok, "save_pretrained", crash)  # dies after the model weights are written
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path / "best", model, tok, {"eval_pooler": "avg", "step": 2})
    after = weights(tmp_path / "best")
    assert all(torch.equal(before[k], after[k]) for k in before)  # the previous best is intact
    assert json.loads((tmp_path / "best" / "fastcse.json").read_text())["step"] == 1


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(batch_size=1), ValueError, "batch_size must be an int >= 2"),
    (dict(batch_size=8, mini_batch_size=16), ValueError, r"mini_batch_size \(16\) must not exceed batch_size \(8\)"),
    (dict(mode="semi"), ValueError, "mode must be one of"),
    (dict(pooler="max"), ValueError, "pooler must be one of"),
    (dict(temperature=0.0), ValueError, "temperature"),
    (dict(hard_negative_weight=1.0), ValueError, "hard_negative_weight applies to supervised"),
    (dict(eval_data="STS99"), ValueError, "eval_data must be"),
    (dict(eval_data="missing.tsv"), FileNotFoundError, "missing.tsv"),
    (dict(batch_size=64), ValueError, "fewer than batch_size=64"),
    (dict(precision="fp16"), ValueError, "precision must be one of"),
    (dict(resume_from="nowhere"), FileNotFoundError, "trainer_state"),
])
def test_bad_arguments_fail_before_training(tmp_path, kwargs, error, match):
    kwargs = dict(dict(batch_size=8, max_steps=1, eval_data=None, progress=False, output_dir=tmp_path / "out"), **kwargs)
    with pytest.raises(error, match=match):
        train(tiny(), SENTENCES, **kwargs)
    assert not (tmp_path / "out" / "metrics.jsonl").exists()


def test_bad_data_fails_before_training(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n", encoding="utf-8")
    wrong = tmp_path / "wrong.csv"
    wrong.write_text("premise,hypothesis\na,b\n", encoding="utf-8")
    cases = [(dict(data=tmp_path / "nope.txt"), FileNotFoundError, "nope.txt"),
             (dict(data=empty), ValueError, "no sentences"),
             (dict(data=wrong, mode="sup"), ValueError, "sent0,sent1"),
             (dict(data=SENTENCES, model=str(tmp_path / "no-model")), FileNotFoundError, "no-model")]
    for case, error, match in cases:
        args = dict(dict(model=tiny(), batch_size=8, max_steps=1, eval_data=None, progress=False,
                         output_dir=tmp_path / "out"), **case)
        with pytest.raises(error, match=match):
            train(args.pop("model"), args.pop("data"), **args)
    assert not (tmp_path / "out" / "metrics.jsonl").exists()


def test_package_exposes_train():
    assert fastcse.train is train


def test_bf16_autocast_trains_on_cpu(tmp_path):
    result = train(tiny(), SENTENCES, batch_size=8, mini_batch_size=4, max_steps=2, eval_data=None,
                   precision="bf16", output_dir=tmp_path / "bf16", progress=False, learning_rate=1e-3)
    losses = [json.loads(x)["loss"] for x in open(result.metrics_path, encoding="utf-8")]
    assert len(losses) == 2 and all(0 < x < 10 for x in losses)
    assert weights(result.model_path)["embeddings.word_embeddings.weight"].dtype == torch.float32  # fp32 master
