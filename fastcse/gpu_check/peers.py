"""The peers the speed section times fastcse against, Inf-CL and cut-cross-entropy: installed
from pure-Python wheels in .whl/ (the GPU machine has no package index;
scripts/fetch_gpu_wheels.sh downloads them), and their entry points called as InfoNCE."""

from __future__ import annotations

import importlib
import importlib.util
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from fastcse.gpu_check.environment import installed_version
from fastcse.gpu_check.results import Outcome, Skip

if TYPE_CHECKING:
    from fastcse.gpu_check.speed import SpeedInputs

PEERS = {"inf_cl": "inf-cl", "cut_cross_entropy": "cut-cross-entropy"}  # import name -> distribution


def peer_version(module: str) -> str | None:
    return installed_version(PEERS.get(module, module))


def install_peer(module: str, wheel_dir: Path, target: Path) -> Outcome:
    """Makes ``module`` importable: already installed, or its wheel from ``wheel_dir`` installed
    (``pip install --no-index --no-deps --target``) into ``target``, which goes on sys.path."""
    if importlib.util.find_spec(module) is not None:
        return Outcome(True, {"version": peer_version(module), "from": "installed"})
    wheels = sorted(Path(wheel_dir).glob(f"{module}-*.whl"))
    if not wheels:
        raise Skip(f"no {module}-*.whl in {wheel_dir}: run `bash scripts/fetch_gpu_wheels.sh` on a machine with "
                   f"a package index and carry .whl/ along")
    failure = _install_wheel(wheels[-1], Path(target))
    if failure:
        return Outcome(False, {}, failure)
    if str(target) not in sys.path:
        sys.path.insert(0, str(target))
    importlib.invalidate_caches()
    importlib.import_module(module)
    return Outcome(True, {"version": peer_version(module), "from": wheels[-1].name})


def _install_wheel(wheel: Path, target: Path) -> str | None:
    """pip install --no-index --no-deps --target; without pip, unzip it (all that installing a
    pure-Python wheel does that matters for an import). Returns the failure, or None."""
    if not _is_pure_python_wheel(wheel):
        return f"{wheel.name} is not a pure-Python wheel (py3-none-any)"
    if importlib.util.find_spec("pip") is None:
        import zipfile

        with zipfile.ZipFile(wheel) as archive:
            archive.extractall(target)
        return None
    command = [sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps",
               "--disable-pip-version-check", "--target", str(target), str(wheel)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    return None if done.returncode == 0 else f"pip install of {wheel.name} failed: {done.stderr.strip()[-300:]}"


def _is_pure_python_wheel(wheel: Path) -> bool:
    return wheel.name.endswith("-none-any.whl")


# --------------------------------------------------------------------------------------------
# Their losses, on the speed section's inputs (N = 2B candidates: positives, then hard negatives)
# --------------------------------------------------------------------------------------------


def inf_cl_head_dim(dim: int) -> int:
    """Inf-CL views rows as heads of 16..256 dims (its kernels' limits); the largest that divides d."""
    for head in (256, 128, 64, 32, 16):
        if dim % head == 0:
            return head
    raise Skip(f"Inf-CL needs d divisible by 16, got {dim}")


def inf_cl_loss(x: SpeedInputs) -> torch.Tensor:
    """Inf-CL's single-GPU loss (cal_inf_loss without torch.distributed): queries carry the logit
    scale 1/tau; candidates = positives then hard negatives, targets 0..B-1."""
    from inf_cl import cal_inf_loss

    queries = F.normalize(x.anchor, dim=-1) / x.tau
    keys = F.normalize(x.candidates(), dim=-1)
    labels = torch.arange(x.anchor.shape[0], device=x.anchor.device)
    return cal_inf_loss(queries, keys, labels=labels, head_dim=inf_cl_head_dim(x.anchor.shape[1]))


def cce_loss(x: SpeedInputs) -> torch.Tensor:
    """InfoNCE as a linear cross-entropy: embeddings = normalized anchors / tau, classifier =
    normalized candidates, targets 0..B-1 (cut-cross-entropy's defaults, gradient filtering included)."""
    from cut_cross_entropy import linear_cross_entropy

    embeddings = F.normalize(x.anchor, dim=-1) / x.tau
    classifier = F.normalize(x.candidates(), dim=-1)
    targets = torch.arange(x.anchor.shape[0], device=x.anchor.device)
    return linear_cross_entropy(embeddings, classifier, targets)
