"""Length-aware encoding: a step's sentences in few padded tokens, embeddings in batch order.

A contrastive step encodes every sentence of the batch (both dropout views for unsupervised
SimCSE, premise, entailment and contradiction for supervised). Padded to the batch's longest
sentence, the encoder processes 1.5-2.5x the real tokens of SimCSE's data. Here the step's
sequences are sorted by length and cut into *units*, each encoded in one forward:

- ``"sorted"``: each unit is padded to its own longest sequence (any encoder).
- ``"packed"``: padding-free; a unit's sequences are laid end to end in rows of a fixed token
  capacity, with a block-diagonal attention mask and positions restarting at every sequence
  (the encoder's own forward with a 4-D mask and ``position_ids``; BERT-family models only).
- ``"padded"``: the whole unit padded to its longest sequence, unsorted (fastcse <= 0.1's
  behaviour, kept for comparison).

The embeddings come back in unit order; :class:`StepPlan` holds the permutation that puts them
back in batch order, so the loss, its in-batch negatives and its gradients are those of the
whole batch whatever the units. With dropout off the embeddings equal those of one padded
forward up to float roundoff (attention over padding is masked either way).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from fastcse.pooling import check_pooler, needs_hidden_states, pool

ENCODINGS = ("auto", "packed", "sorted", "padded")
# Models whose forward takes a 4-D attention mask and absolute ``position_ids`` that may restart
# inside a row, so that several sequences packed in one row are encoded as if alone.
PACKABLE_MODEL_TYPES = ("bert",)
PACKABLE_ATTENTION = ("sdpa", "eager")
# Without gradient caching the batch is cut into units of at most this many padded tokens
# ("sorted") or packed in rows of this many tokens ("packed"). Measured on MiniLM-L6, batch 64,
# length 32, 2 CPU cores (forward + backward of a step, alternating, 18 steps each): packed rows
# of 64 tokens 1.57 s min / 2.02 s median (48: 1.53 / 2.08; 128: 1.63 / 2.01), sorted units of
# 512 padded tokens 1.78 / 2.35 (256: 1.97 / 2.42; 1024: 1.74 / 2.04), one padded batch 2.41 /
# 2.88 (unsup); with the NLI triples 1.61 / 2.05 packed, 1.76 / 2.26 sorted, 3.78 / 5.47 padded.
SORTED_UNIT_TOKENS = 512
PACKED_ROW_TOKENS = 64


def check_encoding(encoding) -> str:
    if encoding not in ENCODINGS:
        raise ValueError(f"encoding must be one of {ENCODINGS}, got {encoding!r}")
    return encoding


def packing_unsupported_reason(model) -> str | None:
    """Why ``model`` cannot be encoded padding-free, or None when it can."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in PACKABLE_MODEL_TYPES:
        return f"model_type {model_type!r} is not one of {PACKABLE_MODEL_TYPES}"
    attention = getattr(config, "_attn_implementation", None)
    if attention not in PACKABLE_ATTENTION:
        return f"attention implementation {attention!r} is not one of {PACKABLE_ATTENTION}"
    return None


def resolve_encoding(encoding: str, model) -> str:
    """``auto``: padding-free where the model allows it, else length-sorted padding."""
    check_encoding(encoding)
    reason = packing_unsupported_reason(model)
    if encoding == "auto":
        return "sorted" if reason else "packed"
    if encoding == "packed" and reason:
        raise ValueError(f"encoding='packed' needs a BERT-family encoder with SDPA or eager attention: {reason}; "
                         "use encoding='sorted'")
    return encoding


def tokenize(tokenizer, texts: Sequence[str], max_length: int) -> list[list[int]]:
    """Token ids of each text (special tokens added, truncated to ``max_length``), unpadded."""
    return tokenizer(list(texts), truncation=True, max_length=max_length, return_attention_mask=False,
                     return_token_type_ids=False)["input_ids"]


# --------------------------------------------------------------------------------------------
# Planning: which sequences go into which forward


