"""Ahead-of-time compilation of every Triton kernel of fastcse's Triton backend for sm_80 and sm_90.

No GPU is needed: triton.compile with an explicit GPUTarget runs the whole pipeline down to a
cubin with the ptxas shipped in the triton wheel. A compile error, a register spill or a
shared-memory budget overrun fails the test; registers and shared memory per kernel are printed.

conftest.py sets TRITON_INTERPRET=1 for the session, which turns @triton.jit functions into
interpreter objects that triton.compile cannot take: the compilation runs in a subprocess
(this file run as a script) with TRITON_INTERPRET removed.

The full matrix takes minutes on 2 cores, so it is compiled only when its inputs changed: a
sha256 of the kernel sources (every fastcse module with a @triton.jit / autotune / heuristics
function and every fastcse module those import, transitively), this file (it picks the compiled
specializations and the limits) and the installed triton version. ``tests/triton_aot_hash.json``
(kept in the repository) holds the hash of the last inputs whose compile passed:

- equal: the compile tests are skipped, saying so (FASTCSE_AOT_COMPILE=1 compiles anyway);
- different: the compile tests run, and test_stored_kernel_hash_is_current fails, so a kernel
  change cannot pass CI without a fresh AOT compile recorded in the repository.

After a kernel change (or a triton upgrade) run, with the project venv, and commit the file:

    .venv/bin/python tests/test_triton_aot.py --update-hash

It compiles the whole matrix for sm_80 and sm_90 (both at once), prints the table, and rewrites
tests/triton_aot_hash.json only if every kernel compiled without errors, spills or shared-memory
overruns (exit 1 otherwise).
"""

from __future__ import annotations

import ast
import contextlib
import hashlib
import importlib.metadata
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HASH_FILE = ROOT / "tests" / "triton_aot_hash.json"
UPDATE_COMMAND = ".venv/bin/python tests/test_triton_aot.py --update-hash"
TARGETS = {80: 166912, 90: 232448}  # compute capability -> max shared memory per block (bytes)
DTYPES = ("float32", "float16", "bfloat16")
# The production configs do not depend on d once d >= 32 (16-bit) / 16 (fp32), the d chunk widths;
# smaller d only shrink the chunk, which lowers register and shared-memory use.
DIM = 768
_TRITON_TYPES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}
_INPUT_POINTERS = ("q_ptr", "k_ptr", "x_ptr")  # the embeddings; ids_ptr is int32, every other pointer fp32
_FLOAT_SCALARS = ("inv_tau", "tau", "weight", "penalty_scale", "fixed_max", "g_scale")
_INT_POINTERS = ("ids_ptr", "bounds_ptr")  # the dense int32 ids (group / label), Matryoshka's boundaries
# As the JIT specializes d = 768 (and d_g = 768: the guide's width and strides).
_DIVISIBLE_INTS = ("dim", "stride", "stride_q", "stride_k", "cols_per_split", "dim_g", "stride_gq", "stride_gk")


