"""Benchmark settings. `pytest bench/` runs the full sizes (tens of minutes on 2 cores);
FASTCSE_BENCH_QUICK=1 shrinks every size so the benchmark code itself can be smoke-tested."""

import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pytest

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


def pedantic_cpu_seconds(benchmark, run, state, rounds: int) -> list[float]:
    """``benchmark.pedantic`` of ``run(state)``, one call a round; returns each round's process CPU
    seconds (comparable on a shared machine, where the wall time pytest-benchmark keeps is not)."""
    cpu_seconds = []

    def timed_run(state):
        start = time.process_time()
        run(state)
        cpu_seconds.append(time.process_time() - start)

    benchmark.pedantic(timed_run, args=(state,), rounds=rounds, iterations=1)
    return cpu_seconds


def measure_in_round(benchmark, results: dict, key, label: str, round_: int, module: str, factory: str,
                     **kwargs) -> tuple[dict, dict]:
    """Times ``module.factory(**kwargs)`` once in a fresh process (bench/memory.py), files it
    under ``results[key]`` with its label and round, and returns (its result, {label: result} of
    every implementation measured so far in the same round), for per-round ratios and checks."""
    from memory import measure_in_fresh_process

    result = benchmark.pedantic(measure_in_fresh_process, args=(module, factory), kwargs=kwargs,
                                rounds=1, iterations=1)
    results.setdefault(key, []).append(dict(result, implementation=label, round=round_))
    same_round = {r["implementation"]: r for r in results[key] if r["round"] == round_}
    return result, same_round


def by_implementation(runs: list[dict]) -> dict[str, list[dict]]:
    """The runs grouped by their "implementation" label, in first-seen order."""
    grouped: dict[str, list[dict]] = {}
    for r in runs:
        grouped.setdefault(r["implementation"], []).append(r)
    return grouped


def time_summary(runs: list[dict], repeats: int) -> dict:
    """One implementation's rounds: their count, the repeats per process, min and median seconds,
    and the largest extra peak memory."""
    seconds = [r["seconds"] for r in runs]
    return dict(rounds=len(runs), repeats=repeats, min_s=min(seconds), median_s=statistics.median(seconds),
                extra_peak_mib=max(r["extra_peak_mib"] for r in runs))


def side_by_side_fixture(results: dict, summary_rows, print_rows):
    """A module-scoped autouse fixture that, after the module's benchmarks, saves
    ``summary_rows()`` (save_summary) and prints them with ``print_rows``. A fixture, not a test:
    --benchmark-only skips plain tests."""

    @pytest.fixture(scope="module", autouse=True)
    def print_side_by_side():
        yield
        if not results:
            return
        rows = summary_rows()
        save_summary(rows)
        print_rows(rows)

    return print_side_by_side
