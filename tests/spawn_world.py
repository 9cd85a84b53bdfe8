"""Runs a function on W spawned processes (a gloo world on 127.0.0.1) and collects what each
rank reports, with a deadline: a hang is a test failure, not a stuck CI job."""

from __future__ import annotations

import os
import queue
import socket
import time

import torch.multiprocessing as mp

_ENV = {"GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def spawn_world(worker, world: int, *args, timeout_s: float) -> dict[int, object]:
    """Starts ``worker(rank, world, port, results, *args)`` on ``world`` processes; each puts
    ``(rank, payload)`` on ``results``. Returns {rank: payload}; fails if a rank never reports."""
    port = free_port()
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    saved = {key: os.environ.get(key) for key in _ENV}
    os.environ.update(_ENV)  # inherited by the children at spawn
    try:
        procs = [ctx.Process(target=worker, args=(rank, world, port, results, *args)) for rank in range(world)]
        for proc in procs:
            proc.start()
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    deadline = time.monotonic() + timeout_s
    reports = {}
    try:
        while len(reports) < world:
            rank, payload = results.get(timeout=max(1.0, deadline - time.monotonic()))
            reports[rank] = payload
    except queue.Empty:
        pass
    finally:
        for proc in procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
                proc.join()
    missing = sorted(set(range(world)) - set(reports))
    assert not missing, f"ranks {missing} did not report within {timeout_s}s (hang?)"
    return reports
