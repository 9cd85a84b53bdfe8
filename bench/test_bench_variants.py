"""sentence-transformers 6's loss variants: fastcse.info_nce vs MNRL vs CachedMNRL vs the floor.

    pytest bench/test_bench_variants.py --benchmark-only -s   # FASTCSE_BENCH_JSON=out.json saves rows

Forward + backward of each variant (bench/variant_workloads.py) on the same embeddings: B
anchors, B positives, one hard negative each (N = 2B candidates), d = 768, fp32, CPU.
Every measurement runs in a fresh process (bench/memory.py: warm-up at a tiny size, then one
timed run with its extra peak RSS), and the rounds alternate (every implementation of a group
once, then again), so a change of the machine's load hits all of them alike. ``x_floor`` is the
time over the floor of the same round: fastcse's own matrix products (``fastcse.cpu.
matrix_products``) as bare matmuls. MNRL is skipped where its materialized score matrices
(about 5 x 4 B sum(n) bytes) would not fit in 70% of the available memory.

The options only fastcse has (``group_ids`` with every id 4 times; a queue of
Q = 65536 extra negatives) run beside the floor of their own products and the same call without
the option ("fastcse plain call"), the two alternating their order from round to round;
``x_plain`` is the option's time over the plain call's of the same round (the summary: the
median of those ratios, and the ratio of the minima).

Settings: FASTCSE_BENCH_VARIANT_SIZES ("4096,16384"), FASTCSE_BENCH_ROUNDS (2 at B <= 4096 and
for the row options, 1 above), FASTCSE_BENCH_VARIANTS (comma-separated names of variant_workloads.VARIANTS),
FASTCSE_BENCH_IMPLEMENTATIONS (e.g. "floor,fastcse,mnrl,cached_mnrl 256"), FASTCSE_BENCH_REPEATS
(1: timed runs per process; above 1 a measurement's time is the minimum of its process's runs).
"""

import os
import statistics

import pytest
from conftest import QUICK, by_implementation, measure_in_round, side_by_side_fixture, time_summary
from variant_workloads import ROW_OPTIONS, VARIANTS, products

pytest.importorskip("sentence_transformers")

SIZES = [int(b) for b in os.environ.get("FASTCSE_BENCH_VARIANT_SIZES", "64" if QUICK else "4096,16384").split(",")]
DIM = 32 if QUICK else 768
# The smoke run (QUICK) keeps one cheap and one four-direction variant: each measurement is a
# fresh process that imports torch and sentence-transformers (seconds).
_DEFAULT_NAMES = ["symmetric", "GTE: all four joint", *ROW_OPTIONS] if QUICK else list(VARIANTS) + list(ROW_OPTIONS)
NAMES = [v for v in os.environ.get("FASTCSE_BENCH_VARIANTS", ",".join(_DEFAULT_NAMES)).split(",") if v]
IMPLEMENTATIONS = [("floor", {}), ("fastcse", {}), ("mnrl", {}), ("cached_mnrl", dict(mini_batch_size=32)),
                   ("cached_mnrl", dict(mini_batch_size=256))]
if QUICK:
    IMPLEMENTATIONS = IMPLEMENTATIONS[:4]
if os.environ.get("FASTCSE_BENCH_IMPLEMENTATIONS"):  # e.g. "floor,fastcse,mnrl,cached_mnrl 256"
    _wanted = os.environ["FASTCSE_BENCH_IMPLEMENTATIONS"].split(",")
    IMPLEMENTATIONS = [(i, o) for i, o in IMPLEMENTATIONS
                       if i in _wanted or f"{i} {o.get('mini_batch_size', '')}".strip() in _wanted]


REPEATS = int(os.environ.get("FASTCSE_BENCH_REPEATS", "1"))


def _rounds(batch: int, variant: str) -> int:
    # A row option's pair (plain call, option) alternates its order: 2 rounds at least.
    default = 1 if QUICK or (batch > 4096 and variant not in ROW_OPTIONS) else 2
    return int(os.environ.get("FASTCSE_BENCH_ROUNDS", default))


PLAIN = "fastcse plain call"  # a row-option case's call without the option


def _label(impl: str, options: dict) -> str:
    if options.get("without_row_option"):
        return PLAIN
    return impl if not options else f"{impl} mini_batch_size={options['mini_batch_size']}"


def _mnrl_fits(batch: int, variant: str) -> bool:
    width = sum(n for kind, n in products(variant, batch, DIM) if kind == "scores")
    with open("/proc/meminfo") as f:
        available = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    return 5 * 4 * batch * width <= 0.7 * available


