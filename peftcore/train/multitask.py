"""Multi-task fine-tuning: one shared (wrapped) encoder, one head per task.

The encoder is any transformers base model (``AutoModel``) that returns ``last_hidden_state``;
its output is pooled (masked mean, or the first token) and fed to the task's head: a linear
layer with ``num_labels`` outputs (classification, cross-entropy) or one output (regression,
mean squared error). Adapters come from ``peftcore.wrap`` on the encoder: either one shared
adapter, or one per task (named after the task and activated for that task's batches).

Each task saves on its own (:func:`save_task`): its head, and the adapter it uses, so one task
can be loaded onto a fresh encoder without the others.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

import peftcore
from peftcore.errors import CheckpointError, ConfigError
from peftcore.train.data import Batch
from peftcore.train.loop import progress_bar
from peftcore.train.metrics import classification_report, regression_report

KINDS = ("classification", "regression")
SHARED = "shared"
TASK_FILE = "task.json"
HEAD_FILE = "head.safetensors"


@dataclasses.dataclass(frozen=True)
class Task:
    """One task of a multi-task model.

    Attributes:
        name: the task's name (letters, digits, ``_``, ``-``); also its adapter's name when
            each task has its own adapter.
        kind: ``"classification"`` or ``"regression"``.
        num_labels: classes (classification only).
        weight: the factor of this task's loss in the total.
    """

    name: str
    kind: str = "classification"
    num_labels: int = 2
    weight: float = 1.0

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ConfigError(f"task {self.name!r}: kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.kind == "classification" and self.num_labels < 2:
            raise ConfigError(f"task {self.name!r}: classification needs num_labels >= 2, got {self.num_labels}")
        if not self.weight >= 0:
            raise ConfigError(f"task {self.name!r}: the loss weight must be >= 0, got {self.weight!r}")

    @property
    def outputs(self) -> int:
        return self.num_labels if self.kind == "classification" else 1


class MultiTaskModel(nn.Module):
    """A shared encoder with one head per task.

    Args:
        encoder: a transformers base model (returns ``last_hidden_state``, (B, T, H)).
        tasks: the tasks; names must be unique.
        pooling: ``"mean"`` (mean over non-padding tokens) or ``"cls"`` (the first token).
        dropout: dropout before each head.
        hidden_size: the encoder's width; default ``encoder.config.hidden_size``.
    """

    def __init__(self, encoder: nn.Module, tasks: Sequence[Task], *, pooling: str = "mean", dropout: float = 0.1,
                 hidden_size: int | None = None):
        super().__init__()
        names = [t.name for t in tasks]
        if not names or len(set(names)) != len(names):
            raise ConfigError(f"tasks need unique names, got {names}")
        if pooling not in ("mean", "cls"):
            raise ConfigError(f"pooling must be 'mean' or 'cls', got {pooling!r}")
        hidden = hidden_size or getattr(getattr(encoder, "config", None), "hidden_size", None)
        if hidden is None:
            raise ConfigError(f"cannot tell the width of {type(encoder).__name__}; pass hidden_size=")
        self.encoder = encoder
        self.tasks = {t.name: t for t in tasks}
        self.pooling = pooling
        self.heads = nn.ModuleDict({t.name: nn.Sequential(nn.Dropout(dropout), nn.Linear(hidden, t.outputs)) for t in tasks})
        self._adapter_params: dict[int, nn.Parameter] = {}

    def _record_trainable(self) -> None:
        """Remembers the encoder parameters that train now (the adapter just added or loaded)."""
        for p in self.encoder.parameters():
            if p.requires_grad:
                self._adapter_params[id(p)] = p

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Every adapter parameter of the encoder (inactive per-task adapters included) and the heads:
        what the optimizer should hold."""
        return list(self._adapter_params.values()) + list(self.heads.parameters())

    def adapter_for(self, task: str) -> str | None:
        """The name of the encoder adapter ``task`` runs with (``None``: the encoder has none)."""
        table = peftcore.adapters(self.encoder)
        if task in table:
            return task
        if SHARED in table:
            return SHARED
        return next(iter(table), None)

    def _use_adapter(self, task: str) -> None:
        name = self.adapter_for(task)
        if name is not None and not peftcore.adapters(self.encoder)[name].active:
            peftcore.activate(self.encoder, name)

    def pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """(B, T, H) -> (B, H)."""
        if self.pooling == "cls" or attention_mask is None:
            return hidden[:, 0] if self.pooling == "cls" else hidden.mean(dim=1)
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
        return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)

    def forward(self, task: str, **inputs: torch.Tensor) -> torch.Tensor:
        """Logits (B, num_labels) for a classification task, predictions (B,) for regression."""
        if task not in self.tasks:
            raise ConfigError(f"unknown task {task!r}; tasks: {', '.join(self.tasks)}")
        self._use_adapter(task)
        hidden = self.encoder(**inputs).last_hidden_state  # (B, T, H)
        out = self.heads[task](self.pool(hidden, inputs.get("attention_mask")))
        return out.squeeze(-1) if self.tasks[task].kind == "regression" else out

    def loss(self, task: str, batch: Batch) -> torch.Tensor:
        """The task's unweighted loss on a batch (cross-entropy or mean squared error)."""
        out = self(task, **batch.inputs)
        if self.tasks[task].kind == "regression":
            return nn.functional.mse_loss(out.float(), batch.labels.float())
        return nn.functional.cross_entropy(out.float(), batch.labels)


