"""The guide model of guided false negatives (GISTEmbed): a second, frozen encoder whose
similarities decide which in-batch negatives ``info_nce(false_negative_margin=...)`` leaves out.

Each step it encodes the same rows as the trained model, through the same length-aware plan
(``fastcse.encoding``: the same token ids, the same units), in eval mode (no dropout, so it draws
nothing from the random streams that the trained model's dropout and gradient caching replay)
and without gradient. Under gradient caching it encodes the whole step once: with no gradient
there is nothing to replay.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch

from fastcse import encoding as encoding_lib
from fastcse.evaluation import resolve_pooler
from fastcse.pooling import has_mlp_head


class GuideEncoder:
    """A frozen encoder that embeds a step's rows as the trained model sees them."""

    def __init__(self, model, pooler: str, encoding: str, autocast_dtype: torch.dtype | None):
        self.model, self.pooler, self.encoding, self.autocast_dtype = model, pooler, encoding, autocast_dtype
        self.device = next(model.parameters()).device
        self.pad_id = getattr(model.config, "pad_token_id", None) or 0
        self.float_mask = getattr(model.config, "_attn_implementation", None) == "eager"
        model.eval()
        model.requires_grad_(False)

    @torch.no_grad()
    def rows(self, ids: list[list[int]], plan: encoding_lib.StepPlan, views: int) -> tuple[torch.Tensor, ...]:
        """The guide's embeddings of the step's sequences, as ``info_nce``'s ``guide``: one
        [B, d_g] tensor per view (anchors, positives, hard negatives), in batch order."""
        units = encoding_lib.build_units(ids, plan.units, self.encoding, self.pad_id, self.device,
                                         float_mask=self.float_mask)
        ctx = torch.autocast(self.device.type, dtype=self.autocast_dtype) if self.autocast_dtype \
            else contextlib.nullcontext()
        with ctx:
            pooled = torch.cat([unit.pool(self.model, self.pooler, use_mlp=True) for unit in units])
        emb = plan.to_batch_order(pooled.float())
        emb = emb.view(-1, views, emb.shape[-1])
        return tuple(emb[:, view] for view in range(views))


def guide_model_path(guide_model) -> str | None:
    """The guide's folder as a checkpoint records it (absolute, so that a resume from another
    working folder compares the same model); None without a guide."""
    if guide_model is None:
        return None
    path = Path(os.path.expanduser(str(guide_model)))
    if not (path / "config.json").is_file():
        why = "does not exist" if not path.exists() else "is not a saved transformers model (no config.json)"
        raise FileNotFoundError(f"guide_model={str(guide_model)!r} {why}: the guide is a local model folder")
    return str(path.resolve())


def load_guide_model(path: str, tokenizer, max_seq_length: int, device: torch.device):
    """The guide model at ``path`` on ``device`` and its pooler, checked against the trained
    model's tokenizer: the guide encodes that model's token ids, so it must share its vocabulary
    and take ``max_seq_length`` positions. Its pooling is what the folder declares (fastcse's
    record, sentence-transformers' pooling config), else [CLS] (through its pooling layer when it
    has one)."""
    from transformers import AutoModel, AutoTokenizer

    from fastcse.training.model import check_max_seq_length

    if AutoTokenizer.from_pretrained(path).get_vocab() != tokenizer.get_vocab():
        raise ValueError(f"guide_model={path!r} has another vocabulary than the model's tokenizer: the guide encodes "
                         "the model's token ids (the same length-aware units), so it must share the tokenizer")
    model = AutoModel.from_pretrained(path).to(device)
    try:
        check_max_seq_length(model, max_seq_length)
    except ValueError as error:
        raise ValueError(f"guide_model: {error}") from None
    pooler = resolve_pooler("auto", path)
    if pooler == "cls" and not has_mlp_head(model):
        pooler = "cls_before_pooler"
    return model, pooler


def shared_encoding(requested: str, model, guide_model) -> str:
    """The encoding of both the trained model and the guide (they encode the same units):
    ``auto`` is packed only where both can run packed rows."""
    encoding = encoding_lib.resolve_encoding(requested, model)
    if guide_model is None or encoding != "packed":
        return encoding
    reason = encoding_lib.packing_unsupported_reason(guide_model)
    if reason is None:
        return encoding
    if requested == "auto":
        return "sorted"
    raise ValueError(f"encoding='packed' needs the guide_model to run packed rows too: {reason}; use "
                     "encoding='sorted' or 'auto'")
