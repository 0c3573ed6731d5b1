"""The training and evaluation loops for sequence classification."""

from __future__ import annotations

import math
import time
from typing import Callable, Sequence

import torch
from torch import nn

from peftcore.train.data import Batch
from peftcore.train.metrics import ClassificationReport, classification_report


def _progress(iterable, *, total: int, desc: str, enabled: bool):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Sequence[Batch],
    labels: Sequence[str],
    *,
    progress: bool = True,
    desc: str = "evaluating",
) -> tuple[ClassificationReport, float]:
    """Runs the model over ``batches`` in eval mode.

    Returns:
        The classification report and the mean cross-entropy loss.
    """
    was_training = model.training
    model.eval()
    gold, predicted, losses, weights = [], [], [], []
    try:
        for batch in _progress(batches, total=len(batches), desc=desc, enabled=progress):
            logits = model(**batch.inputs).logits  # (B, num_labels)
            losses.append(nn.functional.cross_entropy(logits.float(), batch.labels).item())
            weights.append(len(batch.labels))
            predicted += logits.argmax(dim=-1).tolist()
            gold += batch.labels.tolist()
    finally:
        model.train(was_training)
    mean_loss = sum(l * w for l, w in zip(losses, weights)) / max(1, sum(weights))
    return classification_report(gold, predicted, labels), mean_loss


def train_epoch(
    model: nn.Module,
    batches: Sequence[Batch],
    optimizer: torch.optim.Optimizer,
    *,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    max_grad_norm: float | None = 1.0,
    progress: bool = True,
    desc: str = "training",
    on_step: Callable[[int, float, float], None] | None = None,
) -> dict[str, float]:
    """One pass over ``batches``; returns the mean loss and the median step time in seconds.

    Args:
        on_step: called after each step with (step index, loss, step seconds).
    """
    model.train()
    losses, times = [], []
    bar = _progress(batches, total=len(batches), desc=desc, enabled=progress)
    params = [p for p in model.parameters() if p.requires_grad]
    for step, batch in enumerate(bar):
        start = time.perf_counter()
        logits = model(**batch.inputs).logits
        loss = nn.functional.cross_entropy(logits.float(), batch.labels)
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"the training loss became {loss.item()} at step {step}; lower the learning rate")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        times.append(time.perf_counter() - start)
        losses.append(loss.item())
        if progress and hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{loss.item():.4f}")
        if on_step is not None:
            on_step(step, loss.item(), times[-1])
    times.sort()
    return {"loss": sum(losses) / max(1, len(losses)), "median_step_s": times[len(times) // 2] if times else 0.0}
