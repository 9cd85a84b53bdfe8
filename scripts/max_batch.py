"""The largest effective batch that trains in a memory budget, with gradient caching and without.

    python scripts/max_batch.py --budget-gib 24 --batches 16 32 64 --mini-batch-size 16

Runs a short fastcse training (unsup SimCSE, all-MiniLM-L6-v2, seq 32) in a fresh process per
batch size and records its peak RSS. Peak memory grows linearly in the batch (activations without
caching; only the [B, 2, d] embeddings and the loss's blocks with it), so the two largest
measured points give the slope and the budget gives the largest batch. It extrapolates instead
of allocating up to the budget, because this machine is shared: say so when quoting the number.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

WORKER = Path(__file__).resolve().parent / "trainer_bench_worker.py"


def peak_mb(batch: int, mini: int | None, steps: int, seq: int) -> dict:
    cmd = [sys.executable, str(WORKER), "--impl", "fastcse", "--batch-size", str(batch), "--steps", str(steps),
           "--max-seq-length", str(seq)]
    if mini:
        cmd += ["--mini-batch-size", str(mini)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=7200)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


NOISE_MB = 50  # run-to-run spread of a process's max RSS here (allocator, thread pools)


def extrapolate(points: list[tuple[int, float]], budget_mb: float, multiple: int = 1) -> int | None:
    """Largest batch whose linearly extrapolated peak stays within the budget; None when the peak
    did not grow beyond measurement noise over the measured range (no slope to extrapolate)."""
    (b1, m1), (b2, m2) = sorted(points)[-2:]
    if m2 - m1 < NOISE_MB:
        return None
    slope = (m2 - m1) / (b2 - b1)
    largest = int(b2 + (budget_mb - m2) / slope)
    return largest // multiple * multiple


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget-gib", type=float, default=24.0)
    p.add_argument("--batches", type=int, nargs="+", default=[16, 32, 64])
    p.add_argument("--mini-batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--max-seq-length", type=int, default=32)
    args = p.parse_args(argv)
    if len(args.batches) < 2:
        p.error("--batches needs at least two sizes to fit the growth")
    budget_mb = args.budget_gib * 1024
    rows = {"uncached": [], "cached": []}
    for batch in args.batches:
        for kind, mini in (("uncached", None), ("cached", args.mini_batch_size)):
            if mini and mini >= batch:
                continue
            r = peak_mb(batch, mini, args.steps, args.max_seq_length)
            rows[kind].append((batch, r["max_rss_mb"]))
            print(f"{kind:<9} batch {batch:>6}: peak RSS {r['max_rss_mb']:8.0f} MB, {r['seconds_per_step']:.1f} s/step",
                  flush=True)
    summary = {}
    for kind, points in rows.items():
        if len(points) >= 2:
            summary[kind] = extrapolate(points, budget_mb, args.mini_batch_size if kind == "cached" else 1)
            if summary[kind] is None:
                print(f"{kind}: peak memory did not grow beyond {NOISE_MB} MB over batches "
                      f"{[b for b, _ in points]}: measure larger batches to find the limit")
            else:
                print(f"{kind}: largest batch within {args.budget_gib:g} GiB (linear extrapolation) ~ {summary[kind]}")
    print(json.dumps({"budget_gib": args.budget_gib, "points": rows, "largest_batch": summary}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
