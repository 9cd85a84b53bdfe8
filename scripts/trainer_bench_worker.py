"""One training configuration in a fresh process: prints one JSON line with its step times and
peak memory. Used by bench/test_bench_trainer.py and scripts/max_batch.py; each configuration
runs in its own process so that its peak memory is its own.

    python scripts/trainer_bench_worker.py --impl fastcse --mode unsup --batch-size 64 --steps 6
    python scripts/trainer_bench_worker.py --impl st-cached-mnrl --mode sup --mini-batch-tokens 512

Implementations, on the same examples, batches (fastcse's seeded order), model, sequence
length, mean pooling, temperature 0.05 (scale 20), AdamW (lr 3e-5) and gradient clipping at 1.0:
- fastcse: ``fastcse.train`` (``--mini-batch-size`` / ``--mini-batch-tokens``: gradient
  caching; ``--encoding``: packed, sorted, padded or auto).
- st-mnrl: sentence-transformers' MultipleNegativesRankingLoss, columns tokenized one by one
  as its data collator does (unsup: (sentence, sentence); sup: (sent0, sent1, hard_neg)).
- st-cached-mnrl: CachedMultipleNegativesRankingLoss with ``mini_batch_size`` and/or
  ``mini_batch_num_tokens``.
A step is timed from the tokenization of its batch to the end of the optimizer step. Reported:
the step times, their median over the steps after ``--warmup`` (which pay one-time costs),
sequences encoded per second at that median (2 per sentence unsup, 3 per triple sup), and the
peak resident memory of the process (VmHWM: a fresh exec starts its own high-water mark).
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

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from fastcse.data import batch_order, load_sup, load_unsup  # noqa: E402
from fastcse.evaluation import shared_dir  # noqa: E402

SEED = 42
LR = 3e-5


def examples_for(args) -> list:
    if args.mode == "unsup":
        return load_unsup(args.data or shared_dir() / "data" / "unsup" / "mixed-104k.txt")[
            : args.batch_size * (args.steps + 1) * 4]
    return load_sup(args.data or shared_dir() / "data" / "nli" / "snli-dev-triples.csv")


def sequences_per_example(args, examples) -> int:
    return 2 if args.mode == "unsup" else len(examples[0])


def run_fastcse(args, examples) -> list[float]:
    from fastcse.training import train

    with tempfile.TemporaryDirectory() as out:
        result = train(args.model, examples, mode=args.mode, batch_size=args.batch_size,
                       mini_batch_size=args.mini_batch_size, mini_batch_tokens=args.mini_batch_tokens,
                       encoding=args.encoding, pooler="avg", max_steps=args.steps, max_seq_length=args.max_seq_length,
                       eval_data=None, output_dir=out, seed=SEED, precision="fp32", progress=False, save_last=False,
                       learning_rate=LR)
        rows = [json.loads(line) for line in open(result.metrics_path, encoding="utf-8")]
    per_step = args.batch_size * sequences_per_example(args, examples)
    return [per_step / r["sentences_per_second"] for r in rows]


def run_st(args, examples, cached: bool) -> list[float]:
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.losses import CachedMultipleNegativesRankingLoss, MultipleNegativesRankingLoss

    torch.manual_seed(SEED)
    model = SentenceTransformer(str(args.model), device="cpu")
    model.max_seq_length = args.max_seq_length
    # all-MiniLM-L6-v2 ships a Normalize module; the loss takes cosine similarity anyway.
    if cached:
        loss_fn = CachedMultipleNegativesRankingLoss(model, scale=20.0, mini_batch_size=args.mini_batch_size or 32,
                                                     mini_batch_num_tokens=args.mini_batch_tokens)
    else:
        loss_fn = MultipleNegativesRankingLoss(model, scale=20.0)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    times = []
    for ids in batch_order(len(examples), args.batch_size, seed=SEED, epoch=0)[: args.steps]:
        t0 = time.perf_counter()
        if args.mode == "unsup":
            texts = [examples[i] for i in ids]
            columns = [texts, texts]  # the two dropout views: the same sentence in both columns
        else:
            columns = [list(col) for col in zip(*(examples[i] for i in ids))]
        features = [model.tokenize(column) for column in columns]
        loss = loss_fn(features, None)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return times


def peak_rss_mb() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--impl", choices=("fastcse", "st-mnrl", "st-cached-mnrl"), required=True)
    p.add_argument("--mode", choices=("unsup", "sup"), default="unsup")
    p.add_argument("--model", default=str(shared_dir() / "models" / "all-MiniLM-L6-v2"))
    p.add_argument("--data", default=None, help="default: mixed-104k.txt (unsup), the SNLI triples (sup)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--mini-batch-size", type=int, default=None)
    p.add_argument("--mini-batch-tokens", type=int, default=None)
    p.add_argument("--encoding", default="auto", help="fastcse only: auto, packed, sorted, padded")
    p.add_argument("--max-seq-length", type=int, default=32)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--warmup", type=int, default=1, help="first steps not timed (one-time costs)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    examples = examples_for(args)
    if args.impl == "fastcse":
        times = run_fastcse(args, examples)
    else:
        times = run_st(args, examples, cached=args.impl == "st-cached-mnrl")
    timed = times[args.warmup:] or times
    step = statistics.median(timed)
    print(json.dumps({
        "impl": args.impl, "mode": args.mode, "batch_size": args.batch_size, "mini_batch_size": args.mini_batch_size,
        "mini_batch_tokens": args.mini_batch_tokens, "encoding": args.encoding if args.impl == "fastcse" else None,
        "max_seq_length": args.max_seq_length, "steps": len(times), "seconds_per_step": step,
        "min_seconds_per_step": min(timed),
        "sequences_per_step": args.batch_size * sequences_per_example(args, examples),
        "sentences_per_second": args.batch_size * sequences_per_example(args, examples) / step,
        "step_seconds": [round(t, 3) for t in times], "max_rss_mb": peak_rss_mb(),
        "wall_seconds": time.perf_counter() - started, "threads": torch.get_num_threads(),
    }), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
