"""The examples/ scripts, run as a user would, at small size (a tiny random BERT, a few steps)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(args: list[str], timeout: float = 300) -> dict | list:
    """Runs a command from the project root; returns its last stdout line parsed as JSON."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    result = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def torchrun(nproc: int, *script_args: str) -> dict:
    return run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                "examples/ddp_loop.py", *script_args])


def test_hf_trainer_example_trains():
    steps = 16
    out = run([sys.executable, "examples/hf_trainer.py", "--tiny", "--rows", "64", "--batch-size", "16",
               "--max-steps", str(steps), "--lr", "5e-4"])
    losses = out["losses"]
    assert len(losses) == steps and all(math.isfinite(v) for v in losses)
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.1, losses  # 4 epochs over 64 triples


def test_ddp_example_distributed_negatives_equal_single_process():
    """The recipe (process_group=WORLD, loss * world_size under DDP) trains exactly like one process
    on the whole global batch. Dropout off (the ranks draw different masks) and SGD (its update is
    proportional to the gradient, so a wrong gradient scale shows from the second step on).
    --local-negatives, the plain DDP alternative: each rank's 8 anchors see 16 candidates instead
    of the global 32, so its first loss is lower at the same weights."""
    common = ["--tiny", "--global-batch", "16", "--dropout", "0", "--optimizer", "sgd", "--lr", "0.5"]
    two = torchrun(2, *common, "--steps", "3")
    one = torchrun(1, *common, "--steps", "3")
    assert (two["world_size"], one["world_size"]) == (2, 1)
    assert two["losses"] == pytest.approx(one["losses"], rel=1e-5)
    assert abs(one["losses"][1] - one["losses"][0]) > 0.01  # the steps do move the model
    local = torchrun(2, *common, "--steps", "1", "--local-negatives")
    assert local["local_negatives"] is True and math.isfinite(local["losses"][0])
    assert local["losses"][0] < one["losses"][0] - 0.1
