"""The fused InfoNCE as a ``torch.library`` custom op, with its autograd and fake kernel.

The op works on one anchor block against one candidate block; ``loss.py`` builds those
from the user's (anchor, positive, negative) and ``distributed.py`` from gathered ranks.

Backend contract (``fastcse.cpu`` and ``fastcse.triton_info_nce`` both implement it)::

    forward(anchor [B, d], candidates [N, d], tau: float, *, pos_start, neg_start, num_neg,
            normalize, symmetric, hard_negative_weight, compute_grad)
        -> row_loss [B], lse [B], lse_rev [B] (empty when not symmetric),
           grads: None, or (grad_anchor [B, d], grad_candidates [N, d], grad_tau 0-dim)
                  = the gradients of row_loss.sum()
    backward(grad_rows [B], anchor, candidates, tau, lse, lse_rev, *, same options)
        -> (grad_anchor [B, d], grad_candidates [N, d], grad_tau 0-dim)

Every returned tensor is fp32 (fp64 for fp64 inputs: the CPU path, for gradcheck); the
autograd glue casts gradients back to the inputs' dtypes.

Row i's target is candidate ``pos_start + i``; its own hard negatives are candidates
``neg_start + i * num_neg + t`` (t < num_neg), whose logits get ``hard_negative_weight``.
``symmetric`` (only with pos_start == 0 and N >= B) adds the reverse direction over the
first B candidates, and row_loss is then (forward + reverse) / 2. Both backends check and
describe a call with the one ``fastcse.problem.describe``.
"""

from __future__ import annotations

import torch

from fastcse import cpu as _cpu

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


def _accumulate_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


# Defined with torch.library.Library rather than the @custom_op decorator: the decorator wraps
# the implementation in torch._disable_dynamo, which imports torch._dynamo (3 s, 150 MB) on the
# first eager call of a loss that should cost nothing to import.
_LIB = torch.library.Library("fastcse", "FRAGMENT")
_LIB.define(
    "info_nce(Tensor anchor, Tensor candidates, Tensor temperature, int pos_start, int neg_start, int num_neg, "
    "bool normalize, bool symmetric, float hard_negative_weight, str reduction, bool grad_in_forward, "
    "str backend) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)"
)
_LIB.define(
    "info_nce_backward(Tensor grad_rows, Tensor anchor, Tensor candidates, Tensor temperature, Tensor lse, "
    "Tensor lse_rev, int pos_start, int neg_start, int num_neg, bool normalize, bool symmetric, "
    "float hard_negative_weight, str backend) -> (Tensor, Tensor, Tensor)"
)


