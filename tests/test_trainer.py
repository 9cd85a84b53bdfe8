"""The trainer end to end on tiny from-scratch BERTs: results, checkpoints, resume, bad input."""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import fastcse  # noqa: E402
import fastcse.training.batches as batches_module  # noqa: E402
import fastcse.training.checkpoints as checkpoints_module  # noqa: E402
import fastcse.training.guide as guide_module  # noqa: E402
import fastcse.training.loop as loop_module  # noqa: E402
import fastcse.training.model as model_module  # noqa: E402
import fastcse.training.ranks as ranks_module  # noqa: E402
import fastcse.training.resume as resume_module  # noqa: E402
import fastcse.training.step as step_module  # noqa: E402
from fastcse.data import batch_order  # noqa: E402
from fastcse.evaluation import encode, shared_dir  # noqa: E402
from fastcse.training import (RESUME_SETTINGS, OutputDirInUse, TrainConfig, build_bert_from_scratch,  # noqa: E402
                              save_checkpoint, train)
from fastcse.training.config import RunRefused  # noqa: E402
from fastcse.training.interrupts import StopAborted, TrainingInterrupted  # noqa: E402

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


@pytest.mark.parametrize("queue", [0, 12])
def test_resume_continues_to_the_same_weights(tmp_path, monkeypatch, queue):
    """Also with a negative queue: the checkpoint at step 2 holds the queue (the last 12 of the 16
    positives of steps 1-2) that step 3 scores; without it the resumed step 3 would differ."""
    common = dict(batch_size=8, mini_batch_size=4, max_steps=4, eval_steps=2, eval_data=None, learning_rate=1e-3,
                  progress=False, seed=7, negative_queue_size=queue)
    straight = train(tiny(), SENTENCES, output_dir=tmp_path / "straight", **common)

    real_step = step_module.cached_step
    calls = {"n": 0}

    def crash_on_third(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("simulated crash")
        return real_step(*a, **k)

    monkeypatch.setattr(step_module, "cached_step", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        train(tiny(), SENTENCES, output_dir=tmp_path / "resumed", **common)
    monkeypatch.setattr(step_module, "cached_step", real_step)
    run = tmp_path / "resumed"
    saved_queue = torch.load(run / "last" / "trainer_state.pt", weights_only=True).get("negative_queue")
    if queue:
        assert saved_queue["rows"].shape == (12, 32) and len(saved_queue["keys"]) == 12
    else:
        assert saved_queue is None
    # What a kill can leave besides: a torn last metrics line (killed mid-append) and the temporary
    # folders, links and trash of a killed process (another pid): the next start cleans them.
    with open(run / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write('{"step": 3, "epoch": 0, "lo')
    (run / ".last.tmp-999999").mkdir()
    (run / ".best.trash-999999-0").mkdir()
    os.symlink("nowhere", run / ".last.link-999999")
    resumed = train(tiny(), SENTENCES, output_dir=run, resume_from=run, **common)
    assert resumed.steps == 4
    a, b = weights(straight.model_path), weights(resumed.model_path)
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=0)
    steps = [json.loads(x)["step"] for x in open(resumed.metrics_path, encoding="utf-8")]
    assert steps == [1, 2, 3, 4]  # the crashed run's records past its checkpoint are gone, the torn line too
    assert not [name for name in os.listdir(run) if name.startswith(".")]  # leftovers and the lock are gone
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
    (dict(negative_queue_size=-1), ValueError, "negative_queue_size must be an int >= 0, got -1"),
    (dict(negative_queue_size=2.5), ValueError, "negative_queue_size must be an int >= 0, got 2.5"),
    (dict(mask_duplicates="yes"), TypeError, "mask_duplicates must be True or False, got 'yes'"),
    (dict(mask_duplicates=None), TypeError, "mask_duplicates must be True or False, got None"),
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
    named = tmp_path / "named.csv"
    named.write_text("sent0,sent1,label\n" + "".join(f"a{i},b{i},{i % 2}\n" for i in range(8)) + "a,b,dog\n",
                     encoding="utf-8")
    cases = [(dict(data=tmp_path / "nope.txt"), FileNotFoundError, "nope.txt"),
             (dict(data=empty), ValueError, "no sentences"),
             (dict(data=wrong, mode="sup"), ValueError, "sent0,sent1"),
             (dict(data=named, mode="sup"), ValueError, "named.csv, line 10: label must be an integer id"),
             (dict(data=SENTENCES, model=str(tmp_path / "no-model")), FileNotFoundError, "no-model"),
             (dict(data=[(f"a{i}", f"b{i}") for i in range(8)], mode="sup", hard_negative_weight=0.5), ValueError,
              "the data has none")]
    for case, error, match in cases:
        args = dict(dict(model=tiny(), batch_size=8, max_steps=1, eval_data=None, progress=False,
                         output_dir=tmp_path / "out"), **case)
        with pytest.raises(error, match=match):
            train(args.pop("model"), args.pop("data"), **args)
    assert not (tmp_path / "out" / "metrics.jsonl").exists()


def test_package_exposes_train():
    assert fastcse.train is train
    assert fastcse.TrainConfig is TrainConfig


def test_train_takes_a_config_or_its_fields_as_keywords(tmp_path):
    settings = dict(batch_size=8, max_steps=2, eval_data=None, learning_rate=1e-3, progress=False, seed=5)
    by_config = train(tiny(), SENTENCES, config=TrainConfig(output_dir=tmp_path / "a", **settings))
    by_keywords = train(tiny(), SENTENCES, output_dir=tmp_path / "b", **settings)
    a, b = weights(by_config.model_path), weights(by_keywords.model_path)
    assert all(torch.equal(a[name], b[name]) for name in a)
    # keywords replace the config's fields
    assert train(tiny(), SENTENCES, config=TrainConfig(**settings), output_dir=tmp_path / "c", max_steps=1).steps == 1
    with pytest.raises(TypeError, match="unknown settings.*colour"):
        train(tiny(), SENTENCES, config=TrainConfig(**settings), colour="red")
    with pytest.raises(TypeError, match="config must be a fastcse.TrainConfig"):
        train(tiny(), SENTENCES, config=dict(settings))
    with pytest.raises(ValueError, match="batch_size must be an int >= 2, got 1"):  # checked when made
        TrainConfig(batch_size=1)


def test_the_settings_compared_on_resume_are_the_config_fields_marked_so():
    from dataclasses import fields

    compared = {f.name for f in fields(TrainConfig) if f.metadata["compared"]}
    assert set(RESUME_SETTINGS) == compared | {"data", "num_examples", "total_steps"}
    assert {"mini_batch_size", "mini_batch_tokens", "encoding", "device", "eval_steps", "mlp_init"}.isdisjoint(
        RESUME_SETTINGS)


def _record_linear_dtypes(model) -> list:
    """The dtype of the first encoder Linear's output at every forward: what autocast computes in."""
    seen = []
    linear = next(m for m in model.encoder.modules() if isinstance(m, torch.nn.Linear))
    linear.register_forward_hook(lambda module, args, output: seen.append(output.dtype))
    return seen


def test_bf16_autocast_trains_on_cpu(tmp_path):
    model, tok = tiny()
    seen = _record_linear_dtypes(model)
    result = train((model, tok), SENTENCES, batch_size=8, mini_batch_size=4, max_steps=2, eval_data=None,
                   precision="bf16", output_dir=tmp_path / "bf16", progress=False, learning_rate=1e-3)
    losses = [json.loads(x)["loss"] for x in open(result.metrics_path, encoding="utf-8")]
    assert len(losses) == 2 and all(0 < x < 10 for x in losses)
    # autocast was on in the encoder's forward passes (the cached re-forwards included), not only requested
    assert len(seen) >= 2 and set(seen) == {torch.bfloat16}
    assert weights(result.model_path)["embeddings.word_embeddings.weight"].dtype == torch.float32  # fp32 master


def test_fp32_precision_computes_in_fp32(tmp_path):
    model, tok = tiny()
    seen = _record_linear_dtypes(model)
    train((model, tok), SENTENCES, batch_size=8, max_steps=1, eval_data=None, precision="fp32",
          output_dir=tmp_path / "fp32", progress=False)
    assert seen and set(seen) == {torch.float32}


# ---- checkpoints survive a kill at any moment


class Killed(BaseException):
    """A simulated kill: a BaseException, so that no ``except Exception`` handler runs after it."""


class KillingFilesystem:
    """Logs the operations that change folder entries (renames, links, removals, new folders);
    once ``kill_when(log)`` is true, that operation and every later one raise Killed: the process
    is gone, nothing after the kill happens."""

    OPS = ((os, "replace"), (os, "rename"), (os, "symlink"), (os, "unlink"), (os, "remove"), (os, "rmdir"),
           (os, "mkdir"), (shutil, "rmtree"))

    def __init__(self, monkeypatch, kill_when=lambda log: False):
        self.log, self.kill_when, self.killed = [], kill_when, False
        for module, name in self.OPS:
            monkeypatch.setattr(module, name, self._wrap(name, getattr(module, name)))

    def _wrap(self, name, real):
        def op(*args, **kwargs):
            self.log.append((name, args))
            self.killed = self.killed or self.kill_when(self.log)
            if self.killed:
                raise Killed(f"killed at operation {len(self.log)}: {name}{args}")
            return real(*args, **kwargs)

        return op


def _first_publication(log, run) -> int:
    """The 1-based index of the first rename that puts something under a visible name in ``run``:
    from then on, a new complete checkpoint exists under a name resume can find."""
    return next(i for i, (op, args) in enumerate(log, 1) if op in ("rename", "replace")
                and Path(args[1]).parent == run and not Path(args[1]).name.startswith("."))


def _save_step(run, model, tok, step):
    with torch.no_grad():
        model.pooler.dense.bias.fill_(float(step))  # which step a checkpoint holds
    save_checkpoint(run / "last", model, tok, {"eval_pooler": "avg", "step": step}, {"step": step})


def test_a_kill_at_any_filesystem_operation_of_a_save_leaves_the_newest_complete_checkpoint(tmp_path, monkeypatch):
    model, tok = tiny()
    _save_step(tmp_path / "count", model, tok, 1)
    with monkeypatch.context() as patch:
        fs = KillingFilesystem(patch)
        _save_step(tmp_path / "count", model, tok, 2)
    published = _first_publication(fs.log, tmp_path / "count")
    assert len(fs.log) > published  # the kill points cover both sides of the switch
    for k in range(1, len(fs.log) + 1):
        run = tmp_path / f"kill{k}"
        _save_step(run, model, tok, 1)
        with monkeypatch.context() as patch:
            KillingFilesystem(patch, kill_when=lambda log: len(log) >= k)
            with pytest.raises(Killed):
                _save_step(run, model, tok, 2)
        expected = 2 if k > published else 1  # the newest checkpoint that was complete at the kill
        found = resume_module.find_resume_checkpoint(run, run)
        assert found is not None and weights(found)["pooler.dense.bias"][0] == expected, (k, fs.log[k - 1])
        checkpoints_module.recover_checkpoints(run, found)  # what the next start does
        assert weights(run / "last")["pooler.dense.bias"][0] == expected, k
        assert json.loads((run / "last" / "fastcse.json").read_text(encoding="utf-8"))["step"] == expected
        assert not [name for name in os.listdir(run) if name.startswith(".")], (k, os.listdir(run))
    from transformers import AutoModel

    assert AutoModel.from_pretrained(tmp_path / f"kill{len(fs.log)}" / "last").config.hidden_size == 32


def test_a_checkpoint_is_fsynced_before_it_is_published(tmp_path, monkeypatch):
    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("needs /proc to name the fsynced descriptors")
    synced, real_fsync = [], os.fsync

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real_fsync(fd)

    model, tok = tiny()
    monkeypatch.setattr(os, "fsync", fsync)
    save_checkpoint(tmp_path / "last", model, tok, {"eval_pooler": "avg", "step": 3}, {"step": 3})
    names = {os.path.basename(path) for path in synced}
    assert {"model.safetensors", "trainer_state.pt", "fastcse.json", "config.json"} <= names
    assert str(tmp_path.resolve()) in synced  # the folder whose entries the renames changed


def test_resume_after_a_kill_between_the_renames_of_last(tmp_path, monkeypatch):
    """A kill in the middle of replacing ``last`` (at step 4, after
    the first rename in the run folder); ``resume_from=output_dir`` still finds a checkpoint and
    the run ends with the weights of an uninterrupted one."""
    common = dict(batch_size=8, max_steps=4, eval_steps=2, eval_data=None, learning_rate=1e-3, progress=False,
                  seed=3)
    straight = train(tiny(), SENTENCES, output_dir=tmp_path / "straight", **common)
    run = tmp_path / "run"
    real_save = resume_module.save_checkpoint

    def killed_while_switching(path, *args, **kwargs):
        if args[2]["step"] != 4:
            return real_save(path, *args, **kwargs)
        with monkeypatch.context() as patch:
            renamed = []

            def kill_when(log):  # the operation after the first rename into the run folder
                op, op_args = log[-1]
                if renamed:
                    return True
                if op in ("rename", "replace") and Path(op_args[1]).parent == run:
                    renamed.append(op_args)
                return False

            KillingFilesystem(patch, kill_when=kill_when)
            real_save(path, *args, **kwargs)

    monkeypatch.setattr(resume_module, "save_checkpoint", killed_while_switching)
    with pytest.raises(Killed):
        train(tiny(), SENTENCES, output_dir=run, **common)
    monkeypatch.setattr(resume_module, "save_checkpoint", real_save)
    resumed = train(tiny(), SENTENCES, output_dir=run, resume_from=run, **common)
    assert resumed.steps == 4
    a, b = weights(straight.model_path), weights(resumed.model_path)
    assert all(torch.equal(a[name], b[name]) for name in a)


# ---- resume from the same command


def test_resume_from_the_output_dir_without_a_checkpoint_starts_from_the_beginning(tmp_path, caplog):
    args = dict(batch_size=8, max_steps=2, eval_steps=2, eval_data=None, progress=False)
    new = tmp_path / "new"
    with caplog.at_level("WARNING", logger="fastcse.train"):
        result = train(tiny(), SENTENCES, output_dir=new, resume_from=new, **args)
    assert result.steps == 2 and "starting from the beginning" in caplog.text
    killed = tmp_path / "killed"  # a run killed before its first checkpoint: metrics, no checkpoint
    killed.mkdir()
    (killed / "metrics.jsonl").write_text('{"step": 1, "loss": 9.0}\n', encoding="utf-8")
    result = train(tiny(), SENTENCES, output_dir=killed, resume_from=killed, **args)
    assert [json.loads(x)["step"] for x in open(result.metrics_path, encoding="utf-8")] == [1, 2]
    assert json.loads(open(result.metrics_path, encoding="utf-8").readline())["loss"] != 9.0
    with pytest.raises(FileNotFoundError, match="trainer_state"):  # another folder must hold a checkpoint
        train(tiny(), SENTENCES, output_dir=tmp_path / "out", resume_from=tmp_path / "absent", **args)


# ---- one run per output_dir


def _lock(folder, pid, host=None):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / ".fastcse.lock").write_text(json.dumps({"pid": pid, "host": host or socket.gethostname()}),
                                          encoding="utf-8")


def test_a_second_run_on_the_same_output_dir_is_refused(tmp_path):
    args = dict(batch_size=8, max_steps=1, eval_data=None, progress=False)
    run = tmp_path / "run"
    other = subprocess.Popen(["sleep", "60"])  # a live process holding the folder
    try:
        _lock(run, other.pid)
        with pytest.raises(OutputDirInUse, match=rf"{re.escape(str(run))}.*pid {other.pid}"):
            train(tiny(), SENTENCES, output_dir=run, **args)
        assert json.loads((run / ".fastcse.lock").read_text())["pid"] == other.pid  # not taken from it
        _lock(tmp_path / "elsewhere", 12345, host="another-host")  # cannot be checked from here: refused
        with pytest.raises(OutputDirInUse, match="another-host"):
            train(tiny(), SENTENCES, output_dir=tmp_path / "elsewhere", **args)
    finally:
        other.kill()
        other.wait()
    # its process is gone: a stale lock, taken over; the run's own lock is held while it trains
    held = []
    model, tok = tiny()
    model.register_forward_hook(lambda *a: held.append(json.loads((run / ".fastcse.lock").read_text())))
    train((model, tok), SENTENCES, output_dir=run, **args)
    assert held and all(h["pid"] == os.getpid() and h["host"] == socket.gethostname() for h in held)
    assert not (run / ".fastcse.lock").exists()  # released at the end


def test_the_lock_is_released_when_the_run_fails(tmp_path, monkeypatch):
    def crash(self, *args):
        raise RuntimeError("boom")

    monkeypatch.setattr(step_module.ContrastiveStep, "__call__", crash)
    with pytest.raises(RuntimeError, match="boom"):
        train(tiny(), SENTENCES, output_dir=tmp_path / "run", batch_size=8, max_steps=1, eval_data=None,
              progress=False)
    assert not (tmp_path / "run" / ".fastcse.lock").exists()


# ---- a failed start leaves a reused folder alone


@pytest.mark.parametrize("content", ["", "sentence1\tsentence2\tscore\n", "a\tb\n"])
def test_a_bad_eval_file_fails_before_the_reused_folder_is_touched(tmp_path, dev_pairs, content):
    run = tmp_path / "run"
    first = train(tiny(), SENTENCES, output_dir=run, batch_size=8, max_steps=1, eval_data=dev_pairs, progress=False)
    before = {name: Path(run, name).read_bytes() for name in ("metrics.jsonl", "best/model.safetensors")}
    bad = tmp_path / "bad.tsv"
    bad.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match="bad.tsv"):
        train(tiny(), SENTENCES, output_dir=run, batch_size=8, max_steps=1, eval_data=str(bad), progress=False)
    assert {name: Path(run, name).read_bytes() for name in before} == before
    assert first.best_metric is not None


