"""Early stopping on a validation metric, keeping the best weights of the trained parameters."""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from peftcore.errors import ConfigError


class EarlyStopping:
    """Watches a validation metric and says when it has stopped improving.

    Every improvement (by more than ``min_delta``) stores a copy of ``params``; after
    ``patience`` evaluations without one, :meth:`update` returns ``True``.
    :meth:`restore` copies the best weights back. Only ``params`` are copied (the trained
    parameters: adapter, head, or the unfrozen layers), so the cost is what trains, not the model.

    Args:
        params: ``(name, parameter)`` pairs to keep; pass every parameter that may train.
        patience: evaluations without improvement before stopping (>= 1).
        mode: ``"max"`` (accuracy, F1) or ``"min"`` (loss).
        min_delta: how much better counts as better.
    """

    def __init__(self, params: Sequence[tuple[str, nn.Parameter]], patience: int, mode: str = "max", min_delta: float = 0.0):
        if not isinstance(patience, int) or patience < 1:
            raise ConfigError(f"early-stopping patience must be a positive integer, got {patience!r}")
        if mode not in ("max", "min"):
            raise ConfigError(f"mode must be 'max' or 'min', got {mode!r}")
        self.params = list(params)
        self.patience = patience
        self.mode = mode
        self.min_delta = min_delta
        self.best: float | None = None
        self.best_epoch: int | None = None
        self.bad_epochs = 0
        self._best_state: dict[str, torch.Tensor] | None = None

    def _improves(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if self.best is None:
            return True
        if self.mode == "max":
            return value > self.best + self.min_delta
        return value < self.best - self.min_delta

    def update(self, value: float, epoch: int) -> bool:
        """Records the metric of ``epoch``; returns whether to stop now."""
        if self._improves(value):
            self.best, self.best_epoch, self.bad_epochs = value, epoch, 0
            self._best_state = {name: p.detach().clone() for name, p in self.params}
        else:
            self.bad_epochs += 1
        return self.bad_epochs >= self.patience

    @torch.no_grad()
    def restore(self) -> int | None:
        """Copies the best weights back; returns the best epoch (``None`` if nothing was recorded)."""
        if self._best_state is None:
            return None
        for name, param in self.params:
            param.copy_(self._best_state[name])
        return self.best_epoch
