"""CPU backend: the fused InfoNCE with blocked matrix products over anchor chunks.

Memory is O((B + N) d) plus one R x N score block per direction: the rows are processed R
at a time, each chunk's scores computed with one matmul per direction, turned into
exponentials in place, and consumed by the two gradient products. The BLAS does the FLOPs;
the per-element work is a handful of passes over the (cache-sized) blocks. Implements the
backend contract of ``fastcse.ops`` for every variant of ``fastcse.problem``.

Folding trick (why no pass divides a block): with E = exp(S - m) and l = rowsum(E),
P = E / l, so dQ = (E @ K) / l - K[target] and dK = E^T (Q / l) - Q at the targets: the
1/l and the -1 of the one-hot are applied to R x d operands, never to the R x N block.

Two sweeps:

- Row sweeps (every variant): row i's directions are all row-local blocks (anchor i or
  positive i against the candidates or the anchor keys), so one chunk holds whole rows and,
  when the upstream gradient is a scalar, the gradients come out of the forward sweep itself:
  3 B x n x d products per direction block of n keys (the floor). Otherwise (reduction="none",
  or the backward of a call that did not need gradients) a statistics sweep and a gradient
  sweep: 4 per block.
- Column sweep (symmetric = query_to_doc + doc_to_query, per direction, in one process, no
  hardness penalty): doc_to_query's rows are the columns of query_to_doc's positive block, so
  a statistics sweep with column log-sum-exps and one gradient sweep cost 4 B x N x d in all,
  against 3 (N + B) B d for two row blocks: fewer while N < 3 B (up to one hard negative).

Matryoshka dimensions (``problem.matryoshka_dims``) run in ``fastcse.cpu_matryoshka``: the row
sweeps with every dimension's logits from one sweep over the coordinates.
"""

from __future__ import annotations

import math

import torch

from fastcse.checks import NORMALIZE_EPS, accumulation_dtype
from fastcse.false_negatives import FalseNegativeTiles
from fastcse.problem import (ANCHOR_KEYS, ANCHORS, CANDIDATES, DIRECTION_ROLES, DOCUMENTS, MASK_OWN_DOCUMENTS,
                             MASK_SELF, QUERY_TO_DOC, LossProblem)

# Score block budget per chunk: small enough to stay cache-resident for the elementwise passes
# (16 MiB measured best of 8/16/32/64 MiB here), at least MIN_ROWS rows so that the
# dK += E^T Q_chunk product (inner dim R) stays compute bound.
BLOCK_BYTES = 16 * 2**20
MIN_ROWS = 256
SAFE_EXP = 40.0
# exp(x) as 2^(x log2 e): torch's CPU exp kernel is the slowest elementwise pass of a sweep,
# about 2.3x the multiply and exp2 together (2.0 against 0.85 ms per 2M fp32 values on one core
# of this machine, torch 2.13). The extra rounding of the exponent costs a relative error of
# about 1e-6 in fp32 (2e-15 in fp64), within the fp32 path's tolerance against the reference.
LOG2_E = 1.0 / math.log(2.0)


def exp_in_place(block: torch.Tensor) -> torch.Tensor:
    """exp(block), in place (see LOG2_E)."""
    return block.mul_(LOG2_E).exp2_()


class _Normalized:
    """x_hat = x / max(||x||, eps) in the compute dtype, and what its backward needs."""

    def __init__(self, x: torch.Tensor, normalize: bool, dtype: torch.dtype):
        x = x.to(dtype)
        if not normalize:
            self.hat, self.inv, self.small = x, None, None
            return
        norm = torch.linalg.vector_norm(x, dim=1)
        self.inv = 1.0 / norm.clamp_min(NORMALIZE_EPS)
        self.small = norm < NORMALIZE_EPS
        self.hat = x * self.inv[:, None]

    def backward(self, grad_hat: torch.Tensor) -> torch.Tensor:
        """dx = (dx_hat - x_hat (x_hat . dx_hat)) / ||x||; below eps the norm is the constant eps."""
        if self.inv is None:
            return grad_hat
        dot = torch.bmm(self.hat.unsqueeze(1), grad_hat.unsqueeze(2)).squeeze(2)  # row dots, no [n, d] temporary
        dot.masked_fill_(self.small[:, None], 0.0)
        grad_hat.addcmul_(self.hat, dot, value=-1.0).mul_(self.inv[:, None])
        return grad_hat


