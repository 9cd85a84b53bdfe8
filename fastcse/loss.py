"""``fastcse.info_nce``: the public loss (the functional layer over ``fastcse.ops``), its input
checks and backend choice, and ``InfoNCE``, its module form.

``info_nce`` checks the user's arguments, lays the candidates out ([positives; hard negatives;
extra negatives]), describes the call as a ``fastcse.problem.LossProblem`` and hands both to
``fastcse.ops.info_nce_call``; under a process group ``fastcse.distributed`` does the same over
the gathered ranks."""

from __future__ import annotations

import os
from typing import Literal, NamedTuple

import torch
from torch import nn

from fastcse import checks
from fastcse.checks import DEFAULT_TEMPERATURE
from fastcse.matryoshka import check_dims
from fastcse.false_negatives import (FalseNegativeOptions, GuideRows, check_options, guide_candidates,
                                     problem_keywords)
from fastcse.ops import info_nce_call, needs_grad
from fastcse.problem import LossProblem, Variant, describe, resolve_variant

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_REDUCTIONS = ("mean", "sum", "none")
_BACKENDS = ("auto", "cpu", "triton")


def _check_matrix(name: str, x, rank: int | tuple[int, ...]) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    _check_dense(name, x)
    ranks = (rank,) if isinstance(rank, int) else rank
    if x.dim() not in ranks:
        want = " or ".join(f"{r}-D" for r in ranks)
        raise ValueError(f"{name} must be {want}, got shape {tuple(x.shape)}")
    if x.dtype not in _DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {x.dtype}")


def _check_dense(name: str, x: torch.Tensor) -> None:
    if x.layout != torch.strided:
        raise TypeError(f"{name} must be a dense (strided) tensor, got layout {x.layout}: call .to_dense() first")


# The kernels compute 1/tau in fp32: tau and 1/tau must both be normal fp32 numbers
# (1e-39 is subnormal and 1/tau overflows; 1e39 is inf in fp32).
_TAU_RANGE = (torch.finfo(torch.float32).tiny, torch.finfo(torch.float32).max)


def _check_temperature_value(value: float) -> None:
    checks.positive_float("temperature", value)
    low, high = _TAU_RANGE
    if not low <= value <= high:
        raise ValueError(f"temperature must lie in float32's normal range [{low:.3g}, {high:.3g}] (so that "
                         f"1/temperature is a finite float32 too), got {value:g}")


def _check_temperature(temperature) -> None:
    if isinstance(temperature, torch.Tensor):
        _check_dense("temperature", temperature)
        if temperature.numel() != 1 or temperature.dim() > 1:
            raise ValueError(f"temperature must be a float or a 0-dim tensor, got shape {tuple(temperature.shape)}")
        if not temperature.is_floating_point():
            raise TypeError(f"temperature tensor must be floating point, got {temperature.dtype}")
        if temperature.device.type == "meta":
            raise ValueError("temperature is a tensor on the meta device, which holds no value: pass a float or "
                             "a tensor on the CPU or the inputs' device")
        if not torch.compiler.is_compiling():
            _check_temperature_value(float(temperature.detach()))
    elif isinstance(temperature, (int, float)) and not isinstance(temperature, bool):
        _check_temperature_value(float(temperature))
    else:
        raise TypeError(f"temperature must be a float or a 0-dim tensor, got {type(temperature).__name__}")


class CheckedInputs(NamedTuple):
    backend: str  # resolved: "cpu" or "triton"
    num_neg: int  # hard negatives per anchor
    variant: Variant  # canonical
    ids: torch.Tensor | None  # int64 group ids or labels, [B]
    id_mode: str | None  # "group", "label" or None
    extra_negatives: torch.Tensor | None  # [Q, d], Q >= 1
    matryoshka_dims: tuple[int, ...] = ()  # ascending (fastcse.matryoshka.check_dims)
    matryoshka_weights: tuple[float, ...] = ()
    false_negatives: FalseNegativeOptions | None = None  # None: no false negatives by similarity


def _check_row_ids(name: str, ids, anchor: torch.Tensor) -> torch.Tensor:
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of integer ids, got {type(ids).__name__}")
    _check_dense(name, ids)
    if ids.dtype == torch.bool or ids.is_floating_point() or ids.is_complex():
        raise TypeError(f"{name} must hold integer ids (torch.long), got dtype {ids.dtype}")
    if ids.shape != (anchor.shape[0],):
        raise ValueError(f"{name} must be [B] = [{anchor.shape[0]}], one id per anchor, got {tuple(ids.shape)}")
    if ids.device != anchor.device:
        raise ValueError(f"{name} is on {ids.device} but anchor is on {anchor.device}: put all inputs on one device")
    return ids.to(torch.int64).contiguous()


