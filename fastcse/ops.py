"""The fused InfoNCE as a ``torch.library`` custom op: its schema, fake kernel, autograd and
backend dispatch, and :func:`info_nce_call`, its one front door.

The layers, as in Liger-Kernel (op, functional, module): this module is the op;
``fastcse.loss.info_nce`` is the functional form (the user's checks, the candidates' layout, the
distributed path) and ``fastcse.loss.InfoNCE`` the module. ``fastcse.reference`` is the plain
PyTorch loss the op is tested against. Every caller describes its call as a
``fastcse.problem.LossProblem`` and calls :func:`info_nce_call` with it and its tensors (one
front door, as ml-cross-entropy's ``linear_cross_entropy``); the op's
flat argument list (the problem's fields in :class:`_ProblemArguments` order), its sentinels for
absent tensors (an anchor-keys tensor with no rows, an ids tensor with no entries) and the
variant's string encoding live in this module and nowhere else.

Backend contract (``fastcse.cpu`` and ``fastcse.triton_info_nce`` both implement it)::

    forward(anchor [B, d], candidates [N, d], anchor_keys [M, d] or None, problem: LossProblem,
            *, compute_grad, ids: [P] or None = None[, guide: GuideRows or None])
        -> row_loss [B], lse [P * D, B] (P = problem.variant.num_partitions,
           D = problem.num_dimensions: one block of P rows per Matryoshka dimension, ascending),
           grads: None, or (grad_anchor [B, d], grad_candidates [N, d],
                            grad_anchor_keys [M, d] or None, grad_tau 0-dim)
                  = the gradients of row_loss.sum()
    backward(grad_rows [B], anchor, candidates, anchor_keys, problem, lse, *, ids=None[, guide])
        -> (grad_anchor, grad_candidates, grad_anchor_keys or None, grad_tau)

Every returned tensor is fp32 (fp64 for fp64 inputs: the CPU path, for gradcheck); the
autograd glue casts gradients back to the inputs' dtypes. ``problem`` is the description
``fastcse.problem.describe`` makes of the call, with the temperature's value (targets, hard
negatives, the loss variant, the anchor keys); ``lse`` holds each row's log-sum-exp per
partition, all that backward needs besides the inputs. ``anchor_keys`` None: the anchors
themselves are the keys of the query_to_query / doc_to_query directions (one process); under
``torch.distributed`` they are every rank's anchors, with this rank's at ``anchor_start``.
``ids``: the int64 group ids or labels of the positive block (``problem.id_mode``); the last
``problem.num_extra`` candidates are the extra negatives. ``guide`` (passed only when the problem
has a false-negative rule, ``problem.false_negative_margin`` not None): the guide's rows in the
operands' layout, None when self-guided (``fastcse.false_negatives``).
"""

from __future__ import annotations

from typing import NamedTuple, get_type_hints

import torch

from fastcse import cpu as _cpu
from fastcse.checks import accumulation_dtype
from fastcse.false_negatives import GuideRows
from fastcse.problem import LossProblem, decode_variant, describe, encode_variant

_BACKENDS = {"cpu": _cpu}


def _backend(name: str):
    if name not in _BACKENDS:
        if name == "triton":
            from fastcse import triton_info_nce

            _BACKENDS["triton"] = triton_info_nce
        else:
            raise ValueError(f"backend must be 'auto', 'cpu' or 'triton', got {name!r}")
    return _BACKENDS[name]


def needs_grad(*tensors) -> bool:
    """Whether autograd will ask for gradients of any of ``tensors`` (None entries allowed)."""
    return torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors)


class _ProblemArguments(NamedTuple):
    """A problem's fields as the op's flat arguments, in schema order (both ops take them, after
    the tensors). The annotations are the schema's types."""

    pos_start: int
    neg_start: int
    num_neg: int
    anchor_start: int
    num_extra: int
    normalize: bool
    hard_negative_weight: float
    variant: str  # encode_variant's string: schemas take no tuples of strings
    id_mode: str  # "" without ids
    matryoshka_dims: list[int]  # ascending; [] for the plain loss
    matryoshka_weights: list[float]

    @classmethod
    def of(cls, problem: LossProblem) -> _ProblemArguments:
        return cls(problem.pos_start, problem.neg_start, problem.num_neg, problem.anchor_start, problem.num_extra,
                   problem.normalize, problem.weight, encode_variant(problem.variant), problem.id_mode or "",
                   list(problem.matryoshka_dims), list(problem.matryoshka_weights))