def direction_widths(problem: LossProblem) -> dict[str, int]:
    """How many keys each of the problem's directions scores (its block's columns)."""
    widths = {CANDIDATES: problem.num_candidates, ANCHOR_KEYS: problem.num_anchor_keys,
              DOCUMENTS: problem.num_documents}
    return {d: widths[DIRECTION_ROLES[d].keys] for d in problem.directions}


def _rows_per_chunk(batch: int, width: int) -> int:
    rows = BLOCK_BYTES // (4 * max(width, 1))
    return max(1, min(batch, max(MIN_ROWS, rows)))


class _GroupCells:
    """The (row, key) cells a group mask hides, listed once per call: row i's group mates j != i.

    Small groups (duplicates, a shared premise: a few rows each) leave B (g - 1) cells, and
    writing them costs far less than comparing each chunk's R x P ids and filling the block
    through a mask. Large groups fall back to that dense compare (``build`` returns None)."""

    # Per-cell indexed writes cost ~10-20x a dense compare's per-element pass: list the cells
    # only while the rows have on average fewer mates than P / 32, and at most MAX_CELLS of
    # them (16 MiB of int64 pairs: the list must not outgrow the score block it saves passes over).
    MAX_CELLS_PER_ROW_FRACTION = 1 / 32
    MAX_CELLS = 2**20

    def __init__(self, rows: torch.Tensor, keys: torch.Tensor, row_offsets: torch.Tensor):
        self.rows, self.keys, self.row_offsets = rows, keys, row_offsets

    @classmethod
    def build(cls, ids: torch.Tensor, problem: LossProblem):
        """Row i (id ids[pos_start + i]) against the P keys' ids: None when the cells are too many."""
        _, group_of, group_size = torch.unique(ids, return_inverse=True, return_counts=True)
        row_group = group_of[problem.pos_start: problem.pos_start + problem.batch]
        count = group_size[row_group]  # cells per local row, its own key included (dropped below)
        mates = count - 1
        total = int(mates.sum())
        if total > min(cls.MAX_CELLS_PER_ROW_FRACTION * problem.num_positives * problem.batch, cls.MAX_CELLS):
            return None
        # Keys sorted by group: row i's group is the run members[start[g]: start[g] + size[g]].
        members = torch.argsort(group_of, stable=True)
        start = torch.cumsum(group_size, 0) - group_size
        rows = torch.repeat_interleave(torch.arange(problem.batch), count)
        first = torch.cumsum(count, 0) - count
        rank = torch.arange(int(count.sum())) - torch.repeat_interleave(first, count)
        keys = members[torch.repeat_interleave(start[row_group], count) + rank]
        kept = keys != rows + problem.pos_start  # the row's own pair stays
        row_offsets = torch.zeros(problem.batch + 1, dtype=torch.int64)
        row_offsets[1:] = torch.cumsum(mates, 0)
        return cls(rows[kept], keys[kept], row_offsets)

    def of_rows(self, r0: int, r1: int):
        """(chunk-local rows, keys) of the cells of rows [r0, r1)."""
        lo, hi = int(self.row_offsets[r0]), int(self.row_offsets[r1])
        return self.rows[lo:hi] - r0, self.keys[lo:hi]


