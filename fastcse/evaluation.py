"""STS evaluation as SimCSE reports it: Spearman x 100 of cosine similarity against gold scores.

Tasks, named as SentEval names them: ``STS12`` ... ``STS16`` (the "all" setting: one Spearman
over all subsets of a year concatenated, unscored pairs dropped), ``STSBenchmark`` and
``SICKRelatedness`` (test sets; ``STSBenchmark-dev`` and ``SICKRelatedness-dev`` for the dev
sets). They are read from the SentEval layout under ``data_dir`` (the folder holding
``SentEval/``). A task may also be a path to a plain pair file: TSV or CSV with a header naming
``sentence1``, ``sentence2`` and ``score``.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

from fastcse.data import read_table
from fastcse.pooling import POOLERS, check_pooler, pool

STS_YEARS = ("STS12", "STS13", "STS14", "STS15", "STS16")
SENTEVAL_TASKS = STS_YEARS + ("STSBenchmark", "SICKRelatedness")
DEV_TASKS = ("STSBenchmark-dev", "SICKRelatedness-dev")
DEFAULT_TASKS = SENTEVAL_TASKS


def shared_dir() -> Path:
    """The shared data/models folder: ``$FASTCSE_SHARED``, else ``../shared`` beside the project root."""
    env = os.environ.get("FASTCSE_SHARED")
    return Path(env) if env else Path(__file__).resolve().parents[1].parent / "shared"


def default_data_dir() -> Path:
    return shared_dir() / "data"


# --------------------------------------------------------------------------------------------
# Task files


def _senteval_root(data_dir) -> Path:
    root = Path(data_dir if data_dir is not None else default_data_dir())
    downstream = root / "SentEval" / "downstream"
    if not downstream.is_dir():
        raise FileNotFoundError(f"no SentEval layout under data_dir={str(root)!r}: expected {str(downstream)!r} "
                                "(data_dir is the folder holding SentEval/)")
    return downstream


def _split_pair(line: str, where: str) -> tuple[str, str]:
    fields = line.split("\t")
    if len(fields) < 2:
        raise ValueError(f"{where}: expected two tab-separated sentences, got {line[:80]!r}")
    # SentEval tokenizes on whitespace and SimCSE's batcher joins tokens with one space.
    return " ".join(fields[0].split()), " ".join(fields[1].split())


def _load_sts_year(downstream: Path, year: str):
    folder = downstream / "STS" / f"{year}-en-test"
    inputs = sorted(folder.glob("STS.input.*.txt"))
    if not inputs:
        raise FileNotFoundError(f"{year}: no STS.input.*.txt files in {str(folder)!r}")
    first, second, gold = [], [], []
    for input_path in inputs:
        subset = input_path.name[len("STS.input."):-len(".txt")]
        gold_path = folder / f"STS.gs.{subset}.txt"
        pairs = input_path.read_text(encoding="utf-8").splitlines()
        scores = gold_path.read_text(encoding="utf-8").splitlines()
        if len(pairs) != len(scores):
            raise ValueError(f"{year}/{subset}: {len(pairs)} sentence pairs but {len(scores)} gold lines")
        for line, score in zip(pairs, scores):
            if score.strip() == "":  # an unscored pair: SentEval drops it
                continue
            a, b = _split_pair(line, f"{input_path}")
            first.append(a)
            second.append(b)
            gold.append(float(score))
    return first, second, np.asarray(gold, dtype=np.float64)


def _load_stsb(downstream: Path, split: str):
    path = downstream / "STS" / "STSBenchmark" / f"sts-{split}.csv"
    first, second, gold = [], [], []
    with open(path, encoding="utf-8") as f:
        for line in f:
            # Plain tab split, not the csv module: sentences contain unbalanced quotes.
            fields = line.rstrip("\n").split("\t")
            if len(fields) < 7:
                continue
            gold.append(float(fields[4]))
            first.append(" ".join(fields[5].split()))
            second.append(" ".join(fields[6].split()))
    return first, second, np.asarray(gold, dtype=np.float64)


def _load_sick(downstream: Path, split: str):
    name = {"test": "SICK_test_annotated.txt", "dev": "SICK_trial.txt", "train": "SICK_train.txt"}[split]
    path = downstream / "SICK" / name
    lines = path.read_text(encoding="utf-8").splitlines()
    header = lines[0].split("\t")
    col = {h: i for i, h in enumerate(header)}
    first, second, gold = [], [], []
    for line in lines[1:]:
        fields = line.split("\t")
        if len(fields) < len(header):
            continue
        first.append(" ".join(fields[col["sentence_A"]].split()))
        second.append(" ".join(fields[col["sentence_B"]].split()))
        gold.append(float(fields[col["relatedness_score"]]))
    return first, second, np.asarray(gold, dtype=np.float64)


def load_pair_file(path) -> tuple[list[str], list[str], np.ndarray]:
    """A TSV/CSV file with a header naming sentence1, sentence2 and score columns."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pair file not found: {str(path)!r}")
    # QUOTE_NONE for TSV: sentences hold bare quotes that are text, not quoting.
    quoting = csv.QUOTE_NONE if path.suffix.lower() == ".tsv" else csv.QUOTE_MINIMAL
    header, rows = read_table(path, quoting=quoting)
    header = [h.strip().lower() for h in header]
    missing = [c for c in ("sentence1", "sentence2", "score") if c not in header]
    if missing:
        raise ValueError(f"{path}: pair file needs a header with columns sentence1, sentence2, score; "
                         f"missing {missing}, found {header}")
    if not rows:
        raise ValueError(f"{path}: no sentence pairs after the header")
    i1, i2, isc = header.index("sentence1"), header.index("sentence2"), header.index("score")
    gold = np.asarray([_score(row[isc], f"{path}, line {line}") for line, row in rows], dtype=np.float64)
    return [row[i1] for _, row in rows], [row[i2] for _, row in rows], gold