# ---- resuming with other settings


@pytest.fixture
def crash_at_step(monkeypatch):
    """Makes the next train() die (KeyboardInterrupt) when it reaches step ``n``."""

    def arm(n):
        real, calls = step_module.ContrastiveStep.__call__, {"n": 0}

        def call(self, *args):
            calls["n"] += 1
            if calls["n"] == n:
                monkeypatch.setattr(step_module.ContrastiveStep, "__call__", real)
                raise KeyboardInterrupt("simulated kill")
            return real(self, *args)

        monkeypatch.setattr(step_module.ContrastiveStep, "__call__", call)

    return arm


def test_resume_refuses_other_settings_naming_each_unless_overridden(tmp_path, crash_at_step):
    common = dict(batch_size=8, max_steps=4, eval_steps=2, eval_data=None, learning_rate=1e-3, progress=False)
    run = tmp_path / "run"
    crash_at_step(3)
    with pytest.raises(KeyboardInterrupt):
        train(tiny(), SENTENCES, output_dir=run, **common)
    saved = torch.load(run / "last" / "trainer_state.pt", weights_only=True)["settings"]
    assert set(RESUME_SETTINGS) <= set(saved) and saved["learning_rate"] == 1e-3
    metrics_before = (run / "metrics.jsonl").read_text()
    with pytest.raises(ValueError, match=r"learning_rate 0\.001 -> 0\.002.*temperature 0\.05 -> 0\.1") as error:
        train(tiny(), SENTENCES, output_dir=run, resume_from=run, **dict(common, learning_rate=2e-3, temperature=0.1))
    assert "resume_override=['learning_rate', 'temperature']" in str(error.value)
    with pytest.raises(ValueError, match=r"total_steps 4 -> 6 \(max_steps 4 -> 6\)"):
        train(tiny(), SENTENCES, output_dir=run, resume_from=run, **dict(common, max_steps=6))
    for changed in (dict(warmup_steps=1), dict(weight_decay=0.01), dict(pooler="avg"), dict(max_seq_length=16),
                    dict(data=SENTENCES[::-1]), dict(mask_duplicates=False), dict(negative_queue_size=16)):
        kwargs = dict(dict(common, data=SENTENCES), **changed)
        with pytest.raises(ValueError, match="other settings"):
            train(tiny(), kwargs.pop("data"), output_dir=run, resume_from=run, **kwargs)
    assert (run / "metrics.jsonl").read_text() == metrics_before  # a refused resume writes nothing
    with pytest.raises(ValueError, match="not settings compared"):
        train(tiny(), SENTENCES, output_dir=run, resume_from=run, resume_override=["colour"], **common)
    # overridden: the new learning rate applies from the resumed step, on the old schedule's shape
    result = train(tiny(), SENTENCES, output_dir=run, resume_from=run, resume_override=["learning_rate"],
                   **dict(common, learning_rate=2e-3))
    lrs = {r["step"]: r["lr"] for r in map(json.loads, open(result.metrics_path, encoding="utf-8"))}
    assert lrs[1] == pytest.approx(1e-3) and lrs[3] == pytest.approx(2e-3 * 2 / 4) and lrs[4] == pytest.approx(
        2e-3 * 1 / 4)