def _implementations(variant: str, round_: int):
    """fastcse-only options run against the floor and the same call without the option, in
    alternating order (a drift of the machine's speed within a round then favours neither), not
    against sentence-transformers."""
    if variant not in ROW_OPTIONS:
        return IMPLEMENTATIONS
    pair = [("fastcse", dict(without_row_option=True)), ("fastcse", {})]
    wanted = {impl for impl, _ in IMPLEMENTATIONS}
    return [(i, o) for i, o in [("floor", {})] + (pair if round_ % 2 == 0 else pair[::-1]) if i in wanted]


CASES = [(batch, variant, r, impl, options) for batch in SIZES for variant in NAMES
         for r in range(_rounds(batch, variant)) for impl, options in _implementations(variant, r)]
RESULTS: dict[tuple, list[dict]] = {}


@pytest.mark.parametrize("batch, variant, round_, impl, options", CASES,
                         ids=[f"B{b}-{v}-r{r}-{_label(i, o)}" for b, v, r, i, o in CASES])
def test_variant_step(benchmark, batch, variant, round_, impl, options):
    benchmark.group = f"B={batch} d={DIM} k=1 {variant}"
    if impl == "mnrl" and not _mnrl_fits(batch, variant):
        pytest.skip("MNRL's materialized score matrices would not fit in memory")
    factory = {"floor": "floor", "fastcse": "fastcse_loss", "mnrl": "mnrl", "cached_mnrl": "cached_mnrl"}[impl]
    result, same_round = measure_in_round(benchmark, RESULTS, (batch, variant), _label(impl, options), round_,
                                          "variant_workloads", factory, batch=batch, dim=DIM, variant=variant,
                                          repeats=REPEATS, **options)
    if "floor" in same_round and impl != "floor":
        result["x_floor"] = round(result["seconds"] / same_round["floor"]["seconds"], 3)
    if impl != "floor" and "fastcse" in same_round and "value" in result and _label(impl, options) != PLAIN:
        # Same embeddings, same variant: every implementation computes the same loss.
        assert result["value"] == pytest.approx(same_round["fastcse"]["value"], rel=1e-4), (impl, result)
    if "fastcse" in same_round and PLAIN in same_round:
        x_plain = round(same_round["fastcse"]["seconds"] / same_round[PLAIN]["seconds"], 3)
        same_round["fastcse"]["x_plain"] = x_plain
        if _label(impl, options) == "fastcse":  # the option ran second: its extra_info too
            result["x_plain"] = x_plain
    benchmark.extra_info.update(result, batch=batch, variant=variant, products=len(products(variant, batch, DIM)))


def summary_rows() -> list[dict]:
    rows = []
    for (batch, variant), runs in RESULTS.items():
        by_impl = by_implementation(runs)
        floor = [r["seconds"] for r in by_impl.get("floor", [])]
        for impl, rs in by_impl.items():
            seconds = [r["seconds"] for r in rs]
            row = dict(batch=batch, variant=variant, implementation=impl, **time_summary(rs, REPEATS))
            if floor:
                row["x_floor_median"] = round(statistics.median(seconds) / statistics.median(floor), 3)
            per_round = [r["x_plain"] for r in rs if "x_plain" in r]
            if per_round:  # the option over its plain call: per round, and minimum over minimum
                row["x_plain_median"] = round(statistics.median(per_round), 3)
                row["x_plain_min"] = round(min(seconds) / min(r["seconds"] for r in by_impl[PLAIN]), 3)
            rows.append(row)
    return rows


def print_rows(rows: list[dict]) -> None:
    print(f"\nloss variants, forward + backward, d={DIM}, one hard negative")
    print(f"{'B':>6} {'variant':<34} {'implementation':<28} {'min s':>8} {'median':>8} {'x floor':>8} "
          f"{'x plain':>8} {'(min)':>6} {'peak MiB':>9}")
    for r in rows:
        print(f"{r['batch']:>6} {r['variant']:<34} {r['implementation']:<28} {r['min_s']:8.2f} {r['median_s']:8.2f} "
              f"{r.get('x_floor_median', float('nan')):8.2f} {r.get('x_plain_median', float('nan')):8.2f} "
              f"{r.get('x_plain_min', float('nan')):6.2f} {r['extra_peak_mib']:9.0f}")


print_side_by_side = side_by_side_fixture(RESULTS, summary_rows, print_rows)
