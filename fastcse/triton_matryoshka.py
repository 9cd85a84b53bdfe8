"""Triton backend, Matryoshka: every dimension's loss from one sweep over d per tile.

The loss is sum_k w_k loss_k, loss_k the problem's loss on the first m_k coordinates (dims
ascending, ``fastcse.matryoshka``), each prefix normalized on its own. A prefix dot product is a
running sum over coordinates, so a tile's raw products are accumulated segment by segment
between the boundaries (``bounds`` = [0, m_1, ..., m_D], int32; a boundary inside a d chunk is a
load mask): at the end of segment k the accumulator is R_k, scaled by the rows' and the keys'
prefix inverse norms ([D, n] fp32 per operand, computed once with torch) and 1/tau into
dimension k's scores, then the plain loss's cell rules (``tile_logits``) and dimension k's own
online log-sum-exp (the D running (max, sum) pairs and target logits as [BLOCK_M, DP] tiles).

Backward, per tile (T_s = sum_{k >= s} H_k, H_k = dL/dR_k = w_k dS_k scaled by both prefix
norms and 1/tau): an ascending sweep forms every H_k at its boundary and their sum T_1; a second
ascending sweep gives segment s's chunks dQ += T_s K_s and dK += T_s^T Q_s, rebuilding R_s from
the same loads, and subtracts H_s at its boundary (gradients are subtracted, not scores: R_k as
R_D less the later segments would lose a short prefix's product to cancellation). Full-width
products per tile: 1 in the forward and 4 in the backward (R in each sweep, dQ, dK), against
1 + 3 for the plain loss and 4 sum_k m_k / max(m) for one call per dimension (9 at
768/512/256/128/64); the operand loads stay one pass over d per sweep, and the per-dimension
work is elementwise (2 D evaluations of a tile's logits in the backward). The prefix norms'
backward needs, per row and dimension, w_k sum_j dS_k sim_k: added with atomics into [D, n]
buffers, applied with torch at the end (segment s of a row takes -x_s sum_{k >= s} dots_k /
(tau |x[:m_k]|^2)), as ``fastcse.cpu_matryoshka`` does.

Products read the raw inputs (16-bit on tensor cores); T holds 1 / |x[:m_k]|, up to 1 / eps for
a zero prefix, which fp16 cannot hold, so fp16's gradient products run in fp32 (3xTF32).
doc_to_query always gets sweeps of its own here (no fused reverse cells).

False negatives by similarity (FALSE_NEG, ``fastcse.false_negatives``), per dimension as the
reference's loop: self-guided, dimension k's plain scores against row k of [D, B] thresholds
(anchor i vs positive i on the first m_k coordinates, over tau), no product; guided, the guide's
tile (never truncated) once per key tile, before the segments, its cells reused by every
dimension (``tile_guide_cells``; fp32's forward then runs 32 x 32 tiles, see ``matryoshka_tiles``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastcse.checks import NORMALIZE_EPS
from fastcse.false_negatives import threshold
from fastcse.matryoshka import segments
from fastcse.problem import ANCHOR_KEYS, ANCHORS, CANDIDATES, DIRECTION_ROLES, DOCUMENTS, POSITIVES, LossProblem
from fastcse.triton_forward import column_splits
from fastcse.triton_tiles import (FALSE_NEG_GUIDED, FALSE_NEG_NONE, FALSE_NEG_SELF, IDS_GROUP, IDS_LABEL, IDS_NONE,
                                  MASK_CODES, MASK_NONE, Config, Sweep, Tiles, cell_args, diagonal, guide_args,
                                  load_tile, online_lse_update, pointer_or, rule_logits, same_id, tile_guide_cells)


@triton.jit
def _prefix_scores(acc, q_inv_ptr, k_inv_ptr, k, inv_stride_q, inv_stride_k, rows, cols, n_rows, n_cols, inv_tau,
                   NORMALIZE: tl.constexpr):
    """Dimension k's plain scores s = R_k / (tau |q[:m_k]| |k[:m_k]|) and the two inverse norms."""
    if NORMALIZE:
        inv_q = tl.load(q_inv_ptr + k * inv_stride_q + rows, mask=rows < n_rows, other=1.0)
        inv_k = tl.load(k_inv_ptr + k * inv_stride_k + cols, mask=cols < n_cols, other=1.0)
    else:
        inv_q = tl.full(rows.shape, 1.0, tl.float32)
        inv_k = tl.full(cols.shape, 1.0, tl.float32)
    return acc * (inv_q * inv_tau)[:, None] * inv_k[None, :], inv_q, inv_k