def _score(text: str, where: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"{where}: score {text!r} is not a number") from None


def load_task(task: str, data_dir=None):
    """(first sentences, second sentences, gold scores) of one task name or pair-file path."""
    if task in STS_YEARS:
        return _load_sts_year(_senteval_root(data_dir), task)
    if task in ("STSBenchmark", "STSBenchmark-dev"):
        return _load_stsb(_senteval_root(data_dir), "dev" if task.endswith("-dev") else "test")
    if task in ("SICKRelatedness", "SICKRelatedness-dev"):
        return _load_sick(_senteval_root(data_dir), "dev" if task.endswith("-dev") else "test")
    if str(task).lower().endswith((".tsv", ".csv")):
        return load_pair_file(task)
    raise ValueError(f"unknown task {task!r}: expected one of {SENTEVAL_TASKS + DEV_TASKS} or a .tsv/.csv pair file")


# --------------------------------------------------------------------------------------------
# Models and encoding


# A Hub id is "name" or "org/name" in word characters, '-' and '.' (huggingface_hub's rule).
_HUB_ID = re.compile(r"[\w.-]+(/[\w.-]+)?")


def _not_a_hub_id(name: str) -> str | None:
    """Why a string that names no existing file can only be a local path, or None if it may be a Hub id."""
    if os.path.isabs(name) or name.startswith((".", "~")):
        return "a local path (absolute, or starting with '.' or '~'), not a Hub id"
    if not _HUB_ID.fullmatch(name):
        return "not a Hub id ('name' or 'org/name' of letters, digits, '_', '-', '.')"
    head = name.split("/")[0]
    if "/" in name and Path(head).is_dir():
        return f"{head!r} is a folder here, so this is a path into it, not the Hub id of org {head!r}"
    return None


def model_source(model_or_path) -> str:
    """The folder (``~`` expanded) or Hub id to load from; a missing local folder fails here, at once.

    transformers would try it as a Hub id first: tens of seconds of retries, then a traceback.
    """
    name = str(model_or_path)
    expanded = os.path.expanduser(name)
    if Path(expanded).exists():
        return expanded
    reason = _not_a_hub_id(name)
    if reason is not None:
        shown = f"{name!r} (= {expanded!r})" if expanded != name else repr(name)
        raise FileNotFoundError(f"model folder not found: {shown}: {reason}")
    if _offline() and not _in_hub_cache(name):
        raise FileNotFoundError(f"model {name!r} is not a local folder and not in the local Hugging Face cache "
                                "(offline: HF_HUB_OFFLINE is set)")
    return name


