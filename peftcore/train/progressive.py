"""Progressive unfreezing: the stages of a ``progressive`` plan, unfrozen one at a time."""

from __future__ import annotations

from torch import nn

from peftcore.errors import ConfigError
from peftcore.train.strategies import Plan


class ProgressiveUnfreezer:
    """Unfreezes a plan's stages in order: one per epoch, or one every ``every_steps`` steps.

    Stage 0 (the head) trains from the start; creating the unfreezer freezes the later stages.
    With ``every_steps == 0``, call
    :meth:`start_epoch` before each epoch: epoch ``e`` (0-based) trains stages ``0..e``. With
    ``every_steps > 0``, call :meth:`step` after each optimizer step: after ``k * every_steps``
    steps, stages ``0..k`` train. Stages never freeze again.

    Args:
        model: the model the plan was made for.
        plan: a plan whose ``stages`` say what to unfreeze (any plan works; one with a single
            stage unfreezes nothing new).
        every_steps: optimizer steps between stages; 0 = one stage per epoch.
    """

    def __init__(self, model: nn.Module, plan: Plan, every_steps: int = 0):
        if every_steps < 0:
            raise ConfigError(f"every_steps must be >= 0, got {every_steps}")
        self.stages = plan.stages
        self.every_steps = every_steps
        self.steps = 0
        self.stage = -1
        params = dict(model.named_parameters())
        missing = [n for names in self.stages for n in names if n not in params]
        if missing:
            raise ConfigError(f"the plan names parameters the model lacks ({missing[0]!r}); make the plan for this model")
        self._params = [[params[n] for n in names] for names in self.stages]
        for later in self._params[1:]:
            for param in later:
                param.requires_grad_(False)
        self._unfreeze_to(0)

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    def _unfreeze_to(self, stage: int) -> None:
        stage = min(stage, self.num_stages - 1)
        for index in range(self.stage + 1, stage + 1):
            for param in self._params[index]:
                param.requires_grad_(True)
        self.stage = max(self.stage, stage)

    def start_epoch(self, epoch: int) -> None:
        """Before epoch ``epoch`` (0-based): in per-epoch mode, unfreezes stages up to ``epoch``."""
        if self.every_steps == 0:
            self._unfreeze_to(epoch)

    def step(self) -> None:
        """After an optimizer step: in per-step mode, unfreezes the next stage when it is due."""
        self.steps += 1
        if self.every_steps and self.steps % self.every_steps == 0:
            self._unfreeze_to(self.steps // self.every_steps)
