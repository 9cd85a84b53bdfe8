"""The C++ sources build with CMake (find_package(Torch)) into a library torch.ops.load_library loads,
and its TORCH_LIBRARY(fastcse) ops coexist with the Python custom ops of the same namespace,
whichever is registered first."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

# One rank (HashStore, no ports): the gathered rows are the local rows, and info_nce through the
# process group must equal the plain single-process loss, gradients included.
_PROBE = r"""
import sys
import torch
library, order = sys.argv[1], sys.argv[2]
if order == "library-first":
    torch.ops.load_library(library)
import fastcse
import fastcse.ops  # defines the Python custom ops fastcse::info_nce(_backward)
if order == "python-first":
    torch.ops.load_library(library)
import torch.distributed as dist
dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
assert torch.ops.fastcse.info_nce.default is not None and torch.ops.fastcse.gather_rows.default is not None
a, p, n = torch.randn(5, 8), torch.randn(5, 8), torch.randn(5, 2, 8)
leaves = [t.clone().requires_grad_() for t in (a, p, n)]
loss = fastcse.info_nce(*leaves, symmetric=True, hard_negative_weight=0.5, process_group=dist.group.WORLD)
loss.backward()
plain = [t.clone().requires_grad_() for t in (a, p, n)]
want = fastcse.info_nce(*plain, symmetric=True, hard_negative_weight=0.5)
want.backward()
torch.testing.assert_close(loss, want)
for mine, ref in zip(leaves, plain):
    torch.testing.assert_close(mine.grad, ref.grad)
dist.destroy_process_group()
print("ok", order)
"""


@pytest.mark.slow
def test_cmake_build_loads_and_coexists_with_python_ops(tmp_path):
    prefix = torch.utils.cmake_prefix_path
    build = tmp_path / "build"
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    subprocess.run(["cmake", "-S", str(ROOT), "-B", str(build), f"-DCMAKE_PREFIX_PATH={prefix}", *generator],
                   check=True, capture_output=True, timeout=300)
    subprocess.run(["cmake", "--build", str(build)], check=True, capture_output=True, timeout=600)
    library = build / "libfastcse_ops.so"
    assert library.exists(), sorted(p.name for p in build.iterdir())
    for order in ("library-first", "python-first"):
        env = {**os.environ, "FASTCSE_EXTENSION": str(library)}  # fastcse.distributed loads this library
        out = subprocess.run([sys.executable, "-c", _PROBE, str(library), order], capture_output=True, text=True,
                             timeout=120, env=env)
        assert out.returncode == 0 and f"ok {order}" in out.stdout, out.stdout + out.stderr
