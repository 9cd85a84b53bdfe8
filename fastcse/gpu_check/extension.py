"""The extension fastcse._C on the GPU machine: built with its own nvcc, for its own architecture,
in the background in a scratch copy of the sources (setup.py build_ext --inplace), then loaded
from there as fastcse._C (what fastcse.distributed imports for its ops)."""

from __future__ import annotations

import importlib
import importlib.util
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from fastcse.gpu_check.results import Outcome


@dataclass
class ExtensionBuild:
    """A background ``setup.py build_ext --inplace`` in a scratch copy of the sources."""

    scratch: Path
    process: subprocess.Popen
    log_path: Path
    started: float
    timeout_s: float


# Not pyproject.toml: build_ext needs none of its metadata, and its PEP 639 licence string needs
# setuptools >= 77, which the GPU machine's Python may not have.
_BUILD_SOURCES = ("setup.py", "kernels", "fastcse")


def _copy_build_sources(root: Path, scratch: Path) -> None:
    """What setup.py build_ext needs (the package folder receives the library), without any
    compiled library (a stale one would be picked up)."""
    for name in _BUILD_SOURCES:
        source = root / name
        if source.is_dir():
            shutil.copytree(source, scratch / name, ignore=shutil.ignore_patterns("*.so", "__pycache__"))
        elif source.exists():
            shutil.copy2(source, scratch / name)


def _torch_wheel_cuda_include() -> str | None:
    """The CUDA headers that torch's own headers include (cusparse.h, ...) ship in the wheel's
    nvidia packages; a system toolkit may lack them (as .ci/cuda_compile_check.sh found)."""
    for entry in filter(None, sys.path):
        headers = sorted(Path(entry).glob("nvidia/*/include/cusparse.h"))
        if headers:
            return str(headers[0].parent)
    return None


def extension_build_env(capability: str | None) -> dict[str, str]:
    """Build for this GPU's architecture only (half the nvcc time of sm_80 + sm_90), all cores."""
    env = dict(os.environ, MAX_JOBS=str(os.cpu_count() or 4))
    if capability:
        env["TORCH_CUDA_ARCH_LIST"] = capability
    include = _torch_wheel_cuda_include()
    if include:
        env["CPATH"] = os.pathsep.join(p for p in (include, os.environ.get("CPATH")) if p)
        env["NVCC_APPEND_FLAGS"] = f"{os.environ.get('NVCC_APPEND_FLAGS', '')} -I{include}".strip()
    return env


def start_extension_build(root: Path, scratch: Path, capability: str | None, timeout_s: float) -> ExtensionBuild:
    scratch.mkdir(parents=True, exist_ok=True)
    _copy_build_sources(root, scratch)
    log_path = scratch / "build.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen([sys.executable, "-W", "ignore", "setup.py", "-q", "build_ext", "--inplace"],
                                   cwd=scratch, env=extension_build_env(capability), stdout=log,
                                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    return ExtensionBuild(scratch, process, log_path, time.monotonic(), timeout_s)


def _log_tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def finish_extension_build(build: ExtensionBuild) -> tuple[Outcome, Path | None]:
    """Waits for the build (within its timeout); returns its outcome and the built library."""
    try:
        build.process.wait(timeout=max(1.0, build.timeout_s - (time.monotonic() - build.started)))
    except subprocess.TimeoutExpired:
        build.process.kill()  # the build this kit started, by its own handle
        build.process.wait()
        return Outcome(False, {"log_tail": _log_tail(build.log_path)},
                       f"the build did not finish within {build.timeout_s:.0f} s"), None
    seconds = round(time.monotonic() - build.started, 1)
    libraries = sorted((build.scratch / "fastcse").glob("_C*.so"))
    if build.process.returncode != 0 or not libraries:
        return Outcome(False, {"seconds": seconds, "log_tail": _log_tail(build.log_path)},
                       f"setup.py build_ext exited {build.process.returncode}; see log_tail"), None
    library = libraries[0]
    with_cuda = has_cuda_pack_kernel(library)
    return Outcome(True, {"seconds": seconds, "library": str(library), "cuda_pack_kernel": with_cuda},
                   "" if with_cuda else "built without the CUDA pack kernel (no nvcc/CUDA_HOME?)"), library


def has_cuda_pack_kernel(library: Path) -> bool:
    """Whether the library holds pack_rows_cuda (its symbol and its error messages name it)."""
    return b"pack_rows_cuda" in library.read_bytes()


def load_extension_module(library: Path) -> None:
    """Imports ``library`` as the module fastcse._C (what fastcse.distributed imports for its ops)."""
    spec = importlib.util.spec_from_file_location("fastcse._C", library)
    if spec is None or spec.loader is None:
        raise ImportError(f"{library} is not a loadable extension module")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules["fastcse._C"] = module


def importable_extension() -> Path | None:
    """The fastcse._C already importable here (e.g. the checkout's own build), or None."""
    try:
        module = importlib.import_module("fastcse._C")
    except ImportError:
        return None
    return Path(module.__file__) if getattr(module, "__file__", None) else None