def plan_units(lengths: Sequence[int], *, max_sequences: int | None = None, max_tokens: int | None = None,
               max_padded_tokens: int | None = None, sort: bool = True) -> list[list[int]]:
    """Cuts the sequences into consecutive runs of the length order (shortest first).

    A unit holds at most ``max_sequences`` sequences, ``max_tokens`` real tokens and
    ``max_padded_tokens`` tokens once padded to its longest; each bound is optional, and a unit
    always holds at least one sequence. ``sort=False`` keeps the batch order.
    """
    order = sorted(range(len(lengths)), key=lengths.__getitem__) if sort else list(range(len(lengths)))
    units: list[list[int]] = []
    unit: list[int] = []
    tokens = longest = 0
    for index in order:
        length = lengths[index]
        grown_longest = max(longest, length)
        if unit and ((max_sequences is not None and len(unit) + 1 > max_sequences)
                     or (max_tokens is not None and tokens + length > max_tokens)
                     or (max_padded_tokens is not None and (len(unit) + 1) * grown_longest > max_padded_tokens)):
            units.append(unit)
            unit, tokens, grown_longest = [], 0, length
        unit.append(index)
        tokens += length
        longest = grown_longest
    if unit:
        units.append(unit)
    return units


@dataclass
class StepPlan:
    """The units of a step and the way back to batch order. ``order[j]`` is the batch position
    of row j of the units' concatenated embeddings; ``inverse`` undoes it:
    ``batch_order_embeddings = units_concatenated[inverse]``."""

    units: list[list[int]]

    @property
    def order(self) -> torch.Tensor:
        return torch.tensor([i for unit in self.units for i in unit], dtype=torch.long)

    @property
    def inverse(self) -> torch.Tensor:
        order = self.order
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(len(order))
        return inverse

    def to_batch_order(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Embeddings of the concatenated units -> embeddings in batch order (differentiable)."""
        return embeddings.index_select(0, self.inverse.to(embeddings.device))


# --------------------------------------------------------------------------------------------
# Model inputs of one unit


@dataclass
class PaddedUnit:
    """Sequences padded to the longest of them: ``inputs`` for the model, [n, L]."""

    inputs: dict[str, torch.Tensor]

    def pool(self, model, pooler: str, use_mlp: bool) -> torch.Tensor:
        return pool(model, self.inputs, pooler, use_mlp=use_mlp)


@dataclass
class PackedUnit:
    """Sequences laid end to end in rows of ``capacity`` tokens: the model sees [R, capacity]
    with a block-diagonal mask; ``token_index`` (flat positions of the real tokens in
    [R * capacity]) and ``token_sequence`` (which sequence each belongs to) pool them back."""

    inputs: dict[str, torch.Tensor]
    token_index: torch.Tensor
    token_sequence: torch.Tensor
    first_token: torch.Tensor
    lengths: torch.Tensor

    def pool(self, model, pooler: str, use_mlp: bool) -> torch.Tensor:
        check_pooler(pooler)
        outputs = model(**self.inputs, output_hidden_states=needs_hidden_states(pooler), return_dict=True)
        if pooler in ("cls", "cls_before_pooler"):
            cls = self._flat(outputs.last_hidden_state).index_select(0, self.first_token)
            # The model's own pooler_output is computed on each row's first token, which is the
            # [CLS] of the row's first sequence only: apply the head to every sequence's [CLS].
            return model.pooler(cls.unsqueeze(1)) if (pooler == "cls" and use_mlp) else cls
        if pooler == "avg":
            hidden = outputs.last_hidden_state
        elif pooler == "avg_first_last":
            hidden = (outputs.hidden_states[1] + outputs.hidden_states[-1]) / 2.0
        else:  # avg_top2
            hidden = (outputs.hidden_states[-2] + outputs.hidden_states[-1]) / 2.0
        return self._segment_mean(hidden)

    def _flat(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden.reshape(-1, hidden.shape[-1])

    def _segment_mean(self, hidden: torch.Tensor) -> torch.Tensor:
        tokens = self._flat(hidden).index_select(0, self.token_index)
        sums = tokens.new_zeros(len(self.lengths), tokens.shape[-1]).index_add_(0, self.token_sequence, tokens)
        return sums / self.lengths.to(sums.dtype).unsqueeze(1)


def pad_unit(ids: Sequence[Sequence[int]], pad_id: int, device) -> PaddedUnit:
    longest = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), longest), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(ids), longest), dtype=torch.long)
    for row, seq in enumerate(ids):
        input_ids[row, :len(seq)] = torch.tensor(seq, dtype=torch.long)
        attention_mask[row, :len(seq)] = 1
    return PaddedUnit({"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device)})


def _fill_rows(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """First-fit decreasing bin packing: longest first, each into the first row with room.
    Rows end up nearly full (next-fit on SimCSE's lengths left ~20% of a 64-token row empty)."""
    rows: list[list[int]] = []
    room: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        length = lengths[index]
        row = next((r for r, free in enumerate(room) if free >= length), None)
        if row is None:
            rows.append([])
            room.append(capacity)
            row = len(rows) - 1
        rows[row].append(index)
        room[row] -= length
    return rows


def pack_unit(ids: Sequence[Sequence[int]], pad_id: int, device, *, row_tokens: int | None = None,
              float_mask: bool = False) -> PackedUnit:
    """Padding-free model inputs for ``ids``. ``float_mask``: an additive mask (0 / dtype min)
    for attention implementations that add it to the scores (eager); SDPA takes booleans."""
    capacity = max(row_tokens or PACKED_ROW_TOKENS, max(len(x) for x in ids))
    rows = _fill_rows([len(x) for x in ids], capacity)
    input_ids = torch.full((len(rows), capacity), pad_id, dtype=torch.long)
    position_ids = torch.zeros((len(rows), capacity), dtype=torch.long)
    segment = torch.full((len(rows), capacity), -1, dtype=torch.long)  # -1: a padding slot
    first_token = torch.empty(len(ids), dtype=torch.long)
    for r, row in enumerate(rows):
        offset = 0
        for index in row:
            length = len(ids[index])
            input_ids[r, offset:offset + length] = torch.tensor(ids[index], dtype=torch.long)
            position_ids[r, offset:offset + length] = torch.arange(length)
            segment[r, offset:offset + length] = index
            first_token[index] = r * capacity + offset
            offset += length
    same_sequence = (segment.unsqueeze(2) == segment.unsqueeze(1)) & (segment.unsqueeze(1) >= 0)
    # A padding slot attends to itself only: a fully masked softmax row would be NaN, and NaN
    # times the zero gradient of a discarded slot is still NaN in the weight gradients.
    mask = (same_sequence | torch.eye(capacity, dtype=torch.bool)).unsqueeze(1)
    if float_mask:
        mask = torch.zeros(mask.shape, dtype=torch.float32).masked_fill_(~mask, torch.finfo(torch.float32).min)
    flat_segment = segment.reshape(-1)
    token_index = (flat_segment >= 0).nonzero().squeeze(1)
    lengths = torch.tensor([len(x) for x in ids], dtype=torch.long)
    return PackedUnit(
        inputs={"input_ids": input_ids.to(device), "attention_mask": mask.to(device),
                "position_ids": position_ids.to(device)},
        token_index=token_index.to(device), token_sequence=flat_segment[token_index].to(device),
        first_token=first_token.to(device), lengths=lengths.to(device))


def build_units(ids: Sequence[Sequence[int]], units: list[list[int]], encoding: str, pad_id: int, device, *,
                float_mask: bool = False) -> list[PaddedUnit | PackedUnit]:
    """Model inputs for each planned unit (``encoding`` already resolved, not ``auto``)."""
    built = []
    for unit in units:
        unit_ids = [ids[i] for i in unit]
        if encoding == "packed":
            built.append(pack_unit(unit_ids, pad_id, device, float_mask=float_mask))
        else:
            built.append(pad_unit(unit_ids, pad_id, device))
    return built


def plan_step(lengths: Sequence[int], encoding: str, *, cached: bool, mini_batch_sequences: int | None = None,
              mini_batch_tokens: int | None = None) -> StepPlan:
    """The units of one step. With gradient caching the units are the cached chunks (bounded by
    sequences and/or real tokens); without it, the whole batch in units sized for speed."""
    sort = encoding != "padded"
    if cached:
        return StepPlan(plan_units(lengths, max_sequences=mini_batch_sequences, max_tokens=mini_batch_tokens,
                                   sort=sort))
    if encoding == "sorted":
        return StepPlan(plan_units(lengths, max_padded_tokens=SORTED_UNIT_TOKENS))
    return StepPlan(plan_units(lengths, sort=sort))  # one forward: packed rows, or one padded tensor
