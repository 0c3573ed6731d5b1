"""The training and evaluation loops.

``train_epoch`` does one pass with gradient accumulation, gradient clipping, optional penalties
(L1, EWC), bf16 autocast or fp16 autocast with loss scaling (:mod:`peftcore.train.amp`) and a
per-step callback (progressive unfreezing hooks in there).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn

from peftcore.errors import PeftcoreError
from peftcore.train import amp
from peftcore.train.data import Batch
from peftcore.train.metrics import ClassificationReport, classification_report
from peftcore.train.regularizers import LossFn, Penalty, classification_loss


class DivergenceError(PeftcoreError, FloatingPointError):
    """The training loss became NaN or infinite."""


class _NoBar:
    """Stands in for a tqdm bar when progress bars are off."""

    def __init__(self, iterable: Iterable | None = None):
        self._iterable = iterable

    def __iter__(self):
        return iter(self._iterable)

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, **kwargs: Any) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(iterable: Iterable | None = None, *, total: int | None = None, desc: str = "", enabled: bool = True, leave: bool = False):
    """A tqdm bar (on stderr) when ``enabled``, else an object with the same small interface."""
    if not enabled:
        return _NoBar(iterable)
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, leave=leave, dynamic_ncols=True)


def autocast(model: nn.Module, bf16: bool, fp16: bool = False) -> contextlib.AbstractContextManager:
    """bf16 or fp16 autocast on the model's device type when asked (CPU included), else a no-op."""
    return amp.autocast(model, amp.precision_name(bf16, fp16))


