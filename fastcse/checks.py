"""The argument rules and numeric conventions that the loss, the trainer, the integrations and
the CLI share: each rule and constant lives here once.

Every check raises ``ValueError`` (a bad value) or ``TypeError`` (a bad type) with one line that
names the argument and says what was expected, and returns the value in its canonical type.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

# L2 normalization's floor on the norm, as ``torch.nn.functional.normalize``: a zero row stays
# zero instead of becoming NaN, and the backends agree with a plain ``F.normalize``.
NORMALIZE_EPS = 1e-12

# SimCSE's temperature (cosine similarity over 0.05, i.e. sentence-transformers' scale 20).
DEFAULT_TEMPERATURE = 0.05


def accumulation_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype that sums, norms and log-sum-exps are carried in: fp32 for fp32 and 16-bit inputs
    (16-bit accumulation loses the loss's precision), fp64 for fp64 inputs (gradcheck)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def positive_int(name: str, value, *, minimum: int = 1, allow_none: bool = False) -> int | None:
    """An int >= ``minimum`` (bools are refused: ``True`` is no count)."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def positive_float(name: str, value, *, allow_zero: bool = False) -> float:
    """A finite number > 0 (>= 0 with ``allow_zero``)."""
    if not _is_number(value) or not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        kind = "non-negative" if allow_zero else "positive"
        raise ValueError(f"{name} must be a finite {kind} number, got {value!r}")
    return float(value)


def finite_float(name: str, value) -> float:
    """Any finite number (a NaN or an infinite weight would turn every loss into NaN)."""
    if not _is_number(value) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def choice(name: str, value, choices: Iterable):
    """One of ``choices`` (compared with ==), else an error listing them."""
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(repr(c) for c in choices)}, got {value!r}")
    return value


def hard_negative_weight(value, has_negatives: bool) -> float:
    """SimCSE's log-weight on each anchor's own hard negatives: finite, and only with negatives."""
    if not _is_number(value) or not math.isfinite(value):
        raise ValueError(f"hard_negative_weight must be a finite float, got {value!r}")
    if value != 0 and not has_negatives:
        raise ValueError("hard_negative_weight is non-zero but negative is None: the weight applies to hard negatives")
    return float(value)
