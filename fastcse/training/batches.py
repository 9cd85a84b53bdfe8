"""Which examples each step trains on, their tokens (prepared one step ahead) and what the loss
needs to know about the step's rows (duplicate groups, labels, queue keys)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from fastcse import data as datalib
from fastcse import encoding as encoding_lib


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


def rows_per_rank(batch_size: int, world: int) -> list[int]:
    """How many of a global batch's rows each rank holds (rank r: rows [r*B//W, (r+1)*B//W))."""
    return [(r + 1) * batch_size // world - r * batch_size // world for r in range(world)]


def data_fingerprint(examples, labels: list[int] | None = None) -> str:
    """A short hash of the training examples in order (and their labels, when they have some:
    data without labels hashes as before): resuming on other data is another run."""
    digest = hashlib.sha256()
    for example in examples:
        text = example if isinstance(example, str) else "\x1f".join(example)
        digest.update(text.encode("utf-8") + b"\x1e")
    if labels is not None:
        digest.update(b"labels:" + ",".join(map(str, labels)).encode("ascii"))
    return digest.hexdigest()[:16]


def load_training_data(data, mode: str, batch_size: int) -> tuple[list, list[int] | None, int]:
    """The examples, their labels (None without) and the sequences each example encodes (views)."""
    examples, labels = (datalib.load_unsup(data), None) if mode == "unsup" else datalib.load_sup_with_labels(data)
    if len(examples) < batch_size:
        raise ValueError(f"the dataset has {len(examples)} examples, fewer than batch_size={batch_size}: "
                         "one contrastive batch needs batch_size examples")
    views = 2 if mode == "unsup" else len(examples[0])
    return examples, labels, views


def check_mini_batch_tokens(mini_batch_tokens, tokenizer, examples, mode, max_seq_length) -> None:
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


