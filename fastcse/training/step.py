"""One optimizer step's loss and gradients: encode (length-aware, cached or not), the fused
InfoNCE over the whole batch with an optional negative queue, backward; and the optimizer."""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

import torch

from fastcse import encoding as encoding_lib
from fastcse.distributed import gather_variable
from fastcse.gradcache import cached_step, cuda_devices_of, uncached_step
from fastcse.loss import check_inputs, info_nce
from fastcse.training.batches import NO_ROWS, StepRows
from fastcse.training.guide import GuideEncoder


class NegativeQueue:
    """A FIFO of the detached embeddings of the most recent batches' positives (XBM, Wang et al.
    2020), which every anchor of the following steps scores as extra negatives. A step pushes
    its positives after its loss, so its own positives are never scored twice. Each row keeps
    the text it embeds: a step leaves out the entries that repeat one of its own texts (they
    are false negatives of the anchor with that text). Oldest rows first. With a guide model,
    each row also keeps the guide's embedding of its text (``guide_rows``), which guided false
    negatives compare the queued rows by."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.rows: torch.Tensor | None = None
        self.guide_rows: torch.Tensor | None = None
        self.keys: list[str] = []

    def __len__(self) -> int:
        return len(self.keys)

    def negatives(self, exclude: frozenset[str] = frozenset()) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(the queued rows, their guide rows or None), less those whose text is in ``exclude``;
        (None, None) when none are left."""
        if self.rows is None:
            return None, None
        if exclude and not exclude.isdisjoint(self.keys):
            keep = [i for i, key in enumerate(self.keys) if key not in exclude]
            if not keep:
                return None, None
            return self.rows[keep], None if self.guide_rows is None else self.guide_rows[keep]
        return self.rows, self.guide_rows

    def push(self, rows: torch.Tensor, keys, guide_rows: torch.Tensor | None = None) -> None:
        """Appends ``rows`` (with ``keys``, their texts, and ``guide_rows``, the guide's
        embeddings of them) and drops the oldest past the capacity."""
        keys = list(keys)
        if len(keys) != len(rows):
            raise ValueError(f"the queue takes one text per row: {len(rows)} rows, {len(keys)} texts")
        self.rows = self._append(self.rows, rows.detach())
        if guide_rows is not None:
            self.guide_rows = self._append(self.guide_rows, guide_rows.detach())
        self.keys = (self.keys + keys)[-self.capacity:]

    def _append(self, queued: torch.Tensor | None, rows: torch.Tensor) -> torch.Tensor:
        return rows[-self.capacity:] if queued is None else torch.cat([queued, rows])[-self.capacity:]

    def state_dict(self) -> dict:
        state = {"rows": None if self.rows is None else self.rows.cpu(), "keys": list(self.keys)}
        if self.guide_rows is not None:
            state["guide_rows"] = self.guide_rows.cpu()
        return state

    def load_state_dict(self, state: dict | None, device: torch.device) -> None:
        """A checkpoint's queue (None: a checkpoint without one, the queue starts empty); a
        smaller capacity than the checkpoint's (resume_override) keeps the newest rows."""
        self.rows, self.guide_rows, self.keys = None, None, []
        if state is not None and state["rows"] is not None:
            guide_rows = state.get("guide_rows")
            self.push(state["rows"].to(device), state["keys"], None if guide_rows is None else guide_rows.to(device))


# --------------------------------------------------------------------------------------------
# One step: encode (length-aware, cached or not), loss over the whole batch, backward