def _schema_type(kind) -> str:
    """A field's annotation as a schema type: int, float, bool, str, or int[] / float[] for lists."""
    if getattr(kind, "__origin__", None) is list:
        return f"{kind.__args__[0].__name__}[]"
    return kind.__name__


_PROBLEM_SCHEMA = ", ".join(f"{_schema_type(kind)} {name}"
                            for name, kind in get_type_hints(_ProblemArguments).items())
_NUM_PROBLEM_ARGUMENTS = len(_ProblemArguments._fields)


class _FalseNegativeArguments(NamedTuple):
    """False negatives by similarity as the op's last arguments (both ops end with them). A guide
    tensor with no rows is absent: guide_anchor without rows is the self-guided rule (or no rule),
    guide_anchor_keys without rows the guide's anchors themselves; margin_strategy "" is no rule."""

    guide_anchor: torch.Tensor
    guide_candidates: torch.Tensor
    guide_anchor_keys: torch.Tensor
    false_negative_margin: float
    margin_strategy: str

    @classmethod
    def of(cls, problem: LossProblem, anchor: torch.Tensor, guide: GuideRows | None) -> _FalseNegativeArguments:
        empty = anchor.new_empty((0, 1))
        keys = empty if guide is None or guide.anchor_keys is None else guide.anchor_keys
        margin = problem.false_negative_margin
        return cls(empty if guide is None else guide.anchor, empty if guide is None else guide.candidates, keys,
                   0.0 if margin is None else margin, "" if margin is None else problem.margin_strategy)

    def problem_keywords(self) -> dict:
        """describe's keywords: the rule, and the guide's rows (None: self-guided)."""
        if not self.margin_strategy:
            return {}
        guide = None
        if self.guide_anchor.shape[0] > 0:
            keys = self.guide_anchor_keys if self.guide_anchor_keys.shape[0] > 0 else None
            guide = GuideRows(self.guide_anchor, self.guide_candidates, keys)
        return dict(false_negative_margin=self.false_negative_margin, margin_strategy=self.margin_strategy,
                    guide=guide)


_FALSE_NEGATIVE_SCHEMA = ("Tensor guide_anchor, Tensor guide_candidates, Tensor guide_anchor_keys, "
                          "float false_negative_margin, str margin_strategy")
_NUM_FALSE_NEGATIVE_ARGUMENTS = len(_FalseNegativeArguments._fields)
_EMPTY = (0,)

# Defined with torch.library.Library rather than the @custom_op decorator: the decorator wraps
# the implementation in torch._disable_dynamo, which imports torch._dynamo (3 s, 150 MB) on the
# first eager call of a loss that should cost nothing to import.
_LIB = torch.library.Library("fastcse", "FRAGMENT")
_LIB.define(
    f"info_nce(Tensor anchor, Tensor candidates, Tensor anchor_keys, Tensor ids, Tensor temperature, "
    f"{_PROBLEM_SCHEMA}, str reduction, bool grad_in_forward, str backend, {_FALSE_NEGATIVE_SCHEMA}) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)"
)
_LIB.define(
    f"info_nce_backward(Tensor grad_rows, Tensor lse, Tensor anchor, Tensor candidates, Tensor anchor_keys, "
    f"Tensor ids, Tensor temperature, {_PROBLEM_SCHEMA}, str backend, {_FALSE_NEGATIVE_SCHEMA}) "
    "-> (Tensor, Tensor, Tensor, Tensor)"
)


def op_arguments(problem: LossProblem, anchor: torch.Tensor, candidates: torch.Tensor, temperature: torch.Tensor,
                 *, anchor_keys: torch.Tensor | None = None, ids: torch.Tensor | None = None, reduction: str,
                 grad_in_forward: bool, backend: str, guide: GuideRows | None = None) -> tuple:
    """The flat argument list of ``info_nce_op`` for ``problem`` and its tensors.

    ``anchor_keys`` None (the anchors themselves are the keys) travels as a tensor with no rows,
    ``ids`` None as one with no entries; ``guide``: the guide's rows when the problem has a
    guided false-negative rule (:class:`_FalseNegativeArguments`)."""
    if anchor_keys is None:
        anchor_keys = anchor.new_empty((0, anchor.shape[1]))
    if ids is None:
        ids = torch.empty(0, dtype=torch.int64, device=anchor.device)
    return (anchor, candidates, anchor_keys, ids, temperature, *_ProblemArguments.of(problem), reduction,
            grad_in_forward, backend, *_FalseNegativeArguments.of(problem, anchor, guide))