class _SweepOperands:
    """The CPU backend's per-call state: a problem's normalized operands, and its score blocks,
    shared by every sweep.

    Queries carry the temperature (S = (Q_hat / tau) K_hat^T): the scaled copies are the small
    operands. Query-side gradient buffers hold tau * dQ_hat (finish_grads divides once)."""

    def __init__(self, anchor, candidates, anchor_keys, ids, problem: LossProblem, guide=None):
        self.problem = problem
        self.ids = ids
        self.dtype = accumulation_dtype(anchor)
        self.anchors = _Normalized(anchor, problem.normalize, self.dtype)
        self.candidates = _Normalized(candidates, problem.normalize, self.dtype)
        self.a_scaled = self.anchors.hat / problem.tau
        if problem.variant.queries_with_positives:
            self.p_scaled = self.candidates.hat[problem.pos_start: problem.pos_start + problem.batch] / problem.tau
        self.keys = None
        if problem.variant.needs_anchor_keys:
            self.keys = _Normalized(anchor_keys, problem.normalize, self.dtype) if problem.separate_anchor_keys \
                else self.anchors
        self.widths = direction_widths(problem)
        self.rows = _rows_per_chunk(problem.batch, sum(self.widths.values()))
        self.group_cells = _GroupCells.build(ids, problem) if problem.id_mode == "group" else None
        self._blocks: dict[str, torch.Tensor] = {}
        # Cosine logits are bounded by 1/tau + |w| + strength: below SAFE_EXP, exp(S) neither
        # overflows nor underflows in fp32 (N e^40 << 3e38, e^-40 >> 1e-38), so the row-max pass
        # and the shift are skipped. Otherwise (small tau, dot products) the exact row max is used.
        bound = 1.0 / problem.tau + abs(problem.weight) + problem.hardness_strength
        self.unshifted = problem.normalize and bound <= SAFE_EXP
        # False negatives by similarity: recomputed per tile in every sweep, never stored B x N.
        self.false_negatives = None if problem.false_negative_margin is None else \
            FalseNegativeTiles(problem, guide, self)

    def chunks(self):
        for r0 in range(0, self.problem.batch, self.rows):
            yield r0, min(r0 + self.rows, self.problem.batch)

    def queries(self, direction: str) -> torch.Tensor:
        return self.a_scaled if DIRECTION_ROLES[direction].queries == ANCHORS else self.p_scaled

    def key_hat(self, direction: str) -> torch.Tensor:
        keys = DIRECTION_ROLES[direction].keys
        if keys == DOCUMENTS:  # not the extra negatives
            return self.candidates.hat[: self.problem.num_documents]
        return self.candidates.hat if keys == CANDIDATES else self.keys.hat

    def same_id(self, r0, r1) -> torch.Tensor:
        """[R, P] bool: the positive block's (and anchor keys') rows with each chunk row's id."""
        row_ids = self.ids[self.problem.pos_start + r0: self.problem.pos_start + r1]
        return row_ids[:, None] == self.ids[None, :]

    def label_weights(self, r0, r1) -> torch.Tensor:
        """[R, P]: 1 / |positives of row i| on each of them (labels), the target's averaging."""
        same = self.same_id(r0, r1).to(self.dtype)
        return same / same.sum(1, keepdim=True)

    def target_logits(self, block, r0, r1) -> torch.Tensor:
        """Each row's target: its positive's logit, or the mean over its label's positives."""
        if self.problem.id_mode == "label":
            positives = block[:, : self.problem.num_positives]
            if self.false_negatives is not None:  # left-out cells are -inf, and -inf * 0 is NaN
                positives = positives.nan_to_num(neginf=0.0)
            return (positives * self.label_weights(r0, r1)).sum(1)
        return block[torch.arange(r1 - r0), self.targets(r0, r1)]

    def targets(self, r0, r1):
        return torch.arange(r0, r1) + self.problem.pos_start

    def own_negatives(self, r0, r1):
        """(rows, columns) of the chunk's own hard negatives in the candidates."""
        k = self.problem.num_neg
        return torch.arange(r1 - r0).repeat_interleave(k), self.problem.neg_start + torch.arange(r0 * k, r1 * k)

    def scores(self, direction: str, r0: int, r1: int) -> torch.Tensor:
        """The direction's logits of rows [r0, r1), into its one (r1 - r0) x n block buffer.

        Reusing one buffer per direction (rather than a fresh block per chunk) keeps the
        allocator from cycling large blocks, which shows up as extra resident memory."""
        if direction not in self._blocks:
            self._blocks[direction] = torch.empty(self.rows, self.widths[direction], dtype=self.dtype)
        block = torch.mm(self.queries(direction)[r0:r1], self.key_hat(direction).T,
                         out=self._blocks[direction][: r1 - r0])
        return self.decorate(direction, block, r0, r1)

    def decorate(self, direction: str, block: torch.Tensor, r0: int, r1: int) -> torch.Tensor:
        """The direction's bias, hardness penalty and masks, in place on rows [r0, r1)' logits."""
        # Read before the bias and the penalty: self-guided, the raw scores are the guide.
        left_out = None if self.false_negatives is None else self.false_negatives.left_out(direction, block, r0, r1)
        rows = torch.arange(r1 - r0)
        role = DIRECTION_ROLES[direction]
        if role.holds_target:
            self._penalize(block, r0, r1)
            if self.problem.weight:
                block[self.own_negatives(r0, r1)] += self.problem.weight
        elif role.mask == MASK_SELF:
            block[rows, self.problem.anchor_start + torch.arange(r0, r1)] = -math.inf
        elif role.mask == MASK_OWN_DOCUMENTS:
            block[rows, self.targets(r0, r1)] = -math.inf
            if self.problem.num_neg:
                block[self.own_negatives(r0, r1)] = -math.inf
        if self.problem.id_mode == "group":
            self._mask_group(block, r0, r1)
        if left_out is not None:
            block.masked_fill_(left_out, -math.inf)
        return block

    def _mask_group(self, block, r0, r1):
        """-inf on the keys j != i of row i's group: positives, or anchors (the same rows)."""
        if self.group_cells is not None:
            block[self.group_cells.of_rows(r0, r1)] = -math.inf
            return
        same = self.same_id(r0, r1)
        same[torch.arange(r1 - r0), self.targets(r0, r1)] = False  # the row's own pair stays
        block[:, : self.problem.num_positives].masked_fill_(same, -math.inf)

    def _penalize(self, block, r0, r1):
        """Hardness: + strength * sim on the chosen negatives, i.e. S * (1 + strength tau) there."""
        mode = self.problem.hardness_mode
        if mode is None:
            return
        factor = 1.0 + self.problem.hardness_strength * self.problem.tau
        if mode == "hard_negatives":
            block[self.own_negatives(r0, r1)] *= factor
            return
        # in_batch_negatives spares the row's own documents, all_negatives its positive(s) only.
        spared = [self.own_negatives(r0, r1)] if mode == "in_batch_negatives" and self.problem.num_neg else []
        if self.problem.id_mode == "label":
            same_label = self.same_id(r0, r1)
            positives = block[:, : self.problem.num_positives]
            kept_positives = positives[same_label]
        else:
            spared.append((torch.arange(r1 - r0), self.targets(r0, r1)))
        kept = [block[cells] for cells in spared]
        block.mul_(factor)
        for cells, values in zip(spared, kept):
            block[cells] = values
        if self.problem.id_mode == "label":
            positives[same_label] = kept_positives

    def finish_grads(self, grads: _Grads):
        """(dA, dC, dK or None, dtau) through the normalization, from the sweeps' buffers."""
        problem = self.problem
        # Every logit depends on tau as q_hat . k_hat / tau (the penalty has no gradient), so
        # dL/dtau = -(1/tau) sum_i q_hat_i . dq_hat_i over the query side alone.
        grad_tau = -(torch.dot(self.a_scaled.reshape(-1), grads.anchor_queries.reshape(-1))) / problem.tau
        grad_a_hat = grads.anchor_queries.div_(problem.tau)
        grad_c_hat = grads.candidate_keys
        if grads.doc_queries is not None:
            grad_tau = grad_tau - torch.dot(self.p_scaled.reshape(-1), grads.doc_queries.reshape(-1)) / problem.tau
            positives = slice(problem.pos_start, problem.pos_start + problem.batch)
            grad_c_hat[positives].add_(grads.doc_queries, alpha=1.0 / problem.tau)
        grad_k = None
        if grads.anchor_keys is not None:
            if problem.separate_anchor_keys:
                grad_k = self.keys.backward(grads.anchor_keys)
            else:
                grad_a_hat.add_(grads.anchor_keys)
        return self.anchors.backward(grad_a_hat), self.candidates.backward(grad_c_hat), grad_k, grad_tau


