"""CPU backend: the fused InfoNCE with blocked matrix products over anchor chunks.

Memory is O((B + N) d) plus one R x N score block: the anchors are processed R rows at a
time, each chunk's scores computed with one matmul, turned into exponentials in place, and
consumed by the two gradient products. The BLAS does the FLOPs; the per-element work is a
handful of passes over the (cache-sized) block. Implements the backend contract of
``fastcse.ops``.

Folding trick (why no pass divides the block): with E = exp(S - m) and l = rowsum(E),
P = E / l, so dA = (E @ C) / l - C[target] and dC = E^T (A / l) - A at the targets: the
1/l and the -1 of the one-hot are applied to R x d operands, never to the R x N block.
"""

from __future__ import annotations

import math

import torch

from fastcse.problem import LossProblem, describe

EPS = 1e-12  # as F.normalize
# Score block budget per chunk: small enough to stay cache-resident for the elementwise passes
# (16 MiB measured best of 8/16/32/64 MiB here), at least MIN_ROWS rows so that the
# dC += E^T A_chunk product (inner dim R) stays compute bound.
BLOCK_BYTES = 16 * 2**20
MIN_ROWS = 256
SAFE_EXP = 40.0


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _normalized(x: torch.Tensor, normalize: bool, dtype: torch.dtype, scale: float = 1.0):
    """Returns (scale * x_hat, inv_norm or None, below-eps mask or None) in the compute dtype."""
    x = x.to(dtype)
    if not normalize:
        return (x * scale if scale != 1.0 else x), None, None
    norm = torch.linalg.vector_norm(x, dim=1)
    inv = 1.0 / norm.clamp_min(EPS)
    return x * (inv * scale)[:, None], inv, norm < EPS


def _normalize_backward(grad_hat, x_hat, inv, small):
    """dx = (dx_hat - x_hat (x_hat . dx_hat)) / ||x||; below eps the norm is the constant eps."""
    if inv is None:
        return grad_hat
    dot = torch.bmm(x_hat.unsqueeze(1), grad_hat.unsqueeze(2)).squeeze(2)  # row dots, no [n, d] temporary
    dot.masked_fill_(small[:, None], 0.0)
    grad_hat.addcmul_(x_hat, dot, value=-1.0).mul_(inv[:, None])
    return grad_hat


def _rows_per_chunk(batch: int, num_candidates: int) -> int:
    rows = BLOCK_BYTES // (4 * max(num_candidates, 1))
    return max(1, min(batch, max(MIN_ROWS, rows)))


class _Problem:
    """The normalized, temperature-scaled operands of a problem, shared by forward and backward."""

    def __init__(self, anchor, candidates, spec: LossProblem):
        self.spec = spec
        self.dtype = _compute_dtype(anchor)
        # S = (A_hat / tau) C_hat^T: the temperature rides on the small operand, and only the
        # scaled copy of the anchors is kept (finish_grads turns it back into A_hat in place).
        self.a_scaled, self.a_inv, self.a_small = _normalized(anchor, spec.normalize, self.dtype,
                                                              scale=1.0 / spec.tau)
        self.c_hat, self.c_inv, self.c_small = _normalized(candidates, spec.normalize, self.dtype)
        self.rows = _rows_per_chunk(spec.batch, spec.num_candidates)
        self._block = None
        # Cosine logits are bounded by 1/tau + |w|: below SAFE_EXP, exp(S) neither overflows nor
        # underflows in fp32 (N e^40 << 3e38, e^-40 >> 1e-38), so the row-max pass and the shift
        # are skipped. Otherwise (small tau, dot products) the exact row max is used.
        self.unshifted = spec.normalize and (1.0 / spec.tau + abs(spec.weight)) <= SAFE_EXP

    def chunks(self):
        for r0 in range(0, self.spec.batch, self.rows):
            yield r0, min(r0 + self.rows, self.spec.batch)

    def scores(self, r0, r1):
        """S[r0:r1] = A C^T / tau + bias, into the one (r1 - r0) x N block buffer of this problem.

        Reusing one buffer (rather than a fresh block per chunk) keeps the allocator from
        cycling large blocks, which shows up as extra resident memory."""
        if self._block is None:
            self._block = torch.empty(self.rows, self.spec.num_candidates, dtype=self.dtype)
        block = torch.mm(self.a_scaled[r0:r1], self.c_hat.T, out=self._block[: r1 - r0])
        if self.spec.weight:
            rows = torch.arange(r1 - r0).repeat_interleave(self.spec.num_neg)
            cols = self.spec.neg_start + torch.arange(r0 * self.spec.num_neg, r1 * self.spec.num_neg)
            block[rows, cols] += self.spec.weight
        return block

    def targets(self, r0, r1):
        return torch.arange(r0, r1) + self.spec.pos_start

    def finish_grads(self, grad_a_hat, grad_c_hat):
        """Scales dA by 1/tau, returns (dA, dC, dtau) through the normalization."""
        grad_a_hat.div_(self.spec.tau)
        # The sweeps are done: reuse the buffer (with tau == 1 and no normalization it may be the
        # caller's own tensor, which must not be touched).
        a_hat = self.a_scaled.mul_(self.spec.tau) if self.spec.tau != 1.0 else self.a_scaled
        # tau enters every score as (a_hat . c_hat) / tau, each score holding exactly one anchor
        # (forward direction: the query; reverse: the candidate), so dtau = -sum(a_hat . dA_hat) / tau.
        grad_tau = -torch.dot(a_hat.reshape(-1), grad_a_hat.reshape(-1)) / self.spec.tau
        grad_a = _normalize_backward(grad_a_hat, a_hat, self.a_inv, self.a_small)
        grad_c = _normalize_backward(grad_c_hat, self.c_hat, self.c_inv, self.c_small)
        return grad_a, grad_c, grad_tau