def _score_specializations():
    """(label, constexprs) of the score kernels' cell rules that the launch code uses, less the
    full cross product (which would quadruple the compile time): query_to_doc's classic
    specializations (every NORMALIZE x HAS_BIAS x fused doc_to_query), each hardness PENALTY at
    its heaviest (bias and the fused doc_to_query tiles too: the most live tiles) and every other
    direction's MASK, those with NORMALIZE, which uses the most registers (the norm vectors and
    the scaled operand tiles: up to +67 on sm_80 in the classic kernels). The row options' IDS: the
    group mask and the label target at query_to_doc's heaviest cell rules (in-batch penalty,
    bias, fused doc_to_query), and the group mask on doc_to_doc (own documents and group: the
    most masks), whose fp32 backward is the tightest kernel on sm_80 (241 registers, like the
    other anchor-key directions', with or without the mask; query_to_doc's is 237 with either
    id mode). ``REV`` is FUSED_REVERSE in the forward and REVERSE in the backward."""
    from fastcse import triton_tiles as k

    none, self_, own = k.MASK_NONE.value, k.MASK_SELF.value, k.MASK_OWN_DOCUMENTS.value
    out = []

    def add(label, normalize, bias, penalty, mask, target, rev, ids=k.IDS_NONE.value, false_neg=k.FALSE_NEG_NONE.value):
        out.append((f"{label} norm={int(normalize)} bias={int(bias)} rev={int(rev)}",
                    dict(NORMALIZE=normalize, HAS_BIAS=bias, PENALTY=penalty, MASK=mask, HAS_TARGET=target, IDS=ids,
                         FALSE_NEG=false_neg, REV=rev)))

    for normalize in (True, False):
        for bias in (True, False):
            for rev in (True, False):
                add("query_to_doc", normalize, bias, k.PENALTY_NONE.value, none, True, rev)
    for mode, penalty in k.PENALTY_MODES.items():
        if mode is not None:
            add(f"query_to_doc {mode}", True, True, penalty, none, True, True)
    for name, ids in (("group", k.IDS_GROUP.value), ("label", k.IDS_LABEL.value)):
        add(f"query_to_doc in_batch_negatives {name}", True, True, k.PENALTY_IN_BATCH.value, none, True, True, ids)
    add("query_to_query", True, False, k.PENALTY_NONE.value, self_, False, False)
    add("doc_to_query", True, False, k.PENALTY_NONE.value, none, False, False)
    add("doc_to_doc", True, False, k.PENALTY_NONE.value, own, False, False)
    add("doc_to_doc group", True, False, k.PENALTY_NONE.value, own, False, False, k.IDS_GROUP.value)
    # False negatives by similarity (never with the fused doc_to_query): a guide's tile is one more
    # fp32 product and accumulator, at the heaviest cell rules above; self-guided reads the scores.
    for name, code in (("self-guided", k.FALSE_NEG_SELF.value), ("guided", k.FALSE_NEG_GUIDED.value)):
        add(f"query_to_doc in_batch_negatives label {name}", True, True, k.PENALTY_IN_BATCH.value, none, True, False,
            k.IDS_LABEL.value, code)
        add(f"doc_to_doc group {name}", True, False, k.PENALTY_NONE.value, own, False, False, k.IDS_GROUP.value, code)
    return out


def _variants(dtype_name):
    """(label, kernel name, constexprs, num_warps, num_stages): the specializations the launch code uses."""
    import torch

    from fastcse import triton_tiles as k
    from fastcse.checks import NORMALIZE_EPS

    cfg = k.select_config(getattr(torch, dtype_name), DIM, interpret=False)
    common = dict(UPCAST=False, PRECISION=cfg.precision, EPS_=NORMALIZE_EPS)
    fwd = dict(BLOCK_M=cfg.fwd.block_m, BLOCK_N=cfg.fwd.block_n, BLOCK_D=cfg.fwd.block_d, **common)
    bwd = dict(BLOCK_M=cfg.bwd.block_m, BLOCK_N=cfg.bwd.block_n, BLOCK_D=cfg.bwd.block_d, **common)
    rows = dict(BLOCK_R=cfg.block_r, BLOCK_D=cfg.block_d_rows, UPCAST=False)
    out = [("row_norm", "_row_norm_kernel", rows, cfg.warps_rows, 1)]
    forwards = set()
    for label, cells in _score_specializations():
        rev = cells.pop("REV")
        # The forward fuses doc_to_query's column sums against the fixed max: only with normalization.
        fused = rev and cells["NORMALIZE"]
        key = tuple(sorted(cells.items())) + (fused,)
        if key not in forwards:
            forwards.add(key)
            out.append((f"forward {label}".replace(f"rev={int(rev)}", f"rev={int(fused)}"), "_forward_kernel",
                        dict(cells, FUSED_REVERSE=fused, **fwd), cfg.fwd.warps, cfg.fwd.stages))
        out.append((f"backward {label}", "_backward_kernel", dict(cells, REVERSE=rev, **bwd),
                    cfg.bwd.warps, cfg.bwd.stages))
    out += _matryoshka_variants(dtype_name, cfg)
    out.append(("normalize_backward", "_normalize_backward_kernel", dict(EPS_=NORMALIZE_EPS, **rows), cfg.warps_rows,
                1))
    return out