def info_nce_call(problem: LossProblem, anchor: torch.Tensor, candidates: torch.Tensor, temperature: torch.Tensor,
                  *, anchor_keys: torch.Tensor | None = None, ids: torch.Tensor | None = None, reduction: str,
                  grad_in_forward: bool, backend: str, guide: GuideRows | None = None) -> torch.Tensor:
    """The op's loss for ``problem`` (from ``fastcse.problem.describe``) and its tensors.

    ``temperature`` a 0-dim tensor; ``reduction`` "mean" (over the B rows), "sum" or "none";
    ``grad_in_forward``: the gradients for a unit upstream gradient are produced in the forward
    sweep and only scaled in backward (a scalar loss that needs gradients), otherwise backward
    recomputes from the saved log-sum-exps; ``backend`` "cpu" or "triton"; ``guide`` the guide's
    rows of a guided false-negative rule (``problem.guide_dim > 0``)."""
    loss, *_ = info_nce_op(*op_arguments(problem, anchor, candidates, temperature, anchor_keys=anchor_keys,
                                         ids=ids, reduction=reduction, grad_in_forward=grad_in_forward,
                                         backend=backend, guide=guide))
    return loss


def _has_anchor_keys(anchor_keys: torch.Tensor) -> bool:
    return anchor_keys.shape[0] > 0


def _split(arguments: tuple) -> tuple[_ProblemArguments, tuple]:
    """(the problem's arguments, the rest) of the op's non-tensor arguments, the false-negative
    ones last (see :func:`_split_false_negatives`)."""
    return _ProblemArguments._make(arguments[:_NUM_PROBLEM_ARGUMENTS]), arguments[_NUM_PROBLEM_ARGUMENTS:]


def _split_false_negatives(rest: tuple) -> tuple[tuple, _FalseNegativeArguments]:
    """(the op's own arguments, the false-negative ones) of what :func:`_split` leaves."""
    return rest[:-_NUM_FALSE_NEGATIVE_ARGUMENTS], _FalseNegativeArguments._make(rest[-_NUM_FALSE_NEGATIVE_ARGUMENTS:])


def _backend_keywords(false_negatives: _FalseNegativeArguments, problem: LossProblem) -> dict:
    """The guide for the backend, only with a rule (so that backends without one are called as before)."""
    if problem.false_negative_margin is None:
        return {}
    return {"guide": false_negatives.problem_keywords()["guide"]}


def _backend_call(anchor, candidates, anchor_keys, ids, temperature, arguments: _ProblemArguments,
                  false_negatives: _FalseNegativeArguments):
    """The backend's (anchor_keys or None, problem at the temperature's value, ids or None)."""
    keys = anchor_keys if _has_anchor_keys(anchor_keys) else None
    ids = ids if arguments.id_mode else None
    problem = describe(anchor, candidates, float(temperature), pos_start=arguments.pos_start,
                       neg_start=arguments.neg_start, num_neg=arguments.num_neg, normalize=arguments.normalize,
                       hard_negative_weight=arguments.hard_negative_weight,
                       variant=decode_variant(arguments.variant), anchor_keys=keys,
                       anchor_start=arguments.anchor_start, ids=ids, id_mode=arguments.id_mode or None,
                       num_extra=arguments.num_extra, matryoshka_dims=tuple(arguments.matryoshka_dims),
                       matryoshka_weights=tuple(arguments.matryoshka_weights),
                       **false_negatives.problem_keywords())
    return keys, problem, ids


