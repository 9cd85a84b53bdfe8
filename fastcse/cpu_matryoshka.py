"""CPU backend, Matryoshka: every dimension's loss from one sweep over the coordinates.

The loss is sum_k w_k loss_k, loss_k the problem's loss on the first m_k coordinates (dims
ascending), each prefix normalized on its own. A prefix dot product is a running sum over
coordinates, so per chunk of rows and per direction the raw prefix products are built segment
by segment between the boundaries: R_1 = Q_1 K_1^T, R_k = R_{k-1} + Q_k K_k^T (Q_k, K_k the
coordinates [m_{k-1}, m_k)): one product over max(dims) coordinates in all. Dimension k's
logits are R_k scaled by its prefix norms (rows 1 / (tau |q[:m_k]|), columns 1 / |k[:m_k]|),
then the plain loss's bias, penalty (on dimension k's own similarity) and masks
(``fastcse.cpu._SweepOperands.decorate``) and its own log-sum-exps. The column norms ride in the
products (the keys' segment k carries 1 / |k[:m_k]|, and R_{k-1}'s block takes the ratio of the
two dimensions' norms while it is copied into R_k's), so no pass over a block applies them.
Over one full-width call the sweep pays for the segments' thin products (the same FLOPs at a
lower rate: the backward's segment products take about 39 ms a chunk at B = 4096 against 34 ms
for full-width ones; the forward's, built a column tile at a time, about 22 against 21 ms) and
for the D dimensions' elementwise passes over each block.

Backward (H_k = dL/dR_k = w_k dS_k scaled by the same prefix norms): coordinate segment s
receives (sum_{k >= s} H_k) K_s and its transpose, so the running sum from the widest dimension
down feeds one product per segment for dQ and one for dK: again one sweep over max(dims). The
normalizations' backward needs, per row and dimension, sum_j dS_k sim_k: one elementwise pass
over each R_k, applied to the R x d operands at the end (no per-dimension products).

Memory: D raw blocks and one working block per direction are alive per chunk, so the chunk has
D + 1 times fewer rows than the plain loss's (down to ``fastcse.cpu.MIN_ROWS``).

False negatives by similarity (``_PrefixFalseNegatives``): ``decorate`` leaves out each
dimension's cells, self-guided from that dimension's working block against its own thresholds
([D, B]), guided from the guide's tile, computed once per chunk and direction for every
dimension (one R x n bool per direction more).
"""

from __future__ import annotations

import torch

from fastcse.checks import NORMALIZE_EPS, accumulation_dtype
from fastcse.cpu import (_GroupCells, _exp_with_row_sums, _guide_products, _partition_rows, _row_loss,
                         _rows_per_chunk, _SweepOperands, SAFE_EXP, direction_widths, exp_in_place)
from fastcse.false_negatives import FalseNegativeTiles, threshold
from fastcse.matryoshka import segments
from fastcse.problem import ANCHOR_KEYS, ANCHORS, DIRECTION_ROLES, QUERY_TO_DOC, LossProblem

# The raw prefix blocks are built a tile of columns at a time, so that R_{k-1}'s tile is still in
# cache while R_k's is copied from it and the segment's thin product (inner dimension a segment's
# width, 64 coordinates here) reads and writes it. 2 MiB is this machine's L2 (1 MiB per core).
# Measured at R = 256, N = 8192, dims 768/512/256/128/64, fp32: 21.8-23.0 ms against 23.5-24.5 ms
# per chunk for whole blocks (one full-width product: 21.1-21.9 ms).
TILE_BYTES = 2 * 2**20


