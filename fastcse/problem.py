"""The problem every backend solves: one anchor block against one candidate block.

A :class:`LossProblem` is the one description of a call of the fused loss: ``fastcse.loss`` and
``fastcse.distributed`` each build one with :func:`describe` and hand it, with its tensors, to
``fastcse.ops.info_nce_call`` (the op's one front door); the op rebuilds it from its flat
arguments for ``fastcse.cpu`` and ``fastcse.triton_info_nce``, so both backends accept exactly
the same problems (each adds only what it supports, e.g. its dtypes). :data:`DIRECTION_ROLES`
is the one table of what each direction reads (query rows, keys, mask), which both backends
follow. :func:`resolve_variant` turns the user's loss-variant keywords (sentence-transformers
6's names) into the canonical form the description holds; ``fastcse.loss``,
``fastcse.reference`` and the sentence-transformers integration all call it, so a variant
means the same thing everywhere.

The loss family (sentence-transformers' ``MultipleNegativesRankingLoss`` with ``directions``,
``partition_mode`` and ``hardness_mode``). Row i has up to four *directions* of scores, each a
query against a key set, all divided by the temperature:

- ``query_to_doc``: anchor i against every candidate (the positives, then the hard negatives);
  its own hard negatives get ``hard_negative_weight`` (SimCSE), and the hardness penalty
  ``hardness_strength * sim`` (no gradient) is added to the negatives ``hardness_mode`` picks.
  Its column ``pos_start + i`` is the positive: the target of every row's loss.
- ``query_to_query``: anchor i against every anchor but itself.
- ``doc_to_query``: positive i against every anchor (``symmetric``'s reverse direction).
- ``doc_to_doc``: positive i against every candidate except its own row's documents (its
  positive and its own hard negatives).

``joint``: row i's loss is one log-sum-exp over the concatenated directions minus the target
logit. Per direction: the mean of the directions' log-sum-exps minus the target logit.

Per-row ids (false negatives, several positives per row), over the positive block (candidates
[0, P)) and the anchor keys ([0, P) as well: both hold every row in the same order), row i
being id ``ids[pos_start + i]``:

- ``id_mode="group"`` (false negatives): in every direction, the keys j != i of the positive
  block / anchor keys with row i's id are left out of row i's softmax. Hard negatives and extra
  negatives are never masked.
- ``id_mode="label"`` (several positives, SupCon's L_out): the target logit is the mean of
  query_to_doc's scores over the positive columns with row i's label (itself included); those
  are spared by the hardness penalty. Nothing is masked.

Extra negatives (a queue): the last ``num_extra`` candidates, scored by query_to_doc only (not
by doc_to_doc), never anyone's own documents (so in_batch_negatives and all_negatives penalize
them, hard_negatives does not).

False negatives by similarity (``false_negative_margin``, ``margin_strategy``, ``guide_dim``):
in every direction, the keys whose guide similarity to row i's query exceeds row i's threshold
are left out, but row i's target(s) and doc_to_query's own anchor; the rule and its guide are
``fastcse.false_negatives``'.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import NamedTuple

import torch

from fastcse import checks

QUERY_TO_DOC = "query_to_doc"
QUERY_TO_QUERY = "query_to_query"
DOC_TO_QUERY = "doc_to_query"
DOC_TO_DOC = "doc_to_doc"
DIRECTIONS = (QUERY_TO_DOC, QUERY_TO_QUERY, DOC_TO_QUERY, DOC_TO_DOC)  # the canonical order
PARTITION_MODES = ("joint", "per_direction")
HARDNESS_MODES = ("in_batch_negatives", "hard_negatives", "all_negatives")
SYMMETRIC_DIRECTIONS = (QUERY_TO_DOC, DOC_TO_QUERY)
ID_MODES = ("group", "label")
MARGIN_STRATEGIES = ("absolute", "relative")  # false negatives by similarity: fastcse.false_negatives

# The operands a direction reads. Each backend maps an operand to its rows and to the one
# gradient buffer those rows' gradient accumulates in (the positives and the documents are
# rows of the candidates, so their key gradient is the candidates' buffer).
ANCHORS = "anchors"  # the B anchors
POSITIVES = "positives"  # candidates [pos_start, pos_start + B)
CANDIDATES = "candidates"  # all N candidates
DOCUMENTS = "documents"  # the candidates less the extra negatives: [0, N - num_extra)
ANCHOR_KEYS = "anchor_keys"  # the anchors as keys: the anchors themselves, or every rank's
# A direction's mask: the cells of row i that are -inf before the log-sum-exp.
MASK_SELF = "self"  # the key anchor_start + i: the anchor itself
MASK_OWN_DOCUMENTS = "own_documents"  # candidate pos_start + i and row i's own hard negatives


class DirectionRole(NamedTuple):
    """What one direction scores: its query rows against its keys, less its mask's cells."""

    queries: str  # ANCHORS or POSITIVES
    keys: str  # CANDIDATES, ANCHOR_KEYS or DOCUMENTS
    mask: str | None  # None, MASK_SELF or MASK_OWN_DOCUMENTS
    # The target, the hard-negative bias and the hardness penalty: query_to_doc's alone.
    holds_target: bool = False


