"""GPU validation kit: ``python -m fastcse gpu-check [--out DIR] [--quick] [--interpret]``.

One command that proves fastcse on a real GPU from a plain checkout (``PYTHONPATH=.``, the
machine's own Python: nothing to install) and writes what it found to ``DIR/gpu_check.json``
and ``DIR/gpu_check.md``. Sections, in the order they run:

- **setup**: the peers Inf-CL and cut-cross-entropy installed from ``.whl/`` into a temporary
  folder (``scripts/fetch_gpu_wheels.sh`` downloads them); ``fastcse._C`` built with the
  machine's nvcc in a scratch copy of the sources, in the background while the GPU sections run.
- **correctness**: forward and every gradient (anchor, positive, negative, temperature) of
  ``info_nce(backend="triton")`` against ``info_nce_reference`` in fp64, with the test suite's
  tolerances, for fp32 (3xTF32), fp16 and bf16, every option, odd shapes, zero and tiny rows,
  and the optional keywords this fastcse has (found with ``inspect.signature``).
- **determinism**: two runs of forward + backward (fp32 atomics: not bitwise, but within tolerance).
- **compile**: ``torch.compile(fullgraph=True)`` of a function calling ``info_nce`` equals eager.
- **distributed**: the CUDA pack kernel and ``process_group=`` on a world of one NCCL rank.
- **speed**: forward + backward against plain PyTorch, Inf-CL, cut-cross-entropy and the bare
  bf16 matrix products (CUDA events, median), with peak memory.
- **st_step**: a sentence-transformers training step on a random-weight MiniLM-L6, MNRL and
  CachedMNRL against fastcse's ``InfoNCELoss``.

Each section has a wall-clock budget, checked between cases; what it could not run in time is
reported as skipped, with that reason. ``--quick`` is budgeted for about 4 minutes on an
H100/H200, the default for about 8 (not yet measured: no GPU has run it). Exit status: 0, 1 if
any correctness check failed, 2 without a CUDA device.

``--interpret`` runs the same correctness, determinism, compile and distributed checks through
the Triton interpreter (``TRITON_INTERPRET=1``) on CPU tensors at tiny shapes, gloo instead of
NCCL, so that CI proves the harness itself; the sections that need CUDA are reported skipped.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import importlib.util
import inspect
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

import fastcse

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = "gpu_check_out"
DEFAULT_WHEELS = REPO_ROOT / ".whl"
DEFAULT_TOKENIZER = REPO_ROOT / ".gpu_kit" / "tokenizer"

# The tolerances of tests/test_triton_info_nce.py (tests/test_gpu_check.py checks they agree):
# fp32 the 2e-4; 16-bit: the kernels round dS to the input dtype before the two
# gradient products. Errors are measured against max(the tensor's scale, FLOOR).
TOL = {torch.float32: 2e-4, torch.float16: 2e-2, torch.bfloat16: 3e-2}
FLOOR = 1e-2

PASS, FAIL, SKIPPED = "pass", "fail", "skipped"
# Only correctness checks decide the exit status; a slow or failing peer in the speed section
# or a failed optional build is reported, not fatal.
CORRECTNESS, SPEED, SETUP = "correctness", "speed", "setup"

# Wall-clock seconds per section, per profile: quick ~4 min, full ~8 min on an H100/H200
# (start-up and imports aside); interpret ~1 min on 2 CPU cores.
BUDGETS = {
    "interpret": {"setup": 20, "correctness": 60, "determinism": 5, "compile": 20, "distributed": 10,
                  "speed": 0, "st_step": 0},
    "quick": {"setup": 20, "correctness": 80, "determinism": 10, "compile": 40, "distributed": 20,
              "speed": 60, "st_step": 25},
    "full": {"setup": 20, "correctness": 170, "determinism": 15, "compile": 60, "distributed": 30,
             "speed": 140, "st_step": 45},
}
# The extension build runs in the background from the start; the distributed section waits for it.
BUILD_TIMEOUT_S = {"quick": 200, "full": 280}
# A cap on the whole run, above the sum of the budgets (a section may overrun by its last case):
# later sections get what is left, so a run stays well inside a 10-minute command limit.
RUN_DEADLINE_S = {"interpret": 150, "quick": 270, "full": 530}


# ============================================================================================
# Results: checks, budgets, the report
# ============================================================================================


@dataclass
class Check:
    """One line of the report."""

    section: str
    name: str
    status: str  # PASS, FAIL or SKIPPED
    kind: str = CORRECTNESS
    reason: str = ""
    numbers: dict = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def full_name(self) -> str:
        return f"{self.section}/{self.name}"


@dataclass
class Outcome:
    """What a case function returns: passed or not, its measurements, and why not."""

    ok: bool
    numbers: dict = field(default_factory=dict)
    reason: str = ""


class Skip(Exception):
    """Raised by a case that cannot run here (missing package, variant absent, ...): the reason is reported."""


def skip_case(reason: str) -> Callable[..., Outcome]:
    """A case that is known at planning time not to run (takes and ignores the device)."""

    def case(*_unused):
        raise Skip(reason)

    return case


class Budget:
    """A wall-clock allowance, checked between cases (never interrupts one)."""

    def __init__(self, seconds: float, clock: Callable[[], float] = time.monotonic):
        self.seconds = float(seconds)
        self._clock = clock
        self._start = clock()

    def elapsed(self) -> float:
        return self._clock() - self._start

    def left(self) -> float:
        return self.seconds - self.elapsed()

    def spent(self) -> bool:
        return self.left() <= 0


def _exception_summary(error: BaseException) -> str:
    """The exception and where it came from, in one line (the JSON keeps the short traceback)."""
    frames = traceback.extract_tb(error.__traceback__)
    where = f" at {Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else ""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}{where}"[:500]


class Section:
    """Runs the cases of one section within its budget and records a Check for each."""

    def __init__(self, report: "Report", name: str, budget_s: float, selected: Callable[[str], bool],
                 device: torch.device, clock: Callable[[], float] = time.monotonic):
        self.report = report
        self.name = name
        self.budget = Budget(budget_s, clock)
        self.selected = selected
        self.device = device
        self.skipped_for_budget = 0
        self._clock = clock

    def wants(self, name: str) -> bool:
        return self.selected(f"{self.name}/{name}")

    def run(self, name: str, case: Callable[[], Outcome], kind: str = CORRECTNESS, *, required: bool = False
            ) -> Check | None:
        """Runs ``case`` unless deselected (returns None) or the budget is spent (recorded skipped).
        ``required``: a step the selected cases depend on (a build, a process group) runs regardless."""
        if not required and not self.wants(name):
            return None
        if self.budget.spent() and not required:
            self.skipped_for_budget += 1
            return self.report.add(Check(self.name, name, SKIPPED, kind,
                                         f"time budget: section {self.name!r} used its {self.budget.seconds:.0f} s"))
        start = self._clock()
        try:
            outcome = case()
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)  # an asynchronous kernel error belongs to this case
            check = Check(self.name, name, PASS if outcome.ok else FAIL, kind, outcome.reason, outcome.numbers)
        except Skip as why:
            check = Check(self.name, name, SKIPPED, kind, str(why))
        except Exception as error:  # a crash of one case is that case's failure, not the run's
            check = Check(self.name, name, FAIL, kind, _exception_summary(error),
                          {"traceback": traceback.format_exc(limit=6)[-3000:]})
            _release_cuda_memory(self.device)
        check.seconds = round(self._clock() - start, 3)
        self.report.add(check)
        self.report.write(final=False)  # a run killed at its time limit still leaves every result so far
        return check

    def restart_budget(self) -> None:
        """The budget counts from now (after a wait that has its own bound, e.g. the background build)."""
        self.budget = Budget(self.budget.seconds, self._clock)

    def skip_all(self, names: Iterable[str], reason: str, kind: str = CORRECTNESS) -> None:
        """Records the selected ``names`` as skipped for ``reason`` (not for the budget)."""
        for name in names:
            if self.wants(name):
                self.run(name, skip_case(reason), kind, required=True)

    def close(self) -> None:
        checks = [c for c in self.report.checks if c.section == self.name]
        counts = _count_statuses(checks)
        self.report.sections[self.name] = {"budget_s": self.budget.seconds, "spent_s": round(self.budget.elapsed(), 1),
                                           "skipped_for_budget": self.skipped_for_budget, **counts}
        if checks:
            print(f"[{self.name}] {counts[PASS]} pass, {counts[FAIL]} fail, {counts[SKIPPED]} skipped "
                  f"({self.budget.elapsed():.0f} s)", flush=True)
        self.report.write(final=False)


def _release_cuda_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _count_statuses(checks: Iterable[Check]) -> dict[str, int]:
    counts = {PASS: 0, FAIL: 0, SKIPPED: 0}
    for check in checks:
        counts[check.status] += 1
    return counts


def write_atomically(path: Path, text: str) -> None:
    """Writes ``text`` to ``path`` through a temporary file in the same folder and os.replace:
    a reader (or a run killed mid-write) never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 would hide the results from other users
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _json_safe(value):
    """Numbers for strict JSON: non-finite floats become strings, tensors and dtypes text."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


class Report:
    """Every check of the run, the environment, and the two output files."""

    def __init__(self, out_dir: Path, mode: str, environment: dict, clock: Callable[[], float] = time.monotonic):
        self.out_dir = Path(out_dir)
        self.mode = mode
        self.environment = environment
        self.checks: list[Check] = []
        self.sections: dict[str, dict] = {}
        self._clock = clock
        self._start = clock()

    def add(self, check: Check) -> Check:
        self.checks.append(check)
        if check.status == FAIL:
            print(f"FAIL {check.full_name}: {check.reason}", flush=True)
        return check

    def counts(self) -> dict[str, int]:
        return _count_statuses(self.checks)

    def correctness_failed(self) -> bool:
        return any(c.status == FAIL and c.kind == CORRECTNESS for c in self.checks)

    def exit_code(self) -> int:
        return 1 if self.correctness_failed() else 0

    def elapsed(self) -> float:
        return self._clock() - self._start

    def summary_line(self) -> str:
        counts = self.counts()
        return (f"gpu-check: {counts[PASS]} pass, {counts[FAIL]} fail, {counts[SKIPPED]} skipped in "
                f"{self.elapsed():.0f} s -> {self.out_dir}")

    def to_json(self, final: bool) -> dict:
        return _json_safe({
            "schema": 1, "finished": final, "mode": self.mode, "seconds": round(self.elapsed(), 1),
            "counts": self.counts(), "correctness_failed": self.correctness_failed(),
            "environment": self.environment, "sections": self.sections,
            "checks": [dataclasses.asdict(c) | {"full_name": c.full_name} for c in self.checks],
        })

    def write(self, final: bool) -> None:
        write_atomically(self.out_dir / "gpu_check.json", json.dumps(self.to_json(final), indent=1) + "\n")
        write_atomically(self.out_dir / "gpu_check.md", render_markdown(self, final))


# ============================================================================================
# Markdown
# ============================================================================================


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


def _environment_line(env: dict) -> str:
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


def render_markdown(report: Report, final: bool = True) -> str:
    by_section: dict[str, list[Check]] = {}
    for c in report.checks:
        by_section.setdefault(c.section, []).append(c)

    def ran(section: str) -> list[Check]:
        return [c for c in by_section.get(section, []) if c.status != SKIPPED]

    out = [f"# fastcse gpu-check ({report.mode}){'' if final else ' — incomplete: the run did not finish'}", "",
           f"{report.summary_line()}", "", _environment_line(report.environment), ""]
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
                "(N = 2B + Q); x plain call: its time over fastcse's without the option (issue #12 asks "
                "<= 1.1x for the ids; for the queue compare TFLOP/s, the floor of its larger N).", "",
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


# ============================================================================================
# Environment
# ============================================================================================


def _installed_version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git_state(root: Path) -> dict | None:
    """The checkout's commit and whether it has uncommitted changes (None without git or .git)."""
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        status = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "dirty": bool(status.strip())}


