"""Matryoshka dimensions in fastcse.info_nce (CPU backend, one sweep over the coordinates) against
the reference's per-dimension loop: every option, dtypes, dimensions that do not align with the
segments' sizes, errors, torch.compile, the op's schema, and a 2-rank gloo world. Property tests
draw every option together, with and without Matryoshka, on the CPU (fp64) and the Triton (fp32)
backends and on 2 gloo ranks (fp64). None in 16 bits: drawn cases include gradients that are 0
up to the rounding of large cancelling terms (d = 1; one row whose two keys tie), which no
tolerance relative to the result can judge; the 16-bit tests here and in test_loss.py use
typical shapes."""

from __future__ import annotations

import datetime
import itertools
import random
import traceback

import pytest
import torch
import torch.distributed as dist
from hypothesis import given, settings
from hypothesis import strategies as st
from spawn_world import spawn_world
from test_loss import TOL, check_against_reference, make_inputs
from test_loss_variants import VARIANTS

import fastcse
from fastcse import cpu, cpu_matryoshka, info_nce, info_nce_reference
from fastcse.false_negatives import MARGIN_STRATEGIES
from fastcse.matryoshka import check_dims
from fastcse.problem import HARDNESS_MODES
from fastcse.testing import assert_compiles_like_eager

ALL_DIRECTIONS = ("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc")

# Each option of the loss at least once, hard negatives 0 / 1 / several.
OPTION_GRID = [
    dict(num_neg=0),
    dict(num_neg=1, hard_negative_weight=0.7),
    dict(num_neg=3, hard_negative_weight=-1.2, symmetric=True),
    dict(num_neg=1, directions=ALL_DIRECTIONS, partition_mode="joint", hardness_mode="all_negatives",
         hardness_strength=2.0),
    dict(num_neg=2, directions=("query_to_doc", "doc_to_query"), partition_mode="per_direction",
         hardness_mode="in_batch_negatives", hardness_strength=3.0, hard_negative_weight=0.4),
    dict(num_neg=1, hardness_mode="hard_negatives", hardness_strength=1.5),
    dict(num_neg=1, directions=("query_to_doc", "query_to_query", "doc_to_doc"), group_ids=True),
    dict(num_neg=1, labels=True, hardness_mode="all_negatives", hardness_strength=2.0),
    dict(num_neg=1, extra_negatives=4, symmetric=True),
    dict(num_neg=1, normalize=False, temperature=1.0),
]


def _option_id(options):
    return "-".join(f"{k}={v}" for k, v in options.items() if k != "directions") or "plain"


def _realize(options, batch, dim, dtype, seed=0):
    """(inputs, keywords) of an OPTION_GRID entry: ids and extra negatives drawn here."""
    options = dict(options)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    anchor, positive, negative = make_inputs(batch, dim, options.pop("num_neg"), dtype)
    if options.pop("group_ids", False):
        options["group_ids"] = torch.randint(0, batch // 2, (batch,), generator=gen)
    if options.pop("labels", False):
        options["labels"] = torch.randint(0, batch // 2, (batch,), generator=gen)
    if "extra_negatives" in options:
        options["extra_negatives"] = torch.randn(options["extra_negatives"], dim, generator=gen).to(dtype)
    return (anchor, positive, negative), options


@pytest.mark.parametrize("learnable_tau", [False, True], ids=["tau_float", "tau_tensor"])
@pytest.mark.parametrize("options", OPTION_GRID, ids=_option_id)
def test_options_match_reference(options, learnable_tau):
    """Every option x each reduction, fp64 to 1e-10 and fp32, unsorted dims without d, weights."""
    for reduction, dtype in itertools.product(("mean", "sum", "none"), (torch.float64, torch.float32)):
        (anchor, positive, negative), kwargs = _realize(options, 10, 12, dtype)
        tau = kwargs.pop("temperature", 0.07)
        temperature = torch.tensor(tau, dtype=dtype) if learnable_tau else tau
        check_against_reference(anchor, positive, negative, temperature, reduction=reduction,
                                matryoshka_dims=(3, 11, 6), matryoshka_weights=(0.5, 1.0, 2.0), **kwargs)


@pytest.mark.parametrize("dims", [(40, 3), (40, 39, 21, 5, 1), (1,), (17, 33), (21, 40, 5, 39, 1)],
                         ids=lambda d: ",".join(map(str, d)))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_dimensions_off_the_block_sizes(dims, dtype):
    """d = 40 with dimensions of every size (1, odd, d - 1), in any order, d listed or not."""
    anchor, positive, negative = make_inputs(13, 40, 2, dtype)
    for reduction in ("mean", "none"):
        check_against_reference(anchor, positive, negative, 0.05, reduction=reduction, hard_negative_weight=0.3,
                                symmetric=True, matryoshka_dims=dims)


def test_zero_prefixes():
    """A row whose first coordinates are all zero: that prefix's norm is the constant eps (as
    F.normalize), so its logits are 0 and its gradient finite, in every dimension alike."""
    anchor, positive, negative = make_inputs(8, 12, 1, torch.float64)
    anchor[0, :5] = 0.0
    positive[3, :5] = 0.0
    negative[5, 0, :] = 0.0
    check_against_reference(anchor, positive, negative, 0.1, reduction="none", symmetric=True,
                            matryoshka_dims=(12, 5, 2))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16_bit_inputs(dtype):
    anchor, positive, negative = make_inputs(12, 24, 1, dtype)
    check_against_reference(anchor, positive, negative, hard_negative_weight=0.4, hardness_mode="all_negatives",
                            hardness_strength=2.0, directions=ALL_DIRECTIONS, partition_mode="joint",
                            matryoshka_dims=(24, 16, 8, 4))


@pytest.mark.parametrize("options", [
    dict(),
    dict(symmetric=True, hard_negative_weight=0.5, reduction="none"),
    dict(normalize=False, reduction="sum"),
    dict(directions=ALL_DIRECTIONS, partition_mode="joint"),  # (the hardness penalty has no gradient by design)
])
def test_gradcheck_fp64(options):
    anchor, positive, negative = make_inputs(5, 7, 2, torch.float64)
    tau = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    leaves = [t.requires_grad_() for t in (anchor, positive, negative)]
    assert torch.autograd.gradcheck(
        lambda a, p, n, t: info_nce(a, p, n, temperature=t, matryoshka_dims=(7, 2, 5), matryoshka_weights=(1, .5, 2),
                                    **options), (*leaves, tau))


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_multiple_chunks(monkeypatch, reduction):
    """Several row chunks (the block budget shrunk) and column tiles (a ragged last one), both the
    unshifted and the row-max paths."""
    monkeypatch.setattr(cpu, "BLOCK_BYTES", 4 * 40 * 3 * 5)  # 3 rows of 40 candidates' 4 blocks + 1
    monkeypatch.setattr(cpu, "MIN_ROWS", 1)
    monkeypatch.setattr(cpu_matryoshka, "TILE_BYTES", 4 * 3 * 7)  # 7 columns of 3 rows: 6 tiles of 40
    anchor, positive, negative = make_inputs(20, 9, 1)
    for tau in (0.05, 0.01):
        check_against_reference(anchor, positive, negative, tau, reduction=reduction, hard_negative_weight=0.4,
                                group_ids=torch.arange(20) % 7, matryoshka_dims=(9, 4, 2, 1))


def test_chunk_rows_shrink_with_the_dimensions():
    """D raw blocks and a working block per direction live at once: D + 1 times fewer rows."""
    from fastcse.cpu_matryoshka import _MatryoshkaOperands
    from fastcse.problem import describe

    anchor, positive, _ = make_inputs(4096, 8, 0)
    problem = describe(anchor, positive, 0.05, pos_start=0, neg_start=0, num_neg=0, normalize=True,
                       hard_negative_weight=0.0, matryoshka_dims=(2, 4, 8), matryoshka_weights=(1.0, 1.0, 1.0))
    operands = _MatryoshkaOperands(anchor, positive, None, None, problem, with_grads=False)
    assert operands.rows == cpu._rows_per_chunk(4096, 4096 * 4)


def test_one_full_dimension_is_the_plain_loss():
    anchor, positive, negative = make_inputs(9, 8, 1, torch.float64)
    plain = info_nce(anchor, positive, negative, hard_negative_weight=0.5, reduction="none")
    fused = info_nce(anchor, positive, negative, hard_negative_weight=0.5, reduction="none", matryoshka_dims=[8])
    torch.testing.assert_close(fused, plain, rtol=1e-12, atol=1e-12)


def test_weights_scale_each_dimension():
    anchor, positive, _ = make_inputs(7, 10, 0, torch.float64)
    per_dim = {m: info_nce(anchor, positive, matryoshka_dims=(m,)) for m in (10, 3)}
    fused = info_nce(anchor, positive, matryoshka_dims=(3, 10), matryoshka_weights=(2.0, -0.5))
    torch.testing.assert_close(fused, 2.0 * per_dim[3] - 0.5 * per_dim[10], rtol=1e-12, atol=1e-12)


def test_products_stay_one_sweep():
    """matrix_products: the plain row sweep's products (one sweep over the widest dimension)."""
    from fastcse.problem import describe, resolve_variant

    anchor, positive, negative = make_inputs(6, 8, 1, neg_2d=True)
    candidates = torch.cat([positive, negative])
    variant = resolve_variant(directions=ALL_DIRECTIONS, partition_mode="joint")
    plain = describe(anchor, candidates, 0.05, pos_start=0, neg_start=6, num_neg=1, normalize=True,
                     hard_negative_weight=0.0, variant=variant)
    fused = describe(anchor, candidates, 0.05, pos_start=0, neg_start=6, num_neg=1, normalize=True,
                     hard_negative_weight=0.0, variant=variant, matryoshka_dims=(2, 4, 8),
                     matryoshka_weights=(1.0, 1.0, 1.0))
    assert cpu.matrix_products(fused) == cpu.matrix_products(plain)
    assert cpu.matrix_products(fused, grad_in_forward=False) == cpu.matrix_products(plain, grad_in_forward=False)


def test_no_grad_forward():
    anchor, positive, negative = make_inputs(10, 8, 1)
    with torch.no_grad():
        loss = info_nce(anchor, positive, negative, matryoshka_dims=(8, 2))
    want = info_nce_reference(anchor.double(), positive.double(), negative.double(), matryoshka_dims=(8, 2))
    torch.testing.assert_close(loss.double(), want, rtol=2e-4, atol=2e-4)


def test_module_takes_the_keywords():
    module = fastcse.InfoNCE(temperature=torch.nn.Parameter(torch.tensor(0.05)), symmetric=True,
                             matryoshka_dims=(8, 4), matryoshka_weights=(1.0, 0.5))
    anchor, positive, _ = make_inputs(8, 8, 0)
    loss = module(anchor, positive)
    loss.backward()
    assert module.temperature.grad is not None and torch.isfinite(module.temperature.grad)
    ref = info_nce_reference(anchor, positive, temperature=torch.tensor(0.05), symmetric=True,
                             matryoshka_dims=(8, 4), matryoshka_weights=(1.0, 0.5))
    torch.testing.assert_close(loss, ref, rtol=2e-4, atol=2e-4)
    assert "matryoshka_dims=(8, 4)" in repr(module)
    with pytest.raises(ValueError, match="matryoshka_dims must be distinct"):
        fastcse.InfoNCE(matryoshka_dims=(4, 4))
    with pytest.raises(ValueError, match="matryoshka_dims must hold positive ints"):
        fastcse.InfoNCE(matryoshka_dims=(4, 0))


def test_torch_compile_fullgraph():
    anchor, positive, negative = make_inputs(12, 8, 1)

    def step(a, p, n):
        return info_nce(a, p, n, hard_negative_weight=0.2, matryoshka_dims=(8, 5, 2)) * 2.0

    assert_compiles_like_eager(step, (anchor, positive, negative))


def test_custom_op_passes_opcheck():
    from fastcse.ops import info_nce_op, op_arguments
    from fastcse.problem import describe, resolve_variant

    anchor, positive, negative = make_inputs(6, 5, 1, neg_2d=True)
    candidates = torch.cat([positive, negative])
    variant = resolve_variant(directions=ALL_DIRECTIONS, partition_mode="joint")
    for grad_in_forward, reduction in [(True, "mean"), (False, "none")]:
        problem = describe(anchor, candidates, None, pos_start=0, neg_start=6, num_neg=1, normalize=True,
                           hard_negative_weight=0.3, variant=variant, matryoshka_dims=(2, 5),
                           matryoshka_weights=(0.5, 1.0))
        args = op_arguments(problem, anchor.requires_grad_(), candidates.requires_grad_(), torch.tensor(0.05),
                            reduction=reduction, grad_in_forward=grad_in_forward, backend="cpu")
        torch.library.opcheck(info_nce_op, args, test_utils=("test_schema", "test_faketensor",
                                                             "test_autograd_registration"))


@pytest.mark.parametrize("dims,weights,error,match", [
    ((), None, ValueError, "at least one dimension"),
    ((8, 0), None, ValueError, r"ints in \[1, 8\]"),
    ((9,), None, ValueError, r"ints in \[1, 8\]"),
    ((4, 2.0), None, ValueError, r"ints in \[1, 8\]"),
    ((True,), None, ValueError, r"ints in \[1, 8\]"),
    ((4, 8, 4), None, ValueError, "must be distinct"),
    ("8", None, TypeError, "sequence of ints"),
    (8, None, TypeError, "sequence of ints"),
    ((8, 4), (1.0,), ValueError, r"one number per dimension \(2\)"),
    ((8, 4), (1.0, float("nan")), ValueError, r"matryoshka_weights\[1\] must be a finite number"),
    (None, (1.0,), ValueError, "without matryoshka_dims"),
])
def test_bad_dimensions(dims, weights, error, match):
    anchor, positive, _ = make_inputs(4, 8, 0)
    with pytest.raises(error, match=match):
        info_nce(anchor, positive, matryoshka_dims=dims, matryoshka_weights=weights)
    with pytest.raises(error, match=match):
        info_nce_reference(anchor, positive, matryoshka_dims=dims, matryoshka_weights=weights)


def test_canonical_form_is_ascending():
    assert check_dims([64, 768, 256], [1, 2, 3], 768) == ((64, 256, 768), (1.0, 3.0, 2.0))
    assert check_dims(None, None, 768) == ((), ())


def test_triton_backend_computes_it():
    # The Triton kernels implement it (tests/test_triton_options.py covers them): no refusal, and
    # the CPU backend's value.
    anchor, positive, _ = make_inputs(4, 8, 0)  # TRITON_INTERPRET=1 (conftest): the backend is reachable
    got = info_nce(anchor, positive, backend="triton", matryoshka_dims=(8, 4))
    want = info_nce(anchor, positive, backend="cpu", matryoshka_dims=(8, 4))
    assert torch.allclose(got, want, rtol=2e-5, atol=1e-6)


# ---------------------------------------------------------------- false negatives by similarity
# Each dimension's loss with the rule (fastcse.false_negatives): self-guided on that dimension's
# own similarity (prefix cosine, or dot product), a guide (never truncated) for every dimension.
FALSE_NEGATIVE_CASES = [
    dict(num_neg=2, hard_negative_weight=0.6, margin=0.3, strategy="absolute", reduction="mean"),
    dict(num_neg=1, symmetric=True, group_ids=True, margin=0.5, strategy="relative", reduction="none"),
    dict(num_neg=1, directions=ALL_DIRECTIONS, partition_mode="joint", hardness_mode="all_negatives",
         hardness_strength=2.0, labels=True, margin=-0.1, strategy="absolute", reduction="sum"),
    dict(num_neg=2, directions=("query_to_doc", "doc_to_query"), partition_mode="per_direction",
         hardness_mode="hard_negatives", hardness_strength=3.0, extra_negatives=5, margin=0.4,
         strategy="relative", reduction="none"),
    dict(num_neg=1, normalize=False, temperature=1.0, extra_negatives=3, margin=2.0, strategy="absolute",
         reduction="mean"),
]


def _guide_rows(x: torch.Tensor, seed: int, width: int = 5) -> torch.Tensor:
    """A guide model's view of rows: a projection to its own width plus noise (correlated with x)."""
    gen = torch.Generator().manual_seed(seed)
    projection = torch.randn(x.shape[-1], width, generator=gen, dtype=torch.float64)
    return x.double() @ projection + 0.3 * torch.randn(*x.shape[:-1], width, generator=gen, dtype=torch.float64)


def _false_negative_case(case, guided, batch, dim, dtype, seed=0):
    """(inputs, keywords) of a FALSE_NEGATIVE_CASES entry, self-guided or with a guide."""
    case = dict(case)
    rule = dict(false_negative_margin=case.pop("margin"), margin_strategy=case.pop("strategy"))
    (anchor, positive, negative), options = _realize(case, batch, dim, dtype, seed)
    if guided:
        rule["guide"] = tuple(_guide_rows(x, i) for i, x in enumerate((anchor, positive, negative)) if x is not None)
        if "extra_negatives" in options:
            rule["guide_extra_negatives"] = _guide_rows(options["extra_negatives"], 9)
    return (anchor, positive, negative), dict(options, **rule)


@pytest.mark.parametrize("guided", [False, True], ids=["self", "guide"])
@pytest.mark.parametrize("case", FALSE_NEGATIVE_CASES, ids=_option_id)
def test_false_negatives_match_reference(case, guided):
    """fp64 to 1e-10 and fp32, d = 40 with dimensions off the block sizes (one of them 1)."""
    for dtype, dims in [(torch.float64, (40, 39, 21, 5, 1)), (torch.float32, (40, 3))]:
        (anchor, positive, negative), kwargs = _false_negative_case(case, guided, 11, 40, dtype)
        tau = kwargs.pop("temperature", 0.1)
        check_against_reference(anchor, positive, negative, tau, matryoshka_dims=dims, **kwargs)
    # The rule does leave keys out here (the cases are not the plain loss).
    without = {k: v for k, v in kwargs.items() if k not in ("false_negative_margin", "margin_strategy", "guide",
                                                            "guide_extra_negatives")}
    assert not torch.allclose(info_nce(anchor, positive, negative, temperature=tau, matryoshka_dims=(40, 3), **kwargs),
                              info_nce(anchor, positive, negative, temperature=tau, matryoshka_dims=(40, 3), **without))


@pytest.mark.parametrize("guided", [False, True], ids=["self", "guide"])
def test_false_negatives_over_several_chunks(monkeypatch, guided):
    """Several row chunks: a guide's cells are computed once per chunk and direction, and reused."""
    monkeypatch.setattr(cpu, "BLOCK_BYTES", 4 * 40 * 3 * 5)
    monkeypatch.setattr(cpu, "MIN_ROWS", 1)
    case = dict(FALSE_NEGATIVE_CASES[1], reduction="mean")
    (anchor, positive, negative), kwargs = _false_negative_case(case, guided, 20, 9, torch.float64)
    for reduction in ("mean", "none"):
        check_against_reference(anchor, positive, negative, 0.05, matryoshka_dims=(9, 4, 2, 1),
                                **dict(kwargs, reduction=reduction))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("guided", [False, True], ids=["self", "guide"])
def test_false_negatives_16_bit_inputs(dtype, guided):
    (anchor, positive, negative), kwargs = _false_negative_case(FALSE_NEGATIVE_CASES[2], guided, 12, 24, dtype)
    check_against_reference(anchor, positive, negative, matryoshka_dims=(24, 16, 8, 4), **kwargs)


def test_false_negatives_gradcheck_fp64():
    """With a guide (its cells do not move under gradcheck's perturbations): every input, the queue, tau."""
    anchor, positive, negative = (t.requires_grad_() for t in make_inputs(6, 7, 1, torch.float64))
    queue = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    tau = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    guide = tuple(_guide_rows(x.detach(), i) for i, x in enumerate((anchor, positive, negative)))
    rule = dict(false_negative_margin=0.2, guide=guide, guide_extra_negatives=_guide_rows(queue.detach(), 9))

    def loss(a, p, n, q, t):
        return info_nce(a, p, n, temperature=t, extra_negatives=q, reduction="none", symmetric=True,
                        matryoshka_dims=(7, 2, 5), matryoshka_weights=(1, .5, 2), **rule)

    assert torch.autograd.gradcheck(loss, (anchor, positive, negative, queue, tau))


# The drawn cases' false-negative margins: away from 0, because at d = 1 every cosine is +-1 and
# a key exactly at its threshold is decided by rounding (docs/loss.md), so the reference's order
# of operations could differ.
DRAWN_MARGINS = (-0.15, 0.1, 0.3, 0.55)
_RANDOM_CASES = dict(
    data=st.data(), batch=st.integers(1, 10), dim=st.integers(1, 20), num_neg=st.integers(0, 3),
    variant=st.sampled_from(VARIANTS), hardness_mode=st.sampled_from((None,) + HARDNESS_MODES),
    ids=st.sampled_from([None, "group_ids", "labels"]), num_extra=st.integers(0, 3),
    rule=st.sampled_from([None, "self", "guide"]), normalize=st.booleans(), tau=st.floats(0.02, 1.0),
    reduction=st.sampled_from(["mean", "sum", "none"]), matryoshka=st.booleans(), seed=st.integers(0, 2**16))


def _random_case(data, batch, dim, num_neg, variant, hardness_mode, ids, num_extra, rule, normalize, tau,
                 reduction, matryoshka, seed, dtype):
    """(inputs, keywords) of one drawn case: every option drawn together (false negatives
    self-guided or guided) with random Matryoshka dimensions (any order, weights or not), or
    without Matryoshka: the plain loss over the same option space."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    anchor, positive, negative = make_inputs(batch, dim, num_neg, dtype)
    kwargs = dict(variant, temperature=tau, hardness_mode=hardness_mode, hardness_strength=2.0, normalize=normalize,
                  reduction=reduction)
    # A dimension of 1 has an exact gradient of 0, which the one pass gets as the rounding of two
    # cancelling terms of size 1/(tau |x_0|) (docs/loss.md): drawn in fp64 only.
    smallest = 1 if dtype == torch.float64 else 2
    if matryoshka and dim >= smallest:
        dims = data.draw(st.lists(st.integers(smallest, dim), min_size=1, max_size=5, unique=True), label="dims")
        weights = data.draw(st.none() | st.lists(st.floats(0.1, 3.0), min_size=len(dims), max_size=len(dims)),
                            label="weights")
        kwargs.update(matryoshka_dims=tuple(dims), matryoshka_weights=None if weights is None else tuple(weights))
    if num_neg:
        kwargs["hard_negative_weight"] = 0.5
    if ids is not None:
        kwargs[ids] = torch.randint(0, max(1, batch // 2), (batch,), generator=gen)
    if num_extra:
        kwargs["extra_negatives"] = torch.randn(num_extra, dim, generator=gen, dtype=torch.float64).to(dtype)
    if rule is not None:
        kwargs.update(false_negative_margin=data.draw(st.sampled_from(DRAWN_MARGINS), label="margin"),
                      margin_strategy=data.draw(st.sampled_from(MARGIN_STRATEGIES), label="strategy"))
    if rule == "guide":
        kwargs["guide"] = tuple(_guide_rows(x, i) for i, x in enumerate((anchor, positive, negative)) if x is not None)
        if num_extra:
            kwargs["guide_extra_negatives"] = _guide_rows(kwargs["extra_negatives"], 9)
    return (anchor, positive, negative), kwargs


@settings(max_examples=60, deadline=None)
@given(chunked=st.booleans(), **_RANDOM_CASES)
def test_property_every_option_matches_reference(chunked, **case):
    """CPU, fp64 to 1e-10 against the reference, over one row chunk or several."""
    (anchor, positive, negative), kwargs = _random_case(**case, dtype=torch.float64)
    with pytest.MonkeyPatch.context() as patch:
        if chunked:  # a few rows a chunk: several chunks, of a few columns a tile
            candidates = (2 + case["num_neg"]) * case["batch"] + case["num_extra"]
            patch.setattr(cpu, "BLOCK_BYTES", 8 * 3 * candidates)
            patch.setattr(cpu, "MIN_ROWS", 1)
            patch.setattr(cpu_matryoshka, "TILE_BYTES", 8 * 3 * 5)
        check_against_reference(anchor, positive, negative, **kwargs)


@settings(max_examples=12, deadline=None)
@given(**_RANDOM_CASES)
def test_property_triton_matches_reference(**case):
    """The Triton kernels (through the interpreter), fp32, on the same drawn cases."""
    (anchor, positive, negative), kwargs = _random_case(**case, dtype=torch.float32)
    check_against_reference(anchor, positive, negative, backend="triton", **kwargs)


def _prefix_disagreement_inputs(dtype):
    """Row 0's key p1 is its positive's twin on the first 2 coordinates (cosine 1) and orthogonal to
    anchor 0 on all 4 (cosine 0): with m = 0.5 the self-guided rule leaves p1 out of row 0 at
    dimension 2 only."""
    anchor = torch.tensor([[1.0, 0, 1, 0], [1, 0, -1, 0], [0, 1, 0, 1]], dtype=dtype)
    return anchor, anchor.clone()


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_self_guided_left_out_set_differs_across_dimensions(backend):
    """Each dimension applies its own rule: the rule changes row 0's dimension-2 loss, not its
    dimension-4 loss, and the fused call is their sum (one mask for both would get either wrong)."""
    dtype = torch.float64 if backend == "cpu" else torch.float32
    anchor, positive = _prefix_disagreement_inputs(dtype)
    options = dict(reduction="none", temperature=0.5, backend=backend)
    rule = dict(false_negative_margin=0.5)
    per_dimension = {m: (info_nce(anchor[:, :m], positive[:, :m], **options, **rule),
                         info_nce(anchor[:, :m], positive[:, :m], **options)) for m in (2, 4)}
    with_rule, without = per_dimension[2]
    assert with_rule[0] < without[0] - 0.1  # p1 left out of row 0 at dimension 2
    with_rule, without = per_dimension[4]
    torch.testing.assert_close(with_rule[0], without[0])  # and kept at dimension 4
    fused = info_nce(anchor, positive, matryoshka_dims=(4, 2), **options, **rule)
    torch.testing.assert_close(fused, per_dimension[2][0] + per_dimension[4][0])
    torch.testing.assert_close(fused.double(), info_nce_reference(anchor.double(), positive.double(),
                                                                  matryoshka_dims=(4, 2), reduction="none",
                                                                  temperature=0.5, **rule))


# A split of keys without a cell has LSE log(0) = -inf: numpy warns in the interpreter.
@pytest.mark.filterwarnings("ignore:divide by zero encountered in log:RuntimeWarning")
@pytest.mark.parametrize("guided", [False, True], ids=["self", "guide"])
def test_false_negatives_on_the_triton_backend(guided):
    """The interpreted kernels: hard negatives, a queue (a guide's rows of it), labels or groups."""
    case = dict(num_neg=2, hard_negative_weight=0.6, extra_negatives=4, margin=0.3, strategy="absolute",
                reduction="none", **(dict(labels=True) if guided else dict(symmetric=True, group_ids=True)))
    (anchor, positive, negative), kwargs = _false_negative_case(case, guided, 9, 40, torch.float32)
    check_against_reference(anchor, positive, negative, torch.tensor(0.1), backend="triton",
                            matryoshka_dims=(40, 13, 6), **kwargs)


def test_guide_products_counted():
    """matrix_products: a guide's tiles once per sweep, as the plain loss's (not once per dimension)."""
    from fastcse.false_negatives import GuideRows
    from fastcse.problem import describe

    anchor, positive, _ = make_inputs(6, 8, 0)
    guide = GuideRows(torch.randn(6, 3), torch.randn(6, 3), None)
    common = dict(pos_start=0, neg_start=6, num_neg=0, normalize=True, hard_negative_weight=0.0,
                  false_negative_margin=0.1, guide=guide)
    plain = describe(anchor, positive, 0.05, **common)
    fused = describe(anchor, positive, 0.05, matryoshka_dims=(2, 8), matryoshka_weights=(1.0, 1.0), **common)
    for grad_in_forward in (True, False):
        products = cpu.matrix_products(fused, grad_in_forward=grad_in_forward)
        assert products == cpu.matrix_products(plain, grad_in_forward=grad_in_forward)
        assert ("guide", 6) in products


# ---------------------------------------------------------------- 2 gloo ranks
DISTRIBUTED_CASES = [
    dict(k=1, weight=0.5, reduction="mean", normalize=True, variant={}),
    dict(k=0, weight=0.0, reduction="none", normalize=True, variant=dict(symmetric=True), ids="group"),
    dict(k=1, weight=0.0, reduction="sum", normalize=False,
         variant=dict(directions=ALL_DIRECTIONS, partition_mode="joint", hardness_mode="all_negatives",
                      hardness_strength=2.0), ids="label"),
    # False negatives by similarity: self-guided on each rank's gathered prefixes, and a guide
    # (each rank passes its rows' guide rows; the loss gathers them).
    dict(k=1, weight=0.3, reduction="none", normalize=True, variant=dict(symmetric=True), ids="group",
         rule=dict(false_negative_margin=0.4, margin_strategy="relative")),
    dict(k=1, weight=0.0, reduction="mean", normalize=True,
         variant=dict(directions=ALL_DIRECTIONS, partition_mode="joint"), ids="label",
         rule=dict(false_negative_margin=0.2), guided=True),
]


def _check_distributed_case(case, seed, group):
    """Rank r's rows of the batch (3 and 5 rows) through process_group= against the reference
    over the whole batch: loss, every input's gradient, and tau's summed over the ranks. The
    case's dtype (fp32 unless it says) sets the inputs' and the tolerance (fp32: 1e-4 / 1e-5;
    fp64: the test suite's), gradients compared relative to max(1, their largest)."""
    dtype = case.get("dtype", torch.float32)
    rtol, atol = TOL[dtype] if dtype == torch.float64 else (1e-4, 1e-5)
    rank, sizes = group.rank(), [3, 5]
    start, batch, total = sum(sizes[:rank]), sizes[rank], sum(sizes)
    gen = torch.Generator().manual_seed(seed)
    anchor = torch.randn(total, 12, generator=gen, dtype=dtype)
    positive = anchor + torch.randn(total, 12, generator=gen, dtype=dtype)
    negative = torch.randn(total, case["k"], 12, generator=gen, dtype=dtype) if case["k"] else None
    ids = torch.randint(0, 4, (total,), generator=gen)
    row_weights = torch.rand(total, generator=gen) + 0.5
    dims, weights = case.get("dims", ((12, 7, 3), (1.0, 0.5, 2.0)))
    options = dict(normalize=case["normalize"], hard_negative_weight=case["weight"], reduction=case["reduction"],
                   matryoshka_dims=dims, matryoshka_weights=weights, **case["variant"])
    id_key = {"group": "group_ids", "label": "labels"}.get(case.get("ids"))
    mine_rule, full_rule = dict(case.get("rule", {})), dict(case.get("rule", {}))
    if case.get("guided"):
        guide = [x.double()[..., :5] + torch.randn(*x.shape[:-1], 5, generator=gen, dtype=torch.float64)
                 for x in (anchor, positive, negative) if x is not None]
        full_rule["guide"] = tuple(guide)
        mine_rule["guide"] = tuple(g[start:start + batch] for g in guide)
    mine = [x[start:start + batch].clone().requires_grad_() for x in (anchor, positive, negative) if x is not None]
    full = [x.double().requires_grad_() for x in (anchor, positive, negative) if x is not None]
    tau, ref_tau = torch.tensor(0.1, dtype=dtype, requires_grad=True), torch.tensor(0.1, dtype=torch.float64,
                                                                                   requires_grad=True)
    row_options = {id_key: ids[start:start + batch]} if id_key else {}
    loss = fastcse.info_nce(*mine, temperature=tau, process_group=group, backend="cpu", **options, **row_options,
                            **mine_rule)
    ref = info_nce_reference(*full, temperature=ref_tau, **options, **({id_key: ids} if id_key else {}),
                             **full_rule)
    if case["reduction"] == "none":
        (loss * row_weights[start:start + batch]).sum().backward()
        (ref * row_weights).sum().backward()
        ref = ref[start:start + batch]
    else:
        loss.backward()
        ref.backward()
    tau_grad = tau.grad.detach().clone()
    dist.all_reduce(tau_grad, group=group)  # before any assertion: a failing rank must not leave the other waiting
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=rtol, atol=atol)
    for mine_t, ref_t in zip(mine, full):
        scale = max(1.0, ref_t.grad.abs().max().item())
        torch.testing.assert_close(mine_t.grad.double() / scale, ref_t.grad[start:start + batch] / scale,
                                   rtol=rtol, atol=atol)
    torch.testing.assert_close(tau_grad.double(), ref_tau.grad, rtol=rtol, atol=atol)


def _worker(rank, world, port, results, cases):
    failures = []
    try:
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=60))
        for index, case in enumerate(cases):
            try:
                _check_distributed_case(case, seed=index, group=dist.group.WORLD)
            except AssertionError as error:
                failures.append(f"rank {rank} case {case}: {error}")
        dist.destroy_process_group()
    except Exception:  # a crash is a failure to report, not a hang of the parent
        failures.append(f"rank {rank} crashed:\n{traceback.format_exc()}")
    results.put((rank, failures))


