"""Training data: loading, validation and the batch order.

Unsupervised SimCSE takes sentences: a text file (one a line), a ``datasets.Dataset`` with a
``text`` column (or a single string column), or a list of strings. Supervised SimCSE takes
``(sent0, sent1, hard_neg)`` triples: a CSV in the layout of SimCSE's ``nli_for_simcse.csv``
(header ``sent0,sent1,hard_neg``; without ``hard_neg`` it trains on pairs), a Dataset with
those columns, or a list of tuples. Every problem is reported before training starts.
"""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import Sequence

import torch

SUP_COLUMNS = ("sent0", "sent1", "hard_neg")


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

    Rows with an empty sentence are skipped; all rows must have the same arity.
    """
    path = _as_path(data)
    if path is not None:
        header, rows = read_table(path)
        header = [h.strip() for h in header]
        if not {"sent0", "sent1"} <= set(header):
            raise ValueError(f"{path}: supervised CSV needs a header with columns sent0,sent1[,hard_neg] "
                             f"(SimCSE's nli_for_simcse.csv layout), found {header}")
        names = [c for c in SUP_COLUMNS if c in header]
        index = [header.index(c) for c in names]
        examples = [tuple(row[i].strip() for i in index) for _, row in rows]
        where = str(path)
    elif _is_dataset(data):
        if not {"sent0", "sent1"} <= set(data.column_names):
            raise ValueError(f"supervised Dataset needs columns sent0, sent1 and optionally hard_neg, "
                             f"found {list(data.column_names)}")
        names = [c for c in SUP_COLUMNS if c in data.column_names]
        columns = [[_clean(t, f"Dataset column {c!r} values") for t in data[c]] for c in names]
        examples = list(zip(*columns))
        where = "the Dataset"
    elif isinstance(data, Sequence) and not isinstance(data, (str, bytes)):
        examples = []
        for i, ex in enumerate(data):
            if isinstance(ex, (str, bytes)) or not isinstance(ex, Sequence) or len(ex) not in (2, 3):
                raise ValueError(f"supervised examples must be (sent0, sent1) or (sent0, sent1, hard_neg) tuples; "
                                 f"example {i} is {ex!r}")
            examples.append(tuple(_clean(t, f"example {i} fields") for t in ex))
        if len({len(ex) for ex in examples}) > 1:
            raise ValueError("supervised examples mix pairs and triples: give every example a hard negative or none")
        where = "the example list"
    else:
        raise TypeError(f"data must be a CSV path, a datasets.Dataset or a list of tuples, got {type(data).__name__}")
    examples = [ex for ex in examples if all(ex)]
    if not examples:
        raise ValueError(f"{where} holds no complete supervised examples (rows with every sentence non-empty)")
    return examples


def batch_order(num_examples: int, batch_size: int, *, seed: int, epoch: int) -> list[list[int]]:
    """The batches of one epoch: a seeded permutation, cut into full batches.

    The last partial batch is dropped: a contrastive batch needs its size's worth of in-batch
    negatives, and a fixed order per (seed, epoch) is what lets ``resume_from`` skip exactly the
    batches already trained on.
    """
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(num_examples, generator=generator).tolist()
    return [order[i:i + batch_size] for i in range(0, num_examples - batch_size + 1, batch_size)]
