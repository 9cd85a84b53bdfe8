"""Distributed negatives on 2 gloo processes (CPU): forward + backward of one step, and bytes sent.

    pytest bench/test_bench_distributed.py --benchmark-columns=min,median,max

Methods (same global batch: 2 ranks x B anchors, positives and one hard negative each, d=768):
- fastcse:          info_nce(process_group=pg): fastcse::gather_rows (normalized rows, exact
                    sizes) + local rows x global candidates; backward sums gradients to owners.
- fastcse_bf16:     the same with bf16 on the wire (GatherGroup(pg, bf16_transport=True)).
- allgather_local:  torch.distributed.nn.functional.all_gather of positives and negatives + the
                    same fused local-rows loss (the op fastcse uses): the cost of torch's gather.
- allgather_full:   all_gather of anchors, positives and negatives + fastcse.info_nce over the
                    whole global batch on every rank (the common pattern: every rank recomputes
                    the global logits; its gradients are world-size times the true ones).
The benchmarked call sends one command to both ranks and waits for both to finish one step.
test_bytes_sent reports the payload bytes each rank sends per step and the loopback bytes
measured in /proc/net/dev (all traffic on lo, headers included: an upper bound).
"""

from __future__ import annotations

import os
import queue
import socket

import pytest
import torch
import torch.multiprocessing as mp

from conftest import QUICK

WORLD = 2
BATCH = 64 if QUICK else 256  # anchors per rank
DIM = 768
TIMEOUT_S = 300
METHODS = ("fastcse", "fastcse_bf16", "allgather_local", "allgather_full")


def _loopback_bytes() -> int:
    with open("/proc/net/dev") as f:
        for line in f:
            name, _, counters = line.partition(":")
            if name.strip() == "lo":
                return int(counters.split()[8])  # transmitted bytes
    raise RuntimeError("no lo interface in /proc/net/dev")


def _worker(rank, port, commands, replies):
    import warnings

    import torch.distributed as dist
    import torch.distributed.nn.functional as dist_nn

    import fastcse
    from fastcse.distributed import GatherGroup
    from fastcse.ops import info_nce_call
    from fastcse.problem import describe

    # torch.distributed.nn.functional.all_gather is deprecated, but it is the baseline asked for.
    warnings.filterwarnings("ignore", category=FutureWarning, message=".*all_gather is deprecated")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    group = dist.group.WORLD
    gen = torch.Generator().manual_seed(rank)
    inputs = [torch.randn(BATCH, DIM, generator=gen) for _ in range(3)]  # anchor, positive, negative
    total, start = WORLD * BATCH, rank * BATCH

    def step(method):
        anchor, positive, negative = (t.clone().requires_grad_() for t in inputs)
        if method in ("fastcse", "fastcse_bf16"):
            pg = GatherGroup(group, bf16_transport=True) if method == "fastcse_bf16" else group
            loss = fastcse.info_nce(anchor, positive, negative, process_group=pg)
        elif method == "allgather_local":
            candidates = torch.cat(dist_nn.all_gather(positive, group) + dist_nn.all_gather(negative, group))
            # This rank's anchors against every rank's candidates, as fastcse.distributed lays them out.
            problem = describe(anchor, candidates, None, pos_start=start, neg_start=total + start, num_neg=1,
                               normalize=True, hard_negative_weight=0.0)
            loss = info_nce_call(problem, anchor, candidates, torch.tensor(0.05), reduction="sum",
                                 grad_in_forward=True, backend="cpu")
            loss = loss / total
        elif method == "allgather_full":
            gathered = [torch.cat(dist_nn.all_gather(t, group)) for t in (anchor, positive, negative)]
            loss = fastcse.info_nce(*gathered)
        else:
            raise ValueError(method)
        loss.backward()
        return loss.item()

    while (command := commands.get()) is not None:
        method, iterations = command
        before = _loopback_bytes()
        losses = [step(method) for _ in range(iterations)]
        dist.barrier()
        replies.put((rank, losses[-1], _loopback_bytes() - before))
    dist.destroy_process_group()


class _Ranks:
    def __init__(self):
        ctx = mp.get_context("spawn")
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        self.commands = [ctx.Queue() for _ in range(WORLD)]
        self.replies = ctx.Queue()
        self.procs = [ctx.Process(target=_worker, args=(r, port, self.commands[r], self.replies))
                      for r in range(WORLD)]
        for proc in self.procs:
            proc.start()

    def run(self, method, iterations=1):
        for q in self.commands:
            q.put((method, iterations))
        try:
            replies = [self.replies.get(timeout=TIMEOUT_S) for _ in range(WORLD)]
        except queue.Empty:
            raise RuntimeError(f"{method}: the ranks did not answer within {TIMEOUT_S}s") from None
        return sorted(replies)

    def close(self):
        for q in self.commands:
            q.put(None)
        for proc in self.procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()


@pytest.fixture(scope="module")
def ranks():
    group = _Ranks()
    group.run("fastcse")  # warm-up: process-group connections, lazy imports
    yield group
    group.close()


@pytest.mark.parametrize("method", METHODS)
def test_step_time(benchmark, ranks, method):
    benchmark.group = f"distributed info_nce, {WORLD} gloo ranks x {BATCH} anchors, d={DIM}, k=1"
    replies = benchmark.pedantic(ranks.run, args=(method,), rounds=3 if QUICK else 10, warmup_rounds=1)
    losses = [loss for _, loss, _ in replies]
    # allgather_local returns each rank's share of the loss; the others the global loss on every rank.
    value = sum(losses) if method == "allgather_local" else losses[0]
    assert method == "allgather_local" or losses[0] == losses[1], f"ranks returned different losses {losses}"
    expected = ranks.run("allgather_full")[0][1]  # the global loss, computed whole on each rank
    assert abs(value - expected) < 1e-3 * max(1.0, abs(expected)), (method, value, expected)


def test_bytes_sent(ranks):
    """Payload per rank per step and the loopback bytes measured (min over 3 runs of 5 steps)."""
    rows = 2 * BATCH  # positives + negatives each rank sends in the forward
    payload = {
        "fastcse": (WORLD - 1) * rows * DIM * 4 + (WORLD - 1) * rows * DIM * 4,
        "fastcse_bf16": (WORLD - 1) * rows * DIM * 2 + (WORLD - 1) * rows * DIM * 4,
        "allgather_local": (WORLD - 1) * rows * DIM * 4 + (WORLD - 1) * rows * DIM * 4,
        "allgather_full": (WORLD - 1) * 3 * BATCH * DIM * 4 * 2,
    }
    measured = {}
    for method in METHODS:
        per_step = []
        for _ in range(3):
            replies = ranks.run(method, iterations=5)
            per_step.append(replies[0][2] / 5 / WORLD)  # lo counts both ranks' sends
        measured[method] = min(per_step)
        print(f"{method:16s} payload sent per rank per step {payload[method] / 2**20:6.2f} MiB "
              f"(forward + backward); measured on lo {measured[method] / 2**20:6.2f} MiB")
    assert measured["fastcse_bf16"] < 0.85 * measured["fastcse"], measured
    for method in METHODS:
        assert measured[method] >= payload[method], (method, measured[method], payload[method])
