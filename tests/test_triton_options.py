"""The Triton kernels of Matryoshka (``fastcse.triton_matryoshka``), through the interpreter.

Every loss and gradient against ``info_nce_reference`` in fp64 (``fastcse.testing``'s harness),
on a small grid: dimensions not aligned with the 16-wide d chunks (d = 40 with (40, 3) and
(40, 39, 21, 5, 1)), the directions and partition modes, hardness, hard negatives and their
weight, group ids, labels, a queue, no normalization, 16-bit inputs, zero and tiny rows, the
recomputing backward (reduction="none"), the false-negative rule (self-guided and guided), and
the distributed layout through the backend contract (against the CPU backend, the executable
spec, on the same problem).
"""

from __future__ import annotations

import pytest
import torch

from fastcse import cpu, triton_info_nce
from fastcse.problem import DIRECTIONS, describe, resolve_variant
from fastcse.testing import FLOOR, assert_close, check_against_reference, draw_inputs

pytestmark = pytest.mark.filterwarnings("ignore:divide by zero encountered in log:RuntimeWarning")

Q2D, Q2Q, D2Q, D2D = DIRECTIONS
GTE = dict(directions=(Q2D, Q2Q, D2Q, D2D), partition_mode="joint")


@pytest.mark.parametrize("dims, weights, reduction", [
    ((40, 3), None, "mean"),
    ((40, 39, 21, 5, 1), (1.0, 0.5, 2.0, 0.25, 0.1), "none"),  # a boundary inside every chunk; recompute
    ((16, 32), (0.3, 1.0), "sum"),  # boundaries on the chunks', d itself not listed
])
def test_dimensions_not_aligned_with_the_chunks(dims, weights, reduction):
    check_against_reference(9, 2, 40, seed=3, weight=0.4, reduction=reduction, matryoshka_dims=dims,
                            matryoshka_weights=weights)


@pytest.mark.parametrize("options", [
    dict(symmetric=True, hardness_mode="in_batch_negatives", hardness_strength=3.0),
    dict(GTE, hardness_mode="all_negatives", hardness_strength=2.0),
    dict(directions=(Q2D, D2Q), partition_mode="per_direction", reduction="none"),
    dict(directions=(Q2D, D2D), hardness_mode="hard_negatives", hardness_strength=3.0),
], ids=["symmetric-hard", "gte", "per_direction", "q2d+d2d"])
def test_variants(options):
    check_against_reference(11, 2, 24, seed=5, weight=0.5, matryoshka_dims=(24, 13, 4), **options)


@pytest.mark.parametrize("kind", ["group_ids", "labels", "queue"])
def test_row_options(kind):
    ids = torch.arange(10) // 2
    extra = dict(group_ids=ids, symmetric=True) if kind == "group_ids" else dict(labels=ids) if kind == "labels" \
        else dict(queue=5)
    check_against_reference(10, 1, 24, seed=7, matryoshka_dims=(20, 7), matryoshka_weights=(1.0, 0.5), **extra)


def test_without_normalization():
    check_against_reference(9, 1, 24, seed=9, scale=0.2, normalize=False, symmetric=True, reduction="none",
                            matryoshka_dims=(24, 10, 3))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(dtype):
    check_against_reference(9, 1, 24, dtype=dtype, seed=11, symmetric=True, matryoshka_dims=(24, 16, 5))


def test_zero_and_tiny_rows():
    tensors = draw_inputs(12, 2, 24, torch.float32, 41, special_rows=True)
    check_against_reference(12, 2, 24, tensors=tensors, weight=0.3, reduction="none", matryoshka_dims=(24, 9, 2))


@pytest.mark.parametrize("rank", [0, 1])
def test_distributed_layout_as_the_cpu_backend(rank):
    """A rank's problem (its anchors against every rank's candidates and anchor keys), both backends:
    row losses, LSEs and every gradient (the fused forward and the backward) agree."""
    sizes, num_neg, dim = [5, 7], 1, 24
    gen = torch.Generator().manual_seed(13)
    anchor = torch.randn(sum(sizes), dim, generator=gen)
    positive = anchor + 0.8 * torch.randn(sum(sizes), dim, generator=gen)
    negative = anchor + 1.2 * torch.randn(sum(sizes), dim, generator=gen)
    start, batch, total = sum(sizes[:rank]), sizes[rank], sum(sizes)
    candidates = torch.cat([positive, negative])
    local = anchor[start:start + batch].clone()
    variant = resolve_variant(num_neg=num_neg, symmetric=True, hardness_mode="in_batch_negatives",
                              hardness_strength=2.0)
    problem = describe(local, candidates, 0.05, pos_start=start, neg_start=total + start, num_neg=num_neg,
                       normalize=True, hard_negative_weight=0.3, variant=variant, anchor_keys=anchor,
                       anchor_start=start,
                       matryoshka_dims=(9, 24), matryoshka_weights=(0.5, 1.0))
    grad_rows = torch.rand(batch, generator=gen) + 0.5
    want = cpu.forward(local, candidates, anchor, problem, compute_grad=True)
    got = triton_info_nce.forward(local, candidates, anchor, problem, compute_grad=True)
    assert_close("row_loss", got[0], want[0], 2e-4)
    assert_close("lse", got[1], want[1], 2e-4)
    back_want = cpu.backward(grad_rows, local, candidates, anchor, problem, want[1])
    back_got = triton_info_nce.backward(grad_rows, local, candidates, anchor, problem, got[1])
    for kind, g, w in [("fused", got[2], want[2]), ("backward", back_got, back_want)]:
        for name, a, b in zip(("d(anchor)", "d(candidates)", "d(anchor keys)", "d(tau)"), g, w):
            assert_close(f"{kind} {name}", a, b, 2e-4, FLOOR)


@pytest.mark.parametrize("guided", [False, True], ids=["self", "guide"])
def test_false_negatives_per_dimension(guided):
    """The false-negative rule in every dimension: self-guided on each dimension's own similarity
    (thresholds [D, B]), or a guide's cells (its own width, one tile per key tile) for all of them;
    with hard negatives, a weight, ids and several directions, both backward paths. (Not dimension
    1 self-guided: there the relative rule leaves out all but the targets, and fp32's rounding
    in the 1-wide prefix norm's backward, amplified by 1 / |x_1|, exceeds the tolerance on either
    backend; the CPU tests cover it in fp64.)"""
    tensors = draw_inputs(10, 2, 40, torch.float32, 17)
    ids = torch.arange(10) // 2
    if guided:
        gen = torch.Generator().manual_seed(19)
        guide = tuple(x[..., :6].double() + 0.3 * torch.randn(*x.shape[:-1], 6, generator=gen, dtype=torch.float64)
                      for x in tensors)
        options = dict(GTE, labels=ids, guide=guide, false_negative_margin=0.1, matryoshka_dims=(40, 3),
                       reduction="mean")
    else:
        options = dict(symmetric=True, group_ids=ids, false_negative_margin=0.3, margin_strategy="relative",
                       matryoshka_dims=(40, 39, 21, 5), reduction="none")
    check_against_reference(10, 2, 40, tensors=tensors, seed=17, weight=0.4, **options)
