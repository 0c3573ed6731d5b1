"""peftcore finetune --quantize: a tiny run through the command line (slow: a real encoder)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import peftcore
from peftcore.errors import ConfigError
from peftcore.train.config import FinetuneConfig


def test_quantize_needs_a_peft_method():
    with pytest.raises(ConfigError, match="--quantize nf4 needs a PEFT method"):
        FinetuneConfig(strategy="full", quantize="nf4").validate()


def test_quantize_is_refused_where_it_would_be_ignored(tmp_path):
    """few-shot and image runs quantize nothing: a clear error instead of a silently plain run."""
    from peftcore.train import finetune

    with pytest.raises(ConfigError, match="--few-shot and --quantize nf4 do not combine"):
        FinetuneConfig(few_shot=2, quantize="nf4").validate()
    (tmp_path / "images").mkdir()  # --data DIR: an image run
    with pytest.raises(ConfigError, match="--quantize nf4 quantizes a text classifier.*drop --quantize"):
        finetune.run(FinetuneConfig(data=str(tmp_path / "images"), quantize="nf4", out=str(tmp_path / "run"), progress=False))
    assert not (tmp_path / "run").exists()


def test_quantize_init_names_its_choices():
    with pytest.raises(ConfigError, match="--quantize-init must be one of calibrated, svd, none, got .loftq."):
        FinetuneConfig(quantize="nf4", quantize_init="loftq").validate()


def test_quantize_4bit_halves_the_default_learning_rate():
    """Over a 4-bit base the default rate is halved (docs/quantization.md); int8 keeps it, --lr wins."""
    full = FinetuneConfig().resolved_lr
    assert FinetuneConfig(quantize="nf4").resolved_lr == full / 2
    assert FinetuneConfig(quantize="fp4").resolved_lr == full / 2
    assert FinetuneConfig(quantize="int8").resolved_lr == full
    assert FinetuneConfig(quantize="nf4", lr=3e-3).resolved_lr == 3e-3
    assert FinetuneConfig(strategy="adapter", quantize="nf4").resolved_lr == FinetuneConfig(strategy="adapter").resolved_lr / 2


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["nf4"])  # int8 (bitsandbytes Linear8bitLt) is several times slower on the CPU
def test_finetune_quantize_runs_and_learns(kind, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "peftcore", "finetune", "--quantize", kind, "--quantize-init", "calibrated", "--epochs", "1", "--max-length", "32",
           "--no-progress", "--threads", "1", "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "validation accuracy after fine-tuning" in done.stdout + done.stderr
    assert ", lr 0.001\n" in done.stdout + done.stderr  # the default rate, halved over the 4-bit base
    files = {p.name for p in out.rglob("*")}
    assert "adapter_config.json" in files, files
    # the factors started from the quantization error, weighted by the training examples' inputs
    line = next(l for l in done.stdout.splitlines() if l.startswith("LoRA initialised from the quantization error (calibrated)"))
    before, after = (float(v) for v in line.rsplit(" ", 3)[1::2])
    assert 0 < after < before, line

    # The saved adapter is all a user needs: on a freshly quantized base it scores what the run reported.
    from peftcore.train import data as data_mod
    from peftcore.train import finetune
    from peftcore.train.loop import evaluate

    metrics = json.loads((out / "metrics.json").read_text())
    config = FinetuneConfig(max_length=32)
    train, val = finetune.load_data(config)
    labels = data_mod.label_set(train, val)
    model, tokenizer = finetune.load_classifier(finetune.default_model_path(), labels)
    finetune.quantize_base(model, kind)
    peftcore.load(model, out / "adapter")
    batches = data_mod.batches(val, tokenizer, {l: i for i, l in enumerate(labels)}, config.batch_size, config.max_length)
    report, _ = evaluate(model.eval(), batches, labels, progress=False)
    assert report.accuracy == pytest.approx(metrics["accuracy_after"], abs=1e-12)
