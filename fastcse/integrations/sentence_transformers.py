"""fastcse's fused InfoNCE as a sentence-transformers loss.

``InfoNCELoss`` is a drop-in for ``MultipleNegativesRankingLoss`` (MNRL): it takes the same
dataset columns ``(anchor, positive, negative_1, ..., negative_k)``, embeds them exactly as MNRL
does (so even dropout draws the same masks), and gives the same loss value and gradients, with
the logits never materialized. Correspondences with sentence-transformers 6.2:

- ``scale = 1 / temperature`` (MNRL's ``scale=20`` is ``temperature=0.05``); cosine similarity.
- ``symmetric=True`` is ``MultipleNegativesSymmetricRankingLoss``, i.e. MNRL with
  ``directions=("query_to_doc", "doc_to_query"), partition_mode="per_direction"``: the reverse
  direction scores each positive against the anchors only, the forward one includes negatives.
- ``mini_batch_size=m`` is ``CachedMultipleNegativesRankingLoss(mini_batch_size=m)``: GradCache,
  with sentence-transformers' own machinery for the two embedding passes (mini-batch slicing,
  RNG replay so dropout repeats, the backward hook, DDP synchronization), but the loss itself
  computed once over the whole batch with the fused kernel instead of once per mini-batch.
  ``mini_batch_num_tokens`` is its token budget (mini-batches of at most that many real tokens).
- Length-aware mini-batches (``sort_by_length=True``, the default with caching): each column's
  rows are sorted by length before sentence-transformers cuts them into mini-batches, which it
  trims to their own longest row, so a mini-batch pads to sentences of its own length; the
  embeddings go back in row order before the loss. The loss and gradients are the batch's, as
  without sorting; only which rows share a forward, hence the dropout draws, differ from
  CachedMNRL's (``sort_by_length=False`` keeps its mini-batches, draw for draw).
- MNRL stacks the negative columns column by column (all first negatives, then all second
  negatives); fastcse's layout is negative[i, t] at column B + i*k + t. The candidate order
  does not change a softmax loss, so both give the same value and gradients.
- ``directions``, ``partition_mode``, ``hardness_mode``, ``hardness_strength``: MNRL's (and
  CachedMNRL's) keywords, defaults and meanings, on the fused kernel (``fastcse.problem``);
  the combinations MNRL refuses raise the same ValueError, with its reason.
- ``hard_negative_weight`` is SimCSE's constant added to the logits of each anchor with its own
  hard negatives. It has no MNRL counterpart (MNRL's ``hardness_mode="hard_negatives"`` adds
  ``strength * stop_grad(cos)`` instead); 0.0 (the default) is plain MNRL.
- ``matryoshka_dims``, ``matryoshka_weights``, ``n_dims_per_step``: ``MatryoshkaLoss`` around
  (Cached)MNRL, its dimensions drawn from the same ``random.sample``; one fused call for every
  dimension on the CPU backend (docs/sentence-transformers.md).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from fastcse import checks
from fastcse.loss import info_nce
from fastcse.matryoshka import check_dims
from fastcse.problem import QUERY_TO_DOC, SYMMETRIC_DIRECTIONS, resolve_variant

logger = logging.getLogger(__name__)

_INSTALL = "pip install 'fastcse[sentence-transformers]'"
_MIN_VERSION = "6.0"  # the first release with base.losses.CachedLossMixin and embed_columns; tested on 6.2

try:
    import sentence_transformers
except ImportError as exc:
    if exc.name != "sentence_transformers":
        raise  # installed but broken (one of its own imports failed): that error says more
    raise ImportError(
        f"fastcse.integrations.sentence_transformers needs the sentence-transformers package, which is not "
        f"installed. Install it with: {_INSTALL}") from exc

try:
    # CachedLossMixin (the shared GradCache engine) and embed_columns (MNRL's merged column forward)
    # are what make this loss replay and embed exactly like sentence-transformers' own losses.
    from sentence_transformers.base.losses import CachedLossMixin
    from sentence_transformers.base.losses.gradcache import has_static_embedding_input
    from sentence_transformers.base.losses.merged_forward import embed_columns
except ImportError as exc:
    raise ImportError(
        f"fastcse.integrations.sentence_transformers needs sentence-transformers >= {_MIN_VERSION}, found "
        f"{getattr(sentence_transformers, '__version__', 'an unknown version')}. Upgrade with: "
        f"pip install -U 'sentence-transformers>={_MIN_VERSION}'") from exc

__all__ = ["InfoNCELoss"]


# Feature keys that are per-row token tensors, safe to reorder along the batch dimension.
_ROW_KEYS = {"input_ids", "attention_mask", "token_type_ids", "position_ids"}


def _sort_rows_by_length(features: dict[str, Any]) -> tuple[dict[str, Any], Tensor | None]:
    """(the features with rows sorted by token count, the inverse permutation), or the features
    unchanged and None where reordering is not plainly safe (flattened inputs, images, ...)."""
    mask = features.get("attention_mask")
    tensor_keys = {k for k, v in features.items() if isinstance(v, Tensor)}
    if not isinstance(mask, Tensor) or mask.dim() != 2 or not tensor_keys <= _ROW_KEYS:
        return features, None
    rows = mask.shape[0]
    if any(features[k].dim() == 0 or features[k].shape[0] != rows for k in tensor_keys):
        return features, None
    order = torch.argsort(mask.sum(dim=1), stable=True)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(rows, device=order.device)
    return {k: v.index_select(0, order) if k in tensor_keys else v for k, v in features.items()}, inverse


def _variant_options(symmetric, directions, partition_mode, hardness_mode, hardness_strength) -> dict:
    """``resolve_variant``'s keywords from MNRL's. MNRL's directions and partition_mode have
    defaults where fastcse's are None: at their defaults they are left out under ``symmetric``
    (its shorthand), and anything else is passed on for resolve_variant to refuse beside it."""
    at_defaults = tuple(directions) == (QUERY_TO_DOC,) and partition_mode == "joint"
    leave_out = symmetric is True and at_defaults
    return dict(symmetric=symmetric, directions=None if leave_out else tuple(directions),
                partition_mode=None if leave_out else partition_mode, hardness_mode=hardness_mode,
                hardness_strength=hardness_strength)


def _check_caching(model, mini_batch_size, mini_batch_num_tokens, sort_by_length) -> bool:
    """Whether the loss caches gradients (GradCache), after checking its keywords."""
    if mini_batch_size is not None and (isinstance(mini_batch_size, bool) or not isinstance(mini_batch_size, int)
                                        or mini_batch_size < 1):
        raise ValueError(f"mini_batch_size must be None (no gradient caching) or a positive int, "
                         f"got {mini_batch_size!r}")
    if mini_batch_num_tokens is not None and (isinstance(mini_batch_num_tokens, bool)
                                              or not isinstance(mini_batch_num_tokens, int)
                                              or mini_batch_num_tokens < 1):
        raise ValueError(f"mini_batch_num_tokens must be None or a positive int, got {mini_batch_num_tokens!r}")
    if not isinstance(sort_by_length, bool):
        raise TypeError(f"sort_by_length must be a bool, got {sort_by_length!r}")
    caching = mini_batch_size is not None or mini_batch_num_tokens is not None
    if caching and has_static_embedding_input(model):
        raise ValueError("mini_batch_size needs a model whose inputs split along the batch dimension; a "
                         "StaticEmbedding model's do not: use mini_batch_size=None")
    return caching


def _untruncated_dimension(model) -> int | None:
    """The model's embedding width before any ``truncate_dim`` (None: no model, or not known)."""
    for name in ("_get_untruncated_embedding_dimension", "get_embedding_dimension"):
        getter = getattr(model, name, None)
        if callable(getter):
            return getter()
    return None


