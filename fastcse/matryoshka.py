"""Matryoshka representation learning (Kusupati et al. 2022): the rules of its two keywords.

The loss is ``sum_k w_k * loss_k``, ``loss_k`` the same call's loss on the first ``m_k``
coordinates of every embedding (each prefix L2-normalized on its own with ``normalize=True``).
``fastcse.loss``, ``fastcse.reference``, the distributed path and the integrations all check the
keywords here, so that a set of dimensions means the same thing everywhere.

Canonical form (what ``fastcse.problem.LossProblem`` holds): the dimensions sorted ascending,
their weights in the same order. Ascending, because the prefixes nest: the coordinate segments
between consecutive dimensions are what one sweep over d walks through.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence

from fastcse import checks


def _as_int(value):
    """An int (Python or numpy / torch integer scalars), else None; bools are no dimension."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def check_dims(dims, weights, dim: int | None) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """(dimensions ascending, their weights), or ((), ()) for ``dims`` None.

    ``dims``: a non-empty sequence of distinct ints in [1, dim], any order (``dim`` itself need not
    be listed). ``weights``: None (1 each, as sentence-transformers' MatryoshkaLoss) or one finite
    number per dimension, in ``dims``' order. ``dim`` None: the embeddings' d is not known yet
    (a module's construction), only the lower bound is checked."""
    if dims is None:
        if weights is not None:
            raise ValueError("matryoshka_weights given without matryoshka_dims: the weights apply to the dimensions")
        return (), ()
    if isinstance(dims, (str, bytes)) or not isinstance(dims, Sequence):
        raise TypeError(f"matryoshka_dims must be a sequence of ints (e.g. (768, 512, 256)), got {dims!r}")
    if len(dims) == 0:
        raise ValueError("matryoshka_dims must hold at least one dimension, got an empty sequence")
    ints = [_as_int(m) for m in dims]
    if any(m is None or m < 1 or (dim is not None and m > dim) for m in ints):
        bound = "positive ints" if dim is None else f"ints in [1, {dim}] (the embeddings' dim)"
        raise ValueError(f"matryoshka_dims must hold {bound}, got {tuple(dims)!r}")
    if len(set(ints)) != len(ints):
        raise ValueError(f"matryoshka_dims must be distinct, got {tuple(ints)}")
    if weights is None:
        weights = [1.0] * len(ints)
    elif isinstance(weights, (str, bytes)) or not isinstance(weights, Sequence) or len(weights) != len(ints):
        raise ValueError(f"matryoshka_weights must be None or one number per dimension ({len(ints)}), got {weights!r}")
    else:
        weights = [checks.finite_float(f"matryoshka_weights[{i}]", w) for i, w in enumerate(weights)]
    order = sorted(range(len(ints)), key=ints.__getitem__)
    return tuple(ints[i] for i in order), tuple(float(weights[i]) for i in order)


def segments(dims: tuple[int, ...]) -> list[tuple[int, int]]:
    """The coordinate segments [lo, hi) between consecutive ascending dimensions, from 0."""
    bounds = (0, *dims)
    return list(zip(bounds[:-1], bounds[1:]))