def _offline() -> bool:
    """Whether the Hub may not be reached (huggingface_hub's and transformers' switches)."""
    return any(os.environ.get(name, "").strip().upper() in ("1", "ON", "YES", "TRUE")
               for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _in_hub_cache(repo_id: str) -> bool:
    """Whether the local Hugging Face cache holds the model's config: offline, a Hub id that is
    not there fails at once here instead of after transformers' retries and a traceback."""
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)


def load_model(model_or_path, tokenizer=None, *, device=None):
    """(model, tokenizer) from a path / Hub id, or an already-built model with its tokenizer."""
    from transformers import AutoModel, AutoTokenizer, PreTrainedModel

    if isinstance(model_or_path, (str, os.PathLike)):
        path = model_source(model_or_path)
        if Path(path).exists() and not (Path(path) / "config.json").is_file():
            raise FileNotFoundError(f"{path!r} is not a saved transformers model (no config.json)")
        model = AutoModel.from_pretrained(path)
        tokenizer = tokenizer or AutoTokenizer.from_pretrained(path)
    elif isinstance(model_or_path, PreTrainedModel):
        if tokenizer is None:
            raise ValueError("a model object needs its tokenizer: pass tokenizer=...")
        model = model_or_path
    else:
        raise TypeError(f"model must be a path, a Hub id or a transformers PreTrainedModel, "
                        f"got {type(model_or_path).__name__}")
    if device is not None:
        model.to(device)
    return model, tokenizer


def saved_pooler(path) -> str | None:
    """The pooler a saved model declares: fastcse's own record, else sentence-transformers' pooling."""
    path = Path(path).expanduser()
    record = path / "fastcse.json"
    if record.is_file():
        info = json.loads(record.read_text(encoding="utf-8"))
        return info.get("eval_pooler")
    pooling = path / "1_Pooling" / "config.json"
    if pooling.is_file():
        cfg = json.loads(pooling.read_text(encoding="utf-8"))
        mode = cfg.get("pooling_mode")
        if mode == "mean" or cfg.get("pooling_mode_mean_tokens"):
            return "avg"
        if mode == "cls" or cfg.get("pooling_mode_cls_token"):
            return "cls" if (path / "2_Dense").is_dir() else "cls_before_pooler"
    return None


def resolve_pooler(pooler, model_or_path) -> str:
    if pooler in (None, "auto"):
        found = saved_pooler(model_or_path) if isinstance(model_or_path, (str, os.PathLike)) else None
        return found or "cls"
    return check_pooler(pooler)


def max_model_length(model, tokenizer) -> int:
    """The longest input the model takes (no truncation below it)."""
    limit = getattr(model.config, "max_position_embeddings", None) or 512
    tok_limit = getattr(tokenizer, "model_max_length", None)
    if tok_limit and tok_limit < 1_000_000:  # unset tokenizers report a huge sentinel
        limit = min(limit, tok_limit)
    return int(limit)


@torch.no_grad()
def encode(model, tokenizer, sentences: list[str], *, pooler: str, batch_size: int = 128,
           max_length: int | None = None) -> torch.Tensor:
    """fp32 embeddings [n, d] in eval mode (dropout off). ``pooler='cls'`` uses the MLP head."""
    max_length = max_length or max_model_length(model, tokenizer)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    # Length-sorted batches pad less; the order is undone below.
    order = sorted(range(len(sentences)), key=lambda i: len(sentences[i]))
    out = [None] * len(sentences)
    try:
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            inputs = tokenizer([sentences[i] for i in idx], padding=True, truncation=True,
                               max_length=max_length, return_tensors="pt").to(device)
            emb = pool(model, dict(inputs), pooler, use_mlp=(pooler == "cls")).float().cpu()
            for row, i in enumerate(idx):
                out[i] = emb[row]
    finally:
        model.train(was_training)
    return torch.stack(out) if out else torch.empty(0)


def spearman_x100(predicted, gold) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(np.asarray(predicted, dtype=np.float64), gold).correlation * 100.0)


def task_key(task: str) -> str:
    """The name a task's score is reported under: a SentEval task's name, a pair file's stem."""
    return task if task in SENTEVAL_TASKS + DEV_TASKS else Path(task).stem


def truncated_key(name: str, dim: int) -> str:
    """The name of a score at a truncated dimension: ``"STSBenchmark-dev@256"``, ``"avg@256"``."""
    return f"{name}@{dim}"


def score_names(tasks: Iterable[str], truncate_dims: Iterable[int] = ()) -> list[str]:
    """The names :func:`evaluate_loaded` reports its scores under, in its order: each task, their
    ``avg`` when there are several, then the same at each truncated dimension."""
    names = [task_key(task) for task in tasks]
    names += ["avg"] if len(names) > 1 else []
    return names + [truncated_key(name, dim) for dim in truncate_dims for name in names]


def _check_truncate_dims(truncate_dims) -> tuple[int, ...]:
    dims = tuple(truncate_dims or ())
    if any(isinstance(m, bool) or not isinstance(m, int) or m < 1 for m in dims):
        raise ValueError(f"truncate_dims must be positive ints, got {dims!r}")
    return dims


def _scores_of(emb: torch.Tensor, loaded: dict, where: dict[str, int]) -> dict[str, float]:
    """Each task's Spearman x 100 of the cosine of its pairs' embeddings, and their mean."""
    results = {}
    for task, (first, second, gold) in loaded.items():
        a, b = emb[[where[s] for s in first]], emb[[where[s] for s in second]]
        cosine = torch.nn.functional.cosine_similarity(a, b, dim=-1)
        results[task_key(task)] = spearman_x100(cosine, gold)
    scored = [v for v in results.values() if not math.isnan(v)]
    if len(results) > 1:
        results["avg"] = float(np.mean(scored)) if scored else float("nan")
    return results


def evaluate_loaded(model, tokenizer, tasks: Iterable[str], *, data_dir=None, pooler: str = "cls",
                    batch_size: int = 128, truncate_dims: Iterable[int] = ()) -> dict[str, float]:
    """Scores an in-memory model (used by the trainer between steps).

    Each distinct sentence is encoded once across all tasks (the 7 tasks hold ~27k distinct
    sentences in ~19k pairs). ``truncate_dims``: also score the embeddings truncated to their
    first m coordinates for each m (Matryoshka models; what
    ``SentenceTransformer(path, truncate_dim=m)`` encodes), reported as ``"<task>@<m>"`` (and
    ``"avg@<m>"``) after the full dimension's scores; the encoding is shared."""
    dims = _check_truncate_dims(truncate_dims)
    loaded = {task: load_task(task, data_dir) for task in tasks}
    unique = list(dict.fromkeys(s for first, second, _ in loaded.values() for s in first + second))
    emb = encode(model, tokenizer, unique, pooler=pooler, batch_size=batch_size)
    where = {s: i for i, s in enumerate(unique)}
    if dims and max(dims) > emb.shape[-1]:
        raise ValueError(f"truncate_dims must not exceed the embeddings' dim {emb.shape[-1]}, got {dims!r}")
    results = _scores_of(emb, loaded, where)
    for dim in dims:
        results.update({truncated_key(name, dim): score for name, score in _scores_of(emb[:, :dim], loaded,
                                                                                        where).items()})
    return results


