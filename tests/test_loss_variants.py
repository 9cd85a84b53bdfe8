"""sentence-transformers 6's loss variants in fastcse.info_nce (CPU backend): directions,
partition modes, hardness weighting, against the one materialized reference.

``info_nce_reference`` itself is checked against sentence-transformers' own
MultipleNegativesRankingLoss in tests/test_integrations_sentence_transformers.py.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_loss import check_against_reference, make_inputs

import fastcse
from fastcse import info_nce, info_nce_reference
from fastcse.problem import DIRECTIONS, HARDNESS_MODES, resolve_variant

EXTRA_DIRECTIONS = DIRECTIONS[1:]
DIRECTION_SETS = [("query_to_doc",) + extra for r in range(4) for extra in itertools.combinations(EXTRA_DIRECTIONS, r)]
VARIANTS = [dict(directions=dirs, partition_mode=partition)
            for dirs in DIRECTION_SETS for partition in ("joint", "per_direction")
            if partition == "joint" or not {"query_to_query", "doc_to_doc"} & set(dirs)]


def _variant_id(v):
    short = {"query_to_doc": "qd", "query_to_query": "qq", "doc_to_query": "dq", "doc_to_doc": "dd"}
    return "+".join(short[d] for d in v["directions"]) + "-" + v["partition_mode"]


@pytest.mark.parametrize("hardness_mode", (None,) + HARDNESS_MODES)
@pytest.mark.parametrize("variant", VARIANTS, ids=_variant_id)
def test_every_variant_matches_reference(variant, hardness_mode):
    """Every directions subset x partition x hardness mode x hard negatives 0/1/3 (with and without
    SimCSE's weight) x reductions, fp64 to 1e-10 and fp32."""
    for (num_neg, weight), reduction in itertools.product([(0, 0.0), (1, 0.0), (1, 0.7), (3, -1.2)],
                                                          ("mean", "sum", "none")):
        for dtype in (torch.float64,) if reduction == "sum" else (torch.float64, torch.float32):
            anchor, positive, negative = make_inputs(9, 6, num_neg, dtype)
            check_against_reference(anchor, positive, negative, torch.tensor(0.07, dtype=dtype),
                                    hard_negative_weight=weight,
                                    hardness_mode=hardness_mode, hardness_strength=3.0, reduction=reduction,
                                    **variant)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("variant", [VARIANTS[-1], dict(directions=("query_to_doc", "doc_to_query"),
                                                        partition_mode="per_direction")], ids=_variant_id)
def test_16_bit_inputs(dtype, variant):
    anchor, positive, negative = make_inputs(13, 10, 2, dtype)
    check_against_reference(anchor, positive, negative, hard_negative_weight=0.4, hardness_mode="all_negatives",
                            hardness_strength=5.0, **variant)


@pytest.mark.parametrize("options", [
    dict(temperature=0.01),  # logits past the unshifted bound: the row-max path
    dict(temperature=1.0, normalize=False),  # dot products
    dict(temperature=0.02, hardness_strength=40.0),  # the penalty alone crosses the unshifted bound
])
def test_extreme_values(options):
    options = dict(options)
    temperature = options.pop("temperature")
    scale = 4.0 if not options.get("normalize", True) else 1.0
    anchor, positive, negative = make_inputs(12, 7, 1, scale=scale)
    anchor[3] = 0.0  # a zero row: x_hat = 0, finite loss
    positive[5] = 1e-20  # a tiny one
    for variant in (VARIANTS[-1], dict(directions=("query_to_doc", "doc_to_query"), partition_mode="joint")):
        check_against_reference(anchor, positive, negative, temperature, hardness_mode="in_batch_negatives",
                                **{"hardness_strength": 2.0, **options}, **variant)


@pytest.mark.parametrize("variant", [VARIANTS[-1], dict(directions=("query_to_doc", "doc_to_query"),
                                                        partition_mode="per_direction")], ids=_variant_id)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gradcheck_fp64(variant, reduction):
    # No hardness penalty here: it carries no gradient by definition, so finite differences
    # (which see it) and the analytic gradient differ; the reference tests cover it.
    anchor, positive, negative = (t.requires_grad_() for t in make_inputs(5, 4, 2, torch.float64))
    tau = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)

    def loss(a, p, n, t):
        return info_nce(a, p, n, temperature=t, hard_negative_weight=0.3, reduction=reduction, **variant)

    assert torch.autograd.gradcheck(loss, (anchor, positive, negative, tau))


def test_symmetric_is_the_per_direction_pair():
    anchor, positive, negative = make_inputs(10, 6, 1, torch.float64)
    shorthand = info_nce(anchor, positive, negative, symmetric=True, reduction="none")
    spelled = info_nce(anchor, positive, negative, directions=("doc_to_query", "query_to_doc"),
                       partition_mode="per_direction", reduction="none")
    torch.testing.assert_close(shorthand, spelled, rtol=1e-12, atol=1e-12)


def test_hardness_penalty_changes_only_the_chosen_negatives():
    """A penalty on a set no cell belongs to is no penalty: hard_negatives without negatives;
    in_batch_negatives with B = 1 (every candidate is the row's own)."""
    anchor, positive, negative = make_inputs(6, 5, 1, torch.float64)
    plain = info_nce(anchor, positive)
    torch.testing.assert_close(info_nce(anchor, positive, hardness_mode="hard_negatives", hardness_strength=5.0),
                               plain, rtol=0, atol=0)
    one = info_nce(anchor[:1], positive[:1], negative[:1])
    torch.testing.assert_close(info_nce(anchor[:1], positive[:1], negative[:1], hardness_mode="in_batch_negatives",
                                        hardness_strength=5.0), one, rtol=0, atol=0)
    assert info_nce(anchor, positive, negative, hardness_mode="all_negatives", hardness_strength=5.0) > \
        info_nce(anchor, positive, negative)


@settings(max_examples=30, deadline=None)
@given(batch=st.integers(1, 12), dim=st.integers(1, 9), num_neg=st.integers(0, 3),
       variant=st.sampled_from(VARIANTS), hardness_mode=st.sampled_from((None,) + HARDNESS_MODES),
       strength=st.sampled_from([0.0, 1.0, 9.0]), tau=st.floats(0.02, 1.0), normalize=st.booleans(),
       reduction=st.sampled_from(["mean", "sum", "none"]), seed=st.integers(0, 2**16))
def test_property_matches_reference(batch, dim, num_neg, variant, hardness_mode, strength, tau, normalize,
                                    reduction, seed):
    torch.manual_seed(seed)
    anchor, positive, negative = make_inputs(batch, dim, num_neg, torch.float64)
    check_against_reference(anchor, positive, negative, tau, normalize=normalize, reduction=reduction,
                            hardness_mode=hardness_mode, hardness_strength=strength, **variant)


def test_module_form_and_repr():
    variant = dict(directions=("query_to_doc", "query_to_query"), partition_mode="joint",
                   hardness_mode="in_batch_negatives", hardness_strength=2.0)
    module = fastcse.InfoNCE(temperature=0.1, **variant)
    anchor, positive, negative = make_inputs(7, 5, 1, torch.float64)
    torch.testing.assert_close(module(anchor, positive, negative),
                               info_nce_reference(anchor, positive, negative, temperature=0.1, **variant))
    assert "hardness_mode='in_batch_negatives'" in repr(module) and "query_to_query" in repr(module)
    with pytest.raises(ValueError, match="partition_mode"):
        fastcse.InfoNCE(directions=("query_to_doc", "doc_to_doc"), partition_mode="per_direction")


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize("kwargs,error,match", [
    (dict(directions=("query_to_doc", "doc_to_queries")), ValueError, "directions holds unknown name"),
    (dict(directions=("query_to_doc", "query_to_doc")), ValueError, "directions names a direction twice"),
    (dict(directions=()), ValueError, "directions must name at least one direction"),
    (dict(directions="query_to_doc"), TypeError, "directions must be a tuple"),
    (dict(directions=("doc_to_query",)), ValueError, "directions must include 'query_to_doc'"),
    (dict(partition_mode="per_row"), ValueError, "partition_mode must be one of"),
    (dict(directions=("query_to_doc", "query_to_query"), partition_mode="per_direction"), ValueError,
     "partition_mode='per_direction' requires every direction's candidate pool"),
    (dict(hardness_mode="hard"), ValueError, "hardness_mode must be None or one of"),
    (dict(hardness_mode="all_negatives", hardness_strength=-1.0), ValueError, "hardness_strength must be"),
    (dict(hardness_strength=float("nan")), ValueError, "hardness_strength must be a finite"),
    (dict(hardness_strength="5"), ValueError, "hardness_strength must be a finite"),
    (dict(symmetric=True, directions=("query_to_doc", "doc_to_query")), ValueError, "give either symmetric"),
    (dict(symmetric=True, partition_mode="joint"), ValueError, "give either symmetric"),
    (dict(symmetric=1), TypeError, "symmetric must be a bool"),
])
def test_bad_variant(kwargs, error, match):
    anchor, positive, negative = make_inputs(4, 3, 1)
    with pytest.raises(error, match=match):
        info_nce(anchor, positive, negative, **kwargs)
    with pytest.raises(error, match=match):
        info_nce_reference(anchor, positive, negative, **kwargs)


def test_canonical_variant():
    """Order does not matter, one direction is joint, a penalty that cannot act is dropped."""
    assert resolve_variant(directions=["doc_to_query", "query_to_doc"], partition_mode="per_direction") == \
        resolve_variant(symmetric=True)
    assert resolve_variant(partition_mode="per_direction").joint
    assert resolve_variant(hardness_mode="hard_negatives", hardness_strength=3.0, num_neg=0).hardness_mode is None
    assert resolve_variant(hardness_mode="all_negatives", hardness_strength=0.0).hardness_mode is None
