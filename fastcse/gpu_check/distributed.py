"""The distributed section: the CUDA pack kernel (fastcse::gather_rows against F.normalize) and
``info_nce(process_group=...)`` on a world of one rank (NCCL on a GPU, gloo under --interpret),
which must equal the local loss and gradients, also with bf16 on the wire."""

from __future__ import annotations

import os
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

import fastcse
from fastcse import testing
from fastcse.checks import NORMALIZE_EPS
from fastcse.gpu_check.cases import SHORT_DTYPE, LossCase, Shapes
from fastcse.gpu_check.results import Outcome, skip_case

# --------------------------------------------------------------------------------------------
# The two fastcse internals this section calls (no public API exposes the gather or the wire
# dtype of a process group): kept here, in one place.
# --------------------------------------------------------------------------------------------


def _gather_normalized_rows(x: torch.Tensor, bf16_transport: bool):
    """fastcse.distributed.gather_rows over the world: (the gathered normalized rows, the row counts)."""
    import torch.distributed as dist

    from fastcse.distributed import gather_rows

    return gather_rows([x], dist.group.WORLD, normalize=True, bf16_transport=bf16_transport)


def _world_group(bf16_transport: bool):
    """The world's group, as info_nce's process_group takes it (wrapped to send bf16 on the wire)."""
    import torch.distributed as dist

    from fastcse.distributed import GatherGroup

    return GatherGroup(dist.group.WORLD, bf16_transport=True) if bf16_transport else dist.group.WORLD


# --------------------------------------------------------------------------------------------
# The checks
# --------------------------------------------------------------------------------------------


def init_world_of_one(backend: str, store_dir: Path) -> None:
    """A one-rank process group over a file store: no port to find, nothing to clean up but a file."""
    import torch.distributed as dist

    # One process: its bootstrap sockets need no interface but the loopback (which always exists).
    os.environ.setdefault("NCCL_SOCKET_IFNAME" if backend == "nccl" else "GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group(backend, store=dist.FileStore(str(store_dir / "store"), 1), rank=0, world_size=1)


def _pack_rows(rows: int, dim: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    x = torch.randn(rows, dim, generator=torch.Generator().manual_seed(rows + dim))
    x[1] = 0.0  # a zero row: x / eps, as F.normalize
    x[2] *= 1e-13
    return x.to(device=device, dtype=dtype)


def check_pack(rows: int, dim: int, dtype: torch.dtype, bf16_transport: bool, device: torch.device) -> Outcome:
    """fastcse::gather_rows on one rank: the packed rows are F.normalize's (in fp32, rounded to the
    wire dtype), and its backward is F.normalize's backward."""
    x = _pack_rows(rows, dim, dtype, device).requires_grad_()
    gathered, counts = _gather_normalized_rows(x, bf16_transport)
    wire = torch.bfloat16 if bf16_transport else dtype
    reference = x.detach().float().requires_grad_()
    expected = F.normalize(reference, dim=1, eps=NORMALIZE_EPS)
    upstream = torch.randn(rows, dim, generator=torch.Generator().manual_seed(5)).to(device)
    gathered.backward(upstream.to(gathered.dtype))
    expected.backward(upstream)
    # Two units in the last place of the wire dtype (the kernel's fp32 norm sums in another order).
    tol = max(2 * torch.finfo(wire).eps, 1e-5)
    forward = testing.agreement(gathered, expected.detach().to(wire).to(dtype).double(), tol, floor=1.0)
    # The zero row's gradient is upstream / eps = 1e12 x: past fp16's range, only its sign is checked.
    grad_tol = max(2 * torch.finfo(dtype).eps, 1e-5)
    backward = testing.row_agreement(x.grad, reference.grad.double(), grad_tol, floor=1.0)
    reasons = [testing.agreement_reason("packed rows", forward, tol)] if not forward.ok else []
    reasons += [testing.agreement_reason("d rows", backward, grad_tol)] if not backward.ok else []
    if counts.flatten().tolist() != [rows]:
        reasons.append(f"counts {counts.tolist()} != [[{rows}]]")
    return Outcome(not reasons, {"rows_error": forward.error, "grad_error": backward.error, "tol": tol},
                   "; ".join(reasons))


def check_process_group(case: LossCase, device: torch.device, bf16_transport: bool = False) -> Outcome:
    """info_nce(process_group=WORLD) on one rank is the local loss, gradients included."""
    tensors, upstream = case.inputs(), case.upstream()
    group = _world_group(bf16_transport)
    got = case.run(fastcse.info_nce, tensors, device, upstream, backend="triton", process_group=group)
    want = case.run(fastcse.info_nce, tensors, device, upstream, backend="triton")
    tol = testing.TOL[torch.bfloat16] if bf16_transport else case.tol
    return Outcome.of(testing.compare_results(got, {n: t.double() for n, t in want.items()}, tol, case.floor))


def distributed_plan(shapes: Shapes, pack_kernel: bool):
    """(name, case) pairs; the pack checks need the CUDA pack kernel on CUDA (ATen packs on the CPU)."""
    rows, dim = shapes.distributed
    planned = []
    for dtype, wire in ((torch.float32, False), (torch.float16, False), (torch.bfloat16, False), (torch.float32, True)):
        name = f"pack/{SHORT_DTYPE[dtype]}{'-bf16-wire' if wire else ''}"
        if pack_kernel:
            planned.append((name, partial(check_pack, rows, dim, dtype, wire)))
        else:
            planned.append((name, skip_case("fastcse._C was built without the CUDA pack kernel (no nvcc or "
                                            "CUDA_HOME at build time): gather_rows packs with ATen")))
    cases = [(LossCase(rows, 2, dim, torch.float32, symmetric=True, weight=0.5, seed=51), False),
             (LossCase(rows, 1, dim, torch.bfloat16, weight=0.3, reduction="none", seed=52), False),
             (LossCase(rows, 0, dim, torch.float16, symmetric=True, reduction="sum", seed=53), False),
             (LossCase(rows, 1, dim, torch.float32, weight=0.3, seed=54), True)]
    for case, wire in cases:
        planned.append((f"process_group/{case.name}{'/bf16-wire' if wire else ''}",
                        partial(check_process_group, case, bf16_transport=wire)))
    return planned

