"""What the GPU kit ran on: the device, the versions, the checkout's commit (the report's header)."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import platform
import subprocess
import time
from pathlib import Path

import torch

import fastcse

# The checkout the kit runs from (PYTHONPATH=. on the GPU machine): its commit, its .whl/ and
# .gpu_kit/ folders, and the sources of fastcse._C.
REPO_ROOT = Path(__file__).resolve().parents[2]


def installed_version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git_state(root: Path) -> dict | None:
    """The checkout's commit and whether it has uncommitted changes (None without git or .git)."""
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        status = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "dirty": bool(status.strip())}


def _gpu_info(device: torch.device) -> dict | None:
    if device.type != "cuda":
        return None
    props = torch.cuda.get_device_properties(device)
    return {"name": props.name, "capability": f"{props.major}.{props.minor}", "sms": props.multi_processor_count,
            "memory_gib": round(props.total_memory / 2**30, 1), "cuda": torch.version.cuda,
            "allow_tf32_matmul": torch.backends.cuda.matmul.allow_tf32}


def environment(device: torch.device, mode: str, argv: list[str]) -> dict:
    versions = {"python": platform.python_version(), "torch": torch.__version__, "fastcse": fastcse.__version__}
    for name in ("triton", "transformers", "sentence-transformers"):
        versions[name] = installed_version(name)
    if versions["triton"] is None and importlib.util.find_spec("triton") is not None:
        import triton  # shipped under another distribution name (pytorch-triton): ask the module

        versions["triton"] = triton.__version__
    return {"mode": mode, "argv": argv, "started_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "host_cpus": os.cpu_count(), "device": str(device), "gpu": _gpu_info(device),
            "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1", "versions": versions,
            "git": _git_state(REPO_ROOT)}