def _check_extra_negatives(extra_negatives, anchor: torch.Tensor) -> torch.Tensor | None:
    if extra_negatives is None:
        return None
    _check_matrix("extra_negatives", extra_negatives, 2)
    if extra_negatives.shape[1] != anchor.shape[1]:
        raise ValueError(f"extra_negatives must be [Q, d] with the anchors' d = {anchor.shape[1]}, got "
                         f"{tuple(extra_negatives.shape)}")
    if extra_negatives.device != anchor.device:
        raise ValueError(f"extra_negatives is on {extra_negatives.device} but anchor is on {anchor.device}: put all "
                         "inputs on one device")
    if extra_negatives.dtype != anchor.dtype:
        raise TypeError(f"extra_negatives has dtype {extra_negatives.dtype} but anchor has {anchor.dtype}: all "
                        "inputs must share a dtype")
    return extra_negatives if extra_negatives.shape[0] > 0 else None


def check_inputs(anchor, positive, negative, temperature, hard_negative_weight, reduction, backend,
                 distributed=False, variant_options=None, group_ids=None, labels=None,
                 extra_negatives=None, matryoshka_dims=None, matryoshka_weights=None,
                 false_negative_options=None) -> CheckedInputs:
    """Validates the user's arguments; returns them resolved (``variant_options``: resolve_variant's keywords).

    ``distributed``: a rank may hold no anchors (the last batch of an epoch); raising here would
    leave the other ranks waiting in the gather, so B = 0 is allowed and the gather checks ranks.
    ``false_negative_options``: the false-negative keywords (see :func:`_check_false_negatives`)."""
    _check_matrix("anchor", anchor, 2)
    _check_matrix("positive", positive, 2)
    batch, dim = anchor.shape
    if batch == 0 and not distributed:
        raise ValueError("anchor must hold at least one row (B >= 1), got B = 0")
    if dim == 0:
        raise ValueError("anchor must have an embedding dim >= 1, got 0")
    if positive.shape != anchor.shape:
        raise ValueError(f"positive must have the anchor's shape {tuple(anchor.shape)} (row i is anchor i's "
                         f"positive), got {tuple(positive.shape)}")
    tensors = {"anchor": anchor, "positive": positive}
    num_neg = 0
    if negative is not None:
        _check_matrix("negative", negative, (2, 3))
        if negative.shape[0] != batch or negative.shape[-1] != dim:
            raise ValueError(f"negative must be [B, d] or [B, k, d] with B = {batch}, d = {dim}, "
                             f"got {tuple(negative.shape)}")
        num_neg = 1 if negative.dim() == 2 else negative.shape[1]
        if num_neg == 0:
            raise ValueError("negative must hold at least one hard negative per anchor (k >= 1), got k = 0")
        tensors["negative"] = negative
    for name, t in tensors.items():
        if t.device != anchor.device:
            raise ValueError(f"{name} is on {t.device} but anchor is on {anchor.device}: put all inputs on one device")
        if t.dtype != anchor.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but anchor has {anchor.dtype}: all inputs must share a dtype")
    _check_temperature(temperature)
    checks.hard_negative_weight(hard_negative_weight, has_negatives=negative is not None)
    checks.choice("reduction", reduction, _REDUCTIONS)
    variant = resolve_variant(**(variant_options or {}), num_neg=num_neg)
    if group_ids is not None and labels is not None:
        raise ValueError("give group_ids (rows that are not each other's negatives) or labels (rows that are each "
                         "other's positives), not both")
    ids, id_mode = None, None
    if group_ids is not None:
        ids, id_mode = _check_row_ids("group_ids", group_ids, anchor), "group"
    elif labels is not None:
        ids, id_mode = _check_row_ids("labels", labels, anchor), "label"
    extra_negatives = _check_extra_negatives(extra_negatives, anchor)
    dims, weights = check_dims(matryoshka_dims, matryoshka_weights, dim)
    backend = _resolve_backend(backend, anchor)
    false_negatives = _check_false_negatives(false_negative_options, anchor, negative, extra_negatives)
    return CheckedInputs(backend, num_neg, variant, ids, id_mode, extra_negatives, dims, weights, false_negatives)


