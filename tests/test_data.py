import pytest

from fastcse.data import batch_order, duplicate_groups, load_sup, load_sup_with_labels, load_unsup
from fastcse.evaluation import shared_dir

NLI = shared_dir() / "data" / "nli" / "snli-dev-triples.csv"


def test_unsup_text_file_skips_blank_lines(tmp_path):
    path = tmp_path / "s.txt"
    path.write_text("first sentence\n\n  second one  \n\n", encoding="utf-8")
    assert load_unsup(path) == ["first sentence", "second one"]
    assert load_unsup(str(path)) == ["first sentence", "second one"]


def test_unsup_bad_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        load_unsup(tmp_path / "nope.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n", encoding="utf-8")
    with pytest.raises(ValueError, match="no sentences"):
        load_unsup(empty)
    with pytest.raises(TypeError, match="data must be"):
        load_unsup(42)
    with pytest.raises(TypeError, match="string"):
        load_unsup(["ok", 3])
    table = tmp_path / "t.csv"
    table.write_text("a,b\nx,y\n", encoding="utf-8")
    with pytest.raises(ValueError, match="'text' column"):
        load_unsup(table)


def test_unsup_dataset_and_list():
    from datasets import Dataset

    assert load_unsup(Dataset.from_dict({"text": ["a b", " c "], "id": [1, 2]})) == ["a b", "c"]
    assert load_unsup(Dataset.from_dict({"sentence": ["only column"]})) == ["only column"]
    with pytest.raises(ValueError, match="'text' column"):
        load_unsup(Dataset.from_dict({"x": ["a"], "y": ["b"]}))
    assert load_unsup(["x", "", "y"]) == ["x", "y"]


def test_sup_nli_csv_layout():
    examples = load_sup(NLI)
    assert len(examples) == 2943
    assert examples[0] == ("Two women are embracing while holding to go packages .",
                           "Two woman are holding packages .", "The men are fighting outside a deli .")
    # csv quoting: a sentence with commas stays one field
    assert all(len(ex) == 3 for ex in examples)


def test_sup_pairs_and_bad_csv(tmp_path):
    pairs = tmp_path / "pairs.csv"
    pairs.write_text("sent0,sent1\nhello there,hi\n", encoding="utf-8")
    assert load_sup(pairs) == [("hello there", "hi")]
    bad = tmp_path / "bad.csv"
    bad.write_text("premise,hypothesis\na,b\n", encoding="utf-8")
    with pytest.raises(ValueError, match="sent0,sent1"):
        load_sup(bad)
    header_only = tmp_path / "header.csv"
    header_only.write_text("sent0,sent1,hard_neg\n", encoding="utf-8")
    with pytest.raises(ValueError, match="no complete supervised examples"):
        load_sup(header_only)
    with pytest.raises(FileNotFoundError):
        load_sup(tmp_path / "missing.csv")
    with pytest.raises(ValueError, match="mix pairs and triples"):
        load_sup([("a", "b"), ("a", "b", "c")])
    with pytest.raises(ValueError, match="example 0"):
        load_sup(["just a string"])


def test_sup_dataset():
    from datasets import Dataset

    ds = Dataset.from_dict({"sent0": ["a"], "sent1": ["b"], "hard_neg": ["c"]})
    assert load_sup(ds) == [("a", "b", "c")]
    with pytest.raises(ValueError, match="sent0, sent1"):
        load_sup(Dataset.from_dict({"anchor": ["a"], "positive": ["b"]}))


def test_batch_order_is_a_seeded_permutation_of_full_batches():
    batches = batch_order(10, 3, seed=1, epoch=0)
    assert [len(b) for b in batches] == [3, 3, 3]  # the partial batch is dropped
    assert len(set(sum(batches, []))) == 9 and set(sum(batches, [])) <= set(range(10))
    assert batches == batch_order(10, 3, seed=1, epoch=0)
    assert batches != batch_order(10, 3, seed=1, epoch=1)
    assert batches != batch_order(10, 3, seed=2, epoch=0)


# Malformed files: each problem is a ValueError naming the file and the line, never a bare traceback
# from the codec or the csv module, and never silently merged or truncated rows.


@pytest.mark.parametrize("name, good", [("s.txt", b"fine line\n"), ("s.csv", b"text\nfine line\n"),
                                        ("s.tsv", b"text\nfine line\n")])
def test_unsup_non_utf8_file_names_the_file_and_line(tmp_path, name, good):
    path = tmp_path / name
    path.write_bytes(good + b"also fine\ncaf\xe9 au lait\n")  # Latin-1 bytes on line 3 (CSV: line 4)
    line = 4 if name.endswith(("csv", "tsv")) else 3
    with pytest.raises(ValueError, match=rf"{name}, line {line}: not UTF-8"):
        load_unsup(path)


def test_sup_non_utf8_csv_names_the_line(tmp_path):
    path = tmp_path / "nli.csv"
    path.write_bytes(b"sent0,sent1,hard_neg\na,b,c\nd,\xff\xfe,f\n")
    with pytest.raises(ValueError, match=r"nli.csv, line 3: not UTF-8"):
        load_sup(path)


