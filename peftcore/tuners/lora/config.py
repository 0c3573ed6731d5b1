"""LoRA options."""

from __future__ import annotations

import dataclasses
import math

from peftcore.errors import ConfigError

INITS = ("default", "gaussian", "pissa")


@dataclasses.dataclass
class LoraConfig:
    """Options of a LoRA adapter: ``delta W = scale * B @ A`` with ``A: (rank, in)``, ``B: (out, rank)``.

    Attributes:
        rank: inner dimension r of the low-rank update (> 0).
        alpha: scale numerator; ``None`` means ``2 * rank``. scale = alpha / rank.
        dropout: dropout probability on the low-rank path's input, in [0, 1).
        rslora: rank-stabilised scale alpha / sqrt(rank) instead of alpha / rank.
        init: "default" (A Kaiming-uniform, B zero), "gaussian" (A ~ N(0, 1/r), B zero) or
            "pissa" (A, B from the weight's top-r singular vectors; the base weight keeps the rest).
        backend: kernel backend of the LoRA op: "auto", "reference", "cpp", "triton", "cuda".
    """

    rank: int = 8
    alpha: float | None = None
    dropout: float = 0.0
    rslora: bool = False
    init: str = "default"
    backend: str = "auto"

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank <= 0:
            raise ConfigError(f"lora rank must be a positive int, got {self.rank!r}")
        if self.alpha is None:
            self.alpha = float(2 * self.rank)
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not math.isfinite(self.alpha):
            raise ConfigError(f"lora alpha must be a finite number, got {self.alpha!r}")
        self.alpha = float(self.alpha)
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"lora dropout must be in [0, 1), got {self.dropout!r}")
        self.dropout = float(self.dropout)
        if not isinstance(self.rslora, bool):
            raise ConfigError(f"lora rslora must be True or False, got {self.rslora!r}")
        if self.init not in INITS:
            raise ConfigError(f"lora init must be one of {', '.join(INITS)}, got {self.init!r}")
        if not isinstance(self.backend, str) or not self.backend:
            raise ConfigError(f"lora backend must be a backend name or 'auto', got {self.backend!r}")

    @property
    def scale(self) -> float:
        """Multiplier of the low-rank path."""
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)
