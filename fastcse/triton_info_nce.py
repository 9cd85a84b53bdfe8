"""Triton backend of the fused InfoNCE: kernels and their launch code.

Implements the backend contract in ``fastcse.ops`` with the CPU backend's semantics
(``fastcse.cpu`` is the executable spec). Memory is O((B + N) d): the B x N scores only
ever exist as register tiles.

Kernels (each launch below its kernel):

- ``_row_norm_kernel``: ||x|| per row (fp32). The score kernels scale their tiles by
  1 / max(||x||, eps) instead of reading normalized copies of the inputs.
- ``_forward_kernel``: one program per block of anchor rows and split of the candidates
  (see ``_column_splits``); loops over candidate tiles with an online softmax (running max
  and sum) and stores the row log-sum-exp and the target logit. Symmetric: the reverse
  direction's column sums over the positive block are accumulated in the same pass, with
  atomics against the fixed max M = 1/tau, when that is safe (see ``_fixed_max_is_safe``);
  otherwise the same kernel runs once more with positives and anchors swapped (a column
  sweep over the B x B positive block only).
- ``_backward_kernel``: one program per (row block, column block) tile, as in
  Cut-Cross-Entropy rather than FlashAttention-2: the score tile is recomputed once from the
  saved LSE, dS is formed in registers, and both products dS C and dS^T A are accumulated
  with fp32 atomics, chunk by chunk over d. Why not FA2's two kernels (rows for dA, columns
  for dC): sentence embeddings have d = 384..1024, so a [BLOCK, d] fp32 accumulator does not
  fit in registers, tiling d in the outputs would recompute the scores d / BLOCK_D times,
  and two kernels compute every score tile twice. The backward thus costs three B x N x d
  products (score recompute, dA, dC); forward + backward four, one above the floor. The
  price: fp32 atomic additions make GPU gradients bitwise non-deterministic (summation order).
- ``_normalize_backward_kernel``: a row kernel for dx = (dx_hat - x_hat (x_hat . dx_hat)) / ||x||
  (dx_hat / eps below eps), in place, and the per-row a_hat . dA_hat that d(tau) needs.

``forward(compute_grad=True)`` runs the statistics pass, then the backward with g = 1. The
probabilities need each row's final LSE, so gradients in the same sweep would need either
full score rows (the CPU path's chunks: O(R N) scratch) or rescaling [B, d] and [N, d]
accumulators as the running max moves; the two passes cost the same four products as
forward + backward and no extra memory.

Under ``TRITON_INTERPRET=1`` (the tests) the kernels run on CPU tensors; 16-bit tiles are
upcast to fp32 right after loading (the interpreter's bf16 dot and sums are wrong), and
small blocks are used so small test shapes cross several tiles.
"""

from __future__ import annotations

import contextlib
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from fastcse.problem import LossProblem, describe

EPS = 1e-12  # as F.normalize
# exp(s - M) over the positive block, with M = 1/tau the largest possible normalized score,
# stays a normal fp32 number (> 1.2e-38 = exp(-87.3)) while M - s <= 2 / tau <= this bound.
_FIXED_MAX_RANGE = 80.0

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


# --------------------------------------------------------------------------------------------
# Shared tile helpers
# --------------------------------------------------------------------------------------------


@triton.jit
def _load_tile(ptr, rows, cols_k, n_rows, dim, stride, UPCAST: tl.constexpr):
    """x[rows, cols_k] (zero outside), in the input dtype or fp32 when UPCAST."""
    offs = rows.to(tl.int64)[:, None] * stride + cols_k[None, :]
    mask = (rows[:, None] < n_rows) & (cols_k[None, :] < dim)
    x = tl.load(ptr + offs, mask=mask, other=0.0)
    if UPCAST:
        x = x.to(tl.float32)
    return x


