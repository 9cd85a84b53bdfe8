"""fastcse's fused InfoNCE as a sentence-transformers loss.

``InfoNCELoss`` is a drop-in for ``MultipleNegativesRankingLoss`` (MNRL): it takes the same
dataset columns ``(anchor, positive, negative_1, ..., negative_k)``, embeds them exactly as MNRL
does (so even dropout draws the same masks), and gives the same loss value and gradients, with
the logits never materialized. Correspondences with sentence-transformers 6:

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
- ``guide``, ``margin``, ``margin_strategy``, ``contrast_anchors``, ``contrast_positives``:
  ``GISTEmbedLoss`` (and ``CachedGISTEmbedLoss`` with caching), on the fused loss's
  false-negative rule; ``margin`` without a guide is self-guided (no GIST counterpart).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from fastcse import checks
from fastcse.false_negatives import MARGIN_STRATEGIES
from fastcse.loss import info_nce
from fastcse.matryoshka import check_dims
from fastcse.problem import DOC_TO_DOC, QUERY_TO_DOC, QUERY_TO_QUERY, SYMMETRIC_DIRECTIONS, resolve_variant

logger = logging.getLogger(__name__)

_INSTALL = "pip install 'fastcse[sentence-transformers]'"
_MIN_VERSION = "6.0"  # the first release with base.losses.CachedLossMixin and embed_columns; CI tests 6.0.1 and 6.3.0

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
    # _create_minibatch / _minibatch_ranges: the slicing CachedGISTEmbedLoss imports to run its guide
    # on the model's mini-batches; the guide here must see exactly those.
    from sentence_transformers.base.losses.gradcache import (_create_minibatch, _minibatch_ranges,
                                                             has_static_embedding_input)
    from sentence_transformers.base.losses.merged_forward import embed_columns
    from sentence_transformers.util import batch_to_device
except ImportError as exc:
    raise ImportError(
        f"fastcse.integrations.sentence_transformers needs sentence-transformers >= {_MIN_VERSION}, found "
        f"{getattr(sentence_transformers, '__version__', 'an unknown version')}. Upgrade with: "
        f"pip install -U 'sentence-transformers>={_MIN_VERSION}'") from exc

__all__ = ["InfoNCELoss"]

# GISTEmbedLoss's default temperature, InfoNCELoss's with a guide model (a drop-in for it).
_GIST_TEMPERATURE = 0.01


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


def _temperature(temperature, scale, guided: bool) -> float:
    """The temperature from ``temperature`` or ``scale``; by default MNRL's, or GISTEmbedLoss's with a guide."""
    if temperature is not None and scale is not None:
        raise ValueError(f"give temperature or scale (= 1 / temperature), not both; got "
                         f"temperature={temperature!r} and scale={scale!r}")
    if scale is not None:
        return 1.0 / checks.positive_float("scale", scale)
    if temperature is None:
        return _GIST_TEMPERATURE if guided else checks.DEFAULT_TEMPERATURE
    return checks.positive_float("temperature", temperature)


def _margin_setting(margin, margin_strategy, guided: bool) -> float | None:
    """The false-negative margin: None (no rule), GISTEmbedLoss's 0.0 with a guide by default."""
    checks.choice("margin_strategy", margin_strategy, MARGIN_STRATEGIES)
    if margin is None:
        return 0.0 if guided else None
    return checks.finite_float("margin", margin)


