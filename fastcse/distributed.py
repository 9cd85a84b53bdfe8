"""Distributed negatives: ``info_nce(..., process_group=pg)`` scores each rank's anchors against
the candidates of every rank.

Layout and convention (see docs/design.md, "Distributed negatives: exact gradients"). Rank r holds B_r anchors and
starts at global row start_r = B_0 + ... + B_{r-1}; B_t = sum of all B_r. The candidates of all
ranks are gathered (the C++ op ``fastcse::gather_rows``, ``kernels/gather_rows.cpp``) into one
tensor, block-major and rank-ordered: [positives of rank 0, 1, ..., negatives of rank 0, 1, ...,
and, for the directions that score against anchors (``query_to_query``, ``doc_to_query``, so also
``symmetric``), anchors of rank 0, 1, ...], so anchor i of rank r has its positive at
column start_r + i and its hard negatives at B_t + (start_r + i) * k + t, exactly the columns
of the single-process loss over the concatenated batch. Each rank computes only its own rows
(local anchors x global candidates).

- The returned loss is, on every rank, the single-process loss over the concatenated batch (an
  all-reduce of the detached scalar; with ``reduction="none"``, the local rows' losses).
- The graph carries the local terms only, divided by B_t for "mean". The gather's backward
  sums every rank's gradient of each candidate back to the rank that owns it (a reduce-scatter
  of variable sizes), so after ``loss.backward()`` each rank holds exactly its rows of the
  single-process gradient, for anchors, positives and negatives.
- A temperature tensor gets this rank's part of dL/dtau; the parts sum to the full gradient.
- Under DistributedDataParallel, which AVERAGES parameter gradients over the W ranks, use
  ``(loss * W).backward()`` (W = the group's size) to get the single-process gradient:
  every rank holds the gradient of its own rows, so the sum (not the mean) is the total.

Errors: ranks that disagree (dim, dtype, options, ...) all raise the same RuntimeError from the
gather's header exchange. A rank whose own inputs fail ``info_nce``'s checks raises its
ValueError/TypeError, after flagging its header, so that every other rank raises a RuntimeError
naming it ("rank r cannot take part: ...") at once rather than at the process group's timeout.

Transport: rows are L2-normalized before they are sent (``normalize=True``), optionally cast
to bfloat16 on the wire (``GatherGroup(pg, bf16_transport=True)``, half the bytes; gradients
always travel in fp32). The embeddings' normalization backward runs on the owning rank.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import os
import sys
from dataclasses import dataclass
from typing import NoReturn

import torch
import torch.distributed as dist
import torch.nn.functional as F

from fastcse.checks import NORMALIZE_EPS, accumulation_dtype
from fastcse.false_negatives import GuideRows, problem_keywords
from fastcse.ops import info_nce_call, needs_grad
from fastcse.problem import LossProblem, describe, encode_variant

_BUILD_HINT = ("run `pip install --no-build-isolation -e .` in the fastcse checkout (needs a C++ compiler; "
               "CUDA_HOME for the CUDA pack kernel), or point FASTCSE_EXTENSION at a library built with "
               "CMakeLists.txt")
_extension_loaded = False


@dataclass(frozen=True)
class GatherGroup:
    """A process group plus how the candidates travel: pass as ``info_nce(..., process_group=...)``.

    ``bf16_transport`` sends the (normalized) candidate rows as bfloat16, halving the bytes of
    the forward exchange; the loss and gradients still compute in fp32 (expect ~3 significant
    digits on the scores). ``group=None`` means the default (WORLD) group.
    """

    group: object = None
    bf16_transport: bool = False


def load_extension() -> None:
    """Loads the ops of ``fastcse._C`` (or of FASTCSE_EXTENSION) and registers their autograd once.

    Raises a RuntimeError saying how to build the extension when it cannot be loaded."""
    global _extension_loaded
    if _extension_loaded:
        return
    library = os.environ.get("FASTCSE_EXTENSION")
    try:
        if library:
            torch.ops.load_library(library)
        else:
            importlib.import_module("fastcse._C")
    except (ImportError, OSError) as error:
        where = f"FASTCSE_EXTENSION={library!r} could not be loaded" if library else \
            "the C++ extension fastcse._C is not built"
        raise RuntimeError(f"fastcse distributed negatives need fastcse::gather_rows, but {where}: "
                           f"{_BUILD_HINT}. ({error})") from error
    torch.library.register_autograd("fastcse::gather_rows", _gather_rows_backward,
                                    setup_context=_gather_rows_setup_context)
    _extension_loaded = True



def _gather_rows_setup_context(ctx, inputs, output):
    parts, group, normalize, _bf16_transport, _options = inputs
    _, counts = output
    ctx.save_for_backward(*parts, counts)
    ctx.group = group
    ctx.normalize = normalize


def _gather_rows_backward(ctx, grad_gathered, _grad_counts):
    *parts, counts = ctx.saved_tensors
    grads = torch.ops.fastcse.gather_rows_backward(grad_gathered.contiguous(), parts, counts, ctx.group,
                                                   ctx.normalize)
    return list(grads), None, None, None, None


def resolve_group(process_group) -> tuple[dist.ProcessGroup, bool]:
    """(c10d process group, bf16 transport) from a ProcessGroup or a :class:`GatherGroup`."""
    bf16_transport = False
    if isinstance(process_group, GatherGroup):
        bf16_transport = bool(process_group.bf16_transport)
        process_group = process_group.group
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("process_group was given but torch.distributed is not initialized: call "
                           "torch.distributed.init_process_group first (torchrun sets up the environment)")
    if process_group is None:
        process_group = dist.group.WORLD
    if not isinstance(process_group, dist.ProcessGroup):
        raise TypeError("process_group must be a torch.distributed.ProcessGroup this rank belongs to (e.g. "
                        f"dist.group.WORLD or dist.new_group(...)) or a fastcse GatherGroup, got {process_group!r}")
    return process_group, bf16_transport


def gather_rows(parts: list[torch.Tensor], process_group, *, normalize: bool = True, bf16_transport: bool = False,
                options: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    """All ranks' row blocks, gathered with autograd: returns (gathered, counts).

    ``parts`` are this rank's [n_p, d] blocks (every rank passes the same number of blocks, with
    any row counts). ``gathered`` is [sum of all n, d] in the parts' dtype: block 0 of every rank
    in rank order, then block 1, ...; rows L2-normalized when ``normalize``. ``counts`` is the
    int64 [world, blocks] table of row counts. Backward sums each row's gradient over all ranks
    into its owner (and applies the normalization backward there). Ranks that disagree on the
    dim, dtype, device, number of blocks, flags or ``options`` all raise the same RuntimeError.
    """
    load_extension()
    return torch.ops.fastcse.gather_rows(list(parts), process_group.boxed(), bool(normalize), bool(bf16_transport),
                                         header_text(options))


# The gather's header carries the options in a fixed field: kernels/gather_rows.cpp's kOptionBytes
# (256) with its terminator.
HEADER_TEXT_BYTES = 255


def header_text(options: str) -> str:
    """``options`` as the header's field holds it: as it is when it fits, else cut, ending with
    the SHA-256 of the whole text, so that the ranks still compare all of it and a mismatch
    still shows its readable start (long variants, Matryoshka weights and false-negative rules
    together pass 255 bytes)."""
    data = options.encode()
    if len(data) <= HEADER_TEXT_BYTES:
        return options
    digest = " sha256=" + hashlib.sha256(data).hexdigest()
    return data[:HEADER_TEXT_BYTES - len(digest)].decode(errors="ignore") + digest


def announce_input_error(process_group, tensors, error: Exception) -> None:
    """Tells the other ranks of ``process_group`` that this rank's inputs failed their checks.

    They are waiting (or about to wait) in the gather's header exchange; this rank takes part in
    it with a header flagged with ``error``, so that every other rank raises a RuntimeError naming
    this rank and the reason at once instead of at the process group's timeout. The caller then
    raises ``error`` itself. Without a usable group or extension there is nothing to tell: the
    other ranks fail the same way before any collective."""
    try:
        group, _ = resolve_group(process_group)
        load_extension()
    except (RuntimeError, TypeError):
        return
    # The header holds 255 bytes of text; cut on a character boundary.
    reason = f"{type(error).__name__}: {error}".encode()[:255].decode(errors="ignore")
    torch.ops.fastcse.gather_rows_abort(group.boxed(), _header_device(tensors, group), reason)


def _header_device(tensors, group) -> torch.device:
    """Where the other ranks send their headers from: the inputs' device, as far as it can be told."""
    for x in tensors:
        if isinstance(x, torch.Tensor) and x.device.type in ("cpu", "cuda"):
            return x.device
    if "nccl" in str(dist.get_backend(group)):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _normalized(x: torch.Tensor) -> torch.Tensor:
    # As the pack kernel does for the sent rows: normalize in the accumulation dtype, keep the dtype.
    return F.normalize(x.to(accumulation_dtype(x)), dim=1, eps=NORMALIZE_EPS).to(x.dtype)


