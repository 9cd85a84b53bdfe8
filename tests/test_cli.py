import json
import os
import subprocess
import sys

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from fastcse.__main__ import main  # noqa: E402
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
    assert code == 0 and set(scores) == {"dev30"} and -100 <= scores["dev30"] <= 100
