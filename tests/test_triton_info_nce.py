"""The Triton kernels of fastcse.info_nce, run through the Triton interpreter on CPU tensors.

conftest.py sets TRITON_INTERPRET=1, so backend="triton" launches the very kernels that run on
GPUs, program by program, on CPU tensors (with 16 x 16 x 16 tiles, so small shapes cross
several tiles). Every loss and gradient (anchor, positive, negative, learnable temperature) is
compared with info_nce_reference computed in fp64 from the same (rounded) inputs.
"""

from __future__ import annotations

import math

import pytest
import torch

import fastcse
from fastcse import cpu, triton_info_nce
from fastcse.reference import info_nce_reference

# fp32: the 2e-4; 16-bit: the inputs are exact in the reference, the error is the
# kernels' rounding of dS to the input dtype before the two gradient products.
TOL = {torch.float32: 2e-4, torch.float16: 2e-2, torch.bfloat16: 3e-2}


def _inputs(batch, num_neg, dim, dtype, seed, scale=1.0):
    """Anchors, positives near them, negatives ([B, d] for k = 1 given as 2-D, else [B, k, d])."""
    gen = torch.Generator().manual_seed(seed)
    anchor = torch.randn(batch, dim, generator=gen) * scale
    positive = anchor + 0.8 * scale * torch.randn(batch, dim, generator=gen)
    negative = None
    if num_neg:
        negative = anchor[:, None] + 1.2 * scale * torch.randn(batch, num_neg, dim, generator=gen)
        if num_neg == 1:
            negative = negative[:, 0]
    return [x.to(dtype) if x is not None else None for x in (anchor, positive, negative)]


def _loss_and_grads(fn, tensors, tau, upstream, dtype=None, **options):
    leaves = [x.detach().to(dtype or x.dtype).requires_grad_() if x is not None else None for x in tensors]
    temperature = torch.tensor(tau, dtype=dtype or torch.float32, requires_grad=True)
    loss = fn(*leaves, temperature=temperature, **options)
    loss.backward(upstream.to(loss.dtype))
    grads = [x.grad for x in leaves if x is not None] + [temperature.grad]
    return loss.detach(), grads


def _assert_close(name, actual, expected, tol, floor=1e-2):
    assert torch.isfinite(actual).all(), f"{name}: non-finite values {actual}"
    actual = actual.double()
    scale = expected.abs().max().item()
    err = (actual - expected).abs().max().item()
    # Relative to the element and to the tensor's scale (gradients of a mean are ~1/B each), which
    # is stricter than the absolute tol unless the tensor's scale is below the floor.
    ok = torch.allclose(actual, expected, rtol=tol, atol=tol * max(scale, floor))
    assert ok, f"{name}: max abs error {err:.3g} (tensor scale {scale:.3g}, tol {tol})"


def check_against_reference(batch, num_neg, dim, *, dtype=torch.float32, tau=0.05, normalize=True,
                            symmetric=False, weight=0.0, reduction="mean", seed=0, scale=1.0, tensors=None,
                            floor=1e-2):
    tensors = tensors if tensors is not None else _inputs(batch, num_neg, dim, dtype, seed, scale)
    gen = torch.Generator().manual_seed(seed + 1)
    # "none" gets per-row upstream gradients (the recompute path); scalar reductions a non-unit scalar.
    upstream = torch.rand(batch, generator=gen) + 0.5 if reduction == "none" else torch.tensor(1.7)
    options = dict(normalize=normalize, symmetric=symmetric, hard_negative_weight=weight, reduction=reduction)
    loss, grads = _loss_and_grads(fastcse.info_nce, tensors, tau, upstream, backend="triton", **options)
    ref_loss, ref_grads = _loss_and_grads(info_nce_reference, tensors, tau, upstream.double(), dtype=torch.float64,
                                          **options)
    assert loss.dtype == torch.float32
    tol = TOL[dtype]
    _assert_close("loss", loss, ref_loss, tol, floor)
    for name, g, ref in zip(("anchor", "positive", "negative")[: len(grads) - 1] + ("temperature",), grads,
                            ref_grads):
        assert g.dtype == (dtype if name != "temperature" else torch.float32)
        _assert_close(f"d{name}", g, ref, tol, floor)


