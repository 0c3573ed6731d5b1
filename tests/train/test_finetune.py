"""End to end: ``peftcore finetune`` on a small subset, through the console entry point."""

import json
import subprocess
import sys

import pytest
import peftcore
from models import minilm, minilm_tokenizer
from peftcore.cli import main
from peftcore.train import data
from peftcore.train.loop import evaluate


def _subset(tmp_path, per_class_train=8, per_class_val=4):
    def take(ds, n):
        seen, rows = {}, []
        for text, label in zip(ds.texts, ds.labels):
            if seen.get(label, 0) < n:
                seen[label] = seen.get(label, 0) + 1
                rows.append({"text": text, "label": label})
        return rows

    for name, ds, n in (("train", data.bundled("train"), per_class_train), ("val", data.bundled("validation"), per_class_val)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in take(ds, n)))
    return tmp_path / "train.jsonl", tmp_path / "val.jsonl"


@pytest.mark.slow
def test_finetune_end_to_end_on_a_subset(tmp_path, capsys):
    train, val = _subset(tmp_path)
    out = tmp_path / "run"
    code = main(["finetune", "--data", str(train), "--validation-data", str(val), "--epochs", "3",
                 "--lr", "3e-3", "--out", str(out), "--no-progress", "--seed", "1"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "validation accuracy before fine-tuning" in printed and "validation accuracy after fine-tuning" in printed
    assert "trainable parameters:" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["accuracy_after"] > metrics["accuracy_before"]
    assert len(metrics["history"]) == 3
    assert json.loads((out / "config.json").read_text())["epochs"] == 3
    # the saved adapter and head reproduce the run's validation accuracy on a fresh base model
    model = minilm(num_labels=5)
    peftcore.load(model, out / "adapter")
    labels = json.loads((out / "config.json").read_text())["labels"]
    val_data = data.read_dataset(val)
    batches = data.batches(val_data, minilm_tokenizer(), {l: i for i, l in enumerate(labels)}, 16, 64)
    report, _ = evaluate(model, batches, labels, progress=False)
    assert report.accuracy == metrics["accuracy_after"]
    # an existing run directory is not overwritten without --overwrite
    assert main(["finetune", "--data", str(train), "--validation-data", str(val), "--out", str(out), "--no-progress"]) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err


@pytest.mark.slow
def test_python_dash_m_entry_point(tmp_path):
    result = subprocess.run([sys.executable, "-m", "peftcore", "finetune", "--help"], capture_output=True, text=True, check=True)
    assert "--rank" in result.stdout and "--data" in result.stdout
    result = subprocess.run(["peftcore", "methods"], capture_output=True, text=True, check=True)
    assert "lora" in result.stdout and "peftcore" in result.stdout


@pytest.mark.parametrize("args, message", [
    (["--data", "nope.csv"], "data file 'nope.csv' does not exist"),
    (["--epochs", "0"], "--epochs must be a positive integer"),
    (["--model", "/nonexistent"], "is not a transformers model directory"),
])
def test_finetune_bad_input_exits_with_clear_error(tmp_path, capsys, args, message):
    code = main(["finetune", "--out", str(tmp_path / "r"), "--no-progress", *args])
    assert code == 2
    assert message in capsys.readouterr().err


def test_missing_column_error(tmp_path, capsys):
    (tmp_path / "d.csv").write_text("sentence,label\nhello,a\n")
    assert main(["finetune", "--data", str(tmp_path / "d.csv"), "--out", str(tmp_path / "r"), "--no-progress"]) == 2
    assert "no column 'text'" in capsys.readouterr().err