def test_resume_into_another_output_dir_carries_the_best_checkpoint_and_metrics(tmp_path, dev_pairs, crash_at_step):
    from transformers import AutoModel

    common = dict(batch_size=8, max_steps=4, eval_steps=2, eval_data=dev_pairs, learning_rate=1e-3, progress=False)
    first = tmp_path / "first"
    crash_at_step(3)
    with pytest.raises(KeyboardInterrupt):
        train(tiny(), SENTENCES, output_dir=first, **common)
    moved = tmp_path / "moved"
    result = train(tiny(), SENTENCES, output_dir=moved, resume_from=first, **common)
    records = [json.loads(x) for x in open(result.metrics_path, encoding="utf-8")]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
    assert [r["step"] for r in records if "eval" in r] == [0, 2, 4]
    assert result.model_path == str(moved / "best")
    record = json.loads((moved / "best" / "fastcse.json").read_text())
    assert record["step"] == result.best_step and AutoModel.from_pretrained(result.model_path) is not None
    # a checkpoint copied away from its run has no best beside it: refused, nothing written
    shutil.copytree((first / "last").resolve(), tmp_path / "copied" / "ckpt")
    with pytest.raises(FileNotFoundError, match="best"):
        train(tiny(), SENTENCES, output_dir=tmp_path / "elsewhere", resume_from=tmp_path / "copied" / "ckpt",
              **common)
    assert not (tmp_path / "elsewhere").exists()


# ---- the device of each rank under torchrun


def test_rank_device_is_the_local_gpu_under_torchrun():
    rank_device = ranks_module.rank_device
    assert rank_device(None, 2, 1, True) == torch.device("cuda", 1)
    assert rank_device("cuda", 4, 3, True) == torch.device("cuda", 3)
    assert rank_device(torch.device("cuda"), 2, 1, True) == torch.device("cuda", 1)
    assert rank_device("cuda:0", 2, 1, True) == torch.device("cuda", 0)  # explicit: as given
    assert rank_device("cpu", 2, 1, True) == torch.device("cpu")
    assert rank_device(None, 2, 1, False) is None  # CPU-only: where the model is
    assert rank_device(None, 1, None, True) is None  # one process: unchanged
    assert rank_device("cuda", 1, None, True) == torch.device("cuda")


def test_train_sets_the_rank_device_before_the_first_collective(tmp_path, monkeypatch):
    import fastcse.distributed

    events = []

    class Stop(Exception):
        pass

    def first_collective(*args):
        events.append("collective")
        raise Stop

    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(loop_module, "current_world", lambda: (1, 2))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: events.append(torch.device(device)))
    monkeypatch.setattr(fastcse.distributed, "load_extension", lambda: None)
    monkeypatch.setattr(loop_module, "on_rank0", first_collective)
    with pytest.raises(Stop):
        train(tiny(), SENTENCES, output_dir=tmp_path / "run", batch_size=8, max_steps=1, eval_data=None,
              progress=False)
    assert events == [torch.device("cuda", 1), "collective"]