def _column_stats_update(col_max, col_sum, block):
    """Online log-sum-exp over rows for the reverse direction (columns of the positive block)."""
    chunk_max = block.amax(0)
    new_max = torch.maximum(col_max, chunk_max)
    col_sum.mul_(torch.exp(col_max - new_max)).add_(torch.exp(block - new_max).sum(0))
    col_max.copy_(new_max)


def _stats_sweep(prob: _Problem):
    """Row LSE and target logits (and the reverse direction's column LSE), no gradients."""
    lse = torch.empty(prob.spec.batch, dtype=prob.dtype)
    target = torch.empty(prob.spec.batch, dtype=prob.dtype)
    col_max = torch.full((prob.spec.batch,), -math.inf, dtype=prob.dtype) if prob.spec.symmetric else None
    col_sum = torch.zeros(prob.spec.batch, dtype=prob.dtype) if prob.spec.symmetric else None
    for r0, r1 in prob.chunks():
        block = prob.scores(r0, r1)
        target[r0:r1] = block[torch.arange(r1 - r0), prob.targets(r0, r1)]
        if prob.spec.symmetric:
            _column_stats_update(col_max, col_sum, block[:, : prob.spec.batch])
        lse[r0:r1] = torch.logsumexp(block, dim=1)
    lse_rev = col_max + torch.log(col_sum) if prob.spec.symmetric else None
    return lse, target, lse_rev


def _fused_sweep(prob: _Problem):
    """Non-symmetric forward that also produces the gradients of sum(row_loss): one sweep, 3 products."""
    lse = torch.empty(prob.spec.batch, dtype=prob.dtype)
    row_loss = torch.empty(prob.spec.batch, dtype=prob.dtype)
    grad_a = torch.empty_like(prob.a_scaled)
    grad_c = torch.zeros_like(prob.c_hat)
    for r0, r1 in prob.chunks():
        rows = torch.arange(r1 - r0)
        targets = prob.targets(r0, r1)
        block = prob.scores(r0, r1)
        target_logit = block[rows, targets]
        if not prob.unshifted:
            row_max = block.amax(1, keepdim=True)
            block.sub_(row_max)
        block.exp_()  # E = exp(S - m) (m = 0 when unshifted), in place
        total = block.sum(1)
        lse[r0:r1] = torch.log(total) if prob.unshifted else row_max.squeeze(1) + torch.log(total)
        row_loss[r0:r1] = lse[r0:r1] - target_logit
        inv_total = (1.0 / total)[:, None]
        # dA_hat * tau = (E C) / l - C[target]
        torch.mm(block, prob.c_hat, out=grad_a[r0:r1])
        grad_a[r0:r1].mul_(inv_total).sub_(prob.c_hat[targets])
        # dC_hat = E^T (A / tau / l) - (A / tau) at the targets
        scaled = prob.a_scaled[r0:r1] * inv_total
        grad_c.addmm_(block.T, scaled)
        grad_c.index_add_(0, targets, prob.a_scaled[r0:r1], alpha=-1.0)
    return row_loss, lse, grad_a, grad_c


