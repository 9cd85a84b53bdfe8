"""fastcse: fused, memory-bounded contrastive losses and a SimCSE trainer."""

from fastcse.loss import InfoNCE, info_nce
from fastcse.reference import info_nce_reference

__version__ = "0.2.0"

__all__ = ["InfoNCE", "info_nce", "info_nce_reference", "train", "TrainConfig", "evaluate", "alignment_uniformity",
           "__version__"]


def __getattr__(name):
    # The trainer pulls in transformers/datasets: import it only when asked for.
    if name in ("train", "TrainConfig"):
        import fastcse.training

        return getattr(fastcse.training, name)
    if name in ("evaluate", "alignment_uniformity"):
        import importlib

        return getattr(importlib.import_module("fastcse.evaluation"), name)
    raise AttributeError(f"module 'fastcse' has no attribute {name!r}")
