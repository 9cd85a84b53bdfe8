"""The workloads of bench/test_bench_variants.py: sentence-transformers 6's loss variants,
forward + backward on the same embeddings, each factory returning (setup, run).

- floor: the variant's matrix products (``fastcse.cpu.matrix_products``: scores and the two
  gradient products per direction block) as bare matmuls on preallocated inputs.
- fastcse: ``fastcse.info_nce`` with the variant (CPU backend), or with one of ROW_OPTIONS
  (group ids, a queue: fastcse only, compared with the floor and with the same call without
  the option, ``without_row_option=True``).
- mnrl: sentence-transformers' ``MultipleNegativesRankingLoss.compute_loss_from_embeddings``.
- cached_mnrl: ``CachedMultipleNegativesRankingLoss.calculate_loss(..., with_backward=True)``,
  its loss over the whole batch computed ``mini_batch_size`` rows of the score matrix at a
  time (the part of CachedMNRL that replaces MNRL's loss; the embedding passes are not timed).
"""

from __future__ import annotations

import torch
from workloads import backward_step, random_triplets, zero_grads

import fastcse
from fastcse.cpu import matrix_products
from fastcse.problem import describe, resolve_variant

GTE = ("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc")
# name -> MultipleNegativesRankingLoss keywords (fastcse.info_nce takes the same ones).
VARIANTS = {
    "query_to_doc": dict(),
    "symmetric": dict(directions=("query_to_doc", "doc_to_query"), partition_mode="per_direction"),
    "query_to_doc+doc_to_query joint": dict(directions=("query_to_doc", "doc_to_query"), partition_mode="joint"),
    "GTE: all four joint": dict(directions=GTE, partition_mode="joint"),
    "in_batch_negatives 9": dict(hardness_mode="in_batch_negatives", hardness_strength=9.0),
    "hard_negatives 5": dict(hardness_mode="hard_negatives", hardness_strength=5.0),
}
# fastcse-only options (false negatives, a queue, several positives; no sentence-transformers
# counterpart): name -> how to build them.
QUEUE = 65536
ROW_OPTIONS = {
    "group_ids (groups of 4)": "groups",
    f"extra_negatives Q={QUEUE}": "queue",
}
TEMPERATURE = 0.05


def queue_size(variant: str, batch: int) -> int:
    """The queue of a row-option case (scaled down with B for the smoke run)."""
    return min(QUEUE, 4 * batch) if ROW_OPTIONS.get(variant) == "queue" else 0


def _row_options(variant: str, batch: int, dim: int) -> dict:
    kind = ROW_OPTIONS.get(variant)
    gen = torch.Generator().manual_seed(1)
    if kind == "groups":  # every id 4 times, in random rows: 3 false negatives per row to mask
        return dict(group_ids=torch.randperm(batch, generator=gen) // 4)
    if kind == "queue":  # detached, as a trainer's queue is
        return dict(extra_negatives=torch.randn(queue_size(variant, batch), dim, generator=gen))
    return {}


def products(variant: str, batch: int, dim: int) -> list[tuple[str, int]]:
    """fastcse's matrix products for this variant (B anchors, one hard negative each)."""
    anchor = torch.empty(batch, dim)
    extra = queue_size(variant, batch)
    candidates = torch.empty(2 * batch + extra, dim)
    problem = describe(anchor, candidates, TEMPERATURE, pos_start=0, neg_start=batch, num_neg=1, normalize=True,
                       hard_negative_weight=0.0, variant=resolve_variant(**VARIANTS.get(variant, {}), num_neg=1),
                       num_extra=extra)
    return matrix_products(problem)


def floor(batch: int, dim: int, variant: str = "query_to_doc"):
    plan = products(variant, batch, dim)

    def setup():
        gen = torch.Generator().manual_seed(0)
        queries = torch.randn(batch, dim, generator=gen)
        keys = {n: torch.randn(n, dim, generator=gen) for _, n in plan}
        return queries, keys

    def run(state):
        queries, keys = state
        scores = {}
        for kind, n in plan:
            if kind == "scores":
                scores[n] = queries @ keys[n].T
            elif kind == "dq":
                scores[n] @ keys[n]
            else:
                scores[n].T @ queries

    return setup, run


def fastcse_loss(batch: int, dim: int, variant: str = "query_to_doc", without_row_option: bool = False):
    """``without_row_option``: a row-option case's plain call (the same inputs, no ids / queue)."""
    row_options = {} if without_row_option else _row_options(variant, batch, dim)
    options = dict(VARIANTS.get(variant, {}), **row_options)

    return lambda: random_triplets(batch, dim), backward_step(
        lambda *state: fastcse.info_nce(*state, temperature=TEMPERATURE, **options))


def mnrl(batch: int, dim: int, variant: str = "query_to_doc"):
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    loss_fn = MultipleNegativesRankingLoss(None, scale=1.0 / TEMPERATURE, **VARIANTS[variant])

    return lambda: random_triplets(batch, dim), backward_step(
        lambda *state: loss_fn.compute_loss_from_embeddings(list(state), None))


def cached_mnrl(batch: int, dim: int, variant: str = "query_to_doc", mini_batch_size: int = 32):
    from sentence_transformers.sentence_transformer.losses import CachedMultipleNegativesRankingLoss

    # The loss never calls the model here; its constructor only inspects the first module.
    stand_in = torch.nn.Sequential(torch.nn.Identity())
    loss_fn = CachedMultipleNegativesRankingLoss(stand_in, scale=1.0 / TEMPERATURE, mini_batch_size=mini_batch_size,
                                                 **VARIANTS[variant])

    def run(state):
        zero_grads(state)
        return loss_fn.calculate_loss([[t] for t in state], None, with_backward=True)

    return lambda: random_triplets(batch, dim), run


FACTORIES = {"floor": floor, "fastcse": fastcse_loss, "mnrl": mnrl, "cached_mnrl": cached_mnrl}
