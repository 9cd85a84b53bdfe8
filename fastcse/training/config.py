"""``TrainConfig``: every setting of a training run, in one place.

``fastcse.train(model, data, **settings)`` builds one from its keywords,
``fastcse.train(model, data, config=TrainConfig(...))`` takes one as it is, the CLI builds one
from its flags (taking its choices and defaults from here), and every checkpoint saves the
settings it describes. A field's metadata says whether a resumed run must match the
checkpoint's value (``compared``) and, for a setting added after checkpoints were first
written, what such an older checkpoint ran with (``before_recorded``).
"""

from __future__ import annotations

import os
from dataclasses import MISSING, dataclass, field, fields, replace
from pathlib import Path

from fastcse.checks import DEFAULT_TEMPERATURE, choice, finite_float, positive_float, positive_int
from fastcse.encoding import check_encoding
from fastcse.evaluation import DEV_TASKS, SENTEVAL_TASKS, load_task, score_names
from fastcse.false_negatives import MARGIN_STRATEGIES
from fastcse.matryoshka import check_dims
from fastcse.pooling import check_pooler
from fastcse.training.guide import guide_model_path

MODES = ("unsup", "sup")
PRECISIONS = ("auto", "fp32", "bf16")
MLP_INITS = ("fresh", "pretrained")
# SimCSE's defaults (paper, appendix A): lr 3e-5 unsup / 5e-5 sup, 1 / 3 epochs.
DEFAULT_LR = {"unsup": 3e-5, "sup": 5e-5}
DEFAULT_EPOCHS = {"unsup": 1, "sup": 3}
EVAL_TASKS = SENTEVAL_TASKS + DEV_TASKS
# ``last/`` is also written at every evaluation, at the end and on SIGINT/SIGTERM; this bounds
# what a kill -9 loses when evaluation is off or rare (HF Trainer's default: a checkpoint is a
# full model plus twice its size in optimizer state, too much to write every few seconds).
DEFAULT_SAVE_STEPS = 500
# Names a user may give resume_override for the step count, which is compared as total_steps.
RESUME_OVERRIDE_ALIASES = {"max_steps": "total_steps", "epochs": "total_steps"}


class RunRefused(ValueError):
    """A run refused because it would lose or mix up earlier work. ``cli_message`` says the same
    with the command line's flags instead of train()'s keywords."""

    def __init__(self, message: str, cli_message: str):
        super().__init__(message)
        self.cli_message = cli_message


