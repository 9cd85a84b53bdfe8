"""The Triton backend's shared parts: the cell-rule constexprs, the tile helpers every score
kernel inlines, the row-norm kernel, the block configurations and a direction's sweep.

``fastcse.triton_info_nce`` is the backend (its design, and the entry points); the score
kernels sit beside their launch code in ``fastcse.triton_forward`` and
``fastcse.triton_backward``.

Under ``TRITON_INTERPRET=1`` (the tests) the kernels run on CPU tensors; 16-bit tiles are
upcast to fp32 right after loading (the interpreter's bf16 dot and sums are wrong), and
small blocks are used so small test shapes cross several tiles.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from fastcse.checks import NORMALIZE_EPS
from fastcse.problem import DIRECTION_ROLES, LossProblem
from fastcse.problem import MASK_OWN_DOCUMENTS as OWN_DOCUMENTS_MASK_NAME
from fastcse.problem import MASK_SELF as SELF_MASK_NAME

# Whether @triton.jit interprets (decided when triton is imported, hence read once here).
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# A direction's MASK (constexpr): the cells of row i that are -inf before the log-sum-exp.
MASK_NONE = tl.constexpr(0)
MASK_SELF = tl.constexpr(1)  # query_to_query: key self_start + i, the anchor itself
MASK_OWN_DOCUMENTS = tl.constexpr(2)  # doc_to_doc: candidate pos_start + i and row i's own hard negatives
MASK_CODES = {None: MASK_NONE.value, SELF_MASK_NAME: MASK_SELF.value, OWN_DOCUMENTS_MASK_NAME: MASK_OWN_DOCUMENTS.value}
# query_to_doc's PENALTY (constexpr): the cells of row i that get the hardness term strength * sim.
PENALTY_NONE = tl.constexpr(0)
PENALTY_IN_BATCH = tl.constexpr(1)  # every column but row i's own documents
PENALTY_HARD = tl.constexpr(2)  # row i's own hard negatives
PENALTY_ALL = tl.constexpr(3)  # every column but the positive pos_start + i
PENALTY_MODES = {None: PENALTY_NONE.value, "in_batch_negatives": PENALTY_IN_BATCH.value,
                 "hard_negatives": PENALTY_HARD.value, "all_negatives": PENALTY_ALL.value}
# A direction's use of the per-row ids (constexpr IDS): none, the group mask (every
# direction: keys j < P with row i's id, j != pos_start + i, are -inf), or query_to_doc's label
# target (the mean logit over the same-label positives, which the penalty spares).
IDS_NONE = tl.constexpr(0)
IDS_GROUP = tl.constexpr(1)
IDS_LABEL = tl.constexpr(2)
# False negatives by similarity (constexpr FALSE_NEG, fastcse.false_negatives): off, self-guided
# (the plain scores s = sim / tau against thresholds / tau), or a guide's tile (the product of its
# normalized fp32 rows) against the thresholds.
FALSE_NEG_NONE = tl.constexpr(0)
FALSE_NEG_SELF = tl.constexpr(1)
FALSE_NEG_GUIDED = tl.constexpr(2)


# --------------------------------------------------------------------------------------------
# Shared tile helpers
# --------------------------------------------------------------------------------------------


@triton.jit
def load_tile(ptr, rows, cols_k, n_rows, dim, stride, UPCAST: tl.constexpr):
    """x[rows, cols_k] (zero outside), in the input dtype or fp32 when UPCAST."""
    offs = rows.to(tl.int64)[:, None] * stride + cols_k[None, :]
    mask = (rows[:, None] < n_rows) & (cols_k[None, :] < dim)
    x = tl.load(ptr + offs, mask=mask, other=0.0)
    if UPCAST:
        x = x.to(tl.float32)
    return x


@triton.jit
def raw_scores(q_ptr, k_ptr, rows, cols, n_rows, n_cols, dim, stride_q, stride_k,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
               UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """q[rows] . k[cols] for a BLOCK_M x BLOCK_N tile, fp32 accumulation over d."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, dim, BLOCK_D):
        ks = k0 + tl.arange(0, BLOCK_D)
        q = load_tile(q_ptr, rows, ks, n_rows, dim, stride_q, UPCAST)
        k = load_tile(k_ptr, cols, ks, n_cols, dim, stride_k, UPCAST)
        acc = tl.dot(q, tl.trans(k), acc, input_precision=PRECISION)
    return acc