@triton.jit
def _matryoshka_forward_kernel(q_ptr, k_ptr, q_inv_ptr, k_inv_ptr, bounds_ptr, lse_ptr, target_ptr, ids_ptr,
                               inv_count_ptr, n_rows, n_cols, dim_count, stride_q, stride_k, inv_stride_q,
                               inv_stride_k, cols_per_split, inv_tau, pos_start, neg_start, num_neg, weight,
                               penalty_scale, self_start, num_positives,
                               NORMALIZE: tl.constexpr, HAS_BIAS: tl.constexpr, PENALTY: tl.constexpr,
                               MASK: tl.constexpr, HAS_TARGET: tl.constexpr, IDS: tl.constexpr,
                               DP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                               BLOCK_D: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                               gq_ptr, gk_ptr, thr_ptr, dim_g, stride_gq, stride_gk, thr_stride,
                               FALSE_NEG: tl.constexpr):
    """Stores each dimension's row LSE (and target logit) of this program's rows and key split:
    lse[split, k, row]. One pass over d per key tile, segment by segment. FALSE_NEG: the
    false-negative rule's cells are -inf, per dimension (``rule_logits``)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    slot = tl.arange(0, DP)[None, :]  # dimension k's column of the running statistics
    m_all = tl.full((BLOCK_M, DP), float("-inf"), tl.float32)
    l_all = tl.zeros((BLOCK_M, DP), dtype=tl.float32)
    t_all = tl.zeros((BLOCK_M, DP), dtype=tl.float32)
    col_start = tl.program_id(1) * cols_per_split
    col_stop = tl.minimum(col_start + cols_per_split, n_cols)
    for j0 in range(col_start, col_stop, BLOCK_N):
        cols = j0 + tl.arange(0, BLOCK_N)
        guide_above = tile_guide_cells(gq_ptr, gk_ptr, thr_ptr, rows, cols, n_rows, n_cols, dim_g, stride_gq,
                                       stride_gk, FALSE_NEG, BLOCK_M, BLOCK_N)
        if IDS != IDS_NONE:
            same = same_id(ids_ptr, rows, cols, n_rows, pos_start, num_positives)
        else:
            same = 0  # unread
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(0, dim_count):
            lo = tl.load(bounds_ptr + k)
            hi = tl.load(bounds_ptr + k + 1)
            for d0 in range(lo, hi, BLOCK_D):  # coordinates >= hi are masked: R_k exactly
                ks = d0 + tl.arange(0, BLOCK_D)
                q = load_tile(q_ptr, rows, ks, n_rows, hi, stride_q, UPCAST)
                kt = load_tile(k_ptr, cols, ks, n_cols, hi, stride_k, UPCAST)
                acc = tl.dot(q, tl.trans(kt), acc, input_precision=PRECISION)
            s, inv_q, inv_k = _prefix_scores(acc, q_inv_ptr, k_inv_ptr, k, inv_stride_q, inv_stride_k, rows, cols,
                                             n_rows, n_cols, inv_tau, NORMALIZE)
            s = rule_logits(s, guide_above, thr_ptr + k * thr_stride, same, rows, cols, n_rows, pos_start, neg_start,
                            num_neg, weight, penalty_scale, self_start, HAS_BIAS, PENALTY, MASK, HAS_TARGET, IDS,
                            FALSE_NEG)
            this = slot == k
            if HAS_TARGET:
                if IDS == IDS_LABEL:
                    t_k = tl.sum(tl.where(same, s, 0.0), axis=1)
                else:
                    t_k = tl.sum(tl.where(diagonal(rows, cols, pos_start), s, 0.0), axis=1)
                t_all += tl.where(this, t_k[:, None], 0.0)
            s = tl.where(cols[None, :] < n_cols, s, float("-inf"))
            m_k = tl.max(tl.where(this, m_all, float("-inf")), axis=1)
            l_k = tl.sum(tl.where(this, l_all, 0.0), axis=1)
            m_k, l_k = online_lse_update(m_k, l_k, s,
                                         (MASK != MASK_NONE) or (IDS == IDS_GROUP) or (FALSE_NEG != FALSE_NEG_NONE))
            m_all = tl.where(this, m_k[:, None], m_all)
            l_all = tl.where(this, l_k[:, None], l_all)
    out = (tl.program_id(1) * dim_count + slot) * n_rows + rows[:, None]
    ok = row_ok[:, None] & (slot < dim_count)
    tl.store(lse_ptr + out, m_all + tl.log(l_all), mask=ok)
    if HAS_TARGET:
        if IDS == IDS_LABEL:
            t_all *= tl.load(inv_count_ptr + rows, mask=row_ok, other=0.0)[:, None]
        tl.store(target_ptr + out, t_all, mask=ok)


@triton.jit
def _dimension_ds(acc, k, q_inv_ptr, k_inv_ptr, weights_ptr, lse_ptr, g, inv_count_ptr, same, rows, cols, n_rows,
                  n_cols, inv_stride_q, inv_stride_k, lse_stride, inv_tau, pos_start, neg_start, num_neg, weight,
                  penalty_scale, self_start, g_scale, guide_above, thr_ptr, thr_stride,
                  NORMALIZE: tl.constexpr, HAS_BIAS: tl.constexpr, PENALTY: tl.constexpr, MASK: tl.constexpr,
                  HAS_TARGET: tl.constexpr, IDS: tl.constexpr, FALSE_NEG: tl.constexpr):
    """Dimension k's w_k dS from R_k (acc), its plain scores s, and H_k = dL/dR_k (w_k dS scaled
    by both prefix inverse norms and 1/tau)."""
    row_ok = rows < n_rows
    tile_ok = row_ok[:, None] & (cols[None, :] < n_cols)
    s, inv_q, inv_k = _prefix_scores(acc, q_inv_ptr, k_inv_ptr, k, inv_stride_q, inv_stride_k, rows, cols,
                                     n_rows, n_cols, inv_tau, NORMALIZE)
    logits = rule_logits(s, guide_above, thr_ptr + k * thr_stride, same, rows, cols, n_rows, pos_start, neg_start,
                         num_neg, weight, penalty_scale, self_start, HAS_BIAS, PENALTY, MASK, HAS_TARGET, IDS,
                         FALSE_NEG)
    lse = tl.load(lse_ptr + k * lse_stride + rows, mask=row_ok, other=0.0)
    ds = tl.exp(tl.where(tile_ok, logits - lse[:, None], float("-inf"))) * (g * g_scale)[:, None]
    if HAS_TARGET:
        if IDS == IDS_LABEL:
            ds = tl.where(same, ds - (g * tl.load(inv_count_ptr + rows, mask=row_ok, other=0.0))[:, None], ds)
        else:
            ds = tl.where(diagonal(rows, cols, pos_start), ds - g[:, None], ds)
    ds = tl.where(tile_ok, ds, 0.0) * tl.load(weights_ptr + k)
    return ds, s, ds * (inv_q * inv_tau)[:, None] * inv_k[None, :]


@triton.jit
def _matryoshka_backward_kernel(q_ptr, k_ptr, q_inv_ptr, k_inv_ptr, bounds_ptr, weights_ptr, lse_ptr, g_ptr,
                                ids_ptr, inv_count_ptr, grad_q_ptr, grad_k_ptr, dots_q_ptr, dots_k_ptr, tau_dots_ptr,
                                n_rows, n_cols, dim_count, dim, stride_q, stride_k, inv_stride_q, inv_stride_k,
                                lse_stride, inv_tau, tau, pos_start, neg_start, num_neg, weight, penalty_scale,
                                self_start, num_positives, g_scale,
                                NORMALIZE: tl.constexpr, HAS_BIAS: tl.constexpr, PENALTY: tl.constexpr,
                                MASK: tl.constexpr, HAS_TARGET: tl.constexpr, IDS: tl.constexpr,
                                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                                UPCAST: tl.constexpr, PRECISION: tl.constexpr, GRAD_FP32: tl.constexpr,
                                gq_ptr, gk_ptr, thr_ptr, dim_g, stride_gq, stride_gk, thr_stride,
                                FALSE_NEG: tl.constexpr):
    """Adds this tile's dQ = T_s K_s and dK = T_s^T Q_s (raw operands, fp32 atomics) for each
    coordinate segment s, T_s = sum_{k >= s} H_k, and each dimension's w_k sum dS sim per row /
    column / tile. Sweep 1 (ascending) forms every H_k at its boundary and their sum T_1; sweep 2
    takes T_s, then subtracts H_s recomputed from the same R_s (the accumulator rebuilt from the
    loads the products use). Subtracting gradients, not scores: R_k by subtraction would lose a
    short prefix's product to cancellation against the full width's. FALSE_NEG: the rule's cells
    get no probability (a guide's tile once, before the sweeps, for every dimension of both)."""
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    col_ok = cols < n_cols
    g = tl.load(g_ptr + rows, mask=row_ok, other=0.0)
    if IDS != IDS_NONE:
        same = same_id(ids_ptr, rows, cols, n_rows, pos_start, num_positives)
    else:
        same = 0  # unread
    guide_above = tile_guide_cells(gq_ptr, gk_ptr, thr_ptr, rows, cols, n_rows, n_cols, dim_g, stride_gq,
                                   stride_gk, FALSE_NEG, BLOCK_M, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, dim_count):
        lo = tl.load(bounds_ptr + k)
        hi = tl.load(bounds_ptr + k + 1)
        for d0 in range(lo, hi, BLOCK_D):
            ks = d0 + tl.arange(0, BLOCK_D)
            q = load_tile(q_ptr, rows, ks, n_rows, hi, stride_q, UPCAST)
            kt = load_tile(k_ptr, cols, ks, n_cols, hi, stride_k, UPCAST)
            acc = tl.dot(q, tl.trans(kt), acc, input_precision=PRECISION)
        ds, s, h = _dimension_ds(acc, k, q_inv_ptr, k_inv_ptr, weights_ptr, lse_ptr, g, inv_count_ptr, same, rows,
                                 cols, n_rows, n_cols, inv_stride_q, inv_stride_k, lse_stride, inv_tau, pos_start,
                                 neg_start, num_neg, weight, penalty_scale, self_start, g_scale, guide_above,
                                 thr_ptr, thr_stride, NORMALIZE, HAS_BIAS, PENALTY, MASK, HAS_TARGET, IDS, FALSE_NEG)
        # w_k dS sim_k per row and column (the prefix norms' backward) and over the tile (d tau).
        cells = ds * s * tau
        row_dots = tl.sum(cells, axis=1)
        if NORMALIZE:  # laid out as the inverse norms: [D, n] buffers, views with the same strides
            tl.atomic_add(dots_q_ptr + k * inv_stride_q + rows, row_dots, mask=row_ok, sem="relaxed")
            tl.atomic_add(dots_k_ptr + k * inv_stride_k + cols, tl.sum(cells, axis=0), mask=col_ok, sem="relaxed")
        tl.atomic_add(tau_dots_ptr, tl.sum(row_dots, axis=0), sem="relaxed")
        total += h
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, dim_count):
        if GRAD_FP32:
            t_op = total
        else:
            t_op = total.to(q_ptr.dtype.element_ty)
            if UPCAST:
                t_op = t_op.to(tl.float32)
        t_op_t = tl.trans(t_op)
        lo = tl.load(bounds_ptr + k)
        hi = tl.load(bounds_ptr + k + 1)
        for d0 in range(lo, hi, BLOCK_D):
            ks = d0 + tl.arange(0, BLOCK_D)
            k_in = ks < hi
            q = load_tile(q_ptr, rows, ks, n_rows, hi, stride_q, UPCAST)
            kt = load_tile(k_ptr, cols, ks, n_cols, hi, stride_k, UPCAST)
            acc = tl.dot(q, tl.trans(kt), acc, input_precision=PRECISION)
            if GRAD_FP32:
                dq = tl.dot(t_op, kt.to(tl.float32), input_precision="tf32x3")
                dk = tl.dot(t_op_t, q.to(tl.float32), input_precision="tf32x3")
            else:
                dq = tl.dot(t_op, kt, input_precision=PRECISION)
                dk = tl.dot(t_op_t, q, input_precision=PRECISION)
            tl.atomic_add(grad_q_ptr + rows.to(tl.int64)[:, None] * dim + ks[None, :], dq,
                          mask=row_ok[:, None] & k_in[None, :], sem="relaxed")
            tl.atomic_add(grad_k_ptr + cols.to(tl.int64)[:, None] * dim + ks[None, :], dk,
                          mask=col_ok[:, None] & k_in[None, :], sem="relaxed")
        _, _, h = _dimension_ds(acc, k, q_inv_ptr, k_inv_ptr, weights_ptr, lse_ptr, g, inv_count_ptr, same, rows,
                                cols, n_rows, n_cols, inv_stride_q, inv_stride_k, lse_stride, inv_tau, pos_start,
                                neg_start, num_neg, weight, penalty_scale, self_start, g_scale, guide_above,
                                thr_ptr, thr_stride, NORMALIZE, HAS_BIAS, PENALTY, MASK, HAS_TARGET, IDS, FALSE_NEG)
        total -= h