def _gpu_info(device: torch.device) -> dict | None:
    if device.type != "cuda":
        return None
    props = torch.cuda.get_device_properties(device)
    return {"name": props.name, "capability": f"{props.major}.{props.minor}", "sms": props.multi_processor_count,
            "memory_gib": round(props.total_memory / 2**30, 1), "cuda": torch.version.cuda,
            "allow_tf32_matmul": torch.backends.cuda.matmul.allow_tf32}


def environment(device: torch.device, mode: str, argv: list[str]) -> dict:
    versions = {"python": platform.python_version(), "torch": torch.__version__, "fastcse": fastcse.__version__}
    for name in ("triton", "transformers", "sentence-transformers"):
        versions[name] = _installed_version(name)
    if versions["triton"] is None and importlib.util.find_spec("triton") is not None:
        import triton  # shipped under another distribution name (pytorch-triton): ask the module

        versions["triton"] = triton.__version__
    return {"mode": mode, "argv": argv, "started_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "host_cpus": os.cpu_count(), "device": str(device), "gpu": _gpu_info(device),
            "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1", "versions": versions,
            "git": _git_state(REPO_ROOT)}


# ============================================================================================
# Comparing against the reference
# ============================================================================================


@dataclass(frozen=True)
class Agreement:
    """How one tensor compares with its fp64 reference. ``error`` is max |x - ref| / (max(scale,
    floor) + |ref|): the test suite's allclose(rtol=tol, atol=tol * max(scale, floor)) holds
    exactly when error <= tol, so the report's number and its verdict never disagree."""

    ok: bool
    error: float
    scale: float
    detail: str = ""


def agreement(actual: torch.Tensor, expected: torch.Tensor, tol: float, floor: float = FLOOR) -> Agreement:
    """The test suite's ``_assert_close``: finite, and allclose with rtol=tol, atol=tol * max(scale, floor)."""
    if actual.shape != expected.shape:
        return Agreement(False, math.inf, math.nan, f"shape {tuple(actual.shape)} != {tuple(expected.shape)}")
    if actual.numel() == 0:
        return Agreement(True, 0.0, 0.0)
    if not torch.isfinite(actual).all():
        return Agreement(False, math.inf, math.nan, "non-finite values")
    actual, expected = actual.double(), expected.double()
    scale = expected.abs().max().item()
    ok = torch.allclose(actual, expected, rtol=tol, atol=tol * max(scale, floor))
    error = ((actual - expected).abs() / (max(scale, floor) + expected.abs())).max().item()
    return Agreement(bool(ok), error, scale)


def row_agreement(actual: torch.Tensor, expected: torch.Tensor, tol: float, floor: float = FLOOR) -> Agreement:
    """The test suite's ``_assert_rows_close``: each row against its own scale. Where the reference
    is near or past the dtype's range (a zero row's d(x_hat) / eps in fp16) only the sign is checked:
    the gradient may round to the largest value or to the signed infinity, never to NaN."""
    if actual.shape != expected.shape:
        return Agreement(False, math.inf, math.nan, f"shape {tuple(actual.shape)} != {tuple(expected.shape)}")
    rows_a = actual.reshape(-1, actual.shape[-1]).double()
    rows_e = expected.reshape(-1, expected.shape[-1]).double()
    if rows_a.isnan().any():
        return Agreement(False, math.inf, math.nan, f"NaN in rows {rows_a.isnan().any(1).nonzero().flatten().tolist()}")
    huge = rows_e.abs() > torch.finfo(actual.dtype).max / 2
    if not torch.equal(rows_a[huge].sign(), rows_e[huge].sign()):
        return Agreement(False, math.inf, math.nan, "wrong sign where the gradient exceeds the dtype's range")
    a, e = rows_a.masked_fill(huge, 0.0), rows_e.masked_fill(huge, 0.0)
    if not torch.isfinite(a).all():
        return Agreement(False, math.inf, math.nan, "non-finite values within the dtype's range")
    row_scale = e.abs().amax(dim=1, keepdim=True).clamp_min(floor)
    within = (a - e).abs() <= tol * row_scale + tol * e.abs()
    error = ((a - e).abs() / (row_scale + e.abs())).max().item() if a.numel() else 0.0
    return Agreement(bool(within.all()), error, e.abs().max().item() if e.numel() else 0.0)


def _agreement_reason(name: str, result: Agreement, tol: float) -> str:
    return f"{name}: error {result.error:.3g} of scale {result.scale:.3g} > tol {tol:g}" + \
        (f" ({result.detail})" if result.detail else "")


def compare_results(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], tol: float, floor: float = FLOOR,
                    rowwise: Iterable[str] = ()) -> Outcome:
    """Loss and gradients of one case against the reference; ``rowwise`` names use row_agreement."""
    rowwise = set(rowwise)
    numbers, reasons = {"tol": tol}, []
    worst_name, worst = None, -1.0
    for name, ref in want.items():
        value = got.get(name)
        if value is None:
            reasons.append(f"{name}: missing (no gradient returned)")
            continue
        compare = row_agreement if name in rowwise else agreement
        result = compare(value, ref, tol, floor)
        numbers[f"{name}_error"] = result.error
        if name != "loss" and result.error > worst:
            worst_name, worst = name, result.error
        if not result.ok:
            reasons.append(_agreement_reason(name, result, tol))
    numbers["worst_grad"], numbers["worst_grad_error"] = worst_name, worst if worst_name else None
    return Outcome(not reasons, numbers, "; ".join(reasons))


# ============================================================================================
# Correctness cases: info_nce(backend="triton") against info_nce_reference in fp64
# ============================================================================================

# info_nce's keywords when this kit was written; any other keyword found at run time is a
# variant, checked through VARIANTS below (or reported as one the kit has no case for).
BASE_KEYWORDS = frozenset({"anchor", "positive", "negative", "temperature", "normalize", "symmetric",
                           "hard_negative_weight", "reduction", "backend", "process_group"})
_SHORT_DTYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


@dataclass(frozen=True)
class LossCase:
    """One comparison: shapes, dtype, options, and how the inputs are drawn."""

    batch: int
    num_neg: int
    dim: int
    dtype: torch.dtype = torch.float32
    tau: float = 0.05
    learnable_tau: bool = True  # a 0-dim tensor with requires_grad (else a float)
    normalize: bool = True
    symmetric: bool = False
    weight: float = 0.0
    reduction: str = "mean"
    scale: float = 1.0  # input magnitude (unnormalized cases keep their logits moderate)
    seed: int = 0
    special_rows: bool = False  # zero rows and rows of tiny norm
    floor: float = FLOOR
    variant: "Variant | None" = None

    @property
    def name(self) -> str:
        opts = ["norm" if self.normalize else "dot"]
        if self.symmetric:
            opts.append("sym")
        if self.weight:
            opts.append(f"w{self.weight:g}")
        opts.append(self.reduction)
        opts.append(f"tau{self.tau:g}" + ("" if self.learnable_tau else "-float"))
        if self.special_rows:
            opts.append("zero-tiny-rows")
        return f"{_SHORT_DTYPE[self.dtype]}/B{self.batch}-k{self.num_neg}-d{self.dim}/{'-'.join(opts)}"

    def options(self) -> dict:
        return dict(normalize=self.normalize, symmetric=self.symmetric, hard_negative_weight=self.weight,
                    reduction=self.reduction)


def make_inputs(case: LossCase) -> list[torch.Tensor | None]:
    """Anchors, positives near them, negatives ([B, d] for k = 1, else [B, k, d]), drawn on the CPU
    from the case's seed as tests/test_triton_info_nce.py draws them; zero and tiny rows on request."""
    gen = torch.Generator().manual_seed(case.seed)
    batch, dim, scale = case.batch, case.dim, case.scale
    anchor = torch.randn(batch, dim, generator=gen) * scale
    positive = anchor + 0.8 * scale * torch.randn(batch, dim, generator=gen)
    negative = None
    if case.num_neg:
        negative = anchor[:, None] + 1.2 * scale * torch.randn(batch, case.num_neg, dim, generator=gen)
    if case.special_rows:
        _plant_zero_and_tiny_rows(anchor, positive, negative, case.dtype)
    if negative is not None and case.num_neg == 1:
        negative = negative[:, 0]
    return [x.to(case.dtype) if x is not None else None for x in (anchor, positive, negative)]


def _plant_zero_and_tiny_rows(anchor, positive, negative, dtype) -> None:
    """As the test suite's zero-row tests: exact zeros, and rows of norm below eps (fp32: x / eps
    without projection) or 4e-5 (16-bit: 1/||x|| = 2.5e4 must never scale a 16-bit operand)."""
    tiny = 5e-13 if dtype == torch.float32 else 4e-5
    anchor[3] = 0.0
    positive[5] = 0.0
    anchor[6] *= tiny / anchor[6].norm()
    positive[8] *= tiny / positive[8].norm()
    if negative is not None:
        negative[7, -1] = 0.0
        negative[2, 0] *= tiny / negative[2, 0].norm()


def _upstream(case: LossCase) -> torch.Tensor:
    """"none": a non-uniform per-row gradient (the recompute path); "mean"/"sum": a non-unit scalar."""
    gen = torch.Generator().manual_seed(case.seed + 1)
    return torch.rand(case.batch, generator=gen) + 0.5 if case.reduction == "none" else torch.tensor(1.7)


