"""Text-classification data: reading CSV/JSONL files, the bundled dataset, batching.

Every problem with a file is reported as a :class:`peftcore.DataError` naming the file, and the
line or column where it applies.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import random
from pathlib import Path
from typing import Iterator, Sequence

import torch

from peftcore.errors import DataError

BUNDLED = Path(__file__).resolve().parent.parent / "data" / "topics"


@dataclasses.dataclass
class TextDataset:
    """Texts with string labels, and where they came from (for error messages).

    Attributes:
        texts: the texts.
        labels: one label string per text.
        source: file the rows came from.
        lines: the line number of each row in ``source``.
    """

    texts: list[str]
    labels: list[str]
    source: str = "<memory>"
    lines: list[int] = dataclasses.field(default_factory=list)

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, indices: Sequence[int]) -> "TextDataset":
        lines = [self.lines[i] for i in indices] if self.lines else []
        return TextDataset([self.texts[i] for i in indices], [self.labels[i] for i in indices], self.source, lines)


def _read_rows(path: Path) -> Iterator[tuple[int, dict]]:
    suffix = path.suffix.lower()
    try:
        with open(path, encoding="utf-8-sig", newline="") as fh:  # -sig: accept a byte-order mark
            if suffix in {".jsonl", ".json", ".ndjson"}:
                for number, line in enumerate(fh, start=1):
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise DataError(f"{path}:{number}: not valid JSON ({exc.msg})") from exc
                    if not isinstance(row, dict):
                        raise DataError(f"{path}:{number}: each line must be a JSON object, got {type(row).__name__}")
                    yield number, row
            elif suffix in {".csv", ".tsv"}:
                reader = csv.DictReader(fh, delimiter="\t" if suffix == ".tsv" else ",")
                for row in reader:
                    yield reader.line_num, row
            else:
                raise DataError(f"{path}: unknown file type {suffix!r}; use .csv, .tsv or .jsonl")
    except UnicodeDecodeError as exc:
        line = _line_of_byte(path, exc.start)
        raise DataError(f"{path}:{line}: not valid UTF-8 (byte {exc.object[exc.start:exc.start + 1]!r}); save the file as UTF-8") from exc


def _line_of_byte(path: Path, offset: int) -> int:
    # UnicodeDecodeError offsets are relative to the chunk being decoded; re-scan the raw bytes.
    data = path.read_bytes()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        offset = exc.start
    return data[:offset].count(b"\n") + 1


def read_dataset(path: str | Path, text_column: str = "text", label_column: str = "label") -> TextDataset:
    """Reads a CSV/TSV/JSONL file of texts and labels.

    Raises:
        DataError: the file is missing, not UTF-8, malformed, lacks a column, has an empty text
            or label, or holds no rows; the message names the file, line and column.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {str(path)!r} does not exist")
    texts, labels, lines = [], [], []
    for number, row in _read_rows(path):
        for column in (text_column, label_column):
            if column not in row:
                present = ", ".join(map(str, row)) or "none"
                raise DataError(
                    f"{path}:{number}: no column {column!r} (columns: {present}); choose it with "
                    f"--{'text' if column == text_column else 'label'}-column"
                )
        text, label = row[text_column], row[label_column]
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{path}:{number}: empty text in column {text_column!r}")
        if label is None or (isinstance(label, str) and not label.strip()):
            raise DataError(f"{path}:{number}: empty label in column {label_column!r}")
        texts.append(text)
        labels.append(str(label).strip())
        lines.append(number)
    if not texts:
        raise DataError(f"data file {str(path)!r} holds no rows")
    return TextDataset(texts, labels, str(path), lines)


def bundled(split: str) -> TextDataset:
    """A split (``"train"`` or ``"validation"``) of the bundled "peftcore topics" dataset."""
    return read_dataset(BUNDLED / f"{split}.jsonl")


def split_dataset(data: TextDataset, validation_fraction: float, seed: int) -> tuple[TextDataset, TextDataset]:
    """A stratified random split into train and validation parts."""
    rng = random.Random(seed)
    by_label: dict[str, list[int]] = {}
    for i, label in enumerate(data.labels):
        by_label.setdefault(label, []).append(i)
    train_idx, val_idx = [], []
    for indices in by_label.values():
        rng.shuffle(indices)
        n_val = max(1, round(len(indices) * validation_fraction)) if len(indices) > 1 else 0
        val_idx += indices[:n_val]
        train_idx += indices[n_val:]
    if not val_idx or not train_idx:
        raise DataError(f"{data.source}: too few rows ({len(data)}) to split off a validation set; pass --validation-data")
    return data.subset(sorted(train_idx)), data.subset(sorted(val_idx))


def label_set(train: TextDataset, validation: TextDataset | None = None) -> list[str]:
    """The sorted labels of the training data; validation labels must be among them.

    Raises:
        DataError: a validation label that the training data does not have (file and line named).
    """
    labels = sorted(set(train.labels))
    if len(labels) < 2:
        raise DataError(f"{train.source}: classification needs at least 2 labels, found {labels}")
    if validation is not None:
        known = set(labels)
        for i, label in enumerate(validation.labels):
            if label not in known:
                line = validation.lines[i] if validation.lines else i + 1
                raise DataError(
                    f"{validation.source}:{line}: label {label!r} does not occur in the training data "
                    f"{train.source} (labels: {', '.join(labels)})"
                )
    return labels


@dataclasses.dataclass
class Batch:
    """A tokenised batch: model inputs and integer labels."""

    inputs: dict[str, torch.Tensor]
    labels: torch.Tensor


def numeric_labels(data: TextDataset) -> list[float]:
    """The labels as numbers, for regression.

    Raises:
        DataError: a label that is not a finite number (file and line named).
    """
    values = []
    for i, label in enumerate(data.labels):
        try:
            value = float(label)
        except ValueError:
            value = float("nan")
        if value != value or value in (float("inf"), float("-inf")):
            line = data.lines[i] if data.lines else i + 1
            raise DataError(f"{data.source}:{line}: label {label!r} is not a number; a regression task needs numeric labels")
        values.append(value)
    return values


def batches(
    data: TextDataset,
    tokenizer,
    label_ids: dict[str, int] | None,
    batch_size: int,
    max_length: int = 128,
    shuffle: bool = False,
    seed: int = 0,
) -> list[Batch]:
    """Tokenises ``data`` into padded batches (shuffled with ``seed`` when asked).

    Args:
        label_ids: label name -> class id; ``None`` for regression (labels parsed as numbers,
            float32 targets).
    """
    order = list(range(len(data)))
    if shuffle:
        random.Random(seed).shuffle(order)
    numbers = numeric_labels(data) if label_ids is None else None
    out = []
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        enc = tokenizer([data.texts[i] for i in idx], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        if numbers is not None:
            labels = torch.tensor([numbers[i] for i in idx], dtype=torch.float32)
        else:
            labels = torch.tensor([label_ids[data.labels[i]] for i in idx], dtype=torch.long)
        out.append(Batch(dict(enc), labels))
    return out
