"""The compile section: ``torch.compile(fullgraph=True)`` of a function calling ``info_nce``,
through the custom op's fake kernel and autograd registration, equals eager."""

from __future__ import annotations

import time
from functools import partial

import torch

import fastcse
from fastcse import testing
from fastcse.gpu_check.cases import LossCase, Shapes
from fastcse.gpu_check.results import Outcome


def compile_cases(shapes: Shapes) -> list[LossCase]:
    batch, k, dim = shapes.compile
    return [LossCase(batch, k, dim, torch.float32, symmetric=True, weight=0.2, reduction="mean", seed=31),
            LossCase(batch, k, dim, torch.bfloat16, symmetric=False, weight=0.2, reduction="none", seed=32)]


def _loss_times_two(anchor, positive, negative=None, *, temperature, **options):
    """A function calling info_nce, as a user's training step would (the op inside a larger graph)."""
    return fastcse.info_nce(anchor, positive, negative, temperature=temperature, backend="triton", **options) * 2.0


def check_compile(case: LossCase, device: torch.device, compile_backend: str) -> Outcome:
    """torch.compile(fullgraph=True) through the custom op's fake kernel and autograd: forward and
    backward equal to eager (up to the atomics' summation order, so within the case's tolerance)."""
    tensors, upstream = case.inputs(), case.upstream()
    compiled = torch.compile(_loss_times_two, fullgraph=True, backend=compile_backend)
    start = time.perf_counter()
    got = case.run(compiled, tensors, device, upstream)
    compile_s = time.perf_counter() - start
    want = case.run(_loss_times_two, tensors, device, upstream)
    outcome = Outcome.of(testing.compare_results(got, {n: t.double() for n, t in want.items()}, case.tol,
                                                 case.floor))
    outcome.numbers |= {"compile_backend": compile_backend, "first_call_s": round(compile_s, 2)}
    return outcome


def compile_plan(shapes: Shapes, backend: str):
    return [(f"{backend}/{c.name}", partial(check_compile, c, compile_backend=backend)) for c in compile_cases(shapes)]
