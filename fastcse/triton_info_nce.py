"""Triton backend of the fused InfoNCE: kernels and their launch code.

Implements the backend contract in ``fastcse.ops`` for every loss variant of
``fastcse.problem`` (directions, partition modes, hardness), with the CPU backend's semantics
(``fastcse.cpu`` is the executable spec), and issue #12's per-row ids (group_ids, labels) and
extra negatives (a queue). Memory is O((B + N + M) d): no B x N tensor ever exists, the scores
only as register tiles.

Directions as tile sweeps. Each direction of row i is a row-local block: a query row (anchor
a_i or positive p_i) against a key set (the N candidates or the M anchor keys). One generalized
kernel pair serves all four, specialized by constexprs rather than runtime branches:

    direction        queries   keys          MASK (cells set to -inf)      bias, PENALTY, target
    query_to_doc     anchors   candidates    none                          yes
    query_to_query   anchors   anchor keys   self (key anchor_start + i)   no
    doc_to_query     positives anchor keys   none                          no
    doc_to_doc       positives documents     own documents of row i        no

(the documents: the candidates less the extra negatives; IDS adds the group mask to every
direction, the label target to query_to_doc). The positives are the candidates' rows
pos_start..pos_start + B (a view, so their dQ atomics land directly in those rows of
d(candidates)). PENALTY (query_to_doc only) picks the cells that
get the stop-gradient hardness term strength * sim: none / in-batch negatives / own hard
negatives / all but the positive; a penalized logit is s * (1 + strength * tau) with s = sim / tau,
and the backward treats it as a constant (dL/ds = G / tau with G from the penalized
probabilities). The mask and penalty compare per-row column ids inside the tile: no mask tensor.

Kernels (each launch below its kernel):

- ``_row_norm_kernel``: ||x|| per row (fp32). The score kernels scale their tiles by
  1 / max(||x||, eps) instead of reading normalized copies of the inputs.
- ``_forward_kernel``: one program per block of query rows and split of the keys (see
  ``_column_splits``); loops over key tiles with an online softmax (running max and sum) and
  stores the direction's row log-sum-exp (and, for query_to_doc, the target logit). One launch
  per direction; the joint LSE is the ``torch.logsumexp`` of the directions' [B] LSEs (exact:
  LSE over a union is the LSE of the parts' LSEs), per_direction keeps them as [P, B].
  doc_to_query with the anchors themselves as keys (one process) needs no launch of its own:
  its row i is column pos_start + i of query_to_doc's positive block (the unbiased,
  unpenalized score), so query_to_doc's sweep accumulates those column sums with atomics
  against the fixed max M = 1/tau when that is safe (see ``_fixed_max_is_safe``); otherwise it
  gets its own sweep over the B x B block (positives against anchors).
- ``_backward_kernel``: one program per (row block, key block) tile, as in Cut-Cross-Entropy
  rather than FlashAttention-2: the tile's logits are recomputed once from the saved LSE
  (the row's joint LSE, or its direction's for per_direction, with a row weight g or g / P), dS
  is formed in registers, and both products dS K and dS^T Q are accumulated with fp32 atomics
  into the right gradient buffers (d(anchor), d(candidates), d(anchor keys); several directions
  share buffers), chunk by chunk over d. The target term -g sits in query_to_doc's launch only.
  With local anchor keys, doc_to_query's cells are taken from query_to_doc's tiles (REVERSE):
  its dS lands on the transposed positive block, so the same two products carry both. Why not
  FA2's two kernels (rows for dQ, columns for dK): sentence embeddings have d = 384..1024, so a
  [BLOCK, d] fp32 accumulator does not fit in registers, tiling d in the outputs would recompute
  the scores d / BLOCK_D times, and two kernels compute every score tile twice. The price: fp32
  atomic additions make GPU gradients bitwise non-deterministic (summation order).
- ``_normalize_backward_kernel``: a row kernel for dx = (dx_hat - x_hat (x_hat . dx_hat)) / ||x||
  (dx_hat / eps below eps), in place, and the per-row x_hat . dx_hat. Every logit's tau-dependence
  is q_hat . k_hat / tau, so dL/dtau = -(1/tau) sum over cells G s; the query side's x_hat . dx_hat
  and the key side's each sum to that, hence d(tau) = -(1 / (2 tau)) * the sum of x_hat . dx_hat
  over every row of every buffer, whichever role (query, key, both) a row played.

Work, in B x n x d products ("blocks"; n = N for query_to_doc and doc_to_doc, M for the
anchor-key directions, M = B in one process): a direction costs 1 block in the forward and 3
in the backward (recompute, dQ, dK), 4 in all, so forward + backward is

    query_to_doc (SimCSE)                                   4 B N d
    + doc_to_query, anchor keys local (symmetric, either
      partition; hardness allowed)                          4 B N d   (+ 1 B B d when tau < 0.025
                                                                       or normalize=False)
    + doc_to_query with separate anchor keys (distributed)  4 B N d + 4 B M d
    + query_to_query                                        + 4 B M d
    + doc_to_doc                                            + 4 B (N - Q) d

e.g. all four directions in one process: 8 B N d + 4 B^2 d. ``forward(compute_grad=True)`` runs
the statistics pass, then the backward with g = 1: the probabilities need each row's final LSE
(for joint: over every direction), so gradients in the same sweep would need either full score
rows (the CPU path's chunks: O(R N) scratch) or rescaling [B, d] and [N, d] accumulators as the
running max moves; the two passes cost the same as forward + backward and no extra memory.

Issue #12, and what each option costs (no launch, no product, no B x N tensor added):

- Ids (``ids`` [P] over the positive block and the anchor keys, row i's id ids[pos_start + i])
  are made dense int32 once per call with torch (sort + searchsorted: O(P log P), no host sync;
  equal ids get equal dense ids whatever int64 values they hold). Every tile of a direction with
  ids loads its rows' ids ([BLOCK_M]) and its columns' ([BLOCK_N], columns j < P) and compares
  them in registers (constexpr IDS, ``_same_id``): one compare and select per cell.
- group_ids (IDS_GROUP, every direction): the same-id cells but the row's own key pos_start + i
  get -inf, like the MASK cells (so the online softmax takes the all--inf-tile guard). The
  fused doc_to_query reads query_to_doc's positive block: there pos_start = 0 (P = M = B), the
  mask's cells are symmetric, and the reverse cells drop the same ones, in the fixed-max column
  sums and in the backward.
- labels (IDS_LABEL, query_to_doc only): nothing is masked; the target is the mean of the row's
  same-label positive logits (the forward sums them per tile and scales by 1 / |P_i|, a [B]
  vector computed once with the dense ids), the penalty spares those cells instead of the
  diagonal, and the backward's one-hot becomes the label-match weight: dS -= g_i / |P_i| on the
  same-label cells, folded into dS before the two products, so labels add nothing to them. The
  target is shared by every direction: doc_to_query (fused or not) gets no target term.
- extra negatives (the last Q = num_extra candidates): more query_to_doc columns, no bias, no
  own-negative penalty, never masked, gradients through d(candidates) like any column;
  doc_to_doc's keys are the first N - Q candidates (a prefix view, its gradient rows the same).

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

from fastcse.problem import DOC_TO_DOC, DOC_TO_QUERY, QUERY_TO_DOC, QUERY_TO_QUERY, LossProblem

EPS = 1e-12  # as F.normalize
# exp(s - M) over the positive block, with M = 1/tau the largest possible normalized score,
# stays a normal fp32 number (> 1.2e-38 = exp(-87.3)) while M - s <= 2 / tau <= this bound.
_FIXED_MAX_RANGE = 80.0

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# A direction's MASK (constexpr): the cells of row i that are -inf before the log-sum-exp.
MASK_NONE = tl.constexpr(0)
MASK_SELF = tl.constexpr(1)  # query_to_query: key self_start + i, the anchor itself
MASK_OWN_DOCUMENTS = tl.constexpr(2)  # doc_to_doc: candidate pos_start + i and row i's own hard negatives
# query_to_doc's PENALTY (constexpr): the cells of row i that get the hardness term strength * sim.
PENALTY_NONE = tl.constexpr(0)
PENALTY_IN_BATCH = tl.constexpr(1)  # every column but row i's own documents
PENALTY_HARD = tl.constexpr(2)  # row i's own hard negatives
PENALTY_ALL = tl.constexpr(3)  # every column but the positive pos_start + i
PENALTY_MODES = {None: PENALTY_NONE.value, "in_batch_negatives": PENALTY_IN_BATCH.value,
                 "hard_negatives": PENALTY_HARD.value, "all_negatives": PENALTY_ALL.value}
# A direction's use of the per-row ids (constexpr IDS; issue #12): none, the group mask (every
# direction: keys j < P with row i's id, j != pos_start + i, are -inf), or query_to_doc's label
# target (the mean logit over the same-label positives, which the penalty spares).
IDS_NONE = tl.constexpr(0)
IDS_GROUP = tl.constexpr(1)
IDS_LABEL = tl.constexpr(2)


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
def _raw_scores(q_ptr, k_ptr, rows, cols, n_rows, n_cols, dim, stride_q, stride_k,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """q[rows] . k[cols] for a BLOCK_M x BLOCK_N tile, fp32 accumulation over d."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, dim, BLOCK_D):
        ks = k0 + tl.arange(0, BLOCK_D)
        q = _load_tile(q_ptr, rows, ks, n_rows, dim, stride_q, UPCAST)
        k = _load_tile(k_ptr, cols, ks, n_cols, dim, stride_k, UPCAST)
        acc = tl.dot(q, tl.trans(k), acc, input_precision=PRECISION)
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
def _scores(q_ptr, k_ptr, q_norm_ptr, k_norm_ptr, rows, cols, n_rows, n_cols, dim, stride_q, stride_k, inv_tau,
            NORMALIZE: tl.constexpr, EPS_: tl.constexpr,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
            UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """The plain scores s = q_hat . k_hat / tau of a tile; returns (s, 1/||q||, 1/||k||)."""
    s = _raw_scores(q_ptr, k_ptr, rows, cols, n_rows, n_cols, dim, stride_q, stride_k,
                    BLOCK_M, BLOCK_N, BLOCK_D, UPCAST, PRECISION)
    inv_q = _inv_norm(q_norm_ptr, rows, n_rows, NORMALIZE, EPS_)
    inv_k = _inv_norm(k_norm_ptr, cols, n_cols, NORMALIZE, EPS_)
    return s * (inv_q * inv_tau)[:, None] * inv_k[None, :], inv_q, inv_k


@triton.jit
def _diagonal(rows, cols, start):
    """The cells (i, start + i) of a tile."""
    return cols[None, :] == (start + rows)[:, None]


@triton.jit
def _own_negatives(rows, cols, neg_start, num_neg):
    """The cells (i, neg_start + i * num_neg + t), t < num_neg: row i's own hard negatives."""
    first = neg_start + rows * num_neg
    return (cols[None, :] >= first[:, None]) & (cols[None, :] < first[:, None] + num_neg)


@triton.jit
def _same_id(ids_ptr, rows, cols, n_rows, pos_start, num_positives):
    """The cells (i, j), j < P, whose key j has row i's id ids[pos_start + i] (its own key
    included): one [BLOCK_M] and one [BLOCK_N] load of the int32 dense ids, compared in registers.
    Padding rows and columns get different sentinels (the dense ids are >= 0): never equal."""
    row_id = tl.load(ids_ptr + pos_start + rows, mask=rows < n_rows, other=-1)
    col_id = tl.load(ids_ptr + cols, mask=cols < num_positives, other=-2)
    return row_id[:, None] == col_id[None, :]


@triton.jit
def _group_masked(same, rows, cols, pos_start):
    """The group mask's cells: row i's id, but not its own key pos_start + i."""
    return same & ~_diagonal(rows, cols, pos_start)


@triton.jit
def _logits(s, same, rows, cols, pos_start, neg_start, num_neg, weight, penalty_scale, self_start,
            HAS_BIAS: tl.constexpr, PENALTY: tl.constexpr, MASK: tl.constexpr, IDS: tl.constexpr):
    """A direction's logits from its plain scores s = sim / tau: the hardness penalty, the
    hard-negative bias, then the masks. The penalty strength * sim is s * strength * tau, so a
    penalized logit is s * penalty_scale, penalty_scale = 1 + strength * tau: one multiply, and
    the backward needs no separate sim. Applied before the bias, which is not a similarity.
    ``same`` (_same_id's tile, read only with IDS): with labels the row's positives are its
    label's cells, which the penalty spares; with groups, _group_masked's cells are -inf."""
    if PENALTY != PENALTY_NONE:
        if IDS == IDS_LABEL:
            positives = same
        else:
            positives = _diagonal(rows, cols, pos_start)
        if PENALTY == PENALTY_HARD:
            penalized = _own_negatives(rows, cols, neg_start, num_neg)
        elif PENALTY == PENALTY_IN_BATCH:
            penalized = ~(positives | _own_negatives(rows, cols, neg_start, num_neg))
        else:
            penalized = ~positives
        s = tl.where(penalized, s * penalty_scale, s)
    if HAS_BIAS:
        s += tl.where(_own_negatives(rows, cols, neg_start, num_neg), weight, 0.0)
    if MASK == MASK_SELF:
        s = tl.where(_diagonal(rows, cols, self_start), float("-inf"), s)
    elif MASK == MASK_OWN_DOCUMENTS:
        own = _diagonal(rows, cols, pos_start) | _own_negatives(rows, cols, neg_start, num_neg)
        s = tl.where(own, float("-inf"), s)
    if IDS == IDS_GROUP:
        s = tl.where(_group_masked(same, rows, cols, pos_start), float("-inf"), s)
    return s


@triton.jit
def _online_lse_update(m_i, l_i, s, MAY_BE_EMPTY: tl.constexpr):
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
def _reverse_columns(j0, cols, pos_start, n_rev, BLOCK_N: tl.constexpr):
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
def _forward_kernel(q_ptr, k_ptr, q_norm_ptr, k_norm_ptr, lse_ptr, target_ptr, col_sum_ptr, ids_ptr, inv_count_ptr,
                    n_rows, n_cols, dim, stride_q, stride_k, cols_per_split,
                    inv_tau, pos_start, neg_start, num_neg, weight, penalty_scale, self_start, num_positives,
                    fixed_max,
                    NORMALIZE: tl.constexpr, HAS_BIAS: tl.constexpr, PENALTY: tl.constexpr, MASK: tl.constexpr,
                    HAS_TARGET: tl.constexpr, IDS: tl.constexpr, FUSED_REVERSE: tl.constexpr,
                    EPS_: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                    UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """One direction's LSE (and with HAS_TARGET the target logit) of a block of query rows over
    one split of the keys (program_id(1)), stored at [split, row]. FUSED_REVERSE (query_to_doc
    with local anchor keys) also adds, for the positive block's columns pos_start + j (j < n_rows),
    sum_i exp(s_ij - fixed_max) into col_sum[j]: doc_to_query's row sums, from the plain scores
    (less the group mask's cells, which are symmetric: pos_start = 0 there). With IDS_LABEL the
    target is sum over the row's label cells of the logit, times inv_count[i] = 1 / |P_i|."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    split_start = tl.program_id(1) * cols_per_split
    split_end = tl.minimum(split_start + cols_per_split, n_cols)
    row_ok = rows < n_rows
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    target = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for j0 in range(split_start, split_end, BLOCK_N):
        cols = j0 + tl.arange(0, BLOCK_N)
        s, inv_q, inv_k = _scores(q_ptr, k_ptr, q_norm_ptr, k_norm_ptr, rows, cols, n_rows, n_cols, dim,
                                  stride_q, stride_k, inv_tau, NORMALIZE, EPS_, BLOCK_M, BLOCK_N, BLOCK_D,
                                  UPCAST, PRECISION)
        if IDS != IDS_NONE:
            same = _same_id(ids_ptr, rows, cols, n_rows, pos_start, num_positives)
        else:
            same = 0  # unread
        if FUSED_REVERSE:
            overlaps, rev, rev_ok = _reverse_columns(j0, cols, pos_start, n_rows, BLOCK_N)
            if overlaps:
                cell_ok = row_ok[:, None] & rev_ok[None, :]
                if IDS == IDS_GROUP:
                    cell_ok = cell_ok & ~_group_masked(same, rows, cols, pos_start)
                e = tl.exp(tl.where(cell_ok, s - fixed_max, float("-inf")))
                tl.atomic_add(col_sum_ptr + rev, tl.sum(e, axis=0), mask=rev_ok)
        s = _logits(s, same, rows, cols, pos_start, neg_start, num_neg, weight, penalty_scale, self_start,
                    HAS_BIAS, PENALTY, MASK, IDS)
        if HAS_TARGET:
            if IDS == IDS_LABEL:
                target += tl.sum(tl.where(same, s, 0.0), axis=1)
            else:
                target += tl.sum(tl.where(_diagonal(rows, cols, pos_start), s, 0.0), axis=1)
        s = tl.where(cols[None, :] < n_cols, s, float("-inf"))
        m_i, l_i = _online_lse_update(m_i, l_i, s, (MASK != MASK_NONE) or (IDS == IDS_GROUP))
    out = tl.program_id(1) * n_rows + rows
    tl.store(lse_ptr + out, m_i + tl.log(l_i), mask=row_ok)
    if HAS_TARGET:
        if IDS == IDS_LABEL:
            target *= tl.load(inv_count_ptr + rows, mask=row_ok, other=0.0)
        tl.store(target_ptr + out, target, mask=row_ok)


def _column_splits(n_row_blocks: int, n_col_tiles: int, device: torch.device) -> int:
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


class _Sweep(NamedTuple):
    """One direction as a tile sweep: row i's query against every key, and the rules of its cells."""

    direction: str
    queries: torch.Tensor  # [B, d]: the anchors, or the positives (a view into the candidates)
    q_norm: torch.Tensor | None  # fp32 row norms, None without normalization
    keys: torch.Tensor
    k_norm: torch.Tensor | None
    mask: int  # MASK_*
    ids: torch.Tensor | None = None  # int32 dense ids of the positive block [P] (group or label)
    inv_count: torch.Tensor | None = None  # fp32 [B]: 1 / |P_i| with labels

    @property
    def is_query_to_doc(self) -> bool:
        """The direction with the hard-negative bias, the hardness penalty and the target."""
        return self.direction == QUERY_TO_DOC


def _cell_args(sweep: _Sweep, spec: LossProblem):
    """(runtime scalars, constexprs) of a direction's cell rules, shared by both kernels."""
    q2d = sweep.is_query_to_doc
    penalty = PENALTY_MODES[spec.hardness_mode] if q2d else PENALTY_NONE.value
    # Groups mask every direction; labels change query_to_doc's target and penalty only.
    ids = IDS_NONE.value
    if spec.id_mode == "group":
        ids = IDS_GROUP.value
    elif spec.id_mode == "label" and q2d:
        ids = IDS_LABEL.value
    scalars = (spec.pos_start, spec.neg_start, spec.num_neg, spec.weight,
               1.0 + spec.hardness_strength * spec.tau, spec.anchor_start, spec.num_positives)
    constexprs = dict(NORMALIZE=spec.normalize, HAS_BIAS=q2d and spec.has_bias, PENALTY=penalty, MASK=sweep.mask,
                      HAS_TARGET=q2d, IDS=ids, EPS_=EPS)
    return scalars, constexprs


def _launch_forward(sweep: _Sweep, spec: LossProblem, cfg: "_Config", col_sum=None):
    """Returns (lse, target logit or None) of the sweep's queries; with col_sum (query_to_doc),
    doc_to_query's fixed-max row sums are added into it."""
    queries, keys = sweep.queries, sweep.keys
    n_rows, n_cols = queries.shape[0], keys.shape[0]
    t = cfg.fwd
    n_row_blocks, n_col_tiles = triton.cdiv(n_rows, t.block_m), triton.cdiv(n_cols, t.block_n)
    splits = _column_splits(n_row_blocks, n_col_tiles, queries.device)
    cols_per_split = triton.cdiv(n_col_tiles, splits) * t.block_n
    lse = torch.empty((splits, n_rows), dtype=torch.float32, device=queries.device)
    target = torch.empty_like(lse) if sweep.is_query_to_doc else None
    scalars, constexprs = _cell_args(sweep, spec)
    _forward_kernel[(n_row_blocks, splits)](
        queries, keys, _or(sweep.q_norm, lse), _or(sweep.k_norm, lse), lse, _or(target, lse), _or(col_sum, lse),
        _or(sweep.ids, lse), _or(sweep.inv_count, lse),
        n_rows, n_cols, queries.shape[1], queries.stride(0), keys.stride(0), cols_per_split,
        spec.inv_tau, *scalars, spec.inv_tau,
        FUSED_REVERSE=col_sum is not None, BLOCK_M=t.block_m, BLOCK_N=t.block_n, BLOCK_D=t.block_d,
        UPCAST=cfg.upcast, PRECISION=cfg.precision, num_warps=t.warps, num_stages=t.stages, **constexprs)
    if splits == 1:
        return lse[0], None if target is None else target[0]
    # Only the split holding column pos_start + i adds to row i's target; the others add 0.
    return torch.logsumexp(lse, dim=0), None if target is None else target.sum(0)


def _or(x, placeholder):
    """A pointer argument the kernel's constexprs leave unread still needs a tensor."""
    return placeholder if x is None else x


# --------------------------------------------------------------------------------------------
# Backward
# --------------------------------------------------------------------------------------------


@triton.jit
def _backward_kernel(q_ptr, k_ptr, q_norm_ptr, k_norm_ptr, lse_ptr, lse_rev_ptr, g_ptr, ids_ptr, inv_count_ptr,
                     grad_q_ptr, grad_k_ptr,
                     n_rows, n_cols, dim, stride_q, stride_k,
                     inv_tau, pos_start, neg_start, num_neg, weight, penalty_scale, self_start, num_positives,
                     g_scale,
                     NORMALIZE: tl.constexpr, HAS_BIAS: tl.constexpr, PENALTY: tl.constexpr, MASK: tl.constexpr,
                     HAS_TARGET: tl.constexpr, IDS: tl.constexpr, REVERSE: tl.constexpr,
                     EPS_: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                     UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """Adds this tile's share of dQ_hat = dS K_hat / tau and dK_hat = dS^T Q_hat / tau (fp32, atomics).

    dS = g_scale * g_i * exp(logit - lse_i) (g_scale = 1 joint, 1 / P per_direction), minus g_i
    at the target with HAS_TARGET (IDS_LABEL: minus g_i * inv_count[i] = g_i / |P_i| on each of
    the row's label cells: the one-hot becomes a label-match weight, no extra product). REVERSE
    (query_to_doc with local anchor keys) adds doc_to_query's dS, g_scale * g_j * exp(s_ij -
    lse_rev_j), on the positive block's column pos_start + j: the query p_j against anchor i, the
    transposed cell of the same plain score (but for the group mask's cells, symmetric there)."""
    # Column blocks vary fastest, so programs running together share their query rows.
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    j0 = tl.program_id(0) * BLOCK_N
    cols = j0 + tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    tile_ok = row_ok[:, None] & (cols[None, :] < n_cols)
    s, inv_q, inv_k = _scores(q_ptr, k_ptr, q_norm_ptr, k_norm_ptr, rows, cols, n_rows, n_cols, dim,
                              stride_q, stride_k, inv_tau, NORMALIZE, EPS_, BLOCK_M, BLOCK_N, BLOCK_D,
                              UPCAST, PRECISION)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    g = tl.load(g_ptr + rows, mask=row_ok, other=0.0)
    if IDS != IDS_NONE:
        same = _same_id(ids_ptr, rows, cols, n_rows, pos_start, num_positives)
    else:
        same = 0  # unread
    if REVERSE:
        # From the plain scores, before the penalty and bias turn s into query_to_doc's logits.
        ds = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        overlaps, rev, rev_ok = _reverse_columns(j0, cols, pos_start, n_rows, BLOCK_N)
        if overlaps:
            lse_rev = tl.load(lse_rev_ptr + rev, mask=rev_ok, other=0.0)
            g_rev = tl.load(g_ptr + rev, mask=rev_ok, other=0.0) * g_scale
            cell_ok = row_ok[:, None] & rev_ok[None, :]
            if IDS == IDS_GROUP:
                cell_ok = cell_ok & ~_group_masked(same, rows, cols, pos_start)
            rev_arg = tl.where(cell_ok, s - lse_rev[None, :], float("-inf"))
            ds = tl.exp(rev_arg) * g_rev[None, :]
    s = _logits(s, same, rows, cols, pos_start, neg_start, num_neg, weight, penalty_scale, self_start,
                HAS_BIAS, PENALTY, MASK, IDS)
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
            ds = tl.where(_diagonal(rows, cols, pos_start), ds - g[:, None], ds)
    ds = tl.where(tile_ok, ds, 0.0)
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
        q_hat = _normalized_tile(q_ptr, rows, ks, n_rows, dim, stride_q, inv_q, NORMALIZE, UPCAST)
        k_hat = _normalized_tile(k_ptr, cols, ks, n_cols, dim, stride_k, inv_k, NORMALIZE, UPCAST)
        dq = tl.dot(ds, k_hat, input_precision=PRECISION) * inv_tau
        dk = tl.dot(ds_t, q_hat, input_precision=PRECISION) * inv_tau
        tl.atomic_add(grad_q_ptr + rows.to(tl.int64)[:, None] * dim + ks[None, :], dq,
                      mask=row_ok[:, None] & k_ok[None, :], sem="relaxed")
        tl.atomic_add(grad_k_ptr + cols.to(tl.int64)[:, None] * dim + ks[None, :], dk,
                      mask=(cols < n_cols)[:, None] & k_ok[None, :], sem="relaxed")


def _launch_backward(sweep: _Sweep, spec: LossProblem, cfg: "_Config", lse, g, g_scale, grad_q, grad_k,
                     lse_rev=None):
    """Adds the sweep's dQ_hat into grad_q ([B, d] fp32) and dK_hat into grad_k; with lse_rev
    (query_to_doc), doc_to_query's cells on the positive block too."""
    queries, keys = sweep.queries, sweep.keys
    n_rows, n_cols = queries.shape[0], keys.shape[0]
    t = cfg.bwd
    scalars, constexprs = _cell_args(sweep, spec)
    grid = (triton.cdiv(n_cols, t.block_n), triton.cdiv(n_rows, t.block_m))
    _backward_kernel[grid](
        queries, keys, _or(sweep.q_norm, lse), _or(sweep.k_norm, lse), lse, _or(lse_rev, lse), g,
        _or(sweep.ids, lse), _or(sweep.inv_count, lse), grad_q, grad_k,
        n_rows, n_cols, queries.shape[1], queries.stride(0), keys.stride(0),
        spec.inv_tau, *scalars, float(g_scale),
        REVERSE=lse_rev is not None, BLOCK_M=t.block_m, BLOCK_N=t.block_n, BLOCK_D=t.block_d,
        UPCAST=cfg.upcast, PRECISION=cfg.precision, num_warps=t.warps, num_stages=t.stages, **constexprs)


@triton.jit
def _normalize_backward_kernel(x_ptr, norm_ptr, grad_ptr, dot_ptr, n_rows, dim, stride,
                               NORMALIZE: tl.constexpr, EPS_: tl.constexpr,
                               BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr):
    """grad (fp32 [R, d], in place) from d(x_hat) to d(x); stores x_hat . d(x_hat) per row (for d(tau))."""
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


def _normalize_backward(x, norm, grad, cfg):
    """d(x) from d(x_hat) in place (norm None: no normalization, grad unchanged); returns the
    per-row x_hat . d(x_hat)."""
    dot = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(x.shape[0], cfg.block_r),)
    _normalize_backward_kernel[grid](
        x, norm if norm is not None else grad, grad, dot, x.shape[0], x.shape[1], x.stride(0),
        NORMALIZE=norm is not None, EPS_=EPS, BLOCK_R=cfg.block_r, BLOCK_D=cfg.block_d_rows, UPCAST=cfg.upcast,
        num_warps=cfg.warps_rows)
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
    """Whether doc_to_query's row sums can use atomics against the fixed max M = 1/tau.

    Normalized plain scores (no bias or penalty: doc_to_query has none) lie in [-1/tau, 1/tau],
    so exp(s - M) >= exp(-2/tau), a normal fp32 number while 2/tau <= 80 (tau >= 0.025). Below
    that, or without normalization (no bound on the scores at all), doc_to_query's LSE comes
    from a sweep of its own over the B x B block: per-row-block partial (max, sum) pairs would
    need O(B^2 / BLOCK_M) memory, which at B = 65536 is hundreds of MB.
    """
    return normalize and 2.0 / tau <= _FIXED_MAX_RANGE


class _Problem:
    """A problem's inputs on the device, their row norms, its direction sweeps and the launch configuration."""

    def __init__(self, anchor, candidates, anchor_keys, spec: LossProblem, ids=None):
        if anchor.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise TypeError(f"the Triton backend takes float16, bfloat16 or float32, got {anchor.dtype}")
        if (ids is None) != (spec.id_mode is None):
            raise ValueError(f"ids and spec.id_mode go together, got ids {'None' if ids is None else 'given'} "
                             f"and id_mode {spec.id_mode!r}")
        self.spec = spec
        self.cfg = select_config(anchor.dtype, spec.dim)
        self.anchor = anchor.contiguous()
        self.candidates = candidates.contiguous()
        self.a_norm, self.c_norm = self._norms(self.anchor), self._norms(self.candidates)
        positives = slice(spec.pos_start, spec.pos_start + spec.batch)
        self.positives = self.candidates[positives]
        self.p_norm = None if self.c_norm is None else self.c_norm[positives]
        # doc_to_doc's keys stop before the extra negatives (a prefix view: same rows, same gradient buffer).
        self.documents = self.candidates[: spec.num_documents]
        self.d_norm = None if self.c_norm is None else self.c_norm[: spec.num_documents]
        # The anchor keys' gradient has a buffer of its own only when they are a tensor of their own.
        self.separate_keys = spec.separate_anchor_keys and spec.variant.needs_anchor_keys
        if self.separate_keys:
            self.keys = anchor_keys.contiguous()
            self.k_norm = self._norms(self.keys)
        else:
            self.keys, self.k_norm = self.anchor, self.a_norm
        # With the anchors themselves as keys, doc_to_query's cells are query_to_doc's positive
        # block transposed: no sweep of its own in the backward, none in the forward when the
        # fixed max is safe.
        self.reverse_in_query_to_doc = DOC_TO_QUERY in spec.directions and not spec.separate_anchor_keys
        # With ids and local anchor keys, P = M = B, so pos_start = 0 and the group mask's cells
        # of query_to_doc's positive block are exactly doc_to_query's, transposed.
        assert not (spec.id_mode and self.reverse_in_query_to_doc and spec.pos_start != 0)
        self.ids, self.inv_count = (None, None) if ids is None else _dense_ids(ids, spec, self.anchor.device)

    def _norms(self, x):
        return _row_norms(x, self.cfg) if self.spec.normalize else None

    def sweep(self, direction: str) -> _Sweep:
        ids = dict(ids=self.ids, inv_count=self.inv_count if direction == QUERY_TO_DOC else None)
        if direction == QUERY_TO_DOC:
            return _Sweep(direction, self.anchor, self.a_norm, self.candidates, self.c_norm, MASK_NONE.value, **ids)
        if direction == QUERY_TO_QUERY:
            return _Sweep(direction, self.anchor, self.a_norm, self.keys, self.k_norm, MASK_SELF.value, **ids)
        if direction == DOC_TO_QUERY:
            return _Sweep(direction, self.positives, self.p_norm, self.keys, self.k_norm, MASK_NONE.value, **ids)
        return _Sweep(direction, self.positives, self.p_norm, self.documents, self.d_norm,
                      MASK_OWN_DOCUMENTS.value, **ids)

    def stats(self):
        """(row_loss [B], lse [P, B]): one forward launch per direction (doc_to_query fused when it can be)."""
        spec = self.spec
        col_sum = None
        if self.reverse_in_query_to_doc and _fixed_max_is_safe(spec.normalize, spec.tau):
            col_sum = torch.zeros(spec.batch, dtype=torch.float32, device=self.anchor.device)
        lse_q2d, target = _launch_forward(self.sweep(QUERY_TO_DOC), spec, self.cfg, col_sum)
        lses = [lse_q2d]
        for direction in spec.directions[1:]:  # canonical order: query_to_doc first
            if direction == DOC_TO_QUERY and col_sum is not None:
                lses.append(spec.inv_tau + torch.log(col_sum))
            else:
                lses.append(_launch_forward(self.sweep(direction), spec, self.cfg)[0])
        lse = torch.stack(lses)
        if not spec.joint:
            return lse.mean(0) - target, lse
        if len(lses) > 1:
            # The LSE over the union of the directions' cells, exactly, from their [B] LSEs.
            lse = torch.logsumexp(lse, dim=0, keepdim=True)
        return lse[0] - target, lse

    def grads(self, grad_rows, lse):
        """(dA, dC, dK or None, dtau) for per-row upstream gradients: one backward launch per direction."""
        spec = self.spec
        dev = self.anchor.device
        grad_a = torch.zeros((spec.batch, spec.dim), dtype=torch.float32, device=dev)
        grad_c = torch.zeros((spec.num_candidates, spec.dim), dtype=torch.float32, device=dev)
        grad_k = torch.zeros((spec.num_anchor_keys, spec.dim), dtype=torch.float32, device=dev) \
            if self.separate_keys else grad_a
        grad_p = grad_c[spec.pos_start: spec.pos_start + spec.batch]  # the doc queries' rows
        query_grads = {QUERY_TO_DOC: grad_a, QUERY_TO_QUERY: grad_a, DOC_TO_QUERY: grad_p, DOC_TO_DOC: grad_p}
        key_grads = {QUERY_TO_DOC: grad_c, QUERY_TO_QUERY: grad_k, DOC_TO_QUERY: grad_k, DOC_TO_DOC: grad_c}

        def lse_of(direction):  # joint: every direction's cells share the row's one LSE
            return lse[0] if spec.joint else lse[spec.directions.index(direction)]

        g_scale = 1.0 if spec.joint else 1.0 / len(spec.directions)
        for direction in spec.directions:
            if direction == DOC_TO_QUERY and self.reverse_in_query_to_doc:
                continue  # in query_to_doc's launch
            lse_rev = lse_of(DOC_TO_QUERY) if direction == QUERY_TO_DOC and self.reverse_in_query_to_doc else None
            _launch_backward(self.sweep(direction), spec, self.cfg, lse_of(direction), grad_rows, g_scale,
                             query_grads[direction], key_grads[direction], lse_rev=lse_rev)
        # Each cell's G s counted once from its query's side and once from its key's: d(tau) is
        # half the sum over all rows (see the module docstring).
        dots = _normalize_backward(self.anchor, self.a_norm, grad_a, self.cfg).sum()
        dots = dots + _normalize_backward(self.candidates, self.c_norm, grad_c, self.cfg).sum()
        if self.separate_keys:
            dots = dots + _normalize_backward(self.keys, self.k_norm, grad_k, self.cfg).sum()
        grad_tau = -dots / (2.0 * spec.tau)
        return grad_a, grad_c, grad_k if self.separate_keys else None, grad_tau


def _dense_ids(ids: torch.Tensor, spec: LossProblem, device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(int32 [P] dense ids, fp32 [B] 1 / |P_i| with labels, else None), with torch in
    O(P log P) and no host sync: an id's dense id is its first position in the sorted ids (equal
    ids, equal dense ids; >= 0), and a label's count the width of its run there. int32 halves
    the kernels' id registers and loads, whatever values (hashes) the int64 ids hold."""
    ids = ids.to(device=device, dtype=torch.int64).contiguous()
    sorted_ids = torch.sort(ids).values
    first = torch.searchsorted(sorted_ids, ids)
    inv_count = None
    if spec.id_mode == "label":
        rows = slice(spec.pos_start, spec.pos_start + spec.batch)
        count = torch.searchsorted(sorted_ids, ids[rows], right=True) - first[rows]
        inv_count = 1.0 / count.to(torch.float32)
    return first.to(torch.int32), inv_count


def _on_device(x: torch.Tensor):
    """Launches go to the current CUDA device: make it the inputs' one."""
    return torch.cuda.device(x.device) if x.device.type == "cuda" else contextlib.nullcontext()


def forward(anchor, candidates, anchor_keys, spec: LossProblem, *, compute_grad, ids=None):
    with _on_device(anchor):
        prob = _Problem(anchor, candidates, anchor_keys, spec, ids)
        row_loss, lse = prob.stats()
        grads = None
        if compute_grad:  # the probabilities need the final LSEs: a second sweep with g = 1
            grads = prob.grads(torch.ones_like(row_loss), lse)
        return row_loss, lse, grads


def backward(grad_rows, anchor, candidates, anchor_keys, spec: LossProblem, lse, *, ids=None):
    with _on_device(anchor):
        prob = _Problem(anchor, candidates, anchor_keys, spec, ids)
        f32 = dict(dtype=torch.float32)
        return prob.grads(grad_rows.to(**f32).contiguous(), lse.to(**f32).contiguous())
