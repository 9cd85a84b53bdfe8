"""Benchmark settings. `pytest bench/` runs the full sizes (tens of minutes on 2 cores);
FASTCSE_BENCH_QUICK=1 shrinks every size so the benchmark code itself can be smoke-tested."""

import json
import os
import sys
import tempfile
from pathlib import Path

QUICK = os.environ.get("FASTCSE_BENCH_QUICK") == "1"
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))


def save_summary(rows: list[dict]) -> None:
    """Writes a benchmark module's summary rows to $FASTCSE_BENCH_JSON (if set), atomically."""
    out = os.environ.get("FASTCSE_BENCH_JSON")
    if not out:
        return
    out = Path(out)
    with tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=out.parent or ".", delete=False,
                                     suffix=".tmp") as f:
        f.write(json.dumps(rows, indent=1) + "\n")
    os.replace(f.name, out)
