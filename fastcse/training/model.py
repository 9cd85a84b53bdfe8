"""The encoder a run trains: loading it, building a small one from scratch, SimCSE's fresh MLP
head, and the checks that need the model."""

from __future__ import annotations

import os

import torch

from fastcse.evaluation import load_model
from fastcse.pooling import has_mlp_head
from fastcse.training.config import PRECISIONS
from fastcse.training.ranks import broadcast_model


# --------------------------------------------------------------------------------------------
# Models


def build_bert_from_scratch(tokenizer_path, *, hidden_size: int = 256, num_layers: int = 4, num_heads: int = 4,
                            intermediate_size: int | None = None, max_position_embeddings: int = 512,
                            dropout: float = 0.1, seed: int = 0):
    """A randomly initialized BERT with a given tokenizer: (model, tokenizer).

    For tests and the from-scratch demo: no raw pretrained English encoder is available offline.
    """
    from transformers import AutoTokenizer, BertConfig, BertModel

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_path))
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, num_hidden_layers=num_layers,
                        num_attention_heads=num_heads, intermediate_size=intermediate_size or 4 * hidden_size,
                        max_position_embeddings=max_position_embeddings, pad_token_id=tokenizer.pad_token_id,
                        hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BertModel(config)
    return model, tokenizer


def load_training_model(model, tokenizer):
    from transformers import PreTrainedModel

    if isinstance(model, tuple) and len(model) == 2:
        model, tokenizer = model
    if not isinstance(model, (str, os.PathLike, PreTrainedModel)):
        raise TypeError(f"model must be a path, a Hub id, a PreTrainedModel or (model, tokenizer), "
                        f"got {type(model).__name__}")
    return load_model(model, tokenizer)


def _position_limit(model) -> int | None:
    """How many token positions the encoder's position embeddings cover; None when it has none
    to count (e.g. rotary). RoBERTa-style tables start after the padding index: 514 rows, 512
    positions."""
    table = getattr(getattr(model, "embeddings", None), "position_embeddings", None)
    if isinstance(table, torch.nn.Embedding):
        return table.num_embeddings - (table.padding_idx + 1 if table.padding_idx is not None else 0)
    return getattr(model.config, "max_position_embeddings", None)


def check_max_seq_length(model, max_seq_length: int) -> None:
    """Refuses (rather than clamps) a max_seq_length past the model's positions: the longer
    inputs would index past the position table mid-run, and a silent clamp would train on other
    inputs than asked for."""
    limit = _position_limit(model)
    if limit is not None and max_seq_length > limit:
        raise ValueError(f"max_seq_length={max_seq_length} is more than the {limit} positions of "
                         f"{type(model).__name__}'s position embeddings: use max_seq_length <= {limit}")


def init_fresh_mlp_head(model, seed: int) -> None:
    """SimCSE's MLP head starts fresh, not from BERT's next-sentence-prediction pooler: redraws
    ``model.pooler.dense`` as the model's own init does (normal(0, initializer_range), zero
    bias), from a generator seeded by ``seed`` and on the CPU, so that every run with that seed,
    on any device, starts from the same head and no global random stream moves. Same layout:
    saved models load as before."""
    dense = model.pooler.dense
    std = float(getattr(model.config, "initializer_range", 0.02))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        dense.weight.copy_(torch.empty(dense.weight.shape).normal_(0.0, std, generator=generator))
        if dense.bias is not None:
            dense.bias.zero_()


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for fp32. ``auto``: bf16 on CUDA devices that support it."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r} "
                         "(fp16 would need loss scaling; use bf16)")
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else None
    return torch.bfloat16 if precision == "bf16" else None


def load_model_on_device(model, tokenizer, device: torch.device | None) -> tuple:
    """The model and tokenizer, the model moved to ``device`` (None: left where it loaded), and
    the device it is on."""
    model, tokenizer = load_training_model(model, tokenizer)
    if device is not None:
        model.to(device)
    return model, tokenizer, next(model.parameters()).device


def check_mlp_head(model, pooler: str, fresh_head: bool) -> None:
    """The model has the MLP head that ``pooler="cls"`` trains, and the layer ``mlp_init="fresh"`` redraws."""
    if pooler == "cls" and not has_mlp_head(model):
        raise ValueError(f"pooler='cls' trains SimCSE's MLP head, which is the encoder's pooling layer, and "
                         f"{type(model).__name__} has none: use pooler='cls_before_pooler' or 'avg'")
    if fresh_head and not isinstance(getattr(model.pooler, "dense", None), torch.nn.Linear):
        raise ValueError(f"mlp_init='fresh' redraws the MLP head model.pooler.dense, which {type(model).__name__} "
                         "does not have: use mlp_init='pretrained'")


def set_starting_weights(model, fresh_head: bool, seed: int, world: int) -> None:
    """The weights every rank starts from: the MLP head redrawn (``mlp_init="fresh"``), then rank
    0's weights broadcast to the others."""
    if fresh_head:
        init_fresh_mlp_head(model, seed)
    if world > 1:
        broadcast_model(model)


