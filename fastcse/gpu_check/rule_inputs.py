"""Inputs for the correctness cases of false negatives by similarity that keep a gap around every
row's threshold, so that the backend and the fp64 reference leave out the same keys.

The rule compares each (query, key) similarity with its row's threshold, a step function: a
similarity within a backend's rounding of the threshold may fall on the other side in the
kernels than in the fp64 reference, which then computes another loss (one cell's softmax
probability, ~1e-3 of a row: past fp32's tolerance). Random rows at the GPU shapes put some of
their ~10^6 cells within 10^-6 of the threshold, and self-guided bf16 kernels see cosines of
rows rounded to bf16 (errors up to ~2^-8). Random rows also leave nothing out at d >= 384 (in-batch
cosines ~ 1/sqrt(d), far below a positive's). So these rows are built from a few exact levels
instead: every cosine of the rule is one of a handful of values, some above and some below each
row's threshold, none within GAP_NEEDED of it.

The construction (an orthonormal basis u_c (clusters), v_i (one per row), z (shared), rotated
into d dimensions, rows scaled by random norms): row i of cluster c = i mod CLUSTERS,

    anchor_i   = ALPHA u_c + sqrt(1 - ALPHA^2) v_i
    positive_i = g_i u_c + sqrt(1 - g_i^2) v_i          g_i in POSITIVE_LEVELS
    negative_i = h u_c + sqrt(1 - h^2) z                h in NEGATIVE_LEVELS

so that the cosines are ALPHA g_j, ALPHA h, ALPHA^2, g_i g_j, g_i h within a cluster, 0 across
clusters, and t_i = ALPHA g_i + sqrt(1 - ALPHA^2) sqrt(1 - g_i^2). With MARGINS' margins each
direction (query_to_doc's positives and hard negatives, query_to_query, doc_to_query, doc_to_doc)
has keys left out and keys kept, every one at least 0.05 from its row's threshold.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fastcse.checks import NORMALIZE_EPS
from fastcse.false_negatives import threshold

CLUSTERS = 4  # coprime to the 3 positive levels: every cluster holds rows of every level
ALPHA = 0.75
POSITIVE_LEVELS = (0.2, 0.5, 0.95)
NEGATIVE_LEVELS = (0.5, 0.95)
# (strategy, margin) for which every cosine of the levels above keeps >= 0.05 from its threshold.
MARGINS = {"absolute": 0.3, "relative": 0.17}
# The smallest gap a case must keep: bf16's unit roundoff 2^-8, the most a 16-bit kernel's cosine
# of two unit rows can be off by (the rows are rounded to 16 bits before their product).
GAP_NEEDED = 2.0 ** -8


def _basis(batch: int, dim: int, seed: int) -> torch.Tensor:
    """[CLUSTERS + batch + 1, dim] orthonormal rows (fp64): u_0.., v_0.., z, rotated at random."""
    count = CLUSTERS + batch + 1
    if count > dim:
        raise ValueError(f"clustered rows need d >= B + {CLUSTERS + 1}, got B = {batch}, d = {dim}")
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(dim, count, generator=gen, dtype=torch.float64))
    return q.T


def _mix(first: torch.Tensor, second: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
    return level[:, None] * first + (1 - level**2).sqrt()[:, None] * second


def clustered_rows(batch: int, num_neg: int, dim: int, seed: int, queue: int = 0) -> list[torch.Tensor | None]:
    """fp32 anchors, positives, negatives ([B, d] for k = 1, else [B, k, d]) and, with ``queue``, that
    many extra rows (levels as the negatives', clusters by row), built as the module docstring says."""
    basis = _basis(batch, dim, seed)
    clusters, rows, shared = basis[:CLUSTERS], basis[CLUSTERS:CLUSTERS + batch], basis[-1].expand(batch, dim)
    index = torch.arange(batch)
    u = clusters[index % CLUSTERS]
    anchor = _mix(u, rows, torch.full((batch,), ALPHA, dtype=torch.float64))
    positive = _mix(u, rows, torch.tensor(POSITIVE_LEVELS, dtype=torch.float64)[index % len(POSITIVE_LEVELS)])
    levels = torch.tensor(NEGATIVE_LEVELS, dtype=torch.float64)
    negative = torch.stack([_mix(u, shared, levels[(index + r) % len(levels)]) for r in range(num_neg)], 1) \
        if num_neg else None
    out = [anchor, positive, negative[:, 0] if num_neg == 1 else negative]
    if queue:
        slots = torch.arange(queue)
        out.append(_mix(clusters[slots % CLUSTERS], basis[-1].expand(queue, dim), levels[slots % len(levels)]))
    gen = torch.Generator().manual_seed(seed + 1)  # norms in [0.5, 2]: the cosine must not depend on them
    return [None if x is None else (x * (0.5 + 1.5 * torch.rand(*x.shape[:-1], 1, generator=gen,
                                                                  dtype=torch.float64))).float() for x in out]


def threshold_gap(tensors, keywords: dict) -> float | None:
    """The smallest |similarity - threshold| of the rule over every cell of the four directions, in
    fp64 from the rows both functions are given (None without the rule): the guide's, or the
    inputs' own cosines when self-guided."""
    margin = keywords.get("false_negative_margin")
    if margin is None:
        return None
    guide = keywords.get("guide")
    rows = list(guide) if guide is not None else [x for x in tensors[:3] if x is not None]
    extra = keywords.get("guide_extra_negatives") if guide is not None else keywords.get("extra_negatives")
    if extra is not None:
        rows.append(extra)
    unit = [F.normalize(x.detach().cpu().double().reshape(-1, x.shape[-1]), dim=-1, eps=NORMALIZE_EPS) for x in rows]
    anchor, positive = unit[:2]
    has_negative = len(rows) - (extra is not None) == 3
    documents = torch.cat(unit[1:3]) if has_negative else positive
    candidates = torch.cat(unit[1:])
    limit = threshold((anchor * positive).sum(1), margin, keywords.get("margin_strategy", "absolute"))[:, None]
    cells = (anchor @ candidates.T, anchor @ anchor.T, positive @ anchor.T, positive @ documents.T)
    return min((block - limit).abs().min().item() for block in cells)


def level_gap(strategy: str) -> float:
    """The smallest gap the levels keep under MARGINS[strategy] (what threshold_gap finds on clustered rows)."""
    margin, beta = MARGINS[strategy], math.sqrt(1 - ALPHA**2)
    gaps = []
    for g in POSITIVE_LEVELS:
        t = ALPHA * g + beta * math.sqrt(1 - g**2)
        limit = float(threshold(torch.tensor(t, dtype=torch.float64), margin, strategy))
        cosines = [ALPHA * x for x in POSITIVE_LEVELS + NEGATIVE_LEVELS] + [ALPHA**2, 1.0, 0.0, t] + \
                  [g * x for x in POSITIVE_LEVELS + NEGATIVE_LEVELS]
        gaps += [abs(c - limit) for c in cosines]
    return min(gaps)
