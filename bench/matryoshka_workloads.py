"""The workloads of bench/test_bench_matryoshka.py: the Matryoshka loss (sum over dimensions m_k
of w_k times InfoNCE on the first m_k coordinates, each prefix normalized), forward + backward on
the same embeddings (B anchors, B positives, one hard negative each), each factory returning
(setup, run) for bench/memory.py's fresh processes.

- fastcse_fused: ``fastcse.info_nce(..., matryoshka_dims=DIMS)``, one sweep over the coordinates.
- fastcse_per_dimension: ``fastcse.info_nce`` once per dimension on the prefixes, summed.
- fastcse_full_width: one ``fastcse.info_nce`` call at the full width (no Matryoshka): the cost
  the fused call is measured against.
- matryoshka_mnrl: sentence-transformers' ``MatryoshkaLoss(MultipleNegativesRankingLoss)``
  through its ``forward`` on a stand-in model whose forward returns the precomputed embeddings
  (MatryoshkaLoss shrinks and normalizes them per dimension and reruns MNRL once per dimension).
- matryoshka_cached_mnrl: ``MatryoshkaLoss(CachedMultipleNegativesRankingLoss(mini_batch_size))``:
  the decorated ``calculate_loss(..., with_backward=True)`` on the embeddings (the part that
  replaces the loss; the embedding passes are not timed), as bench/variant_workloads.py does.
"""

from __future__ import annotations

from workloads import backward_step, random_triplets, zero_grads

import fastcse
from fastcse.gpu_check.peers import EmbeddingModel

TEMPERATURE = 0.05


def dims_for(dim: int) -> tuple[int, ...]:
    """768 -> (768, 512, 256, 128, 64); other widths (the smoke run) scaled alike."""
    return tuple(max(1, dim * m // 768) for m in (768, 512, 256, 128, 64))


def _fastcse(batch: int, dim: int, loss_of):
    return lambda: random_triplets(batch, dim), backward_step(loss_of)


def fastcse_fused(batch: int, dim: int):
    dims = dims_for(dim)
    return _fastcse(batch, dim, lambda a, p, n: fastcse.info_nce(a, p, n, temperature=TEMPERATURE,
                                                                 matryoshka_dims=dims))


def fastcse_per_dimension(batch: int, dim: int):
    dims = dims_for(dim)

    def loss_of(a, p, n):
        return sum(fastcse.info_nce(a[:, :m], p[:, :m], n[:, :m], temperature=TEMPERATURE) for m in dims)

    return _fastcse(batch, dim, loss_of)


def fastcse_full_width(batch: int, dim: int):
    return _fastcse(batch, dim, lambda a, p, n: fastcse.info_nce(a, p, n, temperature=TEMPERATURE))


def matryoshka_mnrl(batch: int, dim: int):
    from sentence_transformers.sentence_transformer.losses import MatryoshkaLoss, MultipleNegativesRankingLoss

    model = EmbeddingModel(dim)
    loss_fn = MatryoshkaLoss(model, MultipleNegativesRankingLoss(model, scale=1.0 / TEMPERATURE), dims_for(dim))

    def loss_of(*state):
        return loss_fn([{"embedding": t} for t in state], None)

    return lambda: random_triplets(batch, dim), backward_step(loss_of)


def matryoshka_cached_mnrl(batch: int, dim: int, mini_batch_size: int = 32):
    from sentence_transformers.sentence_transformer.losses import (CachedMultipleNegativesRankingLoss,
                                                                   MatryoshkaLoss)

    model = EmbeddingModel(dim)
    inner = CachedMultipleNegativesRankingLoss(model, scale=1.0 / TEMPERATURE, mini_batch_size=mini_batch_size)
    MatryoshkaLoss(model, inner, dims_for(dim))  # decorates inner.calculate_loss with the dimensions

    def run(state):
        zero_grads(state)
        return inner.calculate_loss([[t] for t in state], None, with_backward=True)

    return lambda: random_triplets(batch, dim), run
