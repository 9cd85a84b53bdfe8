"""Test configuration. The Triton kernels run through the interpreter on CPU tensors here
(no GPU on this project's machines); this must be set before any kernel module is imported.

CI runs the suite on two pytest-xdist workers (``-n 2 --dist loadfile``; a file's tests on one
worker, so that a module-scoped fixture such as a spawned gloo world or the AOT compile is built
once). On 2 cores each worker keeps one torch thread: most cases are small ops, the Triton
interpreter or subprocesses, and two workers' OpenMP threads would wait on each other."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch is imported; subprocesses inherit it

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import settings  # noqa: E402

# Property tests draw the same examples on every run, so that a CI result can be reproduced;
# HYPOTHESIS_PROFILE=explore draws new ones on each run, to hunt.
settings.register_profile("reproducible", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "reproducible"))

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long-running test (still part of the default run)")

