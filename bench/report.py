"""Markdown table from pytest-benchmark JSONs of bench/test_bench_loss.py.

    python bench/report.py results.json [rerun.json ...]

A case present in several files is taken from the last one (a rerun of some sizes).
"""

from __future__ import annotations

import json
import re
import sys
from collections import defaultdict


def main(*paths: str) -> None:
    rows: dict[tuple, dict] = defaultdict(dict)
    files = [json.load(open(path)) for path in paths]
    data = files[0]
    for bench in (b for f in files for b in f["benchmarks"]):
        match = re.match(r"(\w+)-B(\d+)-d(\d+)-k(\d+)", bench["param"])
        if not match:
            continue
        impl, batch, dim, num_neg = match.group(1), *map(int, match.groups()[1:])
        rows[(batch, dim, num_neg)][impl] = (bench["stats"]["min"], bench["extra_info"])
    print(f"Machine: {data['machine_info'].get('cpu', {}).get('brand_raw', '?')}, "
          f"{data['machine_info'].get('cpu', {}).get('count', '?')} cores; {data['datetime'][:10]}\n")
    print("| B | d | hard neg. | floor (s) | fastcse (s) | x floor | plain (s) | x floor | "
          "fastcse extra peak (MiB) | plain extra peak (MiB) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for (batch, dim, num_neg), impls in sorted(rows.items()):
        def cell(impl, field):
            if impl not in impls:
                return "n/a"
            seconds, extra = impls[impl]
            if field == "time":
                return f"{seconds:.3f}"
            if field == "ratio":
                if "x_floor" in extra:
                    return f"{extra['x_floor']:.2f}"
                return f"~{extra['x_floor_est']:.2f} (est.)" if "x_floor_est" in extra else "-"
            return f"{extra['extra_peak_mib']:.0f}"
        print(f"| {batch} | {dim} | {num_neg} | {cell('floor', 'time')} | {cell('fastcse', 'time')} | "
              f"{cell('fastcse', 'ratio')} | {cell('plain', 'time')} | {cell('plain', 'ratio')} | "
              f"{cell('fastcse', 'mem')} | {cell('plain', 'mem')} |")


if __name__ == "__main__":
    main(*sys.argv[1:])