def _info_nce_impl(anchor, candidates, anchor_keys, ids, temperature, *arguments):
    """Returns (loss, lse, grad_anchor, grad_candidates, grad_anchor_keys, grad_tau).

    loss is reduced ('mean' over the B rows, 'sum') or per row ('none'). With
    grad_in_forward the gradients of loss w.r.t. the inputs for a unit upstream gradient
    are produced now (the tile sweep is shared) and only scaled in backward; otherwise they
    are empty and backward recomputes from the saved LSE statistics.
    """
    problem_arguments, rest = _split(arguments)
    (reduction, grad_in_forward, backend), false_negatives = _split_false_negatives(rest)
    keys, problem, ids = _backend_call(anchor, candidates, anchor_keys, ids, temperature, problem_arguments,
                                       false_negatives)
    row_loss, lse, grads = _backend(backend).forward(anchor, candidates, keys, problem,
                                                     compute_grad=grad_in_forward, ids=ids,
                                                     **_backend_keywords(false_negatives, problem))
    scale = 1.0 / anchor.shape[0] if reduction == "mean" else 1.0
    loss = row_loss if reduction == "none" else row_loss.sum() * scale
    if grads is None:
        empty = anchor.new_empty(_EMPTY, dtype=lse.dtype)
        return loss, lse, empty, empty.clone(), empty.clone(), empty.clone()
    grad_anchor, grad_candidates, grad_keys, grad_tau = grads
    if grad_keys is None:
        grad_keys = anchor.new_empty(_EMPTY, dtype=lse.dtype)
    if scale != 1.0:
        grad_anchor.mul_(scale)
        grad_candidates.mul_(scale)
        grad_keys.mul_(scale)
        grad_tau = grad_tau * scale
    return loss, lse, grad_anchor, grad_candidates, grad_keys, grad_tau


def _lse_rows(arguments: _ProblemArguments) -> int:
    """The saved LSEs' rows: each row's partitions, once per Matryoshka dimension (one without)."""
    return decode_variant(arguments.variant).num_partitions * max(1, len(arguments.matryoshka_dims))


@torch.library.register_fake("fastcse::info_nce", lib=_LIB)
def _info_nce_fake(anchor, candidates, anchor_keys, ids, temperature, *arguments):
    problem_arguments, rest = _split(arguments)
    (reduction, grad_in_forward, _backend_name), _ = _split_false_negatives(rest)
    batch, dim = anchor.shape
    f32 = dict(dtype=accumulation_dtype(anchor), device=anchor.device)
    loss = anchor.new_empty((batch,) if reduction == "none" else (), **f32)
    # One block of partitions per Matryoshka dimension (see _lse_rows).
    lse = anchor.new_empty((_lse_rows(problem_arguments), batch), **f32)
    if grad_in_forward:
        keys_shape = tuple(anchor_keys.shape) if _has_anchor_keys(anchor_keys) else _EMPTY
        grads = (anchor.new_empty((batch, dim), **f32), anchor.new_empty(tuple(candidates.shape), **f32),
                 anchor.new_empty(keys_shape, **f32), anchor.new_empty((), **f32))
    else:
        grads = tuple(anchor.new_empty(_EMPTY, **f32) for _ in range(4))
    return (loss, lse, *grads)


def _info_nce_backward_impl(grad_rows, lse, anchor, candidates, anchor_keys, ids, temperature, *arguments):
    problem_arguments, rest = _split(arguments)
    (backend,), false_negatives = _split_false_negatives(rest)
    keys, problem, ids = _backend_call(anchor, candidates, anchor_keys, ids, temperature, problem_arguments,
                                       false_negatives)
    grads = _backend(backend).backward(grad_rows.to(accumulation_dtype(anchor)).contiguous(), anchor,
                                       candidates, keys, problem, lse, ids=ids,
                                       **_backend_keywords(false_negatives, problem))
    grad_anchor, grad_candidates, grad_keys, grad_tau = grads
    if grad_keys is None:
        grad_keys = anchor.new_empty(_EMPTY, dtype=grad_anchor.dtype)
    return grad_anchor, grad_candidates, grad_keys, grad_tau


@torch.library.register_fake("fastcse::info_nce_backward", lib=_LIB)
def _info_nce_backward_fake(grad_rows, lse, anchor, candidates, anchor_keys, ids, temperature, *arguments):
    f32 = dict(dtype=accumulation_dtype(anchor), device=anchor.device)
    keys_shape = tuple(anchor_keys.shape) if _has_anchor_keys(anchor_keys) else _EMPTY
    return (anchor.new_empty(tuple(anchor.shape), **f32), anchor.new_empty(tuple(candidates.shape), **f32),
            anchor.new_empty(keys_shape, **f32), anchor.new_empty((), **f32))