class _Grads:
    """Gradient buffers of the hat operands, by role: tau * dQ_hat for the queries, dK_hat for the keys."""

    def __init__(self, operands: _SweepOperands):
        problem, dtype = operands.problem, operands.dtype
        self.anchor_queries = torch.zeros(problem.batch, problem.dim, dtype=dtype)
        self.doc_queries = torch.zeros(problem.batch, problem.dim, dtype=dtype) \
            if problem.variant.queries_with_positives else None
        self.candidate_keys = torch.zeros(problem.num_candidates, problem.dim, dtype=dtype)
        self.anchor_keys = torch.zeros(problem.num_anchor_keys, problem.dim, dtype=dtype) \
            if problem.variant.needs_anchor_keys else None
        self.num_documents = problem.num_documents

    def query_buffer(self, direction):
        return self.anchor_queries if DIRECTION_ROLES[direction].queries == ANCHORS else self.doc_queries

    def key_buffer(self, direction):
        keys = DIRECTION_ROLES[direction].keys
        if keys == DOCUMENTS:
            return self.candidate_keys[: self.num_documents]
        return self.candidate_keys if keys == CANDIDATES else self.anchor_keys


def _accumulate(operands: _SweepOperands, grads: _Grads, direction: str, weights: torch.Tensor, row_scale, r0, r1):
    """Adds a block's contribution: dS = weights * row_scale (rows), i.e. tau dQ += dS K_hat and
    dK += dS^T Q_scaled, with row_scale on the R x d operands (folding trick)."""
    keys = operands.key_hat(direction)
    queries = operands.queries(direction)[r0:r1]
    grads.query_buffer(direction)[r0:r1].addcmul_(torch.mm(weights, keys), row_scale[:, None])
    grads.key_buffer(direction).addmm_(weights.T, queries * row_scale[:, None])


