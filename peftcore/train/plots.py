"""PNG plots of a run's curves and of a comparison, with matplotlib's Agg renderer.

Figures are built with ``matplotlib.figure.Figure`` rather than ``pyplot``, so no global
backend or figure state is touched (safe in notebooks and threads, no display needed).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence


def _figure(width: float, height: float):
    from matplotlib.figure import Figure  # the finetune extra; imported on use so peftcore.train loads without it

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _integer_ticks(axis: Any) -> None:
    from matplotlib.ticker import MaxNLocator

    axis.set_major_locator(MaxNLocator(integer=True))


def plot_curves(history: Sequence[dict[str, Any]], path: str | os.PathLike, *, title: str = "",
                step_losses: Sequence[float] = (), before: dict[str, float] | None = None) -> Path:
    """Loss and validation-metric curves of one run.

    Args:
        history: one dict per epoch with ``epoch``, ``train_loss``, ``val_loss``,
            ``val_accuracy`` and ``val_macro_f1``.
        path: the PNG to write.
        title: the figure title.
        step_losses: the training loss of every optimizer step (drawn thin, behind).
        before: ``val_loss``/``val_accuracy``/``val_macro_f1`` before training (drawn at epoch 0).

    Returns:
        The PNG's path.
    """
    fig = _figure(10, 4)
    loss_ax, metric_ax = fig.subplots(1, 2)
    epochs = [h["epoch"] for h in history]
    if step_losses:
        per_epoch = len(step_losses) / max(1, len(history))
        xs = [(i + 1) / per_epoch for i in range(len(step_losses))]
        loss_ax.plot(xs, step_losses, color="0.75", linewidth=0.8, label="training loss (per step)")
    loss_ax.plot(epochs, [h["train_loss"] for h in history], marker="o", label="training loss (epoch mean)")
    val_x = ([0] if before else []) + epochs
    loss_ax.plot(val_x, ([before["val_loss"]] if before else []) + [h["val_loss"] for h in history], marker="o", label="validation loss")
    loss_ax.set_xlabel("epoch")
    loss_ax.set_ylabel("cross-entropy")
    loss_ax.set_title("loss")
    loss_ax.legend()
    for key, label in (("val_accuracy", "validation accuracy"), ("val_macro_f1", "validation macro-F1")):
        metric_ax.plot(val_x, ([before[key]] if before else []) + [h[key] for h in history], marker="o", label=label)
    metric_ax.set_xlabel("epoch")
    for ax in (loss_ax, metric_ax):
        _integer_ticks(ax.xaxis)
    metric_ax.set_ylim(0, 1.02)
    metric_ax.set_title("validation metrics")
    metric_ax.legend(loc="lower right")
    if title:
        fig.suptitle(title)
    target = Path(path)
    fig.savefig(target)
    return target


def plot_comparison(rows: Sequence[dict[str, Any]], path: str | os.PathLike, *, title: str = "") -> Path:
    """Bar charts comparing strategies, plus their validation-accuracy curves.

    Args:
        rows: one dict per strategy with ``strategy``, ``accuracy``, ``macro_f1``,
            ``trainable``, ``median_step_s``, ``peak_rss_mib`` and ``history`` (as in
            ``metrics.json``).
        path: the PNG to write.
        title: the figure title.

    Returns:
        The PNG's path.
    """
    fig = _figure(15, 8)
    axes = fig.subplots(2, 3).ravel()
    names = [r["strategy"] for r in rows]
    xs = range(len(rows))
    width = 0.4
    ax = axes[0]
    ax.bar([x - width / 2 for x in xs], [r["accuracy"] for r in rows], width, label="accuracy")
    ax.bar([x + width / 2 for x in xs], [r["macro_f1"] for r in rows], width, label="macro-F1")
    ax.set_ylim(0, 1.05)
    ax.set_title("validation accuracy and macro-F1")
    ax.legend(loc="lower right")
    panels = [
        (axes[1], [r["trainable"] for r in rows], "trainable parameters (log scale)", True),
        (axes[2], [r["median_step_s"] * 1000 for r in rows], "median step time (ms)", False),
        (axes[3], [r["peak_rss_mib"] for r in rows], "peak memory, process RSS (MiB)", False),
        (axes[4], [r.get("seconds", 0.0) for r in rows], "wall time of the run (s)", False),
    ]
    for ax, values, label, log in panels:
        ax.bar(list(xs), values, color="tab:gray")
        ax.set_title(label)
        if log:
            ax.set_yscale("log")
    for ax in axes[:5]:
        ax.set_xticks(list(xs), names, rotation=30, ha="right")
    curves = axes[5]
    if len(rows) > 10:  # the default cycle has 10 colours; tab20 keeps 11 to 20 lines apart
        from matplotlib import colormaps

        curves.set_prop_cycle(color=[colormaps["tab20"](i) for i in range(len(rows))])
    for row in rows:
        history = row.get("history") or []
        before = row.get("accuracy_before")
        xs_curve = ([0] if before is not None else []) + [h["epoch"] for h in history]
        ys = ([before] if before is not None else []) + [h["val_accuracy"] for h in history]
        curves.plot(xs_curve, ys, marker=".", label=row["strategy"])
    curves.set_title("validation accuracy by epoch")
    curves.set_xlabel("epoch")
    curves.set_ylim(0, 1.02)
    _integer_ticks(curves.xaxis)
    curves.legend(fontsize="small", loc="best", ncols=2)
    if title:
        fig.suptitle(title)
    target = Path(path)
    fig.savefig(target)
    return target
