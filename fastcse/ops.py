"""The fused InfoNCE as a ``torch.library`` custom op, with its autograd and fake kernel.

The op works on one anchor block against one candidate block; ``loss.py`` builds those
from the user's (anchor, positive, negative) and ``distributed.py`` from gathered ranks.

Backend contract (``fastcse.cpu`` and ``fastcse.triton_info_nce`` both implement it)::

    forward(anchor [B, d], candidates [N, d], anchor_keys [M, d] or None, spec: LossProblem,
            *, compute_grad, ids: [P] or None = None)
        -> row_loss [B], lse [P, B] (P = spec.variant.num_partitions),
           grads: None, or (grad_anchor [B, d], grad_candidates [N, d],
                            grad_anchor_keys [M, d] or None, grad_tau 0-dim)
                  = the gradients of row_loss.sum()
    backward(grad_rows [B], anchor, candidates, anchor_keys, spec, lse, *, ids=None)
        -> (grad_anchor, grad_candidates, grad_anchor_keys or None, grad_tau)

Every returned tensor is fp32 (fp64 for fp64 inputs: the CPU path, for gradcheck); the
autograd glue casts gradients back to the inputs' dtypes. ``spec`` is the one description
``fastcse.problem.describe`` makes of a call (targets, hard negatives, the loss variant, the
anchor keys); ``lse`` holds each row's log-sum-exp per partition, all that backward needs
besides the inputs. ``anchor_keys`` None: the anchors themselves are the keys of the
query_to_query / doc_to_query directions (one process); under ``torch.distributed`` they are
every rank's anchors, with this rank's at ``anchor_start``. ``ids``: the int64 group ids or
labels of the positive block (``spec.id_mode``); the last ``spec.num_extra`` candidates are the
extra negatives.
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

from fastcse import cpu as _cpu
from fastcse.problem import LossProblem, decode_variant, describe

_BACKENDS = {"cpu": _cpu}


def _backend(name: str):
    if name not in _BACKENDS:
        if name == "triton":
            from fastcse import triton_info_nce

            _BACKENDS["triton"] = triton_info_nce
        else:
            raise ValueError(f"backend must be 'auto', 'cpu' or 'triton', got {name!r}")
    return _BACKENDS[name]


_EMPTY = (0,)


def _ids(ids: torch.Tensor, id_mode: str) -> dict:
    """The backends' ids keyword: only with an id mode (older call sites pass none)."""
    return {"ids": ids} if id_mode else {}


def _accumulate_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


# Defined with torch.library.Library rather than the @custom_op decorator: the decorator wraps
# the implementation in torch._disable_dynamo, which imports torch._dynamo (3 s, 150 MB) on the
# first eager call of a loss that should cost nothing to import.
# anchor_keys with no rows means "the anchors themselves" (one process), ids with no entries no
# ids (id_mode ""). variant is fastcse.problem.encode_variant's string (schemas take no tuples
# of strings).
_LIB = torch.library.Library("fastcse", "FRAGMENT")
_LIB.define(
    "info_nce(Tensor anchor, Tensor candidates, Tensor anchor_keys, Tensor ids, Tensor temperature, int pos_start, "
    "int neg_start, int num_neg, int anchor_start, int num_extra, bool normalize, float hard_negative_weight, "
    "str variant, str id_mode, str reduction, bool grad_in_forward, str backend) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)"
)
_LIB.define(
    "info_nce_backward(Tensor grad_rows, Tensor anchor, Tensor candidates, Tensor anchor_keys, Tensor ids, "
    "Tensor temperature, Tensor lse, int pos_start, int neg_start, int num_neg, int anchor_start, int num_extra, "
    "bool normalize, float hard_negative_weight, str variant, str id_mode, str backend) "
    "-> (Tensor, Tensor, Tensor, Tensor)"
)


def _keys_or_none(anchor_keys: torch.Tensor) -> torch.Tensor | None:
    return anchor_keys if anchor_keys.shape[0] > 0 else None