def _grad_sweep(prob: _Problem, grad_rows, lse, lse_rev):
    """Gradients for per-row upstream gradients, recomputing each score block from saved LSEs."""
    grad_a = torch.empty_like(prob.a_scaled)
    grad_c = torch.zeros_like(prob.c_hat)
    g = grad_rows.to(prob.dtype)
    g_fwd = g / 2 if prob.spec.symmetric else g
    for r0, r1 in prob.chunks():
        rows = torch.arange(r1 - r0)
        targets = prob.targets(r0, r1)
        block = prob.scores(r0, r1)
        if prob.spec.symmetric:
            # Reverse direction: column j of the positive block is query p_j over all anchors.
            reverse = (block[:, : prob.spec.batch] - lse_rev).exp_().mul_(g_fwd)
        block.sub_(lse[r0:r1, None]).exp_()  # P = exp(S - LSE)
        if prob.spec.symmetric:
            block.mul_(g_fwd[r0:r1, None])
            block[:, : prob.spec.batch].add_(reverse)
            block[rows, targets] -= g[r0:r1]  # both directions' one-hot sit on the diagonal
            torch.mm(block, prob.c_hat, out=grad_a[r0:r1])
            grad_c.addmm_(block.T, prob.a_scaled[r0:r1])
        else:
            gr = g_fwd[r0:r1, None]
            torch.mm(block, prob.c_hat, out=grad_a[r0:r1])
            grad_a[r0:r1].sub_(prob.c_hat[targets]).mul_(gr)
            scaled = prob.a_scaled[r0:r1] * gr
            grad_c.addmm_(block.T, scaled)
            grad_c.index_add_(0, targets, scaled, alpha=-1.0)
    return grad_a, grad_c


def _empty(like, dtype):
    return like.new_empty((0,), dtype=dtype)


def forward(anchor, candidates, tau, *, pos_start, neg_start, num_neg, normalize, symmetric,
            hard_negative_weight, compute_grad):
    prob = _Problem(anchor, candidates, describe(anchor, candidates, tau, pos_start=pos_start, neg_start=neg_start,
                                                 num_neg=num_neg, normalize=normalize, symmetric=symmetric,
                                                 hard_negative_weight=hard_negative_weight))
    if compute_grad and not symmetric:
        row_loss, lse, grad_a_hat, grad_c_hat = _fused_sweep(prob)
        grads = prob.finish_grads(grad_a_hat, grad_c_hat)
        return row_loss, lse, _empty(anchor, prob.dtype), grads
    lse, target, lse_rev = _stats_sweep(prob)
    row_loss = lse - target
    if symmetric:
        # Reverse target logit p_i . a_i / tau is the forward one without bias (none on positives).
        row_loss = (row_loss + lse_rev - target) / 2
    grads = None
    if compute_grad:  # symmetric: the column LSEs are final only now, so a second sweep
        ones = torch.ones(prob.spec.batch, dtype=prob.dtype)
        grads = prob.finish_grads(*_grad_sweep(prob, ones, lse, lse_rev))
    return row_loss, lse, lse_rev if symmetric else _empty(anchor, prob.dtype), grads


def backward(grad_rows, anchor, candidates, tau, lse, lse_rev, *, pos_start, neg_start, num_neg, normalize,
             symmetric, hard_negative_weight):
    prob = _Problem(anchor, candidates, describe(anchor, candidates, tau, pos_start=pos_start, neg_start=neg_start,
                                                 num_neg=num_neg, normalize=normalize, symmetric=symmetric,
                                                 hard_negative_weight=hard_negative_weight))
    lse = lse.to(prob.dtype)
    lse_rev = lse_rev.to(prob.dtype) if symmetric else None
    return prob.finish_grads(*_grad_sweep(prob, grad_rows, lse, lse_rev))
