"""The README table of bench/test_bench_variants.py from its FASTCSE_BENCH_JSON file(s).

    python bench/report_variants.py docs/variants_bench_4096.json docs/variants_bench_16384.json

One row per (B, variant): median seconds of forward + backward (x the floor of the same runs)
and extra peak MiB, for fastcse, MNRL and CachedMNRL at mini-batch 32 and 256."""

import json
import sys

COLUMNS = ["fastcse", "mnrl", "cached_mnrl mini_batch_size=32", "cached_mnrl mini_batch_size=256"]
HEADERS = ["fastcse", "MNRL", "CachedMNRL 32", "CachedMNRL 256"]


def cell(row: dict | None) -> str:
    if row is None:
        return "n/a"
    return f"{row['median_s']:.2f} ({row['x_floor_median']:.2f}x) / {row['extra_peak_mib']:.0f}"


def main(paths: list[str]) -> None:
    rows = [row for path in paths for row in json.load(open(path, encoding="utf-8"))]
    groups: dict[tuple, dict] = {}
    for row in rows:
        groups.setdefault((row["batch"], row["variant"]), {})[row["implementation"]] = row
    print("| B | variant | floor s | " + " | ".join(HEADERS) + " |")
    print("|---|---|---|" + "---|" * len(HEADERS))
    for (batch, variant), impls in groups.items():
        floor = impls.get("floor")
        cells = [cell(impls.get(c)) for c in COLUMNS]
        option = impls.get("fastcse", {})
        if "x_plain_median" in option and variant.startswith("group_ids"):
            cells[0] += f"; {option['x_plain_median']:.2f}x the plain call"
            if "x_plain_min" in option:  # rows measured beside their plain call, same rounds
                cells[0] += f" ({option['x_plain_min']:.2f}x on the minima)"
        print(f"| {batch} | {variant} | {floor['median_s']:.2f} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
