"""Benchmark settings. `pytest bench/` runs the full sizes (tens of minutes on 2 cores);
FASTCSE_BENCH_QUICK=1 shrinks every size so the benchmark code itself can be smoke-tested."""

import os
import sys
from pathlib import Path

QUICK = os.environ.get("FASTCSE_BENCH_QUICK") == "1"
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