def _leaf(x: torch.Tensor, device: torch.device, dtype: torch.dtype | None) -> torch.Tensor:
    return x.detach().to(device=device, dtype=dtype or x.dtype).requires_grad_()


def loss_and_grads(fn, tensors, case: LossCase, device: torch.device, upstream: torch.Tensor,
                   dtype: torch.dtype | None = None, **keywords) -> dict[str, torch.Tensor]:
    """{"loss", "anchor", "positive", "negative", "temperature", and any floating-point keyword
    tensor (e.g. extra_negatives)}: the loss and the gradients of its upstream-weighted backward;
    ``dtype`` recasts the inputs (fp64 for the reference)."""
    names = ("anchor", "positive", "negative")
    leaves = {n: _leaf(x, device, dtype) for n, x in zip(names, tensors) if x is not None}
    keyword_leaves = {k: _leaf(v, device, dtype) for k, v in keywords.items()
                      if isinstance(v, torch.Tensor) and v.is_floating_point()}
    keywords = keywords | keyword_leaves
    if case.learnable_tau:
        temperature = torch.tensor(case.tau, dtype=dtype or torch.float32, device=device, requires_grad=True)
    else:
        temperature = case.tau
    loss = fn(*leaves.values(), temperature=temperature, **case.options(), **keywords)
    loss.backward(upstream.to(device=device, dtype=loss.dtype))
    out = {"loss": loss.detach()} | {n: leaf.grad for n, leaf in (leaves | keyword_leaves).items()}
    if case.learnable_tau:
        out["temperature"] = temperature.grad
    return out


def _variant_keywords(case: LossCase, device: torch.device) -> dict:
    return case.variant.make(case.batch, case.dim, case.dtype, device) if case.variant is not None else {}


def check_loss_case(case: LossCase, device: torch.device) -> Outcome:
    """info_nce(backend="triton") against info_nce_reference in fp64 from the same rounded inputs."""
    tensors = make_inputs(case)
    upstream = _upstream(case)
    keywords = _variant_keywords(case, device)
    try:
        got, refused = _call_or_refusal(fastcse.info_nce, tensors, case, device, upstream, backend="triton",
                                        **keywords)
    except NotImplementedError as error:  # a declared gap, listed with its reason: not a wrong result
        raise Skip(f"not implemented on backend='triton': {error}") from None
    want, ref_refused = _call_or_refusal(fastcse.info_nce_reference, tensors, case, device, upstream.double(),
                                         dtype=torch.float64, **keywords)
    if refused and ref_refused and case.variant is not None:
        raise Skip(f"both functions refuse this guess of the variant's arguments: {refused}")
    if refused or ref_refused:
        return Outcome(False, {}, f"info_nce: {refused or 'ok'}; info_nce_reference: {ref_refused or 'ok'}")
    if got["loss"].dtype != torch.float32:
        return Outcome(False, {}, f"the loss is {got['loss'].dtype}, expected float32")
    wrong_dtypes = [n for n, g in got.items() if n not in ("loss", "temperature") and g is not None
                    and g.dtype != case.dtype]
    if wrong_dtypes:
        return Outcome(False, {}, f"gradients of {wrong_dtypes} are not in the inputs' dtype {case.dtype}")
    rowwise = ("anchor", "positive", "negative") if case.special_rows and case.dtype != torch.float32 else ()
    return compare_results(got, want, TOL[case.dtype], case.floor, rowwise)


def _call_or_refusal(fn, *args, **kwargs):
    """(results, None), or (None, the ValueError/TypeError message) when the arguments are refused."""
    try:
        return loss_and_grads(fn, *args, **kwargs), None
    except (TypeError, ValueError) as error:
        return None, f"{type(error).__name__}: {error}"


# --------------------------------------------------------------------------------------------
# Variants: keywords newer than this kit, checked when both info_nce and the reference take them
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Variant:
    """Optional keywords and how to build their values for a (B, d, dtype, device) case."""

    label: str
    make: Callable[[int, int, torch.dtype, torch.device], dict]

    def keywords(self) -> set[str]:
        return set(self.make(2, 2, torch.float32, torch.device("cpu")))


def _constant(**values) -> Callable[..., dict]:
    return lambda batch, dim, dtype, device: dict(values)