# ---- clear errors before loading the model


def test_bad_output_dirs_fail_before_the_model_loads(tmp_path, monkeypatch):
    def no_model(*a):
        raise AssertionError("the model was loaded before the output_dir was checked")

    monkeypatch.setattr(model_module, "load_training_model", no_model)
    a_file = tmp_path / "a-file"
    a_file.write_text("x", encoding="utf-8")
    args = dict(batch_size=8, max_steps=1, eval_data=None, progress=False)
    with pytest.raises(TypeError, match="output_dir"):
        train(tiny(), SENTENCES, output_dir=None, **args)
    with pytest.raises(NotADirectoryError, match="a-file.* is a file"):
        train(tiny(), SENTENCES, output_dir=a_file, **args)
    with pytest.raises(NotADirectoryError, match="lies under .*a-file"):
        train(tiny(), SENTENCES, output_dir=a_file / "run", **args)


def test_max_seq_length_past_the_position_embeddings_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"max_seq_length=129 .* 128 positions"):
        train(tiny(), SENTENCES, output_dir=tmp_path / "run", batch_size=8, max_steps=1, eval_data=None,
              max_seq_length=129, progress=False)
    assert not (tmp_path / "run").exists()
    assert train(tiny(), SENTENCES, output_dir=tmp_path / "ok", batch_size=8, max_steps=1, eval_data=None,
                 max_seq_length=128, progress=False).steps == 1


# ---- SimCSE's MLP head starts fresh


def test_cls_pooler_trains_a_fresh_mlp_head_by_default(tmp_path):
    def head_after_one_tiny_step(seed, **kwargs):
        model, tok = tiny()
        with torch.no_grad():  # a recognizable "pretrained" pooler
            model.pooler.dense.weight.fill_(0.5)
            model.pooler.dense.bias.fill_(0.5)
        train((model, tok), SENTENCES, batch_size=8, max_steps=1, eval_data=None, learning_rate=1e-9, seed=seed,
              output_dir=tmp_path / f"run{len(list(tmp_path.iterdir()))}", progress=False, **kwargs)
        return model.pooler.dense.weight.detach().clone(), model.pooler.dense.bias.detach().clone()

    weight, bias = head_after_one_tiny_step(5)
    expected = torch.empty(32, 32).normal_(0.0, 0.02, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(weight, expected, rtol=0, atol=1e-6)  # normal(0, initializer_range), seeded
    torch.testing.assert_close(bias, torch.zeros(32), rtol=0, atol=1e-6)
    again, _ = head_after_one_tiny_step(5)
    assert torch.equal(again, weight)  # reproducible
    assert not torch.allclose(head_after_one_tiny_step(6)[0], weight)
    kept, _ = head_after_one_tiny_step(5, mlp_init="pretrained")
    torch.testing.assert_close(kept, torch.full((32, 32), 0.5), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="mlp_init must be one of"):
        train(tiny(), SENTENCES, batch_size=8, max_steps=1, eval_data=None, mlp_init="zeros",
              output_dir=tmp_path / "bad", progress=False)


@pytest.mark.parametrize("precision, hint", [("fp32", False), ("bf16", True)])
def test_non_finite_loss_stops_before_the_optimizer_step(tmp_path, monkeypatch, precision, hint):
    """The check runs before optimizer.step(): the model in memory is the last finite one, and
    only a reduced-precision run is told to try precision='fp32'."""
    model, tok = tiny()
    calls = {"n": 0}
    real = fastcse.info_nce

    def nan_on_second_step(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if calls["n"] == 2 else loss

    snapshot = {}
    real_step = torch.optim.AdamW.step

    def remember_weights(self, *a, **k):  # the weights after the last update that did happen
        out = real_step(self, *a, **k)
        snapshot.update({n: p.detach().clone() for n, p in model.named_parameters()})
        return out

    monkeypatch.setattr(step_module, "info_nce", nan_on_second_step)
    monkeypatch.setattr(torch.optim.AdamW, "step", remember_weights)
    with pytest.raises(FloatingPointError, match="loss became nan at step 2") as error:
        train((model, tok), SENTENCES, batch_size=8, max_steps=3, eval_data=None, learning_rate=1e-3,
              output_dir=tmp_path / "run", progress=False, precision=precision)
    assert ("precision='fp32'" in str(error.value)) == hint
    assert snapshot and all(torch.isfinite(p).all() for p in model.parameters())
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), snapshot[name]), name  # no update from the NaN step


# ---- false negatives, a negative queue, several positives


class RecordedLosses:
    """Stands in for ``fastcse.info_nce``: computes the real loss and keeps each call's detached
    anchors, positives and keywords (group_ids, labels, extra_negatives)."""

    def __init__(self, monkeypatch):
        self.calls, self.real = [], fastcse.info_nce
        monkeypatch.setattr(step_module, "info_nce", self)

    def __call__(self, anchor, positive, negative=None, **kwargs):
        self.calls.append({"anchor": anchor.detach().clone(), "positive": positive.detach().clone(),
                           **{k: v.detach().clone() for k, v in kwargs.items() if isinstance(v, torch.Tensor)}})
        return self.real(anchor, positive, negative, **kwargs)


def step_losses(result) -> list[float]:
    return [r["loss"] for r in map(json.loads, open(result.metrics_path, encoding="utf-8")) if "loss" in r]


def batch_rows(examples, batch_size, seed, step=0):
    """The example indices of (first-epoch) step ``step``, as the trainer orders them."""
    return batch_order(len(examples), batch_size, seed=seed, epoch=0)[step]


def first_occurrence_ids(texts) -> torch.Tensor:
    """Group ids by exact text, written independently of the trainer: the first row holding the text."""
    first = {}
    return torch.tensor([first.setdefault(text, i) for i, text in enumerate(texts)])


def reference_loss(call, **kwargs) -> float:
    """``info_nce_reference`` in float64 on a recorded call's embeddings."""
    return float(fastcse.info_nce_reference(call["anchor"].double(), call["positive"].double(), **kwargs))


def test_mask_duplicates_leaves_a_batchs_repeated_sentences_out_of_its_negatives(tmp_path, monkeypatch):
    unique = SENTENCES[:12]
    data = tmp_path / "repeated.txt"
    data.write_text("\n".join(unique * 4) + "\n", encoding="utf-8")  # every sentence 4 times
    args = dict(batch_size=16, max_steps=1, eval_data=None, progress=False, seed=3)
    texts = [(unique * 4)[i] for i in batch_rows(unique * 4, 16, seed=3)]
    groups = first_occurrence_ids(texts)
    assert len(set(groups.tolist())) < 16  # the first batch repeats sentences

    recorded = RecordedLosses(monkeypatch)
    masked = step_losses(train(tiny(), data, output_dir=tmp_path / "masked", **args))[0]
    call = recorded.calls[0]
    # the deduplicated problem: each anchor's copies are neither its negatives nor its positives
    assert masked == pytest.approx(reference_loss(call, group_ids=groups), rel=1e-5)
    assert masked != pytest.approx(reference_loss(call), rel=1e-3)
    assert torch.equal(call["group_ids"], groups)

    recorded.calls.clear()
    plain = step_losses(train(tiny(), data, output_dir=tmp_path / "plain", mask_duplicates=False, **args))[0]
    assert "group_ids" not in recorded.calls[0]
    assert plain == pytest.approx(reference_loss(recorded.calls[0]), rel=1e-5)
    assert plain > masked  # the copies scored as negatives of themselves only add to the loss


def test_supervised_rows_sharing_a_premise_or_an_entailment_are_one_group(tmp_path, monkeypatch):
    """Connected components: row 1 shares row 0's premise and row 2's entailment, so 0, 1, 2 are one
    group although 0 and 2 share no text; a hard negative repeating a sentence links nothing."""
    linked = [("p0", "e0", "n0"), ("p0", "e1", "n1"), ("p2", "e1", "n2"), ("p3", "e3", "e0")]
    data = linked + [(f"premise {i}", f"entailment {i}", f"contradiction {i}") for i in range(4, 8)]
    recorded = RecordedLosses(monkeypatch)
    train(tiny(), data, mode="sup", batch_size=8, max_steps=1, eval_data=None, progress=False, seed=1,
          output_dir=tmp_path / "run")
    order = batch_rows(data, 8, seed=1)
    group_of = {0: 0, 1: 0, 2: 0}  # example -> group; the others are alone
    first_row = {}
    expected = [first_row.setdefault(group_of.get(i, ("alone", i)), row) for row, i in enumerate(order)]
    assert recorded.calls[0]["group_ids"].tolist() == expected