DIRECTION_ROLES = {
    QUERY_TO_DOC: DirectionRole(ANCHORS, CANDIDATES, None, holds_target=True),
    QUERY_TO_QUERY: DirectionRole(ANCHORS, ANCHOR_KEYS, MASK_SELF),
    DOC_TO_QUERY: DirectionRole(POSITIVES, ANCHOR_KEYS, None),
    DOC_TO_DOC: DirectionRole(POSITIVES, DOCUMENTS, MASK_OWN_DOCUMENTS),
}


@dataclass(frozen=True)
class Variant:
    """A loss variant in canonical form: directions in DIRECTIONS order, one direction always
    joint, the hardness mode None whenever it cannot change the loss."""

    directions: tuple[str, ...] = (QUERY_TO_DOC,)
    joint: bool = True
    hardness_mode: str | None = None
    hardness_strength: float = 0.0

    @property
    def symmetric(self) -> bool:
        """The classic symmetric InfoNCE: query_to_doc and doc_to_query, averaged."""
        return self.directions == SYMMETRIC_DIRECTIONS and not self.joint

    @property
    def num_partitions(self) -> int:
        """How many log-sum-exps each row has (the backends save one [B] statistic per partition)."""
        return 1 if self.joint else len(self.directions)

    @property
    def needs_anchor_keys(self) -> bool:
        """Whether some direction scores against the anchors."""
        return any(DIRECTION_ROLES[d].keys == ANCHOR_KEYS for d in self.directions)

    @property
    def queries_with_positives(self) -> bool:
        """Whether some direction's queries are the positives (doc_to_query, doc_to_doc)."""
        return any(DIRECTION_ROLES[d].queries == POSITIVES for d in self.directions)


def _check_directions(directions) -> tuple[str, ...]:
    if isinstance(directions, str) or not isinstance(directions, (tuple, list)):
        raise TypeError(f"directions must be a tuple of direction names (any of {DIRECTIONS}), got {directions!r}")
    if len(directions) == 0:
        raise ValueError(f"directions must name at least one direction (any of {DIRECTIONS}), got ()")
    unknown = [d for d in directions if d not in DIRECTIONS]
    if unknown:
        raise ValueError(f"directions holds unknown name(s) {unknown}: valid names are {DIRECTIONS}")
    if len(set(directions)) != len(directions):
        raise ValueError(f"directions names a direction twice: {tuple(directions)}")
    if QUERY_TO_DOC not in directions:
        raise ValueError("directions must include 'query_to_doc': it holds each anchor's positive pair, "
                         f"got {tuple(directions)}")
    return tuple(d for d in DIRECTIONS if d in directions)


