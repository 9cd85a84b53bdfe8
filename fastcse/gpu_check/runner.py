"""The GPU kit's run: the sections in order, each within its wall-clock budget, the report
rewritten after each case."""

from __future__ import annotations

import subprocess
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch

from fastcse.gpu_check.cases import Shapes
from fastcse.gpu_check.compile import compile_plan
from fastcse.gpu_check.correctness import correctness_plan
from fastcse.gpu_check.determinism import determinism_plan
from fastcse.gpu_check.distributed import distributed_plan, init_world_of_one
from fastcse.gpu_check.environment import REPO_ROOT
from fastcse.gpu_check.extension import (ExtensionBuild, finish_extension_build, has_cuda_pack_kernel,
                                         importable_extension, load_extension_module, start_extension_build)
from fastcse.gpu_check.peers import PEERS, install_peer, peer_version
from fastcse.gpu_check.report import Report, Section
from fastcse.gpu_check.results import (CORRECTNESS, FAIL, PASS, SETUP, SPEED, Check, Outcome, exception_summary,
                                       skip_case)
from fastcse.gpu_check.speed import (FALSE_NEGATIVE_BATCHES, FALSE_NEGATIVE_SPEED, MATRYOSHKA_SPEED,
                                    MATRYOSHKA_SPEED_IMPLS, SPEED_BATCHES, SPEED_DIMS, SPEED_DTYPES, SPEED_IMPLS,
                                    false_negative_speed_plan, matryoshka_speed_plan, speed_plan)
from fastcse.gpu_check.st_step import MINILM_L6, ST_BATCH, ST_MINI_BATCH, st_step_plan

# Wall-clock seconds per section, per profile: quick ~4 min, full ~8 min on an H100/H200
# (start-up and imports aside); interpret ~1 min on 2 CPU cores.
BUDGETS = {
    "interpret": {"setup": 20, "correctness": 60, "determinism": 5, "compile": 20, "distributed": 10,
                  "speed": 0, "st_step": 0},
    "quick": {"setup": 20, "correctness": 80, "determinism": 10, "compile": 40, "distributed": 20,
              "speed": 60, "st_step": 25},
    "full": {"setup": 20, "correctness": 170, "determinism": 15, "compile": 60, "distributed": 30,
             "speed": 140, "st_step": 45},
}
# The extension build runs in the background from the start; the distributed section waits for it.
BUILD_TIMEOUT_S = {"quick": 200, "full": 280}
# A cap on the whole run, above the sum of the budgets (a section may overrun by its last case):
# later sections get what is left, so a run stays well inside a 10-minute command limit.
RUN_DEADLINE_S = {"interpret": 150, "quick": 270, "full": 530}
SECTIONS_NEEDING_CUDA = ("speed", "st_step")


@dataclass
class RunContext:
    report: Report
    device: torch.device
    profile: str
    shapes: Shapes
    selected: Callable[[str], bool]
    budget_scale: float
    scratch: Path
    wheels: Path
    tokenizer: Path
    build: ExtensionBuild | None = None
    build_error: str = ""  # why the build could not even start
    started: float = field(default_factory=time.monotonic)

    def section(self, name: str) -> Section:
        left = RUN_DEADLINE_S[self.profile] * self.budget_scale - (time.monotonic() - self.started)
        budget = min(BUDGETS[self.profile][name] * self.budget_scale, max(0.0, left))
        return Section(self.report, name, budget, self.selected, self.device)


def run_planned(ctx: RunContext, name: str, plan: Callable[[], list], kind_of: Callable[[str], str]) -> None:
    """Runs a section's planned cases; a harness error while planning is one failed check."""
    section = ctx.section(name)
    try:
        for case_name, case in plan():
            section.run(case_name, lambda c=case: c(ctx.device), kind_of(case_name))
    except Exception as error:  # the harness itself broke: correctness is not proven
        ctx.report.add(Check(name, "harness", FAIL, CORRECTNESS, exception_summary(error),
                             {"traceback": traceback.format_exc(limit=6)[-3000:]}))
    finally:
        section.close()


def _always(kind: str) -> Callable[[str], str]:
    return lambda _name: kind


def setup_plan(wheels: Path, target: Path):
    def peer_case(module, _device):
        return install_peer(module, wheels, target)

    return [(f"peer-{module}", partial(peer_case, module)) for module in PEERS]


def run_setup(ctx: RunContext) -> None:
    run_planned(ctx, "setup", partial(setup_plan, ctx.wheels, ctx.scratch / "peers"), _always(SETUP))
    for module, distribution in PEERS.items():  # the report's versions line names the peers it ran
        ctx.report.environment["versions"][distribution] = peer_version(module)


def run_correctness(ctx: RunContext) -> None:
    run_planned(ctx, "correctness", partial(correctness_plan, ctx.shapes), _always(CORRECTNESS))


def run_determinism(ctx: RunContext) -> None:
    run_planned(ctx, "determinism", partial(determinism_plan, ctx.shapes), _always(CORRECTNESS))


def run_compile(ctx: RunContext) -> None:
    # Inductor on the GPU (what users get); on the CPU aot_eager traces the same fake kernel and
    # autograd registration without compiling C++ (the custom op is opaque to either backend).
    backend = "inductor" if ctx.device.type == "cuda" else "aot_eager"
    run_planned(ctx, "compile", partial(compile_plan, ctx.shapes, backend), _always(CORRECTNESS))