def distributed_info_nce(anchor, positive, negative, checked, *, temperature, normalize, hard_negative_weight,
                         reduction, process_group):
    """``info_nce`` over the concatenated batch of all ranks (``checked``: ``fastcse.loss``'s
    ``CheckedInputs``; ``temperature`` already a 0-dim tensor). The ids (group ids or labels) are
    gathered and compared globally; the extra negatives are this rank's own, not gathered."""
    group, bf16_transport = resolve_group(process_group)
    batch, dim = anchor.shape
    num_neg, variant, extra_negatives = checked.num_neg, checked.variant, checked.extra_negatives
    grad_needed = needs_grad(anchor, positive, negative, temperature, extra_negatives)

    parts = [positive]
    if num_neg:
        parts.append(negative.reshape(batch * num_neg, dim))
    if variant.needs_anchor_keys:  # query_to_query / doc_to_query score against every rank's anchors
        parts.append(anchor)
    # Checked across ranks by the gather's header exchange: a mismatch raises on every rank.
    options = (f"k={num_neg} variant={encode_variant(variant)} weight={float(hard_negative_weight)!r} "
               f"tau={float(temperature.detach())!r} reduction={reduction} ids={checked.id_mode or ''}"
               f" matryoshka={checked.matryoshka_dims}:{checked.matryoshka_weights}"
               + _false_negative_header(checked.false_negatives))
    gathered, counts = gather_rows(parts, group, normalize=normalize, bf16_transport=bf16_transport, options=options)
    sizes = counts[:, 0].tolist()
    rank = group.rank()
    start, total = sum(sizes[:rank]), sum(sizes)
    # Every rank takes part, the one without rows too (the ids are a collective of their own).
    all_ids = gather_variable(checked.ids, sizes, group) if checked.id_mode else None
    guide = _gathered_guide(checked, sizes, group)
    candidates = gathered[: total * (1 + num_neg)]
    if extra_negatives is not None:
        candidates = torch.cat([candidates, _normalized(extra_negatives) if normalize else extra_negatives])
    if batch == 0:
        zero = _zero_loss_on(gathered, anchor, temperature)
        if extra_negatives is not None:
            zero = zero + extra_negatives[:0].sum().float()
        return zero.expand(0) if reduction == "none" else _global(zero, reduction, total, group)
    if variant.needs_anchor_keys:
        anchor_keys = gathered[total * (1 + num_neg):]
        queries = anchor_keys[start:start + batch]  # this rank's anchors as they were sent
    else:
        anchor_keys = None
        queries = _normalized(anchor) if normalize else anchor.contiguous()
    problem = _rank_problem(queries, candidates, anchor_keys, all_ids, checked, start=start, total=total,
                            hard_negative_weight=hard_negative_weight, normalize=normalize, guide=guide)
    op_reduction = "none" if reduction == "none" else "sum"
    local = info_nce_call(problem, queries, candidates, temperature, anchor_keys=anchor_keys, ids=all_ids,
                          reduction=op_reduction, grad_in_forward=op_reduction == "sum" and grad_needed,
                          backend=checked.backend, guide=guide)
    if reduction == "none":
        return local
    return _global(local, reduction, total, group)