def _setup_context(ctx, inputs, output):
    anchor, candidates, anchor_keys, ids, temperature, *arguments = inputs
    problem_arguments, rest = _split(tuple(arguments))
    (reduction, grad_in_forward, backend), false_negatives = _split_false_negatives(rest)
    _, lse, grad_anchor, grad_candidates, grad_keys, grad_tau = output
    ctx.problem_arguments = problem_arguments
    ctx.backend = backend
    ctx.reduction = reduction
    ctx.grad_in_forward = grad_in_forward
    ctx.dtypes = (anchor.dtype, candidates.dtype, anchor_keys.dtype, temperature.dtype)
    ctx.has_keys = _has_anchor_keys(anchor_keys)
    ctx.false_negative_options = tuple(false_negatives[3:])
    if grad_in_forward:
        ctx.save_for_backward(grad_anchor, grad_candidates, grad_keys, grad_tau)
    else:
        ctx.save_for_backward(anchor, candidates, anchor_keys, ids, temperature, lse, *false_negatives[:3])


def _scaled_saved_grads(ctx, grad_loss):
    """The forward's gradients (for a unit upstream gradient) times the upstream gradient."""
    grads = ctx.saved_tensors
    # The usual upstream gradient is exactly 1 (loss.backward()): skip the passes over
    # O((B + N) d) then. Checking the value syncs, so only in eager mode on the CPU.
    unit = (not torch.compiler.is_compiling() and grad_loss.device.type == "cpu"
            and grad_loss.numel() == 1 and grad_loss.item() == 1.0)
    if unit:
        return grads
    scale = grad_loss.to(grads[0].dtype)
    return tuple(g * scale for g in grads)


def _recomputed_grads(ctx, grad_loss):
    """The gradients from the saved inputs and log-sum-exps, for the per-row upstream gradients."""
    anchor, candidates, anchor_keys, ids, temperature, lse, *guide_rows = ctx.saved_tensors
    batch = anchor.shape[0]
    grad_loss = grad_loss.to(lse.dtype)
    if ctx.reduction == "none":
        grad_rows = grad_loss
    else:
        scale = 1.0 / batch if ctx.reduction == "mean" else 1.0
        grad_rows = (grad_loss * scale).expand(batch)
    return info_nce_backward_op(grad_rows.contiguous(), lse, anchor, candidates, anchor_keys, ids, temperature,
                                *ctx.problem_arguments, ctx.backend, *guide_rows, *ctx.false_negative_options)


def _backward(ctx, grad_loss, *unused_grads):
    if torch.is_grad_enabled():  # backward(create_graph=True): the gradients are not differentiable
        raise RuntimeError("fastcse.info_nce does not support double backward (create_graph=True); "
                           "use fastcse.info_nce_reference for higher-order gradients")
    grads = _scaled_saved_grads(ctx, grad_loss) if ctx.grad_in_forward else _recomputed_grads(ctx, grad_loss)
    grad_anchor, grad_candidates, grad_keys, grad_tau = grads
    anchor_dtype, candidates_dtype, keys_dtype, tau_dtype = ctx.dtypes
    grad_keys = grad_keys.to(keys_dtype) if ctx.has_keys else None
    # No gradient for ids, the problem's arguments, reduction, grad_in_forward, backend and the
    # false-negative rule's (its guide never gets one).
    return (grad_anchor.to(anchor_dtype), grad_candidates.to(candidates_dtype), grad_keys, None,
            grad_tau.to(tau_dtype)) + (None,) * (_NUM_PROBLEM_ARGUMENTS + 3 + _NUM_FALSE_NEGATIVE_ARGUMENTS)


for _device in ("CPU", "CUDA"):
    _LIB.impl("info_nce", _info_nce_impl, _device)
    _LIB.impl("info_nce_backward", _info_nce_backward_impl, _device)
torch.library.register_autograd("fastcse::info_nce", _backward, setup_context=_setup_context, lib=_LIB)

info_nce_op = torch.ops.fastcse.info_nce.default
info_nce_backward_op = torch.ops.fastcse.info_nce_backward.default
