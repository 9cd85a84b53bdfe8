"""The determinism section: two runs of forward + backward on the same inputs. The fp32 atomics
that add the tiles reorder the sums, so the runs are not bitwise equal: how far apart, and within
the case's tolerance of each other."""

from __future__ import annotations

from functools import partial

import torch

import fastcse
from fastcse import testing
from fastcse.gpu_check.cases import LossCase, Shapes
from fastcse.gpu_check.results import Outcome


def determinism_cases(shapes: Shapes) -> list[LossCase]:
    """The fused-gradient path (mean) and the recompute path (none): both add tiles with fp32 atomics."""
    batch, k, dim = shapes.determinism
    return [LossCase(batch, k, dim, torch.float32, symmetric=True, weight=0.3, reduction="mean", seed=21),
            LossCase(batch, k, dim, torch.bfloat16, symmetric=False, weight=0.3, reduction="none", seed=22)]


def check_determinism(case: LossCase, device: torch.device) -> Outcome:
    """Two runs of forward + backward on the same inputs: how far apart (atomics reorder the sums),
    and within the case's tolerance of each other."""
    tensors, upstream = case.inputs(), case.upstream()
    first = case.run(fastcse.info_nce, tensors, device, upstream, backend="triton")
    second = case.run(fastcse.info_nce, tensors, device, upstream, backend="triton")
    outcome = Outcome.of(testing.compare_results(second, {n: t.double() for n, t in first.items()}, case.tol,
                                                 case.floor))
    outcome.numbers["bitwise_equal"] = all(torch.equal(first[n], second[n]) for n in first)
    for name in first:
        outcome.numbers[f"{name}_max_abs_diff"] = (first[name].double() - second[name].double()).abs().max().item()
    return outcome


def determinism_plan(shapes: Shapes):
    return [(c.name, partial(check_determinism, c)) for c in determinism_cases(shapes)]
