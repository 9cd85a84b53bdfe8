"""Triton backend of the fused InfoNCE: its design, its per-call state and its entry points.

Implements the backend contract in ``fastcse.ops`` for every loss variant of
``fastcse.problem`` (directions, partition modes, hardness), with the CPU backend's semantics
(``fastcse.cpu`` is the executable spec), and the per-row ids (group_ids, labels) and extra
negatives (a queue). Memory is O((B + N + M) d): no B x N tensor ever exists, the scores
only as register tiles.

Directions as tile sweeps. Each direction of row i is a row-local block: a query row (anchor
a_i or positive p_i) against a key set (the N candidates or the M anchor keys). One generalized
kernel pair serves all four, specialized by constexprs rather than runtime branches (the
table is ``fastcse.problem.DIRECTION_ROLES``, which :class:`_TritonSweeps` reads):

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

Kernels (each launch below its kernel: the row norms in ``fastcse.triton_tiles`` with the
tile helpers every kernel inlines, the forward in ``fastcse.triton_forward``, the backward and
the normalization backward in ``fastcse.triton_backward``):

- ``_row_norm_kernel``: ||x|| per row (fp32). The score kernels scale their tiles by
  1 / max(||x||, eps) instead of reading normalized copies of the inputs.
- ``_forward_kernel``: one program per block of query rows and split of the keys (see
  ``column_splits``); loops over key tiles with an online softmax (running max and sum) and
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
  Every logit's tau-dependence is q_hat . k_hat / tau, so dL/dtau = -(1/tau) sum over cells G s:
  each tile adds its cells' G s into one fp32 scalar (an atomic), from G before it is rounded to a
  16-bit dtype for the products (the same sum from the rounded G, e.g. through x_hat . dx_hat,
  errs by the rounding times the terms' size, which cancel: 9% of a bf16 d(tau) measured).
- ``_normalize_backward_kernel``: a row kernel for dx = (dx_hat - x_hat (x_hat . dx_hat)) / ||x||
  (dx_hat / eps below eps), in place.

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

The per-row options, and what each costs (no launch, no product, no B x N tensor added):

- Ids (``ids`` [P] over the positive block and the anchor keys, row i's id ids[pos_start + i])
  are made dense int32 once per call with torch (sort + searchsorted: O(P log P), no host sync;
  equal ids get equal dense ids whatever int64 values they hold). Every tile of a direction with
  ids loads its rows' ids ([BLOCK_M]) and its columns' ([BLOCK_N], columns j < P) and compares
  them in registers (constexpr IDS, ``same_id``): one compare and select per cell.
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
- false negatives by similarity (FALSE_NEG, ``fastcse.false_negatives``): a [B] threshold per
  row, computed once with torch; every tile compares its guide similarities with it, before the
  penalty and the bias, and sets the cells above it to -inf (but the target(s) and doc_to_query's
  own anchor). Self-guided, the guide is the tile's plain scores (thresholds over tau): no
  product. A guide's normalized fp32 rows ([B + N (+ M), d_g], O((B + N) d_g)) give its tile: one
  B x n x d_g product per direction in the forward and one in the backward. doc_to_query gets
  launches of its own (its cells' thresholds are its rows', not query_to_doc's).

Matryoshka (``matryoshka_dims``) has kernels of its own, ``fastcse.triton_matryoshka`` (one
sweep over d per tile yields every dimension's scores, each dimension with its own
false-negative cells), chosen by ``_sweeps``.

Under ``TRITON_INTERPRET=1`` (the tests) the kernels run on CPU tensors (see
``fastcse.triton_tiles``).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from fastcse.checks import NORMALIZE_EPS
from fastcse.false_negatives import GuideRows, threshold

from fastcse.problem import (ANCHOR_KEYS, ANCHORS, CANDIDATES, DIRECTION_ROLES, DOC_TO_QUERY, DOCUMENTS, POSITIVES,
                             QUERY_TO_DOC, LossProblem)
from fastcse.triton_backward import launch_backward, normalize_backward
from fastcse.triton_forward import launch_forward
from fastcse.triton_tiles import INTERPRET as _INTERPRET  # noqa: F401  (fastcse.gpu_check reads it here)
from fastcse.triton_tiles import FALSE_NEG_GUIDED, FALSE_NEG_NONE, FALSE_NEG_SELF, MASK_CODES, Sweep, row_norms, \
    select_config

# exp(s - M) over the positive block, with M = 1/tau the largest possible normalized score,
# stays a normal fp32 number (> 1.2e-38 = exp(-87.3)) while M - s <= 2 / tau <= this bound.
_FIXED_MAX_RANGE = 80.0


def _fixed_max_is_safe(normalize: bool, tau: float) -> bool:
    """Whether doc_to_query's row sums can use atomics against the fixed max M = 1/tau.

    Normalized plain scores (no bias or penalty: doc_to_query has none) lie in [-1/tau, 1/tau],
    so exp(s - M) >= exp(-2/tau), a normal fp32 number while 2/tau <= 80 (tau >= 0.025). Below
    that, or without normalization (no bound on the scores at all), doc_to_query's LSE comes
    from a sweep of its own over the B x B block: per-row-block partial (max, sum) pairs would
    need O(B^2 / BLOCK_M) memory, which at B = 65536 is hundreds of MB.
    """
    return normalize and 2.0 / tau <= _FIXED_MAX_RANGE


class _TritonSweeps:
    """The Triton backend's per-call state: a problem's inputs on the device, their row norms,
    its direction sweeps and the launch configuration."""

    def __init__(self, anchor, candidates, anchor_keys, ids, problem: LossProblem, guide: GuideRows | None = None):
        if anchor.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise TypeError(f"the Triton backend takes float16, bfloat16 or float32, got {anchor.dtype}")
        if (ids is None) != (problem.id_mode is None):
            raise ValueError(f"ids and problem.id_mode go together, got ids {'None' if ids is None else 'given'} "
                             f"and id_mode {problem.id_mode!r}")
        self.problem = problem
        self.cfg = select_config(anchor.dtype, problem.dim)
        self.anchor = anchor.contiguous()
        self.candidates = candidates.contiguous()
        self.a_norm, self.c_norm = self._norms(self.anchor), self._norms(self.candidates)
        positives = slice(problem.pos_start, problem.pos_start + problem.batch)
        # The anchor keys' gradient has a buffer of its own only when they are a tensor of their own.
        self.separate_keys = problem.separate_anchor_keys and problem.variant.needs_anchor_keys
        if self.separate_keys:
            self.keys = anchor_keys.contiguous()
            self.k_norm = self._norms(self.keys)
        else:
            self.keys, self.k_norm = self.anchor, self.a_norm
        # Each operand of DIRECTION_ROLES as (rows, fp32 row norms or None). The positives are a
        # view into the candidates; doc_to_doc's documents stop before the extra negatives (a
        # prefix view: same rows, same gradient buffer).
        self.operands = {
            ANCHORS: (self.anchor, self.a_norm),
            POSITIVES: (self.candidates[positives], None if self.c_norm is None else self.c_norm[positives]),
            CANDIDATES: (self.candidates, self.c_norm),
            DOCUMENTS: (self.candidates[: problem.num_documents],
                        None if self.c_norm is None else self.c_norm[: problem.num_documents]),
            ANCHOR_KEYS: (self.keys, self.k_norm),
        }
        # With the anchors themselves as keys, doc_to_query's cells are query_to_doc's positive
        # block transposed: no sweep of its own in the backward, none in the forward when the
        # fixed max is safe.
        # (Not under a false-negative rule: its thresholds are per row, so the transposed cell's rule differs.)
        self.reverse_in_query_to_doc = DOC_TO_QUERY in problem.directions and not problem.separate_anchor_keys \
            and problem.false_negative_margin is None
        # With ids and local anchor keys, P = M = B, so pos_start = 0 and the group mask's cells
        # of query_to_doc's positive block are exactly doc_to_query's, transposed.
        assert not (problem.id_mode and self.reverse_in_query_to_doc and problem.pos_start != 0)
        self.ids, self.inv_count = (None, None) if ids is None else _dense_ids(ids, problem, self.anchor.device)
        self.false_negatives = _FalseNegativeRows(self, guide) if problem.false_negative_margin is not None else None

    def _norms(self, x):
        return row_norms(x, self.cfg) if self.problem.normalize else None

    def sweep(self, direction: str) -> Sweep:
        role = DIRECTION_ROLES[direction]
        queries, q_norm = self.operands[role.queries]
        keys, k_norm = self.operands[role.keys]
        rule = {} if self.false_negatives is None else self.false_negatives.sweep_fields(direction)
        return Sweep(direction, queries, q_norm, keys, k_norm, MASK_CODES[role.mask], ids=self.ids,
                     inv_count=self.inv_count if role.holds_target else None, **rule)

    def stats(self):
        """(row_loss [B], lse [P, B]): one forward launch per direction (doc_to_query fused when it can be)."""
        problem = self.problem
        col_sum = None
        if self.reverse_in_query_to_doc and _fixed_max_is_safe(problem.normalize, problem.tau):
            col_sum = torch.zeros(problem.batch, dtype=torch.float32, device=self.anchor.device)
        lse_q2d, target = launch_forward(self.sweep(QUERY_TO_DOC), problem, self.cfg, col_sum)
        lses = [lse_q2d]
        for direction in problem.directions[1:]:  # canonical order: query_to_doc first
            if direction == DOC_TO_QUERY and col_sum is not None:
                lses.append(problem.inv_tau + torch.log(col_sum))
            else:
                lses.append(launch_forward(self.sweep(direction), problem, self.cfg)[0])
        lse = torch.stack(lses)
        if not problem.joint:
            return lse.mean(0) - target, lse
        if len(lses) > 1:
            # The LSE over the union of the directions' cells, exactly, from their [B] LSEs.
            lse = torch.logsumexp(lse, dim=0, keepdim=True)
        return lse[0] - target, lse

    def _gradient_buffers(self) -> dict:
        """Each operand's fp32 gradient buffer (of its hat rows): the positives' and documents'
        are the candidates' (rows of it), the local anchor keys' the anchors'."""
        problem, dev = self.problem, self.anchor.device
        grad_a = torch.zeros((problem.batch, problem.dim), dtype=torch.float32, device=dev)
        grad_c = torch.zeros((problem.num_candidates, problem.dim), dtype=torch.float32, device=dev)
        grad_k = torch.zeros((problem.num_anchor_keys, problem.dim), dtype=torch.float32, device=dev) \
            if self.separate_keys else grad_a
        grad_p = grad_c[problem.pos_start: problem.pos_start + problem.batch]
        return {ANCHORS: grad_a, POSITIVES: grad_p, CANDIDATES: grad_c, DOCUMENTS: grad_c, ANCHOR_KEYS: grad_k}

    def grads(self, grad_rows, lse):
        """(dA, dC, dK or None, dtau) for per-row upstream gradients: one backward launch per direction."""
        problem = self.problem
        buffers = self._gradient_buffers()

        def lse_of(direction):  # joint: every direction's cells share the row's one LSE
            return lse[0] if problem.joint else lse[problem.directions.index(direction)]

        g_scale = 1.0 if problem.joint else 1.0 / len(problem.directions)
        tau_dots = torch.zeros(1, dtype=torch.float32, device=self.anchor.device)
        for direction in problem.directions:
            if direction == DOC_TO_QUERY and self.reverse_in_query_to_doc:
                continue  # in query_to_doc's launch
            lse_rev = lse_of(DOC_TO_QUERY) if direction == QUERY_TO_DOC and self.reverse_in_query_to_doc else None
            role = DIRECTION_ROLES[direction]
            launch_backward(self.sweep(direction), problem, self.cfg, lse_of(direction), grad_rows, g_scale,
                            buffers[role.queries], buffers[role.keys], tau_dots, lse_rev=lse_rev)
        grad_a, grad_c, grad_k = buffers[ANCHORS], buffers[CANDIDATES], buffers[ANCHOR_KEYS]
        normalize_backward(self.anchor, self.a_norm, grad_a, self.cfg)
        normalize_backward(self.candidates, self.c_norm, grad_c, self.cfg)
        if self.separate_keys:
            normalize_backward(self.keys, self.k_norm, grad_k, self.cfg)
        grad_tau = -tau_dots[0] / problem.tau  # (see _backward_kernel)
        return grad_a, grad_c, grad_k if self.separate_keys else None, grad_tau


class _FalseNegativeRows:
    """The false-negative rule's O((B + N) d_g) inputs: the per-row thresholds and, with a guide,
    its normalized fp32 rows by operand (the kernels compare each tile, no B x N tensor).

    Self-guided, the kernels compare the plain scores s = sim / tau: the thresholds are over tau
    (t_i - m and t_i - |t_i| m both scale with 1 / tau > 0)."""

    def __init__(self, sweeps: _TritonSweeps, guide: GuideRows | None):
        problem = sweeps.problem
        positives = slice(problem.pos_start, problem.pos_start + problem.batch)
        self.code = FALSE_NEG_NONE.value
        self.rows = {}
        if guide is None:
            anchor, positive = sweeps.anchor.float(), sweeps.candidates[positives].float()
            if problem.normalize:
                anchor, positive = (F.normalize(x, dim=1, eps=NORMALIZE_EPS) for x in (anchor, positive))
            similarity = (anchor * positive).sum(1)
            self.thresholds = threshold(similarity, problem.false_negative_margin, problem.margin_strategy) \
                * problem.inv_tau
            self.code = FALSE_NEG_SELF.value
            return
        ga, gc = (F.normalize(x.float(), dim=1, eps=NORMALIZE_EPS).contiguous() for x in guide[:2])
        gk = ga if guide.anchor_keys is None else F.normalize(guide.anchor_keys.float(), dim=1, eps=NORMALIZE_EPS)
        self.thresholds = threshold((ga * gc[positives]).sum(1), problem.false_negative_margin,
                                    problem.margin_strategy).contiguous()
        self.rows = {ANCHORS: ga, POSITIVES: gc[positives], CANDIDATES: gc, DOCUMENTS: gc[: problem.num_documents],
                     ANCHOR_KEYS: gk.contiguous()}
        self.code = FALSE_NEG_GUIDED.value

    def sweep_fields(self, direction: str) -> dict:
        role = DIRECTION_ROLES[direction]
        return dict(false_neg=self.code, thresholds=self.thresholds, guide_queries=self.rows.get(role.queries),
                    guide_keys=self.rows.get(role.keys))


def _dense_ids(ids: torch.Tensor, problem: LossProblem, device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(int32 [P] dense ids, fp32 [B] 1 / |P_i| with labels, else None), with torch in
    O(P log P) and no host sync: an id's dense id is its first position in the sorted ids (equal
    ids, equal dense ids; >= 0), and a label's count the width of its run there. int32 halves
    the kernels' id registers and loads, whatever values (hashes) the int64 ids hold."""
    ids = ids.to(device=device, dtype=torch.int64).contiguous()
    sorted_ids = torch.sort(ids).values
    first = torch.searchsorted(sorted_ids, ids)
    inv_count = None
    if problem.id_mode == "label":
        rows = slice(problem.pos_start, problem.pos_start + problem.batch)
        count = torch.searchsorted(sorted_ids, ids[rows], right=True) - first[rows]
        inv_count = 1.0 / count.to(torch.float32)
    return first.to(torch.int32), inv_count


def _on_device(x: torch.Tensor):
    """Launches go to the current CUDA device: make it the inputs' one."""
    return torch.cuda.device(x.device) if x.device.type == "cuda" else contextlib.nullcontext()


# --------------------------------------------------------------------------------------------
# Backend entry points (the contract in fastcse.ops)
# --------------------------------------------------------------------------------------------


def _sweeps(anchor, candidates, anchor_keys, ids, problem: LossProblem, guide):
    """The per-call state: Matryoshka's (``fastcse.triton_matryoshka``) or the plain loss's."""
    if problem.matryoshka_dims:
        from fastcse.triton_matryoshka import MatryoshkaSweeps
        if anchor.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise TypeError(f"the Triton backend takes float16, bfloat16 or float32, got {anchor.dtype}")
        cfg = select_config(anchor.dtype, problem.dim)
        return MatryoshkaSweeps(anchor, candidates, anchor_keys, ids, problem, cfg, guide)
    return _TritonSweeps(anchor, candidates, anchor_keys, ids, problem, guide)


def forward(anchor, candidates, anchor_keys, problem: LossProblem, *, compute_grad, ids=None, guide=None):
    with _on_device(anchor):
        sweeps = _sweeps(anchor, candidates, anchor_keys, ids, problem, guide)
        row_loss, lse = sweeps.stats()
        grads = None
        if compute_grad:  # the probabilities need the final LSEs: a second sweep with g = 1
            grads = sweeps.grads(torch.ones_like(row_loss), lse)
        return row_loss, lse, grads


def backward(grad_rows, anchor, candidates, anchor_keys, problem: LossProblem, lse, *, ids=None, guide=None):
    with _on_device(anchor):
        sweeps = _sweeps(anchor, candidates, anchor_keys, ids, problem, guide)
        f32 = dict(dtype=torch.float32)
        return sweeps.grads(grad_rows.to(**f32).contiguous(), lse.to(**f32).contiguous())
