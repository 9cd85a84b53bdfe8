"""The plain PyTorch InfoNCE that every test and benchmark compares against.

Written for clarity, not speed: it materializes every B x N score matrix and calls
``torch.logsumexp``. Its semantics define fastcse's (see ../shared/DESIGN.md and
``fastcse.problem`` for the loss family):

- candidates are the positives (column i is anchor i's target) followed by the
  hard negatives, ``negative[i, t]`` at column ``B + i * k + t``;
- ``hard_negative_weight`` is added to the logits of anchor i with its own hard
  negatives only (SimCSE);
- ``symmetric`` averages the anchor->candidate loss with the positive->anchor
  loss (positives as queries, anchors as candidates, no bias);
- ``directions`` / ``partition_mode`` / ``hardness_mode`` / ``hardness_strength``:
  sentence-transformers 6's ``MultipleNegativesRankingLoss`` variants, same names and meanings.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastcse.problem import DOC_TO_DOC, DOC_TO_QUERY, QUERY_TO_DOC, QUERY_TO_QUERY, resolve_variant


def _own_documents(batch: int, num_neg: int, device) -> torch.Tensor:
    """[B, N] bool: row i's own documents (its positive and its hard negatives)."""
    own = torch.eye(batch, dtype=torch.bool, device=device)
    if num_neg:
        own_negatives = torch.eye(batch, dtype=torch.bool, device=device).repeat_interleave(num_neg, dim=1)
        own = torch.cat([own, own_negatives], dim=1)
    return own


def _penalized(hardness_mode: str | None, own_documents: torch.Tensor, own_negatives: torch.Tensor):
    """[B, N] bool: the query_to_doc negatives that get the hardness penalty, or None."""
    if hardness_mode is None:
        return None
    if hardness_mode == "hard_negatives":
        return own_negatives
    if hardness_mode == "in_batch_negatives":
        return ~own_documents  # every other row's documents
    return ~(own_documents & ~own_negatives)  # all_negatives: all but the positive


def info_nce_reference(
    anchor: torch.Tensor,
    positive: torch.Tensor,
    negative: torch.Tensor | None = None,
    *,
    temperature: float | torch.Tensor = 0.05,
    normalize: bool = True,
    symmetric: bool = False,
    hard_negative_weight: float = 0.0,
    directions: tuple[str, ...] | None = None,
    partition_mode: str | None = None,
    hardness_mode: str | None = None,
    hardness_strength: float = 0.0,
    reduction: str = "mean",
) -> torch.Tensor:
    """InfoNCE with materialized logits. Computes in the inputs' dtype (pass fp64 for a reference);
    the per-row losses come out in fp32 for 16-bit inputs."""
    batch, dim = anchor.shape
    num_neg = 0 if negative is None else (1 if negative.dim() == 2 else negative.shape[1])
    variant = resolve_variant(symmetric=symmetric, directions=directions, partition_mode=partition_mode,
                              hardness_mode=hardness_mode, hardness_strength=hardness_strength, num_neg=num_neg)
    if normalize:
        anchor = F.normalize(anchor, dim=-1)
        positive = F.normalize(positive, dim=-1)
        if negative is not None:
            negative = F.normalize(negative, dim=-1)
    documents = positive if negative is None else torch.cat([positive, negative.reshape(batch * num_neg, dim)])
    own_documents = _own_documents(batch, num_neg, anchor.device)
    eye = torch.eye(batch, dtype=torch.bool, device=anchor.device)

    sim = anchor @ documents.T
    query_to_doc = sim / temperature
    own_negatives = own_documents.clone()
    own_negatives[:, :batch] = False
    if num_neg and hard_negative_weight != 0.0:
        query_to_doc = query_to_doc + hard_negative_weight * own_negatives.to(query_to_doc.dtype)
    penalized = _penalized(variant.hardness_mode, own_documents, own_negatives)
    if penalized is not None:  # after the temperature, without gradient (Lan et al. 2025, eq. 5)
        query_to_doc = query_to_doc + variant.hardness_strength * sim.detach() * penalized.to(sim.dtype)
    scores = {QUERY_TO_DOC: query_to_doc}
    if QUERY_TO_QUERY in variant.directions:
        scores[QUERY_TO_QUERY] = (anchor @ anchor.T / temperature).masked_fill(eye, float("-inf"))
    if DOC_TO_QUERY in variant.directions:
        scores[DOC_TO_QUERY] = positive @ anchor.T / temperature
    if DOC_TO_DOC in variant.directions:
        scores[DOC_TO_DOC] = (positive @ documents.T / temperature).masked_fill(own_documents, float("-inf"))
    if anchor.dtype != torch.float64:
        scores = {name: s.float() for name, s in scores.items()}
    target = scores[QUERY_TO_DOC].diagonal()  # column i: positive i, never biased or penalized
    if variant.joint:
        log_z = torch.logsumexp(torch.cat(list(scores.values()), dim=1), dim=1)
    else:
        log_z = torch.stack([torch.logsumexp(s, dim=1) for s in scores.values()]).mean(0)
    loss = log_z - target
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss
