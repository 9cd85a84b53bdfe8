"""fastcse.info_nce vs the plain PyTorch loss vs the physical floor, forward + backward, on the CPU.

Run: ``pytest bench/test_bench_loss.py`` (add ``--benchmark-json=out.json`` and
``python bench/report.py out.json`` for the README table). Each case records, beside
pytest-benchmark's times, the extra peak memory of one step in a fresh process
(``extra_peak_mib``) and, for the losses, the time relative to the floor measured in
the same run (``x_floor``).
"""

from __future__ import annotations

import itertools

import pytest
from conftest import QUICK
from memory import extra_peak_mib
from workloads import FACTORIES

SIZES = [64, 256] if QUICK else [1024, 4096, 16384]
DIMS = [32] if QUICK else [384, 768]
NEGATIVES = [0, 1]
HUGE = 512 if QUICK else 65536  # fastcse (and the floor) only: the plain loss needs > 24 GiB here
_FLOOR_SECONDS: dict[tuple, float] = {}

CASES = [(impl, b, d, k) for b, d, k in itertools.product(SIZES, DIMS, NEGATIVES)
         for impl in ("floor", "fastcse", "plain")]
CASES += [(impl, HUGE, 768 if not QUICK else 32, 1) for impl in ("floor", "fastcse")]


def _rounds(batch: int) -> int:
    return 1 if batch >= 16384 else 3


@pytest.mark.parametrize("impl,batch,dim,num_neg", CASES,
                         ids=[f"{i}-B{b}-d{d}-k{k}" for i, b, d, k in CASES])
def test_info_nce_step(benchmark, impl, batch, dim, num_neg):
    benchmark.group = f"B={batch} d={dim} k={num_neg}"
    setup, run = FACTORIES[impl](batch, dim, num_neg)
    state = setup()
    run(state)  # warm-up: first-touch of buffers, BLAS thread start
    benchmark.pedantic(run, args=(state,), rounds=_rounds(batch), iterations=1)
    seconds = benchmark.stats.stats.min
    key = (batch, dim, num_neg)
    if impl == "floor":
        _FLOOR_SECONDS[key] = seconds
    elif key in _FLOOR_SECONDS:
        benchmark.extra_info["x_floor"] = round(seconds / _FLOOR_SECONDS[key], 3)
    del state
    benchmark.extra_info["extra_peak_mib"] = round(
        extra_peak_mib("workloads", _factory_name(impl),
                       batch=batch, dim=dim, num_neg=num_neg), 1)
    benchmark.extra_info["gflops_floor"] = round(6 * batch * batch * (1 + num_neg) * dim / 1e9, 2)


def _factory_name(impl: str) -> str:
    return {"floor": "floor", "fastcse": "fastcse_loss", "plain": "plain_loss"}[impl]
