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
from fastcse.evaluation import DEV_TASKS, SENTEVAL_TASKS, evaluate_loaded, load_model, max_model_length
from fastcse.gradcache import cached_step, cuda_devices_of, split_chunks, uncached_step
from fastcse.pooling import check_pooler, has_mlp_head, pool

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
# The trainer


@_torchrun_process_group
def train(model, data, *, mode: str = "unsup", tokenizer=None, batch_size: int = 64,
          mini_batch_size: int | None = None, temperature: float = 0.05, pooler: str = "cls",
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
        mini_batch_size: encode the batch in chunks of this size with gradient caching (same
            gradients, activations of one chunk at a time). Under ``torchrun``, the chunk size of
            each rank's share.
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
    if resume_from is not None:
        resume_from = Path(resume_from)
        if (resume_from / "last" / STATE_FILE).is_file():
            resume_from = resume_from / "last"
        if not (resume_from / STATE_FILE).is_file():
            raise FileNotFoundError(f"resume_from={str(resume_from)!r} holds no {STATE_FILE}: pass a 'last' "
                                    "checkpoint folder or the output_dir of a run")
    rank, world = _world()
    if world > 1:
        if batch_size < world:
            raise ValueError(f"batch_size ({batch_size}) is the global batch, split over {world} ranks: it must be "
                             f"at least the world size")
        from fastcse.distributed import _load_extension

        _load_extension()  # a missing extension fails now, on every rank, not at the first step
    shard_lo, shard_hi = rank * batch_size // world, (rank + 1) * batch_size // world
    is_main = rank == 0

    examples = datalib.load_unsup(data) if mode == "unsup" else datalib.load_sup(data)
    if len(examples) < batch_size:
        raise ValueError(f"the dataset has {len(examples)} examples, fewer than batch_size={batch_size}: "
                         "one contrastive batch needs batch_size examples")
    views = 2 if mode == "unsup" else len(examples[0])

    model, tokenizer = _load_training_model(model, tokenizer)
    if device is not None:
        model.to(device)
    device = next(model.parameters()).device
    autocast_dtype = resolve_precision(precision, device)
    if pooler == "cls" and not has_mlp_head(model):
        raise ValueError(f"pooler='cls' trains SimCSE's MLP head, which is the encoder's pooling layer, and "
                         f"{type(model).__name__} has none: use pooler='cls_before_pooler' or 'avg'")
    if world > 1:
        _broadcast_model(model)
    if mode == "unsup" and is_main and getattr(model.config, "hidden_dropout_prob", 0.1) == 0:
        logger.warning("unsupervised SimCSE uses dropout as its augmentation, but the model's dropout is 0")
    eval_pooler = "cls_before_pooler" if (pooler == "cls" and mlp_only_train) else pooler

    steps_per_epoch = len(examples) // batch_size
    total_steps = max_steps if max_steps is not None else epochs * steps_per_epoch
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    metrics_path = output_dir / METRICS_FILE
    best_dir, last_dir = output_dir / "best", output_dir / "last"

    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=learning_rate)

    def lr_factor(step):  # linear warmup, then linear decay to 0 at total_steps (as transformers')
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    run_config = {"mode": mode, "batch_size": batch_size, "seed": seed, "num_examples": len(examples),
                  "total_steps": total_steps, "world_size": world}
    record = {"mode": mode, "pooler": pooler, "mlp_only_train": mlp_only_train, "eval_pooler": eval_pooler,
              "temperature": temperature, "batch_size": batch_size, "max_seq_length": max_seq_length,
              "fastcse_version": fastcse.__version__}

    save_last_enabled = save_last
    step, best_metric, best_step, history = 0, None, None, []
    torch.manual_seed(seed + rank)  # dropout masks: a different stream per rank
    if resume_from is not None:
        state = torch.load(resume_from / STATE_FILE, weights_only=True)
        for key in ("mode", "batch_size", "seed", "num_examples"):
            if state["config"][key] != run_config[key]:
                raise ValueError(f"resume_from was trained with {key}={state['config'][key]!r}, this run has "
                                 f"{run_config[key]!r}: resuming must use the same data and settings")
        from safetensors.torch import load_file

        weights = load_file(str(resume_from / "model.safetensors"))
        missing, unexpected = model.load_state_dict(weights, strict=False)
        if unexpected or [k for k in missing if "position_ids" not in k]:
            raise ValueError(f"resume_from weights do not fit the model: missing {missing}, unexpected {unexpected}")
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step, best_metric, best_step, history = state["step"], state["best_metric"], state["best_step"], \
            state["history"]
        saved_world = state["config"].get("world_size", 1)
        if saved_world == world:
            rng_cpu = state["rng_cpu_ranks"][rank] if "rng_cpu_ranks" in state else state["rng_cpu"]
            torch.set_rng_state(rng_cpu)
            rng_cuda = state["rng_cuda_ranks"][rank] if "rng_cuda_ranks" in state else state.get("rng_cuda")
            if rng_cuda and device.type == "cuda":
                torch.cuda.set_rng_state_all(rng_cuda)
        else:  # the dropout streams of another world size do not map onto these ranks: a fresh draw
            torch.manual_seed(seed + rank + 1_000_003 * step)
            if is_main:
                logger.warning("resume_from was trained on %d process(es), this run has %d: the weights and the "
                               "data order continue, the dropout random streams restart", saved_world, world)
        if is_main:
            _truncate_metrics(metrics_path, step)
            logger.info("resumed from %s at step %d", resume_from, step)
    elif is_main and metrics_path.exists():
        metrics_path.unlink()  # a fresh run in a reused output_dir starts a fresh metrics file
    if world > 1:
        dist.barrier()

    if is_main:
        logger.info("training %s SimCSE: %d examples, batch %d%s%s, %d steps, lr %g, pooler %s, precision %s",
                    mode, len(examples), batch_size, f" over {world} processes ({batch_size // world}"
                    f"{'+' if batch_size % world else ''} each)" if world > 1 else "",
                    f" (mini-batch {mini_batch_size}, gradient caching)"
                    if mini_batch_size and mini_batch_size < shard_hi - shard_lo else "", total_steps,
                    learning_rate, pooler, "bf16" if autocast_dtype else "fp32")

    def evaluate_now():
        scores = evaluate_loaded(model, tokenizer, eval_tasks, data_dir=data_dir, pooler=eval_pooler)
        return scores, scores.get("avg", next(iter(scores.values())))

    def write_last():
        if not save_last_enabled:
            return
        rng_cpu = torch.get_rng_state()
        rng_cuda = torch.cuda.get_rng_state_all() if device.type == "cuda" else []
        rng_ranks = None
        if world > 1:  # every rank's dropout streams, so that a resumed run continues each of them
            rng_ranks = [None] * world
            dist.all_gather_object(rng_ranks, (rng_cpu, [s.cpu() for s in rng_cuda]))

        def save():
            trainer_state = {
                "config": run_config, "step": step, "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "best_metric": best_metric, "best_step": best_step,
                "history": history, "rng_cpu": rng_cpu, "rng_cuda": rng_cuda}
            if rng_ranks is not None:
                trainer_state["rng_cpu_ranks"] = [r[0] for r in rng_ranks]
                trainer_state["rng_cuda_ranks"] = [r[1] for r in rng_ranks]
            save_checkpoint(last_dir, model, tokenizer, dict(record, step=step), trainer_state)

        _on_rank0(world, rank, save)

    def record_eval():
        nonlocal best_metric, best_step, history
        best_metric, best_step, history, metric = _on_rank0(world, rank, _record_eval_main)
        return metric

    def _record_eval_main():
        nonlocal best_metric, best_step
        t0 = time.perf_counter()
        scores, metric = evaluate_now()
        entry = {"step": step, "eval": scores, "metric": metric, "eval_seconds": time.perf_counter() - t0}
        history.append(entry)
        _append_jsonl(metrics_path, entry)
        if best_metric is None or metric > best_metric:
            best_metric, best_step = metric, step
            save_checkpoint(best_dir, model, tokenizer, dict(record, step=step, metric=metric, eval=scores))
        logger.info("step %d: %s = %.2f (best %.2f at step %d)", step, "+".join(eval_tasks), metric,
                    best_metric, best_step)
        return best_metric, best_step, history, metric

    cuda_devices = cuda_devices_of(model)
    temperature = float(temperature)
    process_group = dist.group.WORLD if world > 1 else None

    def encode(inputs):
        ctx = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
        with ctx:
            emb = pool(model, inputs, pooler, use_mlp=True)
        return emb.view(-1, views, emb.shape[-1])

    def loss_fn(emb):  # emb: [B, views, d]; view 0 anchors, view 1 positives, view 2 hard negatives
        negative = emb[:, 2] if views == 3 else None
        return fastcse.info_nce(emb[:, 0], emb[:, 1], negative, temperature=temperature,
                                hard_negative_weight=float(hard_negative_weight), process_group=process_group)

    def tokenize(chunk):
        if mode == "unsup":  # tokenize once, duplicate rows: the two dropout views of each sentence
            inputs = tokenizer(list(chunk), padding=True, truncation=True, max_length=max_seq_length,
                               return_tensors="pt")
            inputs = {k: v.repeat_interleave(2, dim=0) for k, v in inputs.items()}
        else:  # example-major: ex0 sent0, ex0 sent1, [ex0 hard_neg], ex1 sent0, ...
            flat = [s for example in chunk for s in example]
            inputs = dict(tokenizer(flat, padding=True, truncation=True, max_length=max_seq_length,
                                    return_tensors="pt"))
        return {k: v.to(device) for k, v in inputs.items()}

    from tqdm.auto import tqdm

    model.train()
    if step == 0 and eval_tasks:
        record_eval()
    last_score = history[-1]["metric"] if history else None
    bar = tqdm(total=total_steps, initial=step, disable=not (progress and is_main), unit="step", dynamic_ncols=True)
    train_seconds, sentences_seen = 0.0, 0
    try:
        while step < total_steps:
            epoch, position = divmod(step, steps_per_epoch)
            batch_ids = datalib.batch_order(len(examples), batch_size, seed=seed, epoch=epoch)[position]
            batch_ids = batch_ids[shard_lo:shard_hi]  # this rank's rows of the global batch
            t0 = time.perf_counter()
            chunks = [tokenize(c) for c in split_chunks([examples[i] for i in batch_ids], mini_batch_size)]
            if len(chunks) > 1:
                loss = cached_step(encode, chunks, loss_fn, cuda_devices=cuda_devices)
            else:
                loss = uncached_step(encode, chunks, loss_fn)
            if world > 1:
                _all_reduce_grads(params)  # SUM: each rank holds its rows' share of the full gradient
            grad_norm = None
            if max_grad_norm is not None:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_grad_norm))
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            seconds = time.perf_counter() - t0
            train_seconds += seconds
            sentences_seen += batch_size * views
            loss_value = float(loss)
            if not math.isfinite(loss_value):
                raise FloatingPointError(f"loss became {loss_value} at step {step}: lower the learning rate "
                                         "or use precision='fp32'")
            if is_main:
                _append_jsonl(metrics_path, {"step": step, "epoch": epoch, "loss": loss_value, "lr": lr,
                                             "grad_norm": grad_norm,
                                             "sentences_per_second": batch_size * views / seconds})
            if eval_tasks and (step % eval_steps == 0 or step == total_steps):
                last_score = record_eval()
            if step % eval_steps == 0 or step == total_steps:
                write_last()
            postfix = {"loss": f"{loss_value:.4f}", "sent/s": f"{sentences_seen / train_seconds:.0f}"}
            if last_score is not None:
                postfix["dev"] = f"{last_score:.2f}"
            bar.set_postfix(postfix, refresh=False)
            bar.update(1)
    finally:
        bar.close()

    if eval_tasks:
        model_path = best_dir
    else:
        model_path = last_dir
        if not save_last_enabled:  # no evaluation and no resumable checkpoint: still save the model
            _on_rank0(world, rank, save_checkpoint, last_dir, model, tokenizer, dict(record, step=step))
    return TrainResult(steps=step, model_path=str(model_path), output_dir=str(output_dir),
                       metrics_path=str(metrics_path), best_metric=best_metric, best_step=best_step,
                       history=history, train_seconds=train_seconds,
                       sentences_per_second=sentences_seen / train_seconds if train_seconds else None)