@torch.no_grad()
def predict(model: nn.Module, batches: Sequence[Batch], *, bf16: bool = False, fp16: bool = False, progress: bool = True,
            desc: str = "predicting") -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and gold labels over ``batches``, in eval mode.

    Returns:
        ``(logits (N, C) float32, labels (N,))``.
    """
    was_training = model.training
    model.eval()
    logits, gold = [], []
    try:
        for batch in progress_bar(batches, total=len(batches), desc=desc, enabled=progress):
            with autocast(model, bf16, fp16):
                out = model(**batch.inputs).logits  # (B, C)
            logits.append(out.float())
            gold.append(batch.labels)
    finally:
        model.train(was_training)
    return torch.cat(logits), torch.cat(gold)


def evaluate(
    model: nn.Module,
    batches: Sequence[Batch],
    labels: Sequence[str],
    *,
    bf16: bool = False,
    fp16: bool = False,
    progress: bool = True,
    desc: str = "evaluating",
) -> tuple[ClassificationReport, float]:
    """Runs the model over ``batches`` in eval mode.

    Returns:
        The classification report and the mean cross-entropy loss.
    """
    logits, gold = predict(model, batches, bf16=bf16, fp16=fp16, progress=progress, desc=desc)
    loss = nn.functional.cross_entropy(logits, gold).item()
    return classification_report(gold.tolist(), logits.argmax(dim=-1).tolist(), labels), loss


@dataclasses.dataclass
class EpochStats:
    """What one epoch measured.

    Attributes:
        loss: mean task loss over the micro-batches (penalties not included).
        penalty: mean penalty over the optimizer steps (0 without penalties).
        step_times: seconds of each optimizer step (all its micro-batches).
        steps: optimizer steps taken (skipped fp16 steps included).
        skipped: fp16 steps the loss scaler skipped because a gradient was inf or NaN.
        loss_scale: the fp16 loss scale at the end of the epoch (``None`` without fp16).
    """

    loss: float
    penalty: float
    step_times: list[float]
    steps: int
    skipped: int = 0
    loss_scale: float | None = None

    @property
    def median_step_s(self) -> float:
        times = sorted(self.step_times)
        return times[len(times) // 2] if times else 0.0


def train_epoch(
    model: nn.Module,
    batches: Sequence[Batch],
    optimizer: torch.optim.Optimizer,
    *,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    loss_fn: LossFn = classification_loss,
    max_grad_norm: float | None = 1.0,
    accumulation: int = 1,
    penalty: Penalty | None = None,
    bf16: bool = False,
    fp16: bool = False,
    scaler: torch.amp.GradScaler | None = None,
    progress: bool = True,
    desc: str = "training",
    on_step: Callable[[int, float, float], None] | None = None,
) -> EpochStats:
    """One pass over ``batches``, stepping the optimizer every ``accumulation`` micro-batches.

    Args:
        model: the model; put in train mode.
        batches: micro-batches.
        optimizer: any optimizer; parameters without a gradient are skipped by torch's own.
        scheduler: stepped after every optimizer step.
        loss_fn: ``loss_fn(model, batch)`` -> scalar; default: classification cross-entropy.
        max_grad_norm: clip the gradient norm of all trained parameters to this (``None``: no clipping).
        accumulation: micro-batches per optimizer step; the last step of the epoch may take fewer.
        penalty: a callable whose value is added to the loss of each step (L1, EWC).
        bf16: run forward and loss under bf16 autocast (the parameters stay float32).
        fp16: run forward and loss under fp16 autocast with loss scaling: steps whose gradients
            hold an inf or NaN are skipped (no parameter, optimizer state or schedule moves).
        scaler: the fp16 ``torch.amp.GradScaler``; pass the same one every epoch so that its
            scale carries over; ``None`` with ``fp16`` = a new one (scale 2**16).
        progress: show a progress bar.
        on_step: called after each optimizer step with (step index, mean micro-batch loss, seconds).

    Returns:
        The :class:`EpochStats`.

    Raises:
        DivergenceError: the loss became NaN or infinite (lower the learning rate).
    """
    if accumulation < 1:
        raise PeftcoreError(f"gradient accumulation must be >= 1, got {accumulation}")
    amp.precision_name(bf16, fp16)  # both at once is an error
    if fp16 and scaler is None:
        scaler = amp.make_scaler(model, fp16=True)
    if not fp16:
        scaler = None
    model.train()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    losses, penalties, times = [], [], []
    bar = progress_bar(total=len(batches), desc=desc, enabled=progress)
    optimizer.zero_grad(set_to_none=True)
    step_loss, step_start, in_step, step, skipped = 0.0, time.perf_counter(), 0, 0, 0
    for index, batch in enumerate(batches):
        size = min(accumulation, len(batches) - (index - in_step))
        with autocast(model, bf16, fp16):
            loss = loss_fn(model, batch)
        value = loss.item()
        if not math.isfinite(value):
            raise DivergenceError(f"the training loss became {value} at micro-batch {index} of {desc!r}; lower the learning rate")
        total = loss
        if penalty is not None:
            extra = penalty()
            penalties.append(extra.item())
            total = total + extra
        total = total / size
        (scaler.scale(total) if scaler is not None else total).backward()
        losses.append(value)
        step_loss += value
        in_step += 1
        bar.update(1)
        if in_step < size:
            continue
        if scaler is not None:
            scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], max_grad_norm)
        if scaler is not None:
            applied = amp.scaler_step(scaler, optimizer)
        else:
            optimizer.step()
            applied = True
        optimizer.zero_grad(set_to_none=True)
        skipped += not applied
        if scheduler is not None and applied:  # a skipped step leaves the schedule where it was
            scheduler.step()
        times.append(time.perf_counter() - step_start)
        bar.set_postfix(loss=f"{step_loss / in_step:.4f}")
        if on_step is not None:
            on_step(step, step_loss / in_step, times[-1])
        step += 1
        step_loss, step_start, in_step = 0.0, time.perf_counter(), 0
    bar.close()
    mean_penalty = sum(penalties) / len(penalties) if penalties else 0.0
    return EpochStats(sum(losses) / max(1, len(losses)), mean_penalty, times, step, skipped,
                      scaler.get_scale() if scaler is not None else None)