def _setting(default=MISSING, *, compared: bool = False, before_recorded=MISSING):
    """A field of TrainConfig. ``compared``: the setting changes what the run computes (the data
    and its order, the schedule, the loss, the numerics, the metric that picks the best
    checkpoint), so a resumed run must share it with its checkpoint unless ``resume_override``
    names it. Not compared: the memory layout (mini_batch_size, mini_batch_tokens, encoding: the
    same loss and gradients up to roundoff), the device, the bookkeeping (eval_steps, the
    output), mlp_init (the checkpoint's weights win). ``before_recorded``: the value that a
    checkpoint saved before the setting existed ran with; it is compared as such, so that e.g.
    resuming a run of an earlier fastcse (which never masked duplicates) with
    mask_duplicates=True is refused like any other change of the loss."""
    metadata = {"compared": compared}
    if before_recorded is not MISSING:
        metadata["before_recorded"] = before_recorded
    return field(default=default, metadata=metadata)


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """The settings of a training run (every keyword of :func:`fastcse.train` but the model, its
    tokenizer and the data). Checked when made: a bad value raises ``ValueError`` or
    ``TypeError`` with one line naming it. ``None`` for ``learning_rate``, ``epochs`` and
    ``mlp_only_train`` means the mode's default (:meth:`resolve` fills it in).

        batch_size: sentences (unsup) or examples (sup) per optimizer step: the in-batch negatives.
            Under ``torchrun`` this is the GLOBAL batch: each of the W ranks encodes its
            batch_size / W rows (rank order) and scores them against all batch_size candidates.
        mini_batch_size: gradient caching: encode the batch in chunks of at most this many
            examples (``views`` x this many sequences: 2 for unsup, 2 or 3 for sup), with the
            gradients of the whole batch and the activations of one chunk at a time. Under
            ``torchrun``, the chunk size of each rank's share.
        mini_batch_tokens: gradient caching by tokens (sentence-transformers'
            ``mini_batch_num_tokens``): chunks of at most this many real (non-padding) tokens,
            so memory is bounded by tokens, not by a sentence count a few long sentences can blow
            up. Must be at least the longest sequence after truncation. With
            ``mini_batch_size`` too, a chunk respects both bounds.
        encoding: how a step's sequences are laid out for the encoder (``fastcse.encoding``):
            ``"packed"`` (padding-free rows with a block-diagonal mask; BERT-family encoders),
            ``"sorted"`` (length-sorted groups, each padded to its own longest; any encoder),
            ``"padded"`` (one padded tensor per chunk, in batch order) or ``"auto"`` (packed
            where the model allows it, else sorted). The cached chunks are length-sorted too.
            Every choice gives the same loss and gradients up to float roundoff.
        temperature, hard_negative_weight: passed to ``fastcse.info_nce``.
        mask_duplicates: leave a batch's duplicates out of each other's negatives (default
            True): rows that share an anchor or a positive text (unsupervised: the same
            sentence; supervised: the same premise or entailment), directly or through a chain
            of such rows, form a group (union-find over the global batch), and
            ``info_nce(group_ids=...)`` drops the in-batch candidates of an anchor's own group
            other than its positive. True by default because it only ever removes false
            negatives (the same sentence scored as a negative of itself, whose gradient pushes
            an embedding away from itself), costs O(batch) hashing a step, and changes nothing,
            bit for bit, in a batch without duplicates (no group ids are passed then). Hard
            negatives are never masked. With labels it has no effect: the labels define the
            positives. Compared on resume (a checkpoint of an earlier fastcse counts as False).
        negative_queue_size: keep the detached embeddings of the most recent batches'
            positives, up to this many rows (0, the default: no queue), and score them as extra
            negatives of every anchor (``info_nce(extra_negatives=...)``; XBM, Wang et al. 2020):
            many more negatives than the batch holds, for the cost of a [B, Q] product, at the
            price of slightly stale embeddings. A step's positives join the queue after its
            loss; with ``mask_duplicates``, queued rows that repeat a text of the current batch
            are left out of its step. The queue is saved in ``last/`` (resume stays
            bit-identical). Under torchrun every rank queues every rank's positives, so all
            score the same queue. Works with gradient caching.
        matryoshka_dims, matryoshka_weights: Matryoshka training (Kusupati et al. 2022): the loss
            is ``sum_k w_k * loss_k``, ``loss_k`` the loss on the first ``m_k`` coordinates of
            every embedding (``info_nce(matryoshka_dims=...)``, one pass), so that the saved model
            can be used truncated (``SentenceTransformer(path, truncate_dim=m)``). Distinct ints
            in [1, the embeddings' dim] in any order (kept ascending); the weights, one finite
            number per dimension in ``matryoshka_dims``' order, default 1 each. Evaluation also
            scores each truncation (``"<task>@<m>"``). Compared on resume. CPU tensors only
            for now (the loss's Triton kernels do not implement it; refused before training).
        false_negative_margin, margin_strategy, guide_model: false negatives by similarity
            (``info_nce(false_negative_margin=...)``, GISTEmbed's rule): a negative whose
            similarity to the anchor exceeds the anchor's positive similarity less the margin
            (``"absolute"``: t - m; ``"relative"``: t - |t| m) is left out of its softmax as a
            likely false negative. Self-guided (``guide_model=None``): the loss's own cosine,
            without gradient. ``guide_model``: a local model folder whose embeddings decide
            instead; it encodes every step's rows through the same length-aware units as the
            model, in eval mode and without gradient (once per step under gradient caching), so
            it must share the model's tokenizer; its pooling is what the folder declares (else
            [CLS]). Compared on resume (the guide by its absolute path).
        metric_for_best: the evaluation score that picks the best checkpoint, by the name it is
            reported under: a task (``"STSBenchmark-dev"``, a pair file's stem), ``"avg"``, or
            either at a Matryoshka dimension (``"STSBenchmark-dev@256"``). Default None: the
            full dimension's score (the mean over several tasks). Compared on resume.
        pooler: ``cls`` (with the MLP head while training), ``cls_before_pooler``, ``avg``,
            ``avg_first_last``, ``avg_top2``.
        mlp_only_train: with ``pooler="cls"``, use the MLP head while training only and evaluate
            / export the raw [CLS] vector. Default: True for unsup, False for sup (as SimCSE).
        mlp_init: with ``pooler="cls"``, where the MLP head (the encoder's pooling layer,
            ``model.pooler.dense``) starts: ``"fresh"`` (default, as SimCSE: redrawn from the
            model's own init, normal(0, initializer_range) and zero bias, with a generator seeded
            by ``seed``; BERT's pretrained pooler was trained for next-sentence prediction) or
            ``"pretrained"`` (the model's pooler as loaded). The layout is unchanged, so saved
            models load as before. A resumed run takes the checkpoint's head either way.
        learning_rate, epochs: default 3e-5 / 1 epoch (unsup), 5e-5 / 3 epochs (sup).
            ``max_steps`` overrides ``epochs``. AdamW, linear decay after ``warmup_steps``.
        max_seq_length: truncation length for training inputs (evaluation does not truncate
            below the model's maximum). It must not exceed the model's position embeddings
            (512 for BERT): a larger value is refused with a ValueError once the model is loaded,
            before training (not clamped: the run would silently train on other inputs).
        eval_steps, eval_data: evaluate every ``eval_steps`` steps (and before the first and
            after the last) on ``eval_data``: a task name (default STS-B dev), a pair file, a list
            (their mean is the metric) or None for no evaluation. The best checkpoint is kept.
            The files are loaded (and so checked) before anything is trained or written.
        data_dir: the folder holding ``SentEval/`` (default ``../shared/data``).
        output_dir: ``best`` (best checkpoint), ``last`` (latest checkpoint with optimizer
            state, for ``resume_from``) and ``metrics.jsonl``. ``best`` and ``last`` are symlinks
            to versioned folders beside them (``last -> last.250``), switched atomically:
            ``AutoModel.from_pretrained(output_dir / "best")`` loads the model. A run holds
            ``output_dir/.fastcse.lock`` (its pid and host) while it runs: a second run on the
            same folder is refused at once (a lock whose process is dead is taken over).
            A rerun never deletes work silently: when ``output_dir`` holds an earlier run's
            ``last`` checkpoint and ``resume_from`` is not given, the run continues it if the
            settings match (one logged line says so: the same command serves the first start
            and every restart, as torchrun-style restarts expect), and is refused, naming
            ``resume_from`` / ``resume_override`` and ``overwrite_output_dir``, if they differ or
            if the earlier run left checkpoints that cannot be resumed.
        save_steps: also write ``last`` every this many steps (default 500; None: only at the
            evaluations). ``last`` is written at every evaluation (``eval_steps``), at the end,
            and when SIGINT or SIGTERM stops the run: the current step is finished and saved,
            the lock released, and :class:`fastcse.training.interrupts.TrainingInterrupted` (a
            KeyboardInterrupt) raised; a second signal aborts at once, leaving the last complete
            checkpoint. A kill -9 loses at most the steps since the last save.
        save_total_limit: how many versions of ``last`` to keep (default 1: the newest); older
            ones are pruned after each save, never the newest complete one; ``best`` is a
            separate checkpoint and is never pruned.
        overwrite_output_dir: start over in an ``output_dir`` that holds an earlier run,
            deleting its checkpoints and metrics (once every argument, the data, the eval files
            and the model have been checked). Also needed to resume another folder's checkpoint
            into an ``output_dir`` that holds a run of its own.
        precision: ``auto`` (bf16 autocast on CUDA when supported, else fp32), ``fp32``, ``bf16``.
        resume_from: a checkpoint folder, or a run's output_dir (its newest complete ``last``
            checkpoint, whatever the moment its run was killed), to continue from; the run then
            produces the same weights as an uninterrupted one. ``resume_from=output_dir`` on a
            folder with no checkpoint yet (killed before the first one, or new) starts from the
            beginning with a logged note, so the same command serves the first start and every
            restart. Resuming into another output_dir copies the run's ``best`` checkpoint and
            metrics there (refused if its best checkpoint cannot be found).
        resume_override: the settings a resumed run must share with its checkpoint are compared
            (the fields marked ``compared``, listed in ``RESUME_SETTINGS``: mode, the data and
            its labels, batch size, seed, total steps (max_steps / epochs), learning rate, weight decay, warmup, max_grad_norm, temperature,
            hard_negative_weight, pooler, mlp_only_train, max_seq_length, precision, eval_data,
            mask_duplicates, negative_queue_size, matryoshka_dims, matryoshka_weights, metric_for_best,
            false_negative_margin, margin_strategy, guide_model);
            a difference is refused, naming every differing setting with both values. Pass a
            list of setting names (or True for all; ``max_steps`` and ``epochs`` name
            ``total_steps``) to continue with the new values instead: the
            new learning rate, weight decay and schedule apply from the resumed step. Memory
            layout (mini_batch_size, mini_batch_tokens, encoding), device and world size may
            change freely.
    """

    mode: str = _setting("unsup", compared=True)
    batch_size: int = _setting(64, compared=True)
    seed: int = _setting(42, compared=True)
    learning_rate: float | None = _setting(None, compared=True)
    weight_decay: float = _setting(0.0, compared=True)
    warmup_steps: int = _setting(0, compared=True)
    max_grad_norm: float | None = _setting(1.0, compared=True)
    epochs: int | None = _setting(None)  # compared through total_steps
    max_steps: int | None = _setting(None)  # compared through total_steps
    temperature: float = _setting(DEFAULT_TEMPERATURE, compared=True)
    hard_negative_weight: float = _setting(0.0, compared=True)
    mask_duplicates: bool = _setting(True, compared=True, before_recorded=False)
    negative_queue_size: int = _setting(0, compared=True, before_recorded=0)
    matryoshka_dims: tuple[int, ...] | None = _setting(None, compared=True, before_recorded=None)
    matryoshka_weights: tuple[float, ...] | None = _setting(None, compared=True, before_recorded=None)
    false_negative_margin: float | None = _setting(None, compared=True, before_recorded=None)
    margin_strategy: str = _setting("absolute", compared=True, before_recorded="absolute")
    guide_model: object = _setting(None, compared=True, before_recorded=None)
    pooler: str = _setting("cls", compared=True)
    mlp_only_train: bool | None = _setting(None, compared=True)
    mlp_init: str = _setting("fresh")
    max_seq_length: int = _setting(32, compared=True)
    precision: str = _setting("auto", compared=True)
    mini_batch_size: int | None = _setting(None)
    mini_batch_tokens: int | None = _setting(None)
    encoding: str = _setting("auto")
    eval_steps: int = _setting(125)
    eval_data: object = _setting("STSBenchmark-dev", compared=True)
    metric_for_best: str | None = _setting(None, compared=True, before_recorded=None)
    data_dir: object = _setting(None)
    output_dir: object = _setting("runs/fastcse")
    save_steps: int | None = _setting(DEFAULT_SAVE_STEPS)
    save_total_limit: int = _setting(1)
    overwrite_output_dir: bool = _setting(False)
    resume_from: object = _setting(None)
    resume_override: object = _setting(False)
    device: object = _setting(None)
    progress: bool = _setting(True)
    save_last: bool = _setting(True)

    def __post_init__(self):
        self._check_model_settings()
        self._check_schedule()
        self._check_run_folder_settings()

    def _check_model_settings(self) -> None:
        """The batch, the encoding and the loss."""
        choice("mode", self.mode, MODES)
        positive_int("batch_size", self.batch_size, minimum=2)
        if self.mini_batch_size is not None:
            positive_int("mini_batch_size", self.mini_batch_size)
            if self.mini_batch_size > self.batch_size:
                raise ValueError(f"mini_batch_size ({self.mini_batch_size}) must not exceed batch_size "
                                 f"({self.batch_size})")
        positive_int("mini_batch_tokens", self.mini_batch_tokens, allow_none=True)
        check_encoding(self.encoding)
        positive_float("temperature", self.temperature)
        if isinstance(self.hard_negative_weight, bool):
            raise ValueError(f"hard_negative_weight must be a finite float, got {self.hard_negative_weight!r}")
        finite_float("hard_negative_weight", self.hard_negative_weight)
        if self.hard_negative_weight != 0.0 and self.mode == "unsup":
            raise ValueError("hard_negative_weight applies to supervised hard negatives; mode='unsup' has none")
        check_pooler(self.pooler)
        if self.mlp_only_train is not None and not isinstance(self.mlp_only_train, bool):
            raise TypeError(f"mlp_only_train must be True, False or None, got {self.mlp_only_train!r}")
        if self.mlp_only_train and self.pooler != "cls":
            raise ValueError(f"mlp_only_train applies to pooler='cls' only, got pooler={self.pooler!r}")
        choice("mlp_init", self.mlp_init, MLP_INITS)
        if not isinstance(self.mask_duplicates, bool):
            raise TypeError(f"mask_duplicates must be True or False, got {self.mask_duplicates!r}")
        positive_int("negative_queue_size", self.negative_queue_size, minimum=0)
        check_dims(self.matryoshka_dims, self.matryoshka_weights, None)  # the bound d once the model is loaded
        self._check_false_negative_settings()
        positive_int("max_seq_length", self.max_seq_length, minimum=2)
        try:
            choice("precision", self.precision, PRECISIONS)
        except ValueError as error:
            raise ValueError(f"{error} (fp16 would need loss scaling; use bf16)") from None

    def _check_false_negative_settings(self) -> None:
        if self.false_negative_margin is not None:
            if isinstance(self.false_negative_margin, bool):
                raise ValueError(f"false_negative_margin must be a finite number or None, got "
                                 f"{self.false_negative_margin!r}")
            finite_float("false_negative_margin", self.false_negative_margin)
        choice("margin_strategy", self.margin_strategy, MARGIN_STRATEGIES)
        if self.guide_model is not None:
            if not isinstance(self.guide_model, (str, os.PathLike)):
                raise TypeError(f"guide_model must be a local model folder (str or os.PathLike) or None, got "
                                f"{self.guide_model!r}")
            if self.false_negative_margin is None:
                raise ValueError("guide_model decides which negatives false_negative_margin leaves out: give "
                                 "false_negative_margin too")

    def _check_schedule(self) -> None:
        """The optimizer, its schedule and the run's length."""
        if self.learning_rate is not None:
            positive_float("learning_rate", self.learning_rate)
        positive_float("weight_decay", self.weight_decay, allow_zero=True)
        positive_int("warmup_steps", self.warmup_steps, minimum=0)
        if self.max_grad_norm is not None:
            positive_float("max_grad_norm", self.max_grad_norm)
        positive_int("epochs", self.epochs, allow_none=True)
        positive_int("max_steps", self.max_steps, allow_none=True)
        positive_int("seed", self.seed, minimum=0)

    def _check_run_folder_settings(self) -> None:
        """Evaluation, the output folder and resuming."""
        positive_int("eval_steps", self.eval_steps)
        _check_metric_for_best(self.metric_for_best, _eval_task_names(self.eval_data), self.matryoshka_dims)
        if not isinstance(self.output_dir, (str, os.PathLike)):
            raise TypeError(f"output_dir must be a folder path (str or os.PathLike), got {self.output_dir!r}")
        if not str(self.output_dir).strip():
            raise ValueError("output_dir must name a folder, got an empty string")
        positive_int("save_steps", self.save_steps, allow_none=True)
        positive_int("save_total_limit", self.save_total_limit)
        for name in ("overwrite_output_dir", "progress", "save_last"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.resume_from is not None and not isinstance(self.resume_from, (str, os.PathLike)):
            raise TypeError(f"resume_from must be a path or None, got {self.resume_from!r}")
        resume_override_names(self.resume_override)

    def resolve(self) -> TrainConfig:
        """The same settings in canonical form, checked against the filesystem (nothing is
        written): the mode's defaults filled in, numbers as floats, ``output_dir`` a Path (an
        existing folder or one that can be made), ``resume_override`` True or a frozenset of
        names, ``eval_data`` the list of evaluation tasks, each loaded once here: a missing, empty
        or malformed file fails before the output folder is touched, not at the first evaluation
        (by then a reused folder's previous metrics were gone)."""
        learning_rate = DEFAULT_LR[self.mode] if self.learning_rate is None else float(self.learning_rate)
        tasks = _eval_task_names(self.eval_data)
        for task in tasks:
            if task.lower().endswith((".tsv", ".csv")) and not Path(task).is_file():
                raise FileNotFoundError(f"eval_data file not found: {task!r}")
        for task in tasks:
            load_task(task, self.data_dir)
        return replace(
            self, learning_rate=learning_rate, weight_decay=float(self.weight_decay),
            max_grad_norm=None if self.max_grad_norm is None else float(self.max_grad_norm),
            temperature=float(self.temperature), hard_negative_weight=float(self.hard_negative_weight),
            **_canonical_matryoshka(self.matryoshka_dims, self.matryoshka_weights),
            false_negative_margin=None if self.false_negative_margin is None else float(self.false_negative_margin),
            guide_model=guide_model_path(self.guide_model),
            epochs=DEFAULT_EPOCHS[self.mode] if self.epochs is None else self.epochs,
            mlp_only_train=(self.mode == "unsup" and self.pooler == "cls") if self.mlp_only_train is None
            else self.mlp_only_train,
            output_dir=_check_output_dir(self.output_dir), resume_override=resume_override_names(self.resume_override),
            eval_data=tasks)

    @property
    def eval_pooler(self) -> str:
        """The pooling that evaluation and the saved model use: the raw [CLS] when the MLP head
        trains alone (``mlp_only_train``), else the training's pooler."""
        return "cls_before_pooler" if (self.pooler == "cls" and self.mlp_only_train) else self.pooler


def _field_names(**metadata) -> tuple[str, ...]:
    return tuple(f.name for f in fields(TrainConfig) if all(f.metadata.get(k) == v for k, v in metadata.items()))


# What a run computes besides its settings, compared on resume as they are: the data (a hash of
# the examples and labels in order) and its size, and the number of steps (max_steps or epochs).
RUN_FACTS = ("data", "num_examples", "total_steps")
# The settings a resumed run must share with its checkpoint (unless ``resume_override`` names them).
RESUME_SETTINGS = RUN_FACTS + _field_names(compared=True)
# What a checkpoint saved before a setting existed ran with (see ``_setting``).
EARLIER_SETTINGS = {f.name: f.metadata["before_recorded"] for f in fields(TrainConfig)
                    if "before_recorded" in f.metadata}
SETTING_NAMES = frozenset(f.name for f in fields(TrainConfig))


def make_config(config: TrainConfig | None, settings: dict) -> TrainConfig:
    """The run's TrainConfig: ``config`` (default: all defaults) with ``settings`` (train()'s
    keywords) replacing its fields."""
    if config is not None and not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a fastcse.TrainConfig, got {type(config).__name__}")
    unknown = sorted(set(settings) - SETTING_NAMES)
    if unknown:
        raise TypeError(f"train() got unknown settings {unknown}: the settings are the fields of "
                        "fastcse.TrainConfig")
    if config is None:
        return TrainConfig(**settings)
    return replace(config, **settings) if settings else config


def run_settings(config: TrainConfig, *, facts: dict, precision: str, encoding: str) -> dict:
    """The run's settings as a checkpoint saves them, from the resolved ``config``: first those a
    resumed run must share (``RESUME_SETTINGS``: ``facts`` gives the RUN_FACTS, ``precision`` the
    resolved precision), then those that only describe the run."""
    settings = {name: facts[name] if name in facts else getattr(config, name) for name in RESUME_SETTINGS}
    settings["precision"] = precision
    settings.update(max_steps=config.max_steps, epochs=None if config.max_steps is not None else config.epochs,
                    mlp_init=config.mlp_init, mini_batch_size=config.mini_batch_size,
                    mini_batch_tokens=config.mini_batch_tokens, encoding=encoding, eval_steps=config.eval_steps)
    return settings


def _eval_task_names(eval_data) -> list[str]:
    """The evaluation tasks ``eval_data`` names: task names and .tsv/.csv pair files."""
    if eval_data is None:
        return []
    tasks = [eval_data] if isinstance(eval_data, (str, os.PathLike)) else list(eval_data)
    for task in map(str, tasks):
        if task not in EVAL_TASKS and not task.lower().endswith((".tsv", ".csv")):
            raise ValueError(f"eval_data must be a task name {EVAL_TASKS}, a .tsv/.csv pair file, "
                             f"a list of them or None, got {task!r}")
    return [str(task) for task in tasks]


def _canonical_matryoshka(dims, weights) -> dict:
    """The Matryoshka settings as resolve() keeps them (and a checkpoint records and compares
    them): dimensions ascending, one weight each (1.0 by default), as tuples; or both None."""
    dims, weights = check_dims(dims, weights, None)
    return {"matryoshka_dims": dims or None, "matryoshka_weights": weights or None}


def _check_metric_for_best(metric_for_best, tasks: list[str], matryoshka_dims) -> None:
    """``metric_for_best`` names a score that the run's evaluation reports."""
    if metric_for_best is None:
        return
    if not isinstance(metric_for_best, str):
        raise TypeError(f"metric_for_best must be a score name (str) or None, got {metric_for_best!r}")
    if not tasks:
        raise ValueError(f"metric_for_best={metric_for_best!r} picks the best checkpoint among evaluations, and "
                         "eval_data is None: give eval_data or leave metric_for_best out")
    dims = sorted(check_dims(matryoshka_dims, None, None)[0], reverse=True)
    names = score_names(tasks, dims)
    if metric_for_best not in names:
        raise ValueError(f"metric_for_best must be one of the evaluation's scores {names}, got {metric_for_best!r}")


def _check_output_dir(output_dir) -> Path:
    """``output_dir`` as a Path: an existing folder or one that can be made (no file on the way)."""
    path = Path(output_dir)
    for folder in (path, *path.parents):
        if folder.is_dir():
            break
        if folder.exists() or folder.is_symlink():
            where = "is" if folder == path else f"lies under {str(folder)!r}, which is"
            raise NotADirectoryError(f"output_dir={str(path)!r} {where} a file, not a folder")
    return path


def resume_override_names(resume_override) -> bool | frozenset:
    """True (every setting may differ from the checkpoint's) or the names of those that may."""
    if isinstance(resume_override, bool):
        return resume_override or frozenset()
    names = [resume_override] if isinstance(resume_override, str) else resume_override
    try:
        names = [RESUME_OVERRIDE_ALIASES.get(str(name), str(name)) for name in names]
    except TypeError:
        raise TypeError(f"resume_override must be a bool or a list of setting names, got {resume_override!r}") \
            from None
    unknown = [name for name in names if name not in RESUME_SETTINGS]
    if unknown:
        raise ValueError(f"resume_override names {unknown}, which are not settings compared on resume: "
                         f"{list(RESUME_SETTINGS)}")
    return frozenset(names)