def _subtract_targets(operands: _SweepOperands, grads: _Grads, row_scale, r0, r1):
    """The one-hot of -target: dS[i, pos_start + i] -= row_scale_i, on query_to_doc only (with
    labels, -row_scale_i / |P_i| on each of row i's positives: two R x P x d products)."""
    if operands.problem.id_mode == "label":
        weights = operands.label_weights(r0, r1).mul_(row_scale[:, None])
        positives = operands.candidates.hat[: operands.problem.num_positives]
        grads.anchor_queries[r0:r1].addmm_(weights, positives, alpha=-1.0)
        grads.candidate_keys[: operands.problem.num_positives].addmm_(weights.T, operands.a_scaled[r0:r1], alpha=-1.0)
        return
    targets = operands.targets(r0, r1)
    grads.anchor_queries[r0:r1].addcmul_(operands.candidates.hat[targets], row_scale[:, None], value=-1.0)
    grads.candidate_keys.index_add_(0, targets, operands.a_scaled[r0:r1] * row_scale[:, None], alpha=-1.0)


def _exp_with_row_sums(operands: _SweepOperands, blocks: dict, joint: bool):
    """E = exp(S - m) for each block, in place; returns {direction: (lse, rowsum E)}.

    m is 0 when unshifted, else the row max: one shared by all blocks when joint."""
    stats = {}
    if joint:
        shift = None if operands.unshifted else torch.stack([b.amax(1) for b in blocks.values()]).amax(0)
        total = 0.0
        for block in blocks.values():
            if shift is not None:
                block.sub_(shift[:, None])
            total = total + exp_in_place(block).sum(1)
        lse = torch.log(total) if shift is None else shift + torch.log(total)
        return {d: (lse, total) for d in blocks}
    for direction, block in blocks.items():
        shift = None if operands.unshifted else block.amax(1, keepdim=True)
        if shift is not None:
            block.sub_(shift)
        total = exp_in_place(block).sum(1)
        stats[direction] = (torch.log(total) if shift is None else shift.squeeze(1) + torch.log(total), total)
    return stats