def _matryoshka_variants(dtype_name, cfg):
    """Matryoshka's kernels (fastcse.triton_matryoshka) at 8 dimensions (the running statistics'
    width DP) and the heaviest cell rules: query_to_doc with the in-batch penalty, the bias and
    the label target, doc_to_doc with its masks and the group mask, and without normalization;
    the false-negative rule (self-guided: per-dimension thresholds; guided: the guide's cells held
    through the dimensions) at the two heaviest. fp16's backward takes its gradient products in
    fp32 (GRAD_FP32)."""
    from fastcse import triton_tiles as k

    none, own = k.MASK_NONE.value, k.MASK_OWN_DOCUMENTS.value
    no_rule = k.FALSE_NEG_NONE.value
    q2d = dict(NORMALIZE=True, HAS_BIAS=True, MASK=none, PENALTY=k.PENALTY_IN_BATCH.value, HAS_TARGET=True,
               IDS=k.IDS_LABEL.value)
    d2d = dict(NORMALIZE=True, HAS_BIAS=False, PENALTY=k.PENALTY_NONE.value, MASK=own, HAS_TARGET=False,
               IDS=k.IDS_GROUP.value)
    cells = [("query_to_doc in_batch_negatives label", dict(q2d, FALSE_NEG=no_rule)),
             ("doc_to_doc group", dict(d2d, FALSE_NEG=no_rule)),
             ("query_to_doc norm=0", dict(NORMALIZE=False, HAS_BIAS=True, PENALTY=k.PENALTY_NONE.value, MASK=none,
                                          HAS_TARGET=True, IDS=k.IDS_NONE.value, FALSE_NEG=no_rule))]
    for name, code in (("self-guided", k.FALSE_NEG_SELF.value), ("guided", k.FALSE_NEG_GUIDED.value)):
        cells += [(f"query_to_doc in_batch_negatives label {name}", dict(q2d, FALSE_NEG=code)),
                  (f"doc_to_doc group {name}", dict(d2d, FALSE_NEG=code))]
    import torch

    from fastcse.triton_matryoshka import matryoshka_tiles

    common = dict(UPCAST=False, PRECISION=cfg.precision)
    out = []
    for label, rules in cells:
        tiles = matryoshka_tiles(cfg, getattr(torch, dtype_name), rules["FALSE_NEG"] == k.FALSE_NEG_GUIDED.value)
        fwd, bwd = (dict(BLOCK_M=t.block_m, BLOCK_N=t.block_n, BLOCK_D=t.block_d, **common) for t in tiles)
        out.append((f"matryoshka forward {label}", "_matryoshka_forward_kernel", dict(rules, DP=8, **fwd),
                    tiles[0].warps, tiles[0].stages))
        out.append((f"matryoshka backward {label}", "_matryoshka_backward_kernel",
                    dict(rules, GRAD_FP32=dtype_name == "float16", **bwd), tiles[1].warps, tiles[1].stages))
    return out


def _signature(fn, constexprs, dtype_name):
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in _INT_POINTERS:
            sig[name] = "*i32"
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name.endswith("_ptr"):
            sig[name] = "*" + (_TRITON_TYPES[dtype_name] if name in _INPUT_POINTERS else "fp32")
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in _FLOAT_SCALARS:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
            if name in _DIVISIBLE_INTS:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, attrs


