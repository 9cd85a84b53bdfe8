"""info_nce's group_ids (false negatives), extra_negatives (a queue) and labels (several positives),
on the CPU backend: against the materialized reference, with every other option."""

from __future__ import annotations

import itertools

import pytest
import torch
from test_loss import check_against_reference, make_inputs

from fastcse import cpu, info_nce, info_nce_reference
from fastcse.problem import describe, resolve_variant

IDS = torch.tensor([0, 1, 0, 2, 3, 1, 0, 4, 5, 6, 2])  # groups of 3, 2, 2 and singletons
VARIANTS = {
    "query_to_doc": dict(),
    "symmetric": dict(symmetric=True),  # the column sweep
    "symmetric-rows": dict(symmetric=True, hardness_mode="in_batch_negatives", hardness_strength=2.0),
    "gte": dict(directions=("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc"), partition_mode="joint",
                hardness_mode="all_negatives", hardness_strength=3.0),
    "hard": dict(hardness_mode="hard_negatives", hardness_strength=5.0),
}


def _row_options(kind):
    return {"group": dict(group_ids=IDS), "group-dense": dict(group_ids=IDS), "label": dict(labels=IDS),
            "none": {}}[kind]


def _force_group_mask_path(monkeypatch, kind):
    """"group": the CPU backend's listed cells (any group size); "group-dense": its dense compare."""
    if kind.startswith("group"):
        monkeypatch.setattr(cpu._GroupCells, "MAX_CELLS_PER_ROW_FRACTION", 1.0 if kind == "group" else 0.0)


