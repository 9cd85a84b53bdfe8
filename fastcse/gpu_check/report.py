"""The GPU kit's bookkeeping: wall-clock budgets, a section that runs its cases within one and
records a Check for each, and the report rewritten atomically (gpu_check.json, gpu_check.md)
after every case, so that a run killed at its time limit still leaves every result so far."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
import time
import traceback
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from fastcse.gpu_check.markdown import render_markdown
from fastcse.gpu_check.results import (CORRECTNESS, FAIL, PASS, SKIPPED, Check, Outcome, Skip, count_statuses,
                                       exception_summary, skip_case)


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
            check = Check(self.name, name, FAIL, kind, exception_summary(error),
                          {"traceback": traceback.format_exc(limit=6)[-3000:]})
            release_cuda_memory(self.device)
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
        counts = count_statuses(checks)
        self.report.sections[self.name] = {"budget_s": self.budget.seconds, "spent_s": round(self.budget.elapsed(), 1),
                                           "skipped_for_budget": self.skipped_for_budget, **counts}
        if checks:
            print(f"[{self.name}] {counts[PASS]} pass, {counts[FAIL]} fail, {counts[SKIPPED]} skipped "
                  f"({self.budget.elapsed():.0f} s)", flush=True)
        self.report.write(final=False)


def release_cuda_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


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
        return count_statuses(self.checks)

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
