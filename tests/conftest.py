"""Test configuration. The Triton kernels run through the interpreter on CPU tensors here
(no GPU on this project's machines); this must be set before any kernel module is imported."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long-running test (still part of the default run)")
