"""Reading datasets: formats, the bundled data, and errors that name file, line and column."""

import pytest

from peftcore.errors import DataError
from peftcore.train import data


def test_bundled_dataset_shape():
    train, val = data.bundled("train"), data.bundled("validation")
    assert len(train) == 320 and len(val) == 80
    assert data.label_set(train, val) == ["finance", "food", "sports", "technology", "weather"]
    assert not set(t.lower() for t in train.texts) & set(t.lower() for t in val.texts)


def test_csv_tsv_jsonl(tmp_path):
    (tmp_path / "a.csv").write_text('sentence,tag\n"hello, world",x\nbye,y\n')
    ds = data.read_dataset(tmp_path / "a.csv", "sentence", "tag")
    assert ds.texts == ["hello, world", "bye"] and ds.labels == ["x", "y"] and ds.lines == [2, 3]
    (tmp_path / "a.tsv").write_text("text\tlabel\nhi\t1\n")
    assert data.read_dataset(tmp_path / "a.tsv").labels == ["1"]
    (tmp_path / "a.jsonl").write_text('{"text": "x", "label": 3}\n\n{"text": "y", "label": 4}\n')
    assert data.read_dataset(tmp_path / "a.jsonl").labels == ["3", "4"]


@pytest.mark.parametrize("name, content, match", [
    ("missing.csv", None, "does not exist"),
    ("a.csv", "text,label\n", "holds no rows"),
    ("b.csv", "sentence,label\nhi,x\n", r"b.csv:2: no column 'text' \(columns: sentence, label\).*--text-column"),
    ("c.csv", "text,tag\nhi,x\n", r"c.csv:2: no column 'label'.*--label-column"),
    ("d.csv", "text,label\nhi,x\n  ,y\n", r"d.csv:3: empty text"),
    ("e.jsonl", '{"text": "a", "label": "x"}\n[1, 2]\n', r"e.jsonl:2: each line must be a JSON object"),
    ("f.jsonl", '{"text": "a", "label": "x"}\n{oops\n', r"f.jsonl:2: not valid JSON"),
    ("g.txt", "x", "unknown file type '.txt'"),
])
def test_errors_name_file_line_and_column(tmp_path, name, content, match):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    with pytest.raises(DataError, match=match):
        data.read_dataset(path)


def test_wrong_encoding_names_the_line(tmp_path):
    path = tmp_path / "latin.csv"
    path.write_bytes("text,label\nfine,a\ncaf\xe9,b\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin.csv:3: not valid UTF-8"):
        data.read_dataset(path)


def test_unknown_validation_label_names_file_and_line(tmp_path):
    (tmp_path / "t.csv").write_text("text,label\na,x\nb,y\n")
    (tmp_path / "v.csv").write_text("text,label\nc,x\nd,z\n")
    train, val = data.read_dataset(tmp_path / "t.csv"), data.read_dataset(tmp_path / "v.csv")
    with pytest.raises(DataError, match=r"v.csv:3: label 'z' does not occur in the training data"):
        data.label_set(train, val)


def test_stratified_split_is_seeded():
    train = data.bundled("train")
    a, b = data.split_dataset(train, 0.2, seed=1)
    assert len(a) + len(b) == len(train) and len(b) == 5 * round(64 * 0.2)
    assert data.split_dataset(train, 0.2, seed=1)[1].texts == b.texts


def test_a_byte_order_mark_is_accepted(tmp_path):
    path = tmp_path / "bom.csv"
    path.write_bytes("\ufefftext,label\nhello,a\n".encode("utf-8"))
    assert data.read_dataset(path).texts == ["hello"]


def test_regression_labels_become_floats_and_bad_ones_name_the_line(tmp_path):
    (tmp_path / "r.csv").write_text("text,label\na,0.5\nb,2\nc,high\n")
    ds = data.read_dataset(tmp_path / "r.csv")
    with pytest.raises(DataError, match=r"r.csv:4: label 'high' is not a number"):
        data.numeric_labels(ds)
    good = ds.subset([0, 1])

    def tokenizer(texts, **kwargs):
        import torch

        return {"input_ids": torch.ones(len(texts), 2, dtype=torch.long)}

    batch = data.batches(good, tokenizer, None, batch_size=4)[0]
    assert batch.labels.dtype.is_floating_point and batch.labels.tolist() == [0.5, 2.0]
