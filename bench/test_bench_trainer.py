"""Trainer step speed and peak memory against sentence-transformers 6, side by side in one run.

    pytest bench/test_bench_trainer.py --benchmark-only -s

Every configuration trains in a fresh subprocess (scripts/trainer_bench_worker.py): its peak
RSS is its own and no implementation warms another's caches. The rounds alternate (every
configuration once, then every configuration again), so a change in the machine's load hits all
of them alike; the table gives the min and the median over the rounds of each run's median step.
Same model (all-MiniLM-L6-v2), examples, batches, sequence length 32, mean pooling, temperature
0.05 / scale 20, AdamW and clipping for every implementation.

Groups: unsupervised SimCSE on mixed-104k and supervised SimCSE on the SNLI triples at batch 64
(plain; gradient caching with mini-batch 16; with a token budget), and a large-batch group
(B = 4096 with gradient caching, unsupervised). fastcse's ``mini_batch_size`` counts examples
(2 or 3 sequences each) where sentence-transformers' counts rows of one column; the token
budget (fastcse ``mini_batch_tokens``, sentence-transformers ``mini_batch_num_tokens``) bounds
the real tokens of one forward in both.

Settings: FASTCSE_BENCH_STEPS (6 steps a run, the first 2 not timed), FASTCSE_BENCH_ROUNDS (2),
FASTCSE_BENCH_TOKENS (512), FASTCSE_BENCH_LARGE (4096; 0 skips the group),
FASTCSE_BENCH_ENCODINGS (also time these fastcse encodings at batch 64, e.g. "sorted,padded").
"""

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import QUICK, side_by_side_fixture

WORKER = Path(__file__).resolve().parents[1] / "scripts" / "trainer_bench_worker.py"
BATCH = 8 if QUICK else 64
STEPS = int(os.environ.get("FASTCSE_BENCH_STEPS", "3" if QUICK else "6"))
WARMUP = 1 if QUICK else 2
ROUNDS = int(os.environ.get("FASTCSE_BENCH_ROUNDS", "1" if QUICK else "2"))
MINI = 4 if QUICK else 16
TOKENS = int(os.environ.get("FASTCSE_BENCH_TOKENS", "64" if QUICK else "512"))
LARGE = int(os.environ.get("FASTCSE_BENCH_LARGE", "16" if QUICK else "4096"))
EXTRA_ENCODINGS = [e for e in os.environ.get("FASTCSE_BENCH_ENCODINGS", "").split(",") if e]


def _batch_configs(mode: str) -> list[tuple[str, str, list[str]]]:
    group, common = f"{mode}, batch {BATCH}", ["--mode", mode, "--batch-size", str(BATCH)]
    rows = [("fastcse", ["--impl", "fastcse"])]
    rows += [(f"fastcse encoding={e}", ["--impl", "fastcse", "--encoding", e]) for e in EXTRA_ENCODINGS]
    rows += [("st MNRL", ["--impl", "st-mnrl"]),
             (f"fastcse mini_batch_size={MINI}", ["--impl", "fastcse", "--mini-batch-size", str(MINI)]),
             (f"st CachedMNRL mini_batch_size={MINI}", ["--impl", "st-cached-mnrl", "--mini-batch-size", str(MINI)]),
             (f"fastcse mini_batch_tokens={TOKENS}", ["--impl", "fastcse", "--mini-batch-tokens", str(TOKENS)]),
             (f"st CachedMNRL mini_batch_num_tokens={TOKENS}",
              ["--impl", "st-cached-mnrl", "--mini-batch-size", str(BATCH), "--mini-batch-tokens", str(TOKENS)])]
    return [(group, name, args + common) for name, args in rows]


def _large_batch_configs() -> list[tuple[str, str, list[str]]]:
    """B = LARGE with gradient caching: one step each, timed whole (a step takes minutes; the
    one-time costs the batch-64 runs leave untimed are seconds of it), in the first round only."""
    group = f"unsup, batch {LARGE}, gradient caching"
    common = ["--mode", "unsup", "--batch-size", str(LARGE), "--steps", "1", "--warmup", "0"]
    rows = [(f"fastcse mini_batch_tokens={TOKENS}", ["--impl", "fastcse", "--mini-batch-tokens", str(TOKENS)]),
            (f"st CachedMNRL mini_batch_num_tokens={TOKENS}",
             ["--impl", "st-cached-mnrl", "--mini-batch-size", str(LARGE), "--mini-batch-tokens", str(TOKENS)])]
    return [(group, name, args + common) for name, args in rows]


def _configs():
    """(group, name, worker arguments), in the order one round runs them."""
    return _batch_configs("unsup") + _batch_configs("sup") + (_large_batch_configs() if LARGE else [])


LARGE_GROUP_SUFFIX = "gradient caching"


CONFIGS = _configs()
RESULTS: dict[tuple[str, str], list[dict]] = {}


def run_worker(args: list[str]) -> dict:
    cmd = [sys.executable, str(WORKER), "--steps", str(STEPS), "--warmup", str(WARMUP)] + args  # later ones win
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    env.pop("TRITON_INTERPRET", None)  # the CPU path; the interpreter only matters for Triton kernels
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=7200)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


CASES = [(r, g, n, a) for r in range(ROUNDS) for g, n, a in CONFIGS if r == 0 or not g.endswith(LARGE_GROUP_SUFFIX)]


@pytest.mark.parametrize("round_, group, name, args", CASES, ids=[f"r{r}-{g}-{n}" for r, g, n, _ in CASES])
def test_trainer_step(benchmark, round_, group, name, args):
    benchmark.group = f"trainer: MiniLM-L6, seq 32, {group}"
    result = benchmark.pedantic(run_worker, args=(args,), rounds=1, iterations=1)
    assert result["sentences_per_second"] > 0 and result["max_rss_mb"] > 0
    benchmark.extra_info.update(result)
    RESULTS.setdefault((group, name), []).append(result)


def summary_rows() -> list[dict]:
    rows = []
    for (group, name), runs in RESULTS.items():
        steps = [r["seconds_per_step"] for r in runs]
        rows.append({"group": group, "implementation": name, "rounds": len(runs), "min_s_per_step": min(steps),
                     "median_s_per_step": statistics.median(steps),
                     "sentences_per_second": runs[0]["sequences_per_step"] / statistics.median(steps),
                     "max_rss_mb": max(r["max_rss_mb"] for r in runs)})
    return rows


def print_rows(rows: list[dict]) -> None:
    print(f"\nSimCSE training step, all-MiniLM-L6-v2, seq 32, {ROUNDS} round(s) of {STEPS} steps ({WARMUP} untimed)")
    print(f"{'group':<36} {'implementation':<44} {'seq/s':>7} {'s/step min':>10} {'median':>7} {'peak RSS MB':>11}")
    for r in rows:
        print(f"{r['group']:<36} {r['implementation']:<44} {r['sentences_per_second']:7.1f} "
              f"{r['min_s_per_step']:10.2f} {r['median_s_per_step']:7.2f} {r['max_rss_mb']:11.0f}")


print_side_by_side = side_by_side_fixture(RESULTS, summary_rows, print_rows)