@pytest.mark.parametrize("loader, text, line, what", [
    (load_sup, "sent0,sent1,hard_neg\na,b,c\na man, a plan,b,c\n", 3, "4 fields.*header has 3"),
    (load_sup, "sent0,sent1\n\n\na,b\nx\n", 5, "1 field.*header has 2"),  # blank lines still count
    (load_unsup, "text\nhello\nhello, world\n", 3, "2 fields.*header has 1"),
    (load_unsup, "text,id\nhello,1\nworld\n", 3, "1 field.*header has 2"),
])
def test_csv_rows_with_the_wrong_field_count_name_the_line(tmp_path, loader, text, line, what):
    path = tmp_path / "data.csv"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ValueError, match=rf"data.csv, line {line}: .*{what}"):
        loader(path)


@pytest.mark.parametrize("loader, text, line", [
    # the quote opened on line 3 swallowed lines 4-5 into one field (the field count still fits)
    (load_sup, 'sent0,sent1\na,b\n"unclosed,x\nc,d\ne,",f\ng,h\n', 3),
    (load_unsup, 'text\nok\n"never closed\nmore\n', 3),  # runs to the end of the file
    (load_unsup, 'text\n"quoted" then more\n', 2),  # text after a closing quote
])
def test_csv_unbalanced_quote_names_the_line(tmp_path, loader, text, line):
    path = tmp_path / "q.csv"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ValueError, match=rf"q.csv, line {line}: .*quot"):
        loader(path)


def test_csv_quoting_that_balances_still_loads(tmp_path):
    path = tmp_path / "ok.csv"
    path.write_text('sent0,sent1\r\n"a man, a plan","he said ""hi"""\r\nplain,row\r\n', encoding="utf-8")
    assert load_sup(path) == [("a man, a plan", 'he said "hi"'), ("plain", "row")]


# Labels: integer ids, equal ids are positives of each other.


def test_sup_labels_from_a_csv_column(tmp_path):
    path = tmp_path / "labelled.csv"
    path.write_text("sent0,sent1,hard_neg,label\na,b,c,7\n,skipped,x,8\nd,e,f, -2 \n", encoding="utf-8")
    assert load_sup_with_labels(path) == ([("a", "b", "c"), ("d", "e", "f")], [7, -2])  # skipped rows lose their label
    assert load_sup(path) == [("a", "b", "c"), ("d", "e", "f")]
    assert load_sup_with_labels(NLI)[1] is None  # no label column: no labels


@pytest.mark.parametrize("value", ["dog", "1.5", "", "0x10"])
def test_sup_csv_labels_must_be_integers(tmp_path, value):
    path = tmp_path / "bad.csv"
    path.write_text(f"sent0,sent1,label\na,b,1\nc,d,{value}\n", encoding="utf-8")
    with pytest.raises(ValueError, match=rf"bad.csv, line 3: label must be an integer id.*{value!r}.*map class names"):
        load_sup_with_labels(path)


def test_sup_labels_from_a_dataset_and_tuples():
    from datasets import Dataset

    ds = Dataset.from_dict({"sent0": ["a", "c"], "sent1": ["b", "d"], "label": [3, 3]})
    assert load_sup_with_labels(ds) == ([("a", "b"), ("c", "d")], [3, 3])
    with pytest.raises(ValueError, match=r"Dataset column 'label', row 0 must be an integer id .*got 0.5"):
        load_sup_with_labels(Dataset.from_dict({"sent0": ["a"], "sent1": ["b"], "label": [0.5]}))
    assert load_sup_with_labels([("a", "b", 1), ("c", "d", 2)]) == ([("a", "b"), ("c", "d")], [1, 2])
    assert load_sup_with_labels([("a", "b", "n", 1)]) == ([("a", "b", "n")], [1])
    assert load_sup_with_labels([("a", "b", "n")]) == ([("a", "b", "n")], None)  # a str last is a hard negative
    with pytest.raises(ValueError, match=r"mix tuples with an int label and tuples without \(example 1"):
        load_sup_with_labels([("a", "b", 1), ("c", "d")])
    with pytest.raises(TypeError, match="example 0 fields must be a string"):
        load_sup_with_labels([("a", "b", True)])  # a bool is no label (and no sentence)
    with pytest.raises(ValueError, match="example 0: label must fit in int64"):
        load_sup_with_labels([("a", "b", 2 ** 63)])


def test_duplicate_groups_are_connected_components_named_by_their_first_row():
    assert duplicate_groups([("x", "x"), ("y", "y"), ("x", "x"), ("z", "z")]) == [0, 1, 0, 3]
    # rows 1 and 3 share a premise, 3 and 0 an entailment: 0 and 1 share no text, yet are one group
    rows = [("p0", "e0"), ("p1", "e1"), ("p2", "e2"), ("p1", "e0"), ("p4", "e2")]
    assert duplicate_groups(rows) == [0, 0, 2, 0, 2]
    assert duplicate_groups([("a", "b"), ("b", "c"), ("c", "d")]) == [0, 0, 0]  # an anchor repeating a positive
    assert duplicate_groups([]) == []
