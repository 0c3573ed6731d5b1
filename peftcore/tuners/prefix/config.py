"""Prefix-tuning options."""

from __future__ import annotations

import dataclasses

from peftcore.errors import ConfigError

INITS = ("vocab", "random")


def _positive_int(value: object, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{what} must be a positive int, got {value!r}")


@dataclasses.dataclass
class PrefixConfig:
    """Options of a prefix-tuning adapter: ``virtual_tokens`` learned keys and values per attention layer.

    Attributes:
        virtual_tokens: number of prefix positions P every attention layer attends to before
            the real tokens (> 0).
        projection: ``None`` trains the keys and values directly; an int trains them through a
            reparameterising MLP (embedding ``(P, hidden)`` -> Linear(hidden, projection) -> tanh
            -> Linear(projection, layers * 2 * kv_heads * head_dim)), as in Li & Liang (2021).
            Saved adapters hold the materialised keys and values, never the MLP.
        init: ``"vocab"`` starts from the keys and values that the frozen model computes for P
            random vocabulary tokens (in-distribution, the model behaves as if a random prompt
            came first); ``"random"`` from N(0, 1) values. With ``projection``, ``"vocab"``
            starts the MLP's input from rows of the word embedding matrix instead.
        shift_positions: ``False`` (default) gives the real tokens the positions they have
            without a prefix (0..T-1); ``True`` puts them behind the prefix (P..P+T-1, and
            caller-given ``position_ids`` plus P), as HF PEFT's prefix tuning does. Adapters read
            from PEFT's format set it; only adapters with ``True`` can be written in PEFT's format.
    """

    virtual_tokens: int = 20
    projection: int | None = None
    init: str = "vocab"
    shift_positions: bool = False

    def __post_init__(self) -> None:
        _positive_int(self.virtual_tokens, "prefix virtual_tokens")
        if self.projection is not None:
            _positive_int(self.projection, "prefix projection (the MLP's hidden size, or None)")
        if self.init not in INITS:
            raise ConfigError(f"prefix init must be one of {', '.join(INITS)}, got {self.init!r}")
        if not isinstance(self.shift_positions, bool):
            raise ConfigError(f"prefix shift_positions must be True or False, got {self.shift_positions!r}")