# Every combination of normalize x symmetric x (k, weight), reductions rotating through them.
_HARD = [(0, 0.0), (1, 0.7), (3, -0.4)]
OPTION_CASES = [
    (normalize, symmetric, k, w, ("mean", "sum", "none")[i % 3])
    for i, (normalize, symmetric, (k, w)) in enumerate(
        (n, s, h) for n in (True, False) for s in (False, True) for h in _HARD)
]


@pytest.mark.parametrize("normalize,symmetric,num_neg,weight,reduction", OPTION_CASES)
def test_options_fp32(normalize, symmetric, num_neg, weight, reduction):
    # 19 rows and up to 76 candidates: two row blocks and five column tiles of 16, the last ones partial.
    check_against_reference(19, num_neg, 24, normalize=normalize, symmetric=symmetric, weight=weight,
                            reduction=reduction, scale=1.0 if normalize else 0.15)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_reductions_symmetric_hard_negatives(reduction):
    check_against_reference(21, 2, 20, symmetric=True, weight=0.5, reduction=reduction, seed=3)


@pytest.mark.parametrize("tau,symmetric,reduction", [
    (0.01, True, "none"),   # 2/tau = 200: the reverse LSE needs the column sweep, not the fixed max
    (0.01, False, "mean"),
    (0.02, True, "mean"),
    (0.025, True, "sum"),   # the smallest tau on the fused fixed-max path (2/tau = 80)
    (1.0, True, "mean"),
])
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
    check_against_reference(18, 1, 20, tau=tau, symmetric=True, reduction="none", tensors=(anchor, positive, negative))


