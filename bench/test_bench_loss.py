"""fastcse.info_nce vs the plain PyTorch loss vs the physical floor, forward + backward, on the CPU.

Run: ``pytest bench/test_bench_loss.py --benchmark-json=out.json`` then
``python bench/report.py out.json`` for the README table. Each case records, beside
pytest-benchmark's times, the extra peak memory of one step in a fresh process
(``extra_peak_mib``) and, for the losses, the time relative to the floor measured in the
same run (``x_floor``).

At B = 65536 (one hard negative each: 131072 candidates) neither the plain loss nor the
bare floor products fit in 24 GiB (each B x N fp32 matrix is 32 GiB), so only fastcse
runs there, once, and its ``x_floor_est`` uses the floor's FLOP rate measured at the
largest size with the same d.
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
HUGE = (512, 32) if QUICK else (65536, 768)
_FLOOR_SECONDS: dict[tuple, float] = {}

CASES = [(impl, b, d, k) for b, d, k in itertools.product(SIZES, DIMS, NEGATIVES)
         for impl in ("floor", "fastcse", "plain")]
CASES.append(("fastcse", *HUGE, 1))


def _flops(batch, dim, num_neg):
    return 6 * batch * batch * (1 + num_neg) * dim


@pytest.mark.parametrize("impl,batch,dim,num_neg", CASES, ids=[f"{i}-B{b}-d{d}-k{k}" for i, b, d, k in CASES])
def test_info_nce_step(benchmark, impl, batch, dim, num_neg):
    benchmark.group = f"B={batch} d={dim} k={num_neg}"
    huge = (batch, dim) == HUGE
    setup, run = FACTORIES[impl](batch, dim, num_neg)
    if huge:  # warm up at a small size: one full step here is minutes
        small_setup, small_run = FACTORIES[impl](256, dim, num_neg)
        small_run(small_setup())
    state = setup()
    if not huge:
        run(state)  # warm-up: first touch of buffers, BLAS threads
    benchmark.pedantic(run, args=(state,), rounds=1 if batch >= 16384 else 3, iterations=1)
    del state
    if benchmark.stats is None:  # --benchmark-disable: the step ran once, as a smoke test
        return
    seconds = benchmark.stats.stats.min
    benchmark.extra_info["gflop_per_s"] = round(_flops(batch, dim, num_neg) / seconds / 1e9, 1)
    key = (batch, dim, num_neg)
    if impl == "floor":
        _FLOOR_SECONDS[key] = seconds
    elif key in _FLOOR_SECONDS:
        benchmark.extra_info["x_floor"] = round(seconds / _FLOOR_SECONDS[key], 3)
    elif huge:
        same_dim = [k for k in _FLOOR_SECONDS if k[1] == dim]
        if same_dim:
            ref = max(same_dim)
            floor_rate = _flops(*ref) / _FLOOR_SECONDS[ref]
            benchmark.extra_info["x_floor_est"] = round(seconds / (_flops(batch, dim, num_neg) / floor_rate), 3)
    factory = {"floor": "floor", "fastcse": "fastcse_loss", "plain": "plain_loss"}[impl]
    benchmark.extra_info["extra_peak_mib"] = round(
        extra_peak_mib("workloads", factory, batch=batch, dim=dim, num_neg=num_neg), 1)