def _rank_problem(queries, candidates, anchor_keys, all_ids, checked, *, start, total,
                  hard_negative_weight, normalize=False, guide: GuideRows | None = None) -> LossProblem:
    """This rank's rows against the gathered candidates: its anchor i has its positive at
    start + i, its hard negatives after all ranks' positives, its anchor key at start + i. The
    rows are normalized already (pack kernel / _normalized): the op runs with normalize=False,
    except with Matryoshka dimensions, whose prefixes it normalizes each on its own (a prefix
    of a normalized row, normalized, is the row's prefix normalized: one gather of the full
    rows serves every dimension)."""
    extra = checked.extra_negatives
    return describe(queries, candidates, None, pos_start=start, neg_start=total + start * checked.num_neg,
                    num_neg=checked.num_neg, normalize=normalize and bool(checked.matryoshka_dims),
                    hard_negative_weight=hard_negative_weight,
                    variant=checked.variant, anchor_keys=anchor_keys, anchor_start=start, ids=all_ids,
                    id_mode=checked.id_mode, num_extra=0 if extra is None else extra.shape[0],
                    matryoshka_dims=checked.matryoshka_dims, matryoshka_weights=checked.matryoshka_weights,
                    **problem_keywords(checked.false_negatives, guide))


def _false_negative_header(rule) -> str:
    """The false-negative rule in the gather's options: ranks that disagree raise together."""
    if rule is None:
        return ""
    guide = f"{rule.guide_anchor.shape[1]},{rule.guide_anchor.dtype}" if rule.guided else "self"
    return f" fn={rule.margin!r},{rule.strategy},{guide}"


def _gathered_guide(checked, sizes: list[int], group) -> GuideRows | None:
    """The guide's rows in the gathered layout (no gradient): every rank's guide positives, then
    every rank's guide hard negatives, then this rank's guide extra negatives; every rank's guide
    anchors as the anchor keys' guide when a direction scores against the anchors."""
    rule = checked.false_negatives
    if rule is None or not rule.guided:
        return None
    blocks = [gather_variable(rule.guide_positive, sizes, group)]
    if checked.num_neg:
        blocks.append(gather_variable(rule.guide_negative, [n * checked.num_neg for n in sizes], group))
    if rule.guide_extra_negatives is not None:
        blocks.append(rule.guide_extra_negatives)
    keys = gather_variable(rule.guide_anchor, sizes, group) if checked.variant.needs_anchor_keys else None
    return GuideRows(rule.guide_anchor, torch.cat(blocks), keys)


def gather_variable(x: torch.Tensor, sizes: list[int], group) -> torch.Tensor:
    """Every rank's ``x`` ([sizes[r], ...] on rank r), detached, concatenated in rank order.

    all_gather takes equal shapes, so each rank's block is padded to the largest size."""
    padded = x.new_zeros((max(sizes), *x.shape[1:]))
    padded[: x.shape[0]] = x.detach()
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([part[:n] for part, n in zip(parts, sizes)])


def _zero_loss_on(gathered, anchor, temperature):
    """A 0 that depends on the gathered rows: a rank with no rows (the end of an epoch) still
    takes part in both collectives, so its backward must run the gather's backward too.

    Sums of zero rows are exactly 0 whatever the values: ``gathered.sum() * 0`` overflowed to
    inf * 0 = NaN for large unnormalized fp16 rows, and the all-reduce spread it to every rank."""
    return (gathered[:0].sum() + anchor[:0].sum()).float() + temperature.float() * 0.0


def _global(local, reduction, total, group):
    """Value: the loss over all ranks; gradient: this rank's terms only (local - local.detach() is exactly 0)."""
    if reduction == "mean":
        local = local / total
    global_value = local.detach().clone()
    dist.all_reduce(global_value, group=group)
    return global_value + (local - local.detach())


def exit_worker(code: int = 0) -> NoReturn:
    """Ends a worker process (e.g. under ``torchrun``) once its work is done, skipping the
    interpreter's shutdown: the process group is destroyed, logging, stdout and stderr flushed,
    then ``os._exit(code)``.

    Why: gloo's worker threads (torch 2.13) release each finished collective on their own
    thread, and a collective started during or after a backward carries a copy of the thread-local
    state in which autograd stashes a Python object (the backward's ``contextvars.Context``). A
    release that comes while the interpreter shuts down cannot take the GIL, and the thread
    aborts the process ("terminate called without an active exception") after the script's work
    is done. destroy_process_group does not stop those threads while DistributedDataParallel
    holds the group. examples/distributed_info_nce.py, whose rank 1 exits right after its last
    collective, met this in 4 of 114 runs here."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
