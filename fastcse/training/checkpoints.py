"""The run folder's checkpoints: versioned folders behind atomic links, their recovery after a
kill, and the metrics file.

``best`` and ``last`` are relative symlinks to versioned checkpoint folders beside them
(``last -> last.250``), so that a new checkpoint replaces the previous one in one atomic rename
(a folder cannot be renamed over a non-empty folder; a link can be).
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import shutil
from pathlib import Path

import torch

from fastcse.evaluation import max_model_length

logger = logging.getLogger("fastcse.train")

STATE_FILE = "trainer_state.pt"
RECORD_FILE = "fastcse.json"
METRICS_FILE = "metrics.jsonl"
CHECKPOINT_NAMES = ("last", "best")


# --------------------------------------------------------------------------------------------
# Saving


def write_text_atomically(path: Path, text: str) -> None:
    """A reader (or a crash) sees the old file or the new one, never a half-written one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_json(path: Path, obj) -> None:
    write_text_atomically(path, json.dumps(obj, indent=2) + "\n")


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
    write_json(folder / "1_Pooling" / "config.json", {
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
        write_json(folder / "2_Dense" / "config.json", {
            "in_features": hidden, "out_features": dense.out_features, "bias": dense.bias is not None,
            "activation_function": "torch.nn.modules.activation.Tanh"})
        tensors = {"linear.weight": dense.weight.detach().cpu().contiguous()}
        if dense.bias is not None:
            tensors["linear.bias"] = dense.bias.detach().cpu().contiguous()
        save_file(tensors, str(folder / "2_Dense" / "model.safetensors"))
        modules.append({"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"})
    write_json(folder / "modules.json", modules)
    write_json(folder / "sentence_bert_config.json",
                {"max_seq_length": max_model_length(model, tokenizer), "do_lower_case": False})
    write_json(folder / "config_sentence_transformers.json", {"similarity_fn_name": "cosine"})
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


def checkpoint_target(path: Path) -> Path | None:
    """The folder checkpoint ``path`` stands for: the version its link points to, or ``path``
    itself when it is a real folder (the layout before the links). None if none (or dangling)."""
    if path.is_symlink():
        target = path.parent / os.readlink(path)
        return target if target.is_dir() else None
    return path if path.is_dir() else None


def newest_checkpoint(path: Path, required: str = RECORD_FILE) -> Path | None:
    """The newest complete checkpoint of ``path`` holding ``required``: its newest version,
    whatever the link shows (a crash between a version's rename and the link's switch leaves
    the link one behind), else the folder the link or the old layout shows."""
    versions = [v for v in _versions(path) if (v / required).is_file()]
    if versions:
        return versions[-1]
    target = checkpoint_target(path)
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


def _publish(path: Path, step: int, fill, keep: int = 1) -> Path:
    """Writes a new checkpoint with ``fill(folder)`` and switches ``path`` to it: fill
    ``.<name>.tmp-<pid>`` and fsync it, rename it to the version ``<name>.<step>`` and fsync the
    parent, switch the link, then trash the versions past the newest ``keep`` (never the new
    one). Returns the version folder."""
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
    _prune(path, version, keep)
    return version


def _prune(path: Path, newest: Path, keep: int) -> None:
    """Trashes the versions of ``path`` past the ``keep`` newest; ``newest`` (the one ``path``
    points to) always stays, and so do the versions newer than it."""
    versions = _versions(path)
    position = versions.index(newest) if newest in versions else len(versions) - 1
    for old in versions[:max(0, position + 1 - keep)]:
        if old != newest:
            _trash(old, path.name)


def save_checkpoint(path: Path, model, tokenizer, record: dict, trainer_state: dict | None = None,
                    keep: int = 1) -> Path:
    """Saves a checkpoint and points ``path`` (e.g. ``output_dir/last``) to it atomically, so
    that a crash at any moment leaves either the previous checkpoint or the new one, never a
    half-written model or none. ``AutoModel.from_pretrained(path)`` follows the link. Keeps the
    ``keep`` newest versions (``save_total_limit``). Returns the version folder (``path.<step>``)."""
    path = Path(path)

    def fill(folder: Path) -> None:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        st = write_sentence_transformers_files(folder, model, tokenizer, record["eval_pooler"])
        write_json(folder / RECORD_FILE, dict(record, sentence_transformers=st))
        if trainer_state is not None:
            torch.save(trainer_state, folder / STATE_FILE)

    return _publish(path, int(record.get("step") or 0), fill, keep)


# --------------------------------------------------------------------------------------------
# The output folder at the start of a run (rank 0, under the lock: no other process writes here)


def run_dir_of(checkpoint: Path) -> Path:
    """The run folder a checkpoint belongs to (``run/last`` and ``run/last.4`` are in ``run``)."""
    return checkpoint.resolve().parent


def recover_checkpoints(run_dir: Path, keep: Path | None, limit: int = 1) -> None:
    """Before continuing ``run_dir``: removes what killed processes left (temporary folders,
    links and trash of any pid), points ``last`` at ``keep`` (the checkpoint resumed, else the
    newest complete one) and ``best`` at its newest version if its link was lost, and removes the
    versions newer than the one each points to (a step or an evaluation that the resumed run
    repeats) and, of the older ones, those past ``limit`` versions of ``last`` in all (one of
    ``best``)."""
    for name in CHECKPOINT_NAMES:
        path = run_dir / name
        for leftover in _leftovers(run_dir, name):
            _remove(leftover)
        if name == "last" and keep is not None:
            target = keep
        else:
            target = checkpoint_target(path) or newest_checkpoint(path)
        if target is None:
            if path.is_symlink():
                path.unlink()  # a dangling link (a clear of the folder that was interrupted)
            continue
        target = run_dir / target.resolve().name
        if target.resolve() != path.resolve():  # the link is missing, dangles or is one behind
            _point(path, target)
        versions = _versions(path)
        for newer in versions[versions.index(target) + 1:] if target in versions else []:
            _trash(newer, name)
        _prune(path, target, limit if name == "last" else 1)


def checkpoint_step(folder: Path) -> int | None:
    """The step a checkpoint folder was saved at (its record), None if unreadable."""
    try:
        return int(json.loads((folder / RECORD_FILE).read_text(encoding="utf-8")).get("step") or 0)
    except (OSError, ValueError, TypeError):
        return None


def earlier_work(run_dir: Path) -> list[Path]:
    """The checkpoints of an earlier run in ``run_dir`` that a fresh start would delete, other
    than an evaluation of the untrained model (a best checkpoint at step 0, cheap to redo)."""
    found = []
    for name in CHECKPOINT_NAMES:
        path = run_dir / name
        for folder in dict.fromkeys(filter(None, [checkpoint_target(path), *_versions(path)])):
            if checkpoint_step(folder) != 0:
                found.append(folder)
    return found


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
    best = checkpoint_target(source / "best")
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
        truncate_metrics(run_dir / METRICS_FILE, step)
    else:
        logger.warning("%s holds no %s: the metrics in %s start at step %d", source, METRICS_FILE, run_dir, step + 1)


def prepare_output_dir(output_dir: Path, resume_folder: Path | None, resume_step: int, limit: int = 1) -> Path | None:
    """Readies ``output_dir`` for the run, once everything is validated (a start that would
    delete an earlier run's work was refused before, unless overwrite_output_dir allowed it);
    returns the checkpoint to resume (as a path in ``output_dir`` when it is this folder's own)."""
    if resume_folder is not None and run_dir_of(resume_folder) == output_dir.resolve():
        keep = output_dir / resume_folder.resolve().name
        recover_checkpoints(output_dir, keep, limit)
        truncate_metrics(output_dir / METRICS_FILE, resume_step)
        return keep
    _clear_previous_run(output_dir)
    if resume_folder is not None:
        _carry_run(run_dir_of(resume_folder), output_dir, resume_step)
    return resume_folder


def append_jsonl(path: Path, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def truncate_metrics(path: Path, last_step: int) -> None:
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
    write_text_atomically(path, "".join(line + "\n" for line in kept))


