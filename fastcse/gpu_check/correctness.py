"""The correctness section: forward and every gradient (anchor, positive, negative, temperature)
of ``info_nce(backend="triton")`` against ``info_nce_reference`` in fp64, with the test suite's
tolerances and comparison (fastcse.testing), over its option grid, 16-bit cases, odd shapes,
zero and tiny rows, temperatures, and the optional keywords this fastcse has."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch

import fastcse
from fastcse import testing
from fastcse.gpu_check.cases import ALL_DTYPES, HALF_DTYPES, LossCase, Shapes, scaled
from fastcse.gpu_check.results import Outcome, Skip, skip_case
from fastcse.gpu_check.rule_inputs import MARGINS, clustered_rows, threshold_gap

# info_nce's keywords when this kit was written; any other keyword found at run time is a
# variant, checked through VARIANTS below (or reported as one the kit has no case for).
BASE_KEYWORDS = frozenset({"anchor", "positive", "negative", "temperature", "normalize", "symmetric",
                           "hard_negative_weight", "reduction", "backend", "process_group"})

# The test suite's temperatures, and tau = 0.02: like 0.01 it needs the reverse column sweep, at
# a logit range in between. Ordered by tau.
TEMPERATURES = tuple(sorted(testing.TEMPERATURE_CASES + ((0.02, True, "mean"),), key=lambda case: case[0]))


def check_loss_case(case: LossCase, device: torch.device) -> Outcome:
    """info_nce(backend="triton") against info_nce_reference in fp64 from the same rounded inputs."""
    tensors, upstream = case.inputs(), case.upstream()
    keywords = case.variant.make(case.batch, case.dim, case.dtype, device, case.num_neg) \
        if case.variant is not None else {}
    try:
        got, refused = _run_or_refusal(case, fastcse.info_nce, tensors, device, upstream, backend="triton",
                                       **keywords)
    except NotImplementedError as error:  # a declared gap, listed with its reason: not a wrong result
        raise Skip(f"not implemented on backend='triton': {error}") from None
    want, ref_refused = _run_or_refusal(case, fastcse.info_nce_reference, tensors, device, upstream.double(),
                                        dtype=torch.float64, **keywords)
    if refused and ref_refused and case.variant is not None:
        raise Skip(f"both functions refuse this guess of the variant's arguments: {refused}")
    if refused or ref_refused:
        return Outcome(False, {}, f"info_nce: {refused or 'ok'}; info_nce_reference: {ref_refused or 'ok'}")
    if got["loss"].dtype != torch.float32:
        return Outcome(False, {}, f"the loss is {got['loss'].dtype}, expected float32")
    wrong_dtypes = [n for n, g in got.items() if n not in ("loss", "temperature") and g is not None
                    and g.dtype != case.dtype]
    if wrong_dtypes:
        return Outcome(False, {}, f"gradients of {wrong_dtypes} are not in the inputs' dtype {case.dtype}")
    rowwise = ("anchor", "positive", "negative") if case.special_rows and case.dtype != torch.float32 else ()
    # d(tau) against the terms it sums, as the test suite checks it (fastcse.testing.temperature_floors)
    floors = testing.temperature_floors(upstream, case.batch, case.reduction, case.tau, case.normalize, case.floor)
    outcome = Outcome.of(testing.compare_results(got, want, case.tol, case.floor, rowwise, floors))
    gap = threshold_gap(tensors, keywords)
    if gap is not None:  # how far the rule's cells keep from its thresholds (fastcse.gpu_check.rule_inputs)
        outcome.numbers["threshold_gap"] = gap
    return outcome


# A 16-bit d(tau) sums dS s over every cell, terms that mostly cancel. The kernels sum them in
# fp32 before dS is rounded to 16 bits, so d(tau) errs as fp32 does; the same sum from the
# rounded dS errs by about 2^-9 of the terms. Measured against fastcse.testing.temperature_floor
# (sum |g_i| / tau, half the bound on the terms' total) in the interpreter: 0.9e-6 to 2.4e-6 of
# it now, 7.5e-5 to 5e-4 of it through the rounded dS. This bar tells the two apart.
HALF_TEMPERATURE_TOL = 3e-5


def check_half_temperature(case: LossCase, device: torch.device) -> Outcome:
    """A 16-bit case's d(tau) against the fp64 reference's, to HALF_TEMPERATURE_TOL of the
    terms' scale (``check_loss_case`` holds it to the 16-bit tolerance of that scale)."""
    tensors, upstream = case.inputs(), case.upstream()
    got = case.run(fastcse.info_nce, tensors, device, upstream, backend="triton")["temperature"]
    want = case.run(fastcse.info_nce_reference, tensors, device, upstream.double(), dtype=torch.float64)["temperature"]
    got, want = float(got), float(want)
    scale = testing.temperature_floor(testing.row_weights(upstream, case.batch, case.reduction), case.tau)
    error = abs(got - want) / scale
    ok = error <= HALF_TEMPERATURE_TOL
    reason = "" if ok else f"d(tau) {got:.6g} against {want:.6g}: error {error:.2g} of the terms' scale > " \
                           f"{HALF_TEMPERATURE_TOL}"
    return Outcome(ok, {"temperature_error": error, "temperature_rel_err": abs(got - want) / max(abs(want), 1e-30)},
                   reason)


