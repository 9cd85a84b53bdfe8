"""The reference harness that the test suite and the GPU validation kit share: one home for the
tolerances of the Triton backend, the inputs it is checked on, the option grids both enumerate,
and the rule that compares a backend's loss and every gradient with ``info_nce_reference`` in fp64.

The tests (``tests/test_triton_info_nce.py``) assert with it on the CPU through the Triton
interpreter; ``python -m fastcse gpu-check`` reports with it on a GPU. Both read the same numbers
here, so a tolerance or a case changed for one is changed for the other.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch

import fastcse

# fp32: the loss's accuracy target of 2e-4 (3xTF32 products on a GPU). 16-bit: the inputs are
# exact in the fp64 reference; the error is the kernels' rounding of dS to the input dtype before
# the two gradient products.
TOL = {torch.float32: 2e-4, torch.float16: 2e-2, torch.bfloat16: 3e-2}
# Errors are measured against max(the tensor's scale, FLOOR): gradients of a mean are ~1/B each,
# and a tensor whose scale is below the floor is held to an absolute tol * FLOOR instead.
FLOOR = 1e-2

# --------------------------------------------------------------------------------------------
# The cases both enumerate
# --------------------------------------------------------------------------------------------

# Hard negatives per row and SimCSE's weight on them: none, one with a bias, three with a negative one.
_HARD = ((0, 0.0), (1, 0.7), (3, -0.4))
# Every combination of normalize x symmetric x (k, weight), the reductions rotating through them:
# (normalize, symmetric, k, weight, reduction).
OPTION_GRID = tuple((normalize, symmetric, k, w, ("mean", "sum", "none")[i % 3]) for i, (normalize, symmetric, (k, w))
                    in enumerate((n, s, h) for n in (True, False) for s in (False, True) for h in _HARD))
# The 16-bit cases: (normalize, symmetric, k, reduction, tau), each with HALF_PRECISION_WEIGHT.
HALF_PRECISION_CASES = ((True, True, 1, "mean", 0.05), (True, False, 3, "none", 0.02), (False, True, 2, "sum", 0.05))
HALF_PRECISION_WEIGHT = 0.4
# Small and large temperatures: (tau, symmetric, reduction).
TEMPERATURE_CASES = (
    (0.01, True, "none"),  # 2/tau = 200: the reverse LSE needs the column sweep, not the fixed max
    (0.01, False, "mean"),
    (0.025, True, "sum"),  # the smallest tau on the fused fixed-max path (2/tau = 80)
    (1.0, True, "mean"),
)

# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------


def draw_inputs(batch: int, num_neg: int, dim: int, dtype: torch.dtype = torch.float32, seed: int = 0,
                scale: float = 1.0, *, special_rows: bool = False) -> list[torch.Tensor | None]:
    """Anchors, positives near them, negatives ([B, d] for k = 1, else [B, k, d]), drawn in fp32 on
    the CPU from ``seed`` and rounded to ``dtype``; zero and tiny rows planted on request."""
    gen = torch.Generator().manual_seed(seed)
    anchor = torch.randn(batch, dim, generator=gen) * scale
    positive = anchor + 0.8 * scale * torch.randn(batch, dim, generator=gen)
    negative = None
    if num_neg:
        negative = anchor[:, None] + 1.2 * scale * torch.randn(batch, num_neg, dim, generator=gen)
    if special_rows:
        plant_zero_and_tiny_rows(anchor, positive, negative, dtype)
    if negative is not None and num_neg == 1:
        negative = negative[:, 0]
    return [x.to(dtype) if x is not None else None for x in (anchor, positive, negative)]


def plant_zero_and_tiny_rows(anchor: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor | None,
                             dtype: torch.dtype) -> None:
    """Exact zeros, and rows of norm below eps (fp32: x / eps without projection) or 4e-5 (16-bit:
    1/||x|| = 2.5e4 must never scale a 16-bit operand), at rows 3, 5, 6, 8 and in the negatives
    [B, k, d] at (7, last) and (2, 0); needs B >= 9."""
    tiny = 5e-13 if dtype == torch.float32 else 4e-5
    anchor[3] = 0.0
    positive[5] = 0.0
    anchor[6] *= tiny / anchor[6].norm()
    positive[8] *= tiny / positive[8].norm()
    if negative is not None:
        negative[7, -1] = 0.0
        negative[2, 0] *= tiny / negative[2, 0].norm()


def upstream_gradient(batch: int, reduction: str, seed: int) -> torch.Tensor:
    """The gradient fed to the loss's backward: per-row and non-uniform for "none" (the recompute
    path), a non-unit scalar for "mean" and "sum" (the gradients computed in the forward)."""
    gen = torch.Generator().manual_seed(seed + 1)
    return torch.rand(batch, generator=gen) + 0.5 if reduction == "none" else torch.tensor(1.7)


# Keyword tensors that never get a gradient: the guide's rows only decide which keys the rule
# leaves out (info_nce detaches them). They are passed to both functions as given, not recast
# and not compared: the backend and the fp64 reference then apply the rule to the same rows.
NON_DIFFERENTIABLE_KEYWORDS = frozenset({"guide_extra_negatives"})


def _leaf(x: torch.Tensor, device: torch.device | None, dtype: torch.dtype | None) -> torch.Tensor:
    return x.detach().to(device=device or x.device, dtype=dtype or x.dtype).requires_grad_()


def loss_and_grads(fn: Callable[..., torch.Tensor], tensors: Sequence[torch.Tensor | None], tau: float,
                   upstream: torch.Tensor, dtype: torch.dtype | None = None, *, device: torch.device | None = None,
                   learnable_tau: bool = True, **options) -> dict[str, torch.Tensor | None]:
    """{"loss", "anchor", "positive", "negative", every floating-point keyword tensor (e.g.
    "extra_negatives"; not the guide's, NON_DIFFERENTIABLE_KEYWORDS), "temperature"}: the loss and
    the gradients of its ``upstream``-weighted
    backward. ``tensors`` are (anchor, positive, negative); a fourth is the extra negatives (a
    queue). ``dtype`` recasts the inputs (fp64 for the reference); ``learnable_tau``: the
    temperature is a 0-dim tensor that requires grad, else a plain float (no "temperature" entry)."""
    if len(tensors) == 4:
        tensors, options = tensors[:3], dict(options, extra_negatives=tensors[3])
    names = ("anchor", "positive", "negative")
    leaves = {n: _leaf(x, device, dtype) for n, x in zip(names, tensors) if x is not None}
    keyword_leaves = {k: _leaf(v, device, dtype) for k, v in options.items()
                      if isinstance(v, torch.Tensor) and v.is_floating_point() and k not in NON_DIFFERENTIABLE_KEYWORDS}
    temperature = torch.tensor(tau, dtype=dtype or torch.float32, device=device, requires_grad=True) \
        if learnable_tau else tau
    loss = fn(*leaves.values(), temperature=temperature, **(options | keyword_leaves))
    loss.backward(upstream.to(device=loss.device, dtype=loss.dtype))
    out = {"loss": loss.detach()} | {n: leaf.grad for n, leaf in (leaves | keyword_leaves).items()}
    if learnable_tau:
        out["temperature"] = temperature.grad
    return out


def loss_and_grad_list(fn, tensors, tau, upstream, dtype=None, **options) -> tuple[torch.Tensor, list]:
    """``loss_and_grads`` as (loss, [d anchor, d positive, d negative, d queue, d temperature]),
    the inputs that are None left out: for unpacking by position."""
    out = loss_and_grads(fn, tensors, tau, upstream, dtype, **options)
    return out.pop("loss"), list(out.values())


# --------------------------------------------------------------------------------------------
# The comparison rule
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Agreement:
    """How one tensor compares with its fp64 reference. ``error`` is max |x - ref| / (max(scale,
    floor) + |ref|): allclose(rtol=tol, atol=tol * max(scale, floor)) holds exactly when
    error <= tol, so a reported number and its verdict never disagree."""

    ok: bool
    error: float
    scale: float
    detail: str = ""


def agreement(actual: torch.Tensor, expected: torch.Tensor, tol: float, floor: float = FLOOR) -> Agreement:
    """Finite, and allclose with rtol=tol, atol=tol * max(scale, floor), scale = max |expected|."""
    if actual.shape != expected.shape:
        return Agreement(False, math.inf, math.nan, f"shape {tuple(actual.shape)} != {tuple(expected.shape)}")
    if actual.numel() == 0:
        return Agreement(True, 0.0, 0.0)
    if not torch.isfinite(actual).all():
        return Agreement(False, math.inf, math.nan, "non-finite values")
    actual, expected = actual.double(), expected.double()
    scale = expected.abs().max().item()
    ok = torch.allclose(actual, expected, rtol=tol, atol=tol * max(scale, floor))
    error = ((actual - expected).abs() / (max(scale, floor) + expected.abs())).max().item()
    return Agreement(bool(ok), error, scale)


def row_agreement(actual: torch.Tensor, expected: torch.Tensor, tol: float, floor: float = FLOOR) -> Agreement:
    """``agreement`` for each row against its own scale. Where the reference is near or past the
    dtype's range (a zero row's d(x_hat) / eps in fp16) only the sign is checked: the gradient may
    round to the largest value or to the signed infinity, never to NaN."""
    if actual.shape != expected.shape:
        return Agreement(False, math.inf, math.nan, f"shape {tuple(actual.shape)} != {tuple(expected.shape)}")
    rows_a = actual.reshape(-1, actual.shape[-1]).double()
    rows_e = expected.reshape(-1, expected.shape[-1]).double()
    if rows_a.isnan().any():
        return Agreement(False, math.inf, math.nan, f"NaN in rows {rows_a.isnan().any(1).nonzero().flatten().tolist()}")
    huge = rows_e.abs() > torch.finfo(actual.dtype).max / 2
    if not torch.equal(rows_a[huge].sign(), rows_e[huge].sign()):
        return Agreement(False, math.inf, math.nan, "wrong sign where the gradient exceeds the dtype's range")
    a, e = rows_a.masked_fill(huge, 0.0), rows_e.masked_fill(huge, 0.0)
    if not torch.isfinite(a).all():
        return Agreement(False, math.inf, math.nan, "non-finite values within the dtype's range")
    row_scale = e.abs().amax(dim=1, keepdim=True).clamp_min(floor)
    within = (a - e).abs() <= tol * row_scale + tol * e.abs()
    error = ((a - e).abs() / (row_scale + e.abs())).max().item() if a.numel() else 0.0
    return Agreement(bool(within.all()), error, e.abs().max().item() if e.numel() else 0.0)


def agreement_reason(name: str, result: Agreement, tol: float) -> str:
    return f"{name}: error {result.error:.3g} of scale {result.scale:.3g} > tol {tol:g}" + \
        (f" ({result.detail})" if result.detail else "")


@dataclass
class Comparison:
    """A loss and its gradients against the reference: all within tolerance or not, each tensor's
    error ("<name>_error"), the worst gradient, and the reasons of the failures."""

    ok: bool
    numbers: dict = field(default_factory=dict)
    reason: str = ""


def compare_results(got: dict[str, torch.Tensor | None], want: dict[str, torch.Tensor], tol: float,
                    floor: float = FLOOR, rowwise: Iterable[str] = (), floors: dict[str, float] | None = None
                    ) -> Comparison:
    """Every tensor of ``want`` against ``got``'s: ``rowwise`` names by ``row_agreement``, the
    others by ``agreement``; ``floors`` overrides the floor per name."""
    rowwise, floors = set(rowwise), floors or {}
    numbers, reasons = {"tol": tol}, []
    worst_name, worst = None, -1.0
    for name, ref in want.items():
        value = got.get(name)
        if value is None:
            reasons.append(f"{name}: missing (no gradient returned)")
            continue
        compare = row_agreement if name in rowwise else agreement
        result = compare(value, ref, tol, floors.get(name, floor))
        numbers[f"{name}_error"] = result.error
        if name != "loss" and result.error > worst:
            worst_name, worst = name, result.error
        if not result.ok:
            reasons.append(agreement_reason(name, result, tol))
    numbers["worst_grad"], numbers["worst_grad_error"] = worst_name, worst if worst_name else None
    return Comparison(not reasons, numbers, "; ".join(reasons))


def temperature_floor(row_weights: torch.Tensor, tau: float) -> float:
    """The scale below which d(tau) is cancellation, not signal. d(tau) = -(1/tau) sum_cells G s
    with |s| <= 1/tau (cosine): terms of size g_i / tau^2 cancel within and across rows (exact
    fp32 arithmetic, the reference's included, errs by ~1e-5 relative to them at small shapes),
    so d(tau) is checked against sum_i |g_i| / tau, tau times below the terms' size."""
    return row_weights.abs().sum().item() / tau


def row_weights(upstream: torch.Tensor, batch: int, reduction: str) -> torch.Tensor:
    """[B]: each row's weight in the loss's backward, the upstream gradient (over B for "mean")."""
    return upstream.expand(batch) / (batch if reduction == "mean" else 1)


def temperature_floors(upstream: torch.Tensor, batch: int, reduction: str, tau: float, normalize: bool,
                       floor: float = FLOOR) -> dict[str, float]:
    """``compare_results``' ``floors`` for d(tau): ``temperature_floor`` of the rows' weights (the
    upstream gradient, over B for "mean") with cosine logits; the plain floor with dot products,
    whose logits have no bound. The rounding of a 16-bit backend errs on d(tau) in proportion to
    the terms it sums, not to their sum: e.g. a bf16 case whose d(tau) of 1.85 is the sum of terms
    totalling 572 (a 309-fold cancellation) is off by 0.17, 3e-4 of the terms, below bf16's unit
    roundoff 2^-8 but 9% of the sum."""
    return {"temperature": max(floor, temperature_floor(row_weights(upstream, batch, reduction), tau))
            if normalize else floor}


# --------------------------------------------------------------------------------------------
# The rule as assertions (the test suite's form)
# --------------------------------------------------------------------------------------------


def assert_close(name: str, actual: torch.Tensor, expected: torch.Tensor, tol: float, floor: float = FLOOR) -> None:
    """``agreement`` as an assertion; shapes broadcast as in ``torch.allclose`` (a [1] d(tau)
    against a 0-dim one)."""
    assert torch.isfinite(actual).all(), f"{name}: non-finite values {actual}"
    actual, expected = torch.broadcast_tensors(actual.double(), expected.double())
    result = agreement(actual, expected, tol, floor)
    err = (actual - expected).abs().max().item() if expected.numel() else 0.0
    assert result.ok, f"{name}: max abs error {err:.3g} (tensor scale {result.scale:.3g}, tol {tol})"


def assert_rows_close(name: str, actual: torch.Tensor, expected: torch.Tensor, tol: float,
                      rows: Iterable[int] | None = None) -> None:
    """``row_agreement`` as an assertion, on ``rows`` of the [-1, d] view (all by default)."""
    actual, expected = actual.reshape(-1, actual.shape[-1]), expected.reshape(-1, expected.shape[-1])
    assert not actual.isnan().any(), f"{name}: NaN in rows {actual.isnan().any(1).nonzero().flatten().tolist()}"
    if rows is not None:
        index = torch.tensor(list(rows), dtype=torch.long)
        actual, expected = actual[index], expected[index]
    result = row_agreement(actual, expected, tol)
    assert result.ok, agreement_reason(name, result, tol)


def assert_compiles_like_eager(step: Callable[..., torch.Tensor], tensors: Sequence[torch.Tensor]) -> None:
    """``torch.compile(step, fullgraph=True)`` (the aot_eager backend: the graph capture and the
    autograd trace, no codegen) gives the same loss and the same gradients of ``tensors`` as
    ``step`` run eagerly: the custom op traces without a graph break."""
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    leaves = [t.clone().requires_grad_() for t in tensors]
    loss = compiled(*leaves)
    loss.backward()
    ref_leaves = [t.clone().requires_grad_() for t in tensors]
    ref = step(*ref_leaves)
    ref.backward()
    torch.testing.assert_close(loss, ref)
    for got, want in zip(leaves, ref_leaves):
        torch.testing.assert_close(got.grad, want.grad)


def check_against_reference(batch, num_neg, dim, *, dtype=torch.float32, tau=0.05, seed=0, scale=1.0, tensors=None,
                            queue=0, floor=FLOOR, weight=0.0, **options):
    """Asserts that fastcse.info_nce(backend="triton") equals the fp64 reference: the loss in fp32,
    every gradient in its input's dtype and within TOL[dtype]. "mean"/"sum" take the
    gradients-in-forward path, "none" (per-row upstream gradients) the backward's recompute.
    ``queue``: that many extra negatives, requiring grad (their gradient is checked too);
    ``weight``: hard_negative_weight; ``options``: any other keyword of info_nce (normalize,
    reduction, directions, hardness_mode, group_ids, labels, ...)."""
    tensors = tensors if tensors is not None else draw_inputs(batch, num_neg, dim, dtype, seed, scale)
    if queue:
        gen = torch.Generator().manual_seed(seed + 2)
        tensors = list(tensors) + [(torch.randn(queue, dim, generator=gen) * scale).to(dtype)]
    options = dict(normalize=True, reduction="mean") | options | dict(hard_negative_weight=weight)
    upstream = upstream_gradient(batch, options["reduction"], seed)
    got = loss_and_grads(fastcse.info_nce, tensors, tau, upstream, backend="triton", **options)
    want = loss_and_grads(fastcse.info_nce_reference, tensors, tau, upstream.double(), torch.float64, **options)
    assert got["loss"].dtype == torch.float32
    assert got.keys() == want.keys() and all(g is not None for g in got.values()), got.keys()
    for name, g in got.items():
        if name != "loss":
            assert g.dtype == (dtype if name != "temperature" else torch.float32), name
    floors = temperature_floors(upstream, batch, options["reduction"], tau, options["normalize"], floor)
    comparison = compare_results(got, want, TOL[dtype], floor, floors=floors)
    assert comparison.ok, comparison.reason