@triton.jit
def inverse_norms(norm_ptr, idx, n, NORMALIZE: tl.constexpr, EPS_: tl.constexpr):
    """1 / max(||x||, eps) for the rows idx (1 when not normalizing)."""
    if NORMALIZE:
        norm = tl.load(norm_ptr + idx, mask=idx < n, other=1.0)
        return 1.0 / tl.maximum(norm, EPS_)
    else:
        return tl.full(idx.shape, 1.0, tl.float32)


@triton.jit
def normalized_tile(ptr, rows, cols_k, n_rows, dim, stride, inv_norm, NORMALIZE: tl.constexpr,
                    UPCAST: tl.constexpr):
    """x_hat[rows, cols_k] = x / max(||x||, eps), scaled in fp32 and rounded to the input dtype
    (as a GPU product operand), then fp32 when UPCAST."""
    x = load_tile(ptr, rows, cols_k, n_rows, dim, stride, False)
    if NORMALIZE:
        x = (x.to(tl.float32) * inv_norm[:, None]).to(ptr.dtype.element_ty)
    if UPCAST:
        x = x.to(tl.float32)
    return x


@triton.jit
def tile_scores(q_ptr, k_ptr, q_norm_ptr, k_norm_ptr, rows, cols, n_rows, n_cols, dim, stride_q, stride_k, inv_tau,
                NORMALIZE: tl.constexpr, EPS_: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """The plain scores s = q_hat . k_hat / tau of a tile; returns (s, 1/||q||, 1/||k||)."""
    s = raw_scores(q_ptr, k_ptr, rows, cols, n_rows, n_cols, dim, stride_q, stride_k,
                   BLOCK_M, BLOCK_N, BLOCK_D, UPCAST, PRECISION)
    inv_q = inverse_norms(q_norm_ptr, rows, n_rows, NORMALIZE, EPS_)
    inv_k = inverse_norms(k_norm_ptr, cols, n_cols, NORMALIZE, EPS_)
    return s * (inv_q * inv_tau)[:, None] * inv_k[None, :], inv_q, inv_k


@triton.jit
def diagonal(rows, cols, start):
    """The cells (i, start + i) of a tile."""
    return cols[None, :] == (start + rows)[:, None]


@triton.jit
def own_negatives(rows, cols, neg_start, num_neg):
    """The cells (i, neg_start + i * num_neg + t), t < num_neg: row i's own hard negatives."""
    first = neg_start + rows * num_neg
    return (cols[None, :] >= first[:, None]) & (cols[None, :] < first[:, None] + num_neg)


@triton.jit
def same_id(ids_ptr, rows, cols, n_rows, pos_start, num_positives):
    """The cells (i, j), j < P, whose key j has row i's id ids[pos_start + i] (its own key
    included): one [BLOCK_M] and one [BLOCK_N] load of the int32 dense ids, compared in registers.
    Padding rows and columns get different sentinels (the dense ids are >= 0): never equal."""
    row_id = tl.load(ids_ptr + pos_start + rows, mask=rows < n_rows, other=-1)
    col_id = tl.load(ids_ptr + cols, mask=cols < num_positives, other=-2)
    return row_id[:, None] == col_id[None, :]


@triton.jit
def group_masked(same, rows, cols, pos_start):
    """The group mask's cells: row i's id, but not its own key pos_start + i."""
    return same & ~diagonal(rows, cols, pos_start)


@triton.jit
def tile_logits(s, same, rows, cols, pos_start, neg_start, num_neg, weight, penalty_scale, self_start,
                HAS_BIAS: tl.constexpr, PENALTY: tl.constexpr, MASK: tl.constexpr, IDS: tl.constexpr):
    """A direction's logits from its plain scores s = sim / tau: the hardness penalty, the
    hard-negative bias, then the masks. The penalty strength * sim is s * strength * tau, so a
    penalized logit is s * penalty_scale, penalty_scale = 1 + strength * tau: one multiply, and
    the backward needs no separate sim. Applied before the bias, which is not a similarity.
    ``same`` (same_id's tile, read only with IDS): with labels the row's positives are its
    label's cells, which the penalty spares; with groups, group_masked's cells are -inf."""
    if PENALTY != PENALTY_NONE:
        if IDS == IDS_LABEL:
            positives = same
        else:
            positives = diagonal(rows, cols, pos_start)
        if PENALTY == PENALTY_HARD:
            penalized = own_negatives(rows, cols, neg_start, num_neg)
        elif PENALTY == PENALTY_IN_BATCH:
            penalized = ~(positives | own_negatives(rows, cols, neg_start, num_neg))
        else:
            penalized = ~positives
        s = tl.where(penalized, s * penalty_scale, s)
    if HAS_BIAS:
        s += tl.where(own_negatives(rows, cols, neg_start, num_neg), weight, 0.0)
    if MASK == MASK_SELF:
        s = tl.where(diagonal(rows, cols, self_start), float("-inf"), s)
    elif MASK == MASK_OWN_DOCUMENTS:
        own = diagonal(rows, cols, pos_start) | own_negatives(rows, cols, neg_start, num_neg)
        s = tl.where(own, float("-inf"), s)
    if IDS == IDS_GROUP:
        s = tl.where(group_masked(same, rows, cols, pos_start), float("-inf"), s)
    return s


@triton.jit
def above_limit(sim, thr_ptr, rows, n_rows):
    """The false-negative rule's cells before its exceptions: similarity strictly above the row's limit."""
    limit = tl.load(thr_ptr + rows, mask=rows < n_rows, other=float("inf"))
    return sim > limit[:, None]


@triton.jit
def guide_above_limit(gq_ptr, gk_ptr, thr_ptr, rows, cols, n_rows, n_cols, dim_g, stride_gq, stride_gk,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """above_limit of a guide's tile, from its normalized fp32 rows, in 16-wide chunks of d_g and
    3xTF32 (as accurate as fp32 FMA). Register budget (tests/test_triton_aot.py): the backward
    calls it before its scores (one fp32 tile live at a time; after them, 16-bit spills on sm_80),
    the forward after them (before them, fp32 spills); 32-wide chunks spill either way."""
    sim = raw_scores(gq_ptr, gk_ptr, rows, cols, n_rows, n_cols, dim_g, stride_gq, stride_gk,
                     BLOCK_M, BLOCK_N, 16, False, "tf32x3")
    return above_limit(sim, thr_ptr, rows, n_rows)


@triton.jit
def never_left_out(same, rows, cols, pos_start, self_start, HAS_TARGET: tl.constexpr, IDS: tl.constexpr):
    """The cells the false-negative rule spares: query_to_doc's target(s) (HAS_TARGET: the
    diagonal, or with labels the row's label cells), elsewhere the key self_start + i
    (doc_to_query's own anchor; in query_to_query and doc_to_doc that cell is masked anyway)."""
    if HAS_TARGET:
        if IDS == IDS_LABEL:
            kept = same
        else:
            kept = diagonal(rows, cols, pos_start)
    else:
        kept = diagonal(rows, cols, self_start)
    return kept


@triton.jit
def tile_guide_cells(gq_ptr, gk_ptr, thr_ptr, rows, cols, n_rows, n_cols, dim_g, stride_gq, stride_gk,
                     FALSE_NEG: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """With a guide (FALSE_NEG_GUIDED), its tile's cells above the rows' limits; 0 (unread)
    otherwise. A separate step from ``rule_logits`` so that each kernel computes it where its
    registers allow (see guide_above_limit), and Matryoshka's once for every dimension."""
    if FALSE_NEG == FALSE_NEG_GUIDED:
        above = guide_above_limit(gq_ptr, gk_ptr, thr_ptr, rows, cols, n_rows, n_cols, dim_g, stride_gq,
                                  stride_gk, BLOCK_M, BLOCK_N)
    else:
        above = 0
    return above


@triton.jit
def rule_logits(s, guide_above, thr_ptr, same, rows, cols, n_rows, pos_start, neg_start, num_neg, weight,
                penalty_scale, self_start, HAS_BIAS: tl.constexpr, PENALTY: tl.constexpr, MASK: tl.constexpr,
                HAS_TARGET: tl.constexpr, IDS: tl.constexpr, FALSE_NEG: tl.constexpr):
    """A direction's logits from its plain scores s: ``tile_logits``'s cell rules, then the
    false-negative rule's cells at -inf but the ones it spares. Self-guided, the cells whose s
    is above the rows' limits at thr_ptr (read before the penalty and the bias change s);
    guided, ``guide_above`` (tile_guide_cells)."""
    if FALSE_NEG == FALSE_NEG_SELF:
        above = above_limit(s, thr_ptr, rows, n_rows)
    else:
        above = guide_above
    if FALSE_NEG != FALSE_NEG_NONE:
        left_out = above & ~never_left_out(same, rows, cols, pos_start, self_start, HAS_TARGET, IDS)
    else:
        left_out = 0  # unread
    s = tile_logits(s, same, rows, cols, pos_start, neg_start, num_neg, weight, penalty_scale, self_start,
                    HAS_BIAS, PENALTY, MASK, IDS)
    if FALSE_NEG != FALSE_NEG_NONE:
        s = tl.where(left_out, float("-inf"), s)
    return s


@triton.jit
def online_lse_update(m_i, l_i, s, MAY_BE_EMPTY: tl.constexpr):
    """One tile of a row log-sum-exp's running (max, sum). Without a mask every tile holds a
    finite logit in every row (padding columns are -inf, but each tile has a valid one), so the
    new max is finite. MAY_BE_EMPTY (masked directions): a row's tile may be all -inf (B = 1's
    query_to_query, a tile of own documents), where the max stays -inf and the shift uses 0, as
    exp(-inf - (-inf)) would be NaN; such a row's LSE comes out -inf (no cells), and joint's
    logsumexp over the directions drops it."""
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    if MAY_BE_EMPTY:
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        shift = m_new
    l_i = l_i * tl.exp(m_i - shift) + tl.sum(tl.exp(s - shift[:, None]), axis=1)
    return m_new, l_i


@triton.jit
def reverse_columns(j0, cols, pos_start, n_rev, BLOCK_N: tl.constexpr):
    """Whether the tile at j0 overlaps the positive block [pos_start, pos_start + n_rev), and the
    tile's columns as doc_to_query rows (col - pos_start) with their validity."""
    overlaps = (j0 < pos_start + n_rev) & (j0 + BLOCK_N > pos_start)
    rev = cols - pos_start
    return overlaps, rev, (rev >= 0) & (rev < n_rev)


# --------------------------------------------------------------------------------------------
# Row norms
# --------------------------------------------------------------------------------------------


@triton.jit
def _row_norm_kernel(x_ptr, norm_ptr, n_rows, dim, stride,
                     BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    sq = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for k0 in range(0, dim, BLOCK_D):
        x = load_tile(x_ptr, rows, k0 + tl.arange(0, BLOCK_D), n_rows, dim, stride, UPCAST).to(tl.float32)
        sq += tl.sum(x * x, axis=1)
    tl.store(norm_ptr + rows, tl.sqrt(sq), mask=rows < n_rows)


def row_norms(x: torch.Tensor, cfg: Config) -> torch.Tensor:
    norms = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(x.shape[0], cfg.block_r),)
    _row_norm_kernel[grid](x, norms, x.shape[0], x.shape[1], x.stride(0),
                           BLOCK_R=cfg.block_r, BLOCK_D=cfg.block_d_rows, UPCAST=cfg.upcast,
                           num_warps=cfg.warps_rows)
    return norms


# --------------------------------------------------------------------------------------------
# Block configurations
# --------------------------------------------------------------------------------------------


class Tiles(NamedTuple):
    block_m: int
    block_n: int
    block_d: int
    warps: int
    stages: int


class Config(NamedTuple):
    fwd: Tiles
    bwd: Tiles
    block_r: int  # rows per program of the row kernels
    block_d_rows: int
    warps_rows: int
    upcast: bool
    precision: str


def _pow2_at_least(n: int, lo: int) -> int:
    return max(lo, triton.next_power_of_2(n))


def select_config(dtype: torch.dtype, dim: int, *, interpret: bool = INTERPRET, small: bool | None = None) -> Config:
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
        tiles = Tiles(16, 16, 16, 4, 1)
        return Config(tiles, tiles, 16, 16, 4, upcast, precision)
    chunk = min(32 if sixteen_bit else 16, _pow2_at_least(dim, 16))
    if sixteen_bit:
        fwd = Tiles(64, 64, chunk, 4, 3)
        bwd = Tiles(64, 64, chunk, 8, 3)
    else:
        fwd = Tiles(64, 64, chunk, 4, 3)
        bwd = Tiles(64, 32, chunk, 8, 2)
    return Config(fwd, bwd, 16, min(128, _pow2_at_least(dim, 16)), 4, upcast, precision)


# --------------------------------------------------------------------------------------------
# A direction as a sweep of tiles
# --------------------------------------------------------------------------------------------


class Sweep(NamedTuple):
    """One direction as a tile sweep: row i's query against every key, and the rules of its cells."""

    direction: str
    queries: torch.Tensor  # [B, d]: the anchors, or the positives (a view into the candidates)
    q_norm: torch.Tensor | None  # fp32 row norms, None without normalization
    keys: torch.Tensor
    k_norm: torch.Tensor | None
    mask: int  # MASK_* (the constexpr of the direction's DIRECTION_ROLES mask)
    ids: torch.Tensor | None = None  # int32 dense ids of the positive block [P] (group or label)
    inv_count: torch.Tensor | None = None  # fp32 [B]: 1 / |P_i| with labels
    false_neg: int = 0  # FALSE_NEG_*
    thresholds: torch.Tensor | None = None  # fp32 [B]: the rule's per-row limit (over tau when self-guided)
    guide_queries: torch.Tensor | None = None  # fp32 [B, d_g], normalized: the guide's rows of the queries
    guide_keys: torch.Tensor | None = None  # fp32 [n, d_g], normalized: the guide's rows of the keys

    @property
    def holds_target(self) -> bool:
        """The direction with the hard-negative bias, the hardness penalty and the target (query_to_doc)."""
        return DIRECTION_ROLES[self.direction].holds_target


def cell_args(sweep: Sweep, problem: LossProblem):
    """(runtime scalars, constexprs) of a direction's cell rules, shared by both kernels."""
    q2d = sweep.holds_target
    penalty = PENALTY_MODES[problem.hardness_mode] if q2d else PENALTY_NONE.value
    # Groups mask every direction; labels change query_to_doc's target and penalty only.
    ids = IDS_NONE.value
    if problem.id_mode == "group":
        ids = IDS_GROUP.value
    elif problem.id_mode == "label" and q2d:
        ids = IDS_LABEL.value
    scalars = (problem.pos_start, problem.neg_start, problem.num_neg, problem.weight,
               1.0 + problem.hardness_strength * problem.tau, problem.anchor_start, problem.num_positives)
    constexprs = dict(NORMALIZE=problem.normalize, HAS_BIAS=q2d and problem.has_bias, PENALTY=penalty,
                      MASK=sweep.mask, HAS_TARGET=q2d, IDS=ids, EPS_=NORMALIZE_EPS, FALSE_NEG=sweep.false_neg)
    return scalars, constexprs


def guide_args(sweep: Sweep, placeholder: torch.Tensor) -> dict:
    """The false-negative rule's kernel arguments (unread placeholders without a rule or guide)."""
    guide_q = pointer_or(sweep.guide_queries, placeholder)
    guide_k = pointer_or(sweep.guide_keys, placeholder)
    return dict(gq_ptr=guide_q, gk_ptr=guide_k, thr_ptr=pointer_or(sweep.thresholds, placeholder),
                dim_g=guide_q.shape[-1] if sweep.guide_queries is not None else 1,
                stride_gq=guide_q.stride(0) if sweep.guide_queries is not None else 1,
                stride_gk=guide_k.stride(0) if sweep.guide_keys is not None else 1)


def pointer_or(x, placeholder):
    """A pointer argument the kernel's constexprs leave unread still needs a tensor."""
    return placeholder if x is None else x