def _check_false_negatives(options, anchor, negative, extra_negatives) -> FalseNegativeOptions | None:
    """``options``: info_nce's false_negative_margin, margin_strategy, guide and guide_extra_negatives."""
    if options is None:
        return None
    return check_options(**options, anchor=anchor, negative=negative, extra_negatives=extra_negatives)


def _guide_rows(options: FalseNegativeOptions | None) -> GuideRows | None:
    """One process: the guide's rows in the candidates' layout (None: no guide)."""
    if options is None or not options.guided:
        return None
    return GuideRows(options.guide_anchor, guide_candidates(options), None)


def _resolve_backend(backend, anchor: torch.Tensor) -> str:
    """"cpu" or "triton" for the user's choice and the inputs' device and dtype."""
    checks.choice("backend", backend, _BACKENDS)
    if backend == "auto":
        backend = "triton" if anchor.device.type == "cuda" else "cpu"
    if backend == "cpu" and anchor.device.type != "cpu":
        raise ValueError(f"backend='cpu' needs CPU tensors, got {anchor.device}")
    if backend == "triton":
        if anchor.dtype == torch.float64:
            raise TypeError("backend='triton' takes float16, bfloat16 or float32; float64 runs on backend='cpu'")
        if anchor.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError("backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors)")
    return backend


def _check_inputs_on_every_rank(anchor, positive, negative, temperature, hard_negative_weight, reduction, backend,
                                process_group, variant_options, row_options):
    """check_inputs; under a process group a failure is also announced to the other ranks, which
    would otherwise wait for this rank in the gather until the group's timeout."""
    try:
        return check_inputs(anchor, positive, negative, temperature, hard_negative_weight, reduction, backend,
                            distributed=process_group is not None, variant_options=variant_options, **row_options)
    except (TypeError, ValueError, NotImplementedError) as error:
        if process_group is not None:
            from fastcse.distributed import announce_input_error

            announce_input_error(process_group, (positive, anchor), error)
        raise


def _candidates(positive, negative, num_neg, extra_negatives=None):
    """[positives; hard negatives row-major; extra negatives]."""
    blocks = [positive]
    if negative is not None:
        blocks.append(negative.reshape(positive.shape[0] * num_neg, positive.shape[1]))
    if extra_negatives is not None:
        blocks.append(extra_negatives)
    return torch.cat(blocks) if len(blocks) > 1 else positive.contiguous()


def _temperature_tensor(temperature) -> torch.Tensor:
    """The op's 0-dim temperature: fp64 for a float, so that the value the kernels read back is
    exactly the user's float."""
    if not isinstance(temperature, torch.Tensor):
        temperature = torch.tensor(float(temperature), dtype=torch.float64)
    return temperature.reshape(())


def _local_problem(anchor, candidates, checked: CheckedInputs, normalize, hard_negative_weight) -> LossProblem:
    """One process: the positives first (row i's target is candidate i), then the hard negatives."""
    extra, rule = checked.extra_negatives, checked.false_negatives
    return describe(anchor, candidates, None, pos_start=0, neg_start=anchor.shape[0], num_neg=checked.num_neg,
                    normalize=normalize, hard_negative_weight=hard_negative_weight, variant=checked.variant,
                    ids=checked.ids, id_mode=checked.id_mode, num_extra=0 if extra is None else extra.shape[0],
                    matryoshka_dims=checked.matryoshka_dims, matryoshka_weights=checked.matryoshka_weights,
                    **problem_keywords(rule, _guide_rows(rule)))


