"""The Triton backend's gradients: ``_backward_kernel`` (a tile's dS and its two products) and
``_normalize_backward_kernel`` (from d(x_hat) to d(x)), each with its launch.

One backward launch per direction (``fastcse.triton_info_nce`` decides which run, and folds
doc_to_query's cells into query_to_doc's launch where the anchors are the keys); all of them add
into the fp32 gradient buffers with atomics. Then, with normalization, one normalize-backward
launch per buffer.
"""

from __future__ import annotations

import triton
import triton.language as tl

from fastcse.checks import NORMALIZE_EPS
from fastcse.problem import LossProblem
from fastcse.triton_tiles import (IDS_GROUP, IDS_LABEL, IDS_NONE, Config, Sweep, cell_args, diagonal, group_masked,
                                  guide_args, inverse_norms, load_tile, normalized_tile, pointer_or, reverse_columns,
                                  rule_logits, same_id, tile_guide_cells, tile_scores)


@triton.jit
def _backward_kernel(q_ptr, k_ptr, q_norm_ptr, k_norm_ptr, lse_ptr, lse_rev_ptr, g_ptr, ids_ptr, inv_count_ptr,
                     grad_q_ptr, grad_k_ptr, tau_dots_ptr,
                     n_rows, n_cols, dim, stride_q, stride_k,
                     inv_tau, pos_start, neg_start, num_neg, weight, penalty_scale, self_start, num_positives,
                     g_scale,
                     NORMALIZE: tl.constexpr, HAS_BIAS: tl.constexpr, PENALTY: tl.constexpr, MASK: tl.constexpr,
                     HAS_TARGET: tl.constexpr, IDS: tl.constexpr, REVERSE: tl.constexpr,
                     EPS_: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                     UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                     gq_ptr, gk_ptr, thr_ptr, dim_g, stride_gq, stride_gk, FALSE_NEG: tl.constexpr):
    """Adds this tile's share of dQ_hat = dS K_hat / tau and dK_hat = dS^T Q_hat / tau (fp32, atomics),
    and of sum dS s (d(tau) = -(1/tau) that sum: every logit is q_hat . k_hat / tau, the hardness
    penalty held constant) into tau_dots, in fp32 before dS is rounded to the inputs' dtype.

    dS = g_scale * g_i * exp(logit - lse_i) (g_scale = 1 joint, 1 / P per_direction), minus g_i
    at the target with HAS_TARGET (IDS_LABEL: minus g_i * inv_count[i] = g_i / |P_i| on each of
    the row's label cells: the one-hot becomes a label-match weight, no extra product). REVERSE
    (query_to_doc with local anchor keys) adds doc_to_query's dS, g_scale * g_j * exp(s_ij -
    lse_rev_j), on the positive block's column pos_start + j: the query p_j against anchor i, the
    transposed cell of the same plain score (but for the group mask's cells, symmetric there).
    FALSE_NEG: the false-negative rule's cells, recomputed, get no probability (no REVERSE then)."""
    # Column blocks vary fastest, so programs running together share their query rows.
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    j0 = tl.program_id(0) * BLOCK_N
    cols = j0 + tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    tile_ok = row_ok[:, None] & (cols[None, :] < n_cols)
    # A guide's tile before the scores: one fp32 tile live at a time.
    above = tile_guide_cells(gq_ptr, gk_ptr, thr_ptr, rows, cols, n_rows, n_cols, dim_g, stride_gq, stride_gk,
                             FALSE_NEG, BLOCK_M, BLOCK_N)
    s, inv_q, inv_k = tile_scores(q_ptr, k_ptr, q_norm_ptr, k_norm_ptr, rows, cols, n_rows, n_cols, dim,
                                  stride_q, stride_k, inv_tau, NORMALIZE, EPS_, BLOCK_M, BLOCK_N, BLOCK_D,
                                  UPCAST, PRECISION)
    s_plain = s  # the scores before the cell rules turn them into logits: d(tau)'s factor
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    g = tl.load(g_ptr + rows, mask=row_ok, other=0.0)
    if IDS != IDS_NONE:
        same = same_id(ids_ptr, rows, cols, n_rows, pos_start, num_positives)
    else:
        same = 0  # unread
    if REVERSE:
        # From the plain scores, before the penalty and bias turn s into query_to_doc's logits.
        ds = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        overlaps, rev, rev_ok = reverse_columns(j0, cols, pos_start, n_rows, BLOCK_N)
        if overlaps:
            lse_rev = tl.load(lse_rev_ptr + rev, mask=rev_ok, other=0.0)
            g_rev = tl.load(g_ptr + rev, mask=rev_ok, other=0.0) * g_scale
            cell_ok = row_ok[:, None] & rev_ok[None, :]
            if IDS == IDS_GROUP:
                cell_ok = cell_ok & ~group_masked(same, rows, cols, pos_start)
            rev_arg = tl.where(cell_ok, s - lse_rev[None, :], float("-inf"))
            ds = tl.exp(rev_arg) * g_rev[None, :]
    s = rule_logits(s, above, thr_ptr, same, rows, cols, n_rows, pos_start, neg_start, num_neg, weight,
                    penalty_scale, self_start, HAS_BIAS, PENALTY, MASK, HAS_TARGET, IDS, FALSE_NEG)
    # Mask the exponents, not the products: padding scores are arbitrary and exp of them may be
    # inf. The saved lse is finite (joint includes query_to_doc; per_direction's query_to_doc and
    # doc_to_query keep each row's own pair under any mask), so masked cells (-inf) get exactly 0.
    p = tl.exp(tl.where(tile_ok, s - lse[:, None], float("-inf"))) * (g * g_scale)[:, None]
    if REVERSE:
        ds += p
    else:
        ds = p
    if HAS_TARGET:
        # The one-hot: -g_i at (i, pos_start + i), once per row whatever the partition (the
        # reverse direction's target logit is the same cell); with labels -g_i / |P_i| on each
        # same-label positive (the target is shared by every direction too).
        if IDS == IDS_LABEL:
            w = g * tl.load(inv_count_ptr + rows, mask=row_ok, other=0.0)
            ds = tl.where(same, ds - w[:, None], ds)
        else:
            ds = tl.where(diagonal(rows, cols, pos_start), ds - g[:, None], ds)
    ds = tl.where(tile_ok, ds, 0.0)
    # d(tau) from the fp32 dS: after its rounding below, the sum of dS s would err by the rounding
    # times the size of the terms, which cancel (bf16: 3e-4 of terms 300x the sum, 9% of d(tau)).
    tl.atomic_add(tau_dots_ptr, tl.sum(tl.sum(ds * s_plain, axis=1), axis=0), sem="relaxed")
    # dS enters the products in the input dtype with neither 1/tau nor 1/||x|| folded in: both
    # can be large (1/||x|| = 1e12 for a zero row) and fp16 would overflow to inf, then inf * 0 =
    # NaN over the whole row block. 1/||x|| goes onto the operand tiles instead (normalized rows,
    # entries <= 1) and 1/tau onto the fp32 products: dQ_hat = (dS K_hat) / tau, dK_hat = (dS^T Q_hat) / tau.
    ds = ds.to(q_ptr.dtype.element_ty)
    if UPCAST:
        ds = ds.to(tl.float32)
    ds_t = tl.trans(ds)
    for k0 in range(0, dim, BLOCK_D):
        ks = k0 + tl.arange(0, BLOCK_D)
        k_ok = ks < dim
        q_hat = normalized_tile(q_ptr, rows, ks, n_rows, dim, stride_q, inv_q, NORMALIZE, UPCAST)
        k_hat = normalized_tile(k_ptr, cols, ks, n_cols, dim, stride_k, inv_k, NORMALIZE, UPCAST)
        dq = tl.dot(ds, k_hat, input_precision=PRECISION) * inv_tau
        dk = tl.dot(ds_t, q_hat, input_precision=PRECISION) * inv_tau
        tl.atomic_add(grad_q_ptr + rows.to(tl.int64)[:, None] * dim + ks[None, :], dq,
                      mask=row_ok[:, None] & k_ok[None, :], sem="relaxed")
        tl.atomic_add(grad_k_ptr + cols.to(tl.int64)[:, None] * dim + ks[None, :], dk,
                      mask=(cols < n_cols)[:, None] & k_ok[None, :], sem="relaxed")