@dataclass(frozen=True)
class LossOptions:
    """The run's ``info_nce`` settings, the same at every step. Matryoshka's keywords are passed
    only when set, so that a run without them makes the plain call."""

    temperature: float
    hard_negative_weight: float = 0.0
    matryoshka_dims: tuple[int, ...] | None = None
    matryoshka_weights: tuple[float, ...] | None = None
    false_negative_margin: float | None = None
    margin_strategy: str = "absolute"

    def keywords(self) -> dict:
        options = {"temperature": self.temperature, "hard_negative_weight": self.hard_negative_weight}
        if self.matryoshka_dims:
            options.update(matryoshka_dims=self.matryoshka_dims, matryoshka_weights=self.matryoshka_weights)
        if self.false_negative_margin is not None:
            options.update(false_negative_margin=self.false_negative_margin, margin_strategy=self.margin_strategy)
        return options

    def check(self, dim: int, device: torch.device) -> None:
        """Refuses, before training, what the loss would refuse at the first step: Matryoshka
        dimensions past the embeddings' ``dim``, and options (or their combination) that the
        loss does not implement on ``device``. Asked of the loss's own input check on a one-row
        probe, so that the trainer accepts whatever the loss comes to implement."""
        probe = torch.zeros(1, dim, device=device)
        options = self.keywords()
        false_negatives = {"margin": options.pop("false_negative_margin", None),
                           "strategy": options.pop("margin_strategy", "absolute"), "guide": None,
                           "guide_extra_negatives": None}
        try:
            check_inputs(probe, probe, None, options["temperature"], 0.0, "mean", "auto",
                         matryoshka_dims=options.get("matryoshka_dims"),
                         matryoshka_weights=options.get("matryoshka_weights"), false_negative_options=false_negatives)
        except NotImplementedError as error:
            raise ValueError(f"{error} (the model is on {device})" if device.type != "cpu" else str(error)) from None