def _matryoshka_setting(model, dims, weights, n_dims_per_step) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """(dims, weights) in MatryoshkaLoss's order, widest first: its ``n_dims_per_step`` draw picks
    indices into that order, and ours must pick the same ones from the same seed. () without dims."""
    width = _untruncated_dimension(model)
    ascending, ascending_weights = check_dims(dims, weights, width)
    if n_dims_per_step != -1 and (isinstance(n_dims_per_step, bool) or not isinstance(n_dims_per_step, int)
                                  or n_dims_per_step < 1):
        raise ValueError(f"n_dims_per_step must be -1 (every dimension each step) or a positive int, "
                         f"got {n_dims_per_step!r}")
    if n_dims_per_step != -1 and not ascending:
        raise ValueError("n_dims_per_step was given without matryoshka_dims: it picks among those dimensions")
    if ascending and width is not None and width not in ascending:
        logger.warning(f"The model's embedding dimension {width} is not in matryoshka_dims {tuple(dims)}: the full "
                       "embedding is not trained, so the model may do worse untruncated. Add it to matryoshka_dims.")
    return ascending[::-1], ascending_weights[::-1]


def _per_dimension_info_nce(anchor, positive, negative, *, matryoshka_dims, matryoshka_weights, extra_negatives=None,
                            **keywords) -> Tensor:
    """sum_k w_k * info_nce(the first m_k coordinates): Matryoshka as one call per dimension, where
    the backend has no one-sweep form (the Triton kernels, for now): MatryoshkaLoss's cost."""
    def prefix(x, m):
        return None if x is None else x[..., :m]

    return sum(w * info_nce(anchor[:, :m], positive[:, :m], prefix(negative, m),
                            extra_negatives=prefix(extra_negatives, m), **keywords)
               for m, w in zip(matryoshka_dims, matryoshka_weights))


