"""The peers the speed section times fastcse against, Inf-CL and cut-cross-entropy: installed
from pure-Python wheels in .whl/ (the GPU machine has no package index;
scripts/fetch_gpu_wheels.sh downloads them), and their entry points called as InfoNCE; and, for
the option rows, sentence-transformers' MatryoshkaLoss and GISTEmbedLoss's loss on the same
precomputed embeddings."""

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


# --------------------------------------------------------------------------------------------
# sentence-transformers' losses for the option rows, on the same precomputed embeddings
# --------------------------------------------------------------------------------------------


def _sentence_transformers_loss_classes():
    """(MatryoshkaLoss, MultipleNegativesRankingLoss), importable on sentence-transformers 6.0 and
    later (losses moved under sentence_transformer/) and earlier; Skip without the package."""
    try:
        from sentence_transformers.sentence_transformer.losses import MatryoshkaLoss, MultipleNegativesRankingLoss
    except ImportError:
        try:
            from sentence_transformers.losses import MatryoshkaLoss, MultipleNegativesRankingLoss
        except ImportError as error:
            raise Skip(f"sentence-transformers' MatryoshkaLoss is not importable here: {error}") from None
    return MatryoshkaLoss, MultipleNegativesRankingLoss


class EmbeddingModel(torch.nn.Sequential):
    """Stands in for a SentenceTransformer: its forward returns the embeddings it is handed, so
    that MatryoshkaLoss's own forward (shrink, normalize, rerun MNRL per dimension) is what runs
    (a Sequential with one module, which CachedMNRL's constructor inspects). bench/ uses it too."""

    def __init__(self, dim: int):
        super().__init__(torch.nn.Identity())
        self.dim = dim

    def forward(self, features: dict) -> dict:
        return {"sentence_embedding": features["embedding"]}

    def _get_untruncated_embedding_dimension(self) -> int:
        return self.dim

    def get_embedding_dimension(self) -> int:
        return self.dim

    def get_sentence_embedding_dimension(self) -> int:  # the name before sentence-transformers 6
        return self.dim


_MATRYOSHKA_LOSSES: dict[tuple, torch.nn.Module] = {}


def matryoshka_mnrl_loss(x: SpeedInputs, matryoshka_dims: tuple[int, ...]) -> torch.Tensor:
    """``MatryoshkaLoss(MultipleNegativesRankingLoss(scale=1/tau), dims)`` through its forward on
    the embeddings (anchor, positive, hard negative columns): sum over dims of MNRL on each
    normalized prefix, with the B x N scores materialized once per dimension."""
    key = (x.anchor.shape[1], tuple(matryoshka_dims), x.tau)
    if key not in _MATRYOSHKA_LOSSES:
        matryoshka_loss, mnrl = _sentence_transformers_loss_classes()
        model = EmbeddingModel(x.anchor.shape[1])
        try:
            _MATRYOSHKA_LOSSES[key] = matryoshka_loss(model, mnrl(model, scale=1.0 / x.tau), list(matryoshka_dims))
        except (TypeError, AttributeError) as error:  # another version's constructor wants more of a model
            raise Skip(f"MatryoshkaLoss does not take the stand-in model here: {error}") from None
    columns = (x.anchor, x.positive, x.negative.reshape(-1, x.anchor.shape[1]))
    return _MATRYOSHKA_LOSSES[key]([{"embedding": t} for t in columns], None)


def gist_math_loss(x: SpeedInputs, guide: tuple[torch.Tensor, ...], false_negative_margin: float,
                   **_fastcse_options) -> torch.Tensor:
    """GISTEmbedLoss's loss on the speed section's inputs (see ``gist_loss_from_embeddings``)."""
    return gist_loss_from_embeddings(x.anchor, x.positive, x.negative, guide, margin=false_negative_margin,
                                     temperature=x.tau)


def gist_loss_from_embeddings(anchor, positive, negative, guide, *, margin: float, temperature: float):
    """GISTEmbedLoss's loss on precomputed embeddings (absolute margin, contrast_anchors=True,
    contrast_positives=False, one process: fastcse's query_to_doc + query_to_query, joint, with a
    guide): the guide's and the model's similarity matrices, the mask, the cross-entropy, as its
    forward computes them after the embedding passes; cosines as normalize + matmul (its own
    ``sim_matrix`` broadcasts a B x N x d tensor: 50 GB at B = 4096, d = 768). ``negative`` and
    the guide's rows: [B, d] or [B, k, d]."""
    def cos(a, b):
        return F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T

    negative = negative.reshape(-1, anchor.shape[1])
    guide_anchor, guide_positive, guide_negative = (g.reshape(-1, g.shape[-1]) for g in guide)
    guided_ap = cos(guide_anchor, guide_positive)
    limit = guided_ap.diagonal().view(-1, 1) - margin
    rows = torch.arange(anchor.shape[0], device=anchor.device)
    own_positive = torch.zeros_like(guided_ap, dtype=torch.bool)
    own_positive[rows, rows] = True
    ap = cos(anchor, positive).masked_fill((guided_ap > limit) & ~own_positive, -torch.inf)
    aa = cos(anchor, anchor).masked_fill(cos(guide_anchor, guide_anchor) > limit, -torch.inf)
    aa[rows, rows] = -torch.inf
    an = cos(anchor, negative).masked_fill(cos(guide_anchor, guide_negative) > limit, -torch.inf)
    return F.cross_entropy(torch.cat([ap, aa, an], dim=1) / temperature, rows)