@dataclass
class ContrastiveStep:
    """Encodes a step's sequences in the units of :func:`fastcse.encoding.plan_step`, puts the
    embeddings back in batch order, computes ``info_nce`` over the whole batch and
    back-propagates into the parameters (gradient caching when the cache bounds cut the batch
    into several units). With a ``queue``, the step's positives (every rank's, ``rank_rows``
    under a process group) are pushed to it after the backward. With a ``guide``, the guide
    model's embeddings of the step's rows (encoded once, without gradient) are the loss's
    ``guide``; under a process group each rank passes its own and the loss gathers them."""

    model: torch.nn.Module
    pooler: str
    encoding: str
    views: int
    loss_options: LossOptions
    process_group: object
    autocast_dtype: torch.dtype | None
    device: torch.device
    mini_batch_sequences: int | None = None
    mini_batch_tokens: int | None = None
    queue: NegativeQueue | None = None
    rank_rows: list[int] | None = None
    guide: GuideEncoder | None = None

    def __post_init__(self):
        self.cuda_devices = cuda_devices_of(self.model)
        self.pad_id = getattr(self.model.config, "pad_token_id", None) or 0
        self.float_mask = getattr(self.model.config, "_attn_implementation", None) == "eager"
        self._positives: torch.Tensor | None = None  # the step's positives, from its loss to the queue

    @property
    def caching(self) -> bool:
        return self.mini_batch_sequences is not None or self.mini_batch_tokens is not None

    def plan(self, ids: list[list[int]]) -> encoding_lib.StepPlan:
        lengths = [len(x) for x in ids]
        if self.caching:
            plan = encoding_lib.plan_step(lengths, self.encoding, cached=True,
                                          mini_batch_sequences=self.mini_batch_sequences,
                                          mini_batch_tokens=self.mini_batch_tokens)
            if len(plan.units) > 1:
                return plan
        return encoding_lib.plan_step(lengths, self.encoding, cached=False)

    def encode(self, unit) -> torch.Tensor:
        ctx = torch.autocast(self.device.type, dtype=self.autocast_dtype) if self.autocast_dtype \
            else contextlib.nullcontext()
        with ctx:
            return unit.pool(self.model, self.pooler, use_mlp=True)

    def loss(self, plan: encoding_lib.StepPlan, unit_embeddings: torch.Tensor, rows: StepRows = NO_ROWS,
             guide: tuple[torch.Tensor, ...] | None = None) -> torch.Tensor:
        emb = plan.to_batch_order(unit_embeddings)
        emb = emb.view(-1, self.views, emb.shape[-1])  # view 0 anchors, 1 positives, 2 hard negatives
        anchor, positive = emb[:, 0], emb[:, 1]
        negative = emb[:, 2] if self.views == 3 else None
        self._positives = positive.detach()
        return info_nce(anchor, positive, negative, process_group=self.process_group, **self.loss_options.keywords(),
                        **self._row_options(rows, anchor, guide))

    def _row_options(self, rows: StepRows, anchor: torch.Tensor, guide: tuple[torch.Tensor, ...] | None) -> dict:
        """The ``info_nce`` keywords of the step's rows, only those in use: a step without
        duplicates, labels, queued rows or a guide is the plain call, bit for bit."""
        options = {}
        if rows.group_ids is not None:
            options["group_ids"] = torch.tensor(rows.group_ids, dtype=torch.long, device=anchor.device)
        if rows.labels is not None:
            options["labels"] = torch.tensor(rows.labels, dtype=torch.long, device=anchor.device)
        queued, queued_guide = self.queue.negatives(rows.queue_exclude) if self.queue is not None else (None, None)
        if queued is not None:
            options["extra_negatives"] = queued.to(anchor.dtype)  # under autocast a stored row may be bf16
        if guide is not None:
            options["guide"] = guide
            if queued is not None:
                options["guide_extra_negatives"] = queued_guide
        return options

    def __call__(self, ids: list[list[int]], rows: StepRows = NO_ROWS) -> torch.Tensor:
        """Accumulates the parameter gradients of the step's loss; returns the detached loss."""
        plan = self.plan(ids)
        units = encoding_lib.build_units(ids, plan.units, self.encoding, self.pad_id, self.device,
                                         float_mask=self.float_mask)
        guide = self.guide.rows(ids, plan, self.views) if self.guide is not None else None
        loss_fn = functools.partial(self.loss, plan, rows=rows, guide=guide)
        if len(units) > 1 and self.caching:
            loss = cached_step(self.encode, units, loss_fn, cuda_devices=self.cuda_devices)
        else:
            loss = uncached_step(self.encode, units, loss_fn)  # several units: each keeps its graph
        if self.queue is not None:  # after the loss: a step does not score its own positives twice
            self.queue.push(self._of_all_ranks(self._positives), rows.queue_keys,
                            None if guide is None else self._of_all_ranks(guide[1]))
        self._positives = None
        return loss

    def _of_all_ranks(self, positives: torch.Tensor) -> torch.Tensor:
        """The step's positives (or their guide rows) in global row order: under a process group
        every rank queues every rank's, so that all ranks score the same queue (the
        single-process loss)."""
        if self.process_group is None:
            return positives
        return gather_variable(positives, self.rank_rows, self.process_group)


# --------------------------------------------------------------------------------------------
# Optimizer, evaluation and checkpoints


def make_optimizer(params, learning_rate: float, weight_decay: float, warmup_steps: int, total_steps: int):
    """AdamW (no decay on biases and norms) with linear warmup and linear decay to 0 at
    ``total_steps``, as transformers' ``get_linear_schedule_with_warmup``."""
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=learning_rate)

    def lr_factor(step):
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)


def apply_hyperparameters(optimizer, scheduler, learning_rate: float, weight_decay: float) -> None:
    """After loading a checkpoint's optimizer and schedule: this run's learning rate and weight
    decay, and its schedule's rate at the loaded step (load_state_dict brings back the saved
    ones, so a changed value would silently not apply). With unchanged settings this recomputes
    the same values, as LambdaLR does (base_lr * factor(step))."""
    for group, decay in zip(optimizer.param_groups, (weight_decay, 0.0)):
        group["weight_decay"] = decay
        group["initial_lr"] = learning_rate
    scheduler.base_lrs = [learning_rate] * len(optimizer.param_groups)
    rates = [base * factor(scheduler.last_epoch) for factor, base in zip(scheduler.lr_lambdas, scheduler.base_lrs)]
    for group, rate in zip(optimizer.param_groups, rates):
        group["lr"] = rate
    scheduler._last_lr = rates