# sentence-transformers' MultipleNegativesRankingLoss names (directions, partition_mode,
# hardness_mode, hardness_strength) and a few keywords fastcse may grow; values are the
# natural ones for each. A guess both functions refuse is reported skipped, not failed.
VARIANTS = (
    Variant("directions-q2d-d2q-per_direction",
            _constant(directions=("query_to_doc", "doc_to_query"), partition_mode="per_direction")),
    Variant("directions-q2d-q2q-joint",
            _constant(directions=("query_to_doc", "query_to_query"), partition_mode="joint")),
    Variant("directions-q2d-d2d-joint", _constant(directions=("query_to_doc", "doc_to_doc"), partition_mode="joint")),
    Variant("directions-all-joint", _constant(directions=("query_to_doc", "query_to_query", "doc_to_query",
                                                          "doc_to_doc"), partition_mode="joint")),
    Variant("hardness-in_batch_negatives", _constant(hardness_mode="in_batch_negatives", hardness_strength=5.0)),
    Variant("hardness-hard_negatives", _constant(hardness_mode="hard_negatives", hardness_strength=5.0)),
    Variant("hardness-all_negatives", _constant(hardness_mode="all_negatives", hardness_strength=3.0)),
    Variant("group_ids-pairs", lambda batch, dim, dtype, device: {
        "group_ids": (torch.arange(batch) // 2).to(device)}),  # rows 2i, 2i+1 share a group
    Variant("extra_negatives-7", lambda batch, dim, dtype, device: {  # a queue; its gradient is checked too
        "extra_negatives": torch.randn(7, dim, generator=torch.Generator().manual_seed(99)).to(device, dtype)}),
    Variant("labels-triples", lambda batch, dim, dtype, device: {
        "labels": (torch.arange(batch) // 3).to(device)}),  # SupCon: rows 3i..3i+2 share a label
)


def _keywords_of(fn) -> set[str]:
    return set(inspect.signature(fn).parameters)


def plan_variants(loss_fn, reference_fn, make_case: Callable[["Variant"], list[LossCase]]):
    """(name, case function) for each variant: runnable where both functions take all its keywords,
    otherwise skipped with the reason; plus one skipped entry per new keyword no variant covers."""
    ours, theirs = _keywords_of(loss_fn), _keywords_of(reference_fn)
    planned, covered = [], set()
    for variant in VARIANTS:
        keywords = variant.keywords()
        covered |= keywords
        missing_ours, missing_ref = sorted(keywords - ours), sorted(keywords - theirs)
        if missing_ours:
            reason = f"this fastcse's info_nce has no {', '.join(missing_ours)}"
            planned.append((f"variant/{variant.label}", skip_case(reason)))
        elif missing_ref:
            reason = (f"info_nce takes {', '.join(missing_ref)} but info_nce_reference does not: "
                      "nothing to check it against")
            planned.append((f"variant/{variant.label}", skip_case(reason)))
        else:
            planned += [(f"variant/{variant.label}/{c.name}", _loss_case_runner(c)) for c in make_case(variant)]
    for keyword in sorted(ours - BASE_KEYWORDS - covered):
        planned.append((f"variant/{keyword}", skip_case(f"info_nce takes {keyword!r}, for which this kit has no case")))
    return planned


def _loss_case_runner(case: LossCase) -> Callable[[torch.device], Outcome]:
    return partial(check_loss_case, case)


# --------------------------------------------------------------------------------------------
# The case lists
# --------------------------------------------------------------------------------------------

# The test suite's option grid: normalize x symmetric x (k, weight), the reductions rotating through it.
_HARD = ((0, 0.0), (1, 0.7), (3, -0.4))
OPTION_GRID = tuple((normalize, symmetric, k, w, ("mean", "sum", "none")[i % 3]) for i, (normalize, symmetric, (k, w))
                    in enumerate((n, s, h) for n in (True, False) for s in (False, True) for h in _HARD))
# test_half_precision's three 16-bit cases: (normalize, symmetric, k, weight, reduction, tau).
HALF_SUBSET = ((True, True, 1, 0.4, "mean", 0.05), (True, False, 3, 0.4, "none", 0.02),
               (False, True, 2, 0.4, "sum", 0.05))
# test_temperatures: (tau, symmetric, reduction); 0.01 and 0.02 need the reverse column sweep,
# 0.025 is the smallest tau on the fused fixed-max path.
TEMPERATURES = ((0.01, True, "none"), (0.01, False, "mean"), (0.02, True, "mean"), (0.025, True, "sum"),
                (1.0, True, "mean"))
HALF_DTYPES = (torch.float16, torch.bfloat16)
ALL_DTYPES = (torch.float32,) + HALF_DTYPES


@dataclass(frozen=True)
class Shapes:
    """The sizes a profile checks at: tiny under the interpreter (~1 ms of Python per program
    instance), realistic on a GPU (d in {64, 384, 768, 1024}, primes, d not a power of two)."""

    grid: tuple[int, int]  # (B, d) of the option grid
    odd: tuple[tuple[int, int, int], ...]  # (B, k, d)
    special: tuple[int, int, int]  # zero and tiny rows (B >= 12)
    variant: tuple[int, int]  # (B, d)
    determinism: tuple[int, int, int]
    compile: tuple[int, int, int]
    distributed: tuple[int, int]  # (rows, d)
    half_grid: bool  # 16-bit dtypes run the whole option grid, not only HALF_SUBSET (as the test suite)
    odd_half: bool  # odd shapes in bf16 too


SHAPES = {
    "interpret": Shapes(grid=(19, 24), odd=((1, 0, 8), (1, 2, 5), (17, 0, 7), (31, 1, 37), (13, 3, 48)),
                        special=(12, 2, 24), variant=(13, 24), determinism=(19, 1, 24), compile=(12, 1, 16),
                        distributed=(9, 16), half_grid=False, odd_half=False),
    "quick": Shapes(grid=(509, 384), odd=((1, 2, 64), (127, 1, 1024), (1021, 0, 100)), special=(64, 2, 384),
                    variant=(251, 384), determinism=(4096, 1, 768), compile=(1024, 1, 768), distributed=(1000, 768),
                    half_grid=False, odd_half=False),
    "full": Shapes(grid=(1021, 768), odd=((1, 0, 64), (1, 2, 384), (17, 0, 7), (127, 0, 1024), (251, 3, 100),
                                          (1021, 1, 37), (2039, 1, 768), (4096, 1, 1024)),
                   special=(257, 2, 768), variant=(509, 768), determinism=(8192, 1, 768), compile=(2048, 1, 768),
                   distributed=(4096, 1024), half_grid=True, odd_half=True),
}


def _scaled(dim: int, base: float, base_dim: int) -> float:
    """An unnormalized input scale chosen at d = base_dim by the test suite, shrunk as 1/sqrt(d) so
    that |a|^2 (the positive's dot product, hence the logits' range) does not grow with d."""
    return base * math.sqrt(base_dim / dim)


def _grid_case(batch, dim, dtype, normalize, symmetric, k, weight, reduction, tau=0.05, seed=0) -> LossCase:
    return LossCase(batch, k, dim, dtype, tau=tau, normalize=normalize, symmetric=symmetric, weight=weight,
                    reduction=reduction, scale=1.0 if normalize else _scaled(dim, 0.15, 24), seed=seed)


def grid_cases(shapes: Shapes, dtype: torch.dtype) -> list[LossCase]:
    batch, dim = shapes.grid
    return [_grid_case(batch, dim, dtype, *options) for options in OPTION_GRID]


def half_subset_cases(shapes: Shapes) -> list[LossCase]:
    batch, dim = shapes.grid
    return [_grid_case(batch, dim, dtype, n, s, k, w, r, tau=tau, seed=7)
            for dtype in HALF_DTYPES for n, s, k, w, r, tau in HALF_SUBSET]


def odd_shape_cases(shapes: Shapes) -> list[LossCase]:
    dtypes = (torch.float32, torch.bfloat16) if shapes.odd_half else (torch.float32,)
    return [LossCase(b, k, d, dtype, symmetric=i % 2 == 1, weight=0.2 if k else 0.0, reduction="none", seed=b)
            for dtype in dtypes for i, (b, k, d) in enumerate(shapes.odd)]


def special_row_cases(shapes: Shapes) -> list[LossCase]:
    batch, k, dim = shapes.special
    return [LossCase(batch, k, dim, dtype, symmetric=symmetric, weight=0.3, reduction=reduction, seed=41,
                     special_rows=True)
            for dtype in ALL_DTYPES for symmetric, reduction in ((False, "none"), (True, "mean"))]


def temperature_cases(shapes: Shapes) -> list[LossCase]:
    batch, dim = shapes.grid
    cases = [LossCase(batch, 1, dim, tau=tau, symmetric=s, weight=0.3, reduction=r, seed=5)
             for tau, s, r in TEMPERATURES]
    cases.append(LossCase(batch, 1, dim, learnable_tau=False, symmetric=True, weight=0.3, seed=6))
    # Dot-product logits of several hundred (1/tau = 100 and beyond): the online softmax must not overflow.
    cases += [LossCase(batch, 1, dim, dtype, tau=0.01, normalize=False, symmetric=True, reduction="none",
                       scale=_scaled(dim, 0.6, 32), seed=11) for dtype in ALL_DTYPES]
    return cases


def variant_cases(shapes: Shapes, variant: Variant) -> list[LossCase]:
    batch, dim = shapes.variant
    return [LossCase(batch, 2, dim, torch.float32, weight=0.0, reduction="none", seed=13, variant=variant),
            LossCase(batch, 1, dim, torch.bfloat16, reduction="mean", seed=14, variant=variant)]


def correctness_plan(shapes: Shapes) -> list[tuple[str, Callable[[torch.device], Outcome]]]:
    """Every correctness case, most telling first, so that a spent budget drops the least."""
    cases = grid_cases(shapes, torch.float32) + half_subset_cases(shapes)
    planned = [(c.name, _loss_case_runner(c)) for c in cases]
    planned += plan_variants(fastcse.info_nce, fastcse.info_nce_reference, lambda v: variant_cases(shapes, v))
    later = odd_shape_cases(shapes) + special_row_cases(shapes) + temperature_cases(shapes)
    if shapes.half_grid:
        later += [c for dtype in HALF_DTYPES for c in grid_cases(shapes, dtype)]
    planned += [(c.name, _loss_case_runner(c)) for c in later]
    return _unique_names(planned)


def _unique_names(planned):
    """Two cases may describe alike (same shapes and options, other seeds): number the repeats."""
    seen: dict[str, int] = {}
    out = []
    for name, fn in planned:
        seen[name] = seen.get(name, 0) + 1
        out.append((name if seen[name] == 1 else f"{name}#{seen[name]}", fn))
    return out


# ============================================================================================
# Determinism and torch.compile
# ============================================================================================


def determinism_cases(shapes: Shapes) -> list[LossCase]:
    """The fused-gradient path (mean) and the recompute path (none): both add tiles with fp32 atomics."""
    batch, k, dim = shapes.determinism
    return [LossCase(batch, k, dim, torch.float32, symmetric=True, weight=0.3, reduction="mean", seed=21),
            LossCase(batch, k, dim, torch.bfloat16, symmetric=False, weight=0.3, reduction="none", seed=22)]


def check_determinism(case: LossCase, device: torch.device) -> Outcome:
    """Two runs of forward + backward on the same inputs: how far apart (atomics reorder the sums),
    and within the case's tolerance of each other."""
    tensors, upstream = make_inputs(case), _upstream(case)
    first = loss_and_grads(fastcse.info_nce, tensors, case, device, upstream, backend="triton")
    second = loss_and_grads(fastcse.info_nce, tensors, case, device, upstream, backend="triton")
    outcome = compare_results(second, {n: t.double() for n, t in first.items()}, TOL[case.dtype], case.floor)
    outcome.numbers["bitwise_equal"] = all(torch.equal(first[n], second[n]) for n in first)
    for name in first:
        outcome.numbers[f"{name}_max_abs_diff"] = (first[name].double() - second[name].double()).abs().max().item()
    return outcome


def compile_cases(shapes: Shapes) -> list[LossCase]:
    batch, k, dim = shapes.compile
    return [LossCase(batch, k, dim, torch.float32, symmetric=True, weight=0.2, reduction="mean", seed=31),
            LossCase(batch, k, dim, torch.bfloat16, symmetric=False, weight=0.2, reduction="none", seed=32)]


def _loss_times_two(anchor, positive, negative=None, *, temperature, **options):
    """A function calling info_nce, as a user's training step would (the op inside a larger graph)."""
    return fastcse.info_nce(anchor, positive, negative, temperature=temperature, backend="triton", **options) * 2.0


def check_compile(case: LossCase, device: torch.device, compile_backend: str) -> Outcome:
    """torch.compile(fullgraph=True) through the custom op's fake kernel and autograd: forward and
    backward equal to eager (up to the atomics' summation order, so within the case's tolerance)."""
    tensors, upstream = make_inputs(case), _upstream(case)
    compiled = torch.compile(_loss_times_two, fullgraph=True, backend=compile_backend)
    start = time.perf_counter()
    got = loss_and_grads(compiled, tensors, case, device, upstream)
    compile_s = time.perf_counter() - start
    want = loss_and_grads(_loss_times_two, tensors, case, device, upstream)
    outcome = compare_results(got, {n: t.double() for n, t in want.items()}, TOL[case.dtype], case.floor)
    outcome.numbers |= {"compile_backend": compile_backend, "first_call_s": round(compile_s, 2)}
    return outcome


# ============================================================================================
# The extension fastcse._C: built with the machine's nvcc in a scratch copy, loaded from there
# ============================================================================================


@dataclass
class ExtensionBuild:
    """A background ``setup.py build_ext --inplace`` in a scratch copy of the sources."""

    scratch: Path
    process: subprocess.Popen
    log_path: Path
    started: float
    timeout_s: float


# Not pyproject.toml: build_ext needs none of its metadata, and its PEP 639 licence string needs
# setuptools >= 77, which the GPU machine's Python may not have.
_BUILD_SOURCES = ("setup.py", "kernels", "fastcse")


def _copy_build_sources(root: Path, scratch: Path) -> None:
    """What setup.py build_ext needs (the package folder receives the library), without any
    compiled library (a stale one would be picked up)."""
    for name in _BUILD_SOURCES:
        source = root / name
        if source.is_dir():
            shutil.copytree(source, scratch / name, ignore=shutil.ignore_patterns("*.so", "__pycache__"))
        elif source.exists():
            shutil.copy2(source, scratch / name)


def _torch_wheel_cuda_include() -> str | None:
    """The CUDA headers that torch's own headers include (cusparse.h, ...) ship in the wheel's
    nvidia packages; a system toolkit may lack them (as .ci/cuda_compile_check.sh found)."""
    for entry in filter(None, sys.path):
        headers = sorted(Path(entry).glob("nvidia/*/include/cusparse.h"))
        if headers:
            return str(headers[0].parent)
    return None


def extension_build_env(capability: str | None) -> dict[str, str]:
    """Build for this GPU's architecture only (half the nvcc time of sm_80 + sm_90), all cores."""
    env = dict(os.environ, MAX_JOBS=str(os.cpu_count() or 4))
    if capability:
        env["TORCH_CUDA_ARCH_LIST"] = capability
    include = _torch_wheel_cuda_include()
    if include:
        env["CPATH"] = os.pathsep.join(p for p in (include, os.environ.get("CPATH")) if p)
        env["NVCC_APPEND_FLAGS"] = f"{os.environ.get('NVCC_APPEND_FLAGS', '')} -I{include}".strip()
    return env


def start_extension_build(root: Path, scratch: Path, capability: str | None, timeout_s: float) -> ExtensionBuild:
    scratch.mkdir(parents=True, exist_ok=True)
    _copy_build_sources(root, scratch)
    log_path = scratch / "build.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen([sys.executable, "-W", "ignore", "setup.py", "-q", "build_ext", "--inplace"],
                                   cwd=scratch, env=extension_build_env(capability), stdout=log,
                                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    return ExtensionBuild(scratch, process, log_path, time.monotonic(), timeout_s)


def _log_tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def finish_extension_build(build: ExtensionBuild) -> tuple[Outcome, Path | None]:
    """Waits for the build (within its timeout); returns its outcome and the built library."""
    try:
        build.process.wait(timeout=max(1.0, build.timeout_s - (time.monotonic() - build.started)))
    except subprocess.TimeoutExpired:
        build.process.kill()  # the build this kit started, by its own handle
        build.process.wait()
        return Outcome(False, {"log_tail": _log_tail(build.log_path)},
                       f"the build did not finish within {build.timeout_s:.0f} s"), None
    seconds = round(time.monotonic() - build.started, 1)
    libraries = sorted((build.scratch / "fastcse").glob("_C*.so"))
    if build.process.returncode != 0 or not libraries:
        return Outcome(False, {"seconds": seconds, "log_tail": _log_tail(build.log_path)},
                       f"setup.py build_ext exited {build.process.returncode}; see log_tail"), None
    library = libraries[0]
    with_cuda = has_cuda_pack_kernel(library)
    return Outcome(True, {"seconds": seconds, "library": str(library), "cuda_pack_kernel": with_cuda},
                   "" if with_cuda else "built without the CUDA pack kernel (no nvcc/CUDA_HOME?)"), library


def has_cuda_pack_kernel(library: Path) -> bool:
    """Whether the library holds pack_rows_cuda (its symbol and its error messages name it)."""
    return b"pack_rows_cuda" in library.read_bytes()


def load_extension_module(library: Path) -> None:
    """Imports ``library`` as the module fastcse._C (what fastcse.distributed imports for its ops)."""
    spec = importlib.util.spec_from_file_location("fastcse._C", library)
    if spec is None or spec.loader is None:
        raise ImportError(f"{library} is not a loadable extension module")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules["fastcse._C"] = module


def importable_extension() -> Path | None:
    """The fastcse._C already importable here (e.g. the checkout's own build), or None."""
    try:
        module = importlib.import_module("fastcse._C")
    except ImportError:
        return None
    return Path(module.__file__) if getattr(module, "__file__", None) else None


# ============================================================================================
# Distributed: the pack kernel and process_group= on a world of one rank
# ============================================================================================


def init_world_of_one(backend: str, store_dir: Path) -> None:
    """A one-rank process group over a file store: no port to find, nothing to clean up but a file."""
    import torch.distributed as dist

    # One process: its bootstrap sockets need no interface but the loopback (which always exists).
    os.environ.setdefault("NCCL_SOCKET_IFNAME" if backend == "nccl" else "GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group(backend, store=dist.FileStore(str(store_dir / "store"), 1), rank=0, world_size=1)


def _pack_rows(rows: int, dim: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    x = torch.randn(rows, dim, generator=torch.Generator().manual_seed(rows + dim))
    x[1] = 0.0  # a zero row: x / eps, as F.normalize
    x[2] *= 1e-13
    return x.to(device=device, dtype=dtype)


def check_pack(rows: int, dim: int, dtype: torch.dtype, bf16_transport: bool, device: torch.device) -> Outcome:
    """fastcse::gather_rows on one rank: the packed rows are F.normalize's (in fp32, rounded to the
    wire dtype), and its backward is F.normalize's backward."""
    import torch.distributed as dist

    from fastcse.distributed import gather_rows

    x = _pack_rows(rows, dim, dtype, device).requires_grad_()
    gathered, counts = gather_rows([x], dist.group.WORLD, normalize=True, bf16_transport=bf16_transport)
    wire = torch.bfloat16 if bf16_transport else dtype
    reference = x.detach().float().requires_grad_()
    expected = F.normalize(reference, dim=1, eps=1e-12)
    upstream = torch.randn(rows, dim, generator=torch.Generator().manual_seed(5)).to(device)
    gathered.backward(upstream.to(gathered.dtype))
    expected.backward(upstream)
    # Two units in the last place of the wire dtype (the kernel's fp32 norm sums in another order).
    tol = max(2 * torch.finfo(wire).eps, 1e-5)
    forward = agreement(gathered, expected.detach().to(wire).to(dtype).double(), tol, floor=1.0)
    # The zero row's gradient is upstream / eps = 1e12 x: past fp16's range, only its sign is checked.
    grad_tol = max(2 * torch.finfo(dtype).eps, 1e-5)
    backward = row_agreement(x.grad, reference.grad.double(), grad_tol, floor=1.0)
    reasons = [_agreement_reason("packed rows", forward, tol)] if not forward.ok else []
    reasons += [_agreement_reason("d rows", backward, grad_tol)] if not backward.ok else []
    if counts.flatten().tolist() != [rows]:
        reasons.append(f"counts {counts.tolist()} != [[{rows}]]")
    return Outcome(not reasons, {"rows_error": forward.error, "grad_error": backward.error, "tol": tol},
                   "; ".join(reasons))


def check_process_group(case: LossCase, device: torch.device, bf16_transport: bool = False) -> Outcome:
    """info_nce(process_group=WORLD) on one rank is the local loss, gradients included."""
    import torch.distributed as dist

    from fastcse.distributed import GatherGroup

    group = GatherGroup(dist.group.WORLD, bf16_transport=True) if bf16_transport else dist.group.WORLD
    tensors, upstream = make_inputs(case), _upstream(case)
    got = loss_and_grads(fastcse.info_nce, tensors, case, device, upstream, backend="triton", process_group=group)
    want = loss_and_grads(fastcse.info_nce, tensors, case, device, upstream, backend="triton")
    tol = TOL[torch.bfloat16] if bf16_transport else TOL[case.dtype]
    return compare_results(got, {n: t.double() for n, t in want.items()}, tol, case.floor)


def distributed_plan(shapes: Shapes, pack_kernel: bool):
    """(name, case) pairs; the pack checks need the CUDA pack kernel on CUDA (ATen packs on the CPU)."""
    rows, dim = shapes.distributed
    planned = []
    for dtype, wire in ((torch.float32, False), (torch.float16, False), (torch.bfloat16, False), (torch.float32, True)):
        name = f"pack/{_SHORT_DTYPE[dtype]}{'-bf16-wire' if wire else ''}"
        if pack_kernel:
            planned.append((name, partial(check_pack, rows, dim, dtype, wire)))
        else:
            planned.append((name, skip_case("fastcse._C was built without the CUDA pack kernel (no nvcc or "
                                            "CUDA_HOME at build time): gather_rows packs with ATen")))
    cases = [(LossCase(rows, 2, dim, torch.float32, symmetric=True, weight=0.5, seed=51), False),
             (LossCase(rows, 1, dim, torch.bfloat16, weight=0.3, reduction="none", seed=52), False),
             (LossCase(rows, 0, dim, torch.float16, symmetric=True, reduction="sum", seed=53), False),
             (LossCase(rows, 1, dim, torch.float32, weight=0.3, seed=54), True)]
    for case, wire in cases:
        planned.append((f"process_group/{case.name}{'/bf16-wire' if wire else ''}",
                        partial(check_process_group, case, bf16_transport=wire)))
    return planned


# ============================================================================================
# Peers: Inf-CL and cut-cross-entropy from .whl/ (pure-Python wheels; no index on the GPU machine)
# ============================================================================================

PEERS = {"inf_cl": "inf-cl", "cut_cross_entropy": "cut-cross-entropy"}  # import name -> distribution


def _peer_version(module: str) -> str | None:
    return _installed_version(PEERS.get(module, module))


def install_peer(module: str, wheel_dir: Path, target: Path) -> Outcome:
    """Makes ``module`` importable: already installed, or its wheel from ``wheel_dir`` installed
    (``pip install --no-index --no-deps --target``) into ``target``, which goes on sys.path."""
    if importlib.util.find_spec(module) is not None:
        return Outcome(True, {"version": _peer_version(module), "from": "installed"})
    wheels = sorted(Path(wheel_dir).glob(f"{module}-*.whl"))
    if not wheels:
        raise Skip(f"no {module}-*.whl in {wheel_dir}: run `bash scripts/fetch_gpu_wheels.sh` on a machine with "
                   f"a package index and carry .whl/ along")
    failure = _install_wheel(wheels[-1], Path(target))
    if failure:
        return Outcome(False, {}, failure)
    if str(target) not in sys.path:
        sys.path.insert(0, str(target))
    importlib.invalidate_caches()
    importlib.import_module(module)
    return Outcome(True, {"version": _peer_version(module), "from": wheels[-1].name})


def _install_wheel(wheel: Path, target: Path) -> str | None:
    """pip install --no-index --no-deps --target; without pip, unzip it (all that installing a
    pure-Python wheel does that matters for an import). Returns the failure, or None."""
    if not _is_pure_python_wheel(wheel):
        return f"{wheel.name} is not a pure-Python wheel (py3-none-any)"
    if importlib.util.find_spec("pip") is None:
        import zipfile

        with zipfile.ZipFile(wheel) as archive:
            archive.extractall(target)
        return None
    command = [sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps",
               "--disable-pip-version-check", "--target", str(target), str(wheel)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    return None if done.returncode == 0 else f"pip install of {wheel.name} failed: {done.stderr.strip()[-300:]}"


def _is_pure_python_wheel(wheel: Path) -> bool:
    return wheel.name.endswith("-none-any.whl")


# ============================================================================================
# Speed and memory of the loss
# ============================================================================================

SPEED_BATCHES = {"quick": (16384,), "full": (16384, 4096, 65536)}
SPEED_DIMS = (768, 1024)
SPEED_DTYPES = (torch.bfloat16, torch.float32)
# Issue #12's options, timed beside fastcse's plain call of the same (B, d, dtype): group ids
# with every id 4 times (3 false negatives a row to mask), and a queue of SPEED_QUEUE rows
# (at most 4 B) of extra negatives, detached as a trainer's queue is.
ROW_OPTION_IMPLS = ("fastcse+group_ids", "fastcse+queue")
SPEED_QUEUE = 65536
SPEED_IMPLS = ("fastcse", "plain", "inf_cl", "cce", *ROW_OPTION_IMPLS)  # fastcse first: the row options' base
SPEED_TAU = 0.05
# Plain PyTorch's loss holds about three fp32 B x N blocks at its peak: the logits, the
# log-softmax cross_entropy saves, and its gradient. It is only run where those fit in
# MEMORY_FRACTION of the free memory.
PLAIN_LIVE_BLOCKS = 3
MEMORY_FRACTION = 0.6
# The bare products are chunked over rows so that one score block stays below this.
MATMUL_BLOCK_BYTES = 2 * 2**30


def loss_flops(batch: int, candidates: int, dim: int) -> float:
    """The floor of forward + backward: three B x N x d products (scores, S C, S^T A), 2 B N d each."""
    return 6.0 * batch * candidates * dim


def plain_loss_bytes(batch: int, candidates: int) -> int:
    return PLAIN_LIVE_BLOCKS * batch * candidates * 4


def fits_in_memory(needed_bytes: int, free_bytes: int, fraction: float = MEMORY_FRACTION) -> bool:
    return needed_bytes <= fraction * free_bytes


def materialized_loss_fits(batch: int, candidates: int, free_bytes: int | None) -> bool:
    """Whether plain PyTorch's B x N blocks fit in the free memory (always, off CUDA: None)."""
    return free_bytes is None or fits_in_memory(plain_loss_bytes(batch, candidates), free_bytes)


def free_memory_bytes(device: torch.device) -> int | None:
    return torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None


def time_once(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds of one call: CUDA events around it on the GPU (no host overhead counted), else wall clock."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    start_s = time.perf_counter()
    fn()
    return time.perf_counter() - start_s


def median_seconds(fn: Callable[[], object], device: torch.device, warmup: int = 1, target_s: float = 0.6,
                   reps: tuple[int, int] = (3, 10)) -> tuple[float, int]:
    """(median seconds, repetitions): after ``warmup`` calls (compilation, autotuning), as many
    repetitions as fit in about ``target_s``, within ``reps``."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    times = [time_once(fn, device)]
    count = min(reps[1], max(reps[0], int(target_s / max(times[0], 1e-6))))
    times += [time_once(fn, device) for _ in range(count - 1)]
    return statistics.median(times), len(times)


def extra_peak_bytes(fn: Callable[[], object], device: torch.device) -> int | None:
    """The peak of allocated memory during one call above what was allocated before it (the
    inputs, the model): the call's own activations, temporaries and gradients. None off CUDA."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


@dataclass
class SpeedInputs:
    """[B, d] anchors and positives and [B, 1, d] hard negatives (N = 2B candidates), requiring grad."""

    anchor: torch.Tensor
    positive: torch.Tensor
    negative: torch.Tensor
    tau: float = SPEED_TAU

    @classmethod
    def draw(cls, batch: int, dim: int, dtype: torch.dtype, device: torch.device, seed: int = 0) -> "SpeedInputs":
        gen = torch.Generator(device=device).manual_seed(seed)
        anchor = torch.randn(batch, dim, device=device, generator=gen)
        positive = anchor + 0.8 * torch.randn(batch, dim, device=device, generator=gen)
        negative = anchor[:, None] + 1.2 * torch.randn(batch, 1, dim, device=device, generator=gen)
        return cls(*(x.to(dtype).requires_grad_() for x in (anchor, positive, negative)))

    @property
    def leaves(self) -> tuple[torch.Tensor, ...]:
        return self.anchor, self.positive, self.negative

    def candidates(self) -> torch.Tensor:
        return torch.cat([self.positive, self.negative.reshape(-1, self.positive.shape[1])])

    def clear_grads(self) -> None:
        for leaf in self.leaves:
            leaf.grad = None


def _fastcse_loss(x: SpeedInputs, **row_options) -> torch.Tensor:
    return fastcse.info_nce(x.anchor, x.positive, x.negative, temperature=x.tau, **row_options)


def speed_queue_size(batch: int) -> int:
    return min(SPEED_QUEUE, 4 * batch)


def row_option_inputs(impl: str, batch: int, dim: int, dtype: torch.dtype, device: torch.device) -> dict:
    """The keyword arguments of a ROW_OPTION_IMPLS implementation (none for the others)."""
    if impl == "fastcse+group_ids":
        ids = torch.randperm(batch, generator=torch.Generator().manual_seed(1)) // 4
        return {"group_ids": ids.to(device)}
    if impl == "fastcse+queue":
        gen = torch.Generator(device=device).manual_seed(2)
        return {"extra_negatives": torch.randn(speed_queue_size(batch), dim, device=device, generator=gen).to(dtype)}
    return {}


def _plain_loss(x: SpeedInputs) -> torch.Tensor:
    return fastcse.info_nce_reference(x.anchor, x.positive, x.negative, temperature=x.tau)


def inf_cl_head_dim(dim: int) -> int:
    """Inf-CL views rows as heads of 16..256 dims (its kernels' limits); the largest that divides d."""
    for head in (256, 128, 64, 32, 16):
        if dim % head == 0:
            return head
    raise Skip(f"Inf-CL needs d divisible by 16, got {dim}")


def _inf_cl_loss(x: SpeedInputs) -> torch.Tensor:
    """Inf-CL's single-GPU loss (cal_inf_loss without torch.distributed): queries carry the logit
    scale 1/tau; candidates = positives then hard negatives, targets 0..B-1."""
    from inf_cl import cal_inf_loss

    queries = F.normalize(x.anchor, dim=-1) / x.tau
    keys = F.normalize(x.candidates(), dim=-1)
    labels = torch.arange(x.anchor.shape[0], device=x.anchor.device)
    return cal_inf_loss(queries, keys, labels=labels, head_dim=inf_cl_head_dim(x.anchor.shape[1]))


def _cce_loss(x: SpeedInputs) -> torch.Tensor:
    """InfoNCE as a linear cross-entropy: embeddings = normalized anchors / tau, classifier =
    normalized candidates, targets 0..B-1 (cut-cross-entropy's defaults, gradient filtering included)."""
    from cut_cross_entropy import linear_cross_entropy

    embeddings = F.normalize(x.anchor, dim=-1) / x.tau
    classifier = F.normalize(x.candidates(), dim=-1)
    targets = torch.arange(x.anchor.shape[0], device=x.anchor.device)
    return linear_cross_entropy(embeddings, classifier, targets)


LOSS_IMPLS: dict[str, Callable[..., torch.Tensor]] = {
    "fastcse": _fastcse_loss, **dict.fromkeys(ROW_OPTION_IMPLS, _fastcse_loss),
    "plain": _plain_loss, "inf_cl": _inf_cl_loss, "cce": _cce_loss}
_PEER_OF_IMPL = {"inf_cl": "inf_cl", "cce": "cut_cross_entropy"}


def _check_runnable(impl: str, batch: int, dim: int, device: torch.device) -> None:
    """Raises Skip where an implementation cannot run: peer missing, or plain's B x N blocks too big."""
    module = _PEER_OF_IMPL.get(impl)
    if module is not None and importlib.util.find_spec(module) is None:
        raise Skip(f"{PEERS[module]} is not installed here (see setup/peer-{module})")
    free = free_memory_bytes(device)
    if impl == "plain" and not materialized_loss_fits(batch, 2 * batch, free):
        raise Skip(f"plain PyTorch needs ~{plain_loss_bytes(batch, 2 * batch) / 2**30:.0f} GiB of B x N blocks, "
                   f"over {MEMORY_FRACTION:.0%} of the {free / 2**30:.0f} GiB free")


def measure_loss(impl: str, batch: int, dim: int, dtype: torch.dtype, device: torch.device,
                 floor_s: float | None, plain_call_s: float | None = None) -> Outcome:
    """Forward + backward of one implementation: median time, TFLOP/s of the 6 B N d floor, the bare
    bf16 products' time over this one, extra peak memory, and its loss against fastcse's. A row
    option (ROW_OPTION_IMPLS) also gets its time over fastcse's plain call (``plain_call_s``), and
    its loss is checked against the materialized reference with the same option instead."""
    _check_runnable(impl, batch, dim, device)
    inputs = SpeedInputs.draw(batch, dim, dtype, device)
    row_options = row_option_inputs(impl, batch, dim, dtype, device)
    loss_fn = partial(LOSS_IMPLS[impl], **row_options)

    def step():
        inputs.clear_grads()
        loss = loss_fn(inputs)
        loss.backward()
        return loss

    try:
        value = float(step().detach())  # also the warm-up: compilation, autotuning
        seconds, reps = median_seconds(step, device, warmup=0)
        inputs.clear_grads()  # the last step's gradients are not "before": the step allocates its own
        peak = extra_peak_bytes(step, device)
        with torch.no_grad():
            expected = _expected_loss(impl, value, inputs, row_options, device)
    except torch.cuda.OutOfMemoryError as error:
        raise Skip(f"out of memory: {str(error).splitlines()[0][:200]}") from None
    finally:
        inputs.clear_grads()
    candidates = _num_candidates(batch, row_options)
    numbers = {"batch": batch, "candidates": candidates, "dim": dim, "dtype": _SHORT_DTYPE[dtype], "impl": impl,
               "ms": seconds * 1e3, "reps": reps, "tflops": loss_flops(batch, candidates, dim) / seconds / 1e12,
               # the floor's products are of N = 2B candidates
               "vs_matmul": floor_s / seconds if floor_s and candidates == 2 * batch else None,
               "x_plain_call": seconds / plain_call_s if row_options and plain_call_s else None,
               "peak_mib": peak / 2**20 if peak is not None else None, "loss": value}
    if expected is None:  # the checked value comes from the correctness section
        numbers["loss_check"] = "the materialized reference would not fit: not compared"
        return Outcome(True, numbers)
    rel = abs(value - expected) / max(abs(expected), 1e-6)
    numbers["loss_rel_diff_vs_reference" if row_options else "loss_rel_diff_vs_fastcse"] = rel
    # A peer in bf16 rounds the scaled embeddings (~0.4% each); a wrong scale or target is far off.
    # fastcse's own fp32 options against the fp32 reference: tighter (a dropped mask moves it ~0.3%
    # at B = 32; at scale it is the correctness section's cases that catch that).
    tolerance = 1e-3 if row_options and dtype == torch.float32 else 5e-2
    if rel > tolerance:  # not the same loss: its timing would compare nothing
        against = "the reference with the same option" if row_options else "fastcse"
        return Outcome(False, numbers, f"loss {value:.5g} differs from {against}'s {expected:.5g}")
    return Outcome(True, numbers)


def _num_candidates(batch: int, row_options: dict) -> int:
    """N: the positives and one hard negative per row, and the queue's rows."""
    queue = row_options.get("extra_negatives")
    return 2 * batch + (queue.shape[0] if queue is not None else 0)


def _expected_loss(impl: str, value: float, inputs: SpeedInputs, row_options: dict, device) -> float | None:
    """The loss an implementation must reproduce: fastcse's, or for a row option the materialized
    reference with the same option (None where its B x N blocks would not fit)."""
    if not row_options:
        return value if impl == "fastcse" else float(_fastcse_loss(inputs))
    batch = inputs.anchor.shape[0]
    if not materialized_loss_fits(batch, _num_candidates(batch, row_options), free_memory_bytes(device)):
        return None
    return float(fastcse.info_nce_reference(*inputs.leaves, temperature=inputs.tau, **row_options))


def measure_matmul_floor(batch: int, dim: int, device: torch.device, block_bytes: int = MATMUL_BLOCK_BYTES) -> Outcome:
    """The three bare bf16 products of the same shapes, A C^T, S C and S^T A (N = 2B), chunked
    over rows so that a score block stays below ``block_bytes``: the time no loss can beat."""
    candidates = 2 * batch
    gen = torch.Generator(device=device).manual_seed(1)
    a = torch.randn(batch, dim, device=device, generator=gen).to(torch.bfloat16)
    c = torch.randn(candidates, dim, device=device, generator=gen).to(torch.bfloat16)
    rows = max(1, min(batch, block_bytes // (candidates * 2)))
    grad_c = torch.zeros_like(c)

    def products():
        grad_c.zero_()
        for start in range(0, batch, rows):
            block = a[start:start + rows]
            scores = block @ c.T
            scores @ c  # dA's product
            grad_c.addmm_(scores.T, block)

    seconds, reps = median_seconds(products, device)
    return Outcome(True, {"batch": batch, "candidates": candidates, "dim": dim, "dtype": "bf16", "impl": "matmul floor",
                          "ms": seconds * 1e3, "reps": reps,
                          "tflops": loss_flops(batch, candidates, dim) / seconds / 1e12, "vs_matmul": 1.0})


def speed_plan(batches: Iterable[int], dims: Iterable[int], dtypes: Iterable[torch.dtype], impls: Iterable[str]):
    """(name, case) pairs: for each (B, d) the bare products first, then every dtype x implementation."""
    floors: dict[tuple[int, int], float] = {}
    planned = []

    def floor_case(batch, dim):
        def case(device):
            outcome = measure_matmul_floor(batch, dim, device)
            floors[batch, dim] = outcome.numbers["ms"] / 1e3
            return outcome
        return case

    plain_calls: dict[tuple, float] = {}  # fastcse's plain call per (B, d, dtype), for the row options

    def loss_case(impl, batch, dim, dtype):
        def case(device):
            outcome = measure_loss(impl, batch, dim, dtype, device, floors.get((batch, dim)),
                                   plain_calls.get((batch, dim, dtype)))
            if impl == "fastcse":
                plain_calls[batch, dim, dtype] = outcome.numbers["ms"] / 1e3
            return outcome
        return case

    for batch in batches:
        for dim in dims:
            planned.append((f"B{batch}-d{dim}/bf16-matmul-floor", floor_case(batch, dim)))
            for dtype in dtypes:
                for impl in impls:
                    name = f"B{batch}-d{dim}-{_SHORT_DTYPE[dtype]}/{impl}"
                    planned.append((name, loss_case(impl, batch, dim, dtype)))
    return planned


# ============================================================================================
# A sentence-transformers training step: MNRL / CachedMNRL against fastcse's InfoNCELoss
# ============================================================================================

# all-MiniLM-L6-v2's architecture, with random weights (no hub, no checkpoint on the GPU machine).
MINILM_L6 = {"hidden_size": 384, "num_hidden_layers": 6, "num_attention_heads": 12, "intermediate_size": 1536}
ST_BATCH = {"quick": 1024, "full": 1024}
ST_MINI_BATCH = 128
ST_LOSSES = ("mnrl", "fastcse", "cached_mnrl", "fastcse_cached")
# (fastcse's loss, sentence-transformers' counterpart): same batch, dropout off, same values and gradients.
ST_PAIRS = (("fastcse", "mnrl"), ("fastcse_cached", "cached_mnrl"))
# The step's gradients pass through six layers whose fp32 sums run in other orders: looser than the loss's.
ST_GRAD_TOL = 1e-3


def _sentence_transformers_modules():
    """The classes, importable on sentence-transformers 6.0 and later (losses moved under sentence_transformer/)."""
    from sentence_transformers import SentenceTransformer

    try:
        from sentence_transformers.sentence_transformer.losses import (CachedMultipleNegativesRankingLoss,
                                                                       MultipleNegativesRankingLoss)
    except ImportError:
        from sentence_transformers.losses import CachedMultipleNegativesRankingLoss, MultipleNegativesRankingLoss
    from fastcse.integrations.sentence_transformers import InfoNCELoss

    return SentenceTransformer, MultipleNegativesRankingLoss, CachedMultipleNegativesRankingLoss, InfoNCELoss


def write_random_model_folder(tokenizer_dir: Path, folder: Path, sizes: dict, seed: int = 0,
                              max_seq_length: int = 64) -> None:
    """A SentenceTransformer folder as all-MiniLM-L6-v2's (Transformer at the root, mean Pooling in
    1_Pooling/): a BertModel of ``sizes`` with random weights and the given tokenizer."""
    from transformers import AutoTokenizer, BertConfig, BertModel
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # one line per section in the log, not bars
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(tokenizer), max_position_embeddings=512, **sizes)
    BertModel(config).save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    pooling = {"word_embedding_dimension": sizes["hidden_size"], "pooling_mode_cls_token": False,
               "pooling_mode_mean_tokens": True, "pooling_mode_max_tokens": False,
               "pooling_mode_mean_sqrt_len_tokens": False}
    (folder / "1_Pooling").mkdir(parents=True, exist_ok=True)
    (folder / "modules.json").write_text(json.dumps(modules))
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": max_seq_length,
                                                                  "do_lower_case": False}))
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(pooling))


def random_sentences(vocab: Iterable[str], count: int, seed: int, words: tuple[int, int] = (6, 24)) -> list[str]:
    """Sentences of whole vocabulary words (no data set on the GPU machine), lengths spread like NLI's."""
    import random

    words_list = sorted(w for w in vocab if w.isascii() and w.isalpha())
    rng = random.Random(seed)
    return [" ".join(rng.choices(words_list, k=rng.randint(*words))) for _ in range(count)]


@dataclass
class StBench:
    """A model, its tokenized (anchor, positive, hard negative) columns, and the losses over it."""

    model: object
    features: list[dict]
    losses: dict[str, object]

    def step(self, name: str) -> torch.Tensor:
        """One training step minus the optimizer: the loss's forward and backward."""
        self.model.zero_grad(set_to_none=True)
        loss = self.losses[name]([dict(f) for f in self.features], None)
        loss.backward()
        return loss.detach()

    def embedding_grad(self) -> torch.Tensor:
        weight = next(p for n, p in self.model.named_parameters() if n.endswith("word_embeddings.weight"))
        return weight.grad.detach().clone()


def build_st_bench(tokenizer_dir: Path, folder: Path, sizes: dict, batch: int, mini_batch: int,
                   device: torch.device) -> StBench:
    SentenceTransformer, MNRL, CachedMNRL, InfoNCELoss = _sentence_transformers_modules()
    write_random_model_folder(tokenizer_dir, folder, sizes)
    model = SentenceTransformer(str(folder), device=str(device))
    vocab = model.tokenizer.get_vocab()
    preprocess = getattr(model, "preprocess", None) or model.tokenize  # 6.x name, older name
    features = []
    for column in range(3):
        tokens = preprocess(random_sentences(vocab, batch, seed=column))
        features.append({k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in tokens.items()})
    losses = {"mnrl": MNRL(model), "fastcse": InfoNCELoss(model),
              "cached_mnrl": CachedMNRL(model, mini_batch_size=mini_batch),
              "fastcse_cached": InfoNCELoss(model, mini_batch_size=mini_batch)}
    return StBench(model, features, losses)


def check_st_agreement(bench: StBench, ours: str, theirs: str) -> Outcome:
    """Dropout off, the same batch: fastcse's loss and the word-embedding gradient equal sentence-transformers'."""
    bench.model.eval()
    try:
        loss_theirs, grad_theirs = bench.step(theirs), bench.embedding_grad()
        loss_ours, grad_ours = bench.step(ours), bench.embedding_grad()
    finally:
        bench.model.train()
    loss = agreement(loss_ours, loss_theirs.double(), TOL[torch.float32], floor=1.0)
    grad = agreement(grad_ours, grad_theirs.double(), ST_GRAD_TOL)
    reasons = [_agreement_reason(n, r, t) for n, r, t in (("loss", loss, TOL[torch.float32]),
                                                          ("d word embeddings", grad, ST_GRAD_TOL)) if not r.ok]
    return Outcome(not reasons, {"loss": float(loss_ours), "loss_error": loss.error, "worst_grad": "word_embeddings",
                                 "worst_grad_error": grad.error, "tol": TOL[torch.float32]}, "; ".join(reasons))


def measure_st_step(bench: StBench, name: str, device: torch.device, mini_batch: int) -> Outcome:
    """Train mode (dropout on): median step time and the step's extra peak memory."""
    bench.model.train()
    seconds, reps = median_seconds(lambda: bench.step(name), device, warmup=1, target_s=1.0, reps=(3, 5))
    bench.model.zero_grad(set_to_none=True)  # the parameters' gradients are part of the step's peak
    peak = extra_peak_bytes(lambda: bench.step(name), device)
    bench.model.zero_grad(set_to_none=True)
    rows = len(bench.features[0]["input_ids"])
    return Outcome(True, {"loss_name": name, "mini_batch": mini_batch if "cached" in name else None,
                          "batch": rows, "ms": seconds * 1e3, "reps": reps,
                          "peak_mib": peak / 2**20 if peak is not None else None})


def st_step_plan(tokenizer_dir: Path, scratch: Path, sizes: dict, batch: int, mini_batch: int):
    """(name, case) pairs sharing one bench, built by the first case that runs."""
    built: dict[str, object] = {}

    def bench(device):
        if "error" in built:  # a bench that could not be built is not retried by every case
            raise built["error"]
        if "bench" not in built:
            try:
                _st_preconditions(tokenizer_dir)
                built["bench"] = build_st_bench(tokenizer_dir, scratch / "minilm-random", sizes, batch, mini_batch,
                                                device)
            except Exception as error:
                built["error"] = error
                raise
        return built["bench"]

    def agreement_case(ours, theirs, device):
        return check_st_agreement(bench(device), ours, theirs)

    def timing_case(name, device):
        return measure_st_step(bench(device), name, device, mini_batch)

    planned = [(f"agrees/{ours}-vs-{theirs}", partial(agreement_case, ours, theirs)) for ours, theirs in ST_PAIRS]
    planned += [(f"time/{name}", partial(timing_case, name)) for name in ST_LOSSES]
    return planned


def _st_preconditions(tokenizer_dir: Path) -> None:
    for module in ("sentence_transformers", "transformers"):
        if importlib.util.find_spec(module) is None:
            raise Skip(f"{module} is not installed on this machine")
    if not (Path(tokenizer_dir) / "tokenizer_config.json").exists():
        raise Skip(f"no tokenizer in {tokenizer_dir}: run `bash scripts/fetch_gpu_wheels.sh` (it copies MiniLM's "
                   f"tokenizer into .gpu_kit/tokenizer) and carry .gpu_kit along")


# ============================================================================================
# The run: sections in order, the report after each
# ============================================================================================

SECTIONS_NEEDING_CUDA = ("speed", "st_step")


@dataclass
class RunContext:
    report: Report
    device: torch.device
    profile: str
    shapes: Shapes
    selected: Callable[[str], bool]
    budget_scale: float
    scratch: Path
    wheels: Path
    tokenizer: Path
    build: ExtensionBuild | None = None
    build_error: str = ""  # why the build could not even start
    started: float = field(default_factory=time.monotonic)

    def section(self, name: str) -> Section:
        left = RUN_DEADLINE_S[self.profile] * self.budget_scale - (time.monotonic() - self.started)
        budget = min(BUDGETS[self.profile][name] * self.budget_scale, max(0.0, left))
        return Section(self.report, name, budget, self.selected, self.device)


def run_planned(ctx: RunContext, name: str, plan: Callable[[], list], kind_of: Callable[[str], str]) -> None:
    """Runs a section's planned cases; a harness error while planning is one failed check."""
    section = ctx.section(name)
    try:
        for case_name, case in plan():
            section.run(case_name, lambda c=case: c(ctx.device), kind_of(case_name))
    except Exception as error:  # the harness itself broke: correctness is not proven
        ctx.report.add(Check(name, "harness", FAIL, CORRECTNESS, _exception_summary(error),
                             {"traceback": traceback.format_exc(limit=6)[-3000:]}))
    finally:
        section.close()


def _always(kind: str) -> Callable[[str], str]:
    return lambda _name: kind


def setup_plan(wheels: Path, target: Path):
    def peer_case(module, _device):
        return install_peer(module, wheels, target)

    return [(f"peer-{module}", partial(peer_case, module)) for module in PEERS]


def determinism_plan(shapes: Shapes):
    return [(c.name, partial(check_determinism, c)) for c in determinism_cases(shapes)]


def compile_plan(shapes: Shapes, backend: str):
    return [(f"{backend}/{c.name}", partial(check_compile, c, compile_backend=backend)) for c in compile_cases(shapes)]


def run_setup(ctx: RunContext) -> None:
    run_planned(ctx, "setup", partial(setup_plan, ctx.wheels, ctx.scratch / "peers"), _always(SETUP))
    for module, distribution in PEERS.items():  # the report's versions line names the peers it ran
        ctx.report.environment["versions"][distribution] = _peer_version(module)


def run_correctness(ctx: RunContext) -> None:
    run_planned(ctx, "correctness", partial(correctness_plan, ctx.shapes), _always(CORRECTNESS))


def run_determinism(ctx: RunContext) -> None:
    run_planned(ctx, "determinism", partial(determinism_plan, ctx.shapes), _always(CORRECTNESS))


def run_compile(ctx: RunContext) -> None:
    # Inductor on the GPU (what users get); on the CPU aot_eager traces the same fake kernel and
    # autograd registration without compiling C++ (the custom op is opaque to either backend).
    backend = "inductor" if ctx.device.type == "cuda" else "aot_eager"
    run_planned(ctx, "compile", partial(compile_plan, ctx.shapes, backend), _always(CORRECTNESS))


def _resolve_extension(ctx: RunContext, section: Section) -> tuple[Path | None, str]:
    """(the loaded fastcse._C library, or None, and why not): the background build's result on
    CUDA, else the extension already importable here."""
    if ctx.build_error:
        section.run("extension-build", lambda: Outcome(False, {}, ctx.build_error), SETUP, required=True)
        return None, f"fastcse._C did not build ({ctx.build_error})"
    if ctx.build is None:
        library = importable_extension()
        return library, "" if library else "fastcse._C is not importable here and --build is off"
    result: dict = {}

    def finish():
        outcome, library = finish_extension_build(ctx.build)
        if library is not None:
            load_extension_module(library)
        result["library"] = library
        return outcome

    check = section.run("extension-build", finish, SETUP, required=True)
    library = result.get("library")
    return library, "" if library else f"fastcse._C did not build ({check.reason if check else 'deselected'})"


def run_distributed(ctx: RunContext) -> None:
    section = ctx.section("distributed")
    try:
        if not any(section.wants(name) for name, _ in distributed_plan(ctx.shapes, True)):
            return
        library, why_not = _resolve_extension(ctx, section)
        section.restart_budget()  # waiting for the build (bounded by its own timeout) is not the cases' time
        pack_kernel = ctx.device.type == "cpu" or (library is not None and has_cuda_pack_kernel(library))
        plan = distributed_plan(ctx.shapes, pack_kernel)
        if library is None:
            section.skip_all((name for name, _ in plan), why_not)
            return
        _run_in_world_of_one(ctx, section, plan)
    except Exception as error:
        ctx.report.add(Check("distributed", "harness", FAIL, CORRECTNESS, _exception_summary(error),
                             {"traceback": traceback.format_exc(limit=6)[-3000:]}))
    finally:
        section.close()


def _run_in_world_of_one(ctx: RunContext, section: Section, plan) -> None:
    import torch.distributed as dist

    backend = "nccl" if ctx.device.type == "cuda" else "gloo"
    if ctx.device.type == "cuda":
        torch.cuda.set_device(ctx.device)

    def init():
        init_world_of_one(backend, ctx.scratch)
        return Outcome(True, {"backend": backend})

    started = section.run(f"init-{backend}", init, required=True)
    if started.status != PASS:
        section.skip_all((name for name, _ in plan), f"no {backend} process group: {started.reason}")
        return
    try:
        for name, case in plan:
            section.run(name, lambda c=case: c(ctx.device))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()  # Inf-CL's loss would take the ring path under a live group


def run_speed(ctx: RunContext) -> None:
    plan = partial(speed_plan, SPEED_BATCHES[ctx.profile], SPEED_DIMS, SPEED_DTYPES, SPEED_IMPLS)
    run_planned(ctx, "speed", plan, _always(SPEED))


def run_st_step(ctx: RunContext) -> None:
    plan = partial(st_step_plan, ctx.tokenizer, ctx.scratch, MINILM_L6, ST_BATCH[ctx.profile], ST_MINI_BATCH)
    # The agreement with sentence-transformers' losses is a correctness check; the timings are not.
    run_planned(ctx, "st_step", plan, lambda name: CORRECTNESS if name.startswith("agrees/") else SPEED)


def skip_cuda_sections(ctx: RunContext) -> None:
    for name in SECTIONS_NEEDING_CUDA:
        section = ctx.section(name)
        section.run("all", skip_case("needs a CUDA device (this is an --interpret run)"), SPEED, required=True)
        section.close()


# ============================================================================================
# Command line
# ============================================================================================


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--out", default=DEFAULT_OUT, help="folder for gpu_check.json and gpu_check.md "
                                                           "(default: %(default)s)")
    parser.add_argument("--quick", action="store_true", help="a subset budgeted for ~4 minutes on an H100/H200 "
                                                             "(the default for ~8)")
    parser.add_argument("--interpret", action="store_true",
                        help="no GPU: the correctness checks through the Triton interpreter on CPU tensors at "
                             "tiny shapes (proves the harness; ~1 minute on 2 cores)")
    parser.add_argument("--only", action="append", metavar="TEXT",
                        help="run only the checks whose name (section/case) contains TEXT; repeatable")
    parser.add_argument("--build", choices=("auto", "yes", "no"), default="auto",
                        help="build fastcse._C with this machine's compilers first (auto: on CUDA; else the "
                             "importable one is used)")
    parser.add_argument("--budget-scale", type=float, default=1.0, metavar="X",
                        help="multiply every section's time budget by X (default: %(default)s)")
    parser.add_argument("--wheels", type=Path, default=DEFAULT_WHEELS,
                        help="folder of the peers' wheels (default: <checkout>/.whl)")
    parser.add_argument("--tokenizer", type=Path, default=DEFAULT_TOKENIZER,
                        help="MiniLM's tokenizer files (default: <checkout>/.gpu_kit/tokenizer)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser


def selector(only: list[str] | None) -> Callable[[str], bool]:
    """The --only filter: a check runs when its full name contains any of the texts (all without --only)."""
    if not only:
        return lambda _name: True
    return lambda name: any(text in name for text in only)


def enter_interpreter_mode() -> str | None:
    """Sets TRITON_INTERPRET=1, which must happen before the kernels' module is imported (it
    decides at import whether @triton.jit compiles or interprets). Returns the problem, if any."""
    os.environ["TRITON_INTERPRET"] = "1"
    kernels = sys.modules.get("fastcse.triton_info_nce")
    if kernels is not None and not getattr(kernels, "_INTERPRET", False):
        return ("fastcse.triton_info_nce was imported before --interpret could set TRITON_INTERPRET=1; "
                "run `TRITON_INTERPRET=1 python -m fastcse gpu-check --interpret`")
    return None


def no_cuda_message() -> str:
    build = f"CUDA {torch.version.cuda} build" if torch.version.cuda else "a CPU-only build"
    return (f"gpu-check: no CUDA device found (torch {torch.__version__}, {build}); run it on a GPU machine, "
            f"or pass --interpret to check the harness through the Triton interpreter on the CPU")


def run(args: argparse.Namespace, argv: list[str] | None = None) -> int:
    if args.interpret:
        problem = enter_interpreter_mode()
        if problem:
            print(f"gpu-check: {problem}", file=sys.stderr)
            return 2
        device = torch.device("cpu")
    elif torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        print(no_cuda_message(), file=sys.stderr)
        return 2
    # No network on the GPU machine: never let transformers try the hub (and wait for its timeouts).
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    profile = "interpret" if args.interpret else "quick" if args.quick else "full"
    report = Report(Path(args.out), profile, environment(device, profile, list(argv or sys.argv[1:])))
    print(f"gpu-check ({profile}) on {_environment_line(report.environment)}", flush=True)
    with tempfile.TemporaryDirectory(prefix="fastcse-gpu-check-") as scratch:
        ctx = RunContext(report, device, profile, SHAPES[profile], selector(args.only), args.budget_scale,
                         Path(scratch), Path(args.wheels), Path(args.tokenizer))
        wanted = any(ctx.selected(f"distributed/{name}") for name, _ in distributed_plan(ctx.shapes, True))
        if wanted and (args.build == "yes" or (args.build == "auto" and device.type == "cuda")):
            _start_build(ctx, args.budget_scale)
        try:
            _run_sections(ctx)
        finally:
            if ctx.build is not None and ctx.build.process.poll() is None:
                ctx.build.process.kill()  # the build this run started, by its own handle
                ctx.build.process.wait()
    report.write(final=True)
    print(report.summary_line(), flush=True)
    return report.exit_code()


def _start_build(ctx: RunContext, budget_scale: float) -> None:
    gpu = ctx.report.environment["gpu"]
    timeout = BUILD_TIMEOUT_S.get(ctx.profile, 600) * budget_scale
    try:
        ctx.build = start_extension_build(REPO_ROOT, ctx.scratch / "build", gpu["capability"] if gpu else None, timeout)
    except (OSError, subprocess.SubprocessError) as error:
        ctx.build_error = _exception_summary(error)


def _run_sections(ctx: RunContext) -> None:
    run_setup(ctx)
    run_correctness(ctx)
    run_determinism(ctx)
    run_compile(ctx)
    run_distributed(ctx)
    if ctx.device.type == "cuda":
        run_speed(ctx)
        run_st_step(ctx)
    else:
        skip_cuda_sections(ctx)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastcse gpu-check", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv), argv)


if __name__ == "__main__":
    sys.exit(main())
