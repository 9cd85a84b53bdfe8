"""The GPU kit's report as GitHub markdown (gpu_check.md): the tables to paste into the README."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import TYPE_CHECKING

from fastcse.gpu_check.results import FAIL, PASS, SKIPPED, Check

if TYPE_CHECKING:
    from fastcse.gpu_check.report import Report



def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
            return f"{value:.2e}"
        return f"{value:.3g}" if abs(value) < 10 else f"{value:.1f}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(headers: list[str], rows: Iterable[Iterable]) -> str:
    """A GitHub markdown table; cells formatted by type (floats to 3 significant digits, | escaped)."""
    lines = ["| " + " | ".join(_cell(h) for h in headers) + " |", "|" + "---|" * len(headers)]
    for row in rows:
        cells = [_cell(v) for v in row]
        if len(cells) != len(headers):
            raise ValueError(f"row has {len(cells)} cells, the table {len(headers)} columns: {cells}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def environment_line(env: dict) -> str:
    gpu = env.get("gpu") or {}
    device = f"{gpu['name']} (sm_{gpu['capability'].replace('.', '')}, {gpu['memory_gib']} GiB)" if gpu else \
        "CPU (Triton interpreter)"
    versions = env.get("versions", {})
    parts = [f"{name} {versions[name]}" for name in ("python", "torch", "triton", "transformers",
                                                       "sentence-transformers", "inf-cl", "cut-cross-entropy")
             if versions.get(name)]
    git = env.get("git") or {}
    commit = f" at {git['commit'][:10]}{' (uncommitted changes)' if git.get('dirty') else ''}" if git else ""
    return f"{device}; {', '.join(parts)}; fastcse {versions.get('fastcse')}{commit}; {env.get('started_utc', '')}"


def _correctness_rows(checks: list[Check]):
    for c in checks:
        n = c.numbers
        yield (c.full_name, c.status, n.get("loss_error"), n.get("worst_grad_error"), n.get("worst_grad"),
               n.get("tol"), c.seconds)


def _speed_rows(checks: list[Check]):
    for c in checks:
        n = c.numbers
        yield (n.get("batch"), n.get("candidates"), n.get("dim"), n.get("dtype"), n.get("impl"), n.get("ms"),
               n.get("tflops"), n.get("vs_matmul"), n.get("x_plain_call"), n.get("peak_mib"),
               c.status if c.status != PASS else "", c.reason)


def _st_rows(checks: list[Check]):
    for c in checks:
        n = c.numbers
        yield (n.get("loss_name"), n.get("batch"), n.get("mini_batch"), n.get("ms"), n.get("peak_mib"), c.status,
               c.reason)


def _numbers_note(numbers: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in numbers.items() if k not in ("log_tail", "traceback"))


def render_markdown(report: "Report", final: bool = True) -> str:
    """The report as GitHub markdown: failures first, then the tables of each section that ran."""
    by_section: dict[str, list[Check]] = {}
    for c in report.checks:
        by_section.setdefault(c.section, []).append(c)

    def ran(section: str) -> list[Check]:
        return [c for c in by_section.get(section, []) if c.status != SKIPPED]

    out = [f"# fastcse gpu-check ({report.mode}){'' if final else ' — incomplete: the run did not finish'}", "",
           f"{report.summary_line()}", "", environment_line(report.environment), ""]
    failed = [c for c in report.checks if c.status == FAIL]
    if failed:
        out += ["## Failures", "", markdown_table(["check", "kind", "reason"],
                                                   ((c.full_name, c.kind, c.reason) for c in failed)), ""]
    correctness = [c for name in ("correctness", "determinism", "compile", "distributed") for c in ran(name)]
    if correctness:
        out += ["## Correctness: against `info_nce_reference` in fp64", "",
                "error = max |x - ref| / (max(scale, 1e-2) + |ref|), scale = max |ref| over the tensor (per row "
                "for 16-bit zero and tiny rows): the test suite's allclose rule, passed at error <= tol.", "",
                markdown_table(["check", "status", "loss error", "worst gradient error", "in", "tol", "s"],
                               _correctness_rows(correctness)), ""]
    if ran("speed"):
        out += ["## Loss forward + backward (CUDA events, median; TFLOP/s of the 6 B N d floor)", "",
                "fastcse+group_ids: every id 4 times; fastcse+queue: Q = min(65536, 4B) extra negatives "
                "(N = 2B + Q); x plain call: its time over fastcse's without the option (masking false "
                "negatives should cost at most 1.1x the plain call; for the queue compare TFLOP/s, the "
                "floor of its larger N).", "",
                markdown_table(["B", "N", "d", "dtype", "implementation", "ms", "TFLOP/s", "bf16 matmul / this",
                                "x plain call", "peak MiB", "status", "note"], _speed_rows(ran("speed"))), ""]
    if ran("st_step"):
        out += ["## sentence-transformers step (random-weight MiniLM-L6; forward + backward, no optimizer)", "",
                markdown_table(["loss", "batch", "mini-batch", "ms", "peak MiB", "status", "note"],
                               _st_rows([c for c in ran("st_step") if "ms" in c.numbers])), ""]
    setup = ran("setup")
    if setup:
        out += ["## Setup", "", markdown_table(["step", "status", "note", "s"],
                                               ((c.name, c.status, c.reason or _numbers_note(c.numbers), c.seconds)
                                                for c in setup)), ""]
    skipped = [c for c in report.checks if c.status == SKIPPED]
    if skipped:
        out += ["## Skipped", "", markdown_table(["check", "reason"], ((c.full_name, c.reason) for c in skipped)), ""]
    return "\n".join(out)

