"""``fastcse.train``: unsupervised and supervised SimCSE over Hugging Face encoders.

A thin trainer: AdamW with linear decay, the fused InfoNCE loss (``fastcse.loss.info_nce``: a
batch's duplicate texts masked out of each other's negatives, an optional queue of recent
positives as extra negatives, integer labels as several positives), optional gradient caching
(``mini_batch_size``), STS-B dev evaluation every ``eval_steps`` keeping the best checkpoint,
atomic checkpoints, ``resume_from``, a tqdm bar and a JSON-lines metrics file. Defaults follow
the SimCSE paper; every setting is a field of :class:`fastcse.training.config.TrainConfig`.

Multi-process training (``torchrun``, any ``torch.distributed`` backend; tested on CPU with gloo):
when the default process group is initialized with more than one rank, every global batch of
``batch_size`` examples is split over the ranks in rank order (rank r takes rows
[r*B//W, (r+1)*B//W)), the loss uses the distributed negatives
(``info_nce(..., process_group=WORLD)``: every rank scores its rows against all ranks'
candidates) and the parameter gradients are all-reduced with SUM (each rank holds its own rows'
share of the single-process gradient), so a step equals the single-process step on the whole
global batch. Only rank 0 evaluates, logs and writes metrics and checkpoints.
"""

from __future__ import annotations

import inspect
import logging
import math
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.distributed as dist

from fastcse import __version__
from fastcse.training.batches import (BatchOrder, BatchRows, TokenizedBatches, check_mini_batch_tokens,
                                      data_fingerprint, load_training_data, rows_per_rank)
from fastcse.training.checkpoints import METRICS_FILE, append_jsonl, prepare_output_dir, save_checkpoint
from fastcse.training.config import TrainConfig, make_config, run_settings
from fastcse.training.evaluator import Evaluator
from fastcse.training.guide import GuideEncoder, load_guide_model, shared_encoding
from fastcse.training.lock import RunLock, locked_output_dir
from fastcse.training.model import (check_max_seq_length, check_mlp_head, load_model_on_device, resolve_precision,
                                    set_starting_weights)
from fastcse.training.ranks import (all_reduce_grads, check_multi_process, current_world, on_rank0,
                                    set_up_rank_device, torchrun_process_group)
from fastcse.training.interrupts import StopRequests, TrainingInterrupted
from fastcse.training.resume import Checkpointer, ResumeChoice, RunState, choose_checkpoint, load_resume
from fastcse.training.step import ContrastiveStep, LossOptions, NegativeQueue, make_optimizer

logger = logging.getLogger("fastcse.train")


@dataclass
class TrainResult:
    """What a run did. ``model_path`` is the model to use: the best checkpoint when evaluating,
    else the last one; ``AutoModel.from_pretrained(model_path)`` loads it."""

    steps: int
    model_path: str
    output_dir: str
    metrics_path: str
    best_metric: float | None = None
    best_step: int | None = None
    history: list[dict] = field(default_factory=list)
    train_seconds: float = 0.0
    sentences_per_second: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class LoadedRun:
    """What a run trains on, loaded and checked before anything is written: the examples, their
    labels (None without), the sequences each example encodes (views), the model on its device,
    the autocast dtype (None: fp32), the resolved encoding, the step count, the settings a
    checkpoint records, and the trainer state to resume (None: a fresh start)."""

    examples: list
    labels: list[int] | None
    views: int
    model: torch.nn.Module
    tokenizer: object
    device: torch.device
    autocast_dtype: torch.dtype | None
    encoding: str
    total_steps: int
    settings: dict
    saved: dict | None


