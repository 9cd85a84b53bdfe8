"""The workloads of bench/test_bench_false_negatives.py: false negatives by similarity, forward +
backward on the same embeddings (B anchors, B positives, one hard negative each), each factory
returning (setup, run) for bench/memory.py.

- plain: ``fastcse.info_nce`` without the rule (the baseline of the targets).
- self_guided: ``false_negative_margin=MARGIN``, the loss's own similarities as the guide.
- guided: the same with ``guide=`` a guide model's embeddings of the same width d.
- gist_math: GISTEmbedLoss's loss on precomputed embeddings: its forward after the embedding
  passes (the guide's and the model's similarity matrices, ``mask_false_negatives``, the
  cross-entropy), with the cosine as normalize + matmul (``fastcse.gpu_check.peers``, which the
  GPU kit times too). (GISTEmbedLoss's own
  ``sim_matrix``, ``nn.CosineSimilarity`` over [B, 1, d] x [1, N, d], broadcasts a B x N x d
  tensor: 50 GB at B = 4096, d = 768.)
- cached_gist: ``CachedGISTEmbedLoss.calculate_loss(..., with_backward=True)`` as shipped (its
  own ``sim_matrix``), ``mini_batch_size`` rows at a time: the part that replaces GISTEmbedLoss's
  loss; the embedding passes are not timed. Its constructor needs two models with tokenizers,
  which the loss never calls here: the instance is built without it (``_cached_gist_loss``).

Every implementation scores the same keys: GISTEmbedLoss with contrast_anchors=True,
contrast_positives=False is fastcse's directions=("query_to_doc", "query_to_query") (joint)
with the guide's rule, so guided, gist_math and cached_gist compute the same loss.
"""

from __future__ import annotations

import torch
from workloads import backward_step, zero_grads

import fastcse
from fastcse.gpu_check.peers import gist_loss_from_embeddings

TEMPERATURE = 0.05
MARGIN = 0.05  # GISTEmbedLoss's absolute margin (Qwen3-Embedding's self-guided rule is -0.1)
DIRECTIONS = ("query_to_doc", "query_to_query")


def _embeddings(batch: int, dim: int, seed: int = 0):
    """anchor, positive, one hard negative per anchor: [B, d] leaves that require grad; positives
    close to their anchors and a few near-duplicate rows, so that the rule has keys to leave out."""
    gen = torch.Generator().manual_seed(seed)
    anchor = torch.randn(batch, dim, generator=gen)
    positive = anchor + 0.7 * torch.randn(batch, dim, generator=gen)
    negative = torch.randn(batch, dim, generator=gen)
    duplicates = torch.randperm(batch, generator=gen)[: batch // 8]
    positive[duplicates] = positive[duplicates.roll(1)] + 0.1 * torch.randn(len(duplicates), dim, generator=gen)
    return [t.requires_grad_() for t in (anchor, positive, negative)]


def _guide(batch: int, dim: int):
    """A guide model's embeddings of the same rows (no gradient): another view of the inputs."""
    gen = torch.Generator().manual_seed(7)
    rows = _embeddings(batch, dim)
    return [(t.detach() + 0.3 * torch.randn(batch, dim, generator=gen)) for t in rows]


def fastcse_loss(batch: int, dim: int, rule: str = "plain"):
    """``rule``: "plain", "self_guided" or "guided"."""
    options = dict(directions=DIRECTIONS, partition_mode="joint")
    if rule != "plain":
        options["false_negative_margin"] = MARGIN
    if rule == "guided":
        options["guide"] = tuple(_guide(batch, dim))

    return lambda: _embeddings(batch, dim), backward_step(
        lambda *state: fastcse.info_nce(*state, temperature=TEMPERATURE, **options))


def gist_math(batch: int, dim: int):
    guide = _guide(batch, dim)

    def loss_of(*state):
        return gist_loss_from_embeddings(*state, guide, margin=MARGIN, temperature=TEMPERATURE)

    return lambda: _embeddings(batch, dim), backward_step(loss_of)


def _cached_gist_loss(mini_batch_size: int):
    """A CachedGISTEmbedLoss with the settings above, for ``calculate_loss`` only: its __init__
    checks two models' tokenizers, which the loss computation never reads."""
    from sentence_transformers.sentence_transformer.losses import CachedGISTEmbedLoss

    loss_fn = CachedGISTEmbedLoss.__new__(CachedGISTEmbedLoss)
    torch.nn.Module.__init__(loss_fn)
    loss_fn.temperature = TEMPERATURE
    loss_fn.similarity_fct = torch.nn.CosineSimilarity(dim=-1)
    loss_fn.mini_batch_size = mini_batch_size
    loss_fn.show_progress_bar = False
    loss_fn.margin_strategy, loss_fn.margin = "absolute", MARGIN
    loss_fn.contrast_anchors, loss_fn.contrast_positives = True, False
    loss_fn.gather_across_devices = False
    loss_fn.cross_entropy_loss = torch.nn.CrossEntropyLoss()
    return loss_fn


def cached_gist(batch: int, dim: int, mini_batch_size: int = 32):
    loss_fn = _cached_gist_loss(mini_batch_size)
    guide = [[t] for t in _guide(batch, dim)]

    def run(state):
        zero_grads(state)
        return loss_fn.calculate_loss([[t] for t in state], guide, with_backward=True)

    return lambda: _embeddings(batch, dim), run
