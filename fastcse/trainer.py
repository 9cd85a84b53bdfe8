"""``fastcse.train``: unsupervised and supervised SimCSE over Hugging Face encoders.

A thin trainer: AdamW with linear decay, the fused ``fastcse.info_nce`` loss, optional gradient
caching (``mini_batch_size``), STS-B dev evaluation every ``eval_steps`` keeping the best
checkpoint, atomic checkpoints, ``resume_from``, a tqdm bar and a JSON-lines metrics file.
Defaults follow the SimCSE paper.

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

import contextlib
import functools
import json
import logging
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

import fastcse
from fastcse import data as datalib
from fastcse import encoding as encoding_lib
from fastcse.evaluation import DEV_TASKS, SENTEVAL_TASKS, evaluate_loaded, load_model, max_model_length
from fastcse.gradcache import cached_step, cuda_devices_of, uncached_step
from fastcse.pooling import check_pooler, has_mlp_head

logger = logging.getLogger("fastcse.train")

MODES = ("unsup", "sup")
PRECISIONS = ("auto", "fp32", "bf16")
STATE_FILE = "trainer_state.pt"
RECORD_FILE = "fastcse.json"
METRICS_FILE = "metrics.jsonl"
# SimCSE's defaults (paper, appendix A): lr 3e-5 unsup / 5e-5 sup, 1 / 3 epochs.
DEFAULT_LR = {"unsup": 3e-5, "sup": 5e-5}
DEFAULT_EPOCHS = {"unsup": 1, "sup": 3}


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


# --------------------------------------------------------------------------------------------
# Argument checks (all before any training starts)


def _positive_int(name, value, minimum=1, allow_none=False):
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def _positive_float(name, value, allow_zero=False):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name} must be a finite {'non-negative' if allow_zero else 'positive'} number, got {value!r}")
    return float(value)


def _eval_tasks(eval_data) -> list[str]:
    if eval_data is None:
        return []
    tasks = [eval_data] if isinstance(eval_data, (str, os.PathLike)) else list(eval_data)
    out = []
    for task in map(str, tasks):
        if task in SENTEVAL_TASKS + DEV_TASKS:
            out.append(task)
        elif task.lower().endswith((".tsv", ".csv")):
            if not Path(task).is_file():
                raise FileNotFoundError(f"eval_data file not found: {task!r}")
            out.append(task)
        else:
            raise ValueError(f"eval_data must be a task name {SENTEVAL_TASKS + DEV_TASKS}, a .tsv/.csv pair file, "
                             f"a list of them or None, got {task!r}")
    return out


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for fp32. ``auto``: bf16 on CUDA devices that support it."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r} "
                         "(fp16 would need loss scaling; use bf16)")
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else None
    return torch.bfloat16 if precision == "bf16" else None


# --------------------------------------------------------------------------------------------
# Saving


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def write_sentence_transformers_files(folder: Path, model, tokenizer, eval_pooler: str) -> bool:
    """Makes ``folder`` load with ``sentence_transformers.SentenceTransformer(folder)`` and the
    training's pooling. Writes the long-standing layout (``sentence_transformers.models.*``),
    which current releases still read. avg_first_last / avg_top2 have no sentence-transformers
    pooling mode: returns False and writes nothing for them."""
    hidden = model.config.hidden_size
    if eval_pooler not in ("cls", "cls_before_pooler", "avg"):
        return False
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    (folder / "1_Pooling").mkdir(exist_ok=True)
    _write_json(folder / "1_Pooling" / "config.json", {
        "word_embedding_dimension": hidden,
        "pooling_mode_cls_token": eval_pooler != "avg",
        "pooling_mode_mean_tokens": eval_pooler == "avg",
        "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False,
    })
    if eval_pooler == "cls":  # SimCSE's MLP head is the encoder's pooler: dense + tanh on [CLS]
        from safetensors.torch import save_file

        dense = model.pooler.dense
        (folder / "2_Dense").mkdir(exist_ok=True)
        _write_json(folder / "2_Dense" / "config.json", {
            "in_features": hidden, "out_features": dense.out_features, "bias": dense.bias is not None,
            "activation_function": "torch.nn.modules.activation.Tanh"})
        tensors = {"linear.weight": dense.weight.detach().cpu().contiguous()}
        if dense.bias is not None:
            tensors["linear.bias"] = dense.bias.detach().cpu().contiguous()
        save_file(tensors, str(folder / "2_Dense" / "model.safetensors"))
        modules.append({"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"})
    _write_json(folder / "modules.json", modules)
    _write_json(folder / "sentence_bert_config.json",
                {"max_seq_length": max_model_length(model, tokenizer), "do_lower_case": False})
    _write_json(folder / "config_sentence_transformers.json", {"similarity_fn_name": "cosine"})
    return True


def save_checkpoint(path: Path, model, tokenizer, record: dict, trainer_state: dict | None = None) -> None:
    """Writes the model to a temporary folder beside ``path`` and renames it into place, so a
    crash leaves either the previous checkpoint or the new one, never a half-written model."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    for leftover in (tmp, old):
        if leftover.exists():
            shutil.rmtree(leftover)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    record = dict(record, sentence_transformers=write_sentence_transformers_files(tmp, model, tokenizer,
                                                                                    record["eval_pooler"]))
    _write_json(tmp / RECORD_FILE, record)
    if trainer_state is not None:
        torch.save(trainer_state, tmp / STATE_FILE)
    if path.exists():
        os.replace(path, old)  # a directory cannot be replaced in one rename: move the old one aside
    os.replace(tmp, path)
    if old.exists():
        shutil.rmtree(old)