# --------------------------------------------------------------------------------------------
# Launches and the per-call state
# --------------------------------------------------------------------------------------------


def matryoshka_tiles(cfg: Config, dtype: torch.dtype, guided: bool = False) -> tuple[Tiles, Tiles]:
    """(forward, backward) tiles: the plain loss's under the interpreter (16 x 16 x 16), else
    smaller ones than the plain kernels', which hold D running statistics per row (forward) and
    the running sum T beside the accumulator (backward): with 64 x 64 tiles both spill on sm_80
    and sm_90, and fp32's backward still at 32 x 32 (tests/test_triton_aot.py measures them).
    ``guided`` (a guide's false-negative cells, held through the dimensions): fp32's forward at
    32 x 64 spills on sm_90, hence 32 x 32 there."""
    if cfg.fwd.block_m == 16:
        return cfg.fwd, cfg.bwd
    if dtype == torch.float32:  # 3xTF32: three products per dot
        return Tiles(32, 32 if guided else 64, cfg.fwd.block_d, 4, 1), Tiles(32, 16, cfg.fwd.block_d, 4, 1)
    chunk = min(cfg.fwd.block_d, 16) if dtype == torch.float16 else cfg.fwd.block_d
    return Tiles(32, 64, cfg.fwd.block_d, 4, 2), Tiles(32, 32, chunk, 4, 2)


