"""info_nce's false negatives by similarity (false_negative_margin, margin_strategy, guide): the
guided rule of sentence-transformers' GISTEmbedLoss and the self-guided one of Qwen3-Embedding /
NV-Retriever, on the CPU backend, against the materialized reference and with every other option."""

from __future__ import annotations

import datetime
import itertools
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from spawn_world import spawn_world
from test_loss import check_against_reference, make_inputs

from fastcse import InfoNCE, cpu, info_nce, info_nce_reference
from fastcse.false_negatives import GuideRows
from fastcse.problem import describe, resolve_variant
from fastcse.testing import assert_compiles_like_eager

IDS = torch.tensor([0, 1, 0, 2, 3, 1, 0, 4, 5, 6, 2])  # groups of 3, 2, 2 and singletons
BATCH, DIM, GUIDE_DIM = IDS.shape[0], 6, 4
VARIANTS = {
    "query_to_doc": dict(),
    "symmetric": dict(symmetric=True),
    "symmetric-hardness": dict(symmetric=True, hardness_mode="in_batch_negatives", hardness_strength=2.0),
    "gte": dict(directions=("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc"), partition_mode="joint",
                hardness_mode="all_negatives", hardness_strength=3.0),
    "hard": dict(hardness_mode="hard_negatives", hardness_strength=5.0),
}
# (strategy, margin): GISTEmbed's absolute and relative rules with margins that leave many keys
# out (the inputs' positives score ~0.9), and Qwen3-Embedding's m = -0.1 (keys above the positive).
RULES = [("absolute", 0.6), ("relative", 0.5), ("absolute", -0.1)]


def _guide_of(x: torch.Tensor, seed: int) -> torch.Tensor:
    """A guide model's view of the rows: a projection to GUIDE_DIM plus noise (correlated with the inputs)."""
    gen = torch.Generator().manual_seed(seed)
    projection = torch.randn(x.shape[-1], GUIDE_DIM, generator=gen, dtype=torch.float64)
    return x.double() @ projection + 0.3 * torch.randn(*x.shape[:-1], GUIDE_DIM, generator=gen, dtype=torch.float64)


def _guide_options(kind, anchor, positive, negative, queue):
    if kind == "self":
        return {}
    guide = tuple(_guide_of(x, seed) for seed, x in enumerate((anchor, positive, negative)) if x is not None)
    options = dict(guide=guide)
    if queue is not None:
        options["guide_extra_negatives"] = _guide_of(queue, 9)
    return options


def _row_options(kind):
    return {"group": dict(group_ids=IDS), "label": dict(labels=IDS), "none": {}}[kind]


@pytest.mark.parametrize("rows", ["none", "group", "label"])
@pytest.mark.parametrize("guide", ["self", "guide"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_matches_reference(variant, guide, rows):
    """x each rule, with and without hard negatives (a weight) and a queue, every reduction,
    normalize on and off, fp64 and fp32; a learnable temperature."""
    cases = [(RULES[0], 2, 5, "mean", True, torch.float64), (RULES[1], 0, 0, "none", True, torch.float64),
             (RULES[2], 2, 5, "none", True, torch.float64), (RULES[1], 2, 5, "sum", False, torch.float64),
             (RULES[0], 0, 5, "mean", True, torch.float32)]
    for (strategy, margin), num_neg, queue_size, reduction, normalize, dtype in cases:
        anchor, positive, negative = make_inputs(BATCH, DIM, num_neg, dtype)
        queue = torch.randn(queue_size, DIM, dtype=torch.float64).to(dtype) if queue_size else None
        options = dict(VARIANTS[variant], **_row_options(rows), reduction=reduction, normalize=normalize,
                       false_negative_margin=margin, margin_strategy=strategy, extra_negatives=queue,
                       **_guide_options(guide, anchor, positive, negative, queue))
        if num_neg == 0 and options.get("hardness_mode") == "hard_negatives":
            options.pop("hardness_mode")
        check_against_reference(anchor, positive, negative, torch.tensor(0.1, dtype=dtype),
                                hard_negative_weight=0.6 if num_neg else 0.0, **options)


def test_the_rule_leaves_keys_out():
    """The grid's rules change the loss (they do leave keys out), and each direction's cells do."""
    anchor, positive, negative = make_inputs(BATCH, DIM, 1, torch.float64)
    plain = info_nce_reference(anchor, positive, negative, reduction="none")
    for strategy, margin in RULES[:2]:
        masked = info_nce(anchor, positive, negative, reduction="none", false_negative_margin=margin,
                          margin_strategy=strategy)
        assert (masked < plain - 1e-6).sum() >= BATCH // 2
    # A margin below every similarity gap leaves nothing out: the plain loss, exactly as computed.
    torch.testing.assert_close(info_nce(anchor, positive, negative, false_negative_margin=-3.0), plain.mean(),
                               rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("guide", ["self", "guide"])
def test_16_bit_inputs(dtype, guide):
    anchor, positive, negative = make_inputs(BATCH, 8, 1, dtype)
    queue = torch.randn(5, 8).to(dtype)
    check_against_reference(anchor, positive, negative, extra_negatives=queue, group_ids=IDS,
                            false_negative_margin=0.5, margin_strategy="relative",
                            **_guide_options(guide, anchor, positive, negative, queue), **VARIANTS["gte"])


def _min_gap(anchor, positive, margin):
    """The self-guided rule's smallest |cosine - threshold| over query_to_doc and doc_to_query."""
    a, p = F.normalize(anchor, dim=1), F.normalize(positive, dim=1)
    limit = (a * p).sum(1, keepdim=True) - margin
    return min((a @ p.T - limit).abs().min().item(), (p @ a.T - limit).abs().min().item())


@pytest.mark.parametrize("guide", ["self", "guide"])
def test_gradcheck_fp64(guide):
    """Every input and the temperature; the inputs lie away from the thresholds, where the mask is
    constant under gradcheck's perturbations (the rule has no gradient)."""
    anchor, positive, negative = (t.requires_grad_() for t in make_inputs(8, 4, 1, torch.float64))
    queue = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    tau = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    options = _guide_options(guide, anchor.detach(), positive.detach(), negative.detach(), queue.detach())
    if guide == "self":
        assert _min_gap(anchor.detach(), positive.detach(), 0.4) > 1e-4

    def loss(a, p, n, q, t):
        return info_nce(a, p, n, temperature=t, extra_negatives=q, reduction="none", symmetric=True,
                        false_negative_margin=0.4, **options)

    assert torch.autograd.gradcheck(loss, (anchor, positive, negative, queue, tau))


def test_self_guided_is_the_cosine_of_the_inputs_and_no_extra_product():
    """Self-guided with normalize=True is the guide (anchor, positive, negative) itself; with
    normalize=False the dot products decide (documented), which the cosine of unit rows equals."""
    anchor, positive, negative = make_inputs(BATCH, DIM, 2, torch.float64)
    options = dict(false_negative_margin=0.5, reduction="none", directions=VARIANTS["gte"]["directions"])
    self_guided = info_nce(anchor, positive, negative, **options)
    guided = info_nce(anchor, positive, negative, guide=(anchor, positive, negative), **options)
    torch.testing.assert_close(self_guided, guided, rtol=1e-12, atol=1e-12)
    unit = [F.normalize(x, dim=-1) for x in (anchor, positive, negative)]
    torch.testing.assert_close(info_nce(*unit, normalize=False, **options), self_guided, rtol=1e-12, atol=1e-12)
    scaled = [3.0 * x for x in unit]  # dot products 9x the cosines: the absolute margin now leaves fewer out
    assert not torch.allclose(info_nce(*scaled, normalize=False, temperature=0.45, **options), self_guided)
    # The cost model: a guide adds its own tiles, the self-guided rule none.
    candidates = torch.empty(BATCH * 3, DIM)
    common = dict(pos_start=0, neg_start=BATCH, num_neg=2, normalize=True, hard_negative_weight=0.0,
                  false_negative_margin=0.1)
    plain = describe(torch.empty(BATCH, DIM), candidates, 0.05, **{**common, "false_negative_margin": None})
    self_problem = describe(torch.empty(BATCH, DIM), candidates, 0.05, **common)
    guide = GuideRows(torch.empty(BATCH, 3), torch.empty(BATCH * 3, 3), None)
    guided_problem = describe(torch.empty(BATCH, DIM), candidates, 0.05, guide=guide, **common)
    assert cpu.matrix_products(self_problem) == cpu.matrix_products(plain)
    assert cpu.matrix_products(guided_problem) == cpu.matrix_products(plain) + [("guide", BATCH * 3)]
    assert cpu.matrix_products(guided_problem, grad_in_forward=False).count(("guide", BATCH * 3)) == 2


def _gist_embed_loss(anchor, positive, negative, guide, *, margin, strategy, temperature, contrast_anchors):
    """sentence-transformers' GISTEmbedLoss.forward (one process) on precomputed embeddings: its
    similarity matrices, its mask_false_negatives, its cross-entropy (an independent statement of the rule)."""
    def cos(x, y):
        return F.normalize(x, dim=-1) @ F.normalize(y, dim=-1).T

    guide_anchor, guide_positive, guide_negative = guide
    guided_sim = cos(guide_anchor, guide_positive).diagonal().view(-1, 1)

    def mask(guided_matrix, matrix, positive_mask=None):
        limit = guided_sim - margin if strategy == "absolute" else guided_sim - guided_sim.abs() * margin
        left_out = guided_matrix > limit
        if positive_mask is not None:
            left_out = left_out & ~positive_mask
        return matrix.masked_fill(left_out, -torch.inf)

    rows = torch.arange(anchor.shape[0])
    scores = [mask(cos(guide_anchor, guide_positive), cos(anchor, positive), torch.eye(anchor.shape[0]).bool())]
    if contrast_anchors:
        aa = mask(cos(guide_anchor, guide_anchor), cos(anchor, anchor))
        aa[rows, rows] = -torch.inf
        scores.append(aa)
    scores.append(mask(cos(guide_anchor, guide_negative), cos(anchor, negative)))
    return F.cross_entropy(torch.cat(scores, dim=1) / temperature, rows)


@pytest.mark.parametrize("strategy, margin", [("absolute", 0.1), ("relative", 0.3)])
@pytest.mark.parametrize("contrast_anchors", [False, True])
def test_equals_gist_embed_loss(strategy, margin, contrast_anchors):
    anchor, positive, negative = make_inputs(BATCH, DIM, 1, torch.float64, neg_2d=True)
    guide = tuple(_guide_of(x, seed) for seed, x in enumerate((anchor, positive, negative)))
    want = _gist_embed_loss(anchor, positive, negative, guide, margin=margin, strategy=strategy, temperature=0.05,
                            contrast_anchors=contrast_anchors)
    directions = ("query_to_doc", "query_to_query") if contrast_anchors else None
    got = info_nce(anchor, positive, negative, temperature=0.05, directions=directions, guide=guide,
                   false_negative_margin=margin, margin_strategy=strategy)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_ties_at_the_threshold_are_kept():
    """A key whose guide similarity equals the threshold stays (strictly greater is left out, as
    GISTEmbedLoss's `>`). One-hot guide rows make every cosine exact: 1 for every pair here."""
    anchor, positive, negative = make_inputs(6, DIM, 1, torch.float64)
    one_hot = torch.zeros(6, 3, dtype=torch.float64)
    one_hot[:, 0] = 1.0
    guide = (one_hot, one_hot.clone(), one_hot[:, None].clone())  # negative is [B, 1, d]
    plain = info_nce(anchor, positive, negative, reduction="none")
    for strategy in ("absolute", "relative"):
        at = dict(guide=guide, false_negative_margin=0.0, margin_strategy=strategy, reduction="none")
        torch.testing.assert_close(info_nce(anchor, positive, negative, **at), plain, rtol=0, atol=0)
        torch.testing.assert_close(info_nce_reference(anchor, positive, negative, **at), plain, rtol=1e-14,
                                   atol=1e-14)
        above = dict(at, false_negative_margin=1e-9)  # every key but the target now lies above t_i - m
        assert torch.all(info_nce(anchor, positive, negative, **above).abs() < 1e-12)


@pytest.mark.parametrize("variant", ["query_to_doc", "symmetric", "gte"])
@pytest.mark.parametrize("rows", ["none", "label"])
def test_a_row_whose_every_negative_is_left_out(variant, rows):
    """Self-guided with m = 3 (every cosine exceeds t - 3): only the targets (and doc_to_query's
    own anchor) remain. Row 0 of query_to_doc alone is then log(1) = 0 with zero gradient; every
    loss stays finite and matches the reference."""
    anchor, positive, negative = (t.requires_grad_() for t in make_inputs(BATCH, DIM, 1, torch.float64))
    options = dict(VARIANTS[variant], **_row_options(rows), false_negative_margin=3.0, reduction="none")
    loss = info_nce(anchor, positive, negative, **options)
    loss.sum().backward()
    assert torch.isfinite(loss).all() and all(torch.isfinite(t.grad).all() for t in (anchor, positive, negative))
    if variant != "gte" and rows == "none":
        assert loss.abs().max() < 1e-12
        assert max(t.grad.abs().max() for t in (anchor, positive, negative)) < 1e-12
    check_against_reference(*(t.detach() for t in (anchor, positive, negative)), **options)


# A split of keys without a cell (query_to_query's) has LSE log(0) = -inf: numpy warns in the interpreter.
@pytest.mark.filterwarnings("ignore:divide by zero encountered in log:RuntimeWarning")
@pytest.mark.parametrize("guide", ["self", "guide"])
@pytest.mark.parametrize("variant, rows", [("symmetric", "group"), ("gte", "label")])
def test_triton_backend_matches_reference(variant, rows, guide):
    """The Triton kernels (interpreted here), with hard negatives and a queue: the reference's loss and gradients."""
    anchor, positive, negative = make_inputs(BATCH, 16, 2)
    queue = torch.randn(6, 16)
    strategy, margin = RULES[1] if guide == "self" else RULES[0]
    check_against_reference(anchor, positive, negative, torch.tensor(0.1), hard_negative_weight=0.6,
                            extra_negatives=queue, backend="triton", reduction="none", false_negative_margin=margin,
                            margin_strategy=strategy, **_guide_options(guide, anchor, positive, negative, queue),
                            **_row_options(rows), **VARIANTS[variant])


def test_a_guide_that_requires_grad_is_detached():
    anchor, positive = (t.requires_grad_() for t in make_inputs(BATCH, DIM, 0)[:2])
    guide = tuple(_guide_of(x.detach(), seed).float().requires_grad_() for seed, x in enumerate((anchor, positive)))
    module = InfoNCE(false_negative_margin=0.2, margin_strategy="relative")
    loss = module(anchor, positive, guide=guide)
    loss.backward()
    assert anchor.grad is not None and all(g.grad is None for g in guide)
    assert "false_negative_margin=0.2, margin_strategy='relative'" in repr(module)
    info_nce_reference(anchor, positive, false_negative_margin=0.2, guide=guide).backward()
    assert all(g.grad is None for g in guide)


def test_torch_compile_fullgraph():
    anchor, positive, negative = make_inputs(12, 8, 1)
    guide = tuple(_guide_of(x, seed).float() for seed, x in enumerate((anchor, positive, negative)))

    def step(a, p, n):
        guided = info_nce(a, p, n, symmetric=True, false_negative_margin=0.3, guide=guide)
        return guided + info_nce(a, p, n, false_negative_margin=-0.1, reduction="none").sum()

    assert_compiles_like_eager(step, (anchor, positive, negative))


def test_custom_op_passes_opcheck():
    from fastcse.ops import info_nce_op, op_arguments

    anchor, positive, negative = make_inputs(6, 5, 1, neg_2d=True)
    candidates = torch.cat([positive, negative])
    guide = GuideRows(torch.randn(6, 3), torch.randn(12, 3), None)
    variant = resolve_variant(directions=("query_to_doc", "doc_to_query", "doc_to_doc"), partition_mode="joint")
    for (grad_in_forward, reduction), rule_guide in itertools.product([(True, "mean"), (False, "none")],
                                                                      [None, guide]):
        problem = describe(anchor, candidates, None, pos_start=0, neg_start=6, num_neg=1, normalize=True,
                           hard_negative_weight=0.3, variant=variant, false_negative_margin=0.3,
                           margin_strategy="relative", guide=rule_guide)
        args = op_arguments(problem, anchor.requires_grad_(), candidates.requires_grad_(), torch.tensor(0.05),
                            reduction=reduction, grad_in_forward=grad_in_forward, backend="cpu", guide=rule_guide)
        torch.library.opcheck(info_nce_op, args, test_utils=("test_schema", "test_faketensor",
                                                             "test_autograd_registration"))


# ---------------------------------------------------------------- bad input
def _good():
    return make_inputs(4, 3, 1)


def _guide(width=2, rows=(4, 4, 4)):
    """Guide rows for _good()'s anchor, positive and negative ([4, 1, 3]: one hard negative each)."""
    return tuple(torch.randn(n, width) if i < 2 else torch.randn(n, 1, width) for i, n in enumerate(rows))


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(false_negative_margin=float("nan")), ValueError, "false_negative_margin must be a finite number"),
    (dict(false_negative_margin=float("inf")), ValueError, "false_negative_margin must be a finite number"),
    (dict(false_negative_margin="0.1"), ValueError, "false_negative_margin must be a finite number"),
    (dict(false_negative_margin=0.1, margin_strategy="absolut"), ValueError,
     "margin_strategy must be one of 'absolute', 'relative', got 'absolut'"),
    (dict(guide=_guide()), ValueError, "guide was given without false_negative_margin"),
    (dict(false_negative_margin=0.1, guide=_guide(rows=(4, 4))), ValueError,
     r"guide must be a tuple of 3 tensors \(anchor, positive, negative\)"),
    (dict(false_negative_margin=0.1, guide=_guide(rows=(4, 3, 4))), ValueError,
     r"guide\[1\] \(the positives' guide rows\) must be \[4, d_g\]"),
    (dict(false_negative_margin=0.1, guide=_guide(rows=(5, 4, 4))), ValueError, r"guide\[0\] .* must be \[4, d_g\]"),
    (dict(false_negative_margin=0.1, guide=_guide(rows=(4, 4, 6))), ValueError,
     r"guide\[2\] \(the hard negatives' guide rows\) must be \[4, 1, d_g\] like negative"),
    (dict(false_negative_margin=0.1, guide=(torch.randn(4, 2), torch.randn(4, 3), torch.randn(4, 1, 2))), ValueError,
     r"share one width d_g, got widths \[2, 3\]"),
    (dict(false_negative_margin=0.1, guide=(torch.ones(4, 2, dtype=torch.long),) + _guide(rows=(4, 4))), TypeError,
     r"guide\[0\] .* must be floating point"),
    (dict(false_negative_margin=0.1, guide=([[0.0]] * 4,) + _guide(rows=(4, 4))), TypeError,
     r"guide\[0\] .* must be a torch.Tensor"),
    (dict(false_negative_margin=0.1, guide=(torch.randn(4, 2, device="meta"),) + _guide(rows=(4, 4))), ValueError,
     r"guide\[0\] .* is on meta"),
    (dict(false_negative_margin=0.1, guide=_guide(), extra_negatives=torch.randn(5, 3)), ValueError,
     "extra_negatives with a guide need guide_extra_negatives"),
    (dict(false_negative_margin=0.1, guide=_guide(), extra_negatives=torch.randn(5, 3),
          guide_extra_negatives=torch.randn(4, 2)), ValueError, r"guide_extra_negatives must be \[5, d_g\]"),
    (dict(false_negative_margin=0.1, guide=_guide(), extra_negatives=torch.randn(5, 3),
          guide_extra_negatives=torch.randn(5, 7)), ValueError, r"guide_extra_negatives must be \[Q, 2\]"),
    (dict(false_negative_margin=0.1, guide_extra_negatives=torch.randn(5, 2)), ValueError,
     "guide_extra_negatives was given without guide"),
    (dict(false_negative_margin=0.1, guide=_guide(), guide_extra_negatives=torch.randn(5, 2)), ValueError,
     "guide_extra_negatives was given without extra_negatives"),
])
def test_bad_false_negative_options(kwargs, error, match):
    with pytest.raises(error, match=match):
        info_nce(*_good(), **kwargs)