def test_two_gloo_ranks_match_the_reference():
    """One gather of the full embeddings serves every dimension: loss and every input's gradient."""
    reports = spawn_world(_worker, 2, DISTRIBUTED_CASES, timeout_s=150)
    failures = [f for rank in sorted(reports) for f in reports[rank]]
    assert not failures, "\n\n".join(failures)


def _random_distributed_cases(count: int, seed: int = 0) -> list[dict]:
    """Cases as DISTRIBUTED_CASES holds them, every option drawn at random: variant, hardness,
    hard negatives, ids, the false-negative rule (self-guided or a guide), normalize, reduction,
    Matryoshka dimensions or none. Drawn before the world starts, so that the ranks agree."""
    rng = random.Random(seed)
    cases = []
    for _ in range(count):
        variant = dict(rng.choice(VARIANTS))
        hardness = rng.choice((None,) + HARDNESS_MODES)
        if hardness is not None:
            variant.update(hardness_mode=hardness, hardness_strength=2.0)
        k = rng.choice([0, 1, 2])
        dims = tuple(rng.sample(range(1, 13), rng.randint(1, 4)))
        weights = tuple(rng.uniform(0.1, 3.0) for _ in dims) if rng.random() < 0.5 else None
        case = dict(dtype=torch.float64, k=k, weight=rng.choice([0.0, 0.5]) if k else 0.0,
                    reduction=rng.choice(["mean", "sum", "none"]),
                    normalize=rng.random() < 0.8, variant=variant, ids=rng.choice([None, "group", "label"]),
                    dims=(dims, weights) if rng.random() < 0.8 else (None, None))
        rule = rng.choice([None, "self", "guide"])
        if rule is not None:
            case["rule"] = dict(false_negative_margin=rng.choice(DRAWN_MARGINS),
                                margin_strategy=rng.choice(MARGIN_STRATEGIES))
            case["guided"] = rule == "guide"
        cases.append(case)
    return cases


def test_two_gloo_ranks_random_cases_match_the_reference():
    """40 drawn cases in one 2-rank world, fp64: the distributed path on the same option space as
    the property tests (its fp32 precision is the single-process paths', tested there)."""
    reports = spawn_world(_worker, 2, _random_distributed_cases(40), timeout_s=240)
    failures = [f for rank in sorted(reports) for f in reports[rank]]
    assert not failures, "\n\n".join(failures)