def info_nce(
    anchor: torch.Tensor,
    positive: torch.Tensor,
    negative: torch.Tensor | None = None,
    *,
    temperature: float | torch.Tensor = DEFAULT_TEMPERATURE,
    normalize: bool = True,
    symmetric: bool = False,
    hard_negative_weight: float = 0.0,
    directions: tuple[str, ...] | None = None,
    partition_mode: Literal["joint", "per_direction"] | None = None,
    hardness_mode: Literal["in_batch_negatives", "hard_negatives", "all_negatives"] | None = None,
    hardness_strength: float = 0.0,
    group_ids: torch.Tensor | None = None,
    extra_negatives: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    reduction: Literal["mean", "sum", "none"] = "mean",
    backend: Literal["auto", "cpu", "triton"] = "auto",
    process_group=None,
    matryoshka_dims: tuple[int, ...] | None = None,
    matryoshka_weights: tuple[float, ...] | None = None,
    false_negative_margin: float | None = None, margin_strategy: Literal["absolute", "relative"] = "absolute",
    guide: tuple[torch.Tensor, ...] | None = None, guide_extra_negatives: torch.Tensor | None = None,
) -> torch.Tensor:
    """InfoNCE (SimCSE / MultipleNegativesRankingLoss) without materializing the B x N logits.

    Args:
        anchor: [B, d] queries.
        positive: [B, d]; row i is anchor i's positive. Every anchor scores every positive.
        negative: None, [B, d] or [B, k, d] hard negatives, pooled with the positives into
            one candidate set (candidates = positives then negatives; anchor i's target is i).
        temperature: positive float, or a 0-dim tensor (its gradient is returned).
        normalize: cosine similarity (True) or plain dot products (False).
        symmetric: also the positive->anchor direction, averaged with anchor->candidate:
            shorthand for ``directions=("query_to_doc", "doc_to_query"),
            partition_mode="per_direction"`` (give one or the other).
        hard_negative_weight: added to the logits of anchor i with its own hard negatives.
        directions: sentence-transformers 6's ``directions``, any of "query_to_doc" (required),
            "query_to_query", "doc_to_query", "doc_to_doc" (see ``fastcse.problem``). Default
            ("query_to_doc",).
        partition_mode: "joint" (default: one softmax over every direction per anchor) or
            "per_direction" (one per direction, averaged; only query_to_doc / doc_to_query).
        hardness_mode: None, "in_batch_negatives", "hard_negatives" or "all_negatives": adds
            ``hardness_strength * sim`` (no gradient) to those query_to_doc negative logits.
        hardness_strength: the penalty's non-negative strength (alpha in Lan et al. 2025).
        group_ids: None or [B] integer ids: rows with one id are not each other's negatives in
            any direction (hard and extra negatives never masked; compared across ranks).
        extra_negatives: None or [Q, d] more query_to_doc candidates (a queue), after the hard
            negatives; each rank scores its own under ``process_group`` (not gathered).
        labels: None or [B] integer labels: every positive with anchor i's label is a positive
            (the mean of their -log softmax, SupCon's L_out). Not with ``group_ids``.
        reduction: "mean", "sum" or "none" (per-anchor losses, fp32).
        backend: "auto" (Triton for CUDA tensors, CPU otherwise), "cpu" or "triton".
        process_group: a ``torch.distributed`` group: score the local anchors against the
            candidates of every rank (see ``fastcse.distributed``).
        matryoshka_dims, matryoshka_weights: sum_k w_k * (this loss on the first m_k coordinates,
            each prefix normalized on its own) in one sweep; dims distinct in [1, d], weights 1.
        false_negative_margin, margin_strategy, guide, guide_extra_negatives: false negatives by
            similarity (GISTEmbedLoss's rule; self-guided with ``guide=None``): ``fastcse.false_negatives``;
            with ``matryoshka_dims``, each dimension applies it on its own (a guide is not truncated).

    Every option in detail: docs/loss.md. Returns the fp32 loss: a scalar, or [B] with
    reduction="none".
    """
    variant_options = dict(symmetric=symmetric, directions=directions, partition_mode=partition_mode,
                           hardness_mode=hardness_mode, hardness_strength=hardness_strength)
    row_options = dict(group_ids=group_ids, labels=labels, extra_negatives=extra_negatives,
                       matryoshka_dims=matryoshka_dims, matryoshka_weights=matryoshka_weights,
                       false_negative_options=dict(margin=false_negative_margin, strategy=margin_strategy,
                                                   guide=guide, guide_extra_negatives=guide_extra_negatives))
    checked = _check_inputs_on_every_rank(anchor, positive, negative, temperature, hard_negative_weight, reduction,
                                          backend, process_group, variant_options, row_options)
    temperature = _temperature_tensor(temperature)
    if process_group is not None:
        from fastcse.distributed import distributed_info_nce

        return distributed_info_nce(anchor, positive, negative, checked, temperature=temperature,
                                    normalize=normalize, hard_negative_weight=hard_negative_weight,
                                    reduction=reduction, process_group=process_group)
    return _local_info_nce(anchor, positive, negative, checked, temperature, normalize, hard_negative_weight,
                           reduction)


def _local_info_nce(anchor, positive, negative, checked: CheckedInputs, temperature, normalize, hard_negative_weight,
                    reduction) -> torch.Tensor:
    """``info_nce`` in one process (``temperature`` already a 0-dim tensor)."""
    candidates = _candidates(positive, negative, checked.num_neg, checked.extra_negatives)
    anchor = anchor.contiguous()
    problem = _local_problem(anchor, candidates, checked, normalize, hard_negative_weight)
    return info_nce_call(problem, anchor, candidates, temperature, ids=checked.ids, reduction=reduction,
                         grad_in_forward=reduction != "none" and needs_grad(anchor, candidates, temperature),
                         backend=checked.backend, guide=_guide_rows(checked.false_negatives))


