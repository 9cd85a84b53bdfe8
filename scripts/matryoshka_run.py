"""Is Matryoshka worth having? The same unsupervised SimCSE run with and without it, scored truncated.

    nice python scripts/matryoshka_run.py                      # ~5-10 min on 2 CPU cores
    python scripts/matryoshka_run.py --max-steps 2 --batch-size 8 --eval-pairs 40 --output /tmp/m.json  # a smoke run

all-MiniLM-L6-v2 (384 dims, mean pooling, as it was trained), unsupervised SimCSE on
<shared>/data/unsup/mixed-104k.txt: two runs with the same seed, data order, dropout masks, steps
and settings, one with the plain loss and one with ``matryoshka_dims=(384, 256, 128, 64)``
(weights 1 each). Each final model, and the starting model, is scored on STS-B dev (Spearman x
100 of cosine) at 384, 256, 128 and 64 dimensions (the first m coordinates of the pooled
embedding: ``SentenceTransformer(path, truncate_dim=m)``). Also the time per step of both runs
(the loss's share of a step is small next to the encoder's: Matryoshka adds elementwise passes
per dimension over the loss's score blocks, not an encoder pass). Runs on the CPU (the device
of the machine this was written on; time it on a quiet machine). Writes a JSON (default
docs/matryoshka_run.json) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fastcse.evaluation import evaluate_loaded, load_task, shared_dir  # noqa: E402
from fastcse.training import train  # noqa: E402
from fastcse.training.checkpoints import write_json  # noqa: E402

DIMS = (384, 256, 128, 64)
TASK = "STSBenchmark-dev"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--max-steps", type=int, default=60, help="steps of each run (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=64, help="(default: %(default)s)")
    p.add_argument("--max-seq-length", type=int, default=32, help="(default: %(default)s)")
    p.add_argument("--learning-rate", type=float, default=3e-5, help="SimCSE's unsup rate (default: %(default)s)")
    p.add_argument("--seed", type=int, default=42, help="(default: %(default)s)")
    p.add_argument("--eval-pairs", type=int, default=None,
                   help="score only the first N STS-B dev pairs (a smoke run; default: all 1500)")
    p.add_argument("--work-dir", default=None, help="where the runs' folders go (default: a temporary folder)")
    p.add_argument("--output", default=str(Path(__file__).resolve().parents[1] / "docs" / "matryoshka_run.json"),
                   help="the JSON written (default: %(default)s)")
    return p.parse_args(argv)


def eval_task(eval_pairs: int | None, work_dir: Path) -> str:
    """STS-B dev, or a pair file of its first ``eval_pairs`` pairs."""
    if eval_pairs is None:
        return TASK
    first, second, gold = load_task(TASK)
    path = work_dir / f"stsb-dev-{eval_pairs}.tsv"
    rows = zip(first[:eval_pairs], second[:eval_pairs], gold[:eval_pairs])
    path.write_text("sentence1\tsentence2\tscore\n" + "".join(f"{a}\t{b}\t{s}\n" for a, b, s in rows),
                    encoding="utf-8")
    return str(path)


def scores_by_dim(model, tokenizer, task: str) -> dict[str, float]:
    """{"384": ..., "256": ..., ...}: the task's score at each dimension."""
    scores = evaluate_loaded(model, tokenizer, [task], pooler="avg", truncate_dims=DIMS)
    name = next(iter(scores))
    return {str(dim): scores[f"{name}@{dim}"] for dim in DIMS}


def run(name: str, args, task: str, work_dir: Path, matryoshka_dims) -> dict:
    from transformers import AutoModel, AutoTokenizer

    minilm = shared_dir() / "models" / "all-MiniLM-L6-v2"
    model, tokenizer = AutoModel.from_pretrained(str(minilm)), AutoTokenizer.from_pretrained(str(minilm))
    started = time.perf_counter()
    result = train((model, tokenizer), shared_dir() / "data" / "unsup" / "mixed-104k.txt", mode="unsup",
                   pooler="avg", batch_size=args.batch_size, max_steps=args.max_steps,
                   max_seq_length=args.max_seq_length, learning_rate=args.learning_rate, seed=args.seed,
                   matryoshka_dims=matryoshka_dims, eval_data=None, device="cpu", precision="fp32",
                   output_dir=work_dir / name, overwrite_output_dir=True, save_steps=None, progress=False)
    wall = time.perf_counter() - started
    sentences = 2 * args.batch_size  # two dropout views a sentence
    records = [json.loads(line) for line in open(result.metrics_path, encoding="utf-8")]
    seconds = [sentences / r["sentences_per_second"] for r in records if "loss" in r]
    steady = seconds[1:] or seconds  # the first step also warms up the allocator and the thread pool
    return {"matryoshka_dims": list(matryoshka_dims) if matryoshka_dims else None,
            "sts_b_dev": scores_by_dim(model, tokenizer, task),
            "seconds_per_step_median": statistics.median(steady), "seconds_per_step_mean": statistics.fmean(steady),
            "train_seconds": result.train_seconds, "wall_seconds": wall,
            "final_loss": next(r["loss"] for r in reversed(records) if "loss" in r)}


def main(argv=None) -> int:
    args = parse_args(argv)
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # its loading and saving bars would bury the table

    with tempfile.TemporaryDirectory(prefix="matryoshka-run-") as tmp:
        work_dir = Path(args.work_dir or tmp)
        work_dir.mkdir(parents=True, exist_ok=True)
        task = eval_task(args.eval_pairs, work_dir)
        minilm = shared_dir() / "models" / "all-MiniLM-L6-v2"
        before = scores_by_dim(AutoModel.from_pretrained(str(minilm)), AutoTokenizer.from_pretrained(str(minilm)),
                               task)
        runs = {"plain": run("plain", args, task, work_dir, None),
                "matryoshka": run("matryoshka", args, task, work_dir, DIMS)}
    report = {"model": "all-MiniLM-L6-v2", "mode": "unsup", "data": "mixed-104k.txt", "pooler": "avg",
              "steps": args.max_steps, "batch_size": args.batch_size, "max_seq_length": args.max_seq_length,
              "learning_rate": args.learning_rate, "seed": args.seed, "dims": list(DIMS),
              "eval": TASK if args.eval_pairs is None else f"{TASK}, first {args.eval_pairs} pairs",
              "threads": torch.get_num_threads(), "before": before, **runs}
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    write_json(output, report)
    print_table(report)
    print(f"wrote {output}")
    return 0


def print_table(report: dict) -> None:
    print(f"STS-B dev Spearman x 100 by dimension ({report['steps']} steps of batch {report['batch_size']})")
    print(f"{'':<12}" + "".join(f"{dim:>9}" for dim in DIMS) + f"{'s/step':>9}")
    rows = [("before", report["before"], None)] + [
        (name, report[name]["sts_b_dev"], report[name]["seconds_per_step_median"]) for name in ("plain", "matryoshka")]
    for name, scores, seconds in rows:
        print(f"{name:<12}" + "".join(f"{scores[str(dim)]:9.2f}" for dim in DIMS)
              + (f"{seconds:9.3f}" if seconds is not None else ""))


if __name__ == "__main__":
    sys.exit(main())
