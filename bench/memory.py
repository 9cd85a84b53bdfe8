"""Honest peak memory: run one workload in a fresh Python process and read its peak RSS.

The child warms up at a tiny size, builds its inputs, resets the kernel's resident-set
high-water mark (``/proc/self/clear_refs``), runs the workload (once, or ``repeats`` times,
timing each) and reports the growth of the high-water mark (``VmHWM``) over the first run: the
extra peak memory the workload itself needed, including every temporary the allocator handed
back before the end. (Not ``ru_maxrss``: Linux keeps it
across fork and exec, so a child would inherit a large parent's peak.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

_CHILD = r"""
import json, sys, time
import torch
sys.path.insert(0, {bench_dir!r})
import {module} as m
kwargs = json.loads({kwargs!r})
# Warm-up at a tiny size: one-time library initialization (BLAS buffers, lazy imports) is not
# the workload's memory, and both sides of a comparison get the same treatment.
tiny_setup, tiny_run = m.{factory}(**dict(kwargs, batch=8))
tiny_run(tiny_setup())
setup, run = m.{factory}(**kwargs)
state = setup()

def hwm_kib():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])

def rss_kib():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])

with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the high-water mark to the current RSS
before = rss_kib()
start = time.perf_counter()
result = run(state)
seconds = [time.perf_counter() - start]
report = {{"extra_peak_mib": (hwm_kib() - before) / 1024}}
for _ in range({repeats} - 1):  # more timed runs in the same process (the peak is the first's)
    start = time.perf_counter()
    run(state)
    seconds.append(time.perf_counter() - start)
report["seconds"] = min(seconds)
report["run_seconds"] = seconds
if isinstance(result, torch.Tensor) and result.numel() == 1:
    report["value"] = float(result)  # a loss, to check that implementations agree
print(json.dumps(report))
"""


def extra_peak_mib(module: str, factory: str, timeout: float = 3600, **kwargs) -> float:
    """Extra peak RSS (MiB) of ``factory(**kwargs)``'s run step, measured in a fresh process."""
    return measure_in_fresh_process(module, factory, timeout, **kwargs)["extra_peak_mib"]


def measure_in_fresh_process(module: str, factory: str, timeout: float = 3600, repeats: int = 1, **kwargs) -> dict:
    """{"extra_peak_mib", "seconds", "run_seconds"[, "value": the scalar run returned]} of
    ``factory(**kwargs)``'s run in a fresh process (after a warm-up at a tiny size): each
    implementation's time and memory are its own. ``repeats`` > 1 times that many runs in the
    process; "seconds" is their minimum (the first run's extra peak is the memory reported)."""
    bench_dir = str(Path(__file__).resolve().parent)
    code = _CHILD.format(bench_dir=bench_dir, module=module, factory=factory, kwargs=json.dumps(kwargs),
                         repeats=int(repeats))
    env = dict(os.environ)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"memory probe failed ({module}.{factory} {kwargs}):\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])