class InfoNCE(nn.Module):
    """Module form of :func:`info_nce`; ``temperature`` may be an ``nn.Parameter``."""

    def __init__(self, temperature: float | torch.Tensor = DEFAULT_TEMPERATURE, *, normalize: bool = True,
                 symmetric: bool = False, hard_negative_weight: float = 0.0, directions: tuple[str, ...] | None = None,
                 partition_mode: str | None = None, hardness_mode: str | None = None,
                 hardness_strength: float = 0.0, reduction: str = "mean", backend: str = "auto",
                 process_group=None, matryoshka_dims: tuple[int, ...] | None = None,
                 matryoshka_weights: tuple[float, ...] | None = None, false_negative_margin: float | None = None,
                 margin_strategy: str = "absolute"):
        super().__init__()
        # Checked now, so that a bad setting fails at construction rather than at the first step
        # (hard_negative_weight's need for negatives waits for the call: they come per batch).
        resolve_variant(symmetric=symmetric, directions=directions, partition_mode=partition_mode,
                        hardness_mode=hardness_mode, hardness_strength=hardness_strength)
        _check_temperature(temperature)
        checks.hard_negative_weight(hard_negative_weight, has_negatives=True)
        checks.choice("reduction", reduction, _REDUCTIONS)
        checks.choice("backend", backend, _BACKENDS)
        self.temperature = temperature
        self.normalize = normalize
        self.symmetric = symmetric
        self.hard_negative_weight = hard_negative_weight
        self.directions = directions
        self.partition_mode = partition_mode
        self.hardness_mode = hardness_mode
        self.hardness_strength = hardness_strength
        self.reduction = reduction
        self.backend = backend
        self.process_group = process_group
        # The dimensions' own rules now (their bound, the inputs' d, at the first call).
        check_dims(matryoshka_dims, matryoshka_weights, None)
        self.matryoshka_dims = matryoshka_dims
        self.matryoshka_weights = matryoshka_weights
        check_options(false_negative_margin, margin_strategy, None, None, anchor=None, negative=None,
                      extra_negatives=None)
        self.false_negative_margin = false_negative_margin
        self.margin_strategy = margin_strategy

    def forward(self, anchor, positive, negative=None, *, group_ids=None, extra_negatives=None, labels=None,
                guide=None, guide_extra_negatives=None):
        """``guide``: the guide model's embeddings of this batch's rows (with ``false_negative_margin``)."""
        return info_nce(anchor, positive, negative, temperature=self.temperature, normalize=self.normalize,
                        symmetric=self.symmetric, hard_negative_weight=self.hard_negative_weight,
                        directions=self.directions, partition_mode=self.partition_mode,
                        hardness_mode=self.hardness_mode, hardness_strength=self.hardness_strength,
                        group_ids=group_ids, extra_negatives=extra_negatives, labels=labels,
                        reduction=self.reduction, backend=self.backend, process_group=self.process_group,
                        matryoshka_dims=self.matryoshka_dims, matryoshka_weights=self.matryoshka_weights,
                        false_negative_margin=self.false_negative_margin, margin_strategy=self.margin_strategy,
                        guide=guide, guide_extra_negatives=guide_extra_negatives)

    def extra_repr(self) -> str:
        variant = ""
        if self.directions is not None or self.partition_mode is not None:
            variant = f", directions={self.directions}, partition_mode={self.partition_mode!r}"
        if self.hardness_mode is not None:
            variant += f", hardness_mode={self.hardness_mode!r}, hardness_strength={self.hardness_strength}"
        if self.matryoshka_dims is not None:
            variant += f", matryoshka_dims={self.matryoshka_dims}, matryoshka_weights={self.matryoshka_weights}"
        return (f"temperature={self.temperature}, normalize={self.normalize}, symmetric={self.symmetric}, "
                f"hard_negative_weight={self.hard_negative_weight}{variant}, reduction={self.reduction!r}"
                + _false_negative_repr(self.false_negative_margin, self.margin_strategy))


def _false_negative_repr(margin, strategy) -> str:
    return "" if margin is None else f", false_negative_margin={margin}, margin_strategy={strategy!r}"