def _run_or_refusal(case: LossCase, fn, *args, **kwargs):
    """(results, None), or (None, the ValueError/TypeError message) when the arguments are refused."""
    try:
        return case.run(fn, *args, **kwargs), None
    except (TypeError, ValueError) as error:
        return None, f"{type(error).__name__}: {error}"


# --------------------------------------------------------------------------------------------
# Variants: keywords newer than this kit, checked when both info_nce and the reference take them
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Variant:
    """Optional keywords and how to build their values for a (B, d, dtype, device, k) case (k hard
    negatives per row: a guide holds rows for them too); ``draw``, if given, replaces the case's
    random inputs: (B, k, d, dtype, seed) -> [anchor, positive, negative]; ``tau`` replaces the
    cases' temperature."""

    label: str
    make: Callable[[int, int, torch.dtype, torch.device, int], dict]
    draw: Callable[[int, int, int, torch.dtype, int], list] | None = None
    tau: float | None = None

    def keywords(self) -> set[str]:
        return set(self.make(2, 8, torch.float32, torch.device("cpu"), 1))  # d = 8: room for a clustered guide


def _constant(**values) -> Callable[..., dict]:
    return lambda batch, dim, dtype, device, num_neg: dict(values)


GUIDE_SEED = 77
QUEUE_ROWS = 7


def _guide(batch: int, dim: int, dtype: torch.dtype, device: torch.device, num_neg: int) -> dict:
    """A guide model's fp32 rows of width d for every input (anchor, positive, the k negatives of
    each row, shaped like the case's negative), built from exact levels so that the margin leaves
    some keys out and keeps others, none near a threshold (fastcse.gpu_check.rule_inputs)."""
    rows = clustered_rows(batch, num_neg, dim, GUIDE_SEED)
    return dict(false_negative_margin=MARGINS["absolute"], margin_strategy="absolute",
                guide=tuple(r.to(device) for r in rows if r is not None))


def _guide_with_queue(batch: int, dim: int, dtype: torch.dtype, device: torch.device, num_neg: int) -> dict:
    """``_guide`` and a queue of QUEUE_ROWS random extra negatives (its gradient checked) with the
    guide's rows of them (``guide_extra_negatives``: some left out for every row's cluster)."""
    *rows, queue_rows = clustered_rows(batch, num_neg, dim, GUIDE_SEED, queue=QUEUE_ROWS)
    queue = torch.randn(QUEUE_ROWS, dim, generator=torch.Generator().manual_seed(98)).to(device, dtype)
    return dict(_guide(batch, dim, dtype, device, num_neg), extra_negatives=queue,
                guide_extra_negatives=queue_rows.to(device))


# The clustered rows' positives score 0.8..0.95 and other clusters' keys exactly 0: at tau = 0.05
# the softmax saturates (row losses ~1e-3, where fp32's rounding of logits ~20 is already 1e-3 of
# them). At tau = 0.5 the losses are ~2 and the gradients of the usual size.
SELF_GUIDED_TAU = 0.5


def _clustered_inputs(batch: int, num_neg: int, dim: int, dtype: torch.dtype, seed: int) -> list:
    """Self-guided cases' inputs: the rule's cosines are the inputs' own, kept off every threshold."""
    return [None if x is None else x.to(dtype) for x in clustered_rows(batch, num_neg, dim, seed)[:3]]


