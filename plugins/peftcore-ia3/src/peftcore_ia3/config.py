"""IA3 options."""

from __future__ import annotations

import dataclasses
import re
from typing import Union

from peftcore.errors import ConfigError

Selection = Union[None, str, list[str]]


@dataclasses.dataclass
class IA3Config:
    """Options of an IA3 adapter.

    Attributes:
        feedforward: which targets are feed-forward down projections, whose *input* IA3 scales
            (the others have their output scaled): a list of names (an exact dotted path or a
            suffix of whole components, e.g. ``"mlp.down_proj"``), a regular expression fully
            matched against the path, or ``None`` for the built-in patterns (BERT
            ``layer.<i>.output.dense``, GPT-2 ``mlp.c_proj``, Llama ``mlp.down_proj``, ``fc2``).
            ``[]`` scales the output of every target.
    """

    feedforward: Selection = None

    def __post_init__(self) -> None:
        value = self.feedforward
        if isinstance(value, tuple):
            value = self.feedforward = list(value)
        if value is None:
            return
        if isinstance(value, str):
            try:
                re.compile(value)
            except re.error as exc:
                raise ConfigError(f"ia3 feedforward={value!r} is not a valid regular expression: {exc}") from exc
            return
        if not isinstance(value, list) or not all(isinstance(item, str) and item for item in value):
            raise ConfigError(
                f"ia3 feedforward must be None, a regex string or a list of module names, got {value!r} "
                "(callables cannot be saved with the adapter)"
            )