@pytest.mark.parametrize("mini_batch_size", [None, 4])
def test_negative_queue_scores_the_previous_positives_as_extra_negatives(tmp_path, monkeypatch, mini_batch_size):
    recorded = RecordedLosses(monkeypatch)
    result = train(tiny(), SENTENCES, batch_size=8, max_steps=3, eval_data=None, learning_rate=1e-3, progress=False,
                   negative_queue_size=12, mini_batch_size=mini_batch_size, output_dir=tmp_path / "run")
    first, second, third = recorded.calls
    assert "extra_negatives" not in first  # the queue starts empty; a step never scores its own positives
    assert torch.equal(second["extra_negatives"], first["positive"])
    # FIFO: the 12 newest rows, oldest first
    assert torch.equal(third["extra_negatives"], torch.cat([first["positive"], second["positive"]])[-12:])
    losses = step_losses(result)
    for loss, call in zip(losses[1:], (second, third)):
        assert loss == pytest.approx(reference_loss(call, extra_negatives=call["extra_negatives"].double()), rel=1e-5)
        assert loss > reference_loss(call) + 1e-3  # more negatives, a larger loss on the same embeddings


def test_queued_rows_repeating_a_text_of_the_batch_are_left_out(tmp_path, monkeypatch):
    repeated = SENTENCES[:12] * 2
    recorded = RecordedLosses(monkeypatch)
    train(tiny(), repeated, batch_size=8, max_steps=2, eval_data=None, progress=False, seed=4,
          negative_queue_size=64, output_dir=tmp_path / "run")
    first_texts = [repeated[i] for i in batch_rows(repeated, 8, seed=4, step=0)]
    second_texts = set(repeated[i] for i in batch_rows(repeated, 8, seed=4, step=1))
    kept = [row for row, text in enumerate(first_texts) if text not in second_texts]
    assert 0 < len(kept) < 8  # the check below has rows to keep and rows to leave out
    assert torch.equal(recorded.calls[1]["extra_negatives"], recorded.calls[0]["positive"][kept])


def test_labels_from_a_csv_column_are_the_positives(tmp_path, monkeypatch):
    data = tmp_path / "labelled.csv"
    rows = [(f"a sentence about {w}", f"another one on {w}", i % 3) for i, w in enumerate(SENTENCES[:16])]
    data.write_text("sent0,sent1,label\n" + "".join(f'"{a}","{b}",{label}\n' for a, b, label in rows),
                    encoding="utf-8")
    recorded = RecordedLosses(monkeypatch)
    result = train(tiny(), data, mode="sup", batch_size=8, max_steps=1, eval_data=None, progress=False, seed=2,
                   output_dir=tmp_path / "run")
    call = recorded.calls[0]
    labels = torch.tensor([rows[i][2] for i in batch_rows(rows, 8, seed=2)])
    assert torch.equal(call["labels"], labels) and "group_ids" not in call  # labels replace the masking
    assert step_losses(result)[0] == pytest.approx(reference_loss(call, labels=labels), rel=1e-5)
    saved = torch.load(tmp_path / "run" / "last" / "trainer_state.pt", weights_only=True)["settings"]
    unlabelled = batches_module.data_fingerprint([r[:2] for r in rows])
    assert saved["data"] != unlabelled  # other labels are other data: a resume compares them


def test_a_checkpoint_from_before_the_masking_counts_as_unmasked(tmp_path):
    """An earlier fastcse saved no mask_duplicates / negative_queue_size and never masked: resuming
    it with the new default is a change of the loss, refused like any other."""
    args = dict(batch_size=8, max_steps=2, eval_steps=2, eval_data=None, progress=False)
    run = tmp_path / "run"
    train(tiny(), SENTENCES, output_dir=run, **args)
    state_file = (run / "last").resolve() / "trainer_state.pt"
    state = torch.load(state_file, weights_only=True)
    for name in ("mask_duplicates", "negative_queue_size"):
        del state["settings"][name]
    torch.save(state, state_file)
    with pytest.raises(ValueError, match=r"mask_duplicates False -> True.*resume_override=\['mask_duplicates'\]"):
        train(tiny(), SENTENCES, output_dir=run, resume_from=run, **args)
    assert train(tiny(), SENTENCES, output_dir=run, resume_from=run, mask_duplicates=False, **args).steps == 2


# ---- long runs: interrupts, periodic checkpoints, reruns


def _step_of(checkpoint) -> int:
    return json.loads((Path(checkpoint) / "fastcse.json").read_text(encoding="utf-8"))["step"]


def send_signal_during_step(monkeypatch, step, signum):
    """Makes the next train() receive ``signum`` in the middle of its step ``step`` (1-based)."""
    real, calls = step_module.ContrastiveStep.__call__, {"n": 0}

    def call(self, *args):
        calls["n"] += 1
        if calls["n"] == step:
            os.kill(os.getpid(), signum)
        return real(self, *args)

    monkeypatch.setattr(step_module.ContrastiveStep, "__call__", call)


@pytest.mark.parametrize("signum, exit_code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_finishes_the_step_saves_it_and_the_resumed_run_matches_an_uninterrupted_one(
        tmp_path, monkeypatch, signum, exit_code):
    common = dict(batch_size=8, max_steps=4, eval_data=None, learning_rate=1e-3, progress=False, seed=11)
    straight = train(tiny(), SENTENCES, output_dir=tmp_path / "straight", **common)
    run = tmp_path / "run"
    send_signal_during_step(monkeypatch, 2, signum)
    previous = signal.getsignal(signum)
    with pytest.raises(TrainingInterrupted) as stop:
        train(tiny(), SENTENCES, output_dir=run, **common)
    assert isinstance(stop.value, KeyboardInterrupt) and stop.value.exit_code == exit_code
    assert stop.value.step == 2 and stop.value.checkpoint == run / "last"  # step 2 finished, then saved
    assert f"resume_from={str(run)!r}" in str(stop.value)
    assert _step_of(run / "last") == 2 and not (run / ".fastcse.lock").exists()
    assert signal.getsignal(signum) is previous  # the handlers are the caller's again
    monkeypatch.undo()
    resumed = train(tiny(), SENTENCES, output_dir=run, resume_from=run, **common)
    a, b = weights(straight.model_path), weights(resumed.model_path)
    assert all(torch.equal(a[name], b[name]) for name in a)  # bit-identical: the stop fell between steps


def test_a_second_signal_while_saving_aborts_at_once_and_the_last_checkpoint_stays(tmp_path, monkeypatch):
    run = tmp_path / "run"
    send_signal_during_step(monkeypatch, 3, signal.SIGINT)
    real_save = resume_module.save_checkpoint

    def second_ctrl_c(path, *args, **kwargs):
        if args[2]["step"] == 3:
            os.kill(os.getpid(), signal.SIGINT)  # pressed again while step 3 is being saved
        return real_save(path, *args, **kwargs)

    monkeypatch.setattr(resume_module, "save_checkpoint", second_ctrl_c)
    with pytest.raises(StopAborted, match="second SIGINT"):
        train(tiny(), SENTENCES, output_dir=run, batch_size=8, max_steps=6, save_steps=2, eval_data=None,
              progress=False)
    assert _step_of(run / "last") == 2 and weights(run / "last")  # the previous complete checkpoint
    assert not (run / ".fastcse.lock").exists()


