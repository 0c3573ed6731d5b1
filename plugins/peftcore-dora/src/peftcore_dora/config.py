"""DoRA options."""

from __future__ import annotations

import dataclasses
import math

from peftcore.errors import ConfigError


@dataclasses.dataclass
class DoraConfig:
    """Options of a DoRA adapter: ``W' = m * (W + s B A) / ||W + s B A||`` row-wise.

    Attributes:
        rank: inner dimension r of the low-rank direction update ``B A`` (> 0).
        alpha: scale numerator; ``None`` means ``2 * rank`` (as peftcore's LoRA). s = alpha / rank.
        dropout: dropout probability on the low-rank path's input, in [0, 1).
    """

    rank: int = 8
    alpha: float | None = None
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank <= 0:
            raise ConfigError(f"dora rank must be a positive int, got {self.rank!r}")
        if self.alpha is None:
            self.alpha = float(2 * self.rank)
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not math.isfinite(self.alpha):
            raise ConfigError(f"dora alpha must be a finite number, got {self.alpha!r}")
        self.alpha = float(self.alpha)
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dora dropout must be in [0, 1), got {self.dropout!r}")
        self.dropout = float(self.dropout)

    @property
    def scale(self) -> float:
        """Multiplier s of the low-rank update."""
        return self.alpha / self.rank