@pytest.mark.parametrize("batch,num_neg,dim,symmetric", [
    (1, 0, 8, False),    # one candidate: loss 0, gradients 0
    (1, 2, 5, True),
    (17, 0, 7, True),
    (31, 1, 37, False),  # primes everywhere
    (13, 3, 100, True),  # d not a power of two, several d chunks
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
    check_against_reference(3, 1, 1, normalize=normalize, symmetric=True, weight=0.4, tau=0.1, reduction="none",
                            tensors=(anchor, positive, negative), floor=1.0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("normalize,symmetric,num_neg,reduction,tau", [
    (True, True, 1, "mean", 0.05),
    (True, False, 3, "none", 0.02),
    (False, True, 2, "sum", 0.05),
])
def test_half_precision(dtype, normalize, symmetric, num_neg, reduction, tau):
    check_against_reference(18, num_neg, 40, dtype=dtype, tau=tau, normalize=normalize, symmetric=symmetric,
                            weight=0.4, reduction=reduction, scale=1.0 if normalize else 0.15, seed=7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_large_dot_product_logits_do_not_overflow(dtype):
    # normalize=False with logits up to several hundred (1/tau = 100 and beyond): online softmax.
    check_against_reference(20, 1, 32, dtype=dtype, tau=0.01, normalize=False, symmetric=True, scale=0.6,
                            reduction="none", seed=11)


@pytest.mark.parametrize("symmetric", [False, True])
def test_zero_rows(symmetric):
    anchor, positive, negative = _inputs(12, 2, 24, torch.float32, seed=13)
    anchor[3] = 0.0
    positive[5] = 0.0
    negative[7, 1] = 0.0
    anchor[6] *= 5e-13 / anchor[6].norm()  # 0 < ||x|| < eps: x_hat = x / eps, no projection in the backward
    check_against_reference(12, 2, 24, symmetric=symmetric, weight=0.3, reduction="none",
                            tensors=(anchor, positive, negative))


def test_zero_rows_low_precision_loss_is_finite():
    anchor, positive, _ = _inputs(9, 0, 16, torch.bfloat16, seed=17)
    anchor[0] = 0.0
    positive[:4] = 0.0
    loss = fastcse.info_nce(anchor, positive, symmetric=True, reduction="none", backend="triton")
    ref = info_nce_reference(anchor.double(), positive.double(), symmetric=True, reduction="none")
    _assert_close("loss", loss, ref, TOL[torch.bfloat16])


def test_duplicate_rows():
    anchor, positive, negative = _inputs(14, 1, 24, torch.float32, seed=19)
    anchor[9] = anchor[2]
    positive[9] = positive[2]       # two identical candidates: tied logits
    negative[4] = positive[4]       # a hard negative equal to its own positive
    check_against_reference(14, 1, 24, symmetric=True, weight=0.5, reduction="none",
                            tensors=(anchor, positive, negative))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_production_block_sizes(dtype, monkeypatch):
    """The GPU tile configuration (64 x 64 / 64 x 32 tiles, 16/32-wide d chunks), masked at every edge."""
    small_config = triton_info_nce.select_config

    def gpu_config(dt, dim, **kw):
        return small_config(dt, dim, interpret=True, small=False)

    monkeypatch.setattr(triton_info_nce, "select_config", gpu_config)
    assert triton_info_nce.select_config(dtype, 80).fwd.block_m > 16
    # 130 rows: three row blocks of 64, the last of 2 rows; 260 candidates; d = 80: 3 or 5 chunks.
    check_against_reference(130, 1, 80, dtype=dtype, symmetric=True, weight=0.3, reduction="none", seed=23)


def _backend_args(batch, num_neg, pos_start):
    return dict(pos_start=pos_start, neg_start=3 * batch, num_neg=num_neg, normalize=True,
                hard_negative_weight=0.6)


@pytest.mark.parametrize("symmetric", [False, True])
def test_backend_contract_against_cpu(symmetric):
    """forward/backward called directly, as distributed.py does (targets not at column i)."""
    gen = torch.Generator().manual_seed(29)
    batch, num_neg, dim = 11, 2, 24
    pos_start = 0 if symmetric else batch  # a rank > 0: its positives sit after another rank's
    anchor = torch.randn(batch, dim, generator=gen)
    candidates = torch.randn(3 * batch + batch * num_neg, dim, generator=gen)
    options = dict(_backend_args(batch, num_neg, pos_start), symmetric=symmetric)
    tau = 0.04
    grad_rows = torch.rand(batch, generator=gen)
    row_loss, lse, lse_rev, grads = triton_info_nce.forward(anchor, candidates, tau, compute_grad=True, **options)
    ref_loss, ref_lse, ref_lse_rev, ref_grads = cpu.forward(anchor.double(), candidates.double(), tau,
                                                            compute_grad=True, **options)
    back = triton_info_nce.backward(grad_rows, anchor, candidates, tau, lse, lse_rev, **options)
    ref_back = cpu.backward(grad_rows.double(), anchor.double(), candidates.double(), tau, ref_lse, ref_lse_rev,
                            **options)
    for name, x, ref in [("row_loss", row_loss, ref_loss), ("lse", lse, ref_lse)]:
        assert x.dtype == torch.float32 and x.shape == (batch,)
        _assert_close(name, x, ref, 2e-4)
    if symmetric:
        _assert_close("lse_rev", lse_rev, ref_lse_rev, 2e-4)
    else:
        assert lse_rev.numel() == 0
    for kind, got, want in [("fused", grads, ref_grads), ("backward", back, ref_back)]:
        for name, x, ref in zip(("anchor", "candidates", "tau"), got, want):
            assert x.dtype == torch.float32 and x.shape == ref.shape, (kind, name, x.dtype, x.shape)
            _assert_close(f"{kind} d{name}", x, ref, 2e-4)


_INVALID_PROBLEMS = [  # (anchor rows, candidates shape, dtype of the candidates, options, error, match)
    (4, (12, 8), torch.float32, dict(pos_start=0, neg_start=2, num_neg=2, symmetric=True, hard_negative_weight=0.5),
     ValueError, "hard negatives after the positives"),
    (4, (12, 8), torch.float32, dict(pos_start=4, neg_start=8, num_neg=1, symmetric=True, hard_negative_weight=0.0),
     ValueError, "positives as the first B candidates"),
    (4, (3, 8), torch.float32, dict(pos_start=0, neg_start=4, num_neg=0, symmetric=True, hard_negative_weight=0.0),
     ValueError, "positives as the first B candidates"),
    (4, (12, 8), torch.float16, dict(pos_start=0, neg_start=4, num_neg=2, symmetric=False, hard_negative_weight=0.5),
     TypeError, "candidates have dtype"),
    (4, (12, 6), torch.float32, dict(pos_start=0, neg_start=4, num_neg=2, symmetric=False, hard_negative_weight=0.5),
     ValueError, "candidates must be"),
]


@pytest.mark.parametrize("backend", [cpu, triton_info_nce], ids=["cpu", "triton"])
@pytest.mark.parametrize("batch,shape,dtype,options,error,match", _INVALID_PROBLEMS)
def test_backends_reject_the_same_problems(backend, batch, shape, dtype, options, error, match):
    """One problem description (fastcse.problem) for both backends: the CPU one used to accept a
    hard-negative bias inside the positive block with symmetric, which leaks into the reverse direction."""
    anchor, candidates = torch.randn(batch, 8), torch.randn(*shape).to(dtype)
    with pytest.raises(error, match=match):
        backend.forward(anchor, candidates, 0.05, normalize=True, compute_grad=False, **options)
    lse = torch.zeros(batch)
    with pytest.raises(error, match=match):
        backend.backward(torch.ones(batch), anchor, candidates, 0.05, lse, lse, normalize=True, **options)


@pytest.mark.parametrize("tau,fused", [(0.025, True), (0.0249, False)])
def test_fixed_max_path_selection(monkeypatch, tau, fused):
    """The atomics path is used exactly where exp(s - 1/tau) cannot underflow fp32, and at its edge
    (every reverse score at the bound -1/tau, exp(s - M) = exp(-80)) its reverse LSE is exact."""
    assert triton_info_nce._fixed_max_is_safe(True, tau) == fused
    assert not triton_info_nce._fixed_max_is_safe(False, 1.0)
    launches = []
    launch = triton_info_nce._launch_forward

    def recording_launch(*args, **kwargs):
        launches.append(kwargs.get("col_sum") is not None)
        return launch(*args, **kwargs)

    monkeypatch.setattr(triton_info_nce, "_launch_forward", recording_launch)
    batch = 18
    anchor = torch.randn(1, 20).abs().expand(batch, 20).contiguous()  # all one direction
    candidates = torch.cat([-anchor, torch.randn(batch, 20)])  # positive i = -anchor i: s_rev = -1/tau
    _, _, lse_rev, _ = triton_info_nce.forward(anchor, candidates, tau, pos_start=0, neg_start=batch, num_neg=1,
                                               normalize=True, symmetric=True, hard_negative_weight=0.0,
                                               compute_grad=False)
    assert launches == ([True] if fused else [False, False])
    expected = torch.full((batch,), -1 / tau + math.log(batch), dtype=torch.float64)  # LSE of B equal terms
    _assert_close("lse_rev", lse_rev, expected, 2e-4)


def test_column_splits_cover_every_tile_without_empty_splits():
    cpu_device = torch.device("cpu")
    seen = set()
    for row_blocks in range(1, 9):
        for tiles in range(1, 40):
            splits = triton_info_nce._column_splits(row_blocks, tiles, cpu_device)
            per = math.ceil(tiles / splits)
            assert 1 <= splits <= tiles
            assert (splits - 1) * per < tiles <= splits * per, (row_blocks, tiles, splits)
            seen.add(splits)
    assert seen == {1, 2, 3, 4}  # the interpreter aims at 4 programs: single and multi-split both occur


def test_no_tensor_of_batch_times_candidates_size():
    """Every tensor the launch code creates (statistics, partials, gradients) is O((B + N) d)."""
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

    batch, num_neg, dim = 40, 3, 12  # N = 160 candidates: B N = 6400 > N d = 1920
    anchor, positive, negative = _inputs(batch, num_neg, dim, torch.float32, seed=37)
    candidates = torch.cat([positive, negative.reshape(-1, dim)])
    options = dict(pos_start=0, neg_start=batch, num_neg=num_neg, normalize=True, symmetric=True,
                   hard_negative_weight=0.5)
    with LargestTensor():
        _, lse, lse_rev, grads = triton_info_nce.forward(anchor, candidates, 0.01, compute_grad=True, **options)
        triton_info_nce.backward(torch.ones(batch), anchor, candidates, 0.01, lse, lse_rev, **options)
    assert grads is not None
    # The largest is d(candidates), [N, d] fp32; a score block would be B N fp32 (3.3x more).
    assert LargestTensor.largest == candidates.numel() * 4, LargestTensor.largest


def _assert_rows_close(name, actual, expected, tol, rows):
    """Each of ``rows`` against its own scale. Where the reference gradient is near or beyond
    the dtype's range (a zero row's d(x_hat) / eps in fp16) only its sign is checked: the
    gradient rounds to the largest value or to the signed infinity, never to NaN."""
    actual, expected = actual.reshape(-1, actual.shape[-1]), expected.reshape(-1, expected.shape[-1])
    assert not actual.isnan().any(), f"{name}: NaN in rows {actual.isnan().any(1).nonzero().flatten().tolist()}"
    edge = torch.finfo(actual.dtype).max / 2
    for row in rows:
        got, want = actual[row], expected[row]
        huge = want.abs() > edge
        assert torch.equal(got[huge].double().sign(), want[huge].sign()), f"{name}[{row}]: {got[huge]}"
        if not huge.all():
            _assert_close(f"{name}[{row}]", got[~huge], want[~huge], tol)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("symmetric,reduction", [(False, "none"), (True, "mean")])
def test_zero_and_tiny_rows_half_precision_gradients(dtype, symmetric, reduction):
    """A zero row and rows of norm 4e-5 in 16-bit inputs: every gradient row matches the fp64
    reference (1 / ||x|| up to 1e12 never multiplies a 16-bit operand of the gradient products)."""
    anchor, positive, negative = _inputs(12, 2, 24, torch.float32, seed=41)
    for x, row in ((anchor, 3), (positive, 5), (negative[7], 1)):
        x[row] = 0.0
    for x, row in ((anchor, 6), (positive, 8), (negative[2], 0)):
        x[row] *= 4e-5 / x[row].norm()
    tensors = [x.to(dtype) for x in (anchor, positive, negative)]
    upstream = torch.rand(12) + 0.5 if reduction == "none" else torch.tensor(1.0)
    options = dict(symmetric=symmetric, hard_negative_weight=0.3, reduction=reduction)
    loss, grads = _loss_and_grads(fastcse.info_nce, tensors, 0.05, upstream, backend="triton", **options)
    ref_loss, ref_grads = _loss_and_grads(info_nce_reference, tensors, 0.05, upstream.double(),
                                          dtype=torch.float64, **options)
    _assert_close("loss", loss, ref_loss, TOL[dtype])
    for name, got, want, rows in zip(("anchor", "positive", "negative"), grads, ref_grads, (12, 12, 24)):
        _assert_rows_close(f"d{name}", got, want, TOL[dtype], range(rows))
    _assert_close("dtemperature", grads[3], ref_grads[3], TOL[dtype])
