"""Time overhead of gradient caching against the uncached step, on the same batch.

    python scripts/gradcache_overhead.py --batch-size 64 --mini-batch-size 16 --repeats 5
    python scripts/gradcache_overhead.py --scratch   # a 4-layer / 256-wide BERT instead of MiniLM

Theory: the cached step runs one extra forward (the no-graph pass), so with backward ~2x forward
it costs about (1 + 1 + 2) / (1 + 2) = 1.33x the uncached step. Steps alternate between the two
variants so drifting machine load hits both alike; both wall time and process CPU time are
reported (CPU time is the steadier one on a shared machine). Unsupervised SimCSE step: the batch
encoded twice (two dropout views), fastcse.info_nce, backward; no optimizer step.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import fastcse  # noqa: E402
from fastcse.data import load_unsup  # noqa: E402
from fastcse.evaluation import load_model, shared_dir  # noqa: E402
from fastcse.gradcache import cached_step, split_chunks, uncached_step  # noqa: E402
from fastcse.pooling import pool  # noqa: E402
from fastcse.training import build_bert_from_scratch  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--mini-batch-size", type=int, default=16)
    p.add_argument("--max-seq-length", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--scratch", action="store_true", help="a from-scratch 4x256 BERT instead of all-MiniLM-L6-v2")
    args = p.parse_args(argv)
    minilm = shared_dir() / "models" / "all-MiniLM-L6-v2"
    model, tok = (build_bert_from_scratch(minilm, hidden_size=256, num_layers=4, num_heads=4) if args.scratch
                  else load_model(str(minilm)))
    model.train()
    sentences = load_unsup(shared_dir() / "data" / "unsup" / "wiki1m-prefix.txt")[: args.batch_size]

    def tokenize(rows):
        x = tok(list(rows), padding=True, truncation=True, max_length=args.max_seq_length, return_tensors="pt")
        return {k: v.repeat_interleave(2, dim=0) for k, v in x.items()}

    def encode(inputs):
        emb = pool(model, inputs, "avg", use_mlp=True)
        return emb.view(-1, 2, emb.shape[-1])

    def loss_fn(emb):
        return fastcse.info_nce(emb[:, 0], emb[:, 1], temperature=0.05)

    full = [tokenize(sentences)]
    chunks = [tokenize(c) for c in split_chunks(sentences, args.mini_batch_size)]

    def forward_only():
        with torch.no_grad():
            for c in chunks:
                encode(c)

    variants = {"uncached": lambda: uncached_step(encode, full, loss_fn),
                "cached": lambda: cached_step(encode, chunks, loss_fn),
                "no-graph forward": forward_only}
    for run in variants.values():  # warm up
        run()
        model.zero_grad(set_to_none=True)
    wall = {k: [] for k in variants}
    cpu = {k: [] for k in variants}
    for _ in range(args.repeats):
        for name, run in variants.items():
            w0, c0 = time.perf_counter(), time.process_time()
            run()
            wall[name].append(time.perf_counter() - w0)
            cpu[name].append(time.process_time() - c0)
            model.zero_grad(set_to_none=True)
    med = {k: (statistics.median(wall[k]), statistics.median(cpu[k])) for k in variants}
    report = {"model": "scratch-4x256" if args.scratch else "all-MiniLM-L6-v2", "batch_size": args.batch_size,
              "mini_batch_size": args.mini_batch_size, "max_seq_length": args.max_seq_length,
              "repeats": args.repeats, "threads": torch.get_num_threads(),
              "median_wall_s": {k: v[0] for k, v in med.items()}, "median_cpu_s": {k: v[1] for k, v in med.items()},
              "cached_over_uncached_wall": med["cached"][0] / med["uncached"][0],
              "cached_over_uncached_cpu": med["cached"][1] / med["uncached"][1],
              "predicted_ratio_cpu": (med["uncached"][1] + med["no-graph forward"][1]) / med["uncached"][1]}
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
