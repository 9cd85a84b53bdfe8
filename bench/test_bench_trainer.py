"""Trainer throughput and peak memory against sentence-transformers, side by side in one run.

    pytest bench/test_bench_trainer.py --benchmark-only -s

Each configuration trains in a fresh subprocess (scripts/trainer_bench_worker.py) so its max
RSS is its own peak memory. Same model (all-MiniLM-L6-v2), sentences, batches, sequence length,
mean pooling, temperature 0.05 / scale 20, AdamW and clipping for every implementation.
Throughput is sequences encoded per second (two dropout views per sentence), median over the
steps after the first. The benchmark's own time is the subprocess's wall time, model loading
included; the numbers to compare are in extra_info and in the table printed at the end.

Settings: FASTCSE_BENCH_BATCH (64), FASTCSE_BENCH_MINI (16), FASTCSE_BENCH_SEQ (32),
FASTCSE_BENCH_STEPS (4), FASTCSE_BENCH_THREADS (torch's default).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).resolve().parents[1] / "scripts" / "trainer_bench_worker.py"
BATCH = int(os.environ.get("FASTCSE_BENCH_BATCH", "64"))
MINI = int(os.environ.get("FASTCSE_BENCH_MINI", "16"))
SEQ = int(os.environ.get("FASTCSE_BENCH_SEQ", "32"))
STEPS = int(os.environ.get("FASTCSE_BENCH_STEPS", "4"))
THREADS = os.environ.get("FASTCSE_BENCH_THREADS")

CONFIGS = [
    ("fastcse", None),
    ("fastcse", MINI),
    ("st-mnrl", None),
    ("st-cached-mnrl", MINI),
]
RESULTS: dict[str, dict] = {}


def run_worker(impl: str, mini: int | None) -> dict:
    cmd = [sys.executable, str(WORKER), "--impl", impl, "--batch-size", str(BATCH), "--max-seq-length", str(SEQ),
           "--steps", str(STEPS)]
    if mini:
        cmd += ["--mini-batch-size", str(mini)]
    if THREADS:
        cmd += ["--threads", THREADS]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    env.pop("TRITON_INTERPRET", None)  # the CPU path; the interpreter only matters for Triton kernels
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("impl, mini", CONFIGS, ids=[f"{i}-mini{m}" if m else i for i, m in CONFIGS])
def test_trainer_throughput_and_peak_memory(benchmark, impl, mini):
    benchmark.group = f"trainer: MiniLM-L6, batch {BATCH}, seq {SEQ}"
    result = benchmark.pedantic(run_worker, args=(impl, mini), rounds=1, iterations=1)
    assert result["sentences_per_second"] > 0 and result["max_rss_mb"] > 0
    benchmark.extra_info.update(result)
    RESULTS[f"{impl}{f' (mini {mini})' if mini else ''}"] = result


@pytest.fixture(scope="module", autouse=True)
def print_side_by_side():
    """After the module's benchmarks (a fixture, not a test: --benchmark-only skips plain tests)."""
    yield
    if not RESULTS:
        return
    print(f"\nunsup SimCSE training step, all-MiniLM-L6-v2, batch {BATCH}, seq {SEQ}, {STEPS} steps "
          f"(median of steps 2..{STEPS})")
    print(f"{'implementation':<32} {'seq/s':>8} {'s/step':>8} {'max RSS MB':>11}")
    for name, r in RESULTS.items():
        print(f"{name:<32} {r['sentences_per_second']:8.1f} {r['seconds_per_step']:8.2f} {r['max_rss_mb']:11.0f}")