class _PrefixOperand:
    """One input's rows in the compute dtype, their inverse prefix norms, and (``with_grads``)
    their buffers: the gradient [n, d] and the norms' backward dots [D, n] (sum_j dS_k sim_k)."""

    def __init__(self, x: torch.Tensor, problem: LossProblem, dtype: torch.dtype, with_grads: bool):
        self.x = x.to(dtype).contiguous()
        if with_grads:
            self.grad = torch.zeros_like(self.x)
            self.dots = torch.zeros(problem.num_dimensions, self.x.shape[0], dtype=dtype)
        if not problem.normalize:
            self.inv = self.small = None
            return
        squares = torch.stack([self.x[:, lo:hi].square().sum(1) for lo, hi in segments(problem.matryoshka_dims)])
        norms = squares.cumsum(0).sqrt_()  # [D, n]: |x[:m_k]|
        self.inv = 1.0 / norms.clamp_min(NORMALIZE_EPS)
        self.small = norms < NORMALIZE_EPS  # below eps the norm is the constant eps: no backward
        self._key_segments = None

    def key_segments(self, dims: tuple[int, ...]) -> tuple[list[torch.Tensor], torch.Tensor]:
        """As keys: (segment k's coordinates scaled by 1 / |x[:m_k]|, [D - 1, n] ratios
        |x[:m_k]| / |x[:m_{k+1}]|), so that a raw block scaled by dimension k's column norms
        becomes dimension k + 1's with one broadcast multiply (folded into the product's copy)."""
        if self._key_segments is None:
            scaled = [self.x[:, lo:hi] * self.inv[k, :, None] for k, (lo, hi) in enumerate(segments(dims))]
            self._key_segments = scaled, self.inv[1:] / self.inv[:-1]
        return self._key_segments

    def inverse_norms(self, k: int, start: int, stop: int) -> torch.Tensor | None:
        return None if self.inv is None else self.inv[k, start:stop]

    def finish(self, dims: tuple[int, ...], tau: float) -> torch.Tensor:
        """The gradient with the prefix norms' backward: -x[:m_k] (dots_k / |x[:m_k]|^2) / tau for
        each k, applied segment by segment (segment s takes the sum over k >= s)."""
        if self.inv is not None:
            coefficients = (self.dots * self.inv.square()).masked_fill_(self.small, 0.0).div_(tau)
            running = torch.zeros_like(coefficients[0])
            for k in reversed(range(len(dims))):
                lo, hi = segments(dims)[k]
                running += coefficients[k]
                self.grad[:, lo:hi].addcmul_(self.x[:, lo:hi], running[:, None], value=-1.0)
        return self.grad