def _matryoshka_dims(dim: int) -> tuple[int, ...]:
    """The full width and prefixes of about 2/3, 1/3 and 1/8 of it (distinct, >= 1, any alignment)."""
    return tuple(sorted({dim, max(1, 2 * dim // 3), max(1, dim // 3), max(1, dim // 8)}, reverse=True))


# sentence-transformers' MultipleNegativesRankingLoss names (directions, partition_mode,
# hardness_mode, hardness_strength) and a few keywords fastcse may grow; values are the
# natural ones for each. A guess both functions refuse is reported skipped, not failed.
VARIANTS = (
    Variant("directions-q2d-d2q-per_direction",
            _constant(directions=("query_to_doc", "doc_to_query"), partition_mode="per_direction")),
    Variant("directions-q2d-q2q-joint",
            _constant(directions=("query_to_doc", "query_to_query"), partition_mode="joint")),
    Variant("directions-q2d-d2d-joint", _constant(directions=("query_to_doc", "doc_to_doc"), partition_mode="joint")),
    Variant("directions-all-joint", _constant(directions=("query_to_doc", "query_to_query", "doc_to_query",
                                                          "doc_to_doc"), partition_mode="joint")),
    Variant("hardness-in_batch_negatives", _constant(hardness_mode="in_batch_negatives", hardness_strength=5.0)),
    Variant("hardness-hard_negatives", _constant(hardness_mode="hard_negatives", hardness_strength=5.0)),
    Variant("hardness-all_negatives", _constant(hardness_mode="all_negatives", hardness_strength=3.0)),
    Variant("group_ids-pairs", lambda batch, dim, dtype, device, num_neg: {
        "group_ids": (torch.arange(batch) // 2).to(device)}),  # rows 2i, 2i+1 share a group
    Variant("extra_negatives-7", lambda batch, dim, dtype, device, num_neg: {  # a queue; its gradient is checked too
        "extra_negatives": torch.randn(7, dim, generator=torch.Generator().manual_seed(99)).to(device, dtype)}),
    Variant("labels-triples", lambda batch, dim, dtype, device, num_neg: {
        "labels": (torch.arange(batch) // 3).to(device)}),  # SupCon: rows 3i..3i+2 share a label
    # False negatives by similarity: self-guided (the loss's own cosines) and a guide's rows
    # (GISTEmbed), each in the directions its kernels treat apart, and a guided queue.
    Variant("false_negatives-self-relative", _constant(false_negative_margin=MARGINS["relative"],
                                                       margin_strategy="relative"), _clustered_inputs, SELF_GUIDED_TAU),
    Variant("false_negatives-self-absolute-all-directions", _constant(
        false_negative_margin=MARGINS["absolute"], margin_strategy="absolute", partition_mode="joint",
        directions=("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc")), _clustered_inputs,
        SELF_GUIDED_TAU),
    Variant("false_negatives-guided", _guide),
    Variant("false_negatives-guided-q2d-d2q", lambda batch, dim, dtype, device, num_neg: {
        **_guide(batch, dim, dtype, device, num_neg), "directions": ("query_to_doc", "doc_to_query"),
        "partition_mode": "joint"}),
    Variant("false_negatives-guided-queue", _guide_with_queue),
    # Matryoshka: the full width and three prefixes (not aligned with the kernels' d chunks), unequal
    # weights; and with the group mask and the symmetric directions.
    Variant("matryoshka-4", lambda batch, dim, dtype, device, num_neg: {
        "matryoshka_dims": _matryoshka_dims(dim), "matryoshka_weights": (1.0, 0.5, 0.25, 0.125)[
            :len(_matryoshka_dims(dim))]}),
    Variant("matryoshka-groups-q2d-d2q", lambda batch, dim, dtype, device, num_neg: {
        "matryoshka_dims": _matryoshka_dims(dim), "group_ids": (torch.arange(batch) // 2).to(device),
        "directions": ("query_to_doc", "doc_to_query"), "partition_mode": "per_direction"}),
)


def _keywords_of(fn) -> set[str]:
    return set(inspect.signature(fn).parameters)


def plan_variants(loss_fn, reference_fn, make_case: Callable[["Variant"], list[LossCase]]):
    """(name, case function) for each variant: runnable where both functions take all its keywords,
    otherwise skipped with the reason; plus one skipped entry per new keyword no variant covers."""
    ours, theirs = _keywords_of(loss_fn), _keywords_of(reference_fn)
    planned, covered = [], set()
    for variant in VARIANTS:
        keywords = variant.keywords()
        covered |= keywords
        missing_ours, missing_ref = sorted(keywords - ours), sorted(keywords - theirs)
        if missing_ours:
            reason = f"this fastcse's info_nce has no {', '.join(missing_ours)}"
            planned.append((f"variant/{variant.label}", skip_case(reason)))
        elif missing_ref:
            reason = (f"info_nce takes {', '.join(missing_ref)} but info_nce_reference does not: "
                      "nothing to check it against")
            planned.append((f"variant/{variant.label}", skip_case(reason)))
        else:
            planned += [(f"variant/{variant.label}/{c.name}", _loss_case_runner(c)) for c in make_case(variant)]
    for keyword in sorted(ours - BASE_KEYWORDS - covered):
        planned.append((f"variant/{keyword}", skip_case(f"info_nce takes {keyword!r}, for which this kit has no case")))
    return planned


def _loss_case_runner(case: LossCase) -> Callable[[torch.device], Outcome]:
    return partial(check_loss_case, case)


# --------------------------------------------------------------------------------------------
# The case lists, most telling first
# --------------------------------------------------------------------------------------------


def _grid_case(batch, dim, dtype, normalize, symmetric, k, weight, reduction, tau=0.05, seed=0) -> LossCase:
    return LossCase(batch, k, dim, dtype, tau=tau, normalize=normalize, symmetric=symmetric, weight=weight,
                    reduction=reduction, scale=1.0 if normalize else scaled(dim, 0.15, 24), seed=seed)


def grid_cases(shapes: Shapes, dtype: torch.dtype) -> list[LossCase]:
    """The test suite's option grid at the profile's (B, d)."""
    batch, dim = shapes.grid
    return [_grid_case(batch, dim, dtype, *options) for options in testing.OPTION_GRID]


def half_subset_cases(shapes: Shapes) -> list[LossCase]:
    """The test suite's 16-bit cases, in fp16 and bf16, at the option grid's shape."""
    batch, dim = shapes.grid
    return [_grid_case(batch, dim, dtype, n, s, k, testing.HALF_PRECISION_WEIGHT, r, tau=tau, seed=7)
            for dtype in HALF_DTYPES for n, s, k, r, tau in testing.HALF_PRECISION_CASES]


def half_temperature_cases(shapes: Shapes) -> list[LossCase]:
    """16-bit symmetric cases at the option grid's shape for ``check_half_temperature``: both
    gradient paths (in the forward for "mean", the backward's recompute for "none")."""
    batch, dim = shapes.grid
    return [LossCase(batch, 1, dim, dtype, symmetric=True, reduction=reduction, seed=3)
            for dtype in HALF_DTYPES for reduction in ("mean", "none")]


def odd_shape_cases(shapes: Shapes) -> list[LossCase]:
    dtypes = (torch.float32, torch.bfloat16) if shapes.odd_half else (torch.float32,)
    return [LossCase(b, k, d, dtype, symmetric=i % 2 == 1, weight=0.2 if k else 0.0, reduction="none", seed=b)
            for dtype in dtypes for i, (b, k, d) in enumerate(shapes.odd)]


def special_row_cases(shapes: Shapes) -> list[LossCase]:
    batch, k, dim = shapes.special
    return [LossCase(batch, k, dim, dtype, symmetric=symmetric, weight=0.3, reduction=reduction, seed=41,
                     special_rows=True)
            for dtype in ALL_DTYPES for symmetric, reduction in ((False, "none"), (True, "mean"))]


def temperature_cases(shapes: Shapes) -> list[LossCase]:
    batch, dim = shapes.grid
    cases = [LossCase(batch, 1, dim, tau=tau, symmetric=s, weight=0.3, reduction=r, seed=5)
             for tau, s, r in TEMPERATURES]
    cases.append(LossCase(batch, 1, dim, learnable_tau=False, symmetric=True, weight=0.3, seed=6))
    # Dot-product logits of several hundred (1/tau = 100 and beyond): the online softmax must not overflow.
    cases += [LossCase(batch, 1, dim, dtype, tau=0.01, normalize=False, symmetric=True, reduction="none",
                       scale=scaled(dim, 0.6, 32), seed=11) for dtype in ALL_DTYPES]
    return cases


def variant_cases(shapes: Shapes, variant: Variant) -> list[LossCase]:
    batch, dim = shapes.variant
    tau = variant.tau or 0.05
    return [LossCase(batch, 2, dim, torch.float32, tau=tau, weight=0.0, reduction="none", seed=13, variant=variant),
            LossCase(batch, 1, dim, torch.bfloat16, tau=tau, reduction="mean", seed=14, variant=variant)]


def correctness_plan(shapes: Shapes) -> list[tuple[str, Callable[[torch.device], Outcome]]]:
    """Every correctness case, most telling first, so that a spent budget drops the least."""
    cases = grid_cases(shapes, torch.float32) + half_subset_cases(shapes)
    planned = [(c.name, _loss_case_runner(c)) for c in cases]
    planned += [(f"{c.name}/d(tau) fp32-accurate", partial(check_half_temperature, c))
                for c in half_temperature_cases(shapes)]
    planned += plan_variants(fastcse.info_nce, fastcse.info_nce_reference, lambda v: variant_cases(shapes, v))
    later = odd_shape_cases(shapes) + special_row_cases(shapes) + temperature_cases(shapes)
    if shapes.half_grid:
        later += [c for dtype in HALF_DTYPES for c in grid_cases(shapes, dtype)]
    planned += [(c.name, _loss_case_runner(c)) for c in later]
    return _unique_names(planned)


def _unique_names(planned):
    """Two cases may describe alike (same shapes and options, other seeds): number the repeats."""
    seen: dict[str, int] = {}
    out = []
    for name, fn in planned:
        seen[name] = seen.get(name, 0) + 1
        out.append((name if seen[name] == 1 else f"{name}#{seen[name]}", fn))
    return out