def _info_nce_impl(
    anchor: torch.Tensor,
    candidates: torch.Tensor,
    temperature: torch.Tensor,
    pos_start: int,
    neg_start: int,
    num_neg: int,
    normalize: bool,
    symmetric: bool,
    hard_negative_weight: float,
    reduction: str,
    grad_in_forward: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (loss, lse, lse_rev, grad_anchor, grad_candidates, grad_tau).

    loss is reduced ('mean' over the B rows, 'sum') or per row ('none'). With
    grad_in_forward the three gradients of loss w.r.t. the inputs for a unit upstream
    gradient are produced now (the tile sweep is shared) and only scaled in backward;
    otherwise they are empty and backward recomputes from the saved LSE statistics.
    """
    impl = _backend(backend)
    row_loss, lse, lse_rev, grads = impl.forward(
        anchor,
        candidates,
        float(temperature),
        pos_start=pos_start,
        neg_start=neg_start,
        num_neg=num_neg,
        normalize=normalize,
        symmetric=symmetric,
        hard_negative_weight=hard_negative_weight,
        compute_grad=grad_in_forward,
    )
    scale = 1.0 / anchor.shape[0] if reduction == "mean" else 1.0
    loss = row_loss if reduction == "none" else row_loss.sum() * scale
    if grads is None:
        empty = anchor.new_empty(_EMPTY, dtype=lse.dtype)
        return loss, lse, lse_rev, empty, empty.clone(), empty.clone()
    grad_anchor, grad_candidates, grad_tau = grads
    if scale != 1.0:
        grad_anchor.mul_(scale)
        grad_candidates.mul_(scale)
        grad_tau = grad_tau * scale
    return loss, lse, lse_rev, grad_anchor, grad_candidates, grad_tau


@torch.library.register_fake("fastcse::info_nce", lib=_LIB)
def _info_nce_fake(anchor, candidates, temperature, pos_start, neg_start, num_neg, normalize, symmetric,
      hard_negative_weight, reduction, grad_in_forward, backend):
    batch, dim = anchor.shape
    f32 = dict(dtype=_accumulate_dtype(anchor), device=anchor.device)
    loss = anchor.new_empty((batch,) if reduction == "none" else (), **f32)
    lse = anchor.new_empty((batch,), **f32)
    lse_rev = anchor.new_empty((batch,) if symmetric else _EMPTY, **f32)
    if grad_in_forward:
        grads = (anchor.new_empty((batch, dim), **f32), anchor.new_empty(tuple(candidates.shape), **f32),
                 anchor.new_empty((), **f32))
    else:
        grads = tuple(anchor.new_empty(_EMPTY, **f32) for _ in range(3))
    return (loss, lse, lse_rev, *grads)


def _info_nce_backward_impl(
    grad_rows: torch.Tensor,
    anchor: torch.Tensor,
    candidates: torch.Tensor,
    temperature: torch.Tensor,
    lse: torch.Tensor,
    lse_rev: torch.Tensor,
    pos_start: int,
    neg_start: int,
    num_neg: int,
    normalize: bool,
    symmetric: bool,
    hard_negative_weight: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    impl = _backend(backend)
    return impl.backward(
        grad_rows.to(_accumulate_dtype(anchor)).contiguous(),
        anchor,
        candidates,
        float(temperature),
        lse,
        lse_rev,
        pos_start=pos_start,
        neg_start=neg_start,
        num_neg=num_neg,
        normalize=normalize,
        symmetric=symmetric,
        hard_negative_weight=hard_negative_weight,
    )


@torch.library.register_fake("fastcse::info_nce_backward", lib=_LIB)
def _info_nce_backward_fake(grad_rows, anchor, candidates, temperature, lse, lse_rev, pos_start, neg_start, num_neg,
      normalize, symmetric, hard_negative_weight, backend):
    f32 = dict(dtype=_accumulate_dtype(anchor), device=anchor.device)
    return (anchor.new_empty(tuple(anchor.shape), **f32), anchor.new_empty(tuple(candidates.shape), **f32),
            anchor.new_empty((), **f32))


def _setup_context(ctx, inputs, output):
    (anchor, candidates, temperature, pos_start, neg_start, num_neg, normalize, symmetric,
     hard_negative_weight, reduction, grad_in_forward, backend) = inputs
    _, lse, lse_rev, grad_anchor, grad_candidates, grad_tau = output
    ctx.options = (pos_start, neg_start, num_neg, normalize, symmetric, hard_negative_weight, backend)
    ctx.reduction = reduction
    ctx.grad_in_forward = grad_in_forward
    ctx.dtypes = (anchor.dtype, candidates.dtype, temperature.dtype)
    if grad_in_forward:
        ctx.save_for_backward(grad_anchor, grad_candidates, grad_tau)
    else:
        ctx.save_for_backward(anchor, candidates, temperature, lse, lse_rev)


def _backward(ctx, grad_loss, *unused_grads):
    if torch.is_grad_enabled():  # backward(create_graph=True): the gradients are not differentiable
        raise RuntimeError("fastcse.info_nce does not support double backward (create_graph=True); "
                           "use fastcse.info_nce_reference for higher-order gradients")
    if ctx.grad_in_forward:
        grad_anchor, grad_candidates, grad_tau = ctx.saved_tensors
        # The usual upstream gradient is exactly 1 (loss.backward()): skip two passes over
        # O((B + N) d) then. Checking the value syncs, so only in eager mode on the CPU.
        unit = (not torch.compiler.is_compiling() and grad_loss.device.type == "cpu"
                and grad_loss.numel() == 1 and grad_loss.item() == 1.0)
        if not unit:
            scale = grad_loss.to(grad_anchor.dtype)
            grad_anchor = grad_anchor * scale
            grad_candidates = grad_candidates * scale
            grad_tau = grad_tau * scale
    else:
        anchor, candidates, temperature, lse, lse_rev = ctx.saved_tensors
        batch = anchor.shape[0]
        grad_loss = grad_loss.to(lse.dtype)
        if ctx.reduction == "none":
            grad_rows = grad_loss
        else:
            scale = 1.0 / batch if ctx.reduction == "mean" else 1.0
            grad_rows = (grad_loss * scale).expand(batch)
        grad_anchor, grad_candidates, grad_tau = info_nce_backward_op(
            grad_rows.contiguous(), anchor, candidates, temperature, lse, lse_rev, *ctx.options)
    anchor_dtype, candidates_dtype, tau_dtype = ctx.dtypes
    return (grad_anchor.to(anchor_dtype), grad_candidates.to(candidates_dtype), grad_tau.to(tau_dtype),
            None, None, None, None, None, None, None, None, None)


for _device in ("CPU", "CUDA"):
    _LIB.impl("info_nce", _info_nce_impl, _device)
    _LIB.impl("info_nce_backward", _info_nce_backward_impl, _device)
torch.library.register_autograd("fastcse::info_nce", _backward, setup_context=_setup_context, lib=_LIB)

info_nce_op = torch.ops.fastcse.info_nce.default
info_nce_backward_op = torch.ops.fastcse.info_nce_backward.default
