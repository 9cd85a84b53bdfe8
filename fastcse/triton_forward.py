"""The Triton backend's forward statistics: ``_forward_kernel`` and its launch.

One launch per direction (``fastcse.triton_info_nce`` decides which run, and fuses
doc_to_query's row sums into query_to_doc's launch where it can): each program takes a block
of query rows and one split of the keys (see :func:`column_splits`), loops over key tiles with
an online softmax (running max and sum) and stores the direction's row log-sum-exp (and, for
query_to_doc, the target logit).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastcse.problem import LossProblem
from fastcse.triton_tiles import (FALSE_NEG_NONE, IDS_GROUP, IDS_LABEL, IDS_NONE, MASK_NONE, Config, Sweep, cell_args,
                                  diagonal, group_masked, guide_args, online_lse_update, pointer_or, reverse_columns,
                                  rule_logits, same_id, tile_guide_cells, tile_scores)


@triton.jit
def _forward_kernel(q_ptr, k_ptr, q_norm_ptr, k_norm_ptr, lse_ptr, target_ptr, col_sum_ptr, ids_ptr, inv_count_ptr,
                    n_rows, n_cols, dim, stride_q, stride_k, cols_per_split,
                    inv_tau, pos_start, neg_start, num_neg, weight, penalty_scale, self_start, num_positives,
                    fixed_max,
                    NORMALIZE: tl.constexpr, HAS_BIAS: tl.constexpr, PENALTY: tl.constexpr, MASK: tl.constexpr,
                    HAS_TARGET: tl.constexpr, IDS: tl.constexpr, FUSED_REVERSE: tl.constexpr,
                    EPS_: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                    gq_ptr, gk_ptr, thr_ptr, dim_g, stride_gq, stride_gk, FALSE_NEG: tl.constexpr):
    """One direction's LSE (and with HAS_TARGET the target logit) of a block of query rows over
    one split of the keys (program_id(1)), stored at [split, row]. FUSED_REVERSE (query_to_doc
    with local anchor keys) also adds, for the positive block's columns pos_start + j (j < n_rows),
    sum_i exp(s_ij - fixed_max) into col_sum[j]: doc_to_query's row sums, from the plain scores
    (less the group mask's cells, which are symmetric: pos_start = 0 there). With IDS_LABEL the
    target is sum over the row's label cells of the logit, times inv_count[i] = 1 / |P_i|.
    FALSE_NEG: the false-negative rule's cells are -inf (no FUSED_REVERSE then)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    split_start = tl.program_id(1) * cols_per_split
    split_end = tl.minimum(split_start + cols_per_split, n_cols)
    row_ok = rows < n_rows
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    target = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for j0 in range(split_start, split_end, BLOCK_N):
        cols = j0 + tl.arange(0, BLOCK_N)
        s, inv_q, inv_k = tile_scores(q_ptr, k_ptr, q_norm_ptr, k_norm_ptr, rows, cols, n_rows, n_cols, dim,
                                      stride_q, stride_k, inv_tau, NORMALIZE, EPS_, BLOCK_M, BLOCK_N, BLOCK_D,
                                      UPCAST, PRECISION)
        if IDS != IDS_NONE:
            same = same_id(ids_ptr, rows, cols, n_rows, pos_start, num_positives)
        else:
            same = 0  # unread
        if FUSED_REVERSE:
            overlaps, rev, rev_ok = reverse_columns(j0, cols, pos_start, n_rows, BLOCK_N)
            if overlaps:
                cell_ok = row_ok[:, None] & rev_ok[None, :]
                if IDS == IDS_GROUP:
                    cell_ok = cell_ok & ~group_masked(same, rows, cols, pos_start)
                e = tl.exp(tl.where(cell_ok, s - fixed_max, float("-inf")))
                tl.atomic_add(col_sum_ptr + rev, tl.sum(e, axis=0), mask=rev_ok)
        # A guide's tile after the scores here: before them, fp32 spills on sm_80.
        above = tile_guide_cells(gq_ptr, gk_ptr, thr_ptr, rows, cols, n_rows, n_cols, dim_g, stride_gq, stride_gk,
                                 FALSE_NEG, BLOCK_M, BLOCK_N)
        s = rule_logits(s, above, thr_ptr, same, rows, cols, n_rows, pos_start, neg_start, num_neg, weight,
                        penalty_scale, self_start, HAS_BIAS, PENALTY, MASK, HAS_TARGET, IDS, FALSE_NEG)
        if HAS_TARGET:
            if IDS == IDS_LABEL:
                target += tl.sum(tl.where(same, s, 0.0), axis=1)
            else:
                target += tl.sum(tl.where(diagonal(rows, cols, pos_start), s, 0.0), axis=1)
        s = tl.where(cols[None, :] < n_cols, s, float("-inf"))
        m_i, l_i = online_lse_update(m_i, l_i, s,
                                     (MASK != MASK_NONE) or (IDS == IDS_GROUP) or (FALSE_NEG != FALSE_NEG_NONE))
    out = tl.program_id(1) * n_rows + rows
    tl.store(lse_ptr + out, m_i + tl.log(l_i), mask=row_ok)
    if HAS_TARGET:
        if IDS == IDS_LABEL:
            target *= tl.load(inv_count_ptr + rows, mask=row_ok, other=0.0)
        tl.store(target_ptr + out, target, mask=row_ok)


def column_splits(n_row_blocks: int, n_col_tiles: int, device: torch.device) -> int:
    """How many programs share one row block's keys (flash-decoding style split).

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


def launch_forward(sweep: Sweep, problem: LossProblem, cfg: Config, col_sum=None):
    """Returns (lse, target logit or None) of the sweep's queries; with col_sum (query_to_doc),
    doc_to_query's fixed-max row sums are added into it."""
    queries, keys = sweep.queries, sweep.keys
    n_rows, n_cols = queries.shape[0], keys.shape[0]
    t = cfg.fwd
    n_row_blocks, n_col_tiles = triton.cdiv(n_rows, t.block_m), triton.cdiv(n_cols, t.block_n)
    splits = column_splits(n_row_blocks, n_col_tiles, queries.device)
    cols_per_split = triton.cdiv(n_col_tiles, splits) * t.block_n
    lse = torch.empty((splits, n_rows), dtype=torch.float32, device=queries.device)
    target = torch.empty_like(lse) if sweep.holds_target else None
    scalars, constexprs = cell_args(sweep, problem)
    _forward_kernel[(n_row_blocks, splits)](
        queries, keys, pointer_or(sweep.q_norm, lse), pointer_or(sweep.k_norm, lse), lse, pointer_or(target, lse),
        pointer_or(col_sum, lse), pointer_or(sweep.ids, lse), pointer_or(sweep.inv_count, lse),
        n_rows, n_cols, queries.shape[1], queries.stride(0), keys.stride(0), cols_per_split,
        problem.inv_tau, *scalars, problem.inv_tau,
        FUSED_REVERSE=col_sum is not None, BLOCK_M=t.block_m, BLOCK_N=t.block_n, BLOCK_D=t.block_d,
        UPCAST=cfg.upcast, PRECISION=cfg.precision, num_warps=t.warps, num_stages=t.stages, **constexprs,
        **guide_args(sweep, lse))
    if splits == 1:
        return lse[0], None if target is None else target[0]
    # Only the split holding column pos_start + i adds to row i's target; the others add 0.
    return torch.logsumexp(lse, dim=0), None if target is None else target.sum(0)