@torchrun_process_group
def train(model, data, *, tokenizer=None, config: TrainConfig | None = None, **settings) -> TrainResult:
    """Trains a sentence encoder with SimCSE's contrastive objective (``fastcse.loss.info_nce``).

    Args:
        model: a local model folder or Hub id (``AutoModel``/``AutoTokenizer``), a
            ``PreTrainedModel`` with ``tokenizer=``, or a ``(model, tokenizer)`` pair.
        data: ``mode="unsup"``: a text file (one sentence a line), a ``datasets.Dataset`` with a
            ``text`` column or a list of sentences; each sentence is encoded twice with dropout
            on and the two views are a positive pair. ``mode="sup"``: a ``sent0,sent1[,hard_neg]``
            CSV (SimCSE's NLI layout), a Dataset with those columns or a list of tuples. With a
            ``label`` column (CSV or Dataset; tuples: an int last, ``(sent0, sent1, 7)``), the
            labels are integer ids and every in-batch positive with the anchor's label is one of
            its positives (``info_nce(labels=...)``, SupCon's L_out: the loss is the mean over
            them); hard negatives and queued rows stay negatives. Non-integer labels (class
            names) are refused naming the row: map them to ints first.
        tokenizer: the tokenizer of a ``PreTrainedModel`` passed as ``model``.
        config: a :class:`fastcse.TrainConfig` (default: all defaults).
        **settings: any field of :class:`fastcse.TrainConfig` (batch_size, learning_rate,
            output_dir, resume_from, ...), replacing the config's value; its docstring
            describes each one.

    Multi-process (``torchrun --nproc_per_node=W -m fastcse train ...``, or any caller that has
    run ``torch.distributed.init_process_group``): needs the C++ extension ``fastcse._C``. Every
    rank must pass the same arguments; rank 0's initial weights are broadcast to all ranks, and
    the dropout generator is seeded with ``seed + rank`` (the ranks draw different masks, so with
    dropout on a W-rank run is a different, equally valid, random draw than a one-process run;
    with dropout off it equals the one-process run up to float roundoff). Only rank 0 evaluates,
    logs, shows the progress bar, takes the output_dir's lock and writes metrics and checkpoints;
    the others wait. The returned result is the same on every rank. With CUDA, ``device=None`` or
    ``"cuda"`` means each rank's own GPU, ``cuda:{LOCAL_RANK}`` (made the current device before
    any collective); an explicit ``cuda:<i>`` is used as given.
    """
    config = make_config(config, settings).resolve()
    rank, world = current_world()
    device = set_up_rank_device(config.device, world, rank)
    check_multi_process(config.batch_size, world)
    on_rank0(world, rank, RunLock(config.output_dir).refuse_if_held)  # a second run stops here, before the model loads
    choice = choose_checkpoint(config, rank == 0)
    run, guide = _load_run(model, tokenizer, data, config, device, choice)
    set_starting_weights(run.model, _fresh_head(config, choice.folder), config.seed, world)
    if rank == 0:
        _log_ineffective_settings(run, config)
    with locked_output_dir(config.output_dir, world, rank):  # nothing above wrote to the folder
        resume_folder = on_rank0(world, rank, prepare_output_dir, config.output_dir, choice.folder,
                                 run.saved["step"] if run.saved is not None else 0, config.save_total_limit)
        return _train_in_folder(run, guide, config, resume_folder, world, rank)


def _fresh_head(config: TrainConfig, resume_folder: Path | None) -> bool:
    """Whether the MLP head is redrawn (a resumed run takes the checkpoint's head)."""
    return config.pooler == "cls" and config.mlp_init == "fresh" and resume_folder is None


def _load_run(model, tokenizer, data, config: TrainConfig, device,
              choice: ResumeChoice) -> tuple[LoadedRun, GuideEncoder | None]:
    """Loads the data, the model and the guide model (None without one) and checks them against
    ``config``, then the checkpoint to resume against the run's settings (all before any write)."""
    examples, labels, views = load_training_data(data, config.mode, config.batch_size)
    if config.hard_negative_weight != 0.0 and views < 3:  # else the loss would refuse it at the first step
        raise ValueError(f"hard_negative_weight={config.hard_negative_weight} weights hard negatives, and the data has "
                         "none (sent0,sent1 only): add a hard_neg column or use hard_negative_weight=0")
    model, tokenizer, device = load_model_on_device(model, tokenizer, device)
    autocast_dtype = resolve_precision(config.precision, device)
    check_mlp_head(model, config.pooler, _fresh_head(config, choice.folder))
    check_max_seq_length(model, config.max_seq_length)
    _loss_options(config).check(int(model.config.hidden_size), device)  # every pooler gives hidden_size coordinates
    guide_model, guide_pooler = (None, None) if config.guide_model is None else \
        load_guide_model(config.guide_model, tokenizer, config.max_seq_length, device)
    encoding = shared_encoding(config.encoding, model, guide_model)
    check_mini_batch_tokens(config.mini_batch_tokens, tokenizer, examples, config.mode, config.max_seq_length)
    order = BatchOrder(len(examples), config.batch_size, config.seed)
    total_steps = config.max_steps if config.max_steps is not None else config.epochs * order.steps_per_epoch
    facts = {"data": data_fingerprint(examples, labels), "num_examples": len(examples), "total_steps": total_steps}
    settings = run_settings(config, facts=facts, precision="bf16" if autocast_dtype else "fp32", encoding=encoding)
    saved = load_resume(choice, settings, config)
    guide = None if guide_model is None else GuideEncoder(guide_model, guide_pooler, encoding, autocast_dtype)
    return LoadedRun(examples, labels, views, model, tokenizer, device, autocast_dtype, encoding, total_steps,
                     settings, saved), guide


