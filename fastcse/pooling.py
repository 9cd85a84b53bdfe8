"""Sentence poolers, as SimCSE defines them.

- ``cls``: the [CLS] vector through the MLP head (dense + tanh). The head is the encoder's own
  pooling layer (``model.pooler``, BERT's ``pooler_output``), so a saved model carries it and
  ``AutoModel``'s ``pooler_output`` is exactly this embedding. With ``mlp_only_train`` the head
  is used while training only and evaluation takes the raw [CLS] vector, as SimCSE does for
  unsupervised runs.
- ``cls_before_pooler``: the raw [CLS] vector of the last layer.
- ``avg``: mean of the last layer over the non-padding tokens.
- ``avg_first_last``: mean over tokens of (first layer + last layer) / 2 (SimCSE uses the
  first transformer layer's output, ``hidden_states[1]``, not the embeddings).
- ``avg_top2``: mean over tokens of (second-to-last + last layer) / 2.
"""

from __future__ import annotations

import torch

POOLERS = ("cls", "cls_before_pooler", "avg", "avg_first_last", "avg_top2")


def check_pooler(pooler) -> str:
    if pooler not in POOLERS:
        raise ValueError(f"pooler must be one of {POOLERS}, got {pooler!r}")
    return pooler


def needs_hidden_states(pooler: str) -> bool:
    return pooler in ("avg_first_last", "avg_top2")


def has_mlp_head(model) -> bool:
    """True when the encoder has a BERT-style pooling layer (dense + tanh on [CLS])."""
    return getattr(model, "pooler", None) is not None


def _masked_mean(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    # clamp: a row with no tokens (cannot come from a tokenizer, which adds [CLS]) stays finite.
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)


def pool(model, inputs: dict, pooler: str, *, use_mlp: bool) -> torch.Tensor:
    """Runs ``model`` on tokenized ``inputs`` and returns one embedding per sequence.

    ``use_mlp`` applies the MLP head for ``pooler="cls"`` (True while training, and at
    evaluation unless ``mlp_only_train``); the other poolers ignore it.
    """
    check_pooler(pooler)
    if pooler == "cls" and use_mlp and not has_mlp_head(model):
        raise ValueError("pooler='cls' uses the encoder's pooling layer (dense + tanh) as SimCSE's MLP head, but "
                         f"{type(model).__name__} has none: use pooler='cls_before_pooler' or 'avg'")
    outputs = model(**inputs, output_hidden_states=needs_hidden_states(pooler), return_dict=True)
    last = outputs.last_hidden_state
    mask = inputs["attention_mask"]
    if pooler == "cls":
        return outputs.pooler_output if use_mlp else last[:, 0]
    if pooler == "cls_before_pooler":
        return last[:, 0]
    if pooler == "avg":
        return _masked_mean(last, mask)
    hidden = outputs.hidden_states
    if pooler == "avg_first_last":
        return _masked_mean((hidden[1] + hidden[-1]) / 2.0, mask)
    return _masked_mean((hidden[-2] + hidden[-1]) / 2.0, mask)