def resolve_variant(*, symmetric=False, directions=None, partition_mode=None, hardness_mode=None,
                    hardness_strength=0.0, num_neg: int = 0) -> Variant:
    """The canonical variant of the user's keywords, or a ValueError/TypeError naming the argument.

    ``symmetric=True`` is shorthand for ``directions=("query_to_doc", "doc_to_query"),
    partition_mode="per_direction"``; giving it with either keyword is an error. Defaults:
    ``("query_to_doc",)`` and ``"joint"`` (sentence-transformers' defaults)."""
    if not isinstance(symmetric, bool):
        raise TypeError(f"symmetric must be a bool, got {symmetric!r}")
    if symmetric and (directions is not None or partition_mode is not None):
        raise ValueError("symmetric=True is shorthand for directions=('query_to_doc', 'doc_to_query'), "
                         "partition_mode='per_direction': give either symmetric or directions/partition_mode, "
                         "not both")
    if symmetric:
        directions, partition_mode = SYMMETRIC_DIRECTIONS, "per_direction"
    directions = _check_directions((QUERY_TO_DOC,) if directions is None else directions)
    partition_mode = checks.choice("partition_mode", "joint" if partition_mode is None else partition_mode,
                                   PARTITION_MODES)
    if partition_mode == "per_direction" and {QUERY_TO_QUERY, DOC_TO_DOC} & set(directions):
        # sentence-transformers' reason, as it refuses the same combination.
        raise ValueError("partition_mode='per_direction' requires every direction's candidate pool to include the "
                         "positive pair; 'query_to_query' and 'doc_to_doc' only contain same-type similarities and "
                         "never include the positive, making the per-direction loss ill-defined. Use "
                         "partition_mode='joint' instead.")
    if hardness_mode is not None and hardness_mode not in HARDNESS_MODES:
        raise ValueError(f"hardness_mode must be None or one of {HARDNESS_MODES}, got {hardness_mode!r}")
    strength = checks.positive_float("hardness_strength", hardness_strength, allow_zero=True)
    # As in sentence-transformers: no mode, a zero strength, or hard_negatives without any hard
    # negative leave the logits untouched.
    if hardness_mode is None or strength == 0.0 or (hardness_mode == "hard_negatives" and num_neg == 0):
        hardness_mode, strength = None, 0.0
    return Variant(directions=directions, joint=partition_mode == "joint" or len(directions) == 1,
                   hardness_mode=hardness_mode, hardness_strength=strength)


@dataclass(frozen=True)
class LossProblem:
    """Row i's target is candidate pos_start + i; its own hard negatives are candidates
    neg_start + i * num_neg + t (t < num_neg), whose query_to_doc logits get ``weight``.

    The anchors as keys (query_to_query, doc_to_query) are ``num_anchor_keys`` rows in which
    row i's own anchor is ``anchor_start + i``: the anchors themselves in one process, every
    rank's anchors under ``torch.distributed``.

    ``tau`` is None in the problem a caller builds (the temperature is a tensor whose value,
    data under ``torch.compile``, only the op reads) and the temperature in the one the op
    hands its backend."""

    batch: int
    dim: int
    num_candidates: int
    tau: float | None
    pos_start: int
    neg_start: int
    num_neg: int
    normalize: bool
    weight: float  # the hard negatives' logit bias; 0.0 without hard negatives
    # Required, with no Variant() default: torch 2.11's dynamo cannot wrap a default instance of
    # a user class in the generated __init__ (torch.compile of a step fails, "sourceless builder").
    variant: Variant
    num_anchor_keys: int = 0
    anchor_start: int = 0
    separate_anchor_keys: bool = False  # the anchor keys are a tensor of their own (distributed)
    id_mode: str | None = None  # None, "group" or "label"
    num_positives: int = 0  # P: the positive block [0, P) the ids cover (with id_mode)
    num_extra: int = 0  # extra negatives: the last num_extra candidates
    # Matryoshka: the loss is sum_k weights[k] * (the loss on the first dims[k] coordinates),
    # dims ascending (fastcse.matryoshka's canonical form); () for the plain loss.
    matryoshka_dims: tuple[int, ...] = ()
    matryoshka_weights: tuple[float, ...] = ()
    # False negatives by similarity (fastcse.false_negatives): None leaves no key out.
    false_negative_margin: float | None = None
    margin_strategy: str = "absolute"  # or "relative"
    guide_dim: int = 0  # the guide's width d_g; 0: self-guided (the loss's own similarities)

    @property
    def num_documents(self) -> int:
        """The candidates doc_to_doc scores: all but the extra negatives."""
        return self.num_candidates - self.num_extra

    @property
    def inv_tau(self) -> float:
        return 1.0 / self.tau

    @property
    def has_bias(self) -> bool:
        return self.num_neg > 0 and self.weight != 0.0

    @property
    def symmetric(self) -> bool:
        return self.variant.symmetric

    @property
    def directions(self) -> tuple[str, ...]:
        return self.variant.directions

    @property
    def joint(self) -> bool:
        return self.variant.joint

    @property
    def hardness_mode(self) -> str | None:
        return self.variant.hardness_mode

    @property
    def hardness_strength(self) -> float:
        return self.variant.hardness_strength

    @property
    def num_dimensions(self) -> int:
        """How many losses the call sums: 1, or one per Matryoshka dimension (the LSEs' blocks)."""
        return max(1, len(self.matryoshka_dims))