def _compile_all(capability: int) -> list[dict]:
    """Runs in the subprocess: compiles every variant, returns one record per kernel."""
    import triton
    from triton.backends.compiler import GPUTarget

    from fastcse import triton_backward, triton_forward, triton_matryoshka, triton_tiles

    kernels = {name: getattr(module, name) for module in (triton_tiles, triton_forward, triton_backward,
                                                           triton_matryoshka)
               for name in dir(module) if name.endswith("_kernel")}
    target = GPUTarget("cuda", capability, 32)
    records = []
    for dtype_name in DTYPES:
        for label, kernel_name, constexprs, warps, stages in _variants(dtype_name):
            fn = kernels[kernel_name]
            sig, attrs = _signature(fn, constexprs, dtype_name)
            record = dict(sm=capability, dtype=dtype_name, kernel=label, warps=warps, stages=stages,
                          blocks={n: v for n, v in constexprs.items() if n.startswith("BLOCK")})
            log = io.StringIO()
            started = time.perf_counter()
            try:
                with contextlib.redirect_stdout(log):  # TRITON_DUMP_PTXAS_LOG prints ptxas -v here
                    compiled = triton.compile(triton.compiler.ASTSource(fn, sig, constexprs, attrs), target=target,
                                              options=dict(num_warps=warps, num_stages=stages))
            except Exception as exc:  # reported per kernel, the test fails on it
                record["error"] = f"{type(exc).__name__}: {str(exc)[-2000:]}"
                records.append(record)
                continue
            text = log.getvalue()
            regs = re.search(r"Used (\d+) registers", text)
            spill_st = re.search(r"(\d+) bytes spill stores", text)
            spill_ld = re.search(r"(\d+) bytes spill loads", text)
            stack = re.search(r"(\d+) bytes stack frame", text)
            if not (regs and spill_st and spill_ld):
                record["error"] = f"no ptxas -v report found in: {text[-1000:]!r}"
            else:
                record.update(registers=int(regs.group(1)), spill_stores=int(spill_st.group(1)),
                              spill_loads=int(spill_ld.group(1)), stack=int(stack.group(1)) if stack else 0,
                              shared=compiled.metadata.shared, seconds=round(time.perf_counter() - started, 1))
            records.append(record)
    return records