def launch_backward(sweep: Sweep, problem: LossProblem, cfg: Config, lse, g, g_scale, grad_q, grad_k, tau_dots,
                    lse_rev=None):
    """Adds the sweep's dQ_hat into grad_q ([B, d] fp32), dK_hat into grad_k and its cells' sum of
    dS s into tau_dots (fp32 [1]); with lse_rev (query_to_doc), doc_to_query's cells on the
    positive block too."""
    queries, keys = sweep.queries, sweep.keys
    n_rows, n_cols = queries.shape[0], keys.shape[0]
    t = cfg.bwd
    scalars, constexprs = cell_args(sweep, problem)
    grid = (triton.cdiv(n_cols, t.block_n), triton.cdiv(n_rows, t.block_m))
    _backward_kernel[grid](
        queries, keys, pointer_or(sweep.q_norm, lse), pointer_or(sweep.k_norm, lse), lse, pointer_or(lse_rev, lse),
        g, pointer_or(sweep.ids, lse), pointer_or(sweep.inv_count, lse), grad_q, grad_k, tau_dots,
        n_rows, n_cols, queries.shape[1], queries.stride(0), keys.stride(0),
        problem.inv_tau, *scalars, float(g_scale),
        REVERSE=lse_rev is not None, BLOCK_M=t.block_m, BLOCK_N=t.block_n, BLOCK_D=t.block_d,
        UPCAST=cfg.upcast, PRECISION=cfg.precision, num_warps=t.warps, num_stages=t.stages, **constexprs,
        **guide_args(sweep, lse))


