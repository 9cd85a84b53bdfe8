"""False negatives by similarity: fastcse's self-guided and guided rule vs its plain call vs
GISTEmbedLoss's math vs CachedGISTEmbedLoss.

    pytest bench/test_bench_false_negatives.py --benchmark-only -s   # FASTCSE_BENCH_JSON=out.json saves rows

Forward + backward on the same embeddings (bench/false_negative_workloads.py): B anchors, B
positives, one hard negative each, d = 768, fp32, CPU, directions query_to_doc + query_to_query
(GISTEmbedLoss with contrast_anchors=True, contrast_positives=False). Every measurement runs in
a fresh process (bench/memory.py: warm-up at a tiny size, then one timed run with its extra peak
RSS), and the rounds alternate (every implementation once, then again, the order reversed), so
a change of the machine's load hits all of them alike. ``x_plain`` is an implementation's time
over fastcse's plain call of the same round. Targets (the issue): self-guided <= 1.1x the plain
call, guided (a guide of the same width) <= 1.8x. gist_math is skipped where its materialized
matrices (about 12 x 4 B (3B) bytes) would not fit in 70% of the available memory.

Settings: FASTCSE_BENCH_FN_SIZES ("4096,16384"), FASTCSE_BENCH_ROUNDS (2), FASTCSE_BENCH_IMPLEMENTATIONS
(comma-separated labels, e.g. "plain,self_guided,guided,gist_math,cached_gist 256"), FASTCSE_BENCH_REPEATS (1).
"""

import os
import statistics

import pytest
from conftest import QUICK, by_implementation, measure_in_round, side_by_side_fixture, time_summary

pytest.importorskip("sentence_transformers")

SIZES = [int(b) for b in os.environ.get("FASTCSE_BENCH_FN_SIZES", "64" if QUICK else "4096,16384").split(",")]
DIM = 32 if QUICK else 768
ROUNDS = int(os.environ.get("FASTCSE_BENCH_ROUNDS", "1" if QUICK else "2"))
REPEATS = int(os.environ.get("FASTCSE_BENCH_REPEATS", "1"))
# (label, factory, keywords)
IMPLEMENTATIONS = [
    ("plain", "fastcse_loss", dict(rule="plain")),
    ("self_guided", "fastcse_loss", dict(rule="self_guided")),
    ("guided", "fastcse_loss", dict(rule="guided")),
    ("gist_math", "gist_math", {}),
    ("cached_gist 32", "cached_gist", dict(mini_batch_size=32)),
    ("cached_gist 256", "cached_gist", dict(mini_batch_size=256)),
]
if QUICK:
    IMPLEMENTATIONS = IMPLEMENTATIONS[:5]
if os.environ.get("FASTCSE_BENCH_IMPLEMENTATIONS"):
    _wanted = os.environ["FASTCSE_BENCH_IMPLEMENTATIONS"].split(",")
    IMPLEMENTATIONS = [i for i in IMPLEMENTATIONS if i[0] in _wanted]
# Implementations that compute the guided loss (the same value on the same embeddings).
GUIDED_LOSS = {"guided", "gist_math", "cached_gist 32", "cached_gist 256"}


def _order(round_: int):
    return IMPLEMENTATIONS if round_ % 2 == 0 else IMPLEMENTATIONS[::-1]


CASES = [(batch, r, label, factory, kwargs) for batch in SIZES for r in range(ROUNDS)
         for label, factory, kwargs in _order(r)]
RESULTS: dict[int, list[dict]] = {}


def _gist_math_fits(batch: int) -> bool:
    with open("/proc/meminfo") as f:
        available = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    return 12 * 4 * batch * 3 * batch <= 0.7 * available


@pytest.mark.parametrize("batch, round_, label, factory, kwargs", CASES,
                         ids=[f"B{b}-r{r}-{label}" for b, r, label, _, _ in CASES])
def test_false_negative_step(benchmark, batch, round_, label, factory, kwargs):
    benchmark.group = f"B={batch} d={DIM} k=1 false negatives"
    if label == "gist_math" and not _gist_math_fits(batch):
        pytest.skip("GISTEmbedLoss's materialized matrices would not fit in memory")
    result, same_round = measure_in_round(benchmark, RESULTS, batch, label, round_, "false_negative_workloads",
                                          factory, batch=batch, dim=DIM, repeats=REPEATS, **kwargs)
    if "plain" in same_round:
        for r in same_round.values():
            r["x_plain"] = round(r["seconds"] / same_round["plain"]["seconds"], 3)
        result["x_plain"] = same_round[label]["x_plain"]
    if label in GUIDED_LOSS and "guided" in same_round and "value" in result:
        # Same embeddings, same guide, same rule: the same loss.
        assert result["value"] == pytest.approx(same_round["guided"]["value"], rel=1e-4), (label, result)
    benchmark.extra_info.update(result, batch=batch)


def summary_rows() -> list[dict]:
    rows = []
    for batch, runs in RESULTS.items():
        for impl, rs in by_implementation(runs).items():
            row = dict(batch=batch, implementation=impl, **time_summary(rs, REPEATS))
            per_round = [r["x_plain"] for r in rs if "x_plain" in r]
            if per_round:
                row["x_plain_median"] = round(statistics.median(per_round), 3)
            rows.append(row)
    return rows


def print_rows(rows: list[dict]) -> None:
    print(f"\nfalse negatives by similarity, forward + backward, d={DIM}, one hard negative")
    print(f"{'B':>6} {'implementation':<18} {'min s':>8} {'median':>8} {'x plain':>8} {'peak MiB':>9}")
    for r in rows:
        print(f"{r['batch']:>6} {r['implementation']:<18} {r['min_s']:8.2f} {r['median_s']:8.2f} "
              f"{r.get('x_plain_median', float('nan')):8.2f} {r['extra_peak_mib']:9.0f}")


print_side_by_side = side_by_side_fixture(RESULTS, summary_rows, print_rows)