def _train_in_folder(run: LoadedRun, guide: GuideEncoder | None, config: TrainConfig, resume_folder: Path | None,
                     world: int, rank: int) -> TrainResult:
    """The run proper, in its locked and readied output folder."""
    output_dir, model = config.output_dir, run.model
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer, scheduler = make_optimizer(params, config.learning_rate, config.weight_decay, config.warmup_steps,
                                          run.total_steps)
    record = _model_record(config)
    queue = NegativeQueue(config.negative_queue_size) if config.negative_queue_size else None
    checkpointer = Checkpointer(model, run.tokenizer, optimizer, scheduler, run.settings, record, config, world, rank,
                                queue)
    evaluator = Evaluator(model, run.tokenizer, config, record, world, rank) if config.eval_data else None
    contrastive_step = _contrastive_step(run, config, queue, world, guide)
    torch.manual_seed(config.seed + rank)  # dropout masks: a different stream per rank
    state = checkpointer.resume(run.saved, resume_folder, config.seed) if run.saved is not None else RunState()
    if rank == 0:
        _log_run_start(run, config, world, contrastive_step.caching)
    shard = (rank * config.batch_size // world, (rank + 1) * config.batch_size // world)
    batches = TokenizedBatches(run.examples, config.mode, run.tokenizer, config.max_seq_length,
                               BatchOrder(len(run.examples), config.batch_size, config.seed), shard, run.total_steps)
    # BatchRows gets an order of its own: TokenizedBatches calls its ``order`` (which caches an
    # epoch's permutation) from its prefetch thread.
    rows = BatchRows(run.examples, config.mode, run.labels, BatchOrder(len(run.examples), config.batch_size,
                                                                      config.seed),
                     shard, mask_duplicates=config.mask_duplicates and run.labels is None, queue=queue is not None)
    loop = TrainingLoop(model, params, optimizer, scheduler, contrastive_step, batches, rows, evaluator,
                        checkpointer if config.save_last else None,
                        output_dir / METRICS_FILE if rank == 0 else None, config, run, world, rank)
    try:
        throughput = loop.run(state)
    finally:
        batches.close()
    if config.eval_data:
        model_path = output_dir / "best"
    else:
        model_path = output_dir / "last"
        if not config.save_last:  # no evaluation and no resumable checkpoint: still save the model
            on_rank0(world, rank, save_checkpoint, model_path, model, run.tokenizer, dict(record, step=state.step))
    return _train_result(state, model_path, output_dir, output_dir / METRICS_FILE, throughput)


def _loss_options(config: TrainConfig) -> LossOptions:
    return LossOptions(config.temperature, config.hard_negative_weight, config.matryoshka_dims,
                       config.matryoshka_weights, config.false_negative_margin, config.margin_strategy)


def _contrastive_step(run: LoadedRun, config: TrainConfig, queue: NegativeQueue | None, world: int,
                      guide: GuideEncoder | None) -> ContrastiveStep:
    return ContrastiveStep(
        run.model, config.pooler, run.encoding, run.views, _loss_options(config),
        dist.group.WORLD if world > 1 else None, run.autocast_dtype, run.device,
        mini_batch_sequences=config.mini_batch_size * run.views if config.mini_batch_size else None,
        mini_batch_tokens=config.mini_batch_tokens, queue=queue, rank_rows=rows_per_rank(config.batch_size, world),
        guide=guide)


def _log_ineffective_settings(run: LoadedRun, config: TrainConfig) -> None:
    """Notes the settings that the model or the data leave without effect."""
    if config.mode == "unsup" and getattr(run.model.config, "hidden_dropout_prob", 0.1) == 0:
        logger.warning("unsupervised SimCSE uses dropout as its augmentation, but the model's dropout is 0")
    if run.labels is not None and config.mask_duplicates:
        logger.info("the data has labels: they define the positives, so mask_duplicates has no effect")
    if config.matryoshka_dims and config.eval_pooler != config.pooler:
        logger.warning("matryoshka_dims trains the prefixes of the MLP head's output, but evaluation and the saved "
                       "model use the raw [CLS] (mlp_only_train): its truncations are not the ones trained; "
                       "pooler='avg' or mlp_only_train=False evaluate what Matryoshka trains")


def _model_record(config: TrainConfig) -> dict:
    """How a saved model was trained and is to be pooled, written with every checkpoint."""
    return {"mode": config.mode, "pooler": config.pooler, "mlp_only_train": config.mlp_only_train,
            "mlp_init": config.mlp_init, "eval_pooler": config.eval_pooler, "temperature": config.temperature,
            "batch_size": config.batch_size, "max_seq_length": config.max_seq_length,
            "matryoshka_dims": list(config.matryoshka_dims) if config.matryoshka_dims else None,
            "fastcse_version": __version__}


def _log_run_start(run: LoadedRun, config: TrainConfig, world: int, caching: bool) -> None:
    """One line describing the run about to train."""
    batch_size = config.batch_size
    logger.info("training %s SimCSE: %d examples%s, batch %d%s%s, %d steps, lr %g, pooler %s, %s encoding, "
                "precision %s, %s, negative queue %s%s%s", config.mode, len(run.examples),
                " (labelled)" if run.labels is not None else "", batch_size,
                f" over {world} processes ({batch_size // world}{'+' if batch_size % world else ''} each)"
                if world > 1 else "",
                f" (gradient caching: mini-batch {config.mini_batch_size or '-'}, "
                f"{config.mini_batch_tokens or '-'} tokens)" if caching else "",
                run.total_steps, config.learning_rate, config.pooler, run.encoding,
                "bf16" if run.autocast_dtype else "fp32",
                "duplicates masked" if config.mask_duplicates and run.labels is None else "duplicates not masked",
                config.negative_queue_size or "off",
                f", Matryoshka dims {list(config.matryoshka_dims)} weights {list(config.matryoshka_weights)}"
                if config.matryoshka_dims else "", _false_negatives_note(config))


def _false_negatives_note(config: TrainConfig) -> str:
    if config.false_negative_margin is None:
        return ""
    guide = f"guided by {config.guide_model}" if config.guide_model else "self-guided"
    return (f", false negatives by similarity ({guide}, {config.margin_strategy} margin "
            f"{config.false_negative_margin:g})")


def _train_result(state: RunState, model_path: Path, output_dir: Path, metrics_path: Path,
                  throughput: tuple[float, int]) -> TrainResult:
    """What the finished run reports, from its state and the loop's throughput."""
    train_seconds, sentences_seen = throughput
    return TrainResult(steps=state.step, model_path=str(model_path), output_dir=str(output_dir),
                       metrics_path=str(metrics_path), best_metric=state.best_metric, best_step=state.best_step,
                       history=state.history, train_seconds=train_seconds,
                       sentences_per_second=sentences_seen / train_seconds if train_seconds else None)


class CollapseWatch:
    """Warns once when the loss has sat near ln(batch) with a zero gradient norm for
    ``patience`` steps in a row: the embeddings have collapsed (every candidate scores alike, so
    the loss is about the log of their count, up to dropout's noise), typically from a far too
    high learning rate, and nothing more will be learned. A well-trained model has a small
    gradient too, but a loss far below ln(batch): the floor is half of it."""

    def __init__(self, batch_size: int, learning_rate: float, patience: int = 3):
        self.floor = 0.5 * math.log(batch_size)
        self.batch_size, self.learning_rate, self.patience = batch_size, learning_rate, patience
        self.streak, self.warned = 0, False

    def observe(self, step: int, loss: float, grad_norm: float | None) -> bool:
        """Records step ``step``; True (and one logged warning) when the collapse is first seen."""
        stuck = grad_norm is not None and grad_norm < 1e-6 and loss >= self.floor
        self.streak = self.streak + 1 if stuck else 0
        if self.streak < self.patience or self.warned:
            return False
        self.warned = True
        logger.warning("the loss has sat near ln(batch %d) = %.2f (now %.2f) with a zero gradient norm for %d steps "
                       "(since step %d): the embeddings have collapsed and nothing more is learned; lower the "
                       "learning rate (now %g)", self.batch_size, math.log(self.batch_size), loss, self.streak,
                       step - self.streak + 1, self.learning_rate)
        return True


@dataclass
class TrainingLoop:
    """Steps a run's state to its last step: each step's loss and update, the metrics record,
    evaluation every ``eval_steps``, ``last/`` at every evaluation, every ``save_steps`` and at
    the end, the progress bar; on SIGINT/SIGTERM, the current step finished and saved."""

    model: torch.nn.Module
    params: list
    optimizer: torch.optim.Optimizer
    scheduler: object
    contrastive_step: ContrastiveStep
    batches: TokenizedBatches
    rows: BatchRows
    evaluator: Evaluator | None
    checkpointer: Checkpointer | None
    metrics_path: Path | None  # None on the ranks other than 0
    config: TrainConfig
    loaded: LoadedRun
    world: int
    rank: int

    def run(self, state: RunState) -> tuple[float, int]:
        """Trains from ``state.step`` to the last step. Returns (training seconds, sentences encoded)."""
        from tqdm.auto import tqdm

        self.model.train()
        self.train_seconds, self.sentences_seen, self.saved_step = 0.0, 0, state.step
        self.collapse = CollapseWatch(self.config.batch_size, self.config.learning_rate)
        total_steps = self.loaded.total_steps
        bar = tqdm(total=total_steps, initial=state.step, disable=not (self.config.progress and self.rank == 0),
                   unit="step", dynamic_ncols=True)
        with StopRequests(announce=self.rank == 0) as stops:
            try:
                if state.step == 0 and self.evaluator is not None:
                    self.evaluator(state)
                self.last_score = state.history[-1]["metric"] if state.history else None
                while state.step < total_steps:
                    signum = self._stop_signal(stops)
                    if signum is not None:
                        self._stop(state, signum)
                    loss_value = self._step(state)
                    self._after_step(state)
                    bar.set_postfix(self._postfix(loss_value), refresh=False)
                    bar.update(1)
            finally:
                bar.close()
        return self.train_seconds, self.sentences_seen

    def _postfix(self, loss_value: float) -> dict:
        postfix = {"loss": f"{loss_value:.4f}", "sent/s": f"{self.sentences_seen / self.train_seconds:.0f}"}
        if self.last_score is not None:
            postfix["dev"] = f"{self.last_score:.2f}"
        return postfix

    def _step(self, state: RunState) -> float:
        """One optimizer step and its metrics record; returns the loss."""
        t0 = time.perf_counter()
        epoch, ids = self.batches(state.step)
        loss = self.contrastive_step(ids, self.rows(state.step))
        loss_value = float(loss)
        if not math.isfinite(loss_value):  # before the update: the model in memory stays finite
            self.optimizer.zero_grad(set_to_none=True)
            hint = "lower the learning rate" + (" or use precision='fp32'" if self.loaded.autocast_dtype else "")
            raise FloatingPointError(f"loss became {loss_value} at step {state.step + 1}: {hint}")
        if self.world > 1:
            all_reduce_grads(self.params)  # SUM: each rank holds its rows' share of the full gradient
        max_grad_norm = self.config.max_grad_norm
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, max_grad_norm)) if max_grad_norm else None
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        state.step += 1
        seconds = time.perf_counter() - t0
        sentences = self.config.batch_size * self.loaded.views
        self.train_seconds += seconds
        self.sentences_seen += sentences
        if self.metrics_path is not None:
            append_jsonl(self.metrics_path, {"step": state.step, "epoch": epoch, "loss": loss_value, "lr": lr,
                                             "grad_norm": grad_norm, "sentences_per_second": sentences / seconds})
            self.collapse.observe(state.step, loss_value, grad_norm)
        return loss_value

    def _after_step(self, state: RunState) -> None:
        """Evaluation every ``eval_steps``; ``last/`` then, every ``save_steps`` and at the end."""
        step, save_steps = state.step, self.config.save_steps
        evaluation = step % self.config.eval_steps == 0 or step == self.loaded.total_steps
        if self.evaluator is not None and evaluation:
            self.last_score = self.evaluator(state)
        if self.checkpointer is not None and (evaluation or (save_steps and step % save_steps == 0)):
            self.checkpointer.save(state)
            self.saved_step = step

    def _stop_signal(self, stops: StopRequests) -> int | None:
        """The signal that stops the run before its next step, if any. Under a process group the
        ranks agree (the largest signal number any of them got): they must stop at the same step,
        since saving is collective."""
        signum = stops.signum or 0
        if self.world > 1:
            flag = torch.tensor([signum], device=self.loaded.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            signum = int(flag.item())
        return signum or None

    def _stop(self, state: RunState, signum: int) -> None:
        """Saves the finished step (unless saved already, or none was trained) and stops."""
        if self.checkpointer is not None and state.step > self.saved_step:
            self.checkpointer.save(state)
            self.saved_step = state.step
        checkpoint = self.config.output_dir / "last" if self.checkpointer is not None and state.step > 0 else None
        raise TrainingInterrupted(signum, state.step, self.loaded.total_steps, self.config.output_dir, checkpoint)


def _signature_with_settings(fn) -> inspect.Signature:
    """train's signature with TrainConfig's fields as its keywords (for help() and editors)."""
    base = [p for p in inspect.signature(fn).parameters.values() if p.kind != p.VAR_KEYWORD]
    settings = [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default, annotation=f.type)
                for f in fields(TrainConfig)]
    return inspect.signature(fn).replace(parameters=base + settings)


train.__signature__ = _signature_with_settings(train)