def _module_path(name: str) -> Path | None:
    """The file of module ``name`` (a dotted name under the repository root), if it is one."""
    base = ROOT.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _fastcse_imports(path: Path) -> set[Path]:
    """The fastcse modules that the module at ``path`` imports (anywhere in it, relative imports too)."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:  # relative: `from . import x`, `from ..a import x`
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(parts + [module] if module else parts)
            # `from fastcse.x import y`: y may be a submodule or a name defined in fastcse.x. When
            # every name is a submodule (`from fastcse import checks`), the code read is theirs,
            # not the package's __init__ (whose lazy imports would pull in the whole package).
            submodules = [f"{module}.{alias.name}" for alias in node.names if _module_path(f"{module}.{alias.name}")]
            names = submodules if len(submodules) == len(node.names) else [module] + submodules
        else:
            continue
        found.update(p for name in names if name.split(".")[0] == "fastcse" and (p := _module_path(name)))
    return found


def _defines_triton_kernels(path: Path) -> bool:
    kernel_decorators = ("triton.jit", "triton.autotune", "triton.heuristics")
    return any(ast.unparse(decorator).startswith(kernel_decorators)
               for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
               if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) for decorator in node.decorator_list)


def kernel_source_files() -> list[Path]:
    """Every input of the AOT compile kept in this repository: the fastcse modules that define
    Triton kernels, every fastcse module they import (transitively: constants, configs, the
    problem description) and this file (the specializations, the limits)."""
    pending = [p for p in sorted((ROOT / "fastcse").rglob("*.py")) if _defines_triton_kernels(p)]
    assert pending, "no module of fastcse defines a Triton kernel: the kernel search is out of date"
    found = set()
    while pending:
        path = pending.pop()
        if path not in found:
            found.add(path)
            pending.extend(_fastcse_imports(path) - found)
    return sorted(found | {ROOT / "tests" / Path(__file__).name})


def kernel_sources_hash() -> dict:
    """sha256 over the installed triton version and the kernel source files (path and bytes)."""
    digest = hashlib.sha256(f"triton {importlib.metadata.version('triton')}\n".encode())
    files = [p.relative_to(ROOT).as_posix() for p in kernel_source_files()]
    for name in files:
        digest.update(f"{name}\n".encode() + (ROOT / name).read_bytes() + b"\n")
    return {"sha256": digest.hexdigest(), "triton": importlib.metadata.version("triton"), "files": files}


def _stored_hash() -> dict:
    return json.loads(HASH_FILE.read_text(encoding="utf-8")) if HASH_FILE.is_file() else {}


def _compile_is_current() -> bool:
    """Whether the stored hash is the current one (the matrix passed on these sources)."""
    return _stored_hash().get("sha256") == kernel_sources_hash()["sha256"]


def start_compile_jobs(stack: contextlib.ExitStack) -> dict:
    """Starts one compiling subprocess per target at once (they are independent: ~half the wall time on 2 cores)."""
    ptxas = Path(__import__("triton").__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    assert ptxas.is_file(), f"the triton wheel ships no ptxas at {ptxas}: AOT compilation cannot run"
    jobs = {}
    for capability in sorted(TARGETS):
        # A fresh cache forces ptxas to run (and log) for every kernel.
        cache = stack.enter_context(tempfile.TemporaryDirectory())
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env.update(TRITON_CACHE_DIR=cache, TRITON_DUMP_PTXAS_LOG="1", TRITON_DEFAULT_FP_FUSION="1",
                   PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""))
        jobs[capability] = stack.enter_context(
            subprocess.Popen([sys.executable, __file__, str(capability)], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True))
    return jobs


@pytest.fixture(scope="module")
def compile_jobs():
    if _compile_is_current() and os.environ.get("FASTCSE_AOT_COMPILE") != "1":
        pytest.skip(f"kernel sources unchanged since the last passing AOT compile ({HASH_FILE.name}); "
                    "FASTCSE_AOT_COMPILE=1 compiles anyway")
    with contextlib.ExitStack() as stack:
        jobs = start_compile_jobs(stack)
        yield jobs
        for proc in jobs.values():
            if proc.poll() is None:
                proc.kill()


def test_stored_kernel_hash_is_current():
    current, stored = kernel_sources_hash(), _stored_hash()
    assert stored.get("sha256") == current["sha256"], (
        f"the kernel sources or triton changed since the AOT compile recorded in {HASH_FILE.relative_to(ROOT)} "
        f"(stored: triton {stored.get('triton')}, {stored.get('files')}; now: triton {current['triton']}, "
        f"{current['files']}): run `{UPDATE_COMMAND}` and commit the file")


def test_kernel_hash_follows_every_kernel_input(tmp_path, monkeypatch):
    """The hash moves with a kernel module, with a module it imports and with this file, and not
    with the rest of the package (a copy of the checkout, edited)."""
    import shutil

    shutil.copytree(ROOT / "fastcse", tmp_path / "fastcse", ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    (tmp_path / "tests").mkdir()
    shutil.copy(Path(__file__), tmp_path / "tests" / Path(__file__).name)
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    inputs = kernel_source_files()
    kernel = next(p for p in inputs if p.parent.name != "tests" and _defines_triton_kernels(p))
    imported = sorted(_fastcse_imports(kernel) - {kernel})
    untouched = next(p for p in sorted((tmp_path / "fastcse").rglob("*.py")) if p not in inputs)
    assert imported, "the kernel module imports nothing from fastcse: the import search is out of date"
    start = kernel_sources_hash()["sha256"]
    with open(untouched, "a") as f:
        f.write("# an edit outside the kernels' inputs\n")
    assert kernel_sources_hash()["sha256"] == start
    seen = {start}
    for path in (kernel, imported[0], tmp_path / "tests" / Path(__file__).name):
        with open(path, "a") as f:
            f.write("# an edit\n")
        seen.add(kernel_sources_hash()["sha256"])
    assert len(seen) == 4


@pytest.mark.parametrize("capability", sorted(TARGETS))
def test_kernels_compile_for_gpu_without_spills(capability, compile_jobs):
    check_compile_job(capability, compile_jobs[capability])


def check_compile_job(capability: int, proc: subprocess.Popen) -> None:
    """Waits for one target's compiling subprocess; prints its table and asserts on it."""
    stdout, stderr = proc.communicate(timeout=900)
    assert proc.returncode == 0, f"AOT subprocess failed:\n{stdout[-3000:]}\n{stderr[-3000:]}"
    records = [json.loads(line[len("AOT "):]) for line in stdout.splitlines() if line.startswith("AOT ")]
    expected = sum(len(_variants(d)) for d in DTYPES)
    assert len(records) == expected, f"expected {expected} kernels, got {len(records)}:\n{stdout[-3000:]}"
    print(f"\nsm_{capability}: dtype | kernel | blocks | warps x stages | registers | spill st/ld | stack | shared | s")
    for r in records:
        if "error" in r:
            print(f"sm_{capability} {r['dtype']:8} {r['kernel']:66} ERROR")
            continue
        blocks = "x".join(str(v) for v in r["blocks"].values())
        print(f"sm_{capability} {r['dtype']:8} {r['kernel']:66} {blocks:10} {r['warps']}x{r['stages']} "
              f"{r['registers']:4} {r['spill_stores']}/{r['spill_loads']} {r['stack']:4} {r['shared']:7} "
              f"{r['seconds']:5}")
    errors = [f"{r['dtype']} {r['kernel']}: {r['error']}" for r in records if "error" in r]
    assert not errors, "compile errors:\n" + "\n".join(errors)
    spills = [f"{r['dtype']} {r['kernel']}: {r['spill_stores']}/{r['spill_loads']} bytes spilled, "
              f"{r['registers']} registers" for r in records if r["spill_stores"] or r["spill_loads"]]
    assert not spills, "register spills:\n" + "\n".join(spills)
    over = [f"{r['dtype']} {r['kernel']}: {r['shared']} bytes" for r in records if r["shared"] > TARGETS[capability]]
    assert not over, f"shared memory above sm_{capability}'s {TARGETS[capability]} bytes:\n" + "\n".join(over)


