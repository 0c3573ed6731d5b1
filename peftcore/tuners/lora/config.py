"""LoRA options."""

from __future__ import annotations

import dataclasses
import math
import re

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
        rank_pattern: per-module ranks, ``{pattern: rank}``; a pattern is a regular expression
            matched against the end of a target's path at a dot (``"q_proj"``,
            ``"layers\\.0\\..*"``, a full path), the first matching entry wins (HF PEFT's
            ``rank_pattern`` rule). Modules no pattern matches use ``rank``.
        alpha_pattern: per-module alphas, the same way; modules no pattern matches use ``alpha``
            (not twice their own rank).
    """

    rank: int = 8
    alpha: float | None = None
    dropout: float = 0.0
    rslora: bool = False
    init: str = "default"
    backend: str = "auto"
    rank_pattern: dict[str, int] = dataclasses.field(default_factory=dict)
    alpha_pattern: dict[str, float] = dataclasses.field(default_factory=dict)

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
        self.rank_pattern = _patterns("rank_pattern", self.rank_pattern, _rank_value)
        self.alpha_pattern = _patterns("alpha_pattern", self.alpha_pattern, _alpha_value)

    def for_module(self, path: str) -> "LoraConfig":
        """The options of the adapter on module ``path``: ``rank``/``alpha`` from the patterns, if any match."""
        rank = _match(self.rank_pattern, path)
        alpha = _match(self.alpha_pattern, path)
        if rank is None and alpha is None:
            return self
        return dataclasses.replace(
            self, rank=self.rank if rank is None else rank, alpha=self.alpha if alpha is None else alpha,
            rank_pattern={}, alpha_pattern={},
        )

    @property
    def scale(self) -> float:
        """Multiplier of the low-rank path."""
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)


def _rank_value(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError("a positive int")
    return value


def _alpha_value(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError("a finite number")
    return float(value)


def _patterns(field: str, patterns: object, value: object) -> dict:
    if not isinstance(patterns, dict):
        raise ConfigError(f"lora {field} must be a dict of module pattern -> value, got {patterns!r}")
    checked = {}
    for pattern, v in patterns.items():
        try:
            if not isinstance(pattern, str) or not pattern:
                raise ValueError("a non-empty regular expression")
            re.compile(pattern)
        except (ValueError, re.error) as exc:
            raise ConfigError(f"lora {field} key {pattern!r} is not a regular expression: {exc}") from exc
        try:
            checked[pattern] = value(v)  # type: ignore[operator]
        except ValueError as exc:
            raise ConfigError(f"lora {field}[{pattern!r}] must be {exc}, got {v!r}") from None
    return checked


def _match(patterns: dict, path: str) -> object:
    """The value of the first pattern that matches the end of ``path`` at a dot (HF PEFT's rule)."""
    for pattern, value in patterns.items():
        if re.fullmatch(rf"(?:.*\.)?(?:{pattern})", path):
            return value
    return None
