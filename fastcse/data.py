"""Training data: loading, validation and the batch order.

Unsupervised SimCSE takes sentences: a text file (one a line), a ``datasets.Dataset`` with a
``text`` column (or a single string column), or a list of strings. Supervised SimCSE takes
``(sent0, sent1, hard_neg)`` triples: a CSV in the layout of SimCSE's ``nli_for_simcse.csv``
(header ``sent0,sent1,hard_neg``; without ``hard_neg`` it trains on pairs), a Dataset with
those columns, or a list of tuples; optionally with integer labels (a ``label`` column, or an
int last in each tuple), whose equal values mark positives. Every problem is reported before
training starts. :func:`duplicate_groups` finds the rows of a batch that repeat a text.
"""

from __future__ import annotations

import csv
import io
import numbers
import os
import re
from pathlib import Path
from typing import Sequence

import torch

SUP_COLUMNS = ("sent0", "sent1", "hard_neg")
LABEL_COLUMN = "label"
_INTEGER_TEXT = re.compile(r"[+-]?[0-9]+")
_INT64_RANGE = (-2 ** 63, 2 ** 63 - 1)


def _as_path(data) -> Path | None:
    if isinstance(data, (str, os.PathLike)):
        path = Path(data)
        if not path.is_file():
            raise FileNotFoundError(f"data file not found: {str(path)!r}")
        return path
    return None


def _is_dataset(data) -> bool:
    return hasattr(data, "column_names") and hasattr(data, "__getitem__") and hasattr(data, "__len__")


def _clean(text, where: str) -> str:
    if not isinstance(text, str):
        raise TypeError(f"{where} must be a string, got {type(text).__name__}")
    return text.strip()


def load_unsup(data, *, column: str | None = None) -> list[str]:
    """Sentences for unsupervised SimCSE; blank lines are skipped."""
    path = _as_path(data)
    if path is not None:
        if path.suffix.lower() in (".csv", ".tsv"):
            header, rows = read_table(path)
            name = column or ("text" if "text" in header else (header[0] if len(header) == 1 else None))
            if name not in header:
                raise ValueError(f"{path}: unsupervised CSV needs a 'text' column (or a single column), "
                                 f"found columns {header}")
            index = header.index(name)
            sentences = [row[index].strip() for _, row in rows]
        else:
            sentences = [line.strip() for line in _text_lines(path)]
        where = str(path)
    elif _is_dataset(data):
        string_columns = [c for c in data.column_names if data.features[c].dtype in ("string", "large_string")] \
            if hasattr(data, "features") else list(data.column_names)
        name = column or ("text" if "text" in data.column_names else
                          (string_columns[0] if len(string_columns) == 1 else None))
        if name not in data.column_names:
            raise ValueError(f"unsupervised Dataset needs a 'text' column (or a single string column; pass "
                             f"column=...), found columns {list(data.column_names)}")
        sentences = [_clean(t, f"Dataset column {name!r} values") for t in data[name]]
        where = "the Dataset"
    elif isinstance(data, Sequence) and not isinstance(data, (str, bytes)):
        sentences = [_clean(t, "each sentence") for t in data]
        where = "the sentence list"
    else:
        raise TypeError(f"data must be a file path, a datasets.Dataset or a list of sentences, got {type(data).__name__}")
    sentences = [s for s in sentences if s]
    if not sentences:
        raise ValueError(f"{where} holds no sentences: unsupervised training needs at least one non-blank line")
    return sentences