def _row_loss(operands, lse_by_direction, target):
    """The rows' losses from their (joint or per direction) LSEs and target logits."""
    if operands.problem.joint:
        return next(iter(lse_by_direction.values())) - target
    return torch.stack(list(lse_by_direction.values())).mean(0) - target


def _partition_rows(operands: _SweepOperands, stats: dict) -> torch.Tensor:
    """[P, R] LSEs as saved for backward: one row for joint, one per direction otherwise."""
    lses = [lse for lse, _ in stats.values()]
    return lses[0][None] if operands.problem.joint else torch.stack(lses)


def _fused_row_sweep(operands: _SweepOperands):
    """Forward that also produces the gradients of sum(row_loss): one sweep, 3 products per block."""
    problem = operands.problem
    partitions = 1.0 if problem.joint else float(len(problem.directions))
    row_loss = torch.empty(problem.batch, dtype=operands.dtype)
    lse = torch.empty(problem.variant.num_partitions, problem.batch, dtype=operands.dtype)
    grads = _Grads(operands)
    for r0, r1 in operands.chunks():
        blocks = {d: operands.scores(d, r0, r1) for d in problem.directions}
        target = operands.target_logits(blocks[QUERY_TO_DOC], r0, r1)
        stats = _exp_with_row_sums(operands, blocks, problem.joint)
        lse[:, r0:r1] = _partition_rows(operands, stats)
        row_loss[r0:r1] = _row_loss(operands, {d: s[0] for d, s in stats.items()}, target)
        for direction, block in blocks.items():
            _accumulate(operands, grads, direction, block, 1.0 / (partitions * stats[direction][1]), r0, r1)
        _subtract_targets(operands, grads, torch.ones(r1 - r0, dtype=operands.dtype), r0, r1)
    return row_loss, lse, operands.finish_grads(grads)


def _stats_row_sweep(operands: _SweepOperands):
    """Row losses and [P, B] LSEs, no gradients: 1 product per block."""
    problem = operands.problem
    row_loss = torch.empty(problem.batch, dtype=operands.dtype)
    lse = torch.empty(problem.variant.num_partitions, problem.batch, dtype=operands.dtype)
    for r0, r1 in operands.chunks():
        blocks = {d: operands.scores(d, r0, r1) for d in problem.directions}
        target = operands.target_logits(blocks[QUERY_TO_DOC], r0, r1)
        if problem.joint:
            joint = torch.logsumexp(torch.stack([torch.logsumexp(b, dim=1) for b in blocks.values()]), dim=0)
            by_direction = {d: joint for d in blocks}
        else:
            by_direction = {d: torch.logsumexp(b, dim=1) for d, b in blocks.items()}
        lse[:, r0:r1] = _partition_rows(operands, {d: (v, None) for d, v in by_direction.items()})
        row_loss[r0:r1] = _row_loss(operands, by_direction, target)
    return row_loss, lse


