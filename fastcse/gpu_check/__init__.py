"""GPU validation kit: ``python -m fastcse gpu-check [--out DIR] [--quick] [--interpret]``.

One command that proves fastcse on a real GPU from a plain checkout (``PYTHONPATH=.``, the
machine's own Python: nothing to install) and writes what it found to ``DIR/gpu_check.json``
and ``DIR/gpu_check.md``. Sections, in the order they run:

- **setup**: the peers Inf-CL and cut-cross-entropy installed from ``.whl/`` into a temporary
  folder (``scripts/fetch_gpu_wheels.sh`` downloads them); ``fastcse._C`` built with the
  machine's nvcc in a scratch copy of the sources, in the background while the GPU sections run.
- **correctness**: forward and every gradient (anchor, positive, negative, temperature) of
  ``info_nce(backend="triton")`` against ``info_nce_reference`` in fp64, with the test suite's
  tolerances, for fp32 (3xTF32), fp16 and bf16, every option, odd shapes, zero and tiny rows,
  and the optional keywords this fastcse has (found with ``inspect.signature``).
- **determinism**: two runs of forward + backward (fp32 atomics: not bitwise, but within tolerance).
- **compile**: ``torch.compile(fullgraph=True)`` of a function calling ``info_nce`` equals eager.
- **distributed**: the CUDA pack kernel and ``process_group=`` on a world of one NCCL rank.
- **speed**: forward + backward against plain PyTorch, Inf-CL, cut-cross-entropy and the bare
  bf16 matrix products (CUDA events, median), with peak memory; the row options, Matryoshka
  (against the per-dimension loop and sentence-transformers' MatryoshkaLoss) and false negatives
  by similarity (against the call without the rule and GISTEmbedLoss's math).
- **st_step**: a sentence-transformers training step on a random-weight MiniLM-L6, MNRL and
  CachedMNRL against fastcse's ``InfoNCELoss``.

Each section has a wall-clock budget, checked between cases; what it could not run in time is
reported as skipped, with that reason. ``--quick`` is budgeted for about 4 minutes on an
H100/H200, the default for about 8 (not yet measured: no GPU has run it). Exit status: 0, 1 if
any correctness check failed, 2 without a CUDA device.

The package, one module per part: ``runner`` (the sections in order, budgets), ``results`` and
``report`` (checks, the atomic json and markdown), ``correctness``, ``determinism``,
``compile``, ``distributed``, ``speed``, ``st_step``, ``peers`` (the peers' wheels and losses),
``extension`` (the fastcse._C build), ``rule_inputs`` (the false-negative cases' rows).
Tolerances, inputs and the fp64 comparison are the test suite's own, from ``fastcse.testing``.

``--interpret`` runs the same correctness, determinism, compile and distributed checks through
the Triton interpreter (``TRITON_INTERPRET=1``) on CPU tensors at tiny shapes, gloo instead of
NCCL, so that CI proves the harness itself; the sections that need CUDA are reported skipped.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from fastcse.gpu_check.cases import SHAPES
from fastcse.gpu_check.distributed import distributed_plan
from fastcse.gpu_check.environment import REPO_ROOT, environment
from fastcse.gpu_check.markdown import environment_line
from fastcse.gpu_check.report import Report
from fastcse.gpu_check.runner import RunContext, run_sections, start_build

__all__ = ["add_arguments", "run", "main"]

DEFAULT_OUT = "gpu_check_out"
DEFAULT_WHEELS = REPO_ROOT / ".whl"
DEFAULT_TOKENIZER = REPO_ROOT / ".gpu_kit" / "tokenizer"


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--out", default=DEFAULT_OUT, help="folder for gpu_check.json and gpu_check.md "
                                                           "(default: %(default)s)")
    parser.add_argument("--quick", action="store_true", help="a subset budgeted for ~4 minutes on an H100/H200 "
                                                             "(the default for ~8)")
    parser.add_argument("--interpret", action="store_true",
                        help="no GPU: the correctness checks through the Triton interpreter on CPU tensors at "
                             "tiny shapes (proves the harness; ~1 minute on 2 cores)")
    parser.add_argument("--only", action="append", metavar="TEXT",
                        help="run only the checks whose name (section/case) contains TEXT; repeatable")
    parser.add_argument("--build", choices=("auto", "yes", "no"), default="auto",
                        help="build fastcse._C with this machine's compilers first (auto: on CUDA; else the "
                             "importable one is used)")
    parser.add_argument("--budget-scale", type=float, default=1.0, metavar="X",
                        help="multiply every section's time budget by X (default: %(default)s)")
    parser.add_argument("--wheels", type=Path, default=DEFAULT_WHEELS,
                        help="folder of the peers' wheels (default: <checkout>/.whl)")
    parser.add_argument("--tokenizer", type=Path, default=DEFAULT_TOKENIZER,
                        help="MiniLM's tokenizer files (default: <checkout>/.gpu_kit/tokenizer)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser


def selector(only: list[str] | None) -> Callable[[str], bool]:
    """The --only filter: a check runs when its full name contains any of the texts (all without --only)."""
    if not only:
        return lambda _name: True
    return lambda name: any(text in name for text in only)


def enter_interpreter_mode() -> str | None:
    """Sets TRITON_INTERPRET=1, which must happen before the kernels' module is imported (it
    decides at import whether @triton.jit compiles or interprets). Returns the problem, if any."""
    os.environ["TRITON_INTERPRET"] = "1"
    kernels = sys.modules.get("fastcse.triton_info_nce")
    if kernels is not None and not getattr(kernels, "_INTERPRET", False):
        return ("fastcse.triton_info_nce was imported before --interpret could set TRITON_INTERPRET=1; "
                "run `TRITON_INTERPRET=1 python -m fastcse gpu-check --interpret`")
    return None


def no_cuda_message() -> str:
    build = f"CUDA {torch.version.cuda} build" if torch.version.cuda else "a CPU-only build"
    return (f"gpu-check: no CUDA device found (torch {torch.__version__}, {build}); run it on a GPU machine, "
            f"or pass --interpret to check the harness through the Triton interpreter on the CPU")


def run(args: argparse.Namespace, argv: list[str] | None = None) -> int:
    if args.interpret:
        problem = enter_interpreter_mode()
        if problem:
            print(f"gpu-check: {problem}", file=sys.stderr)
            return 2
        device = torch.device("cpu")
    elif torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        print(no_cuda_message(), file=sys.stderr)
        return 2
    # No network on the GPU machine: never let transformers try the hub (and wait for its timeouts).
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    profile = "interpret" if args.interpret else "quick" if args.quick else "full"
    report = Report(Path(args.out), profile, environment(device, profile, list(argv or sys.argv[1:])))
    print(f"gpu-check ({profile}) on {environment_line(report.environment)}", flush=True)
    with tempfile.TemporaryDirectory(prefix="fastcse-gpu-check-") as scratch:
        ctx = RunContext(report, device, profile, SHAPES[profile], selector(args.only), args.budget_scale,
                         Path(scratch), Path(args.wheels), Path(args.tokenizer))
        wanted = any(ctx.selected(f"distributed/{name}") for name, _ in distributed_plan(ctx.shapes, True))
        if wanted and (args.build == "yes" or (args.build == "auto" and device.type == "cuda")):
            start_build(ctx, args.budget_scale)
        try:
            run_sections(ctx)
        finally:
            if ctx.build is not None and ctx.build.process.poll() is None:
                ctx.build.process.kill()  # the build this run started, by its own handle
                ctx.build.process.wait()
    report.write(final=True)
    print(report.summary_line(), flush=True)
    return report.exit_code()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastcse gpu-check", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv), argv)
