"""The plain PyTorch InfoNCE that every test and benchmark compares against.

Written for clarity, not speed: it materializes the full B x N logits matrix and
calls ``F.cross_entropy``. Its semantics define fastcse's (see ../shared/DESIGN.md):

- candidates are the positives (column i is anchor i's target) followed by the
  hard negatives, ``negative[i, t]`` at column ``B + i * k + t``;
- ``hard_negative_weight`` is added to the logits of anchor i with its own hard
  negatives only (SimCSE);
- ``symmetric`` averages the anchor->candidate loss with the positive->anchor
  loss (positives as queries, anchors as candidates, no bias).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def info_nce_reference(
    anchor: torch.Tensor,
    positive: torch.Tensor,
    negative: torch.Tensor | None = None,
    *,
    temperature: float | torch.Tensor = 0.05,
    normalize: bool = True,
    symmetric: bool = False,
    hard_negative_weight: float = 0.0,
    reduction: str = "mean",
) -> torch.Tensor:
    """InfoNCE with materialized logits. Computes in the inputs' dtype (pass fp64 for a reference)."""
    batch = anchor.shape[0]
    if normalize:
        anchor = F.normalize(anchor, dim=-1)
        positive = F.normalize(positive, dim=-1)
        if negative is not None:
            negative = F.normalize(negative, dim=-1)
    candidates = positive
    num_neg = 0
    if negative is not None:
        negative = negative.reshape(batch, -1, anchor.shape[-1])
        num_neg = negative.shape[1]
        candidates = torch.cat([positive, negative.reshape(batch * num_neg, -1)])
    logits = anchor @ candidates.T / temperature
    if num_neg and hard_negative_weight != 0.0:
        bias = torch.zeros_like(logits)
        rows = torch.arange(batch).repeat_interleave(num_neg)
        cols = batch + torch.arange(batch * num_neg)
        bias[rows, cols] = hard_negative_weight
        logits = logits + bias
    target = torch.arange(batch, device=anchor.device)
    loss = F.cross_entropy(logits.float() if logits.dtype != torch.float64 else logits, target, reduction="none")
    if symmetric:
        reverse = positive @ anchor.T / temperature
        reverse = reverse.float() if reverse.dtype != torch.float64 else reverse
        loss = (loss + F.cross_entropy(reverse, target, reduction="none")) / 2
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss
