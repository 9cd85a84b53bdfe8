"""The Triton kernels of fastcse.info_nce, run through the Triton interpreter on CPU tensors.

conftest.py sets TRITON_INTERPRET=1, so backend="triton" launches the very kernels that run on
GPUs, program by program, on CPU tensors (with 16 x 16 x 16 tiles, so small shapes cross
several tiles). Every loss and gradient (anchor, positive, negative, learnable temperature) is
compared with info_nce_reference computed in fp64 from the same (rounded) inputs, for every loss
variant (directions x partition mode x hardness mode x hard negatives); separate anchor keys
(the distributed layout) are checked through the backend contract against the reference on the
concatenated problem. The interpreter costs ~70 ms per kernel launch: the cross product runs at
one tiny shape, odd shapes and dtypes on a sample.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

import fastcse
from fastcse import cpu, triton_forward, triton_info_nce
from fastcse.problem import DIRECTIONS, describe, resolve_variant
from fastcse.reference import info_nce_reference
from fastcse.testing import HALF_PRECISION_CASES, HALF_PRECISION_WEIGHT, TEMPERATURE_CASES, TOL
from fastcse.testing import OPTION_GRID as OPTION_CASES
from fastcse.testing import assert_close as _assert_close
from fastcse.testing import assert_rows_close as _assert_rows_close
from fastcse.testing import check_against_reference
from fastcse.testing import draw_inputs as _inputs
from fastcse.testing import loss_and_grads
from fastcse.testing import loss_and_grad_list as _loss_and_grads
from fastcse.testing import temperature_floor as _temperature_floor

# A direction without any cell in some row (B = 1's query_to_query) or a split of keys without one
# has LSE log(0) = -inf, which numpy, running the interpreter's kernels, reports as a warning.
pytestmark = pytest.mark.filterwarnings("ignore:divide by zero encountered in log:RuntimeWarning")

Q2D, Q2Q, D2Q, D2D = DIRECTIONS
# Every directions subset with query_to_doc (joint), and per_direction where it is allowed (the
# subsets of {query_to_doc, doc_to_query} with two directions: one direction is always joint).
SUBSETS = [(Q2D,) + rest for n in range(4) for rest in itertools.combinations((Q2Q, D2Q, D2D), n)]
VARIANTS = [(d, "joint") for d in SUBSETS] + [((Q2D, D2Q), "per_direction")]
HARDNESS = (None, "in_batch_negatives", "hard_negatives", "all_negatives")
GTE = dict(directions=(Q2D, Q2Q, D2Q, D2D), partition_mode="joint")  # GTE's improved contrastive loss


def _variant_id(directions, partition):
    return "+".join(d.replace("query", "q").replace("doc", "d").replace("_to_", "2") for d in directions) + \
        ("" if partition == "joint" else "/per_dir")


# --------------------------------------------------------------------------------------------
# The loss variants of sentence-transformers 6
# --------------------------------------------------------------------------------------------

# (k, weight): no hard negatives, one without the bias, three with it.
_HARD_CASES = [(0, 0.0), (1, 0.0), (3, 0.7)]
_CROSS = [(directions, partition, mode, k, w) for directions, partition in VARIANTS for mode in HARDNESS
          for k, w in _HARD_CASES
          if not (mode == "hard_negatives" and k == 0)]  # resolves to no hardness: the None case
# The reductions rotate, so both gradient paths ("mean"/"sum": in the forward; "none": the
# backward's recompute with per-row upstream gradients) see every variant family.
CROSS_CASES = [pytest.param(*case, ("mean", "none", "sum")[i % 3],
                            id=f"{_variant_id(*case[:2])}-{case[2]}-k{case[3]}-w{case[4]}")
               for i, case in enumerate(_CROSS)]


@pytest.mark.parametrize("directions,partition,mode,num_neg,weight,reduction", CROSS_CASES)
def test_variants(directions, partition, mode, num_neg, weight, reduction):
    """The whole cross product at one tiny shape: 5 rows, 5 to 20 candidates (two tiles of 16), d = 16."""
    check_against_reference(5, num_neg, 16, weight=weight, reduction=reduction, directions=directions,
                            partition_mode=partition, hardness_mode=mode, hardness_strength=3.0,
                            seed=len(directions) + num_neg)


@pytest.mark.parametrize("batch,num_neg,dim,variant,reduction", [
    # B = 1: query_to_query's one key is the anchor itself, doc_to_doc's keys are all its own
    # documents: those directions hold no cell (LSE -inf), joint's union still has query_to_doc.
    (1, 0, 24, dict(GTE, hardness_mode="all_negatives"), "none"),
    (1, 2, 40, dict(GTE, hardness_mode="in_batch_negatives"), "mean"),
    (1, 1, 16, dict(symmetric=True, hardness_mode="all_negatives"), "sum"),
    # 17 rows: row 16 is alone in its row block and in the last key tile of query_to_query, where
    # its only key is itself: a tile without a finite logit (the online softmax's -inf guard).
    (17, 0, 24, dict(directions=(Q2D, Q2Q), hardness_mode="in_batch_negatives"), "none"),
    (17, 3, 40, dict(GTE, hardness_mode="hard_negatives"), "none"),
    (17, 1, 24, dict(directions=(Q2D, D2Q, D2D), hardness_mode="all_negatives"), "mean"),
    (19, 2, 16, dict(directions=(Q2D, D2Q), partition_mode="per_direction", hardness_mode="in_batch_negatives"),
     "none"),
    (19, 2, 40, dict(directions=(Q2D, D2Q), partition_mode="joint", hardness_mode="hard_negatives"), "sum"),
    (13, 3, 100, dict(directions=(Q2D, D2D), hardness_mode="in_batch_negatives"), "none"),  # several d chunks
])
def test_variants_odd_shapes(batch, num_neg, dim, variant, reduction):
    check_against_reference(batch, num_neg, dim, weight=0.4 if num_neg else 0.0, reduction=reduction,
                            hardness_strength=3.0 if variant.get("hardness_mode") else 0.0, seed=batch + dim,
                            **variant)


@pytest.mark.parametrize("variant,reduction", [
    (dict(GTE, hardness_mode="in_batch_negatives"), "none"),  # the penalty is strength * dot product
    (dict(symmetric=True, hardness_mode="all_negatives"), "mean"),  # doc_to_query by its own sweep
    (dict(directions=(Q2D, D2Q), partition_mode="joint"), "none"),
    (dict(directions=(Q2D, Q2Q, D2D), hardness_mode="hard_negatives"), "sum"),
])
def test_variants_normalize_off(variant, reduction):
    check_against_reference(18, 2, 24, normalize=False, weight=0.3, reduction=reduction, scale=0.15, seed=43,
                            hardness_strength=3.0 if variant.get("hardness_mode") else 0.0, **variant)


@pytest.mark.parametrize("tau,variant,reduction", [
    # 2/tau = 200: doc_to_query's LSE needs its own online sweep, not the fixed max.
    (0.01, dict(symmetric=True, hardness_mode="in_batch_negatives"), "none"),
    (0.01, dict(directions=(Q2D, D2Q), partition_mode="joint", hardness_mode="all_negatives"), "mean"),
    (0.01, dict(GTE, hardness_mode="all_negatives"), "none"),
    (0.025, dict(GTE, hardness_mode="in_batch_negatives"), "sum"),  # the fused fixed-max path's limit
    (1.0, dict(directions=(Q2D, Q2Q, D2Q), hardness_mode="hard_negatives"), "none"),
])
def test_variants_temperatures(tau, variant, reduction):
    check_against_reference(20, 1, 24, tau=tau, weight=0.3, reduction=reduction, hardness_strength=3.0, seed=47,
                            **variant)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("variant,normalize,reduction", [
    (dict(GTE, hardness_mode="in_batch_negatives"), True, "none"),
    (dict(symmetric=True, hardness_mode="all_negatives"), True, "mean"),
    (dict(directions=(Q2D, D2Q, D2D), hardness_mode="hard_negatives"), False, "sum"),
])
def test_variants_half_precision(dtype, variant, normalize, reduction):
    check_against_reference(18, 2, 40, dtype=dtype, normalize=normalize, weight=0.4, reduction=reduction,
                            scale=1.0 if normalize else 0.15, hardness_strength=3.0, seed=53, **variant)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("variant,reduction", [
    (dict(symmetric=True), "mean"),
    (dict(GTE, hardness_mode="in_batch_negatives", hardness_strength=3.0), "none"),
    (dict(directions=(Q2D, D2Q), false_negative_margin=0.05), "sum"),
], ids=["symmetric", "gte-penalty", "false-negatives"])
def test_half_precision_temperature_gradient_is_fp32_accurate(dtype, variant, reduction):
    """d(tau) = -(1/tau) sum over cells of dS s, terms that mostly cancel. The kernels sum them
    from dS before its rounding to the inputs' 16 bits: the result errs as fp32 does, where the
    rounded dS would err by about 2^-9 of the terms' size (several % of d(tau) here)."""
    tensors = _inputs(24, 1, 32, dtype, seed=3)
    upstream = torch.rand(24, generator=torch.Generator().manual_seed(4)) + 0.5 if reduction == "none" \
        else torch.tensor(1.0)
    options = dict(variant, reduction=reduction)
    got = loss_and_grads(fastcse.info_nce, tensors, 0.05, upstream, backend="triton", **options)["temperature"]
    want = loss_and_grads(fastcse.info_nce_reference, tensors, 0.05, upstream.double(), torch.float64,
                          **options)["temperature"]
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=0.0)


# --------------------------------------------------------------------------------------------
# Separate anchor keys: the distributed layout, through the backend contract
# --------------------------------------------------------------------------------------------


def _world(sizes, num_neg, dim, seed):
    """Every rank's (anchors, positives, negatives [B_r, k, d]), concatenated in rank order."""
    total = sum(sizes)
    gen = torch.Generator().manual_seed(seed)
    anchor = torch.randn(total, dim, generator=gen)
    positive = anchor + 0.8 * torch.randn(total, dim, generator=gen)
    negative = anchor[:, None] + 1.2 * torch.randn(total, num_neg, dim, generator=gen)
    return anchor, positive, negative


def _distributed_problem(sizes, rank, anchor, positive, negative, tau, weight, variant_kw, normalize=True):
    """Rank ``rank``'s call as distributed.py makes it: its anchors against every rank's gathered
    candidates (positives of all ranks, then negatives of all ranks), every rank's anchors as keys."""
    total, num_neg, dim = anchor.shape[0], negative.shape[1], anchor.shape[1]
    start, batch = sum(sizes[:rank]), sizes[rank]
    candidates = torch.cat([positive, negative.reshape(total * num_neg, dim)])
    local = anchor[start:start + batch].clone()
    variant = resolve_variant(num_neg=num_neg, **variant_kw)
    problem = describe(local, candidates, tau, pos_start=start, neg_start=total + start * num_neg, num_neg=num_neg,
                       normalize=normalize, hard_negative_weight=weight, variant=variant, anchor_keys=anchor,
                       anchor_start=start)
    return local, candidates, problem


@pytest.mark.parametrize("variant", [
    dict(symmetric=True, hardness_mode="in_batch_negatives", hardness_strength=3.0),  # distributed symmetric
    dict(directions=(Q2D, D2Q), partition_mode="joint", hardness_mode="all_negatives", hardness_strength=3.0),
    dict(directions=(Q2D, Q2Q), hardness_mode="hard_negatives", hardness_strength=3.0),
    dict(GTE, hardness_mode="in_batch_negatives", hardness_strength=3.0),
    dict(GTE),
    dict(directions=(Q2D, D2D), hardness_mode="all_negatives", hardness_strength=3.0),  # keys given, unused
], ids=["symmetric", "q2d+d2q", "q2d+q2q", "gte-hard", "gte", "q2d+d2d"])
@pytest.mark.parametrize("rank", [0, 1])
def test_separate_anchor_keys(variant, rank):
    """A rank's rows of the single-process problem: row_loss and lse, d(candidates) and d(tau)
    exactly as the reference's rows; d(anchor keys) plus d(anchor) at anchor_start is the
    reference's d(anchors) (the gather's backward adds the two on the owner)."""
    sizes, num_neg, dim, tau, weight = [5, 7, 4], 2, 24, 0.04, 0.5
    anchor, positive, negative = _world(sizes, num_neg, dim, seed=59 + rank)
    local, candidates, problem = _distributed_problem(sizes, rank, anchor, positive, negative, tau, weight, variant)
    start, batch = problem.anchor_start, problem.batch
    gen = torch.Generator().manual_seed(61)
    grad_rows = torch.rand(batch, generator=gen) + 0.5

    leaves = [x.double().requires_grad_() for x in (anchor, positive, negative)]
    temperature = torch.tensor(tau, dtype=torch.float64, requires_grad=True)
    ref = info_nce_reference(*leaves, temperature=temperature, hard_negative_weight=weight, reduction="none",
                             **variant)
    ref_rows = ref[start:start + batch]

    row_loss, lse, grads = triton_info_nce.forward(local, candidates, anchor, problem, compute_grad=True)
    assert lse.shape == (problem.variant.num_partitions, batch) and lse.dtype == torch.float32
    _assert_close("row_loss", row_loss, ref_rows.detach(), 2e-4)
    back = triton_info_nce.backward(grad_rows, local, candidates, anchor, problem, lse)
    for kind, got, weights in [("fused", grads, torch.ones(batch)), ("backward", back, grad_rows)]:
        upstream = torch.zeros(sum(sizes), dtype=torch.float64)
        upstream[start:start + batch] = weights.double()
        want = torch.autograd.grad(ref, leaves + [temperature], upstream, retain_graph=True)
        grad_anchor, grad_candidates, grad_keys, grad_tau = got
        if problem.variant.needs_anchor_keys:
            assert grad_keys.shape == anchor.shape and grad_keys.dtype == torch.float32
            grad_all_anchors = grad_keys.clone()
        else:
            assert grad_keys is None
            grad_all_anchors = torch.zeros_like(anchor)
        grad_all_anchors[start:start + batch] += grad_anchor
        _assert_close(f"{kind} d(anchor keys) + d(anchor)", grad_all_anchors, want[0], 2e-4)
        _assert_close(f"{kind} d(candidates)", grad_candidates,
                      torch.cat([want[1], want[2].reshape(-1, dim)]), 2e-4)
        _assert_close(f"{kind} d(tau)", grad_tau, want[3], 2e-4, _temperature_floor(weights, tau))


def test_separate_anchor_keys_equal_to_the_anchors():
    """Anchor keys given as a tensor of their own that holds just the anchors: the same loss, and
    d(anchor) + d(anchor keys) equals the one-process d(anchor) (keys None)."""
    anchor, positive, negative = _inputs(11, 2, 24, torch.float32, seed=67)
    candidates = torch.cat([positive, negative.reshape(-1, 24)])
    variant = resolve_variant(num_neg=2, hardness_mode="in_batch_negatives", hardness_strength=3.0, **GTE)
    options = dict(pos_start=0, neg_start=11, num_neg=2, normalize=True, hard_negative_weight=0.3, variant=variant)
    problem = describe(anchor, candidates, 0.05, **options)
    keyed = describe(anchor, candidates, 0.05, anchor_keys=anchor, **options)
    loss, lse, (ga, gc, gk, gt) = triton_info_nce.forward(anchor, candidates, None, problem, compute_grad=True)
    loss2, lse2, (ga2, gc2, gk2, gt2) = triton_info_nce.forward(anchor, candidates, anchor.clone(), keyed,
                                                                compute_grad=True)
    assert gk is None
    for name, x, y in [("row_loss", loss2, loss), ("lse", lse2, lse), ("d(anchor)", ga2 + gk2, ga),
                       ("d(candidates)", gc2, gc), ("d(tau)", gt2, gt)]:
        _assert_close(name, x, y.double(), 1e-5)


# --------------------------------------------------------------------------------------------
# group_ids (false negatives), labels (several positives), extra negatives (a queue)
# --------------------------------------------------------------------------------------------

# 19 rows (two row blocks of 16): groups of 4, 3, 3, 2, 2 and singletons, one group across both
# row blocks. As int64 values far outside int32 (and negative): the kernels compare dense int32
# ranks of them.
ROW_IDS = torch.tensor([0, 1, 0, 2, 3, 1, 0, 4, 5, 6, 2, 0, 1, 7, 8, 9, 3, 2, 10]) * 7_000_000_000_123 - 3
ID_VARIANTS = {
    "q2d": dict(),
    "symmetric": dict(symmetric=True),  # doc_to_query fused on query_to_doc's tiles (fixed max)
    "symmetric-hard": dict(symmetric=True, hardness_mode="in_batch_negatives", hardness_strength=3.0),
    "gte-all": dict(GTE, hardness_mode="all_negatives", hardness_strength=3.0),
}


def _row_options(kind, batch=None):
    ids = ROW_IDS if batch is None else ROW_IDS[:batch]
    return {"group": dict(group_ids=ids), "label": dict(labels=ids), "queue": {}}[kind]


# kind x variant x k; group and label get the queue with k = 2 (so each appears with and without
# it), "queue" is the queue alone; the reductions rotate.
_ID_CROSS = [(kind, name, k) for kind in ("group", "label", "queue") for name in ID_VARIANTS for k in (0, 2)]
ID_CASES = [pytest.param(kind, name, k, ("mean", "none", "sum")[i % 3], id=f"{kind}-{name}-k{k}")
            for i, (kind, name, k) in enumerate(_ID_CROSS)]


@pytest.mark.parametrize("kind,variant,num_neg,reduction", ID_CASES)
def test_ids_and_queue(kind, variant, num_neg, reduction):
    """19 rows, up to 19 * 3 + 5 = 62 candidates, d = 24 (two chunks), a learnable temperature, the
    queue's gradient (it requires grad)."""
    queue = 5 if kind == "queue" or num_neg == 2 else 0
    check_against_reference(19, num_neg, 24, weight=0.5 if num_neg else 0.0, reduction=reduction, queue=queue,
                            seed=79 + num_neg, **_row_options(kind), **ID_VARIANTS[variant])


@pytest.mark.parametrize("kind,variant,options", [
    # 2/tau = 200: doc_to_query's forward LSE by its own (group-masked) sweep, the backward fused.
    ("group", "symmetric-hard", dict(tau=0.01, reduction="none")),
    ("label", "symmetric", dict(tau=0.01, reduction="mean")),
    ("group", "gte-all", dict(normalize=False, scale=0.15, reduction="sum")),  # online softmax everywhere
    ("label", "gte-all", dict(normalize=False, scale=0.15, reduction="none")),
    ("group", "gte-all", dict(dtype=torch.float16, reduction="none")),
    ("label", "symmetric-hard", dict(dtype=torch.bfloat16, reduction="mean")),
    ("group", "q2d", dict(dtype=torch.bfloat16, normalize=False, scale=0.15, reduction="sum")),
], ids=["group-tau0.01", "label-tau0.01", "group-dot", "label-dot", "group-fp16", "label-bf16", "group-bf16-dot"])
def test_ids_and_queue_options(kind, variant, options):
    check_against_reference(19, 2, 24, weight=0.4, queue=4, seed=83, **_row_options(kind), **ID_VARIANTS[variant],
                            **options)


@pytest.mark.parametrize("kind,batch,variant", [
    # One group for everyone: only the own pair and the hard / extra negatives are left; query_to_query
    # has no cell at all (LSE -inf), whole tiles of every direction are masked.
    ("group", 17, "gte-all"),
    ("group", 17, "symmetric"),
    ("label", 17, "gte-all"),  # one label: every positive is a positive, the penalty spares them all
    ("group", 1, "gte-all"),
    ("label", 1, "symmetric-hard"),
])
def test_ids_one_group(kind, batch, variant):
    ids = torch.full((batch,), 12345678901, dtype=torch.long)
    options = {"group": dict(group_ids=ids), "label": dict(labels=ids)}[kind]
    check_against_reference(batch, 1, 16, weight=0.3, reduction="none", queue=3, seed=89, **options,
                            **ID_VARIANTS[variant])


def test_ids_production_block_sizes(monkeypatch):
    """The GPU tile configuration (64 x 32 fp32 backward tiles): 70 rows, two row blocks."""
    small_config = triton_info_nce.select_config
    monkeypatch.setattr(triton_info_nce, "select_config",
                        lambda dt, dim, **kw: small_config(dt, dim, interpret=True, small=False))
    ids = torch.arange(70) % 23  # groups of 3 and 4, spread over both row blocks
    for options in (dict(group_ids=ids, **ID_VARIANTS["gte-all"]), dict(labels=ids, **ID_VARIANTS["symmetric"])):
        check_against_reference(70, 1, 40, weight=0.3, reduction="none", queue=9, seed=97, **options)


@pytest.mark.parametrize("kind", ["group", "label"])
def test_ids_backend_contract_against_cpu(kind):
    """forward/backward called directly against the CPU backend in fp64, with this rank's rows at
    pos_start = B of P = 2 B positives (row i's id is ids[pos_start + i]), an extra-negative queue
    and doc_to_doc (whose keys stop before it)."""
    gen = torch.Generator().manual_seed(101)
    batch, num_neg, dim, queue = 11, 2, 24, 5
    anchor = torch.randn(batch, dim, generator=gen)
    candidates = torch.randn(2 * batch + 2 * batch * num_neg + queue, dim, generator=gen)
    ids = torch.cat([ROW_IDS[:batch].flip(0), ROW_IDS[:batch]])
    variant = resolve_variant(num_neg=num_neg, directions=(Q2D, D2D), hardness_mode="all_negatives",
                              hardness_strength=2.0)
    options = dict(pos_start=batch, neg_start=2 * batch + batch * num_neg, num_neg=num_neg, normalize=True,
                   hard_negative_weight=0.6, variant=variant, id_mode=kind, num_extra=queue)
    problem = describe(anchor, candidates, 0.04, ids=ids, **options)
    problem64 = describe(anchor.double(), candidates.double(), 0.04, ids=ids, **options)
    grad_rows = torch.rand(batch, generator=gen)
    row_loss, lse, grads = triton_info_nce.forward(anchor, candidates, None, problem, compute_grad=True, ids=ids)
    ref_loss, ref_lse, ref_grads = cpu.forward(anchor.double(), candidates.double(), None, problem64, compute_grad=True,
                                               ids=ids)
    back = triton_info_nce.backward(grad_rows, anchor, candidates, None, problem, lse, ids=ids)
    ref_back = cpu.backward(grad_rows.double(), anchor.double(), candidates.double(), None, problem64, ref_lse, ids=ids)
    _assert_close("row_loss", row_loss, ref_loss, 2e-4)
    _assert_close("lse", lse, ref_lse, 2e-4)
    for label, got, want, weights in [("fused", grads, ref_grads, torch.ones(batch)),
                                      ("backward", back, ref_back, grad_rows)]:
        assert got[2] is None
        _assert_close(f"{label} d(anchor)", got[0], want[0], 2e-4)
        _assert_close(f"{label} d(candidates)", got[1], want[1], 2e-4)
        assert got[1][-queue:].abs().sum() > 0  # the queue gets gradients like any candidate
        _assert_close(f"{label} d(tau)", got[3], want[3], 2e-4, _temperature_floor(weights, 0.04))


@pytest.mark.parametrize("kind,variant,rank", [
    ("group", "symmetric-hard", 0),  # distributed symmetric: doc_to_query sweeps every rank's anchors
    ("label", "symmetric-hard", 1),
    ("group", "gte-all", 1),
    ("label", "gte-all", 2),
    ("group", "q2d", 2),
    ("label", "q2d", 0),
])
def test_ids_separate_anchor_keys(kind, variant, rank):
    """The distributed layout: ids covering the gathered positives (and anchor keys), the rank's own
    queue after every rank's negatives; a rank's rows of the single-process problem as in
    test_separate_anchor_keys, d(queue) included."""
    sizes, num_neg, dim, tau, weight, queue = [5, 7, 4], 2, 24, 0.04, 0.5, 4
    total = sum(sizes)
    anchor, positive, negative = _world(sizes, num_neg, dim, seed=103 + rank)
    extra = torch.randn(queue, dim, generator=torch.Generator().manual_seed(107))
    ids = ROW_IDS[:total]
    variant_kw = ID_VARIANTS[variant]
    local, candidates, problem = _distributed_problem(sizes, rank, anchor, positive, negative, tau, weight, variant_kw)
    candidates = torch.cat([candidates, extra])
    problem = describe(local, candidates, tau, pos_start=problem.pos_start, neg_start=problem.neg_start,
                       num_neg=num_neg, normalize=True, hard_negative_weight=weight, variant=problem.variant,
                       anchor_keys=anchor, anchor_start=problem.anchor_start, ids=ids, id_mode=kind, num_extra=queue)
    start, batch = problem.anchor_start, problem.batch
    grad_rows = torch.rand(batch, generator=torch.Generator().manual_seed(109)) + 0.5

    leaves = [x.double().requires_grad_() for x in (anchor, positive, negative, extra)]
    temperature = torch.tensor(tau, dtype=torch.float64, requires_grad=True)
    ref = info_nce_reference(*leaves[:3], temperature=temperature, hard_negative_weight=weight, reduction="none",
                             extra_negatives=leaves[3], **_row_options(kind, total), **variant_kw)
    row_loss, lse, grads = triton_info_nce.forward(local, candidates, anchor, problem, compute_grad=True, ids=ids)
    _assert_close("row_loss", row_loss, ref[start:start + batch].detach(), 2e-4)
    back = triton_info_nce.backward(grad_rows, local, candidates, anchor, problem, lse, ids=ids)
    for label, got, weights in [("fused", grads, torch.ones(batch)), ("backward", back, grad_rows)]:
        upstream = torch.zeros(total, dtype=torch.float64)
        upstream[start:start + batch] = weights.double()
        want = torch.autograd.grad(ref, leaves + [temperature], upstream, retain_graph=True)
        grad_anchor, grad_candidates, grad_keys, grad_tau = got
        grad_all_anchors = grad_keys.clone() if problem.variant.needs_anchor_keys else torch.zeros_like(anchor)
        grad_all_anchors[start:start + batch] += grad_anchor
        _assert_close(f"{label} d(anchor keys) + d(anchor)", grad_all_anchors, want[0], 2e-4)
        _assert_close(f"{label} d(candidates)", grad_candidates,
                      torch.cat([want[1], want[2].reshape(-1, dim), want[3]]), 2e-4)
        _assert_close(f"{label} d(tau)", grad_tau, want[4], 2e-4, _temperature_floor(weights, tau))


@pytest.mark.parametrize("kind", ["group", "label"])
def test_ids_keep_the_fused_launches(monkeypatch, kind):
    """Ids and a queue add no launch: symmetric in one process stays one sweep per pass."""
    launches = _count_launches(monkeypatch)
    anchor, positive, negative = _inputs(6, 1, 16, torch.float32, seed=71)
    candidates = torch.cat([positive, negative, torch.randn(3, 16)])
    ids = torch.tensor([4, 2, 4, 9, 2, 4])
    problem = describe(anchor, candidates, 0.05, pos_start=0, neg_start=6, num_neg=1, normalize=True,
                       hard_negative_weight=0.5, variant=resolve_variant(num_neg=1, symmetric=True), ids=ids,
                       id_mode=kind, num_extra=3)
    triton_info_nce.forward(anchor, candidates, None, problem, compute_grad=True, ids=ids)
    assert launches["forward"] == [(Q2D, True)]
    assert launches["backward"] == [(Q2D, True)]


# --------------------------------------------------------------------------------------------
# The backend contract, launches and products
# --------------------------------------------------------------------------------------------

_CONTRACT_VARIANTS = [
    dict(),
    dict(symmetric=True),
    dict(symmetric=True, hardness_mode="all_negatives", hardness_strength=2.0),
    dict(GTE, hardness_mode="in_batch_negatives", hardness_strength=2.0),
]


@pytest.mark.parametrize("variant", _CONTRACT_VARIANTS, ids=["q2d", "symmetric", "symmetric-hard", "gte"])
def test_backend_contract_against_cpu(variant):
    """forward/backward called directly against the CPU backend in fp64, with the targets not at
    column i (a rank > 0: its positives sit after another rank's)."""
    gen = torch.Generator().manual_seed(29)
    batch, num_neg, dim = 11, 2, 24
    pos_start = batch
    anchor = torch.randn(batch, dim, generator=gen)
    candidates = torch.randn(3 * batch + batch * num_neg, dim, generator=gen)
    spec_variant = resolve_variant(num_neg=num_neg, **variant)
    problem = describe(anchor, candidates, 0.04, pos_start=pos_start, neg_start=3 * batch, num_neg=num_neg,
                       normalize=True, hard_negative_weight=0.6, variant=spec_variant)
    problem64 = describe(anchor.double(), candidates.double(), 0.04, pos_start=pos_start, neg_start=3 * batch,
                         num_neg=num_neg, normalize=True, hard_negative_weight=0.6, variant=spec_variant)
    grad_rows = torch.rand(batch, generator=gen)
    row_loss, lse, grads = triton_info_nce.forward(anchor, candidates, None, problem, compute_grad=True)
    ref_loss, ref_lse, ref_grads = cpu.forward(anchor.double(), candidates.double(), None, problem64, compute_grad=True)
    back = triton_info_nce.backward(grad_rows, anchor, candidates, None, problem, lse)
    ref_back = cpu.backward(grad_rows.double(), anchor.double(), candidates.double(), None, problem64, ref_lse)
    assert row_loss.dtype == torch.float32 and row_loss.shape == (batch,)
    assert lse.dtype == torch.float32 and lse.shape == (spec_variant.num_partitions, batch)
    _assert_close("row_loss", row_loss, ref_loss, 2e-4)
    _assert_close("lse", lse, ref_lse, 2e-4)
    for kind, got, want in [("fused", grads, ref_grads), ("backward", back, ref_back)]:
        assert got[2] is None and want[2] is None
        for name, x, ref in zip(("anchor", "candidates", "_", "tau"), got, want):
            if name == "_":
                continue
            assert x.dtype == torch.float32 and x.shape == ref.shape, (kind, name, x.dtype, x.shape)
            _assert_close(f"{kind} d{name}", x, ref, 2e-4,
                          1e-2 if name != "tau" else _temperature_floor(torch.ones(batch), 0.04))


def test_rejects_float64():
    anchor, candidates = torch.randn(4, 8, dtype=torch.float64), torch.randn(8, 8, dtype=torch.float64)
    problem = describe(anchor, candidates, 0.05, pos_start=0, neg_start=4, num_neg=1, normalize=True,
                       hard_negative_weight=0.0)
    with pytest.raises(TypeError, match="float16, bfloat16 or float32"):
        triton_info_nce.forward(anchor, candidates, None, problem, compute_grad=False)
    with pytest.raises(TypeError, match="float16, bfloat16 or float32"):
        triton_info_nce.backward(torch.ones(4), anchor, candidates, None, problem, torch.zeros(1, 4))


def _count_launches(monkeypatch):
    """Records (direction, fused doc_to_query) per forward launch and per backward launch."""
    launches = {"forward": [], "backward": []}
    forward, backward = triton_info_nce.launch_forward, triton_info_nce.launch_backward

    def recording_forward(sweep, problem, cfg, col_sum=None):
        launches["forward"].append((sweep.direction, col_sum is not None))
        return forward(sweep, problem, cfg, col_sum)

    def recording_backward(sweep, problem, cfg, lse, g, g_scale, grad_q, grad_k, tau_dots, lse_rev=None):
        launches["backward"].append((sweep.direction, lse_rev is not None))
        return backward(sweep, problem, cfg, lse, g, g_scale, grad_q, grad_k, tau_dots, lse_rev=lse_rev)

    monkeypatch.setattr(triton_info_nce, "launch_forward", recording_forward)
    monkeypatch.setattr(triton_info_nce, "launch_backward", recording_backward)
    return launches


@pytest.mark.parametrize("variant,separate,tau,forward_launches,backward_launches", [
    # query_to_doc alone: one B x N x d sweep forward, one tile pass (3 products) backward.
    (dict(), False, 0.05, [(Q2D, False)], [(Q2D, False)]),
    # symmetric (either partition, any hardness), one process: doc_to_query rides on query_to_doc's tiles.
    (dict(symmetric=True, hardness_mode="in_batch_negatives", hardness_strength=2.0), False, 0.05,
     [(Q2D, True)], [(Q2D, True)]),
    (dict(directions=(Q2D, D2Q), partition_mode="joint"), False, 0.05, [(Q2D, True)], [(Q2D, True)]),
    # below tau = 0.025 the fixed max is unsafe: doc_to_query's B x B sweep in the forward only.
    (dict(symmetric=True), False, 0.02, [(Q2D, False), (D2Q, False)], [(Q2D, True)]),
    # distributed symmetric: the keys are every rank's anchors, doc_to_query sweeps them.
    (dict(symmetric=True), True, 0.05, [(Q2D, False), (D2Q, False)], [(Q2D, False), (D2Q, False)]),
    (GTE, False, 0.05, [(Q2D, True), (Q2Q, False), (D2D, False)], [(Q2D, True), (Q2Q, False), (D2D, False)]),
])
def test_launches_per_variant(monkeypatch, variant, separate, tau, forward_launches, backward_launches):
    """The fast paths keep their product counts (the module docstring's table): one forward and
    one backward sweep per direction, none for doc_to_query when the keys are the anchors."""
    launches = _count_launches(monkeypatch)
    anchor, positive, negative = _inputs(6, 1, 16, torch.float32, seed=71)
    candidates = torch.cat([positive, negative])
    keys = torch.cat([torch.randn(3, 16), anchor]) if separate else None
    problem = describe(anchor, candidates, tau, pos_start=0, neg_start=6, num_neg=1, normalize=True,
                       hard_negative_weight=0.5, variant=resolve_variant(num_neg=1, **variant), anchor_keys=keys,
                       anchor_start=3 if separate else 0)
    triton_info_nce.forward(anchor, candidates, keys, problem, compute_grad=True)
    assert launches["forward"] == forward_launches
    assert launches["backward"] == backward_launches


# --------------------------------------------------------------------------------------------
# The classic options (query_to_doc, symmetric), edge cases and numerics
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("normalize,symmetric,num_neg,weight,reduction", OPTION_CASES)
def test_options_fp32(normalize, symmetric, num_neg, weight, reduction):
    # 19 rows and up to 76 candidates: two row blocks and five column tiles of 16, the last ones partial.
    check_against_reference(19, num_neg, 24, normalize=normalize, symmetric=symmetric, weight=weight,
                            reduction=reduction, scale=1.0 if normalize else 0.15)


@pytest.mark.parametrize("tau,symmetric,reduction", TEMPERATURE_CASES)
def test_temperatures(tau, symmetric, reduction):
    check_against_reference(23, 1, 16, tau=tau, symmetric=symmetric, weight=0.3, reduction=reduction, seed=5)


@pytest.mark.parametrize("tau", [0.025, 0.01])
def test_reverse_direction_far_below_the_fixed_max(tau):
    # Anchors in the positive orthant, positives in the negative one: every reverse score is
    # <= 0, i.e. >= 1/tau below the fixed max. At tau = 0.025 (the fused path's limit) exp(s - M)
    # >= exp(-80) is still a normal fp32; at 0.01 it would be 0 and the column sweep must take over.
    gen = torch.Generator().manual_seed(31)
    anchor = torch.randn(18, 20, generator=gen).abs()
    positive = -torch.randn(18, 20, generator=gen).abs()
    positive[4] = -anchor[4]  # the exact opposite: s = -1/tau, the bound
    negative = torch.randn(18, 20, generator=gen)
    check_against_reference(18, 1, 20, tau=tau, symmetric=True, hardness_mode="all_negatives", hardness_strength=2.0,
                            reduction="none", tensors=(anchor, positive, negative))


@pytest.mark.parametrize("batch,num_neg,dim,symmetric", [
    (1, 0, 8, False),    # one candidate: loss 0, gradients 0
    (1, 2, 5, True),
    (17, 0, 7, True),
    (31, 1, 37, False),  # primes everywhere
])
def test_odd_shapes(batch, num_neg, dim, symmetric):
    check_against_reference(batch, num_neg, dim, symmetric=symmetric, weight=0.2 if num_neg else 0.0,
                            reduction="none", seed=batch)


@pytest.mark.parametrize("normalize", [True, False])
def test_dim_one(normalize):
    # d = 1: normalized scores are +-1/tau, so the signs are mixed to keep d(tau) away from 0
    # (with equal signs every logit ties and d(tau) = 0 up to rounding). With normalize the input
    # gradients are exactly 0 (x_hat = sign(x)) and the kernels leave fp32 rounding of
    # |d x_hat| / ||x|| ~ 1e-5: checked at the absolute 2e-4 (floor 1).
    anchor = torch.tensor([[1.5], [-0.7], [0.2]])
    positive = torch.tensor([[0.9], [-1.1], [-0.4]])
    negative = torch.tensor([[-2.0], [0.3], [0.8]])
    check_against_reference(3, 1, 1, normalize=normalize, weight=0.4, tau=0.1, reduction="none",
                            tensors=(anchor, positive, negative), floor=1.0, hardness_mode="in_batch_negatives",
                            hardness_strength=1.5, **GTE)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("normalize,symmetric,num_neg,reduction,tau", HALF_PRECISION_CASES)
def test_half_precision(dtype, normalize, symmetric, num_neg, reduction, tau):
    check_against_reference(18, num_neg, 40, dtype=dtype, tau=tau, normalize=normalize, symmetric=symmetric,
                            weight=HALF_PRECISION_WEIGHT, reduction=reduction, scale=1.0 if normalize else 0.15, seed=7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_large_dot_product_logits_do_not_overflow(dtype):
    # normalize=False with logits up to several hundred (1/tau = 100 and beyond): online softmax,
    # in every direction (the masked ones with their -inf cells too).
    check_against_reference(20, 1, 32, dtype=dtype, tau=0.01, normalize=False, scale=0.6, reduction="none",
                            seed=11, hardness_mode="all_negatives", hardness_strength=3.0, **GTE)


@pytest.mark.parametrize("variant", [dict(), dict(symmetric=True), dict(GTE, hardness_mode="all_negatives",
                                                                        hardness_strength=3.0)],
                         ids=["q2d", "symmetric", "gte"])
def test_zero_rows(variant):
    anchor, positive, negative = _inputs(12, 2, 24, torch.float32, seed=13)
    anchor[3] = 0.0
    positive[5] = 0.0
    negative[7, 1] = 0.0
    anchor[6] *= 5e-13 / anchor[6].norm()  # 0 < ||x|| < eps: x_hat = x / eps, no projection in the backward
    check_against_reference(12, 2, 24, weight=0.3, reduction="none", tensors=(anchor, positive, negative),
                            **variant)


def test_zero_rows_low_precision_loss_is_finite():
    anchor, positive, _ = _inputs(9, 0, 16, torch.bfloat16, seed=17)
    anchor[0] = 0.0
    positive[:4] = 0.0
    for variant in (dict(symmetric=True), GTE):
        loss = fastcse.info_nce(anchor, positive, reduction="none", backend="triton", **variant)
        ref = info_nce_reference(anchor.double(), positive.double(), reduction="none", **variant)
        _assert_close("loss", loss, ref, TOL[torch.bfloat16])


def test_duplicate_rows():
    anchor, positive, negative = _inputs(14, 1, 24, torch.float32, seed=19)
    anchor[9] = anchor[2]
    positive[9] = positive[2]       # two identical candidates: tied logits
    negative[4] = positive[4]       # a hard negative equal to its own positive
    check_against_reference(14, 1, 24, weight=0.5, reduction="none", tensors=(anchor, positive, negative),
                            hardness_mode="in_batch_negatives", hardness_strength=3.0, **GTE)


@pytest.mark.parametrize("dtype,batch,variant", [
    (torch.float32, 130, dict(symmetric=True)),
    (torch.float16, 130, dict(symmetric=True, hardness_mode="in_batch_negatives", hardness_strength=3.0)),
    (torch.float32, 70, dict(GTE, hardness_mode="hard_negatives", hardness_strength=3.0)),
], ids=["fp32-symmetric", "fp16-symmetric-hard", "fp32-gte"])
def test_production_block_sizes(dtype, batch, variant, monkeypatch):
    """The GPU tile configuration (64 x 64 / 64 x 32 tiles, 16/32-wide d chunks), masked at every edge."""
    small_config = triton_info_nce.select_config

    def gpu_config(dt, dim, **kw):
        return small_config(dt, dim, interpret=True, small=False)

    monkeypatch.setattr(triton_info_nce, "select_config", gpu_config)
    assert triton_info_nce.select_config(dtype, 80).fwd.block_m > 16
    # 130 rows: three row blocks of 64, the last of 2 rows; 260 candidates; d = 80: 3 or 5 chunks
    # (70 rows: two blocks, the last of 6).
    check_against_reference(batch, 1, 80, dtype=dtype, weight=0.3, reduction="none", seed=23, **variant)


@pytest.mark.parametrize("tau,fused", [(0.025, True), (0.0249, False)])
def test_fixed_max_path_selection(monkeypatch, tau, fused):
    """The atomics path is used exactly where exp(s - 1/tau) cannot underflow fp32, and at its edge
    (every reverse score at the bound -1/tau, exp(s - M) = exp(-80)) its reverse LSE is exact."""
    assert triton_info_nce._fixed_max_is_safe(True, tau) == fused
    assert not triton_info_nce._fixed_max_is_safe(False, 1.0)
    launches = _count_launches(monkeypatch)
    batch = 18
    anchor = torch.randn(1, 20).abs().expand(batch, 20).contiguous()  # all one direction
    candidates = torch.cat([-anchor, torch.randn(batch, 20)])  # positive i = -anchor i: s_rev = -1/tau
    problem = describe(anchor, candidates, tau, pos_start=0, neg_start=batch, num_neg=1, normalize=True,
                       hard_negative_weight=0.0, variant=resolve_variant(symmetric=True))
    _, lse, _ = triton_info_nce.forward(anchor, candidates, None, problem, compute_grad=False)
    assert launches["forward"] == ([(Q2D, True)] if fused else [(Q2D, False), (D2Q, False)])
    expected = torch.full((batch,), -1 / tau + math.log(batch), dtype=torch.float64)  # LSE of B equal terms
    _assert_close("lse_rev", lse[1], expected, 2e-4)


def test_column_splits_cover_every_tile_without_empty_splits():
    cpu_device = torch.device("cpu")
    seen = set()
    for row_blocks in range(1, 9):
        for tiles in range(1, 40):
            splits = triton_forward.column_splits(row_blocks, tiles, cpu_device)
            per = math.ceil(tiles / splits)
            assert 1 <= splits <= tiles
            assert (splits - 1) * per < tiles <= splits * per, (row_blocks, tiles, splits)
            seen.add(splits)
    assert seen == {1, 2, 3, 4}  # the interpreter aims at 4 programs: single and multi-split both occur


def test_no_tensor_of_batch_times_candidates_size():
    """Every tensor the launch code creates (statistics, partials, gradients) is O((B + N + M) d),
    for every direction (and doc_to_query's own sweep at a small tau)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class LargestTensor(TorchDispatchMode):
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    # Bytes: the interpreter hands kernels uint8 views of their arguments.
                    LargestTensor.largest = max(LargestTensor.largest, t.numel() * t.element_size())
            return out

    batch, num_neg, dim = 20, 3, 12  # N = 80 candidates: B N = 1600 > N d = 960
    anchor, positive, negative = _inputs(batch, num_neg, dim, torch.float32, seed=37)
    candidates = torch.cat([positive, negative.reshape(-1, dim)])
    variant = resolve_variant(num_neg=num_neg, hardness_mode="in_batch_negatives", hardness_strength=2.0, **GTE)
    problem = describe(anchor, candidates, 0.01, pos_start=0, neg_start=batch, num_neg=num_neg, normalize=True,
                       hard_negative_weight=0.5, variant=variant)
    with LargestTensor():
        _, lse, grads = triton_info_nce.forward(anchor, candidates, None, problem, compute_grad=True)
        triton_info_nce.backward(torch.ones(batch), anchor, candidates, None, problem, lse)
    assert grads is not None
    # The largest is d(candidates), [N, d] fp32; a score block would be B N fp32 (1.7x more).
    assert LargestTensor.largest == candidates.numel() * 4, LargestTensor.largest


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("variant,reduction", [
    (dict(), "none"),
    (dict(symmetric=True), "mean"),
    (dict(GTE, hardness_mode="all_negatives", hardness_strength=3.0), "none"),
], ids=["q2d", "symmetric", "gte"])
def test_zero_and_tiny_rows_half_precision_gradients(dtype, variant, reduction):
    """A zero row and rows of norm 4e-5 in 16-bit inputs: every gradient row matches the fp64
    reference (1 / ||x|| up to 1e12 never multiplies a 16-bit operand of the gradient products)."""
    anchor, positive, negative = _inputs(12, 2, 24, torch.float32, seed=41)
    for x, row in ((anchor, 3), (positive, 5), (negative[7], 1)):
        x[row] = 0.0
    for x, row in ((anchor, 6), (positive, 8), (negative[2], 0)):
        x[row] *= 4e-5 / x[row].norm()
    tensors = [x.to(dtype) for x in (anchor, positive, negative)]
    upstream = torch.rand(12) + 0.5 if reduction == "none" else torch.tensor(1.0)
    options = dict(hard_negative_weight=0.3, reduction=reduction, **variant)
    loss, grads = _loss_and_grads(fastcse.info_nce, tensors, 0.05, upstream, backend="triton", **options)
    ref_loss, ref_grads = _loss_and_grads(info_nce_reference, tensors, 0.05, upstream.double(),
                                          dtype=torch.float64, **options)
    _assert_close("loss", loss, ref_loss, TOL[dtype])
    for name, got, want, rows in zip(("anchor", "positive", "negative"), grads, ref_grads, (12, 12, 24)):
        _assert_rows_close(f"d{name}", got, want, TOL[dtype], range(rows))
    _assert_close("dtemperature", grads[3], ref_grads[3], TOL[dtype])