def encode_variant(variant: Variant) -> str:
    """The variant as the custom op's one string argument (torch.library schemas take no tuples
    of strings): 'query_to_doc,doc_to_query;per_direction;hardness_mode;strength'."""
    return ";".join((",".join(variant.directions), "joint" if variant.joint else "per_direction",
                     variant.hardness_mode or "", repr(float(variant.hardness_strength))))


# Cached: the op decodes on every forward and backward, and a run uses a handful of variants.
# (Encoding is left uncached: it runs in the caller, which torch.compile traces.)
@functools.lru_cache(maxsize=256)
def decode_variant(text: str) -> Variant:
    directions, partition, mode, strength = text.split(";")
    return Variant(directions=tuple(directions.split(",")), joint=partition == "joint", hardness_mode=mode or None,
                   hardness_strength=float(strength))


def _check_anchor_keys(anchor, anchor_keys, anchor_start: int) -> int:
    """The number of anchor keys, the local anchors [anchor_start, anchor_start + B) among them."""
    batch, dim = anchor.shape
    if anchor_keys.dtype != anchor.dtype or anchor_keys.dim() != 2 or anchor_keys.shape[1] != dim:
        raise ValueError(f"anchor_keys must be [M, {dim}] of dtype {anchor.dtype}, got "
                         f"{tuple(anchor_keys.shape)} {anchor_keys.dtype}")
    num_anchor_keys = anchor_keys.shape[0]
    if not 0 <= anchor_start <= num_anchor_keys - batch:
        raise ValueError(f"the local anchors [anchor_start, anchor_start + B) = [{anchor_start}, "
                         f"{anchor_start + batch}) must lie among the {num_anchor_keys} anchor keys")
    return num_anchor_keys


def _check_ids(ids, id_mode, *, pos_start, batch, num_candidates, num_extra, num_anchor_keys,
               variant: Variant) -> int:
    """P, the size of the positive block the ids cover (0 without ids)."""
    if (ids is None) != (id_mode is None):
        raise ValueError("ids and id_mode go together")
    if ids is None:
        return 0
    checks.choice("id_mode", id_mode, ID_MODES)
    num_positives = ids.shape[0]
    if ids.dim() != 1 or not pos_start + batch <= num_positives <= num_candidates - num_extra:
        raise ValueError(f"ids must be [P] for the positive block [0, P) holding rows [{pos_start}, "
                         f"{pos_start + batch}), got {tuple(ids.shape)}")
    if variant.needs_anchor_keys and num_anchor_keys != num_positives:
        raise ValueError(f"ids cover {num_positives} positives but there are {num_anchor_keys} anchor keys")
    return num_positives


def _check_matryoshka(dims, weights, dim: int) -> None:
    """The canonical form of fastcse.matryoshka.check_dims: ascending, in [1, dim], one weight each."""
    if len(weights) != len(dims) or list(dims) != sorted(set(dims)) or (dims and not 1 <= dims[0] <= dims[-1] <= dim):
        raise ValueError(f"matryoshka_dims must be distinct ascending dimensions in [1, {dim}] with one weight "
                         f"each, got dims {tuple(dims)} and weights {tuple(weights)}")


