"""Knowledge distillation: a teacher's softened predictions teach a student.

The loss (Hinton et al., 2015), with ``a`` the weight of the hard labels and ``T`` the temperature::

    a * CE(student, labels) + (1 - a) * T^2 * KL(softmax(teacher / T) || softmax(student / T))

``T^2`` keeps the soft term's gradient on the scale of the hard one as ``T`` grows (the soft
gradients shrink as ``1 / T^2``). The KL divergence is summed over classes and averaged over the
examples (``reduction="batchmean"``): ``reduction="mean"``, which some guides write, also divides
by the number of classes and silently weakens the soft term.

The teacher is any classifier (``model(**inputs).logits``) or the run directory of a
``peftcore finetune`` job (:func:`load_teacher`); the student is any model, e.g. a smaller encoder
or a PEFT-wrapped one. The teacher may use another tokenizer: :class:`Distiller` tokenises the
texts for each model with its own and pairs the batches.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from peftcore.errors import ConfigError, PeftcoreError
from peftcore.train.data import Batch, TextDataset

__all__ = ["distillation_loss", "kl_to_teacher", "DistillBatch", "DistillationLoss", "load_teacher", "Distiller"]


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor | None,
                      temperature: float = 2.0, weight: float = 0.5) -> torch.Tensor:
    """``weight * CE + (1 - weight) * T^2 * KL(teacher_T || student_T)``, averaged over the batch.

    Args:
        student_logits: (B, C).
        teacher_logits: (B, C); no gradient flows into them.
        labels: (B,) class ids; may be ``None`` when ``weight`` is 0.
        temperature: ``T`` > 0; larger spreads the teacher's probability over more classes.
        weight: ``a`` in [0, 1], the share of the hard-label cross-entropy.

    Returns:
        A scalar (float32).
    """
    student = student_logits.float()
    teacher = teacher_logits.detach().float()
    soft = F.kl_div(F.log_softmax(student / temperature, dim=-1), F.log_softmax(teacher / temperature, dim=-1),
                    log_target=True, reduction="batchmean")
    loss = (1 - weight) * temperature**2 * soft
    if weight:
        if labels is None:
            raise ConfigError("distillation with a hard-label weight > 0 needs labels")
        loss = loss + weight * F.cross_entropy(student, labels)
    return loss


@dataclasses.dataclass
class DistillBatch(Batch):
    """A batch with the teacher's logits (B, C) for its rows, computed beforehand."""

    teacher_logits: torch.Tensor | None = None