class InfoNCELoss(CachedLossMixin, nn.Module):
    """MultipleNegativesRankingLoss (and its symmetric and cached variants) on fastcse's fused kernel.

    Args:
        model: the ``SentenceTransformer`` to train.
        temperature: softmax temperature; give this or ``scale`` (= 1 / temperature), not both.
            Default 0.05 (MNRL's ``scale=20``).
        scale: sentence-transformers' name for 1 / temperature.
        symmetric: add the positive -> anchor direction and average the two (MNSRL): shorthand
            for ``directions=("query_to_doc", "doc_to_query"), partition_mode="per_direction"``.
        directions, partition_mode, hardness_mode, hardness_strength: as in
            ``MultipleNegativesRankingLoss`` (sentence-transformers 6).
        hard_negative_weight: SimCSE's constant added to each anchor's logits with its own hard
            negatives (the dataset's third and later columns). 0.0 is MNRL.
        mini_batch_size: None for the plain loss; an int for the gradient-cached loss, whose
            activation memory is bounded by mini-batches of this many rows per column
            (CachedMNRL's ``mini_batch_size``).
        mini_batch_num_tokens: gradient caching with mini-batches of at most this many real
            (non-padding) tokens per column (CachedMNRL's ``mini_batch_num_tokens``; it takes
            precedence over ``mini_batch_size``, as there).
        sort_by_length: with gradient caching, sort each column's rows by length before they
            are cut into mini-batches (less padding; the same loss and gradients up to dropout
            draws). Default True.
        gather_across_devices: under ``torch.distributed``, score the local anchors against the
            candidates of every rank (``fastcse.info_nce(process_group=...)``); as in MNRL this
            is a no-op when torch.distributed is not initialized. The gradients are MNRL's; the
            returned value is the global-batch loss on every rank (MNRL returns each rank's
            local mean).
        matryoshka_dims, matryoshka_weights, n_dims_per_step: ``MatryoshkaLoss``'s: the loss is
            sum_k w_k * (this loss on the first m_k coordinates, each prefix normalized), computed
            in one sweep over the embedding (``fastcse.info_nce(matryoshka_dims=...)``); weights
            default 1; ``n_dims_per_step=n > 0`` sums n dimensions per step, drawn with Python's
            ``random.sample`` exactly as MatryoshkaLoss draws them (same seed, same dimensions).

    Inputs: ``(anchor, positive)`` pairs or ``(anchor, positive, negative_1, ..., negative_k)``
    tuples, any column names, no labels.
    """

    def __init__(
        self,
        model,
        temperature: float | None = None,
        scale: float | None = None,
        symmetric: bool = False,
        hard_negative_weight: float = 0.0,
        mini_batch_size: int | None = None,
        gather_across_devices: bool = False,
        mini_batch_num_tokens: int | None = None,
        sort_by_length: bool = True,
        directions: tuple[str, ...] = ("query_to_doc",),
        partition_mode: str = "joint",
        hardness_mode: str | None = None,
        hardness_strength: float = 0.0,
        matryoshka_dims: tuple[int, ...] | None = None,
        matryoshka_weights: tuple[float, ...] | None = None,
        n_dims_per_step: int = -1,
    ) -> None:
        super().__init__()
        if temperature is not None and scale is not None:
            raise ValueError(f"give temperature or scale (= 1 / temperature), not both; got "
                             f"temperature={temperature!r} and scale={scale!r}")
        if scale is not None:
            temperature = 1.0 / checks.positive_float("scale", scale)
        self.temperature = checks.DEFAULT_TEMPERATURE if temperature is None \
            else checks.positive_float("temperature", temperature)
        # The checks (and reasons) of MNRL's constructor; the variant is resolved per batch, when
        # the number of negative columns is known.
        self._variant_options = _variant_options(symmetric, directions, partition_mode, hardness_mode,
                                                 hardness_strength)
        resolve_variant(**self._variant_options, num_neg=1)
        if hardness_mode is not None and hardness_strength == 0.0:
            logger.warning(f"hardness_mode={hardness_mode!r} is set but hardness_strength=0.0, so hardness "
                           "weighting has no effect. Set hardness_strength to a positive value to enable it.")
        # Finite now; that it needs negative columns is checked per batch, when they are known.
        checks.finite_float("hard_negative_weight", hard_negative_weight)
        if not isinstance(gather_across_devices, bool):
            raise TypeError(f"gather_across_devices must be a bool, got {gather_across_devices!r}")
        caching = _check_caching(model, mini_batch_size, mini_batch_num_tokens, sort_by_length)
        self.matryoshka_dims, self.matryoshka_weights = _matryoshka_setting(model, matryoshka_dims, matryoshka_weights,
                                                                            n_dims_per_step)
        self.n_dims_per_step = n_dims_per_step
        self.model = model
        self.symmetric = symmetric
        self.directions = SYMMETRIC_DIRECTIONS if symmetric else tuple(directions)
        self.partition_mode = "per_direction" if symmetric else partition_mode
        self.hardness_mode = hardness_mode
        self.hardness_strength = float(hardness_strength)
        self.hard_negative_weight = float(hard_negative_weight)
        self._mini_batch_size_given = mini_batch_size
        # CachedLossMixin reads both; with a token budget only, the count bound is the batch.
        self.mini_batch_size = mini_batch_size if mini_batch_size is not None or not caching else 2**31 - 1
        self.mini_batch_num_tokens = mini_batch_num_tokens
        self.sort_by_length = sort_by_length
        self.gather_across_devices = gather_across_devices
        # Read by MatryoshkaLoss and AdaptiveLayerLoss: True makes them wrap calculate_loss
        # instead of patching the model's forward, which the backward-time replay would miss.
        self.uses_gradient_cache = caching
        self._row_order_inverses: list[Tensor | None] | None = None

    @property
    def scale(self) -> float:
        return 1.0 / self.temperature

    def forward(self, sentence_features: Iterable[dict[str, Tensor]], labels: Tensor | None = None) -> Tensor:
        sentence_features = list(sentence_features)
        if len(sentence_features) < 2:
            raise ValueError(f"InfoNCELoss needs (anchor, positive[, negative_1, ...]) columns, got "
                             f"{len(sentence_features)} column(s)")
        if not self.uses_gradient_cache:
            return self.calculate_loss([[column] for column in embed_columns(self.model, sentence_features)])
        if not self.sort_by_length:
            return self.forward_cached(sentence_features, labels)
        sorted_features, inverses = zip(*(_sort_rows_by_length(f) for f in sentence_features))
        # calculate_loss runs inside forward_cached (GradCache step 2); the backward-time replay
        # re-embeds the sorted features, whose order matches the cached gradients.
        self._row_order_inverses = list(inverses)
        try:
            return self.forward_cached(list(sorted_features), labels)
        finally:
            self._row_order_inverses = None

    def calculate_loss(self, reps: list[list[Tensor]], labels: Tensor | None = None, *,
                       with_backward: bool = False) -> Tensor:
        """The loss over the whole batch from per-column lists of mini-batch embeddings.

        With ``with_backward`` (GradCache step 2) the loss is back-propagated to the embeddings,
        whose ``.grad`` become the cache, and returned detached.
        """
        columns = [torch.cat(column) if len(column) > 1 else column[0] for column in reps]
        if self._row_order_inverses is not None:  # length-sorted mini-batches: back to row order
            columns = [c if inv is None else c.index_select(0, inv.to(c.device))
                       for c, inv in zip(columns, self._row_order_inverses)]
        anchor, positive, *negatives = columns
        if self.hard_negative_weight != 0.0 and not negatives:
            raise ValueError(f"hard_negative_weight={self.hard_negative_weight} applies to hard negatives, but the "
                             "batch has only (anchor, positive) columns: add negative columns or set it to 0.0")
        # [B, k, d]: negative[i, t] is row i of negative column t, anchor i's own t-th hard negative
        negative = torch.stack(negatives, dim=1) if negatives else None
        group, world_size = self._process_group()
        keywords = dict(temperature=self.temperature, hard_negative_weight=self.hard_negative_weight,
                        process_group=group, **self._variant_options)
        matryoshka = self._matryoshka_step()
        if matryoshka and anchor.device.type != "cpu":
            loss = _per_dimension_info_nce(anchor, positive, negative, **matryoshka, **keywords)
        else:
            loss = info_nce(anchor, positive, negative, **matryoshka, **keywords)
        if world_size > 1:
            # fastcse's distributed loss hands each rank the gradient of the global mean; the
            # Trainer's DDP then averages gradients over ranks. Scale the gradient (not the
            # reported value) by the world size so the update is the global-batch gradient, as
            # with MNRL's gathered loss.
            loss = loss + (world_size - 1) * (loss - loss.detach())
        if with_backward:
            loss.backward()
            loss = loss.detach()
        return loss

    def _matryoshka_step(self) -> dict:
        """This step's ``matryoshka_dims`` / ``matryoshka_weights`` keywords ({} without them): every
        dimension, or ``n_dims_per_step`` of them drawn as MatryoshkaLoss draws them, one
        ``random.sample`` of indices into the widest-first order per step."""
        dims, weights, count = self.matryoshka_dims, self.matryoshka_weights, self.n_dims_per_step
        if not dims:
            return {}
        picked = range(len(dims))
        if 0 < count < len(dims):
            picked = sorted(random.sample(picked, count))
        return dict(matryoshka_dims=tuple(dims[i] for i in picked),
                    matryoshka_weights=tuple(weights[i] for i in picked))

    def _process_group(self):
        if self.gather_across_devices and torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.group.WORLD, torch.distributed.get_world_size()
        return None, 1

    def get_config_dict(self) -> dict[str, Any]:
        return {
            "temperature": self.temperature,
            "symmetric": self.symmetric,
            "directions": self.directions,
            "partition_mode": self.partition_mode,
            "hardness_mode": self.hardness_mode,
            "hardness_strength": self.hardness_strength,
            "hard_negative_weight": self.hard_negative_weight,
            "mini_batch_size": self._mini_batch_size_given,
            "mini_batch_num_tokens": self.mini_batch_num_tokens,
            "sort_by_length": self.sort_by_length,
            "gather_across_devices": self.gather_across_devices,
            "matryoshka_dims": self.matryoshka_dims or None,
            "matryoshka_weights": self.matryoshka_weights or None,
            "n_dims_per_step": self.n_dims_per_step,
        }

    @property
    def citation(self) -> str:
        return """
@inproceedings{gao2021simcse,
    title={{SimCSE}: Simple Contrastive Learning of Sentence Embeddings},
    author={Gao, Tianyu and Yao, Xingcheng and Chen, Danqi},
    booktitle={Empirical Methods in Natural Language Processing (EMNLP)},
    year={2021}
}
"""
