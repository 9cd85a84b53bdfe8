"""The problem every backend solves: one anchor block against one candidate block.

``fastcse.ops`` states the backend contract; :func:`describe` is its one validated description,
shared by ``fastcse.cpu`` and ``fastcse.triton_info_nce`` so that both accept exactly the same
problems (each backend adds only what it supports, e.g. its dtypes).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LossProblem:
    """Row i's target is candidate pos_start + i; its own hard negatives are candidates
    neg_start + i * num_neg + t (t < num_neg), whose logits get ``weight``."""

    batch: int
    dim: int
    num_candidates: int
    tau: float
    pos_start: int
    neg_start: int
    num_neg: int
    normalize: bool
    symmetric: bool
    weight: float  # the hard negatives' logit bias; 0.0 without hard negatives

    @property
    def inv_tau(self) -> float:
        return 1.0 / self.tau

    @property
    def has_bias(self) -> bool:
        return self.num_neg > 0 and self.weight != 0.0


def describe(anchor: torch.Tensor, candidates: torch.Tensor, tau: float, *, pos_start: int, neg_start: int,
             num_neg: int, normalize: bool, symmetric: bool, hard_negative_weight: float) -> LossProblem:
    """The checked description of a backend call (the public checks are in ``fastcse.loss``)."""
    if candidates.dtype != anchor.dtype:
        raise TypeError(f"candidates have dtype {candidates.dtype} but anchor has {anchor.dtype}")
    batch, dim = anchor.shape
    if candidates.dim() != 2 or candidates.shape[1] != dim:
        raise ValueError(f"candidates must be [N, {dim}] like the anchors, got {tuple(candidates.shape)}")
    num_candidates = candidates.shape[0]
    weight = float(hard_negative_weight) if num_neg else 0.0
    if symmetric and (pos_start != 0 or num_candidates < batch):
        raise ValueError("symmetric needs the positives as the first B candidates")
    if symmetric and weight and neg_start < batch:
        # The reverse direction (over the positive block) is unbiased; the backends score the
        # positive block once for both directions, so a bias inside it would leak into the reverse.
        raise ValueError("symmetric with hard_negative_weight needs the hard negatives after the positives")
    return LossProblem(batch=batch, dim=dim, num_candidates=num_candidates, tau=float(tau), pos_start=pos_start,
                       neg_start=neg_start, num_neg=num_neg, normalize=bool(normalize), symmetric=bool(symmetric),
                       weight=weight)