def test_save_steps_checkpoints_between_evaluations_and_save_total_limit_prunes(tmp_path, dev_pairs, crash_at_step):
    run = tmp_path / "run"
    args = dict(batch_size=8, max_steps=6, eval_steps=100, eval_data=dev_pairs, save_steps=2, save_total_limit=2,
                progress=False)
    crash_at_step(6)  # a kill in step 6: what periodic checkpoints keep
    with pytest.raises(KeyboardInterrupt):
        train(tiny(), SENTENCES, output_dir=run, **args)
    versions = sorted(name for name in os.listdir(run) if name.startswith("last."))
    assert versions == ["last.2", "last.4"] and _step_of(run / "last") == 4
    assert _step_of(run / "best") == 0  # the evaluation before training: never pruned
    result = train(tiny(), SENTENCES, output_dir=run, **args)  # the same command again: continues at step 4
    assert result.steps == 6 and sorted(n for n in os.listdir(run) if n.startswith("last.")) == ["last.4", "last.6"]
    steps = [json.loads(x)["step"] for x in open(result.metrics_path, encoding="utf-8")]
    assert steps == [0, 1, 2, 3, 4, 5, 6, 6]  # evaluations at 0 and 6, every step once


def test_a_rerun_continues_a_matching_run_and_refuses_other_settings_naming_both_ways_out(
        tmp_path, crash_at_step, caplog):
    common = dict(batch_size=8, max_steps=4, eval_steps=2, eval_data=None, learning_rate=1e-3, progress=False)
    run = tmp_path / "run"
    crash_at_step(3)
    with pytest.raises(KeyboardInterrupt):
        train(tiny(), SENTENCES, output_dir=run, **common)
    with pytest.raises(RunRefused) as refused:
        train(tiny(), SENTENCES, output_dir=run, **dict(common, learning_rate=2e-3))
    message, cli = str(refused.value), refused.value.cli_message
    assert "learning_rate 0.001 -> 0.002" in message and f"resume_from={str(run)!r}" in message
    assert "overwrite_output_dir=True" in message and "resume_override=['learning_rate']" in message
    assert f"--resume-from {run} --resume-override learning_rate" in cli and "--overwrite-output-dir" in cli
    assert _step_of(run / "last") == 2  # refused: nothing deleted
    with caplog.at_level("WARNING", logger="fastcse.train"):
        result = train(tiny(), SENTENCES, output_dir=run, **common)  # the same command: continues it
    assert result.steps == 4 and "saved at step 2 of 4: continuing it" in caplog.text
    assert [json.loads(x)["step"] for x in open(result.metrics_path, encoding="utf-8")] == [1, 2, 3, 4]
    with caplog.at_level("WARNING", logger="fastcse.train"):
        assert train(tiny(), SENTENCES, output_dir=run, **common).steps == 4  # complete: the same command is a no-op
    assert "nothing is left to train" in caplog.text
    fresh = train(tiny(), SENTENCES, output_dir=run, overwrite_output_dir=True, **dict(common, learning_rate=2e-3))
    lrs = [json.loads(x)["lr"] for x in open(fresh.metrics_path, encoding="utf-8")]
    assert len(lrs) == 4 and lrs[0] == pytest.approx(2e-3)  # started over with the new settings
    with pytest.raises(ValueError, match="pass one of them"):
        train(tiny(), SENTENCES, output_dir=run, resume_from=run, overwrite_output_dir=True, **common)


def test_a_rerun_never_deletes_checkpoints_it_cannot_continue(tmp_path, dev_pairs):
    args = dict(batch_size=8, max_steps=2, eval_steps=2, eval_data=dev_pairs, progress=False)
    done = tmp_path / "done"
    train(tiny(), SENTENCES, output_dir=done, save_last=False, **args)  # best/ only: nothing to resume
    with pytest.raises(RunRefused, match="cannot be resumed.*overwrite_output_dir=True"):
        train(tiny(), SENTENCES, output_dir=done, **args)
    assert (done / "best").is_dir()
    source, other = tmp_path / "source", tmp_path / "other"
    for folder in (source, other):
        train(tiny(), SENTENCES, output_dir=folder, **args)
    with pytest.raises(RunRefused, match=f"{re.escape(str(other))}.* would be replaced by the run resumed from"):
        train(tiny(), SENTENCES, output_dir=other, resume_from=source, **args)
    assert (other / "last").is_dir()
    assert train(tiny(), SENTENCES, output_dir=done, overwrite_output_dir=True, **args).steps == 2


def test_a_collapse_to_one_point_is_warned_once(tmp_path, caplog):
    watch = loop_module.CollapseWatch(batch_size=8, learning_rate=1000.0)
    stuck = [watch.observe(step, 2.0, 0.0) for step in range(1, 6)]
    assert stuck == [False, False, True, False, False]  # the third step in a row, once
    assert "ln(batch 8) = 2.08" in caplog.text and "since step 1" in caplog.text
    solved = loop_module.CollapseWatch(batch_size=8, learning_rate=1e-3)
    assert not any(solved.observe(step, 0.01, 0.0) for step in range(1, 6))  # a solved task is no collapse
    caplog.clear()
    with caplog.at_level("WARNING", logger="fastcse.train"):  # a learning rate of 1000 collapses the embeddings
        train(tiny(), SENTENCES, batch_size=8, max_steps=8, eval_data=None, learning_rate=1000.0, progress=False,
              output_dir=tmp_path / "run")
    assert caplog.text.count("the embeddings have collapsed") == 1


# ---- Matryoshka: the loss at every dimension, evaluation at each, the saved model truncated


def test_matryoshka_run_passes_its_dimensions_to_the_loss_and_records_them(tmp_path, monkeypatch):
    recorded = RecordedLosses(monkeypatch)
    seen = []
    real = recorded.real

    def remember_keywords(anchor, positive, negative=None, **kwargs):
        seen.append({k: kwargs.get(k) for k in ("matryoshka_dims", "matryoshka_weights")})
        return real(anchor, positive, negative, **kwargs)

    recorded.real = remember_keywords
    result = train(tiny(), SENTENCES, batch_size=8, max_steps=1, eval_data=None, progress=False, seed=2,
                   matryoshka_dims=[32, 8, 16], matryoshka_weights=[1.0, 0.5, 2.0], output_dir=tmp_path / "run")
    assert seen == [{"matryoshka_dims": (8, 16, 32), "matryoshka_weights": (0.5, 2.0, 1.0)}]  # ascending, weights along
    call = recorded.calls[0]
    expected = reference_loss(call, matryoshka_dims=(8, 16, 32), matryoshka_weights=(0.5, 2.0, 1.0))
    assert step_losses(result)[0] == pytest.approx(expected, rel=1e-5)
    saved = torch.load(tmp_path / "run" / "last" / "trainer_state.pt", weights_only=True)["settings"]
    assert saved["matryoshka_dims"] == (8, 16, 32) and saved["matryoshka_weights"] == (0.5, 2.0, 1.0)
    assert json.loads((tmp_path / "run" / "last" / "fastcse.json").read_text())["matryoshka_dims"] == [8, 16, 32]
    # without Matryoshka the loss gets none of its keywords: the plain call, bit for bit
    seen.clear()
    train(tiny(), SENTENCES, batch_size=8, max_steps=1, eval_data=None, progress=False, output_dir=tmp_path / "plain")
    assert seen == [{"matryoshka_dims": None, "matryoshka_weights": None}]