def _append_jsonl(path: Path, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def _truncate_metrics(path: Path, last_step: int) -> None:
    """On resume, drops the records a crashed run wrote after its last checkpoint."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= last_step]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    os.replace(tmp, path)


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


def _load_training_model(model, tokenizer):
    from transformers import PreTrainedModel

    if isinstance(model, tuple) and len(model) == 2:
        model, tokenizer = model
    if not isinstance(model, (str, os.PathLike, PreTrainedModel)):
        raise TypeError(f"model must be a path, a Hub id, a PreTrainedModel or (model, tokenizer), "
                        f"got {type(model).__name__}")
    return load_model(model, tokenizer)


# --------------------------------------------------------------------------------------------
# Multi-process helpers (no-ops in one process)


def _world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) without torch.distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _torchrun_process_group(train_fn):
    """Under ``torchrun`` (WORLD_SIZE > 1 in the environment) with no process group yet, e.g.
    ``torchrun -m fastcse train``: joins the default group (gloo for CPU tensors, NCCL for CUDA
    where available) for the run and destroys it afterwards. A caller that initialized
    torch.distributed itself keeps its group."""

    @functools.wraps(train_fn)
    def wrapper(*args, **kwargs):
        created = False
        if dist.is_available() and not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1 \
                and "MASTER_ADDR" in os.environ:
            dist.init_process_group()
            created = True
        try:
            return train_fn(*args, **kwargs)
        finally:
            if created:
                dist.destroy_process_group()

    return wrapper


def _on_rank0(world: int, rank: int, fn, *args):
    """Runs ``fn`` on rank 0 only; the other ranks wait for it (a broadcast, i.e. a barrier) and
    get its return value. An exception on rank 0 is raised on every rank instead of leaving the
    others blocked in the next collective."""
    if world == 1:
        return fn(*args)
    box = [None, None]
    if rank == 0:
        try:
            box[0] = fn(*args)
        except BaseException as error:  # noqa: BLE001 - re-raised below, after telling the others
            box[1] = f"{type(error).__name__}: {error}"
            dist.broadcast_object_list(box, src=0)
            raise
    dist.broadcast_object_list(box, src=0)
    if box[1] is not None:
        raise RuntimeError(f"rank 0 failed: {box[1]}")
    return box[0]


def _broadcast_model(model) -> None:
    """Rank 0's weights and buffers on every rank (the ranks must start from the same model)."""
    with torch.no_grad():
        for tensor in list(model.parameters()) + list(model.buffers()):
            dist.broadcast(tensor.data, src=0)


def _all_reduce_grads(params) -> None:
    """Sums the parameter gradients over the ranks, in one flat buffer per dtype."""
    grads = [p.grad for p in params if p.grad is not None]
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for g in grads:
        by_dtype.setdefault(g.dtype, []).append(g)
    for group in by_dtype.values():
        flat = torch.cat([g.reshape(-1) for g in group])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for g in group:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()


# --------------------------------------------------------------------------------------------
# The data order and the tokenized batches


class BatchOrder:
    """Which examples each step trains on: a seeded permutation per epoch, cut into full batches
    (``datalib.batch_order``), computed once per epoch and not once per step."""

    def __init__(self, num_examples: int, batch_size: int, seed: int):
        self.num_examples, self.batch_size, self.seed = num_examples, batch_size, seed
        self.steps_per_epoch = num_examples // batch_size
        self._epoch, self._batches = None, None

    def __call__(self, step: int) -> tuple[int, list[int]]:
        """(epoch, the example indices of global batch ``step``)."""
        epoch, position = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            self._epoch = epoch
            self._batches = datalib.batch_order(self.num_examples, self.batch_size, seed=self.seed, epoch=epoch)
        return epoch, self._batches[position]


def step_texts(examples, ids: list[int], mode: str) -> tuple[list[str], int]:
    """(the texts to tokenize, how many sequences each stands for): unsupervised sentences are
    tokenized once and encoded twice (the two dropout views); supervised examples are flattened
    example-major (ex0 sent0, ex0 sent1, [ex0 hard_neg], ex1 sent0, ...)."""
    if mode == "unsup":
        return [examples[i] for i in ids], 2
    return [s for i in ids for s in examples[i]], 1


class TokenizedBatches:
    """Token ids of each step's sequences (this rank's rows, example-major, views included),
    tokenized one step ahead in a background thread so that the tokenizer never stalls a step.
    Only Python lists are made there: nothing that draws from torch's RNG."""

    def __init__(self, examples, mode: str, tokenizer, max_seq_length: int, order: BatchOrder,
                 shard: tuple[int, int], total_steps: int):
        from concurrent.futures import ThreadPoolExecutor

        self.examples, self.mode, self.tokenizer, self.max_seq_length = examples, mode, tokenizer, max_seq_length
        self.order, self.shard, self.total_steps = order, shard, total_steps
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fastcse-tokenize")
        self._ahead: dict[int, object] = {}

    def _tokenize(self, step: int) -> tuple[int, list[list[int]]]:
        epoch, ids = self.order(step)
        texts, repeat = step_texts(self.examples, ids[self.shard[0]:self.shard[1]], self.mode)
        tokens = encoding_lib.tokenize(self.tokenizer, texts, self.max_seq_length)
        return epoch, [seq for seq in tokens for _ in range(repeat)]

    def __call__(self, step: int) -> tuple[int, list[list[int]]]:
        pending = self._ahead.pop(step, None)
        result = pending.result() if pending is not None else self._tokenize(step)
        if step + 1 < self.total_steps:
            self._ahead[step + 1] = self._pool.submit(self._tokenize, step + 1)
        return result

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


# --------------------------------------------------------------------------------------------
# One step: encode (length-aware, cached or not), loss over the whole batch, backward


@dataclass
class ContrastiveStep:
    """Encodes a step's sequences in the units of :func:`fastcse.encoding.plan_step`, puts the
    embeddings back in batch order, computes ``info_nce`` over the whole batch and
    back-propagates into the parameters (gradient caching when the cache bounds cut the batch
    into several units)."""

    model: torch.nn.Module
    pooler: str
    encoding: str
    views: int
    temperature: float
    hard_negative_weight: float
    process_group: object
    autocast_dtype: torch.dtype | None
    device: torch.device
    mini_batch_sequences: int | None = None
    mini_batch_tokens: int | None = None

    def __post_init__(self):
        self.cuda_devices = cuda_devices_of(self.model)
        self.pad_id = getattr(self.model.config, "pad_token_id", None) or 0
        self.float_mask = getattr(self.model.config, "_attn_implementation", None) == "eager"

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

    def loss(self, plan: encoding_lib.StepPlan, unit_embeddings: torch.Tensor) -> torch.Tensor:
        emb = plan.to_batch_order(unit_embeddings)
        emb = emb.view(-1, self.views, emb.shape[-1])  # view 0 anchors, 1 positives, 2 hard negatives
        negative = emb[:, 2] if self.views == 3 else None
        return fastcse.info_nce(emb[:, 0], emb[:, 1], negative, temperature=self.temperature,
                                hard_negative_weight=self.hard_negative_weight, process_group=self.process_group)

    def __call__(self, ids: list[list[int]]) -> torch.Tensor:
        """Accumulates the parameter gradients of the step's loss; returns the detached loss."""
        plan = self.plan(ids)
        units = encoding_lib.build_units(ids, plan.units, self.encoding, self.pad_id, self.device,
                                         float_mask=self.float_mask)
        loss_fn = functools.partial(self.loss, plan)
        if len(units) > 1 and self.caching:
            return cached_step(self.encode, units, loss_fn, cuda_devices=self.cuda_devices)
        return uncached_step(self.encode, units, loss_fn)  # several units: each keeps its graph


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


@dataclass
class RunState:
    """What a resumed run continues: the step, the evaluation history and its best."""

    step: int = 0
    best_metric: float | None = None
    best_step: int | None = None
    history: list[dict] = field(default_factory=list)


class Evaluator:
    """STS evaluation on rank 0, keeping the best checkpoint and the metrics file."""

    def __init__(self, model, tokenizer, tasks, data_dir, eval_pooler, record, best_dir, metrics_path, world, rank):
        self.model, self.tokenizer, self.tasks, self.data_dir = model, tokenizer, tasks, data_dir
        self.eval_pooler, self.record, self.best_dir, self.metrics_path = eval_pooler, record, best_dir, metrics_path
        self.world, self.rank = world, rank

    def __call__(self, state: RunState) -> float:
        """Evaluates at ``state.step``; updates ``state`` on every rank; returns the metric."""
        best_metric, best_step, history, metric = _on_rank0(self.world, self.rank, self._evaluate, state)
        state.best_metric, state.best_step, state.history = best_metric, best_step, history
        return metric

    def _evaluate(self, state: RunState):
        t0 = time.perf_counter()
        scores = evaluate_loaded(self.model, self.tokenizer, self.tasks, data_dir=self.data_dir,
                                 pooler=self.eval_pooler)
        metric = scores.get("avg", next(iter(scores.values())))
        entry = {"step": state.step, "eval": scores, "metric": metric, "eval_seconds": time.perf_counter() - t0}
        history = state.history + [entry]
        _append_jsonl(self.metrics_path, entry)
        best_metric, best_step = state.best_metric, state.best_step
        if best_metric is None or metric > best_metric:
            best_metric, best_step = metric, state.step
            save_checkpoint(self.best_dir, self.model, self.tokenizer,
                            dict(self.record, step=state.step, metric=metric, eval=scores))
        logger.info("step %d: %s = %.2f (best %.2f at step %d)", state.step, "+".join(self.tasks), metric,
                    best_metric, best_step)
        return best_metric, best_step, history, metric


class Checkpointer:
    """``last/``: the model and everything :func:`train` needs to continue bit-identically (the
    optimizer, the schedule, the run state and every rank's dropout random streams)."""

    def __init__(self, model, tokenizer, optimizer, scheduler, run_config, record, last_dir, device, world, rank):
        self.model, self.tokenizer, self.optimizer, self.scheduler = model, tokenizer, optimizer, scheduler
        self.run_config, self.record, self.last_dir, self.device = run_config, record, last_dir, device
        self.world, self.rank = world, rank

    def save(self, state: RunState) -> None:
        rng_cpu = torch.get_rng_state()
        rng_cuda = torch.cuda.get_rng_state_all() if self.device.type == "cuda" else []
        rng_ranks = None
        if self.world > 1:  # every rank's dropout streams, so that a resumed run continues each of them
            rng_ranks = [None] * self.world
            dist.all_gather_object(rng_ranks, (rng_cpu, [s.cpu() for s in rng_cuda]))
        trainer_state = {"config": self.run_config, "step": state.step, "optimizer": self.optimizer.state_dict(),
                         "scheduler": self.scheduler.state_dict(), "best_metric": state.best_metric,
                         "best_step": state.best_step, "history": state.history, "rng_cpu": rng_cpu,
                         "rng_cuda": rng_cuda}
        if rng_ranks is not None:
            trainer_state["rng_cpu_ranks"] = [r[0] for r in rng_ranks]
            trainer_state["rng_cuda_ranks"] = [r[1] for r in rng_ranks]
        _on_rank0(self.world, self.rank, save_checkpoint, self.last_dir, self.model, self.tokenizer,
                  dict(self.record, step=state.step), trainer_state)

    def resume(self, folder: Path, metrics_path: Path, seed: int) -> RunState:
        """Loads ``folder``'s weights, optimizer, schedule and random streams; returns its state."""
        saved = torch.load(folder / STATE_FILE, weights_only=True)
        for key in ("mode", "batch_size", "seed", "num_examples"):
            if saved["config"][key] != self.run_config[key]:
                raise ValueError(f"resume_from was trained with {key}={saved['config'][key]!r}, this run has "
                                 f"{self.run_config[key]!r}: resuming must use the same data and settings")
        from safetensors.torch import load_file

        weights = load_file(str(folder / "model.safetensors"))
        missing, unexpected = self.model.load_state_dict(weights, strict=False)
        if unexpected or [k for k in missing if "position_ids" not in k]:
            raise ValueError(f"resume_from weights do not fit the model: missing {missing}, unexpected {unexpected}")
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        state = RunState(saved["step"], saved["best_metric"], saved["best_step"], saved["history"])
        self._restore_random_streams(saved, state.step, seed)
        if self.rank == 0:
            _truncate_metrics(metrics_path, state.step)
            logger.info("resumed from %s at step %d", folder, state.step)
        return state

    def _restore_random_streams(self, saved: dict, step: int, seed: int) -> None:
        saved_world = saved["config"].get("world_size", 1)
        if saved_world != self.world:  # another world size's streams do not map onto these ranks
            torch.manual_seed(seed + self.rank + 1_000_003 * step)
            if self.rank == 0:
                logger.warning("resume_from was trained on %d process(es), this run has %d: the weights and the "
                               "data order continue, the dropout random streams restart", saved_world, self.world)
            return
        torch.set_rng_state(saved["rng_cpu_ranks"][self.rank] if "rng_cpu_ranks" in saved else saved["rng_cpu"])
        rng_cuda = saved["rng_cuda_ranks"][self.rank] if "rng_cuda_ranks" in saved else saved.get("rng_cuda")
        if rng_cuda and self.device.type == "cuda":
            torch.cuda.set_rng_state_all(rng_cuda)


def _resume_folder(resume_from) -> Path | None:
    if resume_from is None:
        return None
    folder = Path(resume_from)
    if (folder / "last" / STATE_FILE).is_file():
        folder = folder / "last"
    if not (folder / STATE_FILE).is_file():
        raise FileNotFoundError(f"resume_from={str(folder)!r} holds no {STATE_FILE}: pass a 'last' "
                                "checkpoint folder or the output_dir of a run")
    return folder


def _check_mini_batch_tokens(mini_batch_tokens, tokenizer, examples, mode, max_seq_length) -> None:
    """Every sequence must fit one cached chunk. Tokenizes the data only when the budget is
    below ``max_seq_length`` (the longest any sequence can be after truncation)."""
    if mini_batch_tokens is None or mini_batch_tokens >= max_seq_length:
        return
    texts = examples if mode == "unsup" else [s for example in examples for s in example]
    longest = max(len(x) for x in encoding_lib.tokenize(tokenizer, texts, max_seq_length))
    if mini_batch_tokens < longest:
        raise ValueError(f"mini_batch_tokens ({mini_batch_tokens}) is smaller than the longest sequence of the data "
                         f"after truncation to max_seq_length={max_seq_length} ({longest} tokens): a cached chunk "
                         f"must hold at least one sequence; use mini_batch_tokens >= {longest}")


# --------------------------------------------------------------------------------------------
# The trainer


@_torchrun_process_group
def train(model, data, *, mode: str = "unsup", tokenizer=None, batch_size: int = 64,
          mini_batch_size: int | None = None, mini_batch_tokens: int | None = None, encoding: str = "auto",
          temperature: float = 0.05, pooler: str = "cls",
          mlp_only_train: bool | None = None, hard_negative_weight: float = 0.0,
          learning_rate: float | None = None, weight_decay: float = 0.0, warmup_steps: int = 0,
          max_grad_norm: float | None = 1.0, epochs: int | None = None, max_steps: int | None = None,
          max_seq_length: int = 32, eval_steps: int = 125, eval_data="STSBenchmark-dev", data_dir=None,
          output_dir="runs/fastcse", seed: int = 42, precision: str = "auto", device=None,
          resume_from=None, progress: bool = True, save_last: bool = True) -> TrainResult:
    """Trains a sentence encoder with SimCSE's contrastive objective (``fastcse.info_nce``).

    Args:
        model: a local model folder or Hub id (``AutoModel``/``AutoTokenizer``), a
            ``PreTrainedModel`` with ``tokenizer=``, or a ``(model, tokenizer)`` pair.
        data: ``mode="unsup"``: a text file (one sentence a line), a ``datasets.Dataset`` with a
            ``text`` column or a list of sentences; each sentence is encoded twice with dropout
            on and the two views are a positive pair. ``mode="sup"``: a ``sent0,sent1[,hard_neg]``
            CSV (SimCSE's NLI layout), a Dataset with those columns or a list of tuples.
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
        pooler: ``cls`` (with the MLP head while training), ``cls_before_pooler``, ``avg``,
            ``avg_first_last``, ``avg_top2``.
        mlp_only_train: with ``pooler="cls"``, use the MLP head while training only and evaluate
            / export the raw [CLS] vector. Default: True for unsup, False for sup (as SimCSE).
        learning_rate, epochs: default 3e-5 / 1 epoch (unsup), 5e-5 / 3 epochs (sup).
            ``max_steps`` overrides ``epochs``. AdamW, linear decay after ``warmup_steps``.
        max_seq_length: truncation length for training inputs (evaluation does not truncate
            below the model's maximum).
        eval_steps, eval_data: evaluate every ``eval_steps`` steps (and before the first and
            after the last) on ``eval_data``: a task name (default STS-B dev), a pair file, a list
            (their mean is the metric) or None for no evaluation. The best checkpoint is kept.
        data_dir: the folder holding ``SentEval/`` (default ``../shared/data``).
        output_dir: ``best/`` (best checkpoint), ``last/`` (latest checkpoint with optimizer
            state, for ``resume_from``) and ``metrics.jsonl``.
        precision: ``auto`` (bf16 autocast on CUDA when supported, else fp32), ``fp32``, ``bf16``.
        resume_from: a ``last/`` checkpoint (or the output_dir holding it) to continue from; the
            run then produces the same weights as an uninterrupted one.

    Multi-process (``torchrun --nproc_per_node=W -m fastcse train ...``, or any caller that has
    run ``torch.distributed.init_process_group``): needs the C++ extension ``fastcse._C``. Every
    rank must pass the same arguments; rank 0's initial weights are broadcast to all ranks, and
    the dropout generator is seeded with ``seed + rank`` (the ranks draw different masks, so with
    dropout on a W-rank run is a different, equally valid, random draw than a one-process run;
    with dropout off it equals the one-process run up to float roundoff). Only rank 0 evaluates,
    logs, shows the progress bar and writes metrics and checkpoints; the others wait. The
    returned result is the same on every rank. Each rank uses the device it is given (pass
    ``device=f"cuda:{local_rank}"`` on GPUs).
    """
    # ---- validate everything before touching the model or data
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    _positive_int("batch_size", batch_size, minimum=2)
    if mini_batch_size is not None:
        _positive_int("mini_batch_size", mini_batch_size)
        if mini_batch_size > batch_size:
            raise ValueError(f"mini_batch_size ({mini_batch_size}) must not exceed batch_size ({batch_size})")
    _positive_int("mini_batch_tokens", mini_batch_tokens, allow_none=True)
    encoding_lib.check_encoding(encoding)
    _positive_float("temperature", temperature)
    if isinstance(hard_negative_weight, bool) or not isinstance(hard_negative_weight, (int, float)) \
            or not math.isfinite(hard_negative_weight):
        raise ValueError(f"hard_negative_weight must be a finite float, got {hard_negative_weight!r}")
    if hard_negative_weight != 0.0 and mode == "unsup":
        raise ValueError("hard_negative_weight applies to supervised hard negatives; mode='unsup' has none")
    check_pooler(pooler)
    if mlp_only_train is None:
        mlp_only_train = mode == "unsup" and pooler == "cls"
    if mlp_only_train and pooler != "cls":
        raise ValueError(f"mlp_only_train applies to pooler='cls' only, got pooler={pooler!r}")
    learning_rate = DEFAULT_LR[mode] if learning_rate is None else _positive_float("learning_rate", learning_rate)
    _positive_float("weight_decay", weight_decay, allow_zero=True)
    _positive_int("warmup_steps", warmup_steps, minimum=0)
    if max_grad_norm is not None:
        _positive_float("max_grad_norm", max_grad_norm)
    epochs = DEFAULT_EPOCHS[mode] if epochs is None else _positive_int("epochs", epochs)
    _positive_int("max_steps", max_steps, allow_none=True)
    _positive_int("max_seq_length", max_seq_length, minimum=2)
    _positive_int("eval_steps", eval_steps)
    eval_tasks = _eval_tasks(eval_data)
    if eval_tasks and any(t in SENTEVAL_TASKS + DEV_TASKS for t in eval_tasks):
        from fastcse.evaluation import _senteval_root

        _senteval_root(data_dir)  # a missing SentEval folder fails now, not after the first eval_steps
    _positive_int("seed", seed, minimum=0)
    resume_folder = _resume_folder(resume_from)
    rank, world = _world()
    if world > 1:
        if batch_size < world:
            raise ValueError(f"batch_size ({batch_size}) is the global batch, split over {world} ranks: it must be "
                             f"at least the world size")
        from fastcse.distributed import _load_extension

        _load_extension()  # a missing extension fails now, on every rank, not at the first step
    shard = (rank * batch_size // world, (rank + 1) * batch_size // world)
    is_main = rank == 0

    examples = datalib.load_unsup(data) if mode == "unsup" else datalib.load_sup(data)
    if len(examples) < batch_size:
        raise ValueError(f"the dataset has {len(examples)} examples, fewer than batch_size={batch_size}: "
                         "one contrastive batch needs batch_size examples")
    views = 2 if mode == "unsup" else len(examples[0])

    # ---- the model
    model, tokenizer = _load_training_model(model, tokenizer)
    if device is not None:
        model.to(device)
    device = next(model.parameters()).device
    autocast_dtype = resolve_precision(precision, device)
    if pooler == "cls" and not has_mlp_head(model):
        raise ValueError(f"pooler='cls' trains SimCSE's MLP head, which is the encoder's pooling layer, and "
                         f"{type(model).__name__} has none: use pooler='cls_before_pooler' or 'avg'")
    encoding = encoding_lib.resolve_encoding(encoding, model)
    _check_mini_batch_tokens(mini_batch_tokens, tokenizer, examples, mode, max_seq_length)
    if world > 1:
        _broadcast_model(model)
    if mode == "unsup" and is_main and getattr(model.config, "hidden_dropout_prob", 0.1) == 0:
        logger.warning("unsupervised SimCSE uses dropout as its augmentation, but the model's dropout is 0")
    eval_pooler = "cls_before_pooler" if (pooler == "cls" and mlp_only_train) else pooler

    # ---- the run's pieces
    order = BatchOrder(len(examples), batch_size, seed)
    total_steps = max_steps if max_steps is not None else epochs * order.steps_per_epoch
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    metrics_path = output_dir / METRICS_FILE
    best_dir, last_dir = output_dir / "best", output_dir / "last"
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer, scheduler = make_optimizer(params, learning_rate, weight_decay, warmup_steps, total_steps)
    run_config = {"mode": mode, "batch_size": batch_size, "seed": seed, "num_examples": len(examples),
                  "total_steps": total_steps, "world_size": world}
    record = {"mode": mode, "pooler": pooler, "mlp_only_train": mlp_only_train, "eval_pooler": eval_pooler,
              "temperature": temperature, "batch_size": batch_size, "max_seq_length": max_seq_length,
              "fastcse_version": fastcse.__version__}
    checkpointer = Checkpointer(model, tokenizer, optimizer, scheduler, run_config, record, last_dir, device,
                                world, rank)
    evaluator = Evaluator(model, tokenizer, eval_tasks, data_dir, eval_pooler, record, best_dir, metrics_path,
                          world, rank) if eval_tasks else None
    contrastive_step = ContrastiveStep(
        model, pooler, encoding, views, float(temperature), float(hard_negative_weight),
        dist.group.WORLD if world > 1 else None, autocast_dtype, device,
        mini_batch_sequences=mini_batch_size * views if mini_batch_size else None,
        mini_batch_tokens=mini_batch_tokens)

    torch.manual_seed(seed + rank)  # dropout masks: a different stream per rank
    if resume_folder is not None:
        state = checkpointer.resume(resume_folder, metrics_path, seed)
    else:
        state = RunState()
        if is_main and metrics_path.exists():
            metrics_path.unlink()  # a fresh run in a reused output_dir starts a fresh metrics file
    if world > 1:
        dist.barrier()
    if is_main:
        logger.info("training %s SimCSE: %d examples, batch %d%s%s, %d steps, lr %g, pooler %s, %s encoding, "
                    "precision %s", mode, len(examples), batch_size,
                    f" over {world} processes ({batch_size // world}{'+' if batch_size % world else ''} each)"
                    if world > 1 else "",
                    f" (gradient caching: mini-batch {mini_batch_size or '-'}, {mini_batch_tokens or '-'} tokens)"
                    if contrastive_step.caching else "", total_steps, learning_rate, pooler, encoding,
                    "bf16" if autocast_dtype else "fp32")

    batches = TokenizedBatches(examples, mode, tokenizer, max_seq_length, order, shard, total_steps)
    try:
        throughput = _train_loop(model, params, optimizer, scheduler, contrastive_step, batches, state,
                                 total_steps=total_steps, max_grad_norm=max_grad_norm, eval_steps=eval_steps,
                                 evaluator=evaluator, checkpointer=checkpointer if save_last else None,
                                 metrics_path=metrics_path if is_main else None,
                                 sentences_per_step=batch_size * views, world=world,
                                 progress=progress and is_main, precision_hint=autocast_dtype is not None)
    finally:
        batches.close()

    if eval_tasks:
        model_path = best_dir
    else:
        model_path = last_dir
        if not save_last:  # no evaluation and no resumable checkpoint: still save the model
            _on_rank0(world, rank, save_checkpoint, last_dir, model, tokenizer, dict(record, step=state.step))
    train_seconds, sentences_seen = throughput
    return TrainResult(steps=state.step, model_path=str(model_path), output_dir=str(output_dir),
                       metrics_path=str(metrics_path), best_metric=state.best_metric, best_step=state.best_step,
                       history=state.history, train_seconds=train_seconds,
                       sentences_per_second=sentences_seen / train_seconds if train_seconds else None)


def _train_loop(model, params, optimizer, scheduler, contrastive_step: ContrastiveStep, batches: TokenizedBatches,
                state: RunState, *, total_steps: int, max_grad_norm, eval_steps: int, evaluator, checkpointer,
                metrics_path, sentences_per_step: int, world: int, progress: bool,
                precision_hint: bool) -> tuple[float, int]:
    """Steps ``state`` to ``total_steps``: each step's loss and update, evaluation and ``last/``
    every ``eval_steps`` (and at the end). Returns (training seconds, sentences encoded)."""
    from tqdm.auto import tqdm

    model.train()
    if state.step == 0 and evaluator is not None:
        evaluator(state)
    last_score = state.history[-1]["metric"] if state.history else None
    bar = tqdm(total=total_steps, initial=state.step, disable=not progress, unit="step", dynamic_ncols=True)
    train_seconds, sentences_seen = 0.0, 0
    try:
        while state.step < total_steps:
            t0 = time.perf_counter()
            epoch, ids = batches(state.step)
            loss = contrastive_step(ids)
            loss_value = float(loss)
            if not math.isfinite(loss_value):  # before the update: the model in memory stays finite
                optimizer.zero_grad(set_to_none=True)
                hint = "lower the learning rate" + (" or use precision='fp32'" if precision_hint else "")
                raise FloatingPointError(f"loss became {loss_value} at step {state.step + 1}: {hint}")
            if world > 1:
                _all_reduce_grads(params)  # SUM: each rank holds its rows' share of the full gradient
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_grad_norm)) if max_grad_norm else None
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            state.step += 1
            seconds = time.perf_counter() - t0
            train_seconds += seconds
            sentences_seen += sentences_per_step
            if metrics_path is not None:
                _append_jsonl(metrics_path, {"step": state.step, "epoch": epoch, "loss": loss_value, "lr": lr,
                                             "grad_norm": grad_norm,
                                             "sentences_per_second": sentences_per_step / seconds})
            boundary = state.step % eval_steps == 0 or state.step == total_steps
            if evaluator is not None and boundary:
                last_score = evaluator(state)
            if checkpointer is not None and boundary:
                checkpointer.save(state)
            postfix = {"loss": f"{loss_value:.4f}", "sent/s": f"{sentences_seen / train_seconds:.0f}"}
            if last_score is not None:
                postfix["dev"] = f"{last_score:.2f}"
            bar.set_postfix(postfix, refresh=False)
            bar.update(1)
    finally:
        bar.close()
    return train_seconds, sentences_seen
