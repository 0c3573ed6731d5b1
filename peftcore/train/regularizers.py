"""Penalties added to the training loss: L1 on the weights, and EWC against forgetting.

Each penalty is a callable returning a scalar tensor that depends on the parameters, so its
gradient joins the task loss's in ``backward``.
"""

from __future__ import annotations

from typing import Callable, Iterable, Sequence

import torch
from torch import nn

from peftcore.errors import ConfigError
from peftcore.train.data import Batch

Penalty = Callable[[], torch.Tensor]
LossFn = Callable[[nn.Module, Batch], torch.Tensor]


def classification_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Mean cross-entropy of a sequence classifier (``model(**inputs).logits``, (B, C)) on a batch."""
    logits = model(**batch.inputs).logits  # (B, C)
    return nn.functional.cross_entropy(logits.float(), batch.labels)


class L1Penalty:
    """``strength * sum |w|`` over the matrices among ``params`` that currently train.

    Biases and norm weights (fewer than two dimensions) are left out, as with weight decay.

    Args:
        params: parameters to penalise, e.g. ``[p for _, p in plan.named_parameters()]``.
        strength: the factor (> 0).
    """

    def __init__(self, params: Iterable[nn.Parameter], strength: float):
        if not strength > 0:
            raise ConfigError(f"the L1 strength must be positive, got {strength!r}")
        self.params = [p for p in params if p.ndim >= 2]
        self.strength = strength

    def __call__(self) -> torch.Tensor:
        terms = [p.abs().sum() for p in self.params if p.requires_grad]
        if not terms:
            return torch.zeros(())
        return self.strength * torch.stack(terms).sum()


def _single_examples(batch: Batch) -> Iterable[Batch]:
    for i in range(len(batch.labels)):
        yield Batch({k: v[i:i + 1] for k, v in batch.inputs.items()}, batch.labels[i:i + 1])


def fisher_diagonal(
    model: nn.Module,
    batches: Sequence[Batch],
    params: Sequence[tuple[str, nn.Parameter]],
    *,
    loss_fn: LossFn = classification_loss,
    max_examples: int | None = 64,
    progress: bool = False,
) -> dict[str, torch.Tensor]:
    """The diagonal of the empirical Fisher information: the mean over examples of the squared
    gradient of each example's loss, ``F_i = mean_n (d loss_n / d theta_i)^2``.

    Examples are taken one at a time (per-example gradients: squaring a batch gradient would
    average the noise away), in eval mode (no dropout). The model's ``requires_grad`` flags and
    ``.grad`` fields are left as they were.

    Args:
        model: the model at the reference weights.
        batches: reference data.
        params: ``(name, parameter)`` pairs to estimate it for.
        loss_fn: loss of one batch; default: classification cross-entropy.
        max_examples: stop after this many examples (``None``: all).
        progress: show a progress bar.

    Returns:
        ``name -> F`` (float32, each shaped like its parameter).
    """
    from peftcore.train.loop import progress_bar

    names = [n for n, _ in params]
    tensors = [p for _, p in params]
    flags = [p.requires_grad for p in tensors]
    fisher = [torch.zeros_like(p, dtype=torch.float32) for p in tensors]
    was_training = model.training
    model.eval()
    count = 0
    total = sum(len(b.labels) for b in batches)
    total = min(total, max_examples) if max_examples is not None else total
    bar = progress_bar(total=total, desc="Fisher information", enabled=progress)
    try:
        for p in tensors:
            p.requires_grad_(True)
        for batch in batches:
            for example in _single_examples(batch):
                if max_examples is not None and count >= max_examples:
                    break
                loss = loss_fn(model, example)
                grads = torch.autograd.grad(loss, tensors, allow_unused=True)
                for f, g in zip(fisher, grads):
                    if g is not None:
                        f.add_(g.detach().float().square())
                count += 1
                bar.update(1)
    finally:
        bar.close()
        for p, flag in zip(tensors, flags):
            p.requires_grad_(flag)
        model.train(was_training)
    if count == 0:
        raise ConfigError("the reference data for the Fisher information holds no examples")
    return {n: f / count for n, f in zip(names, fisher)}


class EWC:
    """Elastic weight consolidation: ``strength / 2 * sum_i F_i (theta_i - theta*_i)^2``.

    Penalises moving the parameters away from reference weights ``theta*`` in proportion to how
    much the reference data's loss depends on them (the diagonal Fisher information ``F``).
    Zero at the reference weights.

    Args:
        params: ``(name, parameter)`` pairs to hold near the reference.
        fisher: ``name -> F`` for each of them.
        reference: ``name -> theta*``; default: the parameters' current values.
        strength: lambda (> 0); the Fisher of a fine-tuned classifier is small (mean around
            1e-4..1e-2), so useful strengths are large, 1e2..1e6.
    """

    def __init__(
        self,
        params: Sequence[tuple[str, nn.Parameter]],
        fisher: dict[str, torch.Tensor],
        strength: float,
        reference: dict[str, torch.Tensor] | None = None,
    ):
        if not strength > 0:
            raise ConfigError(f"the EWC strength must be positive, got {strength!r}")
        missing = [n for n, _ in params if n not in fisher]
        if missing:
            raise ConfigError(f"no Fisher information for parameter {missing[0]!r}")
        self.params = list(params)
        self.fisher = {n: fisher[n].detach() for n, _ in params}
        self.reference = {n: (reference[n] if reference is not None else p).detach().clone() for n, p in params}
        self.strength = strength

    @classmethod
    def from_data(
        cls,
        model: nn.Module,
        batches: Sequence[Batch],
        params: Sequence[tuple[str, nn.Parameter]],
        strength: float,
        **fisher_options,
    ) -> "EWC":
        """Takes the current weights as the reference and estimates the Fisher on ``batches``
        (options as :func:`fisher_diagonal`)."""
        return cls(params, fisher_diagonal(model, batches, params, **fisher_options), strength)

    def __call__(self) -> torch.Tensor:
        terms = [(self.fisher[n] * (p.float() - self.reference[n].float()).square()).sum() for n, p in self.params]
        if not terms:
            return torch.zeros(())
        return 0.5 * self.strength * torch.stack(terms).sum()


def combine(penalties: Sequence[Penalty]) -> Penalty | None:
    """One callable summing ``penalties`` (``None`` when there are none)."""
    penalties = list(penalties)
    if not penalties:
        return None
    return lambda: torch.stack([p() for p in penalties]).sum()