def test_matryoshka_evaluates_each_dimension_and_the_saved_model_truncates_alike(tmp_path, dev_pairs):
    SentenceTransformer = pytest.importorskip("sentence_transformers").SentenceTransformer
    from scipy.stats import spearmanr

    from fastcse.evaluation import load_pair_file

    result = train(tiny(), SENTENCES, batch_size=8, max_steps=2, eval_steps=1, eval_data=dev_pairs, pooler="avg",
                   learning_rate=1e-3, matryoshka_dims=(16, 8), output_dir=tmp_path / "run", progress=False)
    scores = result.history[-1]["eval"]
    assert list(scores) == ["dev40", "dev40@16", "dev40@8"]  # the full dimension first, then widest to narrowest
    assert all(h["metric"] == h["eval"]["dev40"] for h in result.history)  # the best is picked on the full dim
    assert result.best_metric == max(h["eval"]["dev40"] for h in result.history)
    best = next(h for h in result.history if h["step"] == result.best_step)
    first, second, gold = load_pair_file(dev_pairs)
    for dim in (16, 8):
        model = SentenceTransformer(result.model_path, device="cpu", truncate_dim=dim)
        a, b = (torch.as_tensor(model.encode(texts)) for texts in (first, second))
        assert a.shape[1] == dim
        cosine = torch.nn.functional.cosine_similarity(a, b, dim=-1)
        assert spearmanr(cosine.numpy(), gold).correlation * 100 == pytest.approx(best["eval"][f"dev40@{dim}"],
                                                                                   abs=1e-4)
    # the embeddings themselves: the first m coordinates of the full embedding
    from transformers import AutoModel, AutoTokenizer

    full = encode(AutoModel.from_pretrained(result.model_path), AutoTokenizer.from_pretrained(result.model_path),
                  first[:5], pooler="avg")
    truncated = SentenceTransformer(result.model_path, device="cpu", truncate_dim=8).encode(first[:5])
    torch.testing.assert_close(torch.as_tensor(truncated), full[:, :8], rtol=1e-4, atol=1e-5)


def test_metric_for_best_picks_the_best_checkpoint_on_a_stated_score(tmp_path, dev_pairs):
    result = train(tiny(), SENTENCES, batch_size=8, max_steps=2, eval_steps=1, eval_data=dev_pairs, pooler="avg",
                   learning_rate=1e-3, matryoshka_dims=(16, 8), metric_for_best="dev40@8",
                   output_dir=tmp_path / "run", progress=False)
    assert [h["metric"] for h in result.history] == [h["eval"]["dev40@8"] for h in result.history]
    assert result.best_metric == max(h["eval"]["dev40@8"] for h in result.history)
    assert json.loads((tmp_path / "run" / "best" / "fastcse.json").read_text())["step"] == result.best_step


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(matryoshka_dims=(16, 0)), ValueError, r"matryoshka_dims must hold positive ints, got \(16, 0\)"),
    (dict(matryoshka_dims=(64, 16)), ValueError, r"matryoshka_dims must hold ints in \[1, 32\]"),
    (dict(matryoshka_dims=(16, 16)), ValueError, "matryoshka_dims must be distinct"),
    (dict(matryoshka_dims="16"), TypeError, "matryoshka_dims must be a sequence of ints"),
    (dict(matryoshka_weights=(1.0,)), ValueError, "matryoshka_weights given without matryoshka_dims"),
    (dict(matryoshka_dims=(16, 8), matryoshka_weights=(1.0,)), ValueError,
     "matryoshka_weights must be None or one number per dimension \\(2\\)"),
    (dict(matryoshka_dims=(16,), matryoshka_weights=(float("nan"),)), ValueError, "matryoshka_weights"),
    (dict(metric_for_best="dev40"), ValueError, "eval_data is None"),
    (dict(metric_for_best=3), TypeError, "metric_for_best must be a score name"),
])
def test_bad_matryoshka_settings_fail_before_training(tmp_path, kwargs, error, match):
    kwargs = dict(dict(batch_size=8, max_steps=1, eval_data=None, progress=False, output_dir=tmp_path / "out"), **kwargs)
    with pytest.raises(error, match=match):
        train(tiny(), SENTENCES, **kwargs)
    assert not (tmp_path / "out").exists()


def test_metric_for_best_must_name_a_reported_score(tmp_path, dev_pairs):
    with pytest.raises(ValueError, match=r"metric_for_best must be one of the evaluation's scores \['dev40', "
                                         r"'dev40@16'\], got 'dev40@8'"):
        train(tiny(), SENTENCES, batch_size=8, max_steps=1, eval_data=dev_pairs, matryoshka_dims=(16,),
              metric_for_best="dev40@8", output_dir=tmp_path / "out", progress=False)


def test_resume_refuses_changed_matryoshka_settings(tmp_path, dev_pairs):
    args = dict(batch_size=8, max_steps=2, eval_steps=2, eval_data=dev_pairs, progress=False,
                matryoshka_dims=(16, 8))
    run = tmp_path / "run"
    train(tiny(), SENTENCES, output_dir=run, **args)
    for changed, named in ((dict(matryoshka_dims=(16, 4)), r"matryoshka_dims \(8, 16\) -> \(4, 16\)"),
                           (dict(matryoshka_dims=None), r"matryoshka_dims \(8, 16\) -> None"),
                           (dict(matryoshka_weights=(1.0, 2.0)), r"matryoshka_weights \(1\.0, 1\.0\) -> \(2\.0, 1\.0\)"),
                           (dict(metric_for_best="dev40@8"), "metric_for_best None -> 'dev40@8'")):
        with pytest.raises(RunRefused, match=named):
            train(tiny(), SENTENCES, output_dir=run, resume_from=run, **dict(args, **changed))
    # the same dimensions in another order are the same loss: the run continues
    assert train(tiny(), SENTENCES, output_dir=run, resume_from=run, **dict(args, matryoshka_dims=(8, 16))).steps == 2
    # a checkpoint from before Matryoshka counts as without it
    state_file = (run / "last").resolve() / "trainer_state.pt"
    state = torch.load(state_file, weights_only=True)
    for name in ("matryoshka_dims", "matryoshka_weights", "metric_for_best"):
        del state["settings"][name]
    torch.save(state, state_file)
    with pytest.raises(RunRefused, match=r"matryoshka_dims None -> \(8, 16\)"):
        train(tiny(), SENTENCES, output_dir=run, resume_from=run, **args)


# ---- false negatives by similarity: self-guided and guided by a second model


class RecordedKeywords(RecordedLosses):
    """RecordedLosses that also keeps each call's hard negatives and other keywords (floats,
    strings, the guide's tuple)."""

    def __call__(self, anchor, positive, negative=None, **kwargs):
        loss = super().__call__(anchor, positive, negative, **kwargs)
        self.calls[-1].update({k: v for k, v in kwargs.items() if not isinstance(v, torch.Tensor)})
        if negative is not None:
            self.calls[-1]["negative"] = negative.detach().clone()
        return loss


@pytest.fixture
def guide_folder(tmp_path):
    """A saved tiny model with the trained models' tokenizer, declaring mean pooling."""
    model, tok = tiny(seed=11)
    save_checkpoint(tmp_path / "guide", model, tok, {"eval_pooler": "avg"})
    return tmp_path / "guide"


def test_self_guided_false_negatives_pass_the_margin_to_the_loss(tmp_path, monkeypatch):
    recorded = RecordedKeywords(monkeypatch)
    result = train(tiny(), SENTENCES, batch_size=8, max_steps=1, eval_data=None, progress=False, seed=3,
                   false_negative_margin=0.2, margin_strategy="relative", output_dir=tmp_path / "run")
    call = recorded.calls[0]
    assert call["false_negative_margin"] == 0.2 and call["margin_strategy"] == "relative" and "guide" not in call
    expected = reference_loss(call, false_negative_margin=0.2, margin_strategy="relative")
    assert step_losses(result)[0] == pytest.approx(expected, rel=1e-5, abs=1e-6)  # most negatives are left out:
    assert expected < reference_loss(call)  # a small loss, whose fp32 roundoff is about 1e-7
    recorded.calls.clear()
    train(tiny(), SENTENCES, batch_size=8, max_steps=1, eval_data=None, progress=False, output_dir=tmp_path / "plain")
    assert "false_negative_margin" not in recorded.calls[0]  # off: the plain call


