import json
import os
import signal
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


def test_a_torchrun_worker_leaves_through_exit_worker(tmp_path):
    """WORLD_SIZE > 1: the code and the flushed error arrive, and no atexit handler runs (the
    interpreter's shutdown is skipped; see fastcse.distributed.exit_worker)."""
    script = ("import atexit, sys; from fastcse.__main__ import entry; "
              "atexit.register(print, 'the interpreter shut down'); sys.argv[1:] = sys.argv[2:]; entry()")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # buffered, so the flush shows
    env["WORLD_SIZE"] = "2"
    out = subprocess.run([sys.executable, "-c", script, "-", "train", "--model", "m", "--data", str(tmp_path / "x"),
                          "--batch-size", "1", "--output-dir", str(tmp_path / "o")],
                         capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 2 and "fastcse: error: " in out.stderr and out.stdout == "", out


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


# ---- long runs from the command line: interrupts, reruns, one-line errors

TOKENIZER = SHARED / "models" / "all-MiniLM-L6-v2"
SCRATCH = ["train", "--model", str(TOKENIZER), "--from-scratch", "--scratch-hidden-size", "32", "--scratch-layers",
           "1", "--batch-size", "8", "--max-seq-length", "16", "--no-progress"]


def _sentences(tmp_path) -> str:
    path = tmp_path / "s.txt"
    path.write_text("\n".join(f"line {i} of a tiny corpus about topic {i % 5}" for i in range(40)), encoding="utf-8")
    return str(path)


def _start(argv) -> subprocess.Popen:
    env = dict(os.environ, HF_HUB_OFFLINE="1", FASTCSE_SHARED=str(SHARED), PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "fastcse", *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)


def _wait_for(condition, process, timeout=180):
    import time

    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            pytest.fail(f"the run ended before the condition held: {process.communicate()}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"timed out: {process.communicate()}")
        time.sleep(0.05)


def _trained_steps(run) -> list[int]:
    """The steps of the complete training records in the metrics file."""
    steps = []
    try:
        lines = (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return steps
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:  # being appended
            continue
        if "loss" in record:
            steps.append(record["step"])
    return steps


def _saved_step(run) -> int:
    try:
        return json.loads((run / "last" / "fastcse.json").read_text(encoding="utf-8"))["step"]
    except (OSError, ValueError):
        return -1


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_saves_the_finished_step_and_prints_the_command_that_resumes(tmp_path, signum):
    import shlex

    run = tmp_path / "run"
    argv = SCRATCH + ["--data", _sentences(tmp_path), "--max-steps", "100000", "--eval-data", "none",
                      "--output-dir", str(run)]
    process = _start(argv)
    _wait_for(lambda: len(_trained_steps(run)) >= 2, process)
    process.send_signal(signum)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 128 + signum, err
    assert "Traceback" not in err
    step = _saved_step(run)
    assert step >= 2 and _trained_steps(run) == list(range(1, step + 1))  # every trained step is in the checkpoint
    resume = shlex.join(["python", "-m", "fastcse", *argv, "--resume-from", str(run)])
    name = signal.Signals(signum).name
    assert err.strip().splitlines()[-1] == (f"fastcse: stopped by {name} after step {step} of 100000 "
                                            f"(saved {run / 'last'}); resume with: {resume}")
    assert not (run / ".fastcse.lock").exists()


def test_the_same_command_after_a_kill_continues_the_run_and_keeps_its_checkpoints(tmp_path):
    src = (SHARED / "data" / "sts-raw" / "STSB" / "dev.tsv").read_text(encoding="utf-8").splitlines()
    pairs = tmp_path / "dev20.tsv"
    pairs.write_text("\n".join(src[:21]) + "\n", encoding="utf-8")
    run = tmp_path / "run"
    argv = SCRATCH + ["--data", _sentences(tmp_path), "--max-steps", "100000", "--save-steps", "2", "--eval-data",
                      str(pairs), "--eval-steps", "100000", "--output-dir", str(run)]
    first = _start(argv)
    _wait_for(lambda: _saved_step(run) >= 2, first)
    first.kill()  # kill -9: no handler runs
    first.communicate()
    saved = _saved_step(run)
    again = _start(argv)  # the same command, without --resume-from
    _wait_for(lambda: _saved_step(run) >= saved + 2, again)
    again.send_signal(signal.SIGINT)
    _, err = again.communicate(timeout=120)
    assert again.returncode == 130 and "Traceback" not in err
    assert f"saved at step {saved} of 100000: continuing it" in err
    steps = _trained_steps(run)
    assert steps == list(range(1, len(steps) + 1)) and steps[-1] == _saved_step(run)  # no step lost or repeated
    assert json.loads((run / "best" / "fastcse.json").read_text(encoding="utf-8"))["step"] == 0  # kept


def test_user_errors_are_one_line_and_exit_2(capsys, tmp_path):
    import time

    a_file = tmp_path / "a-file"
    a_file.write_text("x", encoding="utf-8")
    data = _sentences(tmp_path)
    held = tmp_path / "held"
    held.mkdir()
    other = subprocess.Popen(["sleep", "60"])
    (held / ".fastcse.lock").write_text(json.dumps({"pid": other.pid, "host": __import__("socket").gethostname()}),
                                        encoding="utf-8")
    cases = [(SCRATCH + ["--data", data, "--output-dir", str(a_file)], "is a file, not a folder"),
             (SCRATCH + ["--data", data, "--output-dir", str(held)], "is in use by another fastcse run"),
             (["eval", "--model", "no_such_dir/best"], "not a local folder and not in the local Hugging Face cache"),
             (SCRATCH + ["--data", data, "--weight-decay", "-1", "--output-dir", str(tmp_path / "o")],
              "weight_decay must be a finite non-negative number, got -1.0")]
    try:
        for argv, message in cases:
            started = time.monotonic()
            code = main(argv)
            err = capsys.readouterr().err
            assert code == 2 and err.startswith("fastcse: error: ") and err.count("\n") == 1, (argv, err)
            assert message in err and time.monotonic() - started < 5, (argv, err)  # offline: no Hub retries
    finally:
        other.kill()
        other.wait()
    with pytest.raises(NotADirectoryError):  # --verbose: the traceback of a user error too
        main(cases[0][0] + ["--verbose"])
    process = _start(cases[0][0])  # the whole output of the real command is that one line
    out, err = process.communicate(timeout=120)
    assert process.returncode == 2 and err.strip().splitlines() == [f"fastcse: error: output_dir={str(a_file)!r} is "
                                                                    "a file, not a folder"], err


def test_a_resume_refusal_names_the_command_line_flags(capsys, tmp_path):
    run = tmp_path / "run"
    common = SCRATCH + ["--data", _sentences(tmp_path), "--eval-data", "none", "--output-dir", str(run)]
    argv = common + ["--max-steps", "2"]
    assert main(argv) == 0
    capsys.readouterr()
    assert main(argv + ["--learning-rate", "0.01"]) == 2  # a rerun with another setting
    err = capsys.readouterr().err
    assert f"--resume-from {run} --resume-override learning_rate" in err and "--overwrite-output-dir" in err
    assert "resume_override=" not in err and err.count("\n") == 1
    assert main(argv + ["--learning-rate", "0.01", "--resume-from", str(run)]) == 2
    assert f"--resume-from {run} was trained with other settings: learning_rate 3e-05 -> 0.01. Resume with the " \
           "run's settings, or add --resume-override learning_rate (or all)" in capsys.readouterr().err
    # max_steps names the step count, which is compared as total_steps
    assert main(common + ["--max-steps", "3", "--resume-from", str(run), "--resume-override", "max_steps"]) == 0
    assert _trained_steps(run) == [1, 2, 3]


def test_train_passes_the_optimizer_and_checkpoint_flags(monkeypatch):
    import dataclasses

    import fastcse.training

    seen = []

    def fake_train(model, data, *, config):
        seen.append(dataclasses.asdict(config))
        raise ValueError("stop here")

    monkeypatch.setattr(fastcse.training, "train", fake_train)
    assert main(TRAIN + ["--weight-decay", "0.01", "--warmup-steps", "3", "--max-grad-norm", "0", "--save-steps", "7",
                         "--save-total-limit", "2", "--overwrite-output-dir", "--output-dir", "unused"]) == 2
    assert main(TRAIN + ["--save-steps", "0", "--output-dir", "unused"]) == 2
    keys = ("weight_decay", "warmup_steps", "max_grad_norm", "save_steps", "save_total_limit", "overwrite_output_dir")
    assert [tuple(k[key] for key in keys) for k in seen] == [(0.01, 3, None, 7, 2, True),
                                                              (0.0, 0, 1.0, None, 1, False)]


def test_the_resume_command_drops_overwrite_and_replaces_resume_from():
    from fastcse.__main__ import resume_command

    argv = ["train", "--model", "m", "--resume-from", "old", "--overwrite-output-dir", "--output-dir", "o p"]
    assert resume_command(argv, "o p") == "python -m fastcse train --model m --output-dir 'o p' --resume-from 'o p'"


def test_train_passes_the_matryoshka_flags(monkeypatch):
    import dataclasses

    import fastcse.training

    seen = []

    def fake_train(model, data, *, config):
        seen.append(dataclasses.asdict(config))
        raise ValueError("stop here")

    monkeypatch.setattr(fastcse.training, "train", fake_train)
    assert main(TRAIN + ["--matryoshka-dims", "768", "512", "64", "--matryoshka-weights", "1", "0.5", "2",
                         "--metric-for-best", "STSBenchmark-dev@64", "--output-dir", "unused"]) == 2
    assert main(TRAIN + ["--output-dir", "unused"]) == 2
    keys = ("matryoshka_dims", "matryoshka_weights", "metric_for_best")
    assert [tuple(k[key] for key in keys) for k in seen] == [([768, 512, 64], [1.0, 0.5, 2.0], "STSBenchmark-dev@64"),
                                                              (None, None, None)]


@pytest.mark.parametrize("argv, message", [
    (["--matryoshka-dims", "0"], "argument --matryoshka-dims: expected a positive integer, got '0'"),
    (["--matryoshka-dims", "64.5"], "argument --matryoshka-dims: expected a positive integer, got '64.5'"),
    (["--matryoshka-dims"], "argument --matryoshka-dims: expected at least one argument"),
    (["--matryoshka-dims", "64", "--matryoshka-weights", "nan"],
     "argument --matryoshka-weights: expected a finite number, got 'nan'"),
])
def test_matryoshka_flags_are_checked_at_parse_time(capsys, argv, message):
    err = _usage_error(capsys, TRAIN + argv)
    assert message in err


@pytest.mark.parametrize("argv, message", [
    (["--matryoshka-weights", "1"], "matryoshka_weights given without matryoshka_dims"),
    (["--matryoshka-dims", "64", "32", "--matryoshka-weights", "1"],
     "matryoshka_weights must be None or one number per dimension (2)"),
    (["--matryoshka-dims", "64", "64"], "matryoshka_dims must be distinct"),
    (["--metric-for-best", "avg@64"], "metric_for_best must be one of the evaluation's scores"),
    (["--metric-for-best", "STSBenchmark-dev", "--eval-data", "none"], "eval_data is None"),
])
def test_bad_matryoshka_settings_are_one_line_errors(capsys, tmp_path, argv, message):
    assert main(TRAIN + argv + ["--output-dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastcse: error: ") and message in err and err.count("\n") == 1


def test_eval_reports_truncated_dimensions(capsys, tmp_path):
    from fastcse.training import build_bert_from_scratch, save_checkpoint

    src = (SHARED / "data" / "sts-raw" / "STSB" / "dev.tsv").read_text(encoding="utf-8").splitlines()
    pairs = tmp_path / "dev20.tsv"
    pairs.write_text("\n".join(src[:21]) + "\n", encoding="utf-8")
    model, tok = build_bert_from_scratch(TOKENIZER, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64,
                                         max_position_embeddings=128)
    save_checkpoint(tmp_path / "m", model, tok, {"eval_pooler": "avg"})
    assert main(["eval", "--model", str(tmp_path / "m"), "--tasks", str(pairs), "--truncate-dims", "16", "8",
                 "--json"]) == 0
    scores = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert scores == pytest.approx(fastcse.evaluate(tmp_path / "m", [str(pairs)], truncate_dims=(16, 8)), abs=1e-9)
    assert list(scores) == ["dev20", "dev20@16", "dev20@8"]


def test_train_passes_the_false_negative_flags(monkeypatch):
    import dataclasses

    import fastcse.training

    seen = []

    def fake_train(model, data, *, config):
        seen.append(dataclasses.asdict(config))
        raise ValueError("stop here")

    monkeypatch.setattr(fastcse.training, "train", fake_train)
    assert main(TRAIN + ["--false-negative-margin", "0.1", "--margin-strategy", "relative", "--guide-model",
                         str(TOKENIZER), "--output-dir", "unused"]) == 2
    assert main(TRAIN + ["--false-negative-margin", "-0.1", "--output-dir", "unused"]) == 2
    assert main(TRAIN + ["--output-dir", "unused"]) == 2
    keys = ("false_negative_margin", "margin_strategy", "guide_model")
    assert [tuple(k[key] for key in keys) for k in seen] == [(0.1, "relative", str(TOKENIZER)),
                                                              (-0.1, "absolute", None), (None, "absolute", None)]


@pytest.mark.parametrize("argv, message", [
    (["--false-negative-margin", "inf"], "argument --false-negative-margin: expected a finite number, got 'inf'"),
    (["--false-negative-margin", "x"], "argument --false-negative-margin: expected a finite number, got 'x'"),
    (["--margin-strategy", "max"], "argument --margin-strategy: invalid choice: 'max'"),
])
def test_false_negative_flags_are_checked_at_parse_time(capsys, argv, message):
    assert message in _usage_error(capsys, TRAIN + argv)


@pytest.mark.parametrize("argv, message", [
    (["--guide-model", "g"], "guide_model decides which negatives false_negative_margin leaves out"),
    (["--false-negative-margin", "0.1", "--guide-model", "/nonexistent/guide"],
     "guide_model='/nonexistent/guide' does not exist"),
])
def test_bad_false_negative_settings_are_one_line_errors(capsys, tmp_path, argv, message):
    assert main(TRAIN + argv + ["--output-dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastcse: error: ") and message in err and err.count("\n") == 1


def test_train_with_matryoshka_and_with_a_guide_from_the_command_line(capsys, tmp_path):
    from fastcse.training import build_bert_from_scratch, save_checkpoint

    src = (SHARED / "data" / "sts-raw" / "STSB" / "dev.tsv").read_text(encoding="utf-8").splitlines()
    pairs = tmp_path / "dev20.tsv"
    pairs.write_text("\n".join(src[:21]) + "\n", encoding="utf-8")
    run = tmp_path / "mrl"
    assert main(SCRATCH + ["--data", _sentences(tmp_path), "--max-steps", "2", "--eval-steps", "2", "--pooler", "avg",
                           "--eval-data", str(pairs), "--matryoshka-dims", "32", "16", "8",
                           "--metric-for-best", "dev20@8", "--output-dir", str(run)]) == 0
    evaluations = [r for r in map(json.loads, open(run / "metrics.jsonl", encoding="utf-8")) if "eval" in r]
    assert list(evaluations[-1]["eval"]) == ["dev20", "dev20@32", "dev20@16", "dev20@8"]
    assert all(r["metric"] == r["eval"]["dev20@8"] for r in evaluations)
    guide, tok = build_bert_from_scratch(TOKENIZER, hidden_size=32, num_layers=1, num_heads=2, seed=3)
    save_checkpoint(tmp_path / "guide", guide, tok, {"eval_pooler": "avg"})
    capsys.readouterr()
    assert main(SCRATCH + ["--data", _sentences(tmp_path), "--max-steps", "2", "--eval-data", "none",
                           "--false-negative-margin", "0.05", "--guide-model", str(tmp_path / "guide"),
                           "--output-dir", str(tmp_path / "guided")]) == 0
    import torch

    settings = torch.load(tmp_path / "guided" / "last" / "trainer_state.pt", weights_only=True)["settings"]
    assert settings["false_negative_margin"] == 0.05 and settings["margin_strategy"] == "absolute"
    assert settings["guide_model"] == str((tmp_path / "guide").resolve())