@pytest.mark.parametrize("queue", [0, 6])
@pytest.mark.parametrize("kind", ["group", "group-dense", "label", "none"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_matches_reference(variant, kind, queue, monkeypatch):
    """x hard negatives 0/2 (with a weight) x reductions in fp64, and fp32; a learnable temperature."""
    _force_group_mask_path(monkeypatch, kind)
    batch = IDS.shape[0]
    cases = [(k, red, torch.float64) for k, red in itertools.product((0, 2), ("mean", "sum", "none"))]
    cases += [(2, "mean", torch.float32), (0, "none", torch.float32)]
    for num_neg, reduction, dtype in cases:
        weight = 0.6 if num_neg else 0.0
        anchor, positive, negative = make_inputs(batch, 6, num_neg, dtype)
        options = dict(VARIANTS[variant], **_row_options(kind), reduction=reduction)
        if queue:
            options["extra_negatives"] = torch.randn(queue, 6, dtype=dtype)
        if num_neg == 0 and options.get("hardness_mode") == "hard_negatives":
            options.pop("hardness_mode")
        check_against_reference(anchor, positive, negative, torch.tensor(0.1, dtype=dtype),
                                hard_negative_weight=weight, **options)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["group", "label"])
def test_16_bit_inputs(dtype, kind):
    anchor, positive, negative = make_inputs(IDS.shape[0], 8, 1, dtype)
    queue = torch.randn(5, 8).to(dtype)
    check_against_reference(anchor, positive, negative, extra_negatives=queue, **_row_options(kind),
                            **VARIANTS["gte"])


@pytest.mark.parametrize("kind", ["group", "label"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gradcheck_fp64(kind, reduction):
    """Every input, the queue too (it gets gradients when it requires them)."""
    anchor, positive, negative = (t.requires_grad_() for t in make_inputs(IDS.shape[0], 4, 1, torch.float64))
    queue = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    tau = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)

    def loss(a, p, n, q, t):
        return info_nce(a, p, n, temperature=t, extra_negatives=q, reduction=reduction, symmetric=True,
                        **_row_options(kind))

    assert torch.autograd.gradcheck(loss, (anchor, positive, negative, queue, tau))


def test_group_masks_the_duplicate_like_removing_it():
    """Row 5 duplicates row 2: with one group, row 2's loss is its loss in the batch without row 5
    (an independent check: no reference involved)."""
    anchor, positive, _ = make_inputs(8, 5, 0, torch.float64)
    anchor[5], positive[5] = anchor[2], positive[2]
    ids = torch.arange(8)
    ids[5] = 2
    masked = info_nce(anchor, positive, group_ids=ids, reduction="none")
    keep = [i for i in range(8) if i != 5]
    without = info_nce(anchor[keep], positive[keep], reduction="none")
    torch.testing.assert_close(masked[2], without[2], rtol=1e-12, atol=1e-12)
    unmasked = info_nce(anchor, positive, reduction="none")
    assert unmasked[2] > masked[2] + 0.1  # the duplicate was a (hard) false negative


@pytest.mark.parametrize("pos_start, batch, group_size", [(0, 40, 1), (0, 40, 4), (13, 20, 3), (0, 33, 40)])
def test_group_cells_are_the_dense_compare(pos_start, batch, group_size, monkeypatch):
    """The listed cells of a chunk are exactly the dense compare's (rows of [pos_start, pos_start + B)
    of P ids, as under process_group=), every chunk boundary; too many cells fall back to the compare."""
    gen = torch.Generator().manual_seed(batch)
    num_positives = pos_start + batch + 7
    ids = torch.randperm(num_positives, generator=gen) // group_size
    problem = describe(torch.empty(batch, 4), torch.empty(num_positives, 4), 0.05, pos_start=pos_start,
                       neg_start=num_positives, num_neg=0, normalize=True, hard_negative_weight=0.0, ids=ids,
                       id_mode="group")
    # The default lists the cells while the rows have on average under P / 32 mates (P = 47, 47, 40, 40).
    assert (cpu._GroupCells.build(ids, problem) is None) == (group_size > 1)
    monkeypatch.setattr(cpu._GroupCells, "MAX_CELLS_PER_ROW_FRACTION", 1.0)
    cells = cpu._GroupCells.build(ids, problem)
    for r0, r1 in [(0, batch), (0, 1), (3, 11), (batch - 1, batch)]:
        dense = ids[pos_start + r0: pos_start + r1, None] == ids[None, :]
        dense[torch.arange(r1 - r0), pos_start + torch.arange(r0, r1)] = False
        listed = torch.zeros_like(dense)
        listed[cells.of_rows(r0, r1)] = True
        assert torch.equal(listed, dense)


def test_group_cells_cap_their_memory(monkeypatch):
    """Few mates per row but more cells than MAX_CELLS: the dense compare, not a list that outgrows the block."""
    ids = torch.arange(40) // 4
    problem = describe(torch.empty(40, 4), torch.empty(40, 4), 0.05, pos_start=0, neg_start=40, num_neg=0,
                       normalize=True, hard_negative_weight=0.0, ids=ids, id_mode="group")
    monkeypatch.setattr(cpu._GroupCells, "MAX_CELLS_PER_ROW_FRACTION", 1.0)
    assert cpu._GroupCells.build(ids, problem) is not None  # 120 cells
    monkeypatch.setattr(cpu._GroupCells, "MAX_CELLS", 119)
    assert cpu._GroupCells.build(ids, problem) is None


@pytest.mark.parametrize("variant", [dict(directions=VARIANTS["gte"]["directions"], partition_mode="joint"),
                                     dict(symmetric=True)], ids=["gte", "symmetric"])
def test_both_group_mask_paths_agree_in_the_distributed_layout(variant, monkeypatch):
    """The CPU backend as one rank of three sees it (rows [5, 12) of P = 20 positives, every
    rank's anchors as keys): the listed cells and the dense compare give the same loss and gradients."""
    gen = torch.Generator().manual_seed(3)
    batch, num_positives, dim, pos_start = 7, 20, 6, 5
    anchor = torch.randn(batch, dim, generator=gen, dtype=torch.float64)
    candidates = torch.randn(num_positives + 4, dim, generator=gen, dtype=torch.float64)  # + 4 extra
    anchor_keys = torch.randn(num_positives, dim, generator=gen, dtype=torch.float64)
    ids = torch.randint(0, 8, (num_positives,), generator=gen)
    problem = describe(anchor, candidates, 0.05, pos_start=pos_start, neg_start=num_positives, num_neg=0,
                       normalize=True, hard_negative_weight=0.0, variant=resolve_variant(**variant),
                       anchor_keys=anchor_keys, anchor_start=pos_start, ids=ids, id_mode="group", num_extra=4)
    results = {}
    for fraction in (1.0, 0.0):
        monkeypatch.setattr(cpu._GroupCells, "MAX_CELLS_PER_ROW_FRACTION", fraction)
        row_loss, lse, grads = cpu.forward(anchor, candidates, anchor_keys, problem, compute_grad=True, ids=ids)
        backward = cpu.backward(torch.rand(batch, generator=torch.Generator().manual_seed(0), dtype=torch.float64),
                                anchor, candidates, anchor_keys, problem, lse, ids=ids)
        results[fraction] = (row_loss, lse, *grads[:3], *backward[:3])
    assert torch.isfinite(results[1.0][0]).all()
    for listed, dense in zip(results[1.0], results[0.0]):
        torch.testing.assert_close(listed, dense, rtol=1e-12, atol=1e-12)


def test_distinct_ids_change_nothing_and_hard_negatives_are_never_masked():
    anchor, positive, negative = make_inputs(7, 5, 1, torch.float64)
    plain = info_nce(anchor, positive, negative, reduction="none")
    distinct = torch.arange(7)
    torch.testing.assert_close(info_nce(anchor, positive, negative, group_ids=distinct, reduction="none"), plain,
                               rtol=0, atol=0)
    torch.testing.assert_close(info_nce(anchor, positive, negative, labels=distinct, reduction="none"), plain,
                               rtol=1e-14, atol=1e-14)
    # One group for everyone: only the own positive and the hard negatives (everyone's) are left.
    one_group = info_nce(anchor, positive, negative, group_ids=torch.zeros(7, dtype=torch.long), reduction="none")
    a, p, n = (torch.nn.functional.normalize(t, dim=1) for t in (anchor, positive, negative[:, 0]))
    pos = (a * p).sum(1) / 0.05
    expected = torch.logsumexp(torch.cat([pos[:, None], a @ n.T / 0.05], dim=1), dim=1) - pos
    torch.testing.assert_close(one_group, expected, rtol=1e-12, atol=1e-12)


def test_labels_average_the_positives():
    """SupCon's L_out by hand for one row: mean over its label's positives of -log softmax."""
    anchor, positive, _ = make_inputs(6, 4, 0, torch.float64)
    labels = torch.tensor([0, 1, 0, 0, 2, 1])
    loss = info_nce(anchor, positive, labels=labels, reduction="none", temperature=0.2)
    a, p = (torch.nn.functional.normalize(t, dim=1) for t in (anchor, positive))
    log_softmax = torch.log_softmax(a @ p.T / 0.2, dim=1)
    expected = -log_softmax[0, [0, 2, 3]].mean()
    torch.testing.assert_close(loss[0], expected, rtol=1e-12, atol=1e-12)


def test_queue_gets_gradients_only_when_it_asks():
    anchor, positive = (t.requires_grad_() for t in make_inputs(5, 4, 0)[:2])
    queue = torch.randn(7, 4)
    info_nce(anchor, positive, extra_negatives=queue).backward()
    assert queue.grad is None and anchor.grad is not None
    queue.requires_grad_()
    info_nce(anchor, positive, extra_negatives=queue).backward()
    assert queue.grad is not None and queue.grad.abs().sum() > 0
    # An empty queue is no queue.
    torch.testing.assert_close(info_nce(anchor, positive, extra_negatives=torch.empty(0, 4)),
                               info_nce(anchor, positive))


def test_queue_is_forward_only():
    """doc_to_query / doc_to_doc never score the queue: a symmetric loss's reverse half is unchanged."""
    anchor, positive, _ = make_inputs(6, 4, 0, torch.float64)
    queue = torch.randn(9, 4, dtype=torch.float64)
    forward_only = info_nce(anchor, positive, extra_negatives=queue, reduction="none")
    symmetric = info_nce(anchor, positive, extra_negatives=queue, symmetric=True, reduction="none")
    reverse = info_nce_reference(positive, anchor, reduction="none")  # p_i against the anchors
    torch.testing.assert_close(symmetric, (forward_only + reverse) / 2, rtol=1e-12, atol=1e-12)


# A split of keys without a cell (query_to_query's) has LSE log(0) = -inf: numpy warns in the interpreter.
@pytest.mark.filterwarnings("ignore:divide by zero encountered in log:RuntimeWarning")
@pytest.mark.parametrize("kind", ["group", "label"])
@pytest.mark.parametrize("variant", ["symmetric", "gte"])
def test_triton_backend_matches_reference(variant, kind):
    """The Triton kernels (interpreted here; tests/test_triton_info_nce.py has the full matrix),
    with a queue and hard negatives: the same loss and gradients as the reference."""
    anchor, positive, negative = make_inputs(IDS.shape[0], 16, 2)
    check_against_reference(anchor, positive, negative, torch.tensor(0.1), hard_negative_weight=0.6,
                            extra_negatives=torch.randn(6, 16), backend="triton", reduction="none",
                            **_row_options(kind), **VARIANTS[variant])


# ---------------------------------------------------------------- bad input
def _good():
    return make_inputs(4, 3, 1)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(group_ids=torch.arange(3)), ValueError, r"group_ids must be \[B\] = \[4\]"),
    (dict(group_ids=torch.arange(8).reshape(4, 2)), ValueError, r"group_ids must be \[B\]"),
    (dict(group_ids=torch.zeros(4)), TypeError, "group_ids must hold integer ids"),
    (dict(group_ids=torch.zeros(4, dtype=torch.bool)), TypeError, "group_ids must hold integer ids"),
    (dict(group_ids=[0, 1, 2, 3]), TypeError, "group_ids must be a torch.Tensor"),
    (dict(group_ids=torch.arange(4, device="meta")), ValueError, "group_ids is on meta"),
    (dict(labels=torch.arange(5)), ValueError, r"labels must be \[B\] = \[4\]"),
    (dict(labels=torch.ones(4, dtype=torch.float64)), TypeError, "labels must hold integer ids"),
    (dict(labels=torch.arange(4), group_ids=torch.arange(4)), ValueError, "give group_ids .* or labels .*, not both"),
    (dict(extra_negatives=torch.randn(5, 2)), ValueError, r"extra_negatives must be \[Q, d\] with the anchors' d = 3"),
    (dict(extra_negatives=torch.randn(5)), ValueError, "extra_negatives must be 2-D"),
    (dict(extra_negatives=torch.randn(5, 3, dtype=torch.float64)), TypeError, "extra_negatives has dtype"),
    (dict(extra_negatives=torch.randn(5, 3, device="meta")), ValueError, "extra_negatives is on meta"),
    (dict(extra_negatives=torch.randn(5, 3).numpy()), TypeError, "extra_negatives must be a torch.Tensor"),
])
def test_bad_row_options(kwargs, error, match):
    with pytest.raises(error, match=match):
        info_nce(*_good(), **kwargs)
