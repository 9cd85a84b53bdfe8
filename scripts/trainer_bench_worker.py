"""One training configuration in a fresh process: prints one JSON line with its throughput
and peak memory (max RSS of this process). Used by bench/test_bench_trainer.py and
scripts/max_batch.py; each configuration runs in its own process so peak memory is its own.

    python scripts/trainer_bench_worker.py --impl fastcse --batch-size 64 --steps 4
    python scripts/trainer_bench_worker.py --impl st-cached-mnrl --batch-size 64 --mini-batch-size 16

Implementations, all unsupervised SimCSE on the same sentences, batches, model, sequence
length, mean pooling and temperature 0.05 (scale 20), AdamW, gradient clipping at 1.0:
- fastcse: ``fastcse.train`` (mini-batch given: gradient caching).
- st-mnrl: sentence-transformers' MultipleNegativesRankingLoss on (sentence, sentence) pairs.
- st-cached-mnrl: CachedMultipleNegativesRankingLoss with the same mini-batch.
Throughput is sequences encoded per second (2 per sentence: the two dropout views), the median
over the steps after the first (which pays one-time costs).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from fastcse.data import batch_order, load_unsup  # noqa: E402
from fastcse.evaluation import shared_dir  # noqa: E402

SEED = 42


def sentences_for(args) -> list[str]:
    return load_unsup(args.data)[: args.batch_size * (args.steps + 1) * 4]


def run_fastcse(args) -> list[float]:
    from fastcse.trainer import train

    with tempfile.TemporaryDirectory() as out:
        result = train(args.model, sentences_for(args), batch_size=args.batch_size, mini_batch_size=args.mini_batch_size,
                       pooler="avg", max_steps=args.steps, max_seq_length=args.max_seq_length, eval_data=None,
                       output_dir=out, seed=SEED, precision="fp32", progress=False, save_last=False,
                       learning_rate=3e-5)
        rows = [json.loads(line) for line in open(result.metrics_path, encoding="utf-8")]
    return [2 * args.batch_size / r["sentences_per_second"] for r in rows]  # seconds per step


def run_st(args, cached: bool) -> list[float]:
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.losses import CachedMultipleNegativesRankingLoss, MultipleNegativesRankingLoss

    torch.manual_seed(SEED)
    model = SentenceTransformer(str(args.model), device="cpu")
    model.max_seq_length = args.max_seq_length
    # all-MiniLM-L6-v2 ships a Normalize module; the loss takes cosine similarity anyway.
    loss_fn = (CachedMultipleNegativesRankingLoss(model, scale=20.0, mini_batch_size=args.mini_batch_size or 32)
               if cached else MultipleNegativesRankingLoss(model, scale=20.0))
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-5, weight_decay=0.0)
    sentences = sentences_for(args)
    times = []
    for ids in batch_order(len(sentences), args.batch_size, seed=SEED, epoch=0)[: args.steps]:
        texts = [sentences[i] for i in ids]
        t0 = time.perf_counter()
        anchors, positives = model.tokenize(texts), model.tokenize(texts)
        loss = loss_fn([anchors, positives], None)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return times


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--impl", choices=("fastcse", "st-mnrl", "st-cached-mnrl"), required=True)
    p.add_argument("--model", default=str(shared_dir() / "models" / "all-MiniLM-L6-v2"))
    p.add_argument("--data", default=str(shared_dir() / "data" / "unsup" / "mixed-104k.txt"))
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--mini-batch-size", type=int, default=None)
    p.add_argument("--max-seq-length", type=int, default=32)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    if args.impl == "fastcse":
        times = run_fastcse(args)
    else:
        times = run_st(args, cached=args.impl == "st-cached-mnrl")
    timed = times[1:] or times
    step = statistics.median(timed)
    print(json.dumps({
        "impl": args.impl, "batch_size": args.batch_size, "mini_batch_size": args.mini_batch_size,
        "max_seq_length": args.max_seq_length, "steps": len(times), "seconds_per_step": step,
        "sentences_per_second": 2 * args.batch_size / step,
        "step_seconds": [round(t, 3) for t in times],
        "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "wall_seconds": time.perf_counter() - started, "threads": torch.get_num_threads(),
    }), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