def _contrast_directions(directions, symmetric, contrast_anchors, contrast_positives,
                         guided: bool) -> tuple[tuple[str, ...], bool, bool]:
    """(directions, contrast_anchors, contrast_positives): GISTEmbedLoss's anchor-anchor block is
    query_to_query; its positive-positive block is doc_to_doc over the positives only (the hard
    negatives then travel as extra negatives, which doc_to_doc does not score). None: GISTEmbedLoss's
    default (True) with a guide, off without one."""
    anchors = guided if contrast_anchors is None else contrast_anchors
    positives = guided if contrast_positives is None else contrast_positives
    for name, value in (("contrast_anchors", anchors), ("contrast_positives", positives)):
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be a bool or None (GISTEmbedLoss's default), got {value!r}")
    directions = tuple(directions)
    if positives and DOC_TO_DOC in directions:
        raise ValueError("give contrast_positives=True (GISTEmbedLoss's positive-positive block: positives only) "
                         "or 'doc_to_doc' in directions (MNRL's: positives and hard negatives), not both")
    if contrast_anchors is False and QUERY_TO_QUERY in directions:
        raise ValueError("contrast_anchors=False contradicts 'query_to_query' in directions: give one or the other")
    if symmetric and (anchors or positives):
        raise ValueError("symmetric=True averages per-direction softmaxes; contrast_anchors / contrast_positives "
                         "add blocks to one joint softmax: with symmetric=True set both to False")
    added = (QUERY_TO_QUERY,) if anchors and QUERY_TO_QUERY not in directions else ()
    return directions + added + ((DOC_TO_DOC,) if positives else ()), anchors, positives


def _guide_retokenizes(model, guide) -> bool:
    """GISTEmbedLoss's test: the guide re-tokenizes the text when its vocabulary differs from the
    model's or it reads fewer tokens; both need a transformers tokenizer to decode and encode."""
    from transformers import PreTrainedTokenizerBase

    for name, owner in (("model", model), ("guide", guide)):
        if not isinstance(getattr(owner, "tokenizer", None), PreTrainedTokenizerBase):
            raise ValueError(f"guide needs the model and the guide to have a transformers tokenizer (as "
                             f"GISTEmbedLoss), but the {name}'s tokenizer is "
                             f"{type(getattr(owner, 'tokenizer', None)).__name__}")
    return model.tokenizer.get_vocab() != guide.tokenizer.get_vocab() or guide.max_seq_length < model.max_seq_length


def _guide_features(features: dict[str, Any], guide, tokenizer) -> dict[str, Any]:
    """The guide's input for the rows ``features`` holds: a shallow copy (a model writes its outputs
    into the dict it is given), or with ``tokenizer`` (the model's) the decoded text tokenized by
    the guide, as GISTEmbedLoss and CachedGISTEmbedLoss do."""
    if tokenizer is None:
        return dict(features)
    input_ids = features["input_ids"]
    if "cu_seq_lens_q" in features:  # flattened rows: one sequence, cut at the offsets
        flat, offsets = input_ids[0].tolist(), features["cu_seq_lens_q"].tolist()
        input_ids = [flat[start:end] for start, end in zip(offsets[:-1], offsets[1:])]
    decoded = tokenizer.batch_decode(input_ids, skip_special_tokens=True)
    return batch_to_device(guide.preprocess(decoded), guide.device)


def _concatenated(minibatches: list[Tensor]) -> Tensor:
    return torch.cat(minibatches) if len(minibatches) > 1 else minibatches[0]


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
        guide: a guide ``SentenceTransformer`` (``GISTEmbedLoss``'s): it embeds the batch once,
            without gradient (cached: step 1's mini-batches, right after the model's), and a key
            whose guide similarity to row i's query exceeds the threshold from guide(anchor i,
            positive i) is left out of row i's softmax (``fastcse.info_nce(guide=...)``). With a
            guide the defaults are GISTEmbedLoss's: temperature 0.01, margin 0.0, both contrasts.
        margin, margin_strategy: the threshold, t_i - margin ("absolute") or t_i - |t_i| margin
            ("relative"). A margin without a guide is self-guided: the model's own similarity.
        contrast_anchors: GISTEmbedLoss's anchor-anchor block (the ``query_to_query`` direction).
        contrast_positives: its positive-positive block (``doc_to_doc`` over the positives only).

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
        guide: nn.Module | None = None,
        margin: float | None = None,
        margin_strategy: str = "absolute",
        contrast_anchors: bool | None = None,
        contrast_positives: bool | None = None,
    ) -> None:
        super().__init__()
        guided = guide is not None
        self.temperature = _temperature(temperature, scale, guided)
        self.margin = _margin_setting(margin, margin_strategy, guided)
        self.margin_strategy = margin_strategy
        directions, self.contrast_anchors, self.contrast_positives = _contrast_directions(
            directions, symmetric, contrast_anchors, contrast_positives, guided)
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
        if self.contrast_positives and (hardness_mode is not None or hard_negative_weight != 0.0):
            raise ValueError("contrast_positives passes the hard negatives as extra negatives (GISTEmbedLoss's "
                             "positive-positive block leaves them out), which get no own-row hard_negative_weight "
                             "and another hardness_mode: use neither with contrast_positives=True")
        if not isinstance(gather_across_devices, bool):
            raise TypeError(f"gather_across_devices must be a bool, got {gather_across_devices!r}")
        caching = _check_caching(model, mini_batch_size, mini_batch_num_tokens, sort_by_length)
        self.matryoshka_dims, self.matryoshka_weights = _matryoshka_setting(model, matryoshka_dims, matryoshka_weights,
                                                                            n_dims_per_step)
        self.n_dims_per_step = n_dims_per_step
        self.model = model
        self.guide = guide
        # The model's tokenizer where the guide must re-read the text (else the guide takes the model's tensors).
        self._guide_tokenizer = model.tokenizer if guided and _guide_retokenizes(model, guide) else None
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
        # The guide's embeddings of the batch being computed: per column, per mini-batch.
        self._guide_columns: list[list[Tensor]] | None = None

    @property
    def scale(self) -> float:
        return 1.0 / self.temperature

    def forward(self, sentence_features: Iterable[dict[str, Tensor]], labels: Tensor | None = None) -> Tensor:
        sentence_features = list(sentence_features)
        if len(sentence_features) < 2:
            raise ValueError(f"InfoNCELoss needs (anchor, positive[, negative_1, ...]) columns, got "
                             f"{len(sentence_features)} column(s)")
        self._guide_columns = [] if self.guide is not None else None
        try:
            if not self.uses_gradient_cache:
                return self._forward_plain(sentence_features)
            if not self.sort_by_length:
                return self.forward_cached(sentence_features, labels)
            sorted_features, inverses = zip(*(_sort_rows_by_length(f) for f in sentence_features))
            # calculate_loss runs inside forward_cached (GradCache step 2); the backward-time replay
            # re-embeds the sorted features, whose order matches the cached gradients.
            self._row_order_inverses = list(inverses)
            return self.forward_cached(list(sorted_features), labels)
        finally:
            self._row_order_inverses = None
            self._guide_columns = None

    def _forward_plain(self, sentence_features: list[dict[str, Any]]) -> Tensor:
        """The loss without gradient caching: the columns embedded as MNRL embeds them, then the
        guide's embeddings of the same rows, without gradient, as GISTEmbedLoss does (in that order,
        so that a guide in train mode draws its dropout where GISTEmbedLoss's does)."""
        if self.guide is not None:
            guide_features = [_guide_features(f, self.guide, self._guide_tokenizer) for f in sentence_features]
        embeddings = embed_columns(self.model, sentence_features)
        if self.guide is not None:
            with torch.no_grad():
                self._guide_columns = [[g] for g in embed_columns(self.guide, guide_features)]
        return self.calculate_loss([[column] for column in embeddings])

    def embed_minibatch_iter(self, sentence_feature, with_grad, copy_random_state, random_states=None, ranges=None):
        """CachedLossMixin's mini-batch embeddings; in step 1 (no gradient) each mini-batch is also
        embedded by the guide, right after the model, as CachedGISTEmbedLoss does. The backward-time
        replay (with gradient) re-embeds the model's mini-batches only."""
        embeddings = super().embed_minibatch_iter(sentence_feature, with_grad, copy_random_state,
                                                  random_states=random_states, ranges=ranges)
        if with_grad or self._guide_columns is None:
            yield from embeddings
            return
        if ranges is None:
            ranges = _minibatch_ranges(sentence_feature, self.mini_batch_size, self.mini_batch_num_tokens)
        column: list[Tensor] = []
        self._guide_columns.append(column)
        for (begin, end), embedded in zip(ranges, embeddings):
            minibatch = _create_minibatch(sentence_feature, begin, end)
            with torch.no_grad():
                column.append(self.guide(_guide_features(minibatch, self.guide, self._guide_tokenizer))
                              ["sentence_embedding"])
            yield embedded

    def calculate_loss(self, reps: list[list[Tensor]], labels: Tensor | None = None, *,
                       with_backward: bool = False) -> Tensor:
        """The loss over the whole batch from per-column lists of mini-batch embeddings.

        With ``with_backward`` (GradCache step 2) the loss is back-propagated to the embeddings,
        whose ``.grad`` become the cache, and returned detached.
        """
        columns = self._in_row_order([_concatenated(column) for column in reps])
        guide = None if self._guide_columns is None else \
            self._in_row_order([_concatenated(column) for column in self._guide_columns])
        if self.hard_negative_weight != 0.0 and len(columns) < 3:
            raise ValueError(f"hard_negative_weight={self.hard_negative_weight} applies to hard negatives, but the "
                             "batch has only (anchor, positive) columns: add negative columns or set it to 0.0")
        group, world_size = self._process_group()
        anchor, positive, negative, row_keywords = self._batch_operands(columns, guide, world_size > 1)
        keywords = dict(temperature=self.temperature, hard_negative_weight=self.hard_negative_weight,
                        process_group=group, **self._variant_options, **row_keywords)
        matryoshka = self._matryoshka_step()
        # Matryoshka in the loss's one sweep on every backend (MatryoshkaLoss reruns the loss per dimension).
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

    def _in_row_order(self, columns: list[Tensor]) -> list[Tensor]:
        """The columns back in the batch's row order after length-sorted mini-batches."""
        if self._row_order_inverses is None:
            return columns
        return [c if inv is None else c.index_select(0, inv.to(c.device))
                for c, inv in zip(columns, self._row_order_inverses)]

    def _batch_operands(self, columns: list[Tensor], guide: list[Tensor] | None,
                        gathered: bool) -> tuple[Tensor, Tensor, Tensor | None, dict]:
        """(anchor, positive, negative [B, k, d] or None, info_nce's row keywords) of one batch."""
        anchor, positive, *negatives = columns
        guide_negatives = [] if guide is None else guide[2:]
        keywords = {} if self.margin is None else dict(false_negative_margin=self.margin,
                                                       margin_strategy=self.margin_strategy)
        if negatives and self.contrast_positives:
            if gathered:
                raise ValueError("contrast_positives with hard negatives cannot gather across devices: the hard "
                                 "negatives travel as extra negatives (so that doc_to_doc leaves them out, as "
                                 "GISTEmbedLoss's positive-positive block), and extra negatives are not gathered")
            # query_to_doc scores extra negatives as it scores pooled hard negatives (no own-row weight
            # or hardness here, refused at construction); doc_to_doc does not score them.
            keywords["extra_negatives"] = torch.cat(negatives)
            if guide is not None:
                keywords.update(guide=tuple(guide[:2]), guide_extra_negatives=torch.cat(guide_negatives))
            return anchor, positive, None, keywords
        if guide is not None:
            keywords["guide"] = (*guide[:2], torch.stack(guide_negatives, dim=1)) if negatives else tuple(guide[:2])
        # [B, k, d]: negative[i, t] is row i of negative column t, anchor i's own t-th hard negative
        return anchor, positive, torch.stack(negatives, dim=1) if negatives else None, keywords

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
            "guide": self.guide,
            "margin": self.margin,
            "margin_strategy": self.margin_strategy,
            "contrast_anchors": self.contrast_anchors,
            "contrast_positives": self.contrast_positives,
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