class DistillationLoss:
    """``loss_fn(model, batch)`` for :func:`peftcore.train.train_epoch`: the distillation loss.

    Args:
        teacher: the teacher, run in eval mode without gradients on each batch's inputs; may be
            ``None`` when every batch is a :class:`DistillBatch` carrying the teacher's logits.
        temperature: ``T``.
        weight: ``a``, the share of the hard-label cross-entropy.
    """

    def __init__(self, teacher: nn.Module | None = None, temperature: float = 2.0, weight: float = 0.5):
        check_options(temperature, weight)
        self.teacher, self.temperature, self.weight = teacher, temperature, weight
        if teacher is not None:
            teacher.eval().requires_grad_(False)

    def teacher_logits(self, batch: Batch) -> torch.Tensor:
        if getattr(batch, "teacher_logits", None) is not None:
            return batch.teacher_logits
        if self.teacher is None:
            raise PeftcoreError("DistillationLoss has no teacher and the batch carries no teacher_logits")
        with torch.no_grad():
            return self.teacher(**batch.inputs).logits

    def __call__(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        student = model(**batch.inputs).logits  # (B, C)
        return distillation_loss(student, self.teacher_logits(batch), batch.labels, self.temperature, self.weight)


def check_options(temperature: float, weight: float) -> None:
    """Raises :class:`ConfigError` for ``T <= 0`` or ``a`` outside [0, 1], named as on the command line."""
    if not temperature > 0:
        raise ConfigError(f"--temperature must be positive, got {temperature!r}")
    if not 0 <= weight <= 1:
        raise ConfigError(f"--distill-weight must be in [0, 1], got {weight!r}")


@torch.no_grad()
def kl_to_teacher(model: nn.Module, batches: Sequence[DistillBatch], temperature: float = 1.0) -> float:
    """Mean ``KL(softmax(teacher / T) || softmax(student / T))`` per example over ``batches``, in eval mode."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for batch in batches:
            student = model(**batch.inputs).logits.float()
            kl = F.kl_div(F.log_softmax(student / temperature, -1), F.log_softmax(batch.teacher_logits / temperature, -1),
                          log_target=True, reduction="sum")
            total, count = total + kl.item(), count + len(batch.labels)
    finally:
        model.train(was_training)
    return total / max(1, count)


def load_teacher(run_dir: str | Path) -> tuple[nn.Module, Any, list[str], dict[str, Any]]:
    """The trained classifier of a ``peftcore finetune`` run directory, in eval mode.

    Reads ``config.json`` (base model directory, labels, strategy) and loads ``adapter/`` with
    ``peftcore.load`` or ``weights.safetensors`` with :func:`peftcore.train.load_weights`.

    Returns:
        ``(model, tokenizer, labels, config)``.

    Raises:
        PeftcoreError: not a finished run directory, or its model cannot be loaded.
    """
    import peftcore
    from peftcore.train.finetune import load_classifier
    from peftcore.train.weights import WEIGHTS_FILE, load_weights

    run_dir = Path(run_dir)
    config_file = run_dir / "config.json"
    if not config_file.is_file():
        raise PeftcoreError(f"--teacher {str(run_dir)!r} is not a 'peftcore finetune' run directory (no config.json in it)")
    config = json.loads(config_file.read_text(encoding="utf-8"))
    if config.get("few_shot"):
        raise PeftcoreError(f"--teacher {str(run_dir)!r} is a few-shot (prototype) run; a teacher needs a classifier head")
    model, tokenizer = load_classifier(config["model"], config["labels"])
    if (run_dir / "adapter").is_dir():
        peftcore.load(model, run_dir / "adapter")
    elif (run_dir / WEIGHTS_FILE).is_file():
        load_weights(model, run_dir / WEIGHTS_FILE)
    else:
        raise PeftcoreError(f"--teacher {str(run_dir)!r} holds neither adapter/ nor {WEIGHTS_FILE}")
    model.eval().requires_grad_(False)
    return model, tokenizer, list(config["labels"]), config


class Distiller:
    """What ``peftcore finetune --teacher RUN_DIR`` adds to a run: the teacher, its logits for each
    batch, the loss, and the student's KL to the teacher on the validation data.

    Args:
        teacher: the teacher model (eval mode).
        tokenizer: the teacher's tokenizer.
        teacher_labels: the teacher's label names in its output order.
        labels: the student's label names in its output order (the same set, any order).
        temperature, weight: ``T`` and ``a``.
        batch_size, max_length: as the student's batches.
    """

    def __init__(self, teacher: nn.Module, tokenizer, teacher_labels: Sequence[str], labels: Sequence[str],
                 temperature: float, weight: float, batch_size: int, max_length: int):
        check_options(temperature, weight)
        if set(teacher_labels) != set(labels):
            raise ConfigError(f"the teacher's labels ({', '.join(teacher_labels)}) are not the data's ({', '.join(labels)})")
        # the teacher's logit columns in the student's label order
        self.order = torch.tensor([list(teacher_labels).index(label) for label in labels])
        self.teacher, self.tokenizer = teacher, tokenizer
        self.label_ids = {label: i for i, label in enumerate(labels)}
        self.batch_size, self.max_length = batch_size, max_length
        self.loss_fn = DistillationLoss(None, temperature, weight)
        self.temperature = temperature

    @classmethod
    def from_run(cls, run_dir: str | Path, labels: Sequence[str], temperature: float, weight: float,
                 batch_size: int, max_length: int) -> "Distiller":
        model, tokenizer, teacher_labels, _ = load_teacher(run_dir)
        return cls(model, tokenizer, teacher_labels, labels, temperature, weight, batch_size, max_length)

    def attach(self, batches: Sequence[Batch], data: TextDataset, shuffle: bool = False, seed: int = 0) -> list[DistillBatch]:
        """``batches`` (made by :func:`peftcore.train.data.batches` from ``data`` with the same
        ``shuffle`` and ``seed``) with the teacher's logits, from its own tokenisation of the texts."""
        from peftcore.train.data import batches as make_batches

        mine = make_batches(data, self.tokenizer, self.label_ids, self.batch_size, self.max_length, shuffle=shuffle, seed=seed)
        out = []
        with torch.no_grad():
            for student, teacher in zip(batches, mine, strict=True):
                if not torch.equal(student.labels, teacher.labels):
                    raise PeftcoreError("teacher and student batches are not aligned (different batch size or order)")
                logits = self.teacher(**teacher.inputs).logits.float()[:, self.order]  # (B, C), student's label order
                out.append(DistillBatch(student.inputs, student.labels, logits))
        return out

    def kl(self, model: nn.Module, batches: Sequence[DistillBatch]) -> float:
        """The student's mean KL to the teacher at temperature 1 (its plain predictions)."""
        return kl_to_teacher(model, batches, 1.0)