def read_utf8(path: Path) -> str:
    """The file's text; a byte that is not UTF-8 is reported with its line, not as a codec traceback."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise ValueError(f"{path}, line {line}: not UTF-8 text (byte {raw[e.start]:#04x}): "
                         "re-save the file as UTF-8") from None


def _text_lines(path: Path) -> list[str]:
    # StringIO with newline=None splits like open(): on \n, \r\n and \r only (str.splitlines
    # would also split inside a sentence at \u2028, \x0c and the like).
    return list(io.StringIO(read_utf8(path), newline=None))


def read_table(path: Path, *, quoting: int = csv.QUOTE_MINIMAL) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """A CSV/TSV file's header and its non-blank rows as (line number, fields).

    Every row must have as many fields as the header, and each row must sit on one line: the
    fields are sentences, so a field holding a line break is a quote left open that swallowed
    the lines after it. Both are reported with the line, as is malformed quoting.
    """
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    reader = csv.reader(io.StringIO(read_utf8(path), newline=""), delimiter=delimiter, quoting=quoting,
                        strict=True)
    header, rows = None, []
    while True:
        line = reader.line_num + 1
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            raise ValueError(f"{path}, line {line}: malformed quoting ({e}): a field that starts with a quote "
                             "must end with one, and a quote inside it is written twice") from None
        if reader.line_num > line:
            raise ValueError(f"{path}, line {line}: a quote opened on this line is closed on line "
                             f"{reader.line_num}, so the lines between merge into one field (unbalanced quote?)")
        if not row:
            continue
        if header is None:
            header = row
        elif len(row) != len(header):
            hint = "" if quoting == csv.QUOTE_NONE else f"; quote a field that contains {delimiter!r}"
            raise ValueError(f"{path}, line {line}: {len(row)} field{'s' * (len(row) != 1)} but the header has "
                             f"{len(header)} ({delimiter!r}-separated{hint})")
        else:
            rows.append((line, row))
    return header or [], rows


def load_sup(data) -> list[tuple[str, ...]]:
    """(sent0, sent1, hard_neg) triples, or (sent0, sent1) pairs when there is no ``hard_neg``.

    Rows with an empty sentence are skipped; all rows must have the same arity. A ``label``
    column (or an int last in each tuple) is read by :func:`load_sup_with_labels` and left out
    here.
    """
    return load_sup_with_labels(data)[0]


def load_sup_with_labels(data) -> tuple[list[tuple[str, ...]], list[int] | None]:
    """The supervised examples (as :func:`load_sup`) and their labels, or None without labels.

    Labels are integer ids (examples with the same id are positives of each other, SupCon): a
    ``label`` column of a CSV (integer text such as ``7`` or ``-2``) or of a Dataset (an integer
    column), or an int as the last element of every tuple (``(sent0, sent1, 7)``,
    ``(sent0, sent1, hard_neg, 7)``). Anything else (``"dog"``, ``1.5``, a blank) is a ValueError
    naming the row: class names are not mapped silently, since a mapping that depended on the
    order of first appearance would change with the data's order; map them to ints first.
    """
    path = _as_path(data)
    if path is not None:
        examples, labels = _sup_from_table(path)
        where = str(path)
    elif _is_dataset(data):
        examples, labels = _sup_from_dataset(data)
        where = "the Dataset"
    elif isinstance(data, Sequence) and not isinstance(data, (str, bytes)):
        examples, labels = _sup_from_tuples(data)
        where = "the example list"
    else:
        raise TypeError(f"data must be a CSV path, a datasets.Dataset or a list of tuples, got {type(data).__name__}")
    complete = [i for i, ex in enumerate(examples) if all(ex)]
    if not complete:
        raise ValueError(f"{where} holds no complete supervised examples (rows with every sentence non-empty)")
    return [examples[i] for i in complete], None if labels is None else [labels[i] for i in complete]


def _sup_from_table(path: Path) -> tuple[list[tuple[str, ...]], list[int] | None]:
    header, rows = read_table(path)
    header = [h.strip() for h in header]
    if not {"sent0", "sent1"} <= set(header):
        raise ValueError(f"{path}: supervised CSV needs a header with columns sent0,sent1[,hard_neg][,label] "
                         f"(SimCSE's nli_for_simcse.csv layout), found {header}")
    index = [header.index(c) for c in SUP_COLUMNS if c in header]
    examples = [tuple(row[i].strip() for i in index) for _, row in rows]
    if LABEL_COLUMN not in header:
        return examples, None
    column = header.index(LABEL_COLUMN)
    labels = [_integer_label(_int_from_text(row[column]), f"{path}, line {line}: label") for line, row in rows]
    return examples, labels


def _sup_from_dataset(data) -> tuple[list[tuple[str, ...]], list[int] | None]:
    if not {"sent0", "sent1"} <= set(data.column_names):
        raise ValueError(f"supervised Dataset needs columns sent0, sent1 and optionally hard_neg and label, "
                         f"found {list(data.column_names)}")
    names = [c for c in SUP_COLUMNS if c in data.column_names]
    columns = [[_clean(t, f"Dataset column {c!r} values") for t in data[c]] for c in names]
    examples = list(zip(*columns))
    if LABEL_COLUMN not in data.column_names:
        return examples, None
    labels = [_integer_label(value, f"Dataset column 'label', row {i}") for i, value in enumerate(data[LABEL_COLUMN])]
    return examples, labels


def _sup_from_tuples(data) -> tuple[list[tuple[str, ...]], list[int] | None]:
    examples, labels = [], []
    for i, ex in enumerate(data):
        if isinstance(ex, (str, bytes)) or not isinstance(ex, Sequence):
            raise ValueError(f"supervised examples must be (sent0, sent1) or (sent0, sent1, hard_neg) tuples, "
                             f"optionally with an int label last; example {i} is {ex!r}")
        texts, label = (ex[:-1], ex[-1]) if ex and _is_int(ex[-1]) else (ex, None)
        if len(texts) not in (2, 3):
            raise ValueError(f"supervised examples must be (sent0, sent1) or (sent0, sent1, hard_neg) tuples, "
                             f"optionally with an int label last; example {i} is {ex!r}")
        examples.append(tuple(_clean(t, f"example {i} fields") for t in texts))
        labels.append(None if label is None else _integer_label(label, f"example {i}: label"))
    if len({len(ex) for ex in examples}) > 1:
        raise ValueError("supervised examples mix pairs and triples: give every example a hard negative or none")
    unlabelled = [i for i, label in enumerate(labels) if label is None]
    if unlabelled and len(unlabelled) < len(labels):
        raise ValueError(f"supervised examples mix tuples with an int label and tuples without (example "
                         f"{unlabelled[0]} has none): give every example a label or none")
    return examples, None if unlabelled else labels


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _int_from_text(text: str):
    """A CSV label field as an int when it is integer text, else the text (which the check then reports)."""
    stripped = text.strip()
    return int(stripped) if _INTEGER_TEXT.fullmatch(stripped) else text


def _integer_label(value, where: str) -> int:
    if not _is_int(value):
        raise ValueError(f"{where} must be an integer id (examples with the same id are positives of each "
                         f"other), got {value!r}: map class names to integers first")
    if not _INT64_RANGE[0] <= int(value) <= _INT64_RANGE[1]:
        raise ValueError(f"{where} must fit in int64, got {value!r}")
    return int(value)


def duplicate_groups(rows: Sequence[Sequence[str]]) -> list[int]:
    """The duplicate group of each row, for masking false negatives.

    ``rows[i]`` holds the texts of row i (unsupervised: its sentence; supervised: its anchor
    and its positive). Rows that share a text are in one group, and so are rows linked through a
    chain of shared texts (row 0 and row 1 share a premise, row 1 and row 2 an entailment: all
    three are one group), i.e. the connected components, found by union-find. A group's id is
    the index of its first row, so the ids depend only on the texts in order (every rank of a
    distributed run computes the same ids from the same global batch). O(number of texts).
    """
    parent = list(range(len(rows)))
    first_row: dict[str, int] = {}
    for i, texts in enumerate(rows):
        for text in texts:
            j = first_row.setdefault(text, i)
            if j != i:
                _union(parent, i, j)
    return [_root(parent, i) for i in range(len(rows))]


def _root(parent: list[int], i: int) -> int:
    while parent[i] != i:
        parent[i] = parent[parent[i]]  # path halving: later look-ups take fewer hops
        i = parent[i]
    return i


def _union(parent: list[int], i: int, j: int) -> None:
    """Joins the groups of rows i and j under the smaller root: every root stays its group's first row."""
    a, b = _root(parent, i), _root(parent, j)
    if a != b:
        parent[max(a, b)] = min(a, b)


def batch_order(num_examples: int, batch_size: int, *, seed: int, epoch: int) -> list[list[int]]:
    """The batches of one epoch: a seeded permutation, cut into full batches.

    The last partial batch is dropped: a contrastive batch needs its size's worth of in-batch
    negatives, and a fixed order per (seed, epoch) is what lets ``resume_from`` skip exactly the
    batches already trained on.
    """
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(num_examples, generator=generator).tolist()
    return [order[i:i + batch_size] for i in range(0, num_examples - batch_size + 1, batch_size)]
