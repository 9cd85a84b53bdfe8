"""``fastcse.train``: unsupervised and supervised SimCSE over Hugging Face encoders.

A thin trainer: AdamW with linear decay, the fused ``fastcse.info_nce`` loss (a batch's duplicate
texts masked out of each other's negatives, an optional queue of recent positives as extra
negatives, integer labels as several positives), optional gradient caching
(``mini_batch_size``), STS-B dev evaluation every ``eval_steps`` keeping the best checkpoint,
atomic checkpoints, ``resume_from``, a tqdm bar and a JSON-lines metrics file.
Defaults follow the SimCSE paper.

Multi-process training (``torchrun``, any ``torch.distributed`` backend; tested on CPU with gloo):
when the default process group is initialized with more than one rank, every global batch of
``batch_size`` examples is split over the ranks in rank order (rank r takes rows
[r*B//W, (r+1)*B//W)), the loss uses the distributed negatives
(``info_nce(..., process_group=WORLD)``: every rank scores its rows against all ranks'
candidates) and the parameter gradients are all-reduced with SUM (each rank holds its own rows'
share of the single-process gradient), so a step equals the single-process step on the whole
global batch. Only rank 0 evaluates, logs and writes metrics and checkpoints.

The output folder: ``best`` and ``last`` are relative symlinks to versioned checkpoint folders
beside them (``last -> last.250``), so that a new checkpoint replaces the previous one in one
atomic rename (a folder cannot be renamed over a non-empty folder; a link can be). While a run
writes to the folder it holds ``.fastcse.lock`` (pid and host): a second run is refused.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import itertools
import json
import logging
import math
import os
import shutil
import socket
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
import torch.distributed as dist

import fastcse
from fastcse import data as datalib
from fastcse import encoding as encoding_lib
from fastcse.distributed import gather_variable
from fastcse.evaluation import DEV_TASKS, SENTEVAL_TASKS, evaluate_loaded, load_model, load_task, max_model_length
from fastcse.gradcache import cached_step, cuda_devices_of, uncached_step
from fastcse.pooling import check_pooler, has_mlp_head

logger = logging.getLogger("fastcse.train")

MODES = ("unsup", "sup")
PRECISIONS = ("auto", "fp32", "bf16")
MLP_INITS = ("fresh", "pretrained")
STATE_FILE = "trainer_state.pt"
RECORD_FILE = "fastcse.json"
METRICS_FILE = "metrics.jsonl"
LOCK_FILE = ".fastcse.lock"
CHECKPOINT_NAMES = ("last", "best")
# SimCSE's defaults (paper, appendix A): lr 3e-5 unsup / 5e-5 sup, 1 / 3 epochs.
DEFAULT_LR = {"unsup": 3e-5, "sup": 5e-5}
DEFAULT_EPOCHS = {"unsup": 1, "sup": 3}
# The settings a resumed run must share with its checkpoint (unless ``resume_override`` names
# them): each changes what the run computes (the data and its order, the schedule, the loss, the
# numerics, the metric that picks the best checkpoint). ``total_steps`` covers max_steps and
# epochs. Not compared, because they change only the memory layout or the bookkeeping:
# mini_batch_size / mini_batch_tokens / encoding (same loss and gradients up to roundoff), the
# device, the world size, eval_steps, mlp_init (the checkpoint's weights win).
RESUME_SETTINGS = ("mode", "data", "num_examples", "batch_size", "seed", "total_steps", "learning_rate",
                   "weight_decay", "warmup_steps", "max_grad_norm", "temperature", "hard_negative_weight", "pooler",
                   "mlp_only_train", "max_seq_length", "precision", "eval_data", "mask_duplicates",
                   "negative_queue_size")
# What a checkpoint saved before a setting existed ran with: compared as such, so that resuming a
# run of an earlier fastcse (which never masked duplicates) with mask_duplicates=True is refused
# like any other change of the loss, rather than passing unnoticed.
EARLIER_SETTINGS = {"mask_duplicates": False, "negative_queue_size": 0}


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


def _eval_tasks(eval_data, data_dir) -> list[str]:
    """The evaluation tasks, each loaded once here with fastcse.evaluation's loaders: a missing,
    empty or malformed file fails before the output folder is touched, not at the first
    evaluation (by then a reused folder's previous metrics were gone)."""
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
    for task in out:
        load_task(task, data_dir)
    return out


def _check_output_dir(output_dir) -> Path:
    """``output_dir`` as a Path: an existing folder or one that can be made (no file on the way)."""
    if not isinstance(output_dir, (str, os.PathLike)):
        raise TypeError(f"output_dir must be a folder path (str or os.PathLike), got {output_dir!r}")
    if not str(output_dir).strip():
        raise ValueError("output_dir must name a folder, got an empty string")
    path = Path(output_dir)
    for folder in (path, *path.parents):
        if folder.is_dir():
            break
        if folder.exists() or folder.is_symlink():
            where = "is" if folder == path else f"lies under {str(folder)!r}, which is"
            raise NotADirectoryError(f"output_dir={str(path)!r} {where} a file, not a folder")
    return path


def _check_resume_override(resume_override) -> bool | frozenset:
    """True (every setting may differ from the checkpoint's) or the names of those that may."""
    if isinstance(resume_override, bool):
        return resume_override or frozenset()
    names = [resume_override] if isinstance(resume_override, str) else resume_override
    try:
        names = [str(name) for name in names]
    except TypeError:
        raise TypeError(f"resume_override must be a bool or a list of setting names, got {resume_override!r}") \
            from None
    unknown = [name for name in names if name not in RESUME_SETTINGS]
    if unknown:
        raise ValueError(f"resume_override names {unknown}, which are not settings compared on resume: "
                         f"{list(RESUME_SETTINGS)}")
    return frozenset(names)


def rank_device(device, world: int, local_rank: int | None, cuda_available: bool) -> torch.device | None:
    """The device this rank trains on (None: where the model already is). Under torchrun with
    CUDA, ``device=None`` or a plain ``"cuda"`` means the rank's own GPU, ``cuda:{LOCAL_RANK}``:
    otherwise every rank puts its model and NCCL's communicator on the current device, GPU 0."""
    if world > 1 and cuda_available and local_rank is not None:
        if device is None or (torch.device(device).type == "cuda" and torch.device(device).index is None):
            return torch.device("cuda", local_rank)
    return None if device is None else torch.device(device)


def _local_rank(rank: int) -> int:
    """torchrun's LOCAL_RANK; for a group started without it (mp.spawn), the rank modulo the GPUs."""
    if "LOCAL_RANK" in os.environ:
        return int(os.environ["LOCAL_RANK"])
    return rank % max(1, torch.cuda.device_count())


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


def _write_text_atomically(path: Path, text: str) -> None:
    """A reader (or a crash) sees the old file or the new one, never a half-written one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _write_json(path: Path, obj) -> None:
    _write_text_atomically(path, json.dumps(obj, indent=2) + "\n")


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


# --------------------------------------------------------------------------------------------
# Checkpoint folders: versions behind a link
#
# ``output_dir/last`` is a relative symlink to a version folder ``last.<step>`` beside it. Every
# version folder is complete: it appears only by the rename of a finished, fsynced temporary
# folder (``.last.tmp-<pid>``) and disappears only by a rename to a trash name
# (``.last.trash-<pid>-<n>``) before it is removed. The link is switched by renaming a new link
# over it, one atomic step; a crash at any moment leaves a loadable ``last`` (or a newer complete
# version that the link has not reached yet, which resume takes), plus leftovers that the next
# run cleans.

_TRASH_IDS = itertools.count()


def _fsync_file(path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(folder) -> None:
    """Makes a rename or a new entry in ``folder`` durable (the entry lives in the folder's data)."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # folders cannot be opened on some platforms (Windows): nothing to sync there
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on a folder (EINVAL); their renames are durable anyway
        pass
    finally:
        os.close(fd)


def _fsync_tree(folder: Path) -> None:
    """Every file, then every folder (deepest first) under ``folder``, on disk before its rename
    publishes it: else a power cut after the rename can leave a published folder of empty files."""
    for root, _, files in os.walk(folder, topdown=False):
        for name in files:
            _fsync_file(os.path.join(root, name))
        _fsync_dir(root)


def _version_key(entry: Path, name: str):
    """(step, n) for a version folder name ``<name>.<step>`` or ``<name>.<step>-<n>``, else None."""
    if not entry.name.startswith(name + "."):
        return None
    step, dash, n = entry.name[len(name) + 1:].partition("-")
    if not (step.isascii() and step.isdigit()) or (dash and not (n.isascii() and n.isdigit())):
        return None
    return int(step), int(n) if dash else 0


def _versions(path: Path) -> list[Path]:
    """The version folders of checkpoint ``path`` (``last.3``, ``last.3-1``, ...), oldest first."""
    if not path.parent.is_dir():
        return []
    found = [(key, entry) for entry in path.parent.iterdir()
             if (key := _version_key(entry, path.name)) is not None and entry.is_dir() and not entry.is_symlink()]
    return [entry for _, entry in sorted(found)]


def _target(path: Path) -> Path | None:
    """The folder checkpoint ``path`` stands for: the version its link points to, or ``path``
    itself when it is a real folder (the layout before the links). None if none (or dangling)."""
    if path.is_symlink():
        target = path.parent / os.readlink(path)
        return target if target.is_dir() else None
    return path if path.is_dir() else None


def _newest(path: Path, required: str = RECORD_FILE) -> Path | None:
    """The newest complete checkpoint of ``path`` holding ``required``: its newest version,
    whatever the link shows (a crash between a version's rename and the link's switch leaves
    the link one behind), else the folder the link or the old layout shows."""
    versions = [v for v in _versions(path) if (v / required).is_file()]
    if versions:
        return versions[-1]
    target = _target(path)
    return target if target is not None and (target / required).is_file() else None


def _leftovers(folder: Path, name: str) -> list[Path]:
    """What killed processes left of checkpoint ``name``: temporary folders and links, trash."""
    if not folder.is_dir():
        return []
    prefixes = tuple(f".{name}.{kind}-" for kind in ("tmp", "link", "trash"))
    return [entry for entry in folder.iterdir() if entry.name.startswith(prefixes)]


def _remove(entry: Path) -> None:
    if entry.is_dir() and not entry.is_symlink():
        shutil.rmtree(entry)
    else:
        entry.unlink(missing_ok=True)


def _trash_path(folder: Path, name: str) -> Path:
    while True:
        trash = folder / f".{name}.trash-{os.getpid()}-{next(_TRASH_IDS)}"
        if not (trash.exists() or trash.is_symlink()):
            return trash


def _trash(entry: Path, name: str) -> None:
    """Deletes a checkpoint folder of ``name``: renamed to a trash name first (one atomic step
    after which it is no longer a version), then removed. A crash in between leaves trash."""
    trash = _trash_path(entry.parent, name)
    os.rename(entry, trash)
    shutil.rmtree(trash)


def _free_version(path: Path, step: int) -> Path:
    version = path.with_name(f"{path.name}.{step}")
    n = 0
    while version.exists() or version.is_symlink():  # e.g. a second save at the same step
        n += 1
        version = path.with_name(f"{path.name}.{step}-{n}")
    return version


def _point(path: Path, version: Path) -> None:
    """Makes ``path`` a link to ``version`` (a folder beside it) in one atomic rename. A real
    folder there (the layout before the links) is moved to the trash first, once; the window
    without ``path`` it opens is covered by ``version`` being complete already."""
    legacy = None
    if path.is_dir() and not path.is_symlink():
        legacy = _trash_path(path.parent, path.name)
        os.rename(path, legacy)
    link = path.with_name(f".{path.name}.link-{os.getpid()}")
    _remove(link)
    os.symlink(version.name, link)  # relative: the run folder can be moved or copied
    os.replace(link, path)
    _fsync_dir(path.parent)
    if legacy is not None:
        shutil.rmtree(legacy)


def _publish(path: Path, step: int, fill) -> Path:
    """Writes a new checkpoint with ``fill(folder)`` and switches ``path`` to it: fill
    ``.<name>.tmp-<pid>`` and fsync it, rename it to the version ``<name>.<step>`` and fsync the
    parent, switch the link, then trash the other versions. Returns the version folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    _remove(tmp)  # this process's own earlier attempt that failed
    tmp.mkdir()
    fill(tmp)
    _fsync_tree(tmp)
    version = _free_version(path, step)
    os.rename(tmp, version)
    _fsync_dir(path.parent)
    _point(path, version)
    for old in _versions(path):
        if old != version:
            _trash(old, path.name)
    return version


def save_checkpoint(path: Path, model, tokenizer, record: dict, trainer_state: dict | None = None) -> Path:
    """Saves a checkpoint and points ``path`` (e.g. ``output_dir/last``) to it atomically, so
    that a crash at any moment leaves either the previous checkpoint or the new one, never a
    half-written model or none. ``AutoModel.from_pretrained(path)`` follows the link. Returns
    the version folder (``path.<step>``)."""
    path = Path(path)

    def fill(folder: Path) -> None:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        st = write_sentence_transformers_files(folder, model, tokenizer, record["eval_pooler"])
        _write_json(folder / RECORD_FILE, dict(record, sentence_transformers=st))
        if trainer_state is not None:
            torch.save(trainer_state, folder / STATE_FILE)

    return _publish(path, int(record.get("step") or 0), fill)


# --------------------------------------------------------------------------------------------
# The output folder at the start of a run (rank 0, under the lock: no other process writes here)


def _run_dir_of(checkpoint: Path) -> Path:
    """The run folder a checkpoint belongs to (``run/last`` and ``run/last.4`` are in ``run``)."""
    return checkpoint.resolve().parent


def _recover_checkpoints(run_dir: Path, keep: Path | None) -> None:
    """Before continuing ``run_dir``: removes what killed processes left (temporary folders,
    links and trash of any pid), points ``last`` at ``keep`` (the checkpoint resumed, else the
    newest complete one) and ``best`` at its newest version if its link was lost, and removes the
    other versions (a version newer than ``best``'s link is an evaluation that the resumed run
    repeats)."""
    for name in CHECKPOINT_NAMES:
        path = run_dir / name
        for leftover in _leftovers(run_dir, name):
            _remove(leftover)
        if name == "last" and keep is not None:
            target = keep
        else:
            target = _target(path) or _newest(path)
        if target is None:
            if path.is_symlink():
                path.unlink()  # a dangling link (a clear of the folder that was interrupted)
            continue
        target = target.resolve()
        if target != path.resolve():  # the link is missing, dangles or is one behind
            _point(path, run_dir / target.name)
        for old in _versions(path):
            if old.resolve() != target:
                _trash(old, name)


def _clear_previous_run(run_dir: Path) -> None:
    """A fresh run in a reused output_dir replaces the run that was there: its checkpoints (the
    versions first, then the links, so that an interrupted clear never leaves a link to a
    half-removed folder), what killed processes left, and its metrics."""
    for name in CHECKPOINT_NAMES:
        path = run_dir / name
        for version in _versions(path):
            _trash(version, name)
        if path.is_symlink():
            path.unlink()
        elif path.is_dir():
            _trash(path, name)
        for leftover in _leftovers(run_dir, name):
            _remove(leftover)
    for stale in (run_dir / METRICS_FILE, run_dir / (METRICS_FILE + ".tmp")):
        stale.unlink(missing_ok=True)


def _carry_run(source: Path, run_dir: Path, step: int) -> None:
    """Resuming another folder's checkpoint into ``run_dir`` continues that run here: its best
    checkpoint and its metrics up to ``step`` come along (else the result would name a best
    model that exists only in the other folder, and the metrics would start mid-run)."""
    best = _target(source / "best")
    if best is not None:
        record_file = best / RECORD_FILE
        best_step = json.loads(record_file.read_text(encoding="utf-8")).get("step") if record_file.is_file() else 0
        _publish(run_dir / "best", int(best_step or 0),
                 lambda folder: shutil.copytree(best, folder, symlinks=True, dirs_exist_ok=True))
    metrics = source / METRICS_FILE
    if metrics.is_file():
        tmp = run_dir / (METRICS_FILE + ".tmp")
        shutil.copyfile(metrics, tmp)
        os.replace(tmp, run_dir / METRICS_FILE)
        _truncate_metrics(run_dir / METRICS_FILE, step)
    else:
        logger.warning("%s holds no %s: the metrics in %s start at step %d", source, METRICS_FILE, run_dir, step + 1)


def _prepare_output_dir(output_dir: Path, resume_folder: Path | None, resume_step: int) -> Path | None:
    """Readies ``output_dir`` for the run, once everything is validated; returns the checkpoint
    to resume (as a path in ``output_dir`` when it is this folder's own)."""
    if resume_folder is not None and _run_dir_of(resume_folder) == output_dir.resolve():
        keep = output_dir / resume_folder.resolve().name
        _recover_checkpoints(output_dir, keep)
        _truncate_metrics(output_dir / METRICS_FILE, resume_step)
        return keep
    _clear_previous_run(output_dir)
    if resume_folder is not None:
        _carry_run(_run_dir_of(resume_folder), output_dir, resume_step)
    return resume_folder


def _append_jsonl(path: Path, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def _truncate_metrics(path: Path, last_step: int) -> None:
    """On resume, drops the records a crashed run wrote after its last checkpoint, and a torn
    last line (the run was killed in the middle of an append). A broken line before the last one
    is no torn append: it is reported."""
    if not path.is_file():
        return
    lines = [line for line in path.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
    kept = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError("not a JSON object")
        except ValueError:
            if number == len(lines):
                logger.warning("%s: dropping the torn last line %r (its run was killed while writing it)",
                               path, line[:80])
                break
            raise ValueError(f"{path}: record {number} of {len(lines)} is not a JSON object ({line[:80]!r}); "
                             "only the last line can be torn by a kill: the file is damaged") from None
        if record.get("step", 0) <= last_step:
            kept.append(line)
    _write_text_atomically(path, "".join(line + "\n" for line in kept))


# --------------------------------------------------------------------------------------------
# One run per output folder


class OutputDirInUse(RuntimeError):
    """Another run holds the output_dir's lock."""


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)  # signal 0: only checks that the process exists
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: it exists, as another user's
        return True
    return True


class RunLock:
    """``output_dir/.fastcse.lock``: the pid and host of the run writing to the folder, created
    with O_EXCL (of two racing starts, exactly one creates it). A lock whose pid is dead on this
    host is stale (a killed run) and is taken over; a live one, or one from another host (whose
    pid cannot be checked from here), refuses the run at once."""

    STALE_UNREADABLE_S = 10.0  # a lock with no content yet is being written, unless it is older

    def __init__(self, folder: Path):
        self.folder, self.path = Path(folder), Path(folder) / LOCK_FILE
        self._content: str | None = None

    def _holder(self) -> tuple[str | None, dict | None]:
        """(the lock file's text, its live holder): (None, None) without a lock, (text, None) for a stale one."""
        try:
            text = self.path.read_text(encoding="utf-8")
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return None, None
        try:
            info = json.loads(text)
            pid, host = int(info["pid"]), str(info["host"])
        except (ValueError, KeyError, TypeError):  # created, not yet (or never) filled
            return text, (None if age > self.STALE_UNREADABLE_S else {"pid": "?", "host": "?"})
        if host == socket.gethostname() and not _pid_alive(pid):
            return text, None
        return text, info

    def _refusal(self, holder: dict) -> OutputDirInUse:
        return OutputDirInUse(
            f"output_dir {str(self.folder)!r} is in use by another fastcse run: pid {holder.get('pid')} on "
            f"{holder.get('host')} (since {holder.get('started', '?')}; lock file {self.path}). Wait for it to end "
            "or use another output_dir; if that process is gone (a run on another host that was killed), delete "
            "the lock file.")

    def refuse_if_held(self) -> None:
        """Fails now if a live run holds the folder (before the model is loaded); writes nothing."""
        _, holder = self._holder()
        if holder is not None:
            raise self._refusal(holder)

    def acquire(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        content = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                              "started": time.strftime("%Y-%m-%d %H:%M:%S")})
        for _ in range(5):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                text, holder = self._holder()
                if holder is not None:
                    raise self._refusal(holder) from None
                if text is not None and self._holder()[0] == text:  # still the same stale lock: take it over
                    logger.warning("taking over the stale lock %s of a run that is gone: %s", self.path, text)
                    self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(content)
                f.flush()
                os.fsync(f.fileno())
            self._content = content
            return
        raise OutputDirInUse(f"could not take the lock {self.path}: other runs keep taking it")

    def release(self) -> None:
        """Removes the lock if it is still this run's (never another run's)."""
        if self._content is None:
            return
        with contextlib.suppress(FileNotFoundError):
            if self.path.read_text(encoding="utf-8") == self._content:
                self.path.unlink()
        self._content = None


@contextlib.contextmanager
def _locked_output_dir(output_dir: Path, world: int, rank: int):
    """Holds ``output_dir``'s lock for the block; rank 0 takes it (one run, however many
    processes) and the others learn of a refusal through :func:`_on_rank0`."""
    lock = RunLock(output_dir) if rank == 0 else None
    _on_rank0(world, rank, lambda: lock.acquire())
    try:
        yield
    finally:
        if lock is not None:
            lock.release()


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


def _position_limit(model) -> int | None:
    """How many token positions the encoder's position embeddings cover; None when it has none
    to count (e.g. rotary). RoBERTa-style tables start after the padding index: 514 rows, 512
    positions."""
    table = getattr(getattr(model, "embeddings", None), "position_embeddings", None)
    if isinstance(table, torch.nn.Embedding):
        return table.num_embeddings - (table.padding_idx + 1 if table.padding_idx is not None else 0)
    return getattr(model.config, "max_position_embeddings", None)


def _check_max_seq_length(model, max_seq_length: int) -> None:
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


def row_texts(examples, ids: list[int], mode: str) -> list[tuple[str, str]]:
    """The (anchor, positive) texts of the rows ``ids``: unsupervised, the sentence twice."""
    if mode == "unsup":
        return [(examples[i], examples[i]) for i in ids]
    return [(examples[i][0], examples[i][1]) for i in ids]


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


@dataclass(frozen=True)
class StepRows:
    """What a step's loss needs to know about its rows besides their embeddings.

    ``group_ids``: this rank's rows' duplicate groups (ids of the global batch), None when the
    global batch has no duplicates (the plain loss). ``labels``: this rank's rows' labels.
    ``queue_keys``: the texts of every rank's positives in global row order, pushed to the
    negative queue with their embeddings. ``queue_exclude``: the texts of the global batch; a
    queued entry that repeats one is left out of the step's extra negatives."""

    group_ids: tuple[int, ...] | None = None
    labels: tuple[int, ...] | None = None
    queue_keys: tuple[str, ...] = ()
    queue_exclude: frozenset[str] = frozenset()


NO_ROWS = StepRows()


class BatchRows:
    """The :class:`StepRows` of each step, computed from the global batch, so that they are the
    same on every rank (the group ids and labels are compared globally by ``info_nce``, and
    every rank must push the same rows to its queue). Pure Python: O(batch) hashing a step.
    Holds its own :class:`BatchOrder`: the one of :class:`TokenizedBatches` is used by its
    background thread, and a BatchOrder is not safe to share between threads."""

    def __init__(self, examples, mode: str, labels: list[int] | None, order: BatchOrder, shard: tuple[int, int],
                 *, mask_duplicates: bool, queue: bool):
        self.examples, self.mode, self.labels, self.order, self.shard = examples, mode, labels, order, shard
        self.mask_duplicates, self.queue = mask_duplicates, queue

    def __call__(self, step: int) -> StepRows:
        _, ids = self.order(step)
        labels = None if self.labels is None else self._local([self.labels[i] for i in ids])
        if not (self.mask_duplicates or self.queue):
            return StepRows(labels=labels)
        texts = row_texts(self.examples, ids, self.mode)
        return StepRows(group_ids=self._group_ids(texts) if self.mask_duplicates else None, labels=labels,
                        queue_keys=tuple(positive for _, positive in texts) if self.queue else (),
                        queue_exclude=self._repeated_in_queue(texts))

    def _local(self, values: list) -> tuple:
        """This rank's share of a global batch's values."""
        return tuple(values[self.shard[0]:self.shard[1]])

    def _group_ids(self, texts: list[tuple[str, str]]) -> tuple[int, ...] | None:
        groups = datalib.duplicate_groups(texts)
        return self._local(groups) if len(set(groups)) < len(groups) else None

    def _repeated_in_queue(self, texts: list[tuple[str, str]]) -> frozenset[str]:
        """The texts a queued row must not repeat: the batch's own, when duplicates are masked."""
        if not (self.queue and self.mask_duplicates):
            return frozenset()
        return frozenset(text for row in texts for text in row)


class NegativeQueue:
    """A FIFO of the detached embeddings of the most recent batches' positives (XBM, Wang et al.
    2020), which every anchor of the following steps scores as extra negatives. A step pushes
    its positives after its loss, so its own positives are never scored twice. Each row keeps
    the text it embeds: a step leaves out the entries that repeat one of its own texts (they
    are false negatives of the anchor with that text). Oldest rows first."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.rows: torch.Tensor | None = None
        self.keys: list[str] = []

    def __len__(self) -> int:
        return len(self.keys)

    def negatives(self, exclude: frozenset[str] = frozenset()) -> torch.Tensor | None:
        """The queued rows, less those whose text is in ``exclude``; None when none are left."""
        if self.rows is None:
            return None
        if exclude and not exclude.isdisjoint(self.keys):
            keep = [i for i, key in enumerate(self.keys) if key not in exclude]
            return self.rows[keep] if keep else None
        return self.rows

    def push(self, rows: torch.Tensor, keys) -> None:
        """Appends ``rows`` (with ``keys``, their texts) and drops the oldest past the capacity."""
        keys = list(keys)
        if len(keys) != len(rows):
            raise ValueError(f"the queue takes one text per row: {len(rows)} rows, {len(keys)} texts")
        rows = rows.detach()
        self.rows = rows[-self.capacity:] if self.rows is None else torch.cat([self.rows, rows])[-self.capacity:]
        self.keys = (self.keys + keys)[-self.capacity:]

    def state_dict(self) -> dict:
        return {"rows": None if self.rows is None else self.rows.cpu(), "keys": list(self.keys)}

    def load_state_dict(self, state: dict | None, device: torch.device) -> None:
        """A checkpoint's queue (None: a checkpoint without one, the queue starts empty); a
        smaller capacity than the checkpoint's (resume_override) keeps the newest rows."""
        self.rows, self.keys = None, []
        if state is not None and state["rows"] is not None:
            self.push(state["rows"].to(device), state["keys"])


def rows_per_rank(batch_size: int, world: int) -> list[int]:
    """How many of a global batch's rows each rank holds (rank r: rows [r*B//W, (r+1)*B//W))."""
    return [(r + 1) * batch_size // world - r * batch_size // world for r in range(world)]


# --------------------------------------------------------------------------------------------
# One step: encode (length-aware, cached or not), loss over the whole batch, backward


@dataclass
class ContrastiveStep:
    """Encodes a step's sequences in the units of :func:`fastcse.encoding.plan_step`, puts the
    embeddings back in batch order, computes ``info_nce`` over the whole batch and
    back-propagates into the parameters (gradient caching when the cache bounds cut the batch
    into several units). With a ``queue``, the step's positives (every rank's, ``rank_rows``
    under a process group) are pushed to it after the backward."""

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
    queue: NegativeQueue | None = None
    rank_rows: list[int] | None = None

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

    def loss(self, plan: encoding_lib.StepPlan, unit_embeddings: torch.Tensor, rows: StepRows = NO_ROWS
             ) -> torch.Tensor:
        emb = plan.to_batch_order(unit_embeddings)
        emb = emb.view(-1, self.views, emb.shape[-1])  # view 0 anchors, 1 positives, 2 hard negatives
        anchor, positive = emb[:, 0], emb[:, 1]
        negative = emb[:, 2] if self.views == 3 else None
        self._positives = positive.detach()
        return fastcse.info_nce(anchor, positive, negative, temperature=self.temperature,
                                hard_negative_weight=self.hard_negative_weight, process_group=self.process_group,
                                **self._row_options(rows, anchor))

    def _row_options(self, rows: StepRows, anchor: torch.Tensor) -> dict:
        """The ``info_nce`` keywords of the step's rows, only those in use: a step without
        duplicates, labels or queued rows is the plain call, bit for bit."""
        options = {}
        if rows.group_ids is not None:
            options["group_ids"] = torch.tensor(rows.group_ids, dtype=torch.long, device=anchor.device)
        if rows.labels is not None:
            options["labels"] = torch.tensor(rows.labels, dtype=torch.long, device=anchor.device)
        queued = self.queue.negatives(rows.queue_exclude) if self.queue is not None else None
        if queued is not None:
            options["extra_negatives"] = queued.to(anchor.dtype)  # under autocast a stored row may be bf16
        return options

    def __call__(self, ids: list[list[int]], rows: StepRows = NO_ROWS) -> torch.Tensor:
        """Accumulates the parameter gradients of the step's loss; returns the detached loss."""
        plan = self.plan(ids)
        units = encoding_lib.build_units(ids, plan.units, self.encoding, self.pad_id, self.device,
                                         float_mask=self.float_mask)
        loss_fn = functools.partial(self.loss, plan, rows=rows)
        if len(units) > 1 and self.caching:
            loss = cached_step(self.encode, units, loss_fn, cuda_devices=self.cuda_devices)
        else:
            loss = uncached_step(self.encode, units, loss_fn)  # several units: each keeps its graph
        if self.queue is not None:  # after the loss: a step does not score its own positives twice
            self.queue.push(self._positives_of_all_ranks(), rows.queue_keys)
        self._positives = None
        return loss

    def _positives_of_all_ranks(self) -> torch.Tensor:
        """The step's positives in global row order: under a process group every rank queues
        every rank's, so that all ranks score the same queue (the single-process loss)."""
        if self.process_group is None:
            return self._positives
        return gather_variable(self._positives, self.rank_rows, self.process_group)


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


def _apply_hyperparameters(optimizer, scheduler, learning_rate: float, weight_decay: float) -> None:
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
    optimizer, the schedule, the run state, every rank's dropout random streams, the negative
    queue, and the run's settings, which a resumed run must share)."""

    def __init__(self, model, tokenizer, optimizer, scheduler, run_config, settings, record, last_dir, device,
                 world, rank, queue: NegativeQueue | None = None):
        self.model, self.tokenizer, self.optimizer, self.scheduler = model, tokenizer, optimizer, scheduler
        self.run_config, self.settings, self.record = run_config, settings, record
        self.last_dir, self.device, self.world, self.rank = last_dir, device, world, rank
        self.queue = queue

    def save(self, state: RunState) -> None:
        rng_cpu = torch.get_rng_state()
        rng_cuda = torch.cuda.get_rng_state_all() if self.device.type == "cuda" else []
        rng_ranks = None
        if self.world > 1:  # every rank's dropout streams, so that a resumed run continues each of them
            rng_ranks = [None] * self.world
            dist.all_gather_object(rng_ranks, (rng_cpu, [s.cpu() for s in rng_cuda]))
        trainer_state = {"config": self.run_config, "settings": self.settings, "step": state.step,
                         "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                         "best_metric": state.best_metric, "best_step": state.best_step, "history": state.history,
                         "rng_cpu": rng_cpu, "rng_cuda": rng_cuda}
        if rng_ranks is not None:
            trainer_state["rng_cpu_ranks"] = [r[0] for r in rng_ranks]
            trainer_state["rng_cuda_ranks"] = [r[1] for r in rng_ranks]
        if self.queue is not None:  # the same on every rank: rank 0's is the run's
            trainer_state["negative_queue"] = self.queue.state_dict()
        _on_rank0(self.world, self.rank, save_checkpoint, self.last_dir, self.model, self.tokenizer,
                  dict(self.record, step=state.step), trainer_state)

    def resume(self, saved: dict, folder: Path, seed: int) -> RunState:
        """Loads ``folder``'s weights and ``saved`` (its trainer state, already checked against
        this run): optimizer, schedule (with this run's hyperparameters) and random streams."""
        from safetensors.torch import load_file

        weights = load_file(str(folder / "model.safetensors"))
        missing, unexpected = self.model.load_state_dict(weights, strict=False)
        if unexpected or [k for k in missing if "position_ids" not in k]:
            raise ValueError(f"resume_from weights do not fit the model: missing {missing}, unexpected {unexpected}")
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        _apply_hyperparameters(self.optimizer, self.scheduler, self.settings["learning_rate"],
                               self.settings["weight_decay"])
        state = RunState(saved["step"], saved["best_metric"], saved["best_step"], saved["history"])
        self._restore_random_streams(saved, state.step, seed)
        if self.queue is not None:
            self.queue.load_state_dict(saved.get("negative_queue"), self.device)
        if self.rank == 0:
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


# --------------------------------------------------------------------------------------------
# Resuming: which checkpoint, and whether this run may continue it


def _resume_folder(resume_from, output_dir: Path) -> Path | None:
    """The checkpoint ``resume_from`` names: a checkpoint folder (holding trainer_state.pt), or a
    run folder (or its ``last``), of which the newest complete ``last`` checkpoint is taken,
    whatever the moment a crash stopped that run. None when there is no checkpoint and
    ``resume_from`` is the output_dir: the same command run again after a kill before the first
    checkpoint, or on a new folder, starts from the beginning."""
    if resume_from is None:
        return None
    if not isinstance(resume_from, (str, os.PathLike)):
        raise TypeError(f"resume_from must be a path or None, got {resume_from!r}")
    folder = Path(resume_from)
    if folder.name == "last" and (folder.is_symlink() or not folder.exists()):
        folder = folder.parent  # "run/last": the run's newest checkpoint, not only the one its link shows
    if (folder / STATE_FILE).is_file():
        return folder
    newest = _newest(folder / "last", required=STATE_FILE)
    if newest is not None:
        return newest
    if folder.resolve() == output_dir.resolve():
        return None
    raise FileNotFoundError(f"resume_from={str(resume_from)!r} holds no {STATE_FILE} and no complete 'last' "
                            "checkpoint: pass a checkpoint folder or the output_dir of a run")


def _data_fingerprint(examples, labels: list[int] | None = None) -> str:
    """A short hash of the training examples in order (and their labels, when they have some:
    data without labels hashes as before): resuming on other data is another run."""
    digest = hashlib.sha256()
    for example in examples:
        text = example if isinstance(example, str) else "\x1f".join(example)
        digest.update(text.encode("utf-8") + b"\x1e")
    if labels is not None:
        digest.update(b"labels:" + ",".join(map(str, labels)).encode("ascii"))
    return digest.hexdigest()[:16]


def _check_resume_settings(saved: dict, settings: dict, override, folder: Path) -> None:
    """Refuses to continue a checkpoint with settings that change what the run computes, unless
    ``resume_override`` allows each of them (they are not in the optimizer state: before this
    check, a new max_steps, learning rate, temperature... silently changed the run mid-way or
    was overridden by the checkpoint's)."""
    old = saved.get("settings") or saved["config"]  # before the full record: mode, batch, seed, count, steps
    old = {**EARLIER_SETTINGS, **old}
    changed = [name for name in RESUME_SETTINGS if name in old and old[name] != settings[name]]

    def describe(name):
        text = f"{name} {old[name]!r} -> {settings[name]!r}"
        if name == "total_steps":
            why = [f"{k} {old[k]!r} -> {settings[k]!r}" for k in ("max_steps", "epochs")
                   if k in old and old[k] != settings[k]]
            text += f" ({', '.join(why)})" if why else ""
        return text

    refused = [] if override is True else [name for name in changed if name not in override]
    if refused:
        raise ValueError(f"resume_from={str(folder)!r} was trained with other settings: "
                         f"{'; '.join(describe(name) for name in refused)}. Resume with the run's settings, or pass "
                         f"resume_override={refused!r} (or True) to continue with the new values")
    if _world()[0] == 0:
        if changed:
            logger.warning("resuming %s with changed settings (resume_override): %s", folder,
                           "; ".join(describe(name) for name in changed))
        unchecked = [name for name in RESUME_SETTINGS if name not in old]
        if unchecked:
            logger.warning("%s predates the full settings record: %s could not be compared", folder,
                           ", ".join(unchecked))


def _check_carry(folder: Path, saved: dict, output_dir: Path) -> None:
    """Resuming into another output_dir than the checkpoint's carries the run's best checkpoint
    along (:func:`_carry_run`); it must exist when the run evaluated."""
    source = _run_dir_of(folder)
    if source == output_dir.resolve() or saved.get("best_step") is None:
        return
    if _target(source / "best") is None:
        raise FileNotFoundError(
            f"resume_from={str(folder)!r} continues a run whose best checkpoint is step {saved['best_step']} "
            f"(metric {saved['best_metric']:.2f}), but {source / 'best'} does not exist: resuming into "
            f"output_dir={str(output_dir)!r} would report a best model that is not there. Resume into the run's own "
            f"folder ({str(source)!r}), or put its best checkpoint at {source / 'best'}")


def _load_resume(folder: Path, settings: dict, override, output_dir: Path) -> dict:
    """The checkpoint's trainer state, checked against this run before anything is written."""
    saved = torch.load(folder / STATE_FILE, weights_only=True)
    _check_resume_settings(saved, settings, override, folder)
    _check_carry(folder, saved, output_dir)
    return saved


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
          mlp_only_train: bool | None = None, mlp_init: str = "fresh", hard_negative_weight: float = 0.0,
          mask_duplicates: bool = True, negative_queue_size: int = 0,
          learning_rate: float | None = None, weight_decay: float = 0.0, warmup_steps: int = 0,
          max_grad_norm: float | None = 1.0, epochs: int | None = None, max_steps: int | None = None,
          max_seq_length: int = 32, eval_steps: int = 125, eval_data="STSBenchmark-dev", data_dir=None,
          output_dir="runs/fastcse", seed: int = 42, precision: str = "auto", device=None,
          resume_from=None, resume_override=False, progress: bool = True, save_last: bool = True) -> TrainResult:
    """Trains a sentence encoder with SimCSE's contrastive objective (``fastcse.info_nce``).

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
            same folder is refused at once (a lock whose process is dead is taken over). A
            fresh run (no ``resume_from``, or nothing to resume) in a reused folder replaces the
            previous run there (its checkpoints and metrics), once every argument, the data, the
            eval files and the model have been checked.
        precision: ``auto`` (bf16 autocast on CUDA when supported, else fp32), ``fp32``, ``bf16``.
        resume_from: a checkpoint folder, or a run's output_dir (its newest complete ``last``
            checkpoint, whatever the moment its run was killed), to continue from; the run then
            produces the same weights as an uninterrupted one. ``resume_from=output_dir`` on a
            folder with no checkpoint yet (killed before the first one, or new) starts from the
            beginning with a logged note, so the same command serves the first start and every
            restart. Resuming into another output_dir copies the run's ``best`` checkpoint and
            metrics there (refused if its best checkpoint cannot be found).
        resume_override: the settings a resumed run must share with its checkpoint are compared
            (``RESUME_SETTINGS``: mode, the data and its labels, batch size, seed, total steps
            (max_steps / epochs), learning rate, weight decay, warmup, max_grad_norm, temperature,
            hard_negative_weight, pooler, mlp_only_train, max_seq_length, precision, eval_data,
            mask_duplicates, negative_queue_size);
            a difference is refused, naming every differing setting with both values. Pass a
            list of setting names (or True for all) to continue with the new values instead: the
            new learning rate, weight decay and schedule apply from the resumed step. Memory
            layout (mini_batch_size, mini_batch_tokens, encoding), device and world size may
            change freely.

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
    # ---- validate everything before touching the model, the data or the output folder
    learning_rate, epochs, mlp_only_train, output_dir, override, eval_tasks = _check_train_arguments(
        mode=mode, batch_size=batch_size, mini_batch_size=mini_batch_size, mini_batch_tokens=mini_batch_tokens,
        encoding=encoding, temperature=temperature, hard_negative_weight=hard_negative_weight, pooler=pooler,
        mlp_only_train=mlp_only_train, mlp_init=mlp_init, learning_rate=learning_rate, weight_decay=weight_decay,
        warmup_steps=warmup_steps, max_grad_norm=max_grad_norm, epochs=epochs, max_steps=max_steps,
        max_seq_length=max_seq_length, eval_steps=eval_steps, output_dir=output_dir,
        resume_override=resume_override, eval_data=eval_data, data_dir=data_dir, seed=seed,
        mask_duplicates=mask_duplicates, negative_queue_size=negative_queue_size)
    rank, world = _world()
    is_main = rank == 0
    device = _set_up_rank_device(device, world, rank)
    resume_folder = _checkpoint_to_resume(resume_from, output_dir, is_main)
    _check_multi_process(batch_size, world)
    _on_rank0(world, rank, RunLock(output_dir).refuse_if_held)  # a second run stops here, before the model loads
    shard = (rank * batch_size // world, (rank + 1) * batch_size // world)
    examples, labels, views = _load_training_data(data, mode, batch_size)

    # ---- the model
    model, tokenizer, device = _load_model_on_device(model, tokenizer, device)
    autocast_dtype = resolve_precision(precision, device)
    fresh_head = pooler == "cls" and mlp_init == "fresh" and resume_folder is None
    _check_mlp_head(model, pooler, fresh_head)
    _check_max_seq_length(model, max_seq_length)
    encoding = encoding_lib.resolve_encoding(encoding, model)
    _check_mini_batch_tokens(mini_batch_tokens, tokenizer, examples, mode, max_seq_length)
    eval_pooler = "cls_before_pooler" if (pooler == "cls" and mlp_only_train) else pooler

    # ---- the run's settings; a checkpoint to resume must share them (checked before any write)
    order = BatchOrder(len(examples), batch_size, seed)
    total_steps = max_steps if max_steps is not None else epochs * order.steps_per_epoch
    settings = _run_settings(
        mode=mode, examples=examples, labels=labels, batch_size=batch_size, seed=seed, total_steps=total_steps,
        learning_rate=learning_rate, weight_decay=weight_decay, warmup_steps=warmup_steps,
        max_grad_norm=max_grad_norm, temperature=temperature, hard_negative_weight=hard_negative_weight,
        pooler=pooler, mlp_only_train=mlp_only_train, max_seq_length=max_seq_length, autocast_dtype=autocast_dtype,
        eval_tasks=eval_tasks, mask_duplicates=mask_duplicates, negative_queue_size=negative_queue_size,
        max_steps=max_steps, epochs=epochs, mlp_init=mlp_init, mini_batch_size=mini_batch_size,
        mini_batch_tokens=mini_batch_tokens, encoding=encoding, eval_steps=eval_steps)
    saved = _load_resume(resume_folder, settings, override, output_dir) if resume_folder is not None else None
    _set_starting_weights(model, fresh_head, seed, world)
    if is_main:
        _log_ineffective_settings(model, mode, labels, mask_duplicates)

    # ---- the output folder: locked for the run, then readied (nothing above wrote to it)
    with _locked_output_dir(output_dir, world, rank):
        resume_folder = _on_rank0(world, rank, _prepare_output_dir, output_dir, resume_folder,
                                  saved["step"] if saved is not None else 0)
        metrics_path = output_dir / METRICS_FILE
        best_dir, last_dir = output_dir / "best", output_dir / "last"
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer, scheduler = make_optimizer(params, learning_rate, weight_decay, warmup_steps, total_steps)
        record = _model_record(mode=mode, pooler=pooler, mlp_only_train=mlp_only_train, mlp_init=mlp_init,
                               eval_pooler=eval_pooler, temperature=temperature, batch_size=batch_size,
                               max_seq_length=max_seq_length)
        queue = NegativeQueue(negative_queue_size) if negative_queue_size else None
        checkpointer = Checkpointer(model, tokenizer, optimizer, scheduler, _run_config(settings, world), settings,
                                    record, last_dir, device, world, rank, queue)
        evaluator = Evaluator(model, tokenizer, eval_tasks, data_dir, eval_pooler, record, best_dir, metrics_path,
                              world, rank) if eval_tasks else None
        contrastive_step = ContrastiveStep(
            model, pooler, encoding, views, float(temperature), float(hard_negative_weight),
            dist.group.WORLD if world > 1 else None, autocast_dtype, device,
            mini_batch_sequences=mini_batch_size * views if mini_batch_size else None,
            mini_batch_tokens=mini_batch_tokens, queue=queue, rank_rows=rows_per_rank(batch_size, world))

        torch.manual_seed(seed + rank)  # dropout masks: a different stream per rank
        state = checkpointer.resume(saved, resume_folder, seed) if saved is not None else RunState()
        if is_main:
            _log_run_start(
                mode=mode, examples=examples, labels=labels, batch_size=batch_size, world=world,
                mini_batch_size=mini_batch_size, mini_batch_tokens=mini_batch_tokens,
                caching=contrastive_step.caching, total_steps=total_steps, learning_rate=learning_rate,
                pooler=pooler, encoding=encoding, autocast_dtype=autocast_dtype, mask_duplicates=mask_duplicates,
                negative_queue_size=negative_queue_size)

        batches = TokenizedBatches(examples, mode, tokenizer, max_seq_length, order, shard, total_steps)
        # BatchRows gets an order of its own: TokenizedBatches calls ``order`` (which caches an
        # epoch's permutation) from its prefetch thread.
        rows = BatchRows(examples, mode, labels, BatchOrder(len(examples), batch_size, seed), shard,
                         mask_duplicates=mask_duplicates and labels is None, queue=queue is not None)
        try:
            throughput = _train_loop(model, params, optimizer, scheduler, contrastive_step, batches, rows, state,
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
    return _train_result(state, model_path, output_dir, metrics_path, throughput)


# ---- the steps of train, in the order it takes them


class _ResolvedArguments(NamedTuple):
    """The arguments of :func:`train` that its checks resolve (a default filled in, a path made)."""

    learning_rate: float
    epochs: int
    mlp_only_train: bool
    output_dir: Path
    override: bool | frozenset
    eval_tasks: list[str]


def _check_train_arguments(*, mode, batch_size, mini_batch_size, mini_batch_tokens, encoding, temperature,
                           hard_negative_weight, pooler, mlp_only_train, mlp_init, learning_rate, weight_decay,
                           warmup_steps, max_grad_norm, epochs, max_steps, max_seq_length, eval_steps, output_dir,
                           resume_override, eval_data, data_dir, seed, mask_duplicates,
                           negative_queue_size) -> _ResolvedArguments:
    """The checks of :func:`train`'s arguments that need neither the process group, the model nor
    the data, in order, raising on the first bad one; nothing is written (the eval files are read)."""
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
    if mlp_init not in MLP_INITS:
        raise ValueError(f"mlp_init must be one of {MLP_INITS}, got {mlp_init!r}")
    learning_rate = DEFAULT_LR[mode] if learning_rate is None else _positive_float("learning_rate", learning_rate)
    _positive_float("weight_decay", weight_decay, allow_zero=True)
    _positive_int("warmup_steps", warmup_steps, minimum=0)
    if max_grad_norm is not None:
        _positive_float("max_grad_norm", max_grad_norm)
    epochs = DEFAULT_EPOCHS[mode] if epochs is None else _positive_int("epochs", epochs)
    _positive_int("max_steps", max_steps, allow_none=True)
    _positive_int("max_seq_length", max_seq_length, minimum=2)
    _positive_int("eval_steps", eval_steps)
    output_dir = _check_output_dir(output_dir)
    override = _check_resume_override(resume_override)
    eval_tasks = _eval_tasks(eval_data, data_dir)
    _positive_int("seed", seed, minimum=0)
    if not isinstance(mask_duplicates, bool):
        raise TypeError(f"mask_duplicates must be True or False, got {mask_duplicates!r}")
    _positive_int("negative_queue_size", negative_queue_size, minimum=0)
    return _ResolvedArguments(learning_rate, epochs, mlp_only_train, output_dir, override, eval_tasks)


def _set_up_rank_device(device, world: int, rank: int) -> torch.device | None:
    """This rank's device (:func:`rank_device`), made CUDA's current device under torchrun."""
    device = rank_device(device, world, _local_rank(rank) if world > 1 else None, torch.cuda.is_available())
    if world > 1 and device is not None and device.type == "cuda":
        torch.cuda.set_device(device)  # before the first collective: NCCL communicates on the current device
    return device


def _checkpoint_to_resume(resume_from, output_dir: Path, is_main: bool) -> Path | None:
    """The checkpoint folder ``resume_from`` names, or None (a fresh start, noted when
    ``resume_from`` was given but holds no complete checkpoint yet)."""
    resume_folder = _resume_folder(resume_from, output_dir)
    if resume_from is not None and resume_folder is None and is_main:
        logger.warning("resume_from=%s holds no complete checkpoint yet (a new folder, or a run killed before its "
                       "first checkpoint): starting from the beginning", resume_from)
    return resume_folder


def _check_multi_process(batch_size: int, world: int) -> None:
    """What a run over ``world`` > 1 processes needs beyond one process: a batch to split and the
    C++ extension."""
    if world > 1:
        if batch_size < world:
            raise ValueError(f"batch_size ({batch_size}) is the global batch, split over {world} ranks: it must be "
                             f"at least the world size")
        from fastcse.distributed import _load_extension

        _load_extension()  # a missing extension fails now, on every rank, not at the first step


def _load_training_data(data, mode: str, batch_size: int) -> tuple[list, list[int] | None, int]:
    """The examples, their labels (None without) and the sequences each example encodes (views)."""
    examples, labels = (datalib.load_unsup(data), None) if mode == "unsup" else datalib.load_sup_with_labels(data)
    if len(examples) < batch_size:
        raise ValueError(f"the dataset has {len(examples)} examples, fewer than batch_size={batch_size}: "
                         "one contrastive batch needs batch_size examples")
    views = 2 if mode == "unsup" else len(examples[0])
    return examples, labels, views


def _load_model_on_device(model, tokenizer, device: torch.device | None) -> tuple:
    """The model and tokenizer, the model moved to ``device`` (None: left where it loaded), and
    the device it is on."""
    model, tokenizer = _load_training_model(model, tokenizer)
    if device is not None:
        model.to(device)
    return model, tokenizer, next(model.parameters()).device


def _check_mlp_head(model, pooler: str, fresh_head: bool) -> None:
    """The model has the MLP head that ``pooler="cls"`` trains, and the layer ``mlp_init="fresh"`` redraws."""
    if pooler == "cls" and not has_mlp_head(model):
        raise ValueError(f"pooler='cls' trains SimCSE's MLP head, which is the encoder's pooling layer, and "
                         f"{type(model).__name__} has none: use pooler='cls_before_pooler' or 'avg'")
    if fresh_head and not isinstance(getattr(model.pooler, "dense", None), torch.nn.Linear):
        raise ValueError(f"mlp_init='fresh' redraws the MLP head model.pooler.dense, which {type(model).__name__} "
                         "does not have: use mlp_init='pretrained'")


def _run_settings(*, mode, examples, labels, batch_size, seed, total_steps, learning_rate, weight_decay,
                  warmup_steps, max_grad_norm, temperature, hard_negative_weight, pooler, mlp_only_train,
                  max_seq_length, autocast_dtype, eval_tasks, mask_duplicates, negative_queue_size, max_steps,
                  epochs, mlp_init, mini_batch_size, mini_batch_tokens, encoding, eval_steps) -> dict:
    """The run's settings as a checkpoint saves them: first those a resumed run must share
    (``RESUME_SETTINGS``), then those that only describe it."""
    return {"mode": mode, "data": _data_fingerprint(examples, labels), "num_examples": len(examples),
            "batch_size": batch_size, "seed": seed, "total_steps": total_steps, "learning_rate": learning_rate,
            "weight_decay": float(weight_decay), "warmup_steps": warmup_steps,
            "max_grad_norm": None if max_grad_norm is None else float(max_grad_norm),
            "temperature": float(temperature), "hard_negative_weight": float(hard_negative_weight),
            "pooler": pooler, "mlp_only_train": mlp_only_train, "max_seq_length": max_seq_length,
            "precision": "bf16" if autocast_dtype else "fp32", "eval_data": eval_tasks,
            "mask_duplicates": mask_duplicates, "negative_queue_size": negative_queue_size,
            # not compared (see RESUME_SETTINGS), kept to describe the run
            "max_steps": max_steps, "epochs": None if max_steps is not None else epochs, "mlp_init": mlp_init,
            "mini_batch_size": mini_batch_size, "mini_batch_tokens": mini_batch_tokens, "encoding": encoding,
            "eval_steps": eval_steps}


def _set_starting_weights(model, fresh_head: bool, seed: int, world: int) -> None:
    """The weights every rank starts from: the MLP head redrawn (``mlp_init="fresh"``), then rank
    0's weights broadcast to the others."""
    if fresh_head:
        init_fresh_mlp_head(model, seed)
    if world > 1:
        _broadcast_model(model)


def _log_ineffective_settings(model, mode: str, labels: list[int] | None, mask_duplicates: bool) -> None:
    """Notes the settings that the model or the data leave without effect."""
    if mode == "unsup" and getattr(model.config, "hidden_dropout_prob", 0.1) == 0:
        logger.warning("unsupervised SimCSE uses dropout as its augmentation, but the model's dropout is 0")
    if labels is not None and mask_duplicates:
        logger.info("the data has labels: they define the positives, so mask_duplicates has no effect")


def _model_record(*, mode, pooler, mlp_only_train, mlp_init, eval_pooler, temperature, batch_size,
                  max_seq_length) -> dict:
    """How a saved model was trained and is to be pooled, written with every checkpoint."""
    return {"mode": mode, "pooler": pooler, "mlp_only_train": mlp_only_train, "mlp_init": mlp_init,
            "eval_pooler": eval_pooler, "temperature": temperature, "batch_size": batch_size,
            "max_seq_length": max_seq_length, "fastcse_version": fastcse.__version__}


def _run_config(settings: dict, world: int) -> dict:
    # The short record older checkpoints carry alone (read when "settings" is missing) + the world size.
    run_config = {key: settings[key] for key in ("mode", "batch_size", "seed", "num_examples", "total_steps")}
    run_config["world_size"] = world
    return run_config


def _log_run_start(*, mode, examples, labels, batch_size, world, mini_batch_size, mini_batch_tokens, caching,
                   total_steps, learning_rate, pooler, encoding, autocast_dtype, mask_duplicates,
                   negative_queue_size) -> None:
    """One line describing the run about to train."""
    logger.info("training %s SimCSE: %d examples%s, batch %d%s%s, %d steps, lr %g, pooler %s, %s encoding, "
                "precision %s, %s, negative queue %s", mode, len(examples),
                " (labelled)" if labels is not None else "", batch_size,
                f" over {world} processes ({batch_size // world}{'+' if batch_size % world else ''} each)"
                if world > 1 else "",
                f" (gradient caching: mini-batch {mini_batch_size or '-'}, {mini_batch_tokens or '-'} tokens)"
                if caching else "", total_steps, learning_rate, pooler, encoding,
                "bf16" if autocast_dtype else "fp32",
                "duplicates masked" if mask_duplicates and labels is None else "duplicates not masked",
                negative_queue_size or "off")


def _train_result(state: RunState, model_path: Path, output_dir: Path, metrics_path: Path,
                  throughput: tuple[float, int]) -> TrainResult:
    """What the finished run reports, from its state and ``_train_loop``'s throughput."""
    train_seconds, sentences_seen = throughput
    return TrainResult(steps=state.step, model_path=str(model_path), output_dir=str(output_dir),
                       metrics_path=str(metrics_path), best_metric=state.best_metric, best_step=state.best_step,
                       history=state.history, train_seconds=train_seconds,
                       sentences_per_second=sentences_seen / train_seconds if train_seconds else None)


def _train_loop(model, params, optimizer, scheduler, contrastive_step: ContrastiveStep, batches: TokenizedBatches,
                rows: BatchRows, state: RunState, *, total_steps: int, max_grad_norm, eval_steps: int, evaluator,
                checkpointer, metrics_path, sentences_per_step: int, world: int, progress: bool,
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
            loss = contrastive_step(ids, rows(state.step))
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