def update_hash() -> int:
    """Compiles the whole matrix for every target; on success rewrites HASH_FILE (atomically)."""
    current = kernel_sources_hash()  # before the compile: a source edited meanwhile is not recorded
    failed = []
    with contextlib.ExitStack() as stack:
        for capability, proc in start_compile_jobs(stack).items():
            try:
                check_compile_job(capability, proc)
            except AssertionError as exc:
                failed.append(f"sm_{capability}: {exc}")
    if failed:
        print("\n".join(failed) + f"\nAOT compile failed: {HASH_FILE.name} left as it was", file=sys.stderr)
        return 1
    temporary = HASH_FILE.with_name(HASH_FILE.name + ".tmp")
    temporary.write_text(json.dumps(current, indent=1) + "\n", encoding="utf-8")
    os.replace(temporary, HASH_FILE)
    print(f"AOT compile passed for sm_{', sm_'.join(map(str, sorted(TARGETS)))}: "
          f"{HASH_FILE.relative_to(ROOT)} = {current['sha256'][:16]}... (commit it)")
    return 0


if __name__ == "__main__":
    if sys.argv[1:] == ["--update-hash"]:
        sys.exit(update_hash())  # its compiling subprocesses run without TRITON_INTERPRET
    assert os.environ.get("TRITON_INTERPRET") != "1", "AOT compilation needs TRITON_INTERPRET unset"
    for rec in _compile_all(int(sys.argv[1])):
        print("AOT " + json.dumps(rec), flush=True)