def _grad_row_sweep(operands: _SweepOperands, grad_rows, lse):
    """Gradients for per-row upstream gradients, recomputing each block from the saved LSEs: 3 per block."""
    problem = operands.problem
    g = grad_rows.to(operands.dtype)
    g_direction = g if problem.joint else g / len(problem.directions)
    grads = _Grads(operands)
    for r0, r1 in operands.chunks():
        for p, direction in enumerate(problem.directions):
            block = operands.scores(direction, r0, r1)
            exp_in_place(block.sub_(lse[0 if problem.joint else p, r0:r1, None]))  # P = exp(S - LSE)
            _accumulate(operands, grads, direction, block, g_direction[r0:r1], r0, r1)
        _subtract_targets(operands, grads, g[r0:r1], r0, r1)
    return operands.finish_grads(grads)


# --------------------------------------------------------------------------------------------
# Column sweep: symmetric in one process
# --------------------------------------------------------------------------------------------


def _uses_column_sweep(problem: LossProblem) -> bool:
    # The reverse direction reads query_to_doc's positive block: it must hold no bias or penalty.
    # A false-negative rule leaves out different cells in the two directions (thresholds by row).
    return (problem.symmetric and not problem.separate_anchor_keys and problem.hardness_mode is None
            and (problem.weight == 0.0 or problem.neg_start >= problem.batch)
            and problem.false_negative_margin is None)


def _column_stats_update(col_max, col_sum, block):
    """Online log-sum-exp over rows for the reverse direction (columns of the positive block)."""
    chunk_max = block.amax(0)
    new_max = torch.maximum(col_max, chunk_max)
    col_sum.mul_(torch.exp(col_max - new_max)).add_(torch.exp(block - new_max).sum(0))
    col_max.copy_(new_max)


def _stats_column_sweep(operands: _SweepOperands):
    """Row LSE and target logits, and the reverse direction's column LSE: [2, B] LSEs."""
    problem = operands.problem
    lse = torch.empty(2, problem.batch, dtype=operands.dtype)
    target = torch.empty(problem.batch, dtype=operands.dtype)
    col_max = torch.full((problem.batch,), -math.inf, dtype=operands.dtype)
    col_sum = torch.zeros(problem.batch, dtype=operands.dtype)
    for r0, r1 in operands.chunks():
        block = operands.scores(QUERY_TO_DOC, r0, r1)
        target[r0:r1] = operands.target_logits(block, r0, r1)
        _column_stats_update(col_max, col_sum, block[:, problem.pos_start: problem.pos_start + problem.batch])
        lse[0, r0:r1] = torch.logsumexp(block, dim=1)
    lse[1] = col_max + torch.log(col_sum)
    # The reverse target logit p_i . a_i / tau is the forward one (no bias on positives).
    return (lse[0] + lse[1]) / 2 - target, lse


def _grad_column_sweep(operands: _SweepOperands, grad_rows, lse):
    """Both directions' gradients from one recompute of the forward blocks: 3 products."""
    problem = operands.problem
    g = grad_rows.to(operands.dtype)
    half = g / 2
    grads = _Grads(operands)
    # One product serves each operand in both roles (below): no separate doc-query or key buffers.
    grads.doc_queries = grads.anchor_keys = None
    positives = slice(problem.pos_start, problem.pos_start + problem.batch)
    for r0, r1 in operands.chunks():
        rows = torch.arange(r1 - r0)
        block = operands.scores(QUERY_TO_DOC, r0, r1)
        # Reverse direction: column j of the positive block is query p_j over all anchors.
        reverse = exp_in_place(block[:, positives] - lse[1]).mul_(half)
        exp_in_place(block.sub_(lse[0, r0:r1, None])).mul_(half[r0:r1, None])
        block[:, positives].add_(reverse)
        if problem.id_mode == "label":  # the target's weights, on the positive block
            block[:, positives].sub_(operands.label_weights(r0, r1).mul_(g[r0:r1, None]))
        else:
            block[rows, operands.targets(r0, r1)] -= g[r0:r1]  # both directions' one-hot sit on the diagonal
        # The anchor's gradient as query (forward) and as key (reverse) come from one product.
        grads.anchor_queries[r0:r1].add_(torch.mm(block, operands.candidates.hat))
        grads.candidate_keys.addmm_(block.T, operands.a_scaled[r0:r1])
    return operands.finish_grads(grads)


