"""``peftcore finetune`` end to end: the run directory, strategies, early stopping, the options, bad data."""

import json
import re
import subprocess
import sys

import pytest
from safetensors import safe_open

import peftcore
from models import minilm, minilm_tokenizer
from peftcore.cli import main
from peftcore.train import data, load_weights
from peftcore.train.finetune import load_classifier
from peftcore.train.loop import evaluate
from train_models import write_subset

pytestmark = pytest.mark.usefixtures("single_thread")


def _finetune(*args):
    return main(["finetune", "--no-progress", "--seed", "1", *map(str, args)])


def _accuracy(model, tokenizer, val_path, labels):
    batches = data.batches(data.read_dataset(val_path), tokenizer, {l: i for i, l in enumerate(labels)}, 16, 64)
    return evaluate(model, batches, labels, progress=False)[0].accuracy


@pytest.mark.slow
def test_finetune_end_to_end_on_a_subset(tmp_path, capsys):
    train, val = write_subset(tmp_path)
    out = tmp_path / "run"
    assert _finetune("--data", train, "--validation-data", val, "--epochs", 3, "--lr", "3e-3", "--out", out) == 0
    printed = capsys.readouterr().out
    assert "validation accuracy before fine-tuning" in printed and "validation accuracy after fine-tuning" in printed
    assert "trainable parameters:" in printed and "confusion" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["accuracy_after"] > metrics["accuracy_before"]
    assert len(metrics["history"]) == 3 and metrics["saved"] == "adapter"
    assert sorted(p.name for p in out.iterdir()) == ["adapter", "config.json", "curves.png", "metrics.json"]
    config = json.loads((out / "config.json").read_text())
    assert config["epochs"] == 3 and config["strategy"] == "lora" and config["lr"] == 3e-3
    # the saved adapter and head reproduce the run's validation accuracy on a fresh base model
    model = minilm(num_labels=5)
    peftcore.load(model, out / "adapter")
    assert _accuracy(model, minilm_tokenizer(), val, config["labels"]) == metrics["accuracy_after"]
    # an existing run directory is not overwritten without --overwrite
    assert _finetune("--data", train, "--validation-data", val, "--out", out) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err


def test_layer_strategy_saves_only_its_trained_weights(tmp_path, tiny_model_dir):
    train, val = write_subset(tmp_path, 4, 2)
    out = tmp_path / "run"
    assert _finetune("--model", tiny_model_dir, "--data", train, "--validation-data", val, "--strategy", "partial",
                     "--freeze-blocks", 1, "--epochs", 2, "--out", out) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["saved"] == "weights.safetensors" and (out / "curves.png").is_file()
    with safe_open(str(out / "weights.safetensors"), "pt") as fh:
        keys = set(fh.keys())
        assert fh.metadata()["strategy"] == "partial"
    labels = json.loads((out / "config.json").read_text())["labels"]
    model, tokenizer = load_classifier(str(tiny_model_dir), labels)
    expected = {n for n, _ in model.named_parameters() if not n.startswith(("bert.embeddings.", "bert.encoder.layer.0."))}
    assert keys == expected and metrics["trainable_parameters"] == sum(p.numel() for n, p in model.named_parameters() if n in keys)
    load_weights(model, out / "weights.safetensors")
    assert _accuracy(model, tokenizer, val, labels) == metrics["accuracy_after"]


def test_early_stopping_restores_the_best_epoch(tmp_path, tiny_model_dir):
    train, val = write_subset(tmp_path, 4, 2)
    out = tmp_path / "run"
    assert _finetune("--model", tiny_model_dir, "--data", train, "--validation-data", val, "--strategy", "full", "--lr", "3e-2",
                     "--schedule", "constant", "--epochs", 8, "--early-stopping", 2, "--early-stopping-metric", "loss", "--out", out) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    losses = [h["val_loss"] for h in metrics["history"]]
    best = losses.index(min(losses)) + 1
    assert metrics["best_epoch"] == best
    assert metrics["stopped_at_epoch"] == best + 2 == len(losses)  # stopped after 2 epochs without improvement
    assert metrics["loss_after"] == pytest.approx(losses[best - 1], rel=1e-6)  # the weights of the best epoch are back


