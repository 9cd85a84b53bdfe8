"""``fastcse.train`` on 2 gloo processes equals the single-process run on the same global batches.

Dropout is off (so the only difference between the runs is float roundoff) and AdamW is replaced
by SGD in both runs: Adam normalizes each element, so roundoff in a near-zero gradient would
become a step of +-lr; SGD keeps weight differences proportional to gradient differences. Both
ranks train the same tiny BERT; after the run each rank's weights must equal the single-process
weights, uncached and with gradient caching (mini_batch_size), and on repeated sentences with a
negative queue (the duplicates' group ids are compared across the ranks; every rank queues every
rank's positives, so all score the single-process queue), and with false negatives decided by a
guide model (each rank encodes its own rows' guide rows, the loss gathers them). The processes
are spawned once and run every case; the parent asserts on what they report.
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from fastcse.evaluation import shared_dir  # noqa: E402
from fastcse.training import build_bert_from_scratch, train  # noqa: E402
from spawn_world import spawn_world  # noqa: E402

SHARED = shared_dir()
TOKENIZER = SHARED / "models" / "all-MiniLM-L6-v2"
SENTENCES = [f"sentence number {i} is about {w} and {v}" for i, (w, v) in
             enumerate(zip(["cats", "dogs", "rain", "music", "bread", "trains", "rivers", "books"] * 6,
                           ["the sea", "a city", "old songs", "red cars", "snow", "tea", "clocks", "maps"] * 6))]
SPAWN_TIMEOUT_S = 120
WORLD = 2
REPEATED = SENTENCES[:16] * 3  # every batch of 12 repeats sentences, within a rank's rows and across ranks
# batch 12 = 6 rows a rank; mini-batch 4 splits each rank's 6 rows into chunks of 4 and 2. With the
# queue, a smaller step: the tiny model's queued positives are nearly parallel to the current ones,
# and at lr 0.5 a 1e-7 relative change of the start weights grew to 5e-4 in the weights after 3
# steps (1e-6 without the queue); at lr 0.01 to 2e-6, so the comparison below still means something.
# guided: a guide model's rows decide the false negatives; each rank encodes its own rows and the
# loss gathers them, and every rank queues every rank's guide rows with the positives.
CASES = {"uncached": dict(mini_batch_size=None), "cached": dict(mini_batch_size=4),
         "repeated+queue": dict(mini_batch_size=4, negative_queue_size=18, data=REPEATED, learning_rate=0.01),
         "guided+queue": dict(mini_batch_size=4, negative_queue_size=18, data=REPEATED, learning_rate=0.01,
                              false_negative_margin=0.05, guide_model="guide")}
COMMON = dict(batch_size=12, max_steps=3, learning_rate=0.5, eval_data=None, progress=False, seed=5)


def tiny():
    return build_bert_from_scratch(TOKENIZER, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64,
                                   max_position_embeddings=128, dropout=0.0, seed=11)


def _use_sgd():
    torch.optim.AdamW = lambda groups, lr: torch.optim.SGD(groups, lr=lr)


def _save_guide(folder: Path) -> str:
    """The guide model of the guided case (another seed than the trained model), saved once."""
    from fastcse.training import save_checkpoint

    if not folder.exists():
        model, tok = build_bert_from_scratch(TOKENIZER, hidden_size=32, num_layers=1, num_heads=2,
                                             intermediate_size=64, max_position_embeddings=128, seed=12)
        save_checkpoint(folder, model, tok, {"eval_pooler": "avg"})
    return str(folder)


def _run(case, output_dir):
    model, tok = tiny()
    options = dict(CASES[case])
    if "guide_model" in options:  # beside the run folders: the ranks share it
        options["guide_model"] = _save_guide(Path(output_dir).parent / options["guide_model"])
    data = options.pop("data", SENTENCES)
    result = train((model, tok), data, output_dir=output_dir, **{**COMMON, **options})
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, result


def _worker(rank, world, port, results, root):
    import torch.distributed as dist

    reports = {}
    try:
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                                timeout=datetime.timedelta(seconds=60))
        _use_sgd()
        for case in CASES:
            state, result = _run(case, Path(root) / f"dist-{case}")
            # Through a file: tensors put on a queue live in shared memory that dies with the process.
            weights_file = Path(root) / f"rank{rank}-{case}.pt"
            torch.save(state, weights_file)
            reports[case] = (str(weights_file), result.to_dict())
        dist.destroy_process_group()
        results.put((rank, (reports, None)))
    except Exception:  # a crash is a failure to report, not a hang of the parent
        results.put((rank, (None, traceback.format_exc())))


def _run_world(root):
    reports = spawn_world(_worker, WORLD, str(root), timeout_s=SPAWN_TIMEOUT_S)
    errors = [f"rank {rank} crashed:\n{error}" for rank, (_, error) in sorted(reports.items()) if error]
    assert not errors, "\n\n".join(errors)
    return {rank: report for rank, (report, _) in reports.items()}


@pytest.fixture(scope="module")
def distributed_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    _save_guide(root / "guide")  # before the ranks start: they would both write it
    return _run_world(root)


@pytest.mark.parametrize("case", list(CASES))
def test_two_processes_equal_one_process(case, distributed_runs, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.optim, "AdamW", lambda groups, lr: torch.optim.SGD(groups, lr=lr))
    single, single_result = _run(case, tmp_path / "single")
    start = tiny()[0].state_dict()
    single_losses = [json.loads(x)["loss"] for x in open(single_result.metrics_path, encoding="utf-8")]
    moved = 0
    for rank in range(WORLD):
        weights_file, result = distributed_runs[rank][case]
        state = torch.load(weights_file, weights_only=True)
        assert result["steps"] == COMMON["max_steps"]  # the result is returned on every rank
        assert result["model_path"] == str(Path(result["output_dir"]) / "last")
        for name in single:
            torch.testing.assert_close(state[name], single[name], rtol=1e-5, atol=1e-5,
                                       msg=lambda m, n=name, r=rank: f"rank {r} {n}: {m}")
            moved += rank == 0 and not torch.equal(single[name], start[name])
    assert moved > 10  # trained weights are compared, not two copies of the start
    # Rank 0 wrote the metrics (the global loss, as one process computes it) and the checkpoint.
    out = Path(distributed_runs[0][case][1]["output_dir"])
    losses = [json.loads(x)["loss"] for x in open(out / "metrics.jsonl", encoding="utf-8")]
    assert losses == pytest.approx(single_losses, rel=1e-5)
    from safetensors.torch import load_file

    saved = load_file(str(out / "last" / "model.safetensors"))
    torch.testing.assert_close(saved["pooler.dense.weight"], single["pooler.dense.weight"], rtol=1e-5, atol=1e-5)
    assert not any(name.startswith(".") for name in os.listdir(out))  # no temporary folders left


@pytest.mark.slow
def test_torchrun_cli_runs_a_few_steps(tmp_path):
    """``torchrun --standalone --nproc_per_node=2 -m fastcse train ...`` from scratch, evaluated by rank 0."""
    data = tmp_path / "sentences.txt"
    data.write_text("\n".join(SENTENCES) + "\n", encoding="utf-8")
    src = (SHARED / "data" / "sts-raw" / "STSB" / "dev.tsv").read_text(encoding="utf-8").splitlines()
    dev = tmp_path / "dev40.tsv"
    dev.write_text("\n".join(src[:41]) + "\n", encoding="utf-8")
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "fastcse", "train", "--model", str(TOKENIZER), "--from-scratch",
                          "--scratch-hidden-size", "64", "--scratch-layers", "1", "--data", str(data),
                          "--batch-size", "8", "--mini-batch-size", "2", "--max-steps", "3", "--eval-data", str(dev),
                          "--eval-steps", "2",
                          "--no-progress", "--output-dir", str(tmp_path / "run")],
                         cwd=root, env=env, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stdout + out.stderr
    # One run over 2 processes (train() joins torchrun's group), logged once, by rank 0.
    assert out.stderr.count("training unsup SimCSE") == 1 and "batch 8 over 2 processes (4 each)" in out.stderr, \
        out.stderr
    # The result is printed once, by rank 0 (every rank returns it; the CLI prints on rank 0 only).
    best = [line for line in out.stdout.splitlines() if line.startswith("best ")]
    assert len(best) == 1, out.stdout
    assert out.stdout.count(f"saved model: {tmp_path / 'run' / 'best'}") == 1, out.stdout
    records = [json.loads(x) for x in open(tmp_path / "run" / "metrics.jsonl", encoding="utf-8")]
    # written once, by rank 0: evaluations before training, at step 2 and at the end
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]
    assert [r["step"] for r in records if "eval" in r] == [0, 2, 3]
    assert (tmp_path / "run" / "best" / "model.safetensors").is_file()
    assert (tmp_path / "run" / "last" / "trainer_state.pt").is_file()
