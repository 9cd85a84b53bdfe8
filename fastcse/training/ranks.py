"""Multi-process helpers (no-ops in one process): the process group under torchrun, each
rank's device, rank 0's work shared with the others, the gradient all-reduce."""

from __future__ import annotations

import functools
import os

import torch
import torch.distributed as dist


# --------------------------------------------------------------------------------------------
# Multi-process helpers (no-ops in one process)


def current_world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) without torch.distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def several_torchrun_workers() -> bool:
    """WORLD_SIZE > 1 in the environment: this process is one of several that torchrun started."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def torchrun_process_group(train_fn):
    """Under ``torchrun`` (WORLD_SIZE > 1 in the environment) with no process group yet, e.g.
    ``torchrun -m fastcse train``: joins the default group (gloo for CPU tensors, NCCL for CUDA
    where available) for the run and destroys it afterwards. A caller that initialized
    torch.distributed itself keeps its group."""

    @functools.wraps(train_fn)
    def wrapper(*args, **kwargs):
        created = False
        if dist.is_available() and not dist.is_initialized() and several_torchrun_workers() \
                and "MASTER_ADDR" in os.environ:
            dist.init_process_group()
            created = True
        try:
            return train_fn(*args, **kwargs)
        finally:
            if created:
                dist.destroy_process_group()

    return wrapper


def on_rank0(world: int, rank: int, fn, *args):
    """Runs ``fn`` on rank 0 only; the other ranks wait for it (a broadcast, i.e. a barrier) and
    get its return value. An exception on rank 0 is raised on every rank instead of leaving the
    others blocked in the next collective."""
    if world == 1:
        return fn(*args)
    box = [None, None]
    if rank == 0:
        try:
            box[0] = fn(*args)
        except BaseException as error:  # noqa: BLE001 - re-raised below, after telling the others
            box[1] = f"{type(error).__name__}: {error}"
            dist.broadcast_object_list(box, src=0)
            raise
    dist.broadcast_object_list(box, src=0)
    if box[1] is not None:
        raise RuntimeError(f"rank 0 failed: {box[1]}")
    return box[0]


def broadcast_model(model) -> None:
    """Rank 0's weights and buffers on every rank (the ranks must start from the same model)."""
    with torch.no_grad():
        for tensor in list(model.parameters()) + list(model.buffers()):
            dist.broadcast(tensor.data, src=0)


def all_reduce_grads(params) -> None:
    """Sums the parameter gradients over the ranks, in one flat buffer per dtype."""
    grads = [p.grad for p in params if p.grad is not None]
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for g in grads:
        by_dtype.setdefault(g.dtype, []).append(g)
    for group in by_dtype.values():
        flat = torch.cat([g.reshape(-1) for g in group])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for g in group:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()


def rank_device(device, world: int, local_rank: int | None, cuda_available: bool) -> torch.device | None:
    """The device this rank trains on (None: where the model already is). Under torchrun with
    CUDA, ``device=None`` or a plain ``"cuda"`` means the rank's own GPU, ``cuda:{LOCAL_RANK}``:
    otherwise every rank puts its model and NCCL's communicator on the current device, GPU 0."""
    if world > 1 and cuda_available and local_rank is not None:
        if device is None or (torch.device(device).type == "cuda" and torch.device(device).index is None):
            return torch.device("cuda", local_rank)
    return None if device is None else torch.device(device)


def _local_rank(rank: int) -> int:
    """torchrun's LOCAL_RANK; for a group started without it (mp.spawn), the rank modulo the GPUs."""
    if "LOCAL_RANK" in os.environ:
        return int(os.environ["LOCAL_RANK"])
    return rank % max(1, torch.cuda.device_count())


def set_up_rank_device(device, world: int, rank: int) -> torch.device | None:
    """This rank's device (:func:`rank_device`), made CUDA's current device under torchrun."""
    device = rank_device(device, world, _local_rank(rank) if world > 1 else None, torch.cuda.is_available())
    if world > 1 and device is not None and device.type == "cuda":
        torch.cuda.set_device(device)  # before the first collective: NCCL communicates on the current device
    return device


def check_multi_process(batch_size: int, world: int) -> None:
    """What a run over ``world`` > 1 processes needs beyond one process: a batch to split and the
    C++ extension."""
    if world > 1:
        if batch_size < world:
            raise ValueError(f"batch_size ({batch_size}) is the global batch, split over {world} ranks: it must be "
                             f"at least the world size")
        from fastcse.distributed import load_extension

        load_extension()  # a missing extension fails now, on every rank, not at the first step