def test_bad_options_fail_at_construction_and_in_the_reference():
    with pytest.raises(ValueError, match="margin_strategy must be one of"):
        InfoNCE(false_negative_margin=0.1, margin_strategy="rel")
    with pytest.raises(ValueError, match="false_negative_margin must be a finite number"):
        info_nce_reference(*_good(), false_negative_margin=float("nan"))


# ---------------------------------------------------------------- two gloo ranks
def _check_distributed(group):
    """Rows [0, 3) and [3, 8) of one batch on two ranks: the loss and the rows' gradients of
    the single-process reference, guided (the guide's rows gathered) and self-guided."""
    torch.manual_seed(0)  # one batch on both ranks
    rank = group.rank()
    sizes = [3, 5]
    start, batch = sum(sizes[:rank]), sizes[rank]
    anchor, positive, negative = make_inputs(8, DIM, 1, torch.float64)
    queue = torch.randn(4, DIM, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    guide = _guide_options("guide", anchor, positive, negative, queue)
    ids = torch.tensor([0, 1, 0, 2, 3, 1, 4, 2])
    failures = []
    for guided, variant, rows in itertools.product((False, True), ("gte", "symmetric"), ("group", "label")):
        options = dict(VARIANTS[variant], false_negative_margin=0.5, margin_strategy="relative",
                       extra_negatives=queue)
        mine_rows = {"group_ids" if rows == "group" else "labels": ids[start:start + batch]}
        full_rows = {"group_ids" if rows == "group" else "labels": ids}
        mine_guide = {}
        if guided:
            mine_guide = dict(guide=tuple(g[start:start + batch] for g in guide["guide"]),
                              guide_extra_negatives=guide["guide_extra_negatives"])
        mine = [x[start:start + batch].clone().requires_grad_() for x in (anchor, positive, negative)]
        loss = info_nce(*mine, process_group=group, backend="cpu", **options, **mine_rows, **mine_guide)
        loss.backward()
        full = [x.clone().requires_grad_() for x in (anchor, positive, negative)]
        ref = info_nce_reference(*full, **options, **full_rows, **(guide if guided else {}))
        ref.backward()
        try:
            torch.testing.assert_close(loss, ref.detach(), rtol=1e-10, atol=1e-10)
            for got, want in zip(mine, full):
                torch.testing.assert_close(got.grad, want.grad[start:start + batch], rtol=1e-9, atol=1e-10)
        except AssertionError as error:
            failures.append(f"rank {rank} guided={guided} {variant} {rows}: {error}")
    return failures


def _distributed_worker(rank, world, port, results):
    failures = []
    try:
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=60))
        failures = _check_distributed(dist.group.WORLD)
        dist.destroy_process_group()
    except Exception:  # a crash is a failure to report, not a hang of the parent
        failures.append(f"rank {rank} crashed:\n{traceback.format_exc()}")
    results.put((rank, failures))


def test_two_gloo_ranks_match_the_single_process_reference():
    pytest.importorskip("fastcse._C", reason="the distributed path needs the C++ extension")
    reports = spawn_world(_distributed_worker, 2, timeout_s=150)
    failures = [f for rank in sorted(reports) for f in reports[rank]]
    assert not failures, "\n".join(failures)