def _spec(anchor, candidates, anchor_keys, ids, temperature, pos_start, neg_start, num_neg, anchor_start, num_extra,
          normalize, hard_negative_weight, variant, id_mode) -> LossProblem:
    return describe(anchor, candidates, float(temperature), pos_start=pos_start, neg_start=neg_start,
                    num_neg=num_neg, normalize=normalize, hard_negative_weight=hard_negative_weight,
                    variant=decode_variant(variant), anchor_keys=anchor_keys, anchor_start=anchor_start,
                    ids=ids if id_mode else None, id_mode=id_mode or None, num_extra=num_extra)


def _info_nce_impl(anchor, candidates, anchor_keys, ids, temperature, pos_start, neg_start, num_neg, anchor_start,
                   num_extra, normalize, hard_negative_weight, variant, id_mode, reduction, grad_in_forward, backend):
    """Returns (loss, lse, grad_anchor, grad_candidates, grad_anchor_keys, grad_tau).

    loss is reduced ('mean' over the B rows, 'sum') or per row ('none'). With
    grad_in_forward the gradients of loss w.r.t. the inputs for a unit upstream gradient
    are produced now (the tile sweep is shared) and only scaled in backward; otherwise they
    are empty and backward recomputes from the saved LSE statistics.
    """
    keys = _keys_or_none(anchor_keys)
    spec = _spec(anchor, candidates, keys, ids, temperature, pos_start, neg_start, num_neg, anchor_start, num_extra,
                 normalize, hard_negative_weight, variant, id_mode)
    row_loss, lse, grads = _backend(backend).forward(anchor, candidates, keys, spec,
                                                     compute_grad=grad_in_forward, **_ids(ids, id_mode))
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


def _num_partitions(variant: str) -> int:
    return decode_variant(variant).num_partitions


@torch.library.register_fake("fastcse::info_nce", lib=_LIB)
def _info_nce_fake(anchor, candidates, anchor_keys, ids, temperature, pos_start, neg_start, num_neg, anchor_start,
                   num_extra, normalize, hard_negative_weight, variant, id_mode, reduction, grad_in_forward, backend):
    batch, dim = anchor.shape
    f32 = dict(dtype=_accumulate_dtype(anchor), device=anchor.device)
    loss = anchor.new_empty((batch,) if reduction == "none" else (), **f32)
    lse = anchor.new_empty((_num_partitions(variant), batch), **f32)
    if grad_in_forward:
        keys_shape = tuple(anchor_keys.shape) if anchor_keys.shape[0] > 0 else _EMPTY
        grads = (anchor.new_empty((batch, dim), **f32), anchor.new_empty(tuple(candidates.shape), **f32),
                 anchor.new_empty(keys_shape, **f32), anchor.new_empty((), **f32))
    else:
        grads = tuple(anchor.new_empty(_EMPTY, **f32) for _ in range(4))
    return (loss, lse, *grads)


def _info_nce_backward_impl(grad_rows, anchor, candidates, anchor_keys, ids, temperature, lse, pos_start,
                            neg_start, num_neg, anchor_start, num_extra, normalize, hard_negative_weight, variant,
                            id_mode, backend):
    keys = _keys_or_none(anchor_keys)
    spec = _spec(anchor, candidates, keys, ids, temperature, pos_start, neg_start, num_neg, anchor_start, num_extra,
                 normalize, hard_negative_weight, variant, id_mode)
    grads = _backend(backend).backward(grad_rows.to(_accumulate_dtype(anchor)).contiguous(), anchor,
                                       candidates, keys, spec, lse, **_ids(ids, id_mode))
    grad_anchor, grad_candidates, grad_keys, grad_tau = grads
    if grad_keys is None:
        grad_keys = anchor.new_empty(_EMPTY, dtype=grad_anchor.dtype)
    return grad_anchor, grad_candidates, grad_keys, grad_tau


@torch.library.register_fake("fastcse::info_nce_backward", lib=_LIB)
def _info_nce_backward_fake(grad_rows, anchor, candidates, anchor_keys, ids, temperature, lse, pos_start,
                            neg_start, num_neg, anchor_start, num_extra, normalize, hard_negative_weight, variant,
                            id_mode, backend):
    f32 = dict(dtype=_accumulate_dtype(anchor), device=anchor.device)
    keys_shape = tuple(anchor_keys.shape) if anchor_keys.shape[0] > 0 else _EMPTY
    return (anchor.new_empty(tuple(anchor.shape), **f32), anchor.new_empty(tuple(candidates.shape), **f32),
            anchor.new_empty(keys_shape, **f32), anchor.new_empty((), **f32))