def prefix_inverse_norms(x: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """[D, n] fp32: 1 / max(|x[:m_k]|, eps) per dimension, from the segments' squared sums (O(n d))."""
    squares = torch.stack([x[:, lo:hi].float().square().sum(1) for lo, hi in segments(dims)])
    return 1.0 / squares.cumsum(0).sqrt_().clamp_min_(NORMALIZE_EPS)


class _Operand:
    """One input's rows, their [D, n] prefix inverse norms (None without normalization), and its
    gradient buffers: fp32 [n, d] and the norms' backward dots [D, n]."""

    def __init__(self, x: torch.Tensor, problem: LossProblem):
        self.x = x.contiguous()
        self.inv = prefix_inverse_norms(self.x, problem.matryoshka_dims).contiguous() if problem.normalize else None
        self.grad = torch.zeros(self.x.shape, dtype=torch.float32, device=x.device)
        self.dots = torch.zeros((problem.num_dimensions, self.x.shape[0]), dtype=torch.float32, device=x.device)

    def view(self, start: int, stop: int) -> dict:
        """Rows [start, stop) as (rows, inverse norms, grad, dots): views of the same storage."""
        return dict(x=self.x[start:stop], inv=None if self.inv is None else self.inv[:, start:stop],
                    grad=self.grad[start:stop], dots=self.dots[:, start:stop])

    def finish(self, dims: tuple[int, ...], tau: float) -> torch.Tensor:
        """The gradient through the prefix norms: segment s of row i gets -x_s sum_{k >= s}
        dots_k / (tau |x[:m_k]|^2); below eps the norm is the constant eps (no such term)."""
        if self.inv is None:
            return self.grad
        small = self.inv >= 1.0 / NORMALIZE_EPS
        coefficients = (self.dots * self.inv.square()).masked_fill_(small, 0.0).div_(tau)
        running = torch.zeros_like(coefficients[0])
        for k in reversed(range(len(dims))):
            lo, hi = segments(dims)[k]
            running += coefficients[k]
            self.grad[:, lo:hi].addcmul_(self.x[:, lo:hi].float(), running[:, None], value=-1.0)
        return self.grad


def _inverse_norm_args(q_inv, k_inv, placeholder):
    return (pointer_or(q_inv, placeholder), pointer_or(k_inv, placeholder),
            q_inv.stride(0) if q_inv is not None else 0, k_inv.stride(0) if k_inv is not None else 0)


def launch_forward(sweep: Sweep, problem: LossProblem, cfg, bounds: torch.Tensor):
    """([D, n_rows] LSEs, [D, n_rows] target logits or None) of the sweep's queries."""
    queries, keys = sweep.queries, sweep.keys
    n_rows, n_cols = queries.shape[0], keys.shape[0]
    t = matryoshka_tiles(cfg, queries.dtype, sweep.false_neg == FALSE_NEG_GUIDED.value)[0]
    dims = problem.num_dimensions
    n_row_blocks, n_col_tiles = triton.cdiv(n_rows, t.block_m), triton.cdiv(n_cols, t.block_n)
    splits = column_splits(n_row_blocks, n_col_tiles, queries.device)
    cols_per_split = triton.cdiv(n_col_tiles, splits) * t.block_n
    lse = torch.empty((splits, dims, n_rows), dtype=torch.float32, device=queries.device)
    target = torch.empty_like(lse) if sweep.holds_target else None
    scalars, constexprs = cell_args(sweep, problem)
    constexprs = {k: v for k, v in constexprs.items() if k != "EPS_"}
    _matryoshka_forward_kernel[(n_row_blocks, splits)](
        queries, keys, *_inverse_norm_args(sweep.q_norm, sweep.k_norm, lse)[:2], bounds, lse, pointer_or(target, lse),
        pointer_or(sweep.ids, lse), pointer_or(sweep.inv_count, lse), n_rows, n_cols, dims, queries.stride(0),
        keys.stride(0), *_inverse_norm_args(sweep.q_norm, sweep.k_norm, lse)[2:], cols_per_split, problem.inv_tau,
        *scalars, DP=triton.next_power_of_2(dims), BLOCK_M=t.block_m, BLOCK_N=t.block_n, BLOCK_D=t.block_d,
        UPCAST=cfg.upcast, PRECISION=cfg.precision, num_warps=t.warps, num_stages=t.stages, **constexprs,
        **_rule_args(sweep, lse))
    if splits == 1:
        return lse[0], None if target is None else target[0]
    return torch.logsumexp(lse, dim=0), None if target is None else target.sum(0)


def launch_backward(sweep: Sweep, problem: LossProblem, cfg, bounds, weights, lse, g, g_scale, grads: tuple):
    """Adds the sweep's raw-input gradients into grads = (grad_q, grad_k, dots_q, dots_k, tau_dots);
    ``lse``: [D, n_rows] (a strided view), dimension k's LSE of each query row."""
    queries, keys = sweep.queries, sweep.keys
    n_rows, n_cols = queries.shape[0], keys.shape[0]
    t = matryoshka_tiles(cfg, queries.dtype, sweep.false_neg == FALSE_NEG_GUIDED.value)[1]
    scalars, constexprs = cell_args(sweep, problem)
    constexprs = {k: v for k, v in constexprs.items() if k != "EPS_"}
    q_inv, k_inv, inv_stride_q, inv_stride_k = _inverse_norm_args(sweep.q_norm, sweep.k_norm, g)
    grid = (triton.cdiv(n_cols, t.block_n), triton.cdiv(n_rows, t.block_m))
    _matryoshka_backward_kernel[grid](
        queries, keys, q_inv, k_inv, bounds, weights, lse, g, pointer_or(sweep.ids, g),
        pointer_or(sweep.inv_count, g), *grads, n_rows, n_cols, problem.num_dimensions, queries.shape[1],
        queries.stride(0), keys.stride(0), inv_stride_q, inv_stride_k, lse.stride(0), problem.inv_tau, problem.tau,
        *scalars, float(g_scale), BLOCK_M=t.block_m, BLOCK_N=t.block_n, BLOCK_D=t.block_d, UPCAST=cfg.upcast,
        PRECISION=cfg.precision, GRAD_FP32=queries.dtype == torch.float16 and not cfg.upcast,
        num_warps=t.warps, num_stages=t.stages, **constexprs, **_rule_args(sweep, g))


def _rule_args(sweep: Sweep, placeholder: torch.Tensor) -> dict:
    """The false-negative rule's kernel arguments: ``guide_args`` and the thresholds' row stride
    (self-guided [D, B]: dimension k's row; guided [B]: one row for every dimension)."""
    thresholds = sweep.thresholds
    return dict(guide_args(sweep, placeholder),
                thr_stride=thresholds.stride(0) if thresholds is not None and thresholds.dim() == 2 else 0)


class _PrefixThresholds:
    """The self-guided rule's [D, B] thresholds: dimension k's t_i - m (or t_i - |t_i| m) over
    tau, t_i anchor i's similarity with positive i on their first m_k coordinates (the cosine of
    the prefixes, or their dot product without normalization): each dimension's own rule."""

    def __init__(self, sweeps: "MatryoshkaSweeps"):
        problem = sweeps.problem
        anchor, positive = sweeps.operands[ANCHORS], sweeps.operands[POSITIVES]
        a, p = anchor["x"].float(), positive["x"].float()
        dots = torch.stack([(a[:, lo:hi] * p[:, lo:hi]).sum(1) for lo, hi in segments(problem.matryoshka_dims)])
        similarity = dots.cumsum(0)  # [D, B]
        if problem.normalize:
            similarity = similarity * anchor["inv"] * positive["inv"]
        self.thresholds = (threshold(similarity, problem.false_negative_margin, problem.margin_strategy)
                           * problem.inv_tau).contiguous()

    def sweep_fields(self, direction: str) -> dict:
        return dict(false_neg=FALSE_NEG_SELF.value, thresholds=self.thresholds)


class MatryoshkaSweeps:
    """The per-call state: the inputs with their prefix norms and buffers, the ids, each direction's sweep."""

    def __init__(self, anchor, candidates, anchor_keys, ids, problem: LossProblem, cfg, guide=None):
        # The plain backend's module imports this one lazily; a guide's rows are read as it reads them.
        from fastcse.triton_info_nce import _dense_ids, _FalseNegativeRows

        self.problem, self.cfg = problem, cfg
        device = anchor.device
        self.anchor = _Operand(anchor, problem)
        self.candidates = _Operand(candidates, problem)
        self.separate_keys = problem.separate_anchor_keys and problem.variant.needs_anchor_keys
        self.keys = _Operand(anchor_keys, problem) if self.separate_keys else self.anchor
        batch = problem.batch
        self.operands = {
            ANCHORS: self.anchor.view(0, batch),
            POSITIVES: self.candidates.view(problem.pos_start, problem.pos_start + batch),
            CANDIDATES: self.candidates.view(0, problem.num_candidates),
            DOCUMENTS: self.candidates.view(0, problem.num_documents),
            ANCHOR_KEYS: self.keys.view(0, self.keys.x.shape[0]),
        }
        self.ids, self.inv_count = (None, None) if ids is None else _dense_ids(ids, problem, device)
        self.bounds = torch.tensor((0, *problem.matryoshka_dims), dtype=torch.int32, device=device)
        self.weights = torch.tensor(problem.matryoshka_weights, dtype=torch.float32, device=device)
        self.tau_dots = torch.zeros(1, dtype=torch.float32, device=device)
        self.false_negatives = None
        if problem.false_negative_margin is not None:
            self.false_negatives = _FalseNegativeRows(self, guide) if guide is not None else _PrefixThresholds(self)

    def sweep(self, direction: str) -> Sweep:
        """The direction's sweep, its norm fields holding [D, n] prefix inverse norms."""
        role = DIRECTION_ROLES[direction]
        queries, keys = self.operands[role.queries], self.operands[role.keys]
        rule = {} if self.false_negatives is None else self.false_negatives.sweep_fields(direction)
        return Sweep(direction, queries["x"], queries["inv"], keys["x"], keys["inv"], MASK_CODES[role.mask],
                     ids=self.ids, inv_count=self.inv_count if role.holds_target else None, **rule)

    def stats(self):
        """(row_loss [B], lse [P * D, B], dimension k's rows k P .. (k + 1) P, as the CPU backend's)."""
        problem = self.problem
        lses, target = [], None
        for direction in problem.directions:
            lse, t = launch_forward(self.sweep(direction), problem, self.cfg, self.bounds)
            lses.append(lse)
            target = t if t is not None else target
        lse = torch.stack(lses, dim=1)  # [D, P, B]
        if problem.joint:
            lse = torch.logsumexp(lse, dim=1, keepdim=True)
        per_dimension = lse.mean(1) - target  # [D, B]
        row_loss = (self.weights[:, None] * per_dimension).sum(0)
        return row_loss, lse.reshape(-1, problem.batch)

    def grads(self, grad_rows, lse):
        """(dA, dC, dK or None, dtau) for per-row upstream gradients: one backward launch per direction."""
        problem = self.problem
        partitions = 1 if problem.joint else len(problem.directions)
        lse = lse.view(problem.num_dimensions, partitions, problem.batch)
        g_scale = 1.0 if problem.joint else 1.0 / len(problem.directions)
        for p, direction in enumerate(problem.directions):
            role = DIRECTION_ROLES[direction]
            queries, keys = self.operands[role.queries], self.operands[role.keys]
            launch_backward(self.sweep(direction), problem, self.cfg, self.bounds, self.weights,
                            lse[:, 0 if problem.joint else p], grad_rows, g_scale,
                            (queries["grad"], keys["grad"], queries["dots"], keys["dots"], self.tau_dots))
        dims, tau = problem.matryoshka_dims, problem.tau
        grad_a = self.anchor.finish(dims, tau)
        grad_c = self.candidates.finish(dims, tau)
        grad_k = self.keys.finish(dims, tau) if self.separate_keys else None
        return grad_a, grad_c, grad_k, -self.tau_dots[0] / tau**2
