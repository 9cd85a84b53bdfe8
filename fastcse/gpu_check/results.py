"""What a check of the GPU kit produces: its status and kind, a case's outcome, and the
exception a case raises when it cannot run here."""

from __future__ import annotations

import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from fastcse.testing import Comparison

PASS, FAIL, SKIPPED = "pass", "fail", "skipped"
# Only correctness checks decide the exit status; a slow or failing peer in the speed section
# or a failed optional build is reported, not fatal.
CORRECTNESS, SPEED, SETUP = "correctness", "speed", "setup"


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

    @classmethod
    def of(cls, comparison: Comparison) -> "Outcome":
        """A comparison against the reference (fastcse.testing) as a case's outcome."""
        return cls(comparison.ok, comparison.numbers, comparison.reason)


class Skip(Exception):
    """Raised by a case that cannot run here (missing package, variant absent, ...): the reason is reported."""


def skip_case(reason: str) -> Callable[..., Outcome]:
    """A case that is known at planning time not to run (takes and ignores the device)."""

    def case(*_unused):
        raise Skip(reason)

    return case


def exception_summary(error: BaseException) -> str:
    """The exception and where it came from, in one line (the JSON keeps the short traceback)."""
    frames = traceback.extract_tb(error.__traceback__)
    where = f" at {Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else ""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}{where}"[:500]


def count_statuses(checks: Iterable[Check]) -> dict[str, int]:
    counts = {PASS: 0, FAIL: 0, SKIPPED: 0}
    for check in checks:
        counts[check.status] += 1
    return counts
