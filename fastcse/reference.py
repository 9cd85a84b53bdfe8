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
  sentence-transformers 6's ``MultipleNegativesRankingLoss`` variants, same names and meanings;
- ``false_negative_margin`` / ``margin_strategy`` / ``guide``: false negatives by similarity,
  the rule of ``fastcse.false_negatives`` (GISTEmbedLoss's with a guide model, Qwen3-Embedding's
  self-guided), materialized.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastcse.checks import DEFAULT_TEMPERATURE, NORMALIZE_EPS, accumulation_dtype
from fastcse.false_negatives import check_options, threshold
from fastcse.matryoshka import check_dims
from fastcse.problem import DOC_TO_DOC, DOC_TO_QUERY, QUERY_TO_DOC, QUERY_TO_QUERY, resolve_variant


def _pad_columns(mask: torch.Tensor, width: int) -> torch.Tensor:
    """mask [B, n] widened to [B, width] with False (the extra negatives' columns)."""
    return torch.cat([mask, mask.new_zeros(mask.shape[0], width - mask.shape[1])], dim=1)


def info_nce_reference(
    anchor: torch.Tensor,
    positive: torch.Tensor,
    negative: torch.Tensor | None = None,
    *,
    temperature: float | torch.Tensor = DEFAULT_TEMPERATURE,
    normalize: bool = True,
    symmetric: bool = False,
    hard_negative_weight: float = 0.0,
    directions: tuple[str, ...] | None = None,
    partition_mode: str | None = None,
    hardness_mode: str | None = None,
    hardness_strength: float = 0.0,
    group_ids: torch.Tensor | None = None,
    extra_negatives: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    reduction: str = "mean",
    matryoshka_dims: tuple[int, ...] | None = None,
    matryoshka_weights: tuple[float, ...] | None = None,
    false_negative_margin: float | None = None,
    margin_strategy: str = "absolute",
    guide: tuple[torch.Tensor, ...] | None = None,
    guide_extra_negatives: torch.Tensor | None = None,
) -> torch.Tensor:
    """InfoNCE with materialized logits (see :func:`_one_dimension_reference` for the options).

    ``matryoshka_dims`` / ``matryoshka_weights`` (Matryoshka representation learning): the sum
    over the dimensions m_k of w_k times the loss on the first m_k coordinates of every input,
    each prefix normalized on its own when ``normalize``; one call per dimension, for clarity."""
    options = dict(temperature=temperature, normalize=normalize, symmetric=symmetric,
                   hard_negative_weight=hard_negative_weight, directions=directions, partition_mode=partition_mode,
                   hardness_mode=hardness_mode, hardness_strength=hardness_strength, group_ids=group_ids,
                   labels=labels, false_negative_margin=false_negative_margin, margin_strategy=margin_strategy,
                   guide=guide, guide_extra_negatives=guide_extra_negatives)
    if matryoshka_dims is None and matryoshka_weights is None:
        return _one_dimension_reference(anchor, positive, negative, extra_negatives=extra_negatives,
                                        reduction=reduction, **options)
    dims, weights = check_dims(matryoshka_dims, matryoshka_weights, anchor.shape[1])
    rows = 0.0
    for m, w in zip(dims, weights):
        rows = rows + w * _one_dimension_reference(_prefix(anchor, m), _prefix(positive, m), _prefix(negative, m),
                                                   extra_negatives=_prefix(extra_negatives, m), reduction="none",
                                                   **options)
    return _reduced(rows, reduction)


def _prefix(x: torch.Tensor | None, m: int) -> torch.Tensor | None:
    return None if x is None else x[..., :m]