@triton.jit
def _raw_scores(a_ptr, c_ptr, rows, cols, n_rows, n_cols, dim, stride_a, stride_c,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """a[rows] . c[cols] for a BLOCK_M x BLOCK_N tile, fp32 accumulation over d."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, dim, BLOCK_D):
        ks = k0 + tl.arange(0, BLOCK_D)
        a = _load_tile(a_ptr, rows, ks, n_rows, dim, stride_a, UPCAST)
        c = _load_tile(c_ptr, cols, ks, n_cols, dim, stride_c, UPCAST)
        acc = tl.dot(a, tl.trans(c), acc, input_precision=PRECISION)
    return acc


@triton.jit
def _inv_norm(norm_ptr, idx, n, NORMALIZE: tl.constexpr, EPS_: tl.constexpr):
    """1 / max(||x||, eps) for the rows idx (1 when not normalizing)."""
    if NORMALIZE:
        norm = tl.load(norm_ptr + idx, mask=idx < n, other=1.0)
        return 1.0 / tl.maximum(norm, EPS_)
    else:
        return tl.full(idx.shape, 1.0, tl.float32)


@triton.jit
def _normalized_tile(ptr, rows, cols_k, n_rows, dim, stride, inv_norm, NORMALIZE: tl.constexpr,
                     UPCAST: tl.constexpr):
    """x_hat[rows, cols_k] = x / max(||x||, eps), scaled in fp32 and rounded to the input dtype
    (as a GPU product operand), then fp32 when UPCAST."""
    x = _load_tile(ptr, rows, cols_k, n_rows, dim, stride, False)
    if NORMALIZE:
        x = (x.to(tl.float32) * inv_norm[:, None]).to(ptr.dtype.element_ty)
    if UPCAST:
        x = x.to(tl.float32)
    return x


@triton.jit
def _scores(a_ptr, c_ptr, a_norm_ptr, c_norm_ptr, rows, cols, n_rows, n_cols, dim, stride_a, stride_c,
            inv_tau, neg_start, num_neg, weight,
            NORMALIZE: tl.constexpr, HAS_BIAS: tl.constexpr, EPS_: tl.constexpr,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
            UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """s = a_hat . c_hat / tau (+ weight on each row's own hard negatives); returns (s, 1/||a||, 1/||c||)."""
    s = _raw_scores(a_ptr, c_ptr, rows, cols, n_rows, n_cols, dim, stride_a, stride_c,
                    BLOCK_M, BLOCK_N, BLOCK_D, UPCAST, PRECISION)
    inv_a = _inv_norm(a_norm_ptr, rows, n_rows, NORMALIZE, EPS_)
    inv_c = _inv_norm(c_norm_ptr, cols, n_cols, NORMALIZE, EPS_)
    s = s * (inv_a * inv_tau)[:, None] * inv_c[None, :]
    if HAS_BIAS:
        first = neg_start + rows * num_neg
        own = (cols[None, :] >= first[:, None]) & (cols[None, :] < first[:, None] + num_neg)
        s += tl.where(own, weight, 0.0)
    return s, inv_a, inv_c


# --------------------------------------------------------------------------------------------
# Row norms
# --------------------------------------------------------------------------------------------


@triton.jit
def _row_norm_kernel(x_ptr, norm_ptr, n_rows, dim, stride,
                     BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    sq = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for k0 in range(0, dim, BLOCK_D):
        x = _load_tile(x_ptr, rows, k0 + tl.arange(0, BLOCK_D), n_rows, dim, stride, UPCAST).to(tl.float32)
        sq += tl.sum(x * x, axis=1)
    tl.store(norm_ptr + rows, tl.sqrt(sq), mask=rows < n_rows)


def _row_norms(x: torch.Tensor, cfg: "_Config") -> torch.Tensor:
    norms = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(x.shape[0], cfg.block_r),)
    _row_norm_kernel[grid](x, norms, x.shape[0], x.shape[1], x.stride(0),
                           BLOCK_R=cfg.block_r, BLOCK_D=cfg.block_d_rows, UPCAST=cfg.upcast,
                           num_warps=cfg.warps_rows)
    return norms


# --------------------------------------------------------------------------------------------
# Forward statistics
# --------------------------------------------------------------------------------------------


@triton.jit
def _forward_kernel(a_ptr, c_ptr, a_norm_ptr, c_norm_ptr, lse_ptr, target_ptr, col_sum_ptr,
                    n_rows, n_cols, dim, stride_a, stride_c, cols_per_split,
                    inv_tau, pos_start, neg_start, num_neg, weight, fixed_max, n_rev,
                    NORMALIZE: tl.constexpr, HAS_BIAS: tl.constexpr, FUSED_REVERSE: tl.constexpr,
                    EPS_: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                    UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """LSE and target logit of a block of rows over one split of the columns (program_id(1)),
    stored at [split, row]; FUSED_REVERSE also adds, for the first n_rev columns,
    sum_i exp(s_ij - fixed_max) into col_sum[j] (the reverse direction's column sums)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    split_start = tl.program_id(1) * cols_per_split
    split_end = tl.minimum(split_start + cols_per_split, n_cols)
    row_ok = rows < n_rows
    target_col = pos_start + rows
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    target = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for j0 in range(split_start, split_end, BLOCK_N):
        cols = j0 + tl.arange(0, BLOCK_N)
        s, inv_a, inv_c = _scores(a_ptr, c_ptr, a_norm_ptr, c_norm_ptr, rows, cols, n_rows, n_cols, dim,
                                  stride_a, stride_c, inv_tau, neg_start, num_neg, weight,
                                  NORMALIZE, HAS_BIAS, EPS_, BLOCK_M, BLOCK_N, BLOCK_D, UPCAST, PRECISION)
        target += tl.sum(tl.where(cols[None, :] == target_col[:, None], s, 0.0), axis=1)
        if FUSED_REVERSE:
            if j0 < n_rev:
                rev_ok = row_ok[:, None] & (cols[None, :] < n_rev)
                e = tl.exp(tl.where(rev_ok, s - fixed_max, float("-inf")))
                tl.atomic_add(col_sum_ptr + cols, tl.sum(e, axis=0), mask=cols < n_rev)
        s = tl.where(cols[None, :] < n_cols, s, float("-inf"))
        # Every tile holds at least one valid column, so m_new is finite and exp(-inf) = 0.
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(s - m_new[:, None]), axis=1)
        m_i = m_new
    out = tl.program_id(1) * n_rows + rows
    tl.store(lse_ptr + out, m_i + tl.log(l_i), mask=row_ok)
    tl.store(target_ptr + out, target, mask=row_ok)


def _column_splits(n_row_blocks: int, n_col_tiles: int, device: torch.device) -> int:
    """How many programs share one row block's candidates (flash-decoding style split).

    A grid of B / BLOCK_M programs alone leaves much of a GPU idle at B <= 8192 (64 programs of
    64 rows for B = 4096 on 108-132 SMs), so the columns are split until about two programs per
    SM exist; each split stores its partial (LSE, target logit) and the O(splits x B) partials
    are combined afterwards. The interpreter aims at 4 programs, so multi-split combining is
    exercised by the small test shapes too.
    """
    if device.type == "cuda":
        target = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        target = 4
    splits = max(1, min(n_col_tiles, triton.cdiv(target, n_row_blocks)))
    return triton.cdiv(n_col_tiles, triton.cdiv(n_col_tiles, splits))  # no empty split


def _launch_forward(q, c, q_norm, c_norm, inv_tau, pos_start, neg_start, num_neg, weight, cfg,
                    col_sum=None, n_rev=0):
    """Returns (lse, target logit) of queries q against candidates c; with col_sum, the fused
    reverse column sums over the first n_rev candidates are added into it."""
    n_rows, n_cols = q.shape[0], c.shape[0]
    t = cfg.fwd
    n_row_blocks, n_col_tiles = triton.cdiv(n_rows, t.block_m), triton.cdiv(n_cols, t.block_n)
    splits = _column_splits(n_row_blocks, n_col_tiles, q.device)
    cols_per_split = triton.cdiv(n_col_tiles, splits) * t.block_n
    lse = torch.empty((splits, n_rows), dtype=torch.float32, device=q.device)
    target = torch.empty_like(lse)
    has_bias = num_neg > 0 and weight != 0.0
    fused = col_sum is not None
    _forward_kernel[(n_row_blocks, splits)](
        q, c, q_norm if q_norm is not None else lse, c_norm if c_norm is not None else lse, lse, target,
        col_sum if fused else lse,
        n_rows, n_cols, q.shape[1], q.stride(0), c.stride(0), cols_per_split,
        inv_tau, pos_start, neg_start, num_neg, float(weight), inv_tau, n_rev,
        NORMALIZE=q_norm is not None, HAS_BIAS=has_bias, FUSED_REVERSE=fused, EPS_=EPS,
        BLOCK_M=t.block_m, BLOCK_N=t.block_n, BLOCK_D=t.block_d,
        UPCAST=cfg.upcast, PRECISION=cfg.precision, num_warps=t.warps, num_stages=t.stages)
    if splits == 1:
        return lse[0], target[0]
    # Only the split holding column pos_start + i adds to row i's target; the others add 0.
    return torch.logsumexp(lse, dim=0), target.sum(0)


# --------------------------------------------------------------------------------------------
# Backward
# --------------------------------------------------------------------------------------------


@triton.jit
def _backward_kernel(a_ptr, c_ptr, a_norm_ptr, c_norm_ptr, lse_ptr, lse_rev_ptr, g_ptr,
                     grad_a_ptr, grad_c_ptr,
                     n_rows, n_cols, dim, stride_a, stride_c,
                     inv_tau, pos_start, neg_start, num_neg, weight,
                     NORMALIZE: tl.constexpr, HAS_BIAS: tl.constexpr, SYMMETRIC: tl.constexpr,
                     EPS_: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                     UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """Adds this tile's share of dA_hat = dS C_hat / tau and dC_hat = dS^T A_hat / tau (fp32, atomics)."""
    # Column blocks vary fastest, so programs running together share their anchor rows.
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    j0 = tl.program_id(0) * BLOCK_N
    cols = j0 + tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    tile_ok = row_ok[:, None] & (cols[None, :] < n_cols)
    s, inv_a, inv_c = _scores(a_ptr, c_ptr, a_norm_ptr, c_norm_ptr, rows, cols, n_rows, n_cols, dim,
                              stride_a, stride_c, inv_tau, neg_start, num_neg, weight,
                              NORMALIZE, HAS_BIAS, EPS_, BLOCK_M, BLOCK_N, BLOCK_D, UPCAST, PRECISION)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    g = tl.load(g_ptr + rows, mask=row_ok, other=0.0)
    if SYMMETRIC:
        g_fwd = g * 0.5
    else:
        g_fwd = g
    # Mask the exponents, not the products: padding scores are arbitrary and exp of them may be inf.
    ds = tl.exp(tl.where(tile_ok, s - lse[:, None], float("-inf"))) * g_fwd[:, None]
    if SYMMETRIC:
        if j0 < n_rows:
            # Reverse direction: column j < B is the query p_j over all anchors, weight g_j / 2.
            rev_ok = cols < n_rows
            lse_rev = tl.load(lse_rev_ptr + cols, mask=rev_ok, other=0.0)
            g_rev = tl.load(g_ptr + cols, mask=rev_ok, other=0.0) * 0.5
            rev_arg = tl.where(row_ok[:, None] & rev_ok[None, :], s - lse_rev[None, :], float("-inf"))
            ds += tl.exp(rev_arg) * g_rev[None, :]
    # The one-hot: -g_i at (i, pos_start + i); symmetric puts both directions' (g_i / 2 each) there.
    ds = tl.where(cols[None, :] == (pos_start + rows)[:, None], ds - g[:, None], ds)
    ds = tl.where(tile_ok, ds, 0.0)
    # dS enters the products in the input dtype with neither 1/tau nor 1/||x|| folded in: both
    # can be large (1/||x|| = 1e12 for a zero row) and fp16 would overflow to inf, then inf * 0 =
    # NaN over the whole row block. 1/||x|| goes onto the operand tiles instead (normalized rows,
    # entries <= 1) and 1/tau onto the fp32 products: dA_hat = (dS C_hat) / tau, dC_hat = (dS^T A_hat) / tau.
    ds = ds.to(a_ptr.dtype.element_ty)
    if UPCAST:
        ds = ds.to(tl.float32)
    ds_t = tl.trans(ds)
    for k0 in range(0, dim, BLOCK_D):
        ks = k0 + tl.arange(0, BLOCK_D)
        k_ok = ks < dim
        a_hat = _normalized_tile(a_ptr, rows, ks, n_rows, dim, stride_a, inv_a, NORMALIZE, UPCAST)
        c_hat = _normalized_tile(c_ptr, cols, ks, n_cols, dim, stride_c, inv_c, NORMALIZE, UPCAST)
        da = tl.dot(ds, c_hat, input_precision=PRECISION) * inv_tau
        dc = tl.dot(ds_t, a_hat, input_precision=PRECISION) * inv_tau
        tl.atomic_add(grad_a_ptr + rows.to(tl.int64)[:, None] * dim + ks[None, :], da,
                      mask=row_ok[:, None] & k_ok[None, :], sem="relaxed")
        tl.atomic_add(grad_c_ptr + cols.to(tl.int64)[:, None] * dim + ks[None, :], dc,
                      mask=(cols < n_cols)[:, None] & k_ok[None, :], sem="relaxed")


@triton.jit
def _normalize_backward_kernel(x_ptr, norm_ptr, grad_ptr, dot_ptr, n_rows, dim, stride,
                               NORMALIZE: tl.constexpr, WRITE_DOT: tl.constexpr, EPS_: tl.constexpr,
                               BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr):
    """grad (fp32 [R, d], in place) from d(x_hat) to d(x); WRITE_DOT stores x_hat . d(x_hat) per row."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    inv = _inv_norm(norm_ptr, rows, n_rows, NORMALIZE, EPS_)
    dot = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for k0 in range(0, dim, BLOCK_D):
        ks = k0 + tl.arange(0, BLOCK_D)
        x = _load_tile(x_ptr, rows, ks, n_rows, dim, stride, UPCAST).to(tl.float32)
        dx_hat = _load_tile(grad_ptr, rows, ks, n_rows, dim, dim, False)
        dot += tl.sum(x * dx_hat, axis=1)
    dot = dot * inv
    if WRITE_DOT:
        tl.store(dot_ptr + rows, dot, mask=row_ok)
    if NORMALIZE:
        # Below eps the norm is the constant eps: no projection, just the 1/eps scale.
        norm = tl.load(norm_ptr + rows, mask=row_ok, other=1.0)
        proj = tl.where(norm < EPS_, 0.0, dot)
        for k0 in range(0, dim, BLOCK_D):
            ks = k0 + tl.arange(0, BLOCK_D)
            offs = rows.to(tl.int64)[:, None] * dim + ks[None, :]
            mask = row_ok[:, None] & (ks[None, :] < dim)
            x = _load_tile(x_ptr, rows, ks, n_rows, dim, stride, UPCAST).to(tl.float32)
            dx_hat = tl.load(grad_ptr + offs, mask=mask, other=0.0)
            dx = (dx_hat - x * (inv * proj)[:, None]) * inv[:, None]
            tl.store(grad_ptr + offs, dx, mask=mask)


def _normalize_backward(x, norm, grad, cfg, write_dot):
    dot = torch.empty(x.shape[0] if write_dot else 0, dtype=torch.float32, device=x.device)
    if norm is None and not write_dot:
        return dot
    grid = (triton.cdiv(x.shape[0], cfg.block_r),)
    _normalize_backward_kernel[grid](
        x, norm if norm is not None else grad, grad, dot if write_dot else grad, x.shape[0], x.shape[1], x.stride(0),
        NORMALIZE=norm is not None, WRITE_DOT=write_dot, EPS_=EPS, BLOCK_R=cfg.block_r,
        BLOCK_D=cfg.block_d_rows, UPCAST=cfg.upcast, num_warps=cfg.warps_rows)
    return dot


# --------------------------------------------------------------------------------------------
# Block configurations
# --------------------------------------------------------------------------------------------


class _Tiles(NamedTuple):
    block_m: int
    block_n: int
    block_d: int
    warps: int
    stages: int


class _Config(NamedTuple):
    fwd: _Tiles
    bwd: _Tiles
    block_r: int  # rows per program of the row kernels
    block_d_rows: int
    warps_rows: int
    upcast: bool
    precision: str


def _pow2_at_least(n: int, lo: int) -> int:
    return max(lo, triton.next_power_of_2(n))


def select_config(dtype: torch.dtype, dim: int, *, interpret: bool = _INTERPRET, small: bool | None = None) -> _Config:
    """Block sizes per dtype and d (all constexpr), chosen so that neither sm_80 nor sm_90 spills.

    16-bit inputs run on tensor cores; fp32 uses 3xTF32 dots: plain TF32 (10-bit mantissa) errs
    by ~5e-4 relative per score, which 1/tau amplifies past the 2e-4 bar, while 3xTF32 is as
    accurate as fp32 FMA at about a third of TF32's speed. sm_80 (mma.sync, accumulators in
    registers) is the tighter target: 128-row forward blocks spill there at 4 warps and ptxas
    caps 8-warp ones at 128 registers and spills too; the backward (score tile, dS in two
    scalings and two product chunks) reaches the 255-register cap with 64-wide d chunks
    (16-bit) or 64 x 64 fp32 tiles, hence 32-wide chunks and, for fp32, 16-wide chunks and 32
    candidates per tile (measured by tests/test_triton_aot.py, which fails on any spill). d below
    the chunk width shrinks the chunk to the next power of two (>= 16, tl.dot's minimum).

    ``small`` (default: when interpreting) uses 16 x 16 x 16 tiles so small test shapes cross
    several tiles, and the interpreter's per-program cost stays low.
    """
    small = interpret if small is None else small
    sixteen_bit = dtype in (torch.float16, torch.bfloat16)
    upcast = interpret and sixteen_bit
    precision = "tf32x3" if dtype == torch.float32 else "tf32"  # "tf32" is ignored for 16-bit operands
    if small:
        tiles = _Tiles(16, 16, 16, 4, 1)
        return _Config(tiles, tiles, 16, 16, 4, upcast, precision)
    chunk = min(32 if sixteen_bit else 16, _pow2_at_least(dim, 16))
    if sixteen_bit:
        fwd = _Tiles(64, 64, chunk, 4, 3)
        bwd = _Tiles(64, 64, chunk, 8, 3)
    else:
        fwd = _Tiles(64, 64, chunk, 4, 3)
        bwd = _Tiles(64, 32, chunk, 8, 2)
    return _Config(fwd, bwd, 16, min(128, _pow2_at_least(dim, 16)), 4, upcast, precision)


# --------------------------------------------------------------------------------------------
# Backend entry points (the contract in fastcse.ops)
# --------------------------------------------------------------------------------------------


def _fixed_max_is_safe(normalize: bool, tau: float) -> bool:
    """Whether the reverse column sums can use atomics against the fixed max M = 1/tau.

    Normalized positive-block scores (no bias there) lie in [-1/tau, 1/tau], so exp(s - M) >=
    exp(-2/tau), a normal fp32 number while 2/tau <= 80 (tau >= 0.025). Below that, or without
    normalization (no bound on the scores at all), the reverse LSE comes from a separate online
    column sweep over the B x B positive block: per-row-block partial (max, sum) pairs would
    need O(B^2 / BLOCK_M) memory, which at B = 65536 is hundreds of MB.
    """
    return normalize and 2.0 / tau <= _FIXED_MAX_RANGE


class _Problem:
    """A problem's inputs on the device, their row norms and the launch configuration."""

    def __init__(self, anchor, candidates, spec: LossProblem):
        if anchor.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise TypeError(f"the Triton backend takes float16, bfloat16 or float32, got {anchor.dtype}")
        self.spec = spec
        self.anchor = anchor.contiguous()
        self.candidates = candidates.contiguous()
        self.cfg = select_config(anchor.dtype, spec.dim)
        self.a_norm = _row_norms(self.anchor, self.cfg) if spec.normalize else None
        self.c_norm = _row_norms(self.candidates, self.cfg) if spec.normalize else None

    def stats(self):
        """(lse, target logit, lse_rev or None) in one pass over the tiles when possible."""
        spec = self.spec
        col_sum = None
        if spec.symmetric and _fixed_max_is_safe(spec.normalize, spec.tau):
            col_sum = torch.zeros(spec.batch, dtype=torch.float32, device=self.anchor.device)
        lse, target = _launch_forward(self.anchor, self.candidates, self.a_norm, self.c_norm, spec.inv_tau,
                                      spec.pos_start, spec.neg_start, spec.num_neg, spec.weight, self.cfg,
                                      col_sum=col_sum, n_rev=spec.batch if col_sum is not None else 0)
        if not spec.symmetric:
            return lse, target, None
        if col_sum is not None:
            return lse, target, spec.inv_tau + torch.log(col_sum)
        # Column sweep: the positives as queries against the anchors (unbiased, target unused).
        positives = self.candidates[: spec.batch]
        lse_rev, _ = _launch_forward(positives, self.anchor,
                                     self.c_norm[: spec.batch] if spec.normalize else None, self.a_norm,
                                     spec.inv_tau, 0, 0, 0, 0.0, self.cfg)
        return lse, target, lse_rev

    def grads(self, grad_rows, lse, lse_rev):
        spec = self.spec
        dev = self.anchor.device
        grad_a = torch.zeros((spec.batch, spec.dim), dtype=torch.float32, device=dev)
        grad_c = torch.zeros((spec.num_candidates, spec.dim), dtype=torch.float32, device=dev)
        t = self.cfg.bwd
        grid = (triton.cdiv(spec.num_candidates, t.block_n), triton.cdiv(spec.batch, t.block_m))
        a_norm = self.a_norm if spec.normalize else lse
        c_norm = self.c_norm if spec.normalize else lse
        _backward_kernel[grid](
            self.anchor, self.candidates, a_norm, c_norm, lse, lse_rev if spec.symmetric else lse,
            grad_rows, grad_a, grad_c,
            spec.batch, spec.num_candidates, spec.dim, self.anchor.stride(0), self.candidates.stride(0),
            spec.inv_tau, spec.pos_start, spec.neg_start, spec.num_neg, spec.weight,
            NORMALIZE=spec.normalize, HAS_BIAS=spec.has_bias, SYMMETRIC=spec.symmetric,
            EPS_=EPS, BLOCK_M=t.block_m, BLOCK_N=t.block_n, BLOCK_D=t.block_d,
            UPCAST=self.cfg.upcast, PRECISION=self.cfg.precision, num_warps=t.warps, num_stages=t.stages)
        # tau enters every score once, through a_hat . c_hat / tau, each score holding exactly one
        # anchor: d(tau) = -sum_i a_hat_i . dA_hat_i / tau (as cpu.finish_grads).
        dots = _normalize_backward(self.anchor, self.a_norm, grad_a, self.cfg, write_dot=True)
        _normalize_backward(self.candidates, self.c_norm, grad_c, self.cfg, write_dot=False)
        grad_tau = -dots.sum() / spec.tau
        return grad_a, grad_c, grad_tau


def _on_device(x: torch.Tensor):
    """Launches go to the current CUDA device: make it the inputs' one."""
    return torch.cuda.device(x.device) if x.device.type == "cuda" else contextlib.nullcontext()


def forward(anchor, candidates, tau, *, pos_start, neg_start, num_neg, normalize, symmetric,
            hard_negative_weight, compute_grad):
    with _on_device(anchor):
        prob = _Problem(anchor, candidates, describe(anchor, candidates, tau, pos_start=pos_start,
                                                     neg_start=neg_start, num_neg=num_neg, normalize=normalize,
                                                     symmetric=symmetric, hard_negative_weight=hard_negative_weight))
        lse, target, lse_rev = prob.stats()
        row_loss = lse - target
        if symmetric:
            # The reverse target logit p_i . a_i / tau is the forward one (no bias on positives).
            row_loss = (row_loss + lse_rev - target) / 2
        grads = None
        if compute_grad:  # the probabilities need the final LSEs: a second sweep with g = 1
            grads = prob.grads(torch.ones_like(lse), lse, lse_rev)
        empty = lse.new_empty((0,))
        return row_loss, lse, lse_rev if symmetric else empty, grads


def backward(grad_rows, anchor, candidates, tau, lse, lse_rev, *, pos_start, neg_start, num_neg, normalize,
             symmetric, hard_negative_weight):
    with _on_device(anchor):
        prob = _Problem(anchor, candidates, describe(anchor, candidates, tau, pos_start=pos_start,
                                                     neg_start=neg_start, num_neg=num_neg, normalize=normalize,
                                                     symmetric=symmetric, hard_negative_weight=hard_negative_weight))
        f32 = dict(dtype=torch.float32)
        return prob.grads(grad_rows.to(**f32).contiguous(), lse.to(**f32).contiguous(),
                          lse_rev.to(**f32).contiguous() if symmetric else None)
