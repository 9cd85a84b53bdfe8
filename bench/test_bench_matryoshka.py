"""Matryoshka in one pass: fastcse's fused call vs fastcse once per dimension vs one full-width
call vs sentence-transformers' MatryoshkaLoss(MNRL) and MatryoshkaLoss(CachedMNRL).

    pytest bench/test_bench_matryoshka.py --benchmark-only -s   # FASTCSE_BENCH_JSON=out.json saves rows

Forward + backward on the same embeddings (bench/matryoshka_workloads.py): B anchors, B
positives, one hard negative each, d = 768, dimensions 768/512/256/128/64 with weight 1, fp32,
CPU. Every measurement runs in a fresh process (bench/memory.py: warm-up at a tiny size, then one
timed run with its extra peak RSS), and the rounds alternate (every implementation once, then
again, the order rotated from round to round), so a change of the machine's load hits all of
them alike. The summary gives each implementation's time over the fused call's (median of the
per-round ratios) and the fused call's time and extra peak memory over one full-width call's.
MatryoshkaLoss(MNRL) is skipped where its materialized score matrices (about 5 x 4 B N bytes
per dimension, all alive until the backward) would not fit in 70% of the available memory.

The issue's targets at B=4096 (this CPU, quiet): fused <= 1.35x one full-width call, <= 0.5x
the per-dimension loop, >= 3.5x faster than MatryoshkaLoss(MNRL), extra peak memory <= 2x the
full-width call's.

Settings: FASTCSE_BENCH_MATRYOSHKA_SIZES ("4096"), FASTCSE_BENCH_ROUNDS (3), FASTCSE_BENCH_IMPLEMENTATIONS
(comma-separated labels, e.g. "fused,full width"), FASTCSE_BENCH_REPEATS (1: timed runs per
process; above 1 a measurement's time is the minimum of its process's runs).
"""

import os
import statistics

import pytest
from conftest import QUICK, by_implementation, measure_in_round, side_by_side_fixture, time_summary
from matryoshka_workloads import dims_for

pytest.importorskip("sentence_transformers")

SIZES = [int(b) for b in os.environ.get("FASTCSE_BENCH_MATRYOSHKA_SIZES", "64" if QUICK else "4096").split(",")]
DIM = 32 if QUICK else 768
ROUNDS = int(os.environ.get("FASTCSE_BENCH_ROUNDS", "1" if QUICK else "3"))
REPEATS = int(os.environ.get("FASTCSE_BENCH_REPEATS", "1"))
FUSED = "fused"
FULL_WIDTH = "full width"
# label -> (factory in matryoshka_workloads, its keywords)
IMPLEMENTATIONS = {
    FUSED: ("fastcse_fused", {}),
    "per dimension": ("fastcse_per_dimension", {}),
    FULL_WIDTH: ("fastcse_full_width", {}),
    "MatryoshkaLoss(MNRL)": ("matryoshka_mnrl", {}),
    "MatryoshkaLoss(CachedMNRL 32)": ("matryoshka_cached_mnrl", dict(mini_batch_size=32)),
    "MatryoshkaLoss(CachedMNRL 256)": ("matryoshka_cached_mnrl", dict(mini_batch_size=256)),
}
if os.environ.get("FASTCSE_BENCH_IMPLEMENTATIONS"):
    _wanted = os.environ["FASTCSE_BENCH_IMPLEMENTATIONS"].split(",")
    IMPLEMENTATIONS = {label: v for label, v in IMPLEMENTATIONS.items() if label in _wanted}
_LABELS = list(IMPLEMENTATIONS)


def _round_order(round_: int) -> list[str]:
    shift = round_ % len(_LABELS)
    return _LABELS[shift:] + _LABELS[:shift]


def _mnrl_fits(batch: int) -> bool:
    with open("/proc/meminfo") as f:
        available = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    return 5 * 4 * batch * (2 * batch) * len(dims_for(DIM)) <= 0.7 * available


CASES = [(batch, r, label) for batch in SIZES for r in range(ROUNDS) for label in _round_order(r)]
RESULTS: dict[int, list[dict]] = {}


@pytest.mark.parametrize("batch, round_, label", CASES, ids=[f"B{b}-r{r}-{label}" for b, r, label in CASES])
def test_matryoshka_step(benchmark, batch, round_, label):
    benchmark.group = f"B={batch} d={DIM} k=1 dims={'/'.join(map(str, dims_for(DIM)))}"
    if label == "MatryoshkaLoss(MNRL)" and not _mnrl_fits(batch):
        pytest.skip("MatryoshkaLoss(MNRL)'s materialized score matrices would not fit in memory")
    factory, options = IMPLEMENTATIONS[label]
    result, same_round = measure_in_round(benchmark, RESULTS, batch, label, round_, "matryoshka_workloads", factory,
                                          batch=batch, dim=DIM, repeats=REPEATS, **options)
    if label != FULL_WIDTH and FUSED in same_round and "value" in result:
        # Same embeddings, same dimensions: every Matryoshka implementation computes the same loss.
        assert result["value"] == pytest.approx(same_round[FUSED]["value"], rel=1e-4), (label, result)
    benchmark.extra_info.update(result, batch=batch, dims=dims_for(DIM))


def _per_round_ratio(runs: list[dict], label: str, over: str) -> float | None:
    """Median over the rounds holding both of label's seconds over ``over``'s."""
    by_round: dict[int, dict] = {}
    for r in runs:
        by_round.setdefault(r["round"], {})[r["implementation"]] = r["seconds"]
    ratios = [times[label] / times[over] for times in by_round.values() if label in times and over in times]
    return round(statistics.median(ratios), 3) if ratios else None


def summary_rows() -> list[dict]:
    rows = []
    for batch, runs in RESULTS.items():
        by_impl = by_implementation(runs)
        for label, rs in by_impl.items():
            row = dict(batch=batch, dim=DIM, dims=list(dims_for(DIM)), implementation=label,
                       **time_summary(rs, REPEATS), x_fused=_per_round_ratio(runs, label, FUSED))
            if label == FUSED and FULL_WIDTH in by_impl:
                row["x_full_width"] = _per_round_ratio(runs, FUSED, FULL_WIDTH)
                full_peak = max(r["extra_peak_mib"] for r in by_impl[FULL_WIDTH])
                row["memory_x_full_width"] = round(row["extra_peak_mib"] / full_peak, 3) if full_peak > 0 else None
            rows.append(row)
    return rows


def print_rows(rows: list[dict]) -> None:
    print(f"\nMatryoshka, forward + backward, d={DIM}, dims {dims_for(DIM)}, one hard negative")
    print(f"{'B':>6} {'implementation':<32} {'min s':>8} {'median':>8} {'x fused':>8} {'peak MiB':>9}")
    for r in rows:
        x_fused = r["x_fused"] if r["x_fused"] is not None else float("nan")
        print(f"{r['batch']:>6} {r['implementation']:<32} {r['min_s']:8.2f} {r['median_s']:8.2f} {x_fused:8.2f} "
              f"{r['extra_peak_mib']:9.0f}")
        if "x_full_width" in r:
            print(f"{'':>6} fused over one full-width call: time x{r['x_full_width']}, "
                  f"extra peak memory x{r['memory_x_full_width']}")


print_side_by_side = side_by_side_fixture(RESULTS, summary_rows, print_rows)