def _one_dimension_reference(
    anchor: torch.Tensor,
    positive: torch.Tensor,
    negative: torch.Tensor | None = None,
    *,
    temperature: float | torch.Tensor = DEFAULT_TEMPERATURE,
    normalize: bool = True,
    symmetric: bool = False,
    hard_negative_weight: float = 0.0,
    directions: tuple[str, ...] | None = None,
    partition_mode: str | None = None,
    hardness_mode: str | None = None,
    hardness_strength: float = 0.0,
    group_ids: torch.Tensor | None = None,
    extra_negatives: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    reduction: str = "mean",
    false_negative_margin: float | None = None,
    margin_strategy: str = "absolute",
    guide: tuple[torch.Tensor, ...] | None = None,
    guide_extra_negatives: torch.Tensor | None = None,
) -> torch.Tensor:
    """InfoNCE with materialized logits. Computes in the inputs' dtype (pass fp64 for a reference);
    the per-row losses come out in fp32 for 16-bit inputs.

    ``group_ids`` [B]: rows of one group are not each other's negatives (masked to -inf in every
    direction; hard and extra negatives never are). ``extra_negatives`` [Q, d]: more candidates
    after the hard negatives, query_to_doc only. ``labels`` [B]: every positive of the same label
    is a positive (the target is the mean of their logits; SupCon's L_out). ``false_negative_margin``:
    see ``fastcse.false_negatives`` (``guide_extra_negatives``: the guide's rows of the extra negatives)."""
    if group_ids is not None and labels is not None:
        raise ValueError("give group_ids or labels, not both")
    batch, dim = anchor.shape
    num_neg = 0 if negative is None else (1 if negative.dim() == 2 else negative.shape[1])
    variant = resolve_variant(symmetric=symmetric, directions=directions, partition_mode=partition_mode,
                              hardness_mode=hardness_mode, hardness_strength=hardness_strength, num_neg=num_neg)
    false_negatives = check_options(false_negative_margin, margin_strategy, guide, guide_extra_negatives,
                                    anchor=anchor, negative=negative, extra_negatives=extra_negatives)
    device = anchor.device
    if normalize:
        anchor, positive, negative, extra_negatives = (None if x is None else F.normalize(x, dim=-1)
                                                       for x in (anchor, positive, negative, extra_negatives))
    documents = positive if negative is None else torch.cat([positive, negative.reshape(batch * num_neg, dim)])
    candidates = documents if extra_negatives is None else torch.cat([documents, extra_negatives])
    width = candidates.shape[0]

    eye = torch.eye(batch, dtype=torch.bool, device=device)
    own_negatives = eye.repeat_interleave(num_neg, dim=1)  # [B, B k]: row i's own hard negatives
    own_documents = torch.cat([eye, own_negatives], dim=1)  # [B, B (1 + k)]
    same_label = eye if labels is None else labels[:, None] == labels[None, :]  # row i's positives
    same_group = torch.zeros_like(eye) if group_ids is None else (group_ids[:, None] == group_ids[None, :]) & ~eye
    positives_cells = _pad_columns(torch.cat([same_label, torch.zeros_like(own_negatives)], dim=1), width)

    sim = anchor @ candidates.T
    query_to_doc = sim / temperature
    if hard_negative_weight != 0.0:
        bias = _pad_columns(torch.cat([torch.zeros_like(eye), own_negatives], dim=1), width)
        query_to_doc = query_to_doc + hard_negative_weight * bias.to(query_to_doc.dtype)
    if variant.hardness_mode is not None:  # after the temperature, without gradient (Lan et al. 2025, eq. 5)
        penalized = {"hard_negatives": _pad_columns(torch.cat([torch.zeros_like(eye), own_negatives], dim=1), width),
                     "in_batch_negatives": ~_pad_columns(own_documents, width) & ~positives_cells,
                     "all_negatives": ~positives_cells}[variant.hardness_mode]
        query_to_doc = query_to_doc + variant.hardness_strength * sim.detach() * penalized.to(sim.dtype)
    group_mask = _pad_columns(same_group, width)
    scores = {QUERY_TO_DOC: query_to_doc.masked_fill(group_mask, float("-inf"))}
    if QUERY_TO_QUERY in variant.directions:
        scores[QUERY_TO_QUERY] = (anchor @ anchor.T / temperature).masked_fill(eye | same_group, float("-inf"))
    if DOC_TO_QUERY in variant.directions:
        scores[DOC_TO_QUERY] = (positive @ anchor.T / temperature).masked_fill(same_group, float("-inf"))
    if DOC_TO_DOC in variant.directions:
        masked = own_documents | _pad_columns(same_group, documents.shape[0])
        scores[DOC_TO_DOC] = (positive @ documents.T / temperature).masked_fill(masked, float("-inf"))
    if false_negatives is not None:
        guide_sims = _guide_similarities(false_negatives, anchor, positive, documents, candidates)
        scores = _leave_out_false_negatives(scores, guide_sims, false_negatives, positives_cells, eye)
    return _reduced(_row_losses(scores, same_label, variant.joint, accumulation_dtype(anchor)), reduction)


def _row_losses(scores: dict[str, torch.Tensor], same_label: torch.Tensor, joint: bool, dtype) -> torch.Tensor:
    """log Z - target per row: Z over every direction (joint) or the mean of the directions' log Z."""
    scores = {name: s.to(dtype) for name, s in scores.items()}
    # The positives' logits (never biased or penalized), averaged over each row's positives.
    positive_logits = scores[QUERY_TO_DOC][:, : same_label.shape[0]]
    target = torch.where(same_label, positive_logits, 0.0).sum(1) / same_label.sum(1)
    if joint:
        log_z = torch.logsumexp(torch.cat(list(scores.values()), dim=1), dim=1)
    else:
        log_z = torch.stack([torch.logsumexp(s, dim=1) for s in scores.values()]).mean(0)
    return log_z - target


def _guide_similarities(options, anchor, positive, documents, candidates) -> dict[str, torch.Tensor]:
    """The guide's similarity of each direction's (query, key) pairs, in the directions' layouts.

    A guide: the cosines of its rows (in the accumulation dtype). Self-guided: the loss's own
    similarities (cosine or dot product as ``normalize``), without gradient."""
    if options.guided:
        dtype = accumulation_dtype(anchor)
        anchor, positive, negative, extra = (None if x is None else F.normalize(x.to(dtype), dim=-1, eps=NORMALIZE_EPS)
                                             for x in (options.guide_anchor, options.guide_positive,
                                                       options.guide_negative, options.guide_extra_negatives))
        documents = positive if negative is None else torch.cat([positive, negative])
        candidates = documents if extra is None else torch.cat([documents, extra])
    anchor, positive, documents, candidates = (x.detach() for x in (anchor, positive, documents, candidates))
    return {QUERY_TO_DOC: anchor @ candidates.T, QUERY_TO_QUERY: anchor @ anchor.T, DOC_TO_QUERY: positive @ anchor.T,
            DOC_TO_DOC: positive @ documents.T}


def _leave_out_false_negatives(scores, guide_sims, options, positives_cells, eye) -> dict[str, torch.Tensor]:
    """-inf on the keys whose guide similarity is strictly above row i's threshold, from t_i =
    the guide's (anchor i, positive i): never row i's targets (query_to_doc), nor its own anchor
    (doc_to_query)."""
    batch = eye.shape[0]
    limit = threshold(guide_sims[QUERY_TO_DOC][:, :batch].diagonal(), options.margin, options.strategy)[:, None]
    spared = {QUERY_TO_DOC: positives_cells, DOC_TO_QUERY: eye}
    masked = {}
    for name, block in scores.items():
        left_out = guide_sims[name] > limit
        if name in spared:
            left_out &= ~spared[name]
        masked[name] = block.masked_fill(left_out, float("-inf"))
    return masked


def _reduced(loss: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss
