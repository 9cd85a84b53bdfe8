"""Test configuration. The Triton kernels run through the interpreter on CPU tensors here
(no GPU on this project's machines); this must be set before any kernel module is imported.

CI runs the suite on two pytest-xdist workers (``-n 2 --dist loadgroup``): on 2 cores each worker
keeps one torch thread (most cases are small single-threaded ops, the interpreter, or subprocesses
with their own threads), and the tests that share a module-scoped fixture (a spawned gloo world,
a loaded model, the AOT compile) stay on one worker, which builds that fixture once."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch is imported; subprocesses inherit it

import pytest  # noqa: E402
import torch  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long-running test (still part of the default run)")


def pytest_collection_modifyitems(config, items):
    """Under ``--dist loadgroup``: a test that uses a module-scoped fixture joins its module's group."""
    for item in items:
        fixture_defs = getattr(item, "_fixtureinfo", None)
        fixture_defs = fixture_defs.name2fixturedefs if fixture_defs else {}
        if any(defs and defs[-1].scope == "module" for defs in fixture_defs.values()):
            item.add_marker(pytest.mark.xdist_group(item.module.__name__))
