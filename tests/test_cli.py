import json
import os
import subprocess
import sys

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import fastcse  # noqa: E402
from fastcse.__main__ import build_parser, main  # noqa: E402
from fastcse.evaluation import shared_dir  # noqa: E402

SHARED = shared_dir()


def test_module_entry_point_help():
    out = subprocess.run([sys.executable, "-m", "fastcse", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0
    for command in ("demo", "train", "eval"):
        assert command in out.stdout


@pytest.mark.parametrize("command, expected", [("train", "--mini-batch-size"), ("eval", "--tasks"),
                                               ("demo", "--max-steps")])
def test_subcommand_help(capsys, command, expected):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert expected in capsys.readouterr().out


def test_bad_input_exits_2_with_a_clear_message(capsys, tmp_path):
    code = main(["train", "--model", str(SHARED / "models" / "all-MiniLM-L6-v2"), "--data", str(tmp_path / "x.txt"),
                 "--output-dir", str(tmp_path / "out"), "--no-progress"])
    assert code == 2
    assert "error: data file not found" in capsys.readouterr().err
    code = main(["train", "--model", "m", "--data", "d", "--batch-size", "1", "--output-dir", str(tmp_path / "o")])
    assert code == 2
    assert "batch_size must be an int >= 2" in capsys.readouterr().err


def test_train_from_scratch_then_eval(capsys, tmp_path):
    src = (SHARED / "data" / "sts-raw" / "STSB" / "dev.tsv").read_text(encoding="utf-8").splitlines()
    pairs = tmp_path / "dev30.tsv"
    pairs.write_text("\n".join(src[:31]) + "\n", encoding="utf-8")
    sentences = tmp_path / "s.txt"
    sentences.write_text("\n".join(f"line {i} of a tiny corpus about topic {i % 5}" for i in range(40)),
                         encoding="utf-8")
    code = main(["train", "--model", str(SHARED / "models" / "all-MiniLM-L6-v2"), "--from-scratch",
                 "--scratch-hidden-size", "32", "--scratch-layers", "1", "--data", str(sentences),
                 "--batch-size", "8", "--mini-batch-size", "4", "--max-steps", "2", "--eval-steps", "2",
                 "--eval-data", str(pairs), "--pooler", "avg", "--output-dir", str(tmp_path / "run"), "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0
    best = tmp_path / "run" / "best"
    assert f"saved model: {best}" in out and f"next: python -m fastcse eval --model {best}" in out
    code = main(["eval", "--model", str(best), "--tasks", str(pairs), "--json"])
    scores = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # The CLI prints what the Python API computes on the same model and file (its saved pooler, avg).
    assert code == 0 and scores == {"dev30": pytest.approx(fastcse.evaluate(best, [str(pairs)])["dev30"], abs=1e-9)}


def _usage_error(capsys, argv) -> str:
    """The argparse error of a command line that must be refused before anything is loaded."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


TRAIN = ["train", "--model", "m", "--data", "d"]


@pytest.mark.parametrize("device, message", [("gpu", "unknown device 'gpu'"), ("cuda:x", "unknown device"),
                                             ("cuda", "CUDA is not available"), ("cuda:0", "CUDA is not available")])
def test_train_device_is_checked_at_parse_time(capsys, monkeypatch, device, message):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    err = _usage_error(capsys, TRAIN + ["--device", device])
    assert "argument --device" in err and message in err


def test_train_device_index_must_exist(capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    err = _usage_error(capsys, TRAIN + ["--device", "cuda:1"])
    assert "argument --device" in err and "cuda:1" in err and "1 CUDA device" in err


@pytest.mark.parametrize("option", ["--scratch-hidden-size", "--scratch-layers", "--max-seq-length", "--epochs",
                                    "--max-steps", "--eval-steps", "--batch-size", "--mini-batch-size"])
@pytest.mark.parametrize("value", ["0", "-3", "2.5"])
def test_train_sizes_must_be_positive_ints(capsys, option, value):
    err = _usage_error(capsys, TRAIN + [option, value])
    assert f"argument {option}" in err and f"expected a positive integer, got {value!r}" in err


def test_eval_batch_size_must_be_a_positive_int(capsys):
    err = _usage_error(capsys, ["eval", "--model", "m", "--batch-size", "0"])
    assert "argument --batch-size" in err and "positive integer" in err


def test_from_scratch_with_a_missing_tokenizer_folder_fails_at_once(capsys, tmp_path):
    missing = str(tmp_path / "nope")
    code = main(["train", "--model", missing, "--from-scratch", "--data", "d", "--output-dir", str(tmp_path / "o")])
    assert code == 2
    assert f"error: model folder not found: {missing!r}" in capsys.readouterr().err


def test_demo_help_mentions_only_options_the_demo_takes(capsys):
    import re

    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    help_text = capsys.readouterr().out
    demo = build_parser()._subparsers._group_actions[0].choices["demo"]
    accepted = {s for action in demo._actions for s in action.option_strings}
    assert set(re.findall(r"--[a-z][a-z-]*", help_text)) <= accepted


def test_train_passes_the_duplicate_masking_and_queue_flags(monkeypatch):
    import dataclasses

    import fastcse.training

    seen = []

    def fake_train(model, data, *, config):
        seen.append(dataclasses.asdict(config))
        raise ValueError("stop here")  # the CLI's handled error: exit code 2, nothing trained

    monkeypatch.setattr(fastcse.training, "train", fake_train)
    assert main(TRAIN + ["--output-dir", "unused"]) == 2
    assert main(TRAIN + ["--no-mask-duplicates", "--negative-queue-size", "64", "--output-dir", "unused"]) == 2
    assert [(k["mask_duplicates"], k["negative_queue_size"]) for k in seen] == [(True, 0), (False, 64)]


@pytest.mark.parametrize("value", ["-1", "2.5", "many"])
def test_negative_queue_size_must_be_a_non_negative_int(capsys, value):
    err = _usage_error(capsys, TRAIN + ["--negative-queue-size", value])
    assert "argument --negative-queue-size" in err and f"expected a non-negative integer, got {value!r}" in err