def wrap_encoder(model: MultiTaskModel, method: str, *, per_task: bool = False, **options: Any) -> None:
    """Adds adapters to the shared encoder: one named ``"shared"``, or one per task.

    The heads keep training (they live outside the encoder); the base encoder is frozen.
    """
    names = list(model.tasks) if per_task else [SHARED]
    for name in names:
        peftcore.wrap(model.encoder, method, name=name, **options)
        model._record_trainable()
    for head in model.heads.values():
        head.requires_grad_(True)


class _Cycle:
    """Endless batches of one task, reshuffled (seeded) at each pass."""

    def __init__(self, batches: Sequence[Batch], rng: random.Random):
        self.batches, self.rng, self.order = list(batches), rng, []

    def next(self) -> Batch:
        if not self.order:
            self.order = list(range(len(self.batches)))
            self.rng.shuffle(self.order)
        return self.batches[self.order.pop()]


def train_multitask(
    model: MultiTaskModel,
    data: Mapping[str, Sequence[Batch]],
    optimizer: torch.optim.Optimizer,
    *,
    steps: int,
    sampling: str = "all",
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    max_grad_norm: float | None = 1.0,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, list[float]]:
    """Trains every task for ``steps`` optimizer steps.

    Args:
        model: the multi-task model.
        data: task name -> its training batches.
        optimizer: over ``model.trainable_parameters()``.
        steps: optimizer steps.
        sampling: ``"all"``: each step takes one batch of every task and sums their weighted
            losses; ``"proportional"``: each step takes one batch of one task, drawn with
            probability proportional to its number of batches (weighted loss).
        scheduler: stepped after each optimizer step.
        max_grad_norm: gradient clipping (``None``: none).
        seed: seeds the batch order and task draws.
        progress: show a progress bar.

    Returns:
        Per task, the loss of each batch it trained on.
    """
    missing = [t for t in model.tasks if t not in data or not data[t]]
    if missing or sampling not in ("all", "proportional"):
        raise ConfigError(f"need batches for every task (missing: {missing}) and sampling 'all' or 'proportional' (got {sampling!r})")
    rng = random.Random(seed)
    cycles = {t: _Cycle(data[t], rng) for t in model.tasks}
    sizes = [len(data[t]) for t in model.tasks]
    losses: dict[str, list[float]] = {t: [] for t in model.tasks}
    params = [p for g in optimizer.param_groups for p in g["params"]]
    model.train()
    bar = progress_bar(range(steps), total=steps, desc="multi-task training", enabled=progress)
    for _ in bar:
        tasks = list(model.tasks) if sampling == "all" else rng.choices(list(model.tasks), weights=sizes)
        optimizer.zero_grad(set_to_none=True)
        # one backward per task: with an adapter per task, each task's graph runs with its own
        # adapter active; gradients add up in .grad before the single optimizer step
        for task in tasks:
            loss = model.loss(task, cycles[task].next())
            (model.tasks[task].weight * loss).backward()
            losses[task].append(loss.item())
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], max_grad_norm)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
    return losses


