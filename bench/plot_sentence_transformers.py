"""Plot and tabulate a pytest-benchmark JSON of bench/test_bench_sentence_transformers.py.

    python bench/plot_sentence_transformers.py bench-st.json [--out docs/sentence_transformers_bench.png] [--wall]

Left: training-step throughput against batch size (triples per CPU second of the one-thread
step, or with --wall per wall-clock second); right: extra peak memory of one step. Prints the
markdown table for the README, with the ratios the issue asks about: fastcse against
sentence-transformers, cached against uncached.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LABELS = {
    "mnrl": "MultipleNegativesRankingLoss",
    "fastcse": "fastcse InfoNCELoss",
    "cached_mnrl": "CachedMultipleNegativesRankingLoss",
    "fastcse_cached": "fastcse InfoNCELoss(mini_batch_size)",
}
STYLES = {"mnrl": ("tab:blue", "--"), "fastcse": ("tab:orange", "-"),
          "cached_mnrl": ("tab:blue", ":"), "fastcse_cached": ("tab:orange", "-.")}


def load(path: Path) -> tuple[dict[str, dict[int, dict]], dict]:
    """{loss: {batch: extra_info}} of the training-step cases, and the run's metadata."""
    data = json.loads(path.read_text())
    results: dict[str, dict[int, dict]] = defaultdict(dict)
    for bench in data["benchmarks"]:
        info = bench.get("extra_info", {})
        if bench["name"].startswith("test_st_training_step") and "loss" in info:
            results[info["loss"]][info["batch"]] = info
    if not results:
        raise SystemExit(f"{path} holds no test_st_training_step results")
    return results, data


def table(results, wall: bool) -> str:
    key, unit = ("triples_per_s", "triples/s") if wall else ("triples_per_cpu_s", "triples/CPU-s")
    batches = sorted({batch for per_batch in results.values() for batch in per_batch})
    mini = next((info["mini_batch_size"] for info in results.get("fastcse_cached", {}).values()), None)
    lines = [f"| B | MNRL ({unit}) | fastcse | CachedMNRL (m={mini}) | fastcse cached (m={mini}) | "
             "fastcse cached / fastcse time | CachedMNRL / MNRL time | "
             "peak MiB: MNRL / fastcse / CachedMNRL / fastcse cached |",
             "|---|---|---|---|---|---|---|---|"]

    def get(loss, batch, field):
        return results.get(loss, {}).get(batch, {}).get(field)

    def num(value, fmt="{:.1f}"):
        return "n/a" if value is None else fmt.format(value)

    def ratio(slow, fast, batch):
        a, b = get(slow, batch, key), get(fast, batch, key)
        return "n/a" if not a or not b else f"{b / a:.2f}x"

    for batch in batches:
        peaks = " / ".join(num(get(loss, batch, "extra_peak_mib"), "{:.0f}") for loss in LABELS)
        lines.append(f"| {batch} | " + " | ".join(num(get(loss, batch, key)) for loss in LABELS)
                     + f" | {ratio('fastcse_cached', 'fastcse', batch)} | {ratio('cached_mnrl', 'mnrl', batch)}"
                     + f" | {peaks} |")
    return "\n".join(lines)


def plot(results, data, out: Path, wall: bool) -> None:
    key = "triples_per_s" if wall else "triples_per_cpu_s"
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for loss, per_batch in sorted(results.items(), key=lambda item: list(LABELS).index(item[0])):
        batches = sorted(per_batch)
        color, style = STYLES.get(loss, (None, "-"))
        left.plot(batches, [per_batch[b][key] for b in batches], style, marker="o", color=color,
                  label=LABELS.get(loss, loss))
        right.plot(batches, [per_batch[b]["extra_peak_mib"] for b in batches], style, marker="o", color=color,
                   label=LABELS.get(loss, loss))
    threads = next(iter(next(iter(results.values())).values())).get("threads", "?")
    left.set_title("training step throughput" + (" (wall clock)" if wall else f" ({threads} thread, CPU time)"))
    left.set_ylabel("triples / s" if wall else "triples / CPU second")
    right.set_title("extra peak memory of one step")
    right.set_ylabel("MiB (RSS growth)")
    batches = sorted({batch for per_batch in results.values() for batch in per_batch})
    for axis in (left, right):
        axis.set_xlabel("batch size (triples)")
        axis.set_xscale("log", base=2)
        axis.set_xticks(batches, [str(b) for b in batches])
        axis.set_ylim(bottom=0)  # from zero: run-to-run noise should look as small as it is
        axis.grid(alpha=0.3)
    right.legend(fontsize=8)
    cpu = data.get("machine_info", {}).get("cpu", {}).get("brand_raw", "CPU")
    fig.suptitle(f"all-MiniLM-L6-v2 on SNLI triples, sentence-transformers vs fastcse; {cpu}, "
                 f"{data.get('datetime', '')[:10]}", fontsize=9)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", type=Path)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "sentence_transformers_bench.png")
    parser.add_argument("--wall", action="store_true", help="wall-clock throughput (quote it from a quiet machine)")
    args = parser.parse_args(argv)
    results, data = load(args.json)
    plot(results, data, args.out, args.wall)
    print(table(results, args.wall))
    print(f"\nplot: {args.out}")


if __name__ == "__main__":
    main()