def evaluate(model_or_path, tasks=DEFAULT_TASKS, *, data_dir=None, pooler: str | None = "auto",
             tokenizer=None, batch_size: int = 128, device=None, truncate_dims=()) -> dict[str, float]:
    """Spearman x 100 of cosine similarity per task, and their mean under ``"avg"``.

    Args:
        model_or_path: a saved model folder or Hub id, or a ``PreTrainedModel`` (with ``tokenizer``).
        tasks: SentEval task names (``STS12``..``STS16``, ``STSBenchmark``, ``SICKRelatedness``, their
            ``-dev`` variants for STS-B and SICK-R) and/or paths to TSV/CSV pair files; a single
            name is accepted too.
        data_dir: the folder holding ``SentEval/`` (default ``$FASTCSE_SHARED/data``, ``../shared/data``).
        pooler: one of ``cls`` (MLP head), ``cls_before_pooler``, ``avg``, ``avg_first_last``,
            ``avg_top2``; ``"auto"`` takes what the saved model declares (fastcse's record or
            sentence-transformers' pooling config), else ``cls``.
        truncate_dims: also score the first m coordinates of each embedding for each m (a
            Matryoshka model truncated), reported as ``"<task>@<m>"`` and ``"avg@<m>"``.
    """
    truncate_dims = _check_truncate_dims(truncate_dims)
    if isinstance(tasks, (str, os.PathLike)):
        tasks = [str(tasks)]
    tasks = [str(t) for t in tasks]
    if not tasks:
        raise ValueError("tasks must name at least one task")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    pooler = resolve_pooler(pooler, model_or_path)
    for task in tasks:  # fail on a bad task name before loading the model
        if task not in SENTEVAL_TASKS + DEV_TASKS and not task.lower().endswith((".tsv", ".csv")):
            raise ValueError(f"unknown task {task!r}: expected one of {SENTEVAL_TASKS + DEV_TASKS} "
                             "or a .tsv/.csv pair file")
    model, tokenizer = load_model(model_or_path, tokenizer, device=device)
    return evaluate_loaded(model, tokenizer, tasks, data_dir=data_dir, pooler=pooler, batch_size=batch_size,
                           truncate_dims=truncate_dims)


def alignment(a: torch.Tensor, b: torch.Tensor) -> float:
    """Wang & Isola's alignment: the mean over positive pairs (rows of a and b) of ||a - b||^2."""
    return float((a - b).pow(2).sum(-1).mean())


def uniformity(emb: torch.Tensor) -> float:
    """Wang & Isola's uniformity: log of the mean over all pairs of distinct rows of exp(-2 ||x - y||^2)."""
    sq_dist = torch.pdist(emb, p=2).pow(2)
    # logsumexp - log n: the log-mean without underflow when every pair is far apart
    return float(torch.logsumexp(-2.0 * sq_dist, dim=0) - math.log(sq_dist.numel()))


def alignment_uniformity(model_or_path, *, data_dir=None, split: str = "test", pooler: str | None = "auto",
                         tokenizer=None, positive_threshold: float = 4.0, batch_size: int = 128,
                         device=None) -> dict[str, float]:
    """Wang & Isola's alignment and uniformity on STS-B, as SimCSE reports them (lower is better).

    On normalized embeddings f: alignment = mean over positive pairs (gold score above
    ``positive_threshold``) of ||f(x) - f(y)||^2; uniformity = log of the mean over all pairs of
    distinct sentences of exp(-2 ||f(x) - f(y)||^2).
    """
    if split not in ("dev", "test"):
        raise ValueError(f"split must be 'dev' or 'test', got {split!r}")
    pooler = resolve_pooler(pooler, model_or_path)
    first, second, gold = load_task("STSBenchmark-dev" if split == "dev" else "STSBenchmark", data_dir)
    positive = torch.as_tensor(gold > positive_threshold)
    if not positive.any():
        raise ValueError(f"no STS-B {split} pair scores above positive_threshold={positive_threshold}")
    model, tokenizer = load_model(model_or_path, tokenizer, device=device)
    sentences = list(dict.fromkeys(first + second))
    emb = torch.nn.functional.normalize(encode(model, tokenizer, sentences, pooler=pooler, batch_size=batch_size),
                                        dim=-1).double()
    where = {s: i for i, s in enumerate(sentences)}
    a, b = emb[[where[s] for s in first]][positive], emb[[where[s] for s in second]][positive]
    return {"alignment": alignment(a, b), "uniformity": uniformity(emb)}

__all__ = ["evaluate", "alignment_uniformity", "evaluate_loaded", "encode", "load_task", "load_pair_file",
           "SENTEVAL_TASKS", "DEV_TASKS", "POOLERS"]