# --------------------------------------------------------------------------------------------
# Cost model
# --------------------------------------------------------------------------------------------


def matrix_products(problem: LossProblem, *, grad_in_forward: bool = True) -> list[tuple[str, int]]:
    """The B x n x d matrix products forward + backward costs, as (kind, n) with kind one of
    "scores" (Q K^T), "dq" (dS K) and "dk" (dS^T Q): the count the benchmarks' floor runs; a
    guided false-negative rule adds "guide" (the guide's tile, B x n x d_g).

    ``grad_in_forward``: a scalar upstream gradient (reduction mean/sum), gradients in the
    forward sweep; otherwise a statistics sweep, then a gradient sweep in the backward.

    Each product is over the d coordinates, except with Matryoshka dimensions: then over the
    widest one's coordinates, once (``fastcse.cpu_matryoshka``: the segments between the
    dimensions share one sweep), so B x n x max(dims) each."""
    if problem.matryoshka_dims:
        from fastcse import cpu_matryoshka

        return cpu_matryoshka.matrix_products(problem, grad_in_forward=grad_in_forward)
    if _uses_column_sweep(problem):
        width = problem.num_candidates
        return [("scores", width)] * 2 + [("dq", width), ("dk", width)]
    widths = list(direction_widths(problem).values())
    recompute = [] if grad_in_forward else [("scores", n) for n in widths]
    labels = [("dq", problem.num_positives), ("dk", problem.num_positives)] if problem.id_mode == "label" else []
    return recompute + [(kind, n) for n in widths for kind in ("scores", "dq", "dk")] + labels \
        + _guide_products(problem, widths, grad_in_forward)


def _guide_products(problem: LossProblem, widths: list[int], grad_in_forward: bool) -> list[tuple[str, int]]:
    """A given guide's tiles, ("guide", n): B x n x d_g each, once per sweep that scores the block
    (self-guided, the rule reads the score blocks themselves: no product)."""
    if problem.false_negative_margin is None or problem.guide_dim == 0:
        return []
    return [("guide", n) for n in widths] * (1 if grad_in_forward else 2)


# --------------------------------------------------------------------------------------------
# Backend entry points (the contract in fastcse.ops)
# --------------------------------------------------------------------------------------------


def forward(anchor, candidates, anchor_keys, problem: LossProblem, *, compute_grad, ids=None, guide=None):
    if problem.matryoshka_dims:
        from fastcse import cpu_matryoshka

        return cpu_matryoshka.forward(anchor, candidates, anchor_keys, problem, compute_grad=compute_grad, ids=ids,
                                      guide=guide)
    operands = _SweepOperands(anchor, candidates, anchor_keys, ids, problem, guide)
    if _uses_column_sweep(problem):
        row_loss, lse = _stats_column_sweep(operands)
        # The column LSEs are final only at the end: gradients take a second sweep.
        grads = None
        if compute_grad:
            grads = _grad_column_sweep(operands, torch.ones(problem.batch, dtype=operands.dtype), lse)
        return row_loss, lse, grads
    if compute_grad:
        return _fused_row_sweep(operands)
    row_loss, lse = _stats_row_sweep(operands)
    return row_loss, lse, None


def backward(grad_rows, anchor, candidates, anchor_keys, problem: LossProblem, lse, *, ids=None, guide=None):
    if problem.matryoshka_dims:
        from fastcse import cpu_matryoshka

        return cpu_matryoshka.backward(grad_rows, anchor, candidates, anchor_keys, problem, lse, ids=ids, guide=guide)
    operands = _SweepOperands(anchor, candidates, anchor_keys, ids, problem, guide)
    lse = lse.to(operands.dtype)
    if _uses_column_sweep(problem):
        return _grad_column_sweep(operands, grad_rows, lse)
    return _grad_row_sweep(operands, grad_rows, lse)