@torch.no_grad()
def evaluate_multitask(model: MultiTaskModel, data: Mapping[str, Sequence[Batch]], labels: Mapping[str, Sequence[str]] | None = None) -> dict[str, dict[str, Any]]:
    """Per task: ``loss`` and the metrics (classification report or regression report) as dicts.

    Args:
        labels: per classification task, its label names (default: the ids as strings).
    """
    was_training = model.training
    model.eval()
    out = {}
    try:
        for task, batches in data.items():
            spec = model.tasks[task]
            preds = torch.cat([model(task, **b.inputs).float() for b in batches])
            gold = torch.cat([b.labels for b in batches])
            if spec.kind == "regression":
                out[task] = {"loss": nn.functional.mse_loss(preds, gold.float()).item(),
                             **regression_report(gold.tolist(), preds.tolist()).as_dict()}
            else:
                names = list((labels or {}).get(task) or [str(i) for i in range(spec.num_labels)])
                report = classification_report(gold.tolist(), preds.argmax(-1).tolist(), names)
                out[task] = {"loss": nn.functional.cross_entropy(preds, gold).item(), **report.as_dict()}
    finally:
        model.train(was_training)
    return out


def save_task(model: MultiTaskModel, task: str, path: str | os.PathLike) -> Path:
    """Writes one task: ``task.json``, ``head.safetensors`` and its encoder adapter in ``adapter/``.

    Returns:
        The directory.
    """
    from safetensors.torch import save_file

    if task not in model.tasks:
        raise ConfigError(f"unknown task {task!r}; tasks: {', '.join(model.tasks)}")
    target = Path(path)
    if target.exists() and any(target.iterdir()) and not (target / TASK_FILE).is_file():
        raise CheckpointError(f"{str(target)!r} exists and is not a saved task; pass a new or empty directory")
    target.mkdir(parents=True, exist_ok=True)
    adapter = model.adapter_for(task)
    if adapter is not None:
        peftcore.save(model.encoder, target / "adapter", name=adapter)
    head = {k: v.detach().cpu().contiguous().clone() for k, v in model.heads[task].state_dict().items()}
    save_file(head, str(target / HEAD_FILE))
    info = dataclasses.asdict(model.tasks[task]) | {"adapter": adapter, "pooling": model.pooling}
    (target / TASK_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return target


def load_task(model: MultiTaskModel, path: str | os.PathLike) -> str:
    """Loads one saved task's head, and its adapter unless the encoder already holds one of that
    name (a shared adapter loaded with an earlier task). Returns the task's name.

    Raises:
        CheckpointError: missing files, or a task the model does not have / that does not fit.
    """
    from safetensors.torch import load_file

    directory = Path(path)
    try:
        info = json.loads((directory / TASK_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read {str(directory / TASK_FILE)!r}: {exc}") from exc
    name = info.get("name")
    if name not in model.tasks:
        raise CheckpointError(f"{str(directory)!r} holds task {name!r}, which this model lacks (tasks: {', '.join(model.tasks)})")
    spec = model.tasks[name]
    if (spec.kind, spec.outputs) != (info.get("kind"), Task(**{k: info[k] for k in ("name", "kind", "num_labels", "weight")}).outputs):
        raise CheckpointError(f"task {name!r} in {str(directory)!r} is a {info.get('kind')} task with "
                              f"{info.get('num_labels')} labels; the model's is {spec.kind} with {spec.num_labels}")
    try:
        head = load_file(str(directory / HEAD_FILE))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read {str(directory / HEAD_FILE)!r}: {exc}") from exc
    own = model.heads[name].state_dict()
    if set(head) != set(own) or any(head[k].shape != own[k].shape for k in own):
        raise CheckpointError(f"the head in {str(directory / HEAD_FILE)!r} does not fit task {name!r} of this model")
    adapter = info.get("adapter")
    if adapter is not None and adapter not in peftcore.adapters(model.encoder):
        peftcore.load(model.encoder, directory / "adapter", name=adapter)
        model._record_trainable()
    model.heads[name].load_state_dict(head)
    return name