class _MatryoshkaOperands(_SweepOperands):
    """The per-call state: the inputs with their prefix norms, and each direction's blocks.

    Inherits the plain loss's row logic (targets, hard negatives, ids, ``decorate``), not its
    normalized operands: every product here reads the raw inputs."""

    def __init__(self, anchor, candidates, anchor_keys, ids, problem: LossProblem, *, with_grads: bool, guide=None):
        # Not the plain operands' __init__: it would normalize full-width copies no product reads.
        self.problem = problem
        self.ids = ids
        self.dtype = accumulation_dtype(anchor)
        self.dims, self.weights = problem.matryoshka_dims, problem.matryoshka_weights
        self.segments = segments(self.dims)
        self.anchors = _PrefixOperand(anchor, problem, self.dtype, with_grads)
        self.candidates = _PrefixOperand(candidates, problem, self.dtype, with_grads)
        self.anchor_keys = self.anchors
        if problem.variant.needs_anchor_keys and problem.separate_anchor_keys:
            self.anchor_keys = _PrefixOperand(anchor_keys, problem, self.dtype, with_grads)
        self.widths = direction_widths(problem)
        # D raw blocks and one working block per direction (the plain loss: one).
        self.rows = _rows_per_chunk(problem.batch, sum(self.widths.values()) * (len(self.dims) + 1))
        self.group_cells = _GroupCells.build(ids, problem) if problem.id_mode == "group" else None
        self._blocks = {}
        bound = 1.0 / problem.tau + abs(problem.weight) + problem.hardness_strength
        self.unshifted = problem.normalize and bound <= SAFE_EXP
        self.tau_dots = torch.zeros((), dtype=self.dtype)  # sum over all cells of dS sim (dL/dtau)
        # False negatives by similarity: ``decorate`` asks it for each dimension's left-out cells.
        self.false_negatives = None if problem.false_negative_margin is None else \
            _PrefixFalseNegatives(problem, guide, self)

    def query_side(self, direction: str) -> tuple[_PrefixOperand, int]:
        """(the operand holding the direction's query rows, the offset of row 0 in it)."""
        if DIRECTION_ROLES[direction].queries == ANCHORS:
            return self.anchors, 0
        return self.candidates, self.problem.pos_start

    def key_side(self, direction: str) -> _PrefixOperand:
        keys = DIRECTION_ROLES[direction].keys
        return self.anchor_keys if keys == ANCHOR_KEYS else self.candidates

    def buffer(self, name: str, slot: int | str, width: int, rows: int) -> torch.Tensor:
        """A reused [rows, width] block (the allocator would otherwise cycle large blocks)."""
        key = (name, slot)
        if key not in self._blocks:
            self._blocks[key] = torch.empty(self.rows, width, dtype=self.dtype)
        return self._blocks[key][:rows]

    def raw_products(self, direction: str, r0: int, r1: int) -> list[torch.Tensor]:
        """[R_1, ..., R_D]: the prefix products of rows [r0, r1), one segment's product each,
        normalized: each R_k already scaled by dimension k's column norms 1 / |k_j[:m_k]| (the
        keys' segment carries them, and R_{k-1} takes the ratio while it is copied), so the
        logits need only the row scale. Built a tile of columns at a time (``TILE_BYTES``)."""
        queries, offset = self.query_side(direction)
        q = queries.x[offset + r0: offset + r1]
        width = self.widths[direction]
        raws = [self.buffer(direction, slot, width, r1 - r0) for slot in range(len(self.segments))]
        step = max(1, TILE_BYTES // (q.element_size() * q.shape[0]))
        for c0 in range(0, width, step):
            c1 = min(width, c0 + step)
            self._prefix_tile(direction, q, [raw[:, c0:c1] for raw in raws], c0, c1)
        return raws

    def _prefix_tile(self, direction: str, q: torch.Tensor, tiles: list[torch.Tensor], c0: int, c1: int):
        """Columns [c0, c1) of every R_k: R_1 = Q_1 K_1^T, then each R_k from R_{k-1}'s tile."""
        keys = self.key_side(direction)
        scaled, ratios = keys.key_segments(self.dims) if keys.inv is not None else (None, None)
        previous = None
        for slot, ((lo, hi), out) in enumerate(zip(self.segments, tiles)):
            k = (keys.x[:, lo:hi] if scaled is None else scaled[slot])[c0:c1]
            if previous is None:
                torch.mm(q[:, lo:hi], k.T, out=out)
            else:
                if ratios is None:
                    out.copy_(previous)
                else:
                    torch.mul(previous, ratios[slot - 1, c0:c1], out=out)
                out.addmm_(q[:, lo:hi], k.T)
            previous = out

    def row_scale(self, direction: str, k: int, r0: int, r1: int) -> torch.Tensor:
        """1 / (tau |q[:m_k]|) of rows [r0, r1) (1 / tau without normalization)."""
        queries, offset = self.query_side(direction)
        inv = queries.inverse_norms(k, offset + r0, offset + r1)
        tau = torch.full((r1 - r0,), self.problem.tau, dtype=self.dtype)
        return 1.0 / tau if inv is None else inv / self.problem.tau

    def column_scale(self, direction: str, k: int) -> torch.Tensor | None:
        return self.key_side(direction).inverse_norms(k, 0, self.widths[direction])

    def dimension_scores(self, direction: str, k: int, raw: torch.Tensor, r0: int, r1: int) -> torch.Tensor:
        """Dimension k's logits of rows [r0, r1) from its raw products (column norms already
        applied by ``raw_products``), into the working block."""
        block = torch.mul(raw, self.row_scale(direction, k, r0, r1)[:, None],
                          out=self.buffer(direction, "work", raw.shape[1], r1 - r0))
        if self.false_negatives is not None:  # the rule compares dimension k's similarity with its own thresholds
            self.false_negatives.dimension = k
        return self.decorate(direction, block, r0, r1)

    def _target_terms(self, direction: str, k: int, target_weight, raw, r0: int, r1: int):
        """The target's -1 on query_to_doc's dS (the positive, or the label's mean), its rows'
        factor ``target_weight``: its share of the norms' backward dots, read from the raw block
        (before it is consumed), and a function that subtracts its H cells from the running sum."""
        keys = self.key_side(direction)
        columns = self.column_scale(direction, k)
        tau = self.problem.tau
        if self.problem.id_mode == "label":
            positives = slice(0, self.problem.num_positives)
            cells = self.label_weights(r0, r1).mul_(target_weight[:, None])  # [R, P]
            products = cells * raw[:, positives]
            row_dots = products.sum(1)
            keys.dots[k, positives] -= products.sum(0).mul_(tau)
            if columns is not None:
                cells.mul_(columns[positives])
            return row_dots, lambda total: total[:, positives].sub_(cells)
        targets = self.targets(r0, r1)
        rows = torch.arange(r1 - r0)
        row_dots = target_weight * raw[rows, targets]
        keys.dots[k].index_add_(0, targets, row_dots, alpha=-tau)
        values = target_weight if columns is None else target_weight * columns[targets]
        return row_dots, lambda total: total.index_put_((rows, targets), -values, accumulate=True)

    def backprop_dimension(self, direction: str, k: int, probs, row_factor, target_weight, raw, running: dict,
                           r0: int, r1: int):
        """Turns dimension k's probabilities (the working block) into H_k = dL/dR_k, adds it to the
        direction's running sum over the dimensions >= k, then segment k's two gradient products.

        dS = probs * row_factor (rows), less target_weight (rows) at the targets (query_to_doc's
        only: ``target_weight`` None elsewhere); H_k = dS scaled by both prefix norms and 1/tau.
        The raw block holds R_k times the column norms, so H_k R_k = (H_k / column norms) raw:
        the column norms are applied once, on the way into the running sum."""
        queries, offset = self.query_side(direction)
        keys = self.key_side(direction)
        width = self.widths[direction]
        rows = self.row_scale(direction, k, r0, r1)  # 1 / (tau |q_i[:m_k]|)
        columns = self.column_scale(direction, k)  # 1 / |k_j[:m_k]|
        target = None
        if target_weight is not None:
            target = self._target_terms(direction, k, target_weight * rows, raw, r0, r1)
        h = probs.mul_((row_factor * rows)[:, None])  # H_k without the column norms and the target
        # The norms' backward and dL/dtau: sum of dS sim over each row and each column
        # (H_ij R_ij = dS_ij sim_ij / tau). R_k is not needed any more.
        cells = raw.mul_(h)
        row_dots = cells.sum(1)
        keys.dots[k, :width] += cells.sum(0).mul_(self.problem.tau)
        if target is not None:
            row_dots -= target[0]
        row_dots.mul_(self.problem.tau)
        queries.dots[k, offset + r0: offset + r1] += row_dots
        self.tau_dots += row_dots.sum()
        if direction not in running:  # the widest dimension: its raw block, consumed above, holds the running sum
            running[direction] = raw.copy_(h) if columns is None else torch.mul(h, columns, out=raw)
        elif columns is None:
            running[direction].add_(h)
        else:
            running[direction].addcmul_(h, columns)
        total = running[direction]
        if target is not None:
            target[1](total)
        lo, hi = self.segments[k]
        queries.grad[offset + r0: offset + r1, lo:hi].addmm_(total, keys.x[:width, lo:hi])
        keys.grad[:width, lo:hi].addmm_(total.T, queries.x[offset + r0: offset + r1, lo:hi])

    def finish_grads(self):
        """(dA, dC, dK or None, dtau) through the prefix norms."""
        tau = self.problem.tau
        grad_anchor = self.anchors.finish(self.dims, tau)
        grad_candidates = self.candidates.finish(self.dims, tau)
        grad_keys = self.anchor_keys.finish(self.dims, tau) if self.anchor_keys is not self.anchors else None
        return grad_anchor, grad_candidates, grad_keys, -self.tau_dots / tau**2


class _PrefixFalseNegatives(FalseNegativeTiles):
    """The false-negative rule per dimension (``fastcse.false_negatives``), for ``decorate``.

    Self-guided, dimension k's rule reads dimension k's own similarity: the working block
    (R_k scaled by both prefix norms and 1/tau, before bias and penalty) against [D, B]
    thresholds from anchor i and positive i on their first m_k coordinates; ``dimension`` (set
    by ``dimension_scores``) picks the row. A guide is not truncated: its cells are the same
    for every dimension, so each direction's are computed once per chunk (one guide product)
    into a buffer of their own and reused by the D dimensions."""

    def __init__(self, problem: LossProblem, guide, operands: "_MatryoshkaOperands"):
        self.dimension = 0
        super().__init__(problem, guide, operands)
        self._chunk_cells = {}  # guided: direction -> ((r0, r1), its cells)
        if self.guide is not None:
            self._buffers = {d: torch.empty(operands.rows * n, dtype=torch.bool) for d, n in operands.widths.items()}

    def _thresholds(self) -> torch.Tensor:
        """[B] guided, else [D, B]: dimension k's t_i - m over tau from the prefix similarity."""
        if self.guide is not None:
            return super()._thresholds()
        problem, operands = self.problem, self.operands
        positives = slice(problem.pos_start, problem.pos_start + problem.batch)
        anchors, candidates = operands.anchors, operands.candidates
        dots = torch.stack([(anchors.x[:, lo:hi] * candidates.x[positives, lo:hi]).sum(1)
                            for lo, hi in operands.segments]).cumsum(0)  # [D, B]: a_i[:m_k] . p_i[:m_k]
        if problem.normalize:
            dots = dots * anchors.inv * candidates.inv[:, positives]
        margin = problem.false_negative_margin
        if problem.margin_strategy == "absolute":  # relative margins are scale-free already
            margin = margin / problem.tau
        return threshold(dots / problem.tau, margin, problem.margin_strategy)

    def row_limits(self, r0: int, r1: int) -> torch.Tensor:
        return self.thresholds[r0:r1] if self.guide is not None else self.thresholds[self.dimension, r0:r1]

    def left_out(self, direction: str, raw_block: torch.Tensor, r0: int, r1: int) -> torch.Tensor:
        if self.guide is None:
            return super().left_out(direction, raw_block, r0, r1)
        chunk, cells = self._chunk_cells.get(direction, (None, None))
        if chunk != (r0, r1):
            self._cells = self._buffers[direction]  # the parent's compare writes into it
            cells = super().left_out(direction, raw_block, r0, r1)
            self._chunk_cells[direction] = ((r0, r1), cells)
        return cells


def _lse_rows(problem: LossProblem, k: int) -> slice:
    """Dimension k's rows of the saved [P * D, B] LSEs."""
    partitions = problem.variant.num_partitions
    return slice(k * partitions, (k + 1) * partitions)


def _fused_sweep(operands: _MatryoshkaOperands):
    """Forward that also produces the gradients of sum(row_loss): per chunk, one sweep of raw
    products, each dimension's loss and dS (widest first), one sweep of gradient products."""
    problem = operands.problem
    partitions = 1.0 if problem.joint else float(len(problem.directions))
    row_loss = torch.zeros(problem.batch, dtype=operands.dtype)
    lse = torch.empty(problem.variant.num_partitions * problem.num_dimensions, problem.batch, dtype=operands.dtype)
    for r0, r1 in operands.chunks():
        raws = {d: operands.raw_products(d, r0, r1) for d in problem.directions}
        running = {}
        for k in reversed(range(len(operands.dims))):
            weight = operands.weights[k]
            blocks = {d: operands.dimension_scores(d, k, raws[d][k], r0, r1) for d in problem.directions}
            target = operands.target_logits(blocks[QUERY_TO_DOC], r0, r1)
            stats = _exp_with_row_sums(operands, blocks, problem.joint)
            lse[_lse_rows(problem, k), r0:r1] = _partition_rows(operands, stats)
            row_loss[r0:r1] += weight * _row_loss(operands, {d: s[0] for d, s in stats.items()}, target)
            target_weight = torch.full((r1 - r0,), weight, dtype=operands.dtype)
            for direction, block in blocks.items():  # block = E = exp(S - m): dS = w_k E / rowsum(E) - w_k target
                operands.backprop_dimension(direction, k, block, weight / (partitions * stats[direction][1]),
                                            target_weight if direction == QUERY_TO_DOC else None,
                                            raws[direction][k], running, r0, r1)
    return row_loss, lse, operands.finish_grads()


def _stats_sweep(operands: _MatryoshkaOperands):
    """Row losses and the [P * D, B] LSEs, no gradients: one sweep of raw products per chunk."""
    problem = operands.problem
    row_loss = torch.zeros(problem.batch, dtype=operands.dtype)
    lse = torch.empty(problem.variant.num_partitions * problem.num_dimensions, problem.batch, dtype=operands.dtype)
    for r0, r1 in operands.chunks():
        raws = {d: operands.raw_products(d, r0, r1) for d in problem.directions}
        for k, weight in enumerate(operands.weights):
            blocks = {d: operands.dimension_scores(d, k, raws[d][k], r0, r1) for d in problem.directions}
            target = operands.target_logits(blocks[QUERY_TO_DOC], r0, r1)
            if problem.joint:
                joint = torch.logsumexp(torch.stack([torch.logsumexp(b, dim=1) for b in blocks.values()]), dim=0)
                by_direction = {d: joint for d in blocks}
            else:
                by_direction = {d: torch.logsumexp(b, dim=1) for d, b in blocks.items()}
            stats = {d: (v, None) for d, v in by_direction.items()}
            lse[_lse_rows(problem, k), r0:r1] = _partition_rows(operands, stats)
            row_loss[r0:r1] += weight * _row_loss(operands, by_direction, target)
    return row_loss, lse


def _grad_sweep(operands: _MatryoshkaOperands, grad_rows, lse):
    """Gradients for per-row upstream gradients, recomputing each dimension's probabilities from
    the saved LSEs: two sweeps of products per chunk (raw products, gradient products)."""
    problem = operands.problem
    g = grad_rows.to(operands.dtype)
    g_direction = g if problem.joint else g / len(problem.directions)
    for r0, r1 in operands.chunks():
        raws = {d: operands.raw_products(d, r0, r1) for d in problem.directions}
        running = {}
        for k in reversed(range(len(operands.dims))):
            weight = operands.weights[k]
            rows = lse[_lse_rows(problem, k), r0:r1]
            for p, direction in enumerate(problem.directions):
                block = operands.dimension_scores(direction, k, raws[direction][k], r0, r1)
                exp_in_place(block.sub_(rows[0 if problem.joint else p, :, None]))  # P = exp(S - LSE)
                operands.backprop_dimension(direction, k, block, weight * g_direction[r0:r1],
                                            weight * g[r0:r1] if direction == QUERY_TO_DOC else None,
                                            raws[direction][k], running, r0, r1)
    return operands.finish_grads()


def matrix_products(problem: LossProblem, *, grad_in_forward: bool = True) -> list[tuple[str, int]]:
    """As ``fastcse.cpu.matrix_products``, each product over max(dims) coordinates (not D of
    them): the raw products per direction block, and the gradient products (dq, dk) per block;
    a statistics sweep first when the gradients are not produced in the forward; a guide's tiles
    as the plain loss's (once per chunk and direction, shared by the dimensions)."""
    widths = list(direction_widths(problem).values())
    recompute = [] if grad_in_forward else [("scores", n) for n in widths]
    return recompute + [(kind, n) for n in widths for kind in ("scores", "dq", "dk")] \
        + _guide_products(problem, widths, grad_in_forward)


def forward(anchor, candidates, anchor_keys, problem: LossProblem, *, compute_grad, ids=None, guide=None):
    operands = _MatryoshkaOperands(anchor, candidates, anchor_keys, ids, problem, with_grads=compute_grad,
                                   guide=guide)
    if compute_grad:
        return _fused_sweep(operands)
    row_loss, lse = _stats_sweep(operands)
    return row_loss, lse, None


def backward(grad_rows, anchor, candidates, anchor_keys, problem: LossProblem, lse, *, ids=None, guide=None):
    operands = _MatryoshkaOperands(anchor, candidates, anchor_keys, ids, problem, with_grads=True, guide=guide)
    return _grad_sweep(operands, grad_rows, lse.to(operands.dtype))