@pytest.mark.parametrize("mini_batch_size", [None, 4])
def test_the_guide_encodes_the_steps_rows_without_gradient_in_eval_mode(tmp_path, monkeypatch, guide_folder,
                                                                        mini_batch_size):
    from transformers import AutoModel, AutoTokenizer

    recorded = RecordedKeywords(monkeypatch)
    guide_calls = []
    real_rows = guide_module.GuideEncoder.rows

    def count_rows(self, *args):
        guide_calls.append(self.model.training)
        return real_rows(self, *args)

    monkeypatch.setattr(guide_module.GuideEncoder, "rows", count_rows)
    result = train(tiny(), SENTENCES, batch_size=8, max_steps=2, eval_data=None, progress=False, seed=5,
                   learning_rate=1e-3, false_negative_margin=0.05, guide_model=guide_folder,
                   mini_batch_size=mini_batch_size, negative_queue_size=8, output_dir=tmp_path / "run")
    assert guide_calls == [False, False]  # once a step (cached or not), in eval mode
    guide = AutoModel.from_pretrained(guide_folder)
    texts = [SENTENCES[i] for i in batch_rows(SENTENCES, 8, seed=5)]
    expected = encode(guide, AutoTokenizer.from_pretrained(guide_folder), texts, pooler="avg")
    first, second = recorded.calls
    assert len(first["guide"]) == 2 and not first["guide"][0].requires_grad
    for rows in first["guide"]:  # no dropout: both views of a sentence get the same guide row
        torch.testing.assert_close(rows, expected, rtol=1e-4, atol=1e-5)
    # the queue keeps the guide's rows of its positives for the next steps
    assert "guide_extra_negatives" not in first
    assert torch.equal(second["guide_extra_negatives"], first["guide"][1])
    losses = step_losses(result)
    assert losses[0] < reference_loss(first) - 1e-3  # the guide leaves negatives out: the rule is at work
    for loss, call in zip(losses, (first, second)):
        extra = {} if "extra_negatives" not in call else dict(extra_negatives=call["extra_negatives"].double(),
                                                              guide_extra_negatives=call["guide_extra_negatives"])
        assert loss == pytest.approx(reference_loss(call, false_negative_margin=0.05, guide=call["guide"], **extra),
                                     rel=1e-5)
    assert all(torch.equal(p, weights(guide_folder)[name]) for name, p in guide.state_dict().items()
               if name in weights(guide_folder))  # the guide is never trained (nor saved over)
    settings = torch.load(tmp_path / "run" / "last" / "trainer_state.pt", weights_only=True)["settings"]
    assert settings["guide_model"] == str(guide_folder.resolve()) and settings["false_negative_margin"] == 0.05


def test_a_supervised_guide_covers_the_hard_negatives(tmp_path, monkeypatch, guide_folder):
    recorded = RecordedKeywords(monkeypatch)
    result = train(tiny(), NLI, mode="sup", batch_size=8, max_steps=1, eval_data=None, progress=False,
                   false_negative_margin=0.1, guide_model=guide_folder, output_dir=tmp_path / "run")
    call = recorded.calls[0]
    assert len(call["guide"]) == 3 and all(rows.shape == (8, 32) for rows in call["guide"])
    expected = fastcse.info_nce_reference(call["anchor"].double(), call["positive"].double(),
                                          call["negative"].double(), false_negative_margin=0.1, guide=call["guide"],
                                          group_ids=call.get("group_ids"))
    assert step_losses(result)[0] == pytest.approx(float(expected), rel=1e-5)


@pytest.mark.parametrize("guided", [False, True], ids=["self", "guide"])
def test_matryoshka_with_false_negatives(tmp_path, monkeypatch, guide_folder, guided):
    """The pair reaches the loss (each dimension's own rule self-guided; the guide untruncated for
    every dimension) and the step's loss is the reference's."""
    recorded = RecordedKeywords(monkeypatch)
    guide = dict(guide_model=guide_folder) if guided else {}
    result = train(tiny(), SENTENCES, batch_size=8, max_steps=1, eval_data=None, progress=False, seed=5,
                   matryoshka_dims=(32, 8), false_negative_margin=0.05, output_dir=tmp_path / "run", **guide)
    call = recorded.calls[0]
    assert call["matryoshka_dims"] == (8, 32) and call["false_negative_margin"] == 0.05
    assert ("guide" in call) == guided
    rule = dict(false_negative_margin=0.05, guide=call.get("guide"))
    expected = reference_loss(call, matryoshka_dims=(8, 32), **rule)
    assert step_losses(result)[0] == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert expected != pytest.approx(reference_loss(call, matryoshka_dims=(8, 32)), rel=1e-4)  # the rule is at work


def test_resume_refuses_changed_false_negative_settings(tmp_path, guide_folder):
    other = tmp_path / "other-guide"
    shutil.copytree(guide_folder.resolve(), other)
    args = dict(batch_size=8, max_steps=2, eval_steps=2, eval_data=None, progress=False, false_negative_margin=0.1,
                guide_model=guide_folder)
    run = tmp_path / "run"
    train(tiny(), SENTENCES, output_dir=run, **args)
    for changed, named in ((dict(false_negative_margin=0.2), "false_negative_margin 0.1 -> 0.2"),
                           (dict(margin_strategy="relative"), "margin_strategy 'absolute' -> 'relative'"),
                           (dict(guide_model=other), f"guide_model '{guide_folder.resolve()}' -> '{other}'"),
                           (dict(guide_model=None), f"guide_model '{guide_folder.resolve()}' -> None")):
        with pytest.raises(RunRefused, match=re.escape(named)):
            train(tiny(), SENTENCES, output_dir=run, resume_from=run, **dict(args, **changed))
    assert train(tiny(), SENTENCES, output_dir=run, resume_from=run, **args).steps == 2
    state_file = (run / "last").resolve() / "trainer_state.pt"
    state = torch.load(state_file, weights_only=True)
    for name in ("false_negative_margin", "margin_strategy", "guide_model"):
        del state["settings"][name]
    torch.save(state, state_file)  # a checkpoint from before the option: without it
    with pytest.raises(RunRefused, match=r"false_negative_margin None -> 0\.1"):
        train(tiny(), SENTENCES, output_dir=run, resume_from=run, **args)


def test_bad_false_negative_settings_fail_before_training(tmp_path, guide_folder):
    from transformers import AutoTokenizer

    other_vocab = tmp_path / "other-vocab"
    shutil.copytree(guide_folder.resolve(), other_vocab)
    tok = AutoTokenizer.from_pretrained(other_vocab)
    tok.add_tokens(["qqqzz"])
    tok.save_pretrained(other_vocab)
    cases = [(dict(false_negative_margin=float("nan")), ValueError, "false_negative_margin must be a finite number"),
             (dict(false_negative_margin=True), ValueError, "false_negative_margin must be a finite number"),
             (dict(false_negative_margin=0.1, margin_strategy="max"), ValueError, "margin_strategy must be one of"),
             (dict(guide_model=guide_folder), ValueError, "give false_negative_margin too"),
             (dict(false_negative_margin=0.1, guide_model=3), TypeError, "guide_model must be a local model folder"),
             (dict(false_negative_margin=0.1, guide_model=tmp_path / "nope"), FileNotFoundError,
              "guide_model=.*nope.* does not exist"),
             (dict(false_negative_margin=0.1, guide_model=other_vocab), ValueError, "another vocabulary")]
    for case, error, match in cases:
        kwargs = dict(dict(batch_size=8, max_steps=1, eval_data=None, progress=False, output_dir=tmp_path / "out"),
                      **case)
        with pytest.raises(error, match=match):
            train(tiny(), SENTENCES, **kwargs)
    assert not (tmp_path / "out").exists()


def test_a_resumed_guided_run_with_a_queue_matches_an_uninterrupted_one(tmp_path, guide_folder, crash_at_step):
    """The checkpoint holds the queue's guide rows too: without them the resumed step 3 could not
    judge its queued negatives as the uninterrupted run did."""
    common = dict(batch_size=8, max_steps=4, eval_steps=2, eval_data=None, learning_rate=1e-3, progress=False,
                  seed=7, negative_queue_size=12, false_negative_margin=0.05, guide_model=guide_folder)
    straight = train(tiny(), SENTENCES, output_dir=tmp_path / "straight", **common)
    run = tmp_path / "resumed"
    crash_at_step(3)
    with pytest.raises(KeyboardInterrupt):
        train(tiny(), SENTENCES, output_dir=run, **common)
    saved_queue = torch.load(run / "last" / "trainer_state.pt", weights_only=True)["negative_queue"]
    assert saved_queue["guide_rows"].shape == (12, 32)
    resumed = train(tiny(), SENTENCES, output_dir=run, resume_from=run, **common)
    a, b = weights(straight.model_path), weights(resumed.model_path)
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=0)