def test_every_option_together(tmp_path, tiny_model_dir):
    train, val = write_subset(tmp_path, 4, 2)
    out = tmp_path / "run"
    assert _finetune("--model", tiny_model_dir, "--data", train, "--validation-data", val, "--strategy", "progressive",
                     "--unfreeze-every", 2, "--lr-decay", "0.5", "--epochs", 2, "--batch-size", 4, "--grad-accum", 2,
                     "--schedule", "one-cycle", "--l1", "1e-5", "--ewc", "100", "--ewc-examples", 4, "--bf16",
                     "--gradient-checkpointing", "--max-grad-norm", "0.5", "--out", out) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    history = metrics["history"]
    assert all(h["penalty"] > 0 for h in history[1:])  # L1 (and EWC once weights moved) join the loss
    # 20 texts / batch 4 / accumulation 2 = 3 optimizer steps per epoch; a stage unfreezes every 2 steps
    assert len(metrics["step_losses"]) == 6
    assert history[0]["trainable_now"] < history[1]["trainable_now"] == metrics["trainable_parameters"]
    config = json.loads((out / "config.json").read_text())
    assert config["strategy"] == "progressive" and config["bf16"] and config["grad_accum"] == 2 and config["ewc"] == 100


@pytest.mark.parametrize("files, message", [
    ({"t.csv": "text,label\na b,x\nc d,y\n", "v.csv": "text,label\ne f,x\ng h,z\n"}, r"v.csv:3: label 'z' does not occur in the training data"),
    ({"t.csv": "text,label\na b,x\n ,y\n", "v.csv": "text,label\ne,x\n"}, r"t.csv:3: empty text"),
    ({"t.csv": "text,label\na,x\nb,y\n".encode(), "v.csv": "text,label\nfine,x\ncaf\xe9,y\n".encode("latin-1")}, r"v.csv:3: not valid UTF-8"),
])
def test_bad_data_names_file_and_line_and_writes_nothing(tmp_path, capsys, files, message):
    for name, content in files.items():
        (tmp_path / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    out = tmp_path / "run"
    assert _finetune("--data", tmp_path / "t.csv", "--validation-data", tmp_path / "v.csv", "--out", out) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not out.exists()


@pytest.mark.parametrize("args, message", [
    (["--data", "nope.csv"], "data file 'nope.csv' does not exist"),
    (["--epochs", "0"], "--epochs must be a positive integer"),
    (["--model", "/nonexistent"], "is not a transformers model directory"),
    (["--strategy", "nope"], "unknown strategy 'nope'; available now:"),
    (["--strategy", "full", "--method", "prefix"], "--strategy 'full' and --method 'prefix' disagree"),
    (["--warmup", "1.5"], "--warmup must be in [0, 1)"),
    (["--ewc-data", "x.csv"], "--ewc-data is given but --ewc"),
])
def test_bad_options_exit_with_a_clear_error(tmp_path, capsys, args, message):
    out = tmp_path / "r"
    assert _finetune("--out", out, *args) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_missing_column_error(tmp_path, capsys):
    (tmp_path / "d.csv").write_text("sentence,label\nhello,a\n")
    assert _finetune("--data", tmp_path / "d.csv", "--out", tmp_path / "r") == 2
    assert "no column 'text'" in capsys.readouterr().err


@pytest.mark.slow
def test_python_dash_m_entry_point():
    result = subprocess.run([sys.executable, "-m", "peftcore", "finetune", "--help"], capture_output=True, text=True, check=True)
    assert "--strategy" in result.stdout and "--early-stopping" in result.stdout and "--data" in result.stdout
    result = subprocess.run(["peftcore", "methods"], capture_output=True, text=True, check=True)
    assert "lora" in result.stdout and "peftcore" in result.stdout


def test_threads_apply_during_the_run_only(tmp_path, tiny_model_dir):
    import torch

    from peftcore.train.config import FinetuneConfig
    from peftcore.train.finetune import run

    train, val = write_subset(tmp_path, 2, 1)
    seen = []
    torch.set_num_threads(2)  # the single_thread fixture restores the original count afterwards
    run(FinetuneConfig(model=str(tiny_model_dir), data=str(train), validation_data=str(val), strategy="feature-extraction",
                       epochs=1, threads=1, out=str(tmp_path / "run"), progress=False),
        log=lambda line: seen.append(torch.get_num_threads()))
    assert set(seen) == {1} and torch.get_num_threads() == 2