def _setup_context(ctx, inputs, output):
    (anchor, candidates, anchor_keys, ids, temperature, pos_start, neg_start, num_neg, anchor_start, num_extra,
     normalize, hard_negative_weight, variant, id_mode, reduction, grad_in_forward, backend) = inputs
    _, lse, grad_anchor, grad_candidates, grad_keys, grad_tau = output
    ctx.options = (pos_start, neg_start, num_neg, anchor_start, num_extra, normalize, hard_negative_weight, variant,
                   id_mode, backend)
    ctx.reduction = reduction
    ctx.grad_in_forward = grad_in_forward
    ctx.dtypes = (anchor.dtype, candidates.dtype, anchor_keys.dtype, temperature.dtype)
    ctx.has_keys = anchor_keys.shape[0] > 0
    if grad_in_forward:
        ctx.save_for_backward(grad_anchor, grad_candidates, grad_keys, grad_tau)
    else:
        ctx.save_for_backward(anchor, candidates, anchor_keys, ids, temperature, lse)


def _is_unit_upstream_gradient(grad_loss: torch.Tensor) -> bool:
    """Whether the upstream gradient is exactly 1 (the usual loss.backward()), so that backward
    can skip the passes over O((B + N) d) that would scale by it.

    Reading the value syncs, so only a real CPU tensor in eager mode is read. While torch traces
    the backward (torch.compile's AOTAutograd, export, make_fx) the tensor is symbolic and
    ``.item() == 1.0`` a data-dependent guard that fails the compile: tracing is recognized by its
    dispatch modes (fake / functional / proxy tensors), because torch 2.11's AOTAutograd traces the
    backward with torch.compiler.is_compiling() False (2.13 sets it)."""
    if torch.compiler.is_compiling() or is_in_torch_dispatch_mode() or type(grad_loss) is not torch.Tensor:
        return False
    return grad_loss.device.type == "cpu" and grad_loss.numel() == 1 and grad_loss.item() == 1.0


def _backward(ctx, grad_loss, *unused_grads):
    if torch.is_grad_enabled():  # backward(create_graph=True): the gradients are not differentiable
        raise RuntimeError("fastcse.info_nce does not support double backward (create_graph=True); "
                           "use fastcse.info_nce_reference for higher-order gradients")
    if ctx.grad_in_forward:
        grads = ctx.saved_tensors
        if not _is_unit_upstream_gradient(grad_loss):
            scale = grad_loss.to(grads[0].dtype)
            grads = tuple(g * scale for g in grads)
    else:
        anchor, candidates, anchor_keys, ids, temperature, lse = ctx.saved_tensors
        batch = anchor.shape[0]
        grad_loss = grad_loss.to(lse.dtype)
        if ctx.reduction == "none":
            grad_rows = grad_loss
        else:
            scale = 1.0 / batch if ctx.reduction == "mean" else 1.0
            grad_rows = (grad_loss * scale).expand(batch)
        grads = info_nce_backward_op(grad_rows.contiguous(), anchor, candidates, anchor_keys, ids, temperature, lse,
                                     *ctx.options)
    grad_anchor, grad_candidates, grad_keys, grad_tau = grads
    anchor_dtype, candidates_dtype, keys_dtype, tau_dtype = ctx.dtypes
    grad_keys = grad_keys.to(keys_dtype) if ctx.has_keys else None
    return (grad_anchor.to(anchor_dtype), grad_candidates.to(candidates_dtype), grad_keys, None,
            grad_tau.to(tau_dtype)) + (None,) * 12


for _device in ("CPU", "CUDA"):
    _LIB.impl("info_nce", _info_nce_impl, _device)
    _LIB.impl("info_nce_backward", _info_nce_backward_impl, _device)
torch.library.register_autograd("fastcse::info_nce", _backward, setup_context=_setup_context, lib=_LIB)

info_nce_op = torch.ops.fastcse.info_nce.default
info_nce_backward_op = torch.ops.fastcse.info_nce_backward.default