@triton.jit
def _normalize_backward_kernel(x_ptr, norm_ptr, grad_ptr, n_rows, dim, stride,
                               EPS_: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
                               UPCAST: tl.constexpr):
    """grad (fp32 [R, d], in place) from d(x_hat) to d(x): (dx_hat - x_hat (x_hat . dx_hat)) / ||x||."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    inv = inverse_norms(norm_ptr, rows, n_rows, True, EPS_)
    dot = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for k0 in range(0, dim, BLOCK_D):
        ks = k0 + tl.arange(0, BLOCK_D)
        x = load_tile(x_ptr, rows, ks, n_rows, dim, stride, UPCAST).to(tl.float32)
        dx_hat = load_tile(grad_ptr, rows, ks, n_rows, dim, dim, False)
        dot += tl.sum(x * dx_hat, axis=1)
    dot = dot * inv
    # Below eps the norm is the constant eps: no projection, just the 1/eps scale.
    norm = tl.load(norm_ptr + rows, mask=row_ok, other=1.0)
    proj = tl.where(norm < EPS_, 0.0, dot)
    for k0 in range(0, dim, BLOCK_D):
        ks = k0 + tl.arange(0, BLOCK_D)
        offs = rows.to(tl.int64)[:, None] * dim + ks[None, :]
        mask = row_ok[:, None] & (ks[None, :] < dim)
        x = load_tile(x_ptr, rows, ks, n_rows, dim, stride, UPCAST).to(tl.float32)
        dx_hat = tl.load(grad_ptr + offs, mask=mask, other=0.0)
        dx = (dx_hat - x * (inv * proj)[:, None]) * inv[:, None]
        tl.store(grad_ptr + offs, dx, mask=mask)


def normalize_backward(x, norm, grad, cfg):
    """d(x) from d(x_hat), in place; norm None (no normalization): grad is d(x) already."""
    if norm is None:
        return
    grid = (triton.cdiv(x.shape[0], cfg.block_r),)
    _normalize_backward_kernel[grid](x, norm, grad, x.shape[0], x.shape[1], x.stride(0), EPS_=NORMALIZE_EPS,
                                     BLOCK_R=cfg.block_r, BLOCK_D=cfg.block_d_rows, UPCAST=cfg.upcast,
                                     num_warps=cfg.warps_rows)