def describe(anchor: torch.Tensor, candidates: torch.Tensor, tau: float | None, *, pos_start: int, neg_start: int,
             num_neg: int, normalize: bool, hard_negative_weight: float, variant: Variant = Variant(),
             anchor_keys: torch.Tensor | None = None, anchor_start: int = 0, ids: torch.Tensor | None = None,
             id_mode: str | None = None, num_extra: int = 0, matryoshka_dims: tuple[int, ...] = (),
             matryoshka_weights: tuple[float, ...] = (), false_negative_margin: float | None = None,
             margin_strategy: str = "absolute", guide=None) -> LossProblem:
    """The checked description of a call (the public checks are in ``fastcse.loss``).

    ``tau`` None: the caller's problem, before the op reads the temperature. ``anchor_keys``
    None: the anchors themselves are the keys of query_to_query / doc_to_query. ``ids``: the
    [P] ids of the positive block with ``id_mode`` "group" or "label". ``matryoshka_dims`` /
    ``matryoshka_weights``: as ``fastcse.matryoshka.check_dims`` returns them (ascending).
    ``false_negative_margin`` with ``margin_strategy``: false negatives by similarity, guided by
    ``guide`` (a ``fastcse.false_negatives.GuideRows``) or self-guided (None)."""
    if candidates.dtype != anchor.dtype:
        raise TypeError(f"candidates have dtype {candidates.dtype} but anchor has {anchor.dtype}")
    batch, dim = anchor.shape
    if candidates.dim() != 2 or candidates.shape[1] != dim:
        raise ValueError(f"candidates must be [N, {dim}] like the anchors, got {tuple(candidates.shape)}")
    num_candidates = candidates.shape[0]
    if not 0 <= pos_start <= num_candidates - batch:
        raise ValueError(f"the positives [pos_start, pos_start + B) = [{pos_start}, {pos_start + batch}) must lie "
                         f"among the {num_candidates} candidates")
    if num_neg and not 0 <= neg_start <= num_candidates - batch * num_neg:
        raise ValueError(f"the hard negatives starting at {neg_start} must lie among the {num_candidates} candidates")
    weight = float(hard_negative_weight) if num_neg else 0.0
    if anchor_keys is None:
        num_anchor_keys, anchor_start = (batch if variant.needs_anchor_keys else 0), 0
    else:
        num_anchor_keys = _check_anchor_keys(anchor, anchor_keys, anchor_start)
    if not 0 <= num_extra <= num_candidates - batch:
        raise ValueError(f"num_extra = {num_extra} extra negatives do not fit after the positives among the "
                         f"{num_candidates} candidates")
    _check_matryoshka(matryoshka_dims, matryoshka_weights, dim)
    num_positives = _check_ids(ids, id_mode, pos_start=pos_start, batch=batch, num_candidates=num_candidates,
                               num_extra=num_extra, num_anchor_keys=num_anchor_keys, variant=variant)
    return LossProblem(batch=batch, dim=dim, num_candidates=num_candidates, tau=None if tau is None else float(tau),
                       pos_start=pos_start, neg_start=neg_start, num_neg=num_neg, normalize=bool(normalize),
                       weight=weight, variant=variant, num_anchor_keys=num_anchor_keys, anchor_start=anchor_start,
                       separate_anchor_keys=anchor_keys is not None, id_mode=id_mode, num_positives=num_positives,
                       num_extra=num_extra, matryoshka_dims=tuple(matryoshka_dims),
                       matryoshka_weights=tuple(matryoshka_weights),
                       **_false_negative_fields(false_negative_margin, margin_strategy, guide, batch, num_candidates,
                                                num_anchor_keys))


def _false_negative_fields(margin, strategy, guide, batch: int, num_candidates: int, num_anchor_keys: int) -> dict:
    """The problem's false-negative fields; the guide's rows must match the loss's rows one to one."""
    if margin is None:
        if guide is not None:
            raise ValueError("a guide needs false_negative_margin")
        return {}
    checks.choice("margin_strategy", strategy, MARGIN_STRATEGIES)
    if guide is None:
        return dict(false_negative_margin=float(margin), margin_strategy=strategy)
    rows = {"anchor": (guide.anchor, batch), "candidates": (guide.candidates, num_candidates)}
    if guide.anchor_keys is not None:
        rows["anchor_keys"] = (guide.anchor_keys, num_anchor_keys)
    guide_dim = guide.anchor.shape[1] if guide.anchor.dim() == 2 else 0
    for name, (x, count) in rows.items():
        if x.dim() != 2 or x.shape[0] != count or x.shape[1] != guide_dim or guide_dim == 0:
            raise ValueError(f"the guide's {name} rows must be [{count}, d_g] with one d_g >= 1, got {tuple(x.shape)}")
    return dict(false_negative_margin=float(margin), margin_strategy=strategy, guide_dim=guide_dim)