def _resolve_extension(ctx: RunContext, section: Section) -> tuple[Path | None, str]:
    """(the loaded fastcse._C library, or None, and why not): the background build's result on
    CUDA, else the extension already importable here."""
    if ctx.build_error:
        section.run("extension-build", lambda: Outcome(False, {}, ctx.build_error), SETUP, required=True)
        return None, f"fastcse._C did not build ({ctx.build_error})"
    if ctx.build is None:
        library = importable_extension()
        return library, "" if library else "fastcse._C is not importable here and --build is off"
    result: dict = {}

    def finish():
        outcome, library = finish_extension_build(ctx.build)
        if library is not None:
            load_extension_module(library)
        result["library"] = library
        return outcome

    check = section.run("extension-build", finish, SETUP, required=True)
    library = result.get("library")
    return library, "" if library else f"fastcse._C did not build ({check.reason if check else 'deselected'})"


def run_distributed(ctx: RunContext) -> None:
    section = ctx.section("distributed")
    try:
        if not any(section.wants(name) for name, _ in distributed_plan(ctx.shapes, True)):
            return
        library, why_not = _resolve_extension(ctx, section)
        section.restart_budget()  # waiting for the build (bounded by its own timeout) is not the cases' time
        pack_kernel = ctx.device.type == "cpu" or (library is not None and has_cuda_pack_kernel(library))
        plan = distributed_plan(ctx.shapes, pack_kernel)
        if library is None:
            section.skip_all((name for name, _ in plan), why_not)
            return
        _run_in_world_of_one(ctx, section, plan)
    except Exception as error:
        ctx.report.add(Check("distributed", "harness", FAIL, CORRECTNESS, exception_summary(error),
                             {"traceback": traceback.format_exc(limit=6)[-3000:]}))
    finally:
        section.close()


def _run_in_world_of_one(ctx: RunContext, section: Section, plan) -> None:
    import torch.distributed as dist

    backend = "nccl" if ctx.device.type == "cuda" else "gloo"
    if ctx.device.type == "cuda":
        torch.cuda.set_device(ctx.device)

    def init():
        init_world_of_one(backend, ctx.scratch)
        return Outcome(True, {"backend": backend})

    started = section.run(f"init-{backend}", init, required=True)
    if started.status != PASS:
        section.skip_all((name for name, _ in plan), f"no {backend} process group: {started.reason}")
        return
    try:
        for name, case in plan:
            section.run(name, lambda c=case: c(ctx.device))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()  # Inf-CL's loss would take the ring path under a live group


def speed_section_plan(profile: str):
    """The speed rows, most telling first (a spent budget drops the last): the bare products and the
    loss's peers at the first B, d = 768, bf16; the Matryoshka and false-negative rows; the rest of
    the grid (fp32, d = 1024, other B)."""
    grid = speed_plan(SPEED_BATCHES[profile], SPEED_DIMS, SPEED_DTYPES, SPEED_IMPLS)
    head = f"B{SPEED_BATCHES[profile][0]}-d{SPEED_DIMS[0]}"
    first = [(n, c) for n, c in grid if n.startswith((f"{head}/", f"{head}-bf16/"))]
    options = matryoshka_speed_plan(*MATRYOSHKA_SPEED, impls=MATRYOSHKA_SPEED_IMPLS) \
        + false_negative_speed_plan(FALSE_NEGATIVE_BATCHES[profile], *FALSE_NEGATIVE_SPEED)
    taken = {name for name, _ in first}
    return first + options + [(n, c) for n, c in grid if n not in taken]


def run_speed(ctx: RunContext) -> None:
    run_planned(ctx, "speed", partial(speed_section_plan, ctx.profile), _always(SPEED))


def run_st_step(ctx: RunContext) -> None:
    plan = partial(st_step_plan, ctx.tokenizer, ctx.scratch, MINILM_L6, ST_BATCH[ctx.profile], ST_MINI_BATCH)
    # The agreement with sentence-transformers' losses is a correctness check; the timings are not.
    run_planned(ctx, "st_step", plan, lambda name: CORRECTNESS if name.startswith("agrees/") else SPEED)


def skip_cuda_sections(ctx: RunContext) -> None:
    for name in SECTIONS_NEEDING_CUDA:
        section = ctx.section(name)
        section.run("all", skip_case("needs a CUDA device (this is an --interpret run)"), SPEED, required=True)
        section.close()


def start_build(ctx: RunContext, budget_scale: float) -> None:
    """Starts the background build of fastcse._C (the distributed section waits for it)."""
    gpu = ctx.report.environment["gpu"]
    timeout = BUILD_TIMEOUT_S.get(ctx.profile, 600) * budget_scale
    try:
        ctx.build = start_extension_build(REPO_ROOT, ctx.scratch / "build", gpu["capability"] if gpu else None, timeout)
    except (OSError, subprocess.SubprocessError) as error:
        ctx.build_error = exception_summary(error)


def run_sections(ctx: RunContext) -> None:
    run_setup(ctx)
    run_correctness(ctx)
    run_determinism(ctx)
    run_compile(ctx)
    run_distributed(ctx)
    if ctx.device.type == "cuda":
        run_speed(ctx)
        run_st_step(ctx)
    else:
        skip_cuda_sections(ctx)
