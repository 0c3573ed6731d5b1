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
        scale_packed_query: for a packed q/k/v projection (GPT-2 ``c_attn``, see
            :func:`~peftcore_ia3.method.packed_kv_slice`): ``False`` (default) scales the key and
            value outputs only, as in the paper; ``True`` scales every output, query included, as
            HF PEFT's IA3 does (its vector has ``3 * n_embd`` entries). Adapters read from PEFT's
            format set it.
    """

    feedforward: Selection = None
    scale_packed_query: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.scale_packed_query, bool):
            raise ConfigError(f"ia3 scale_packed_query must be True or False, got {self.scale_packed_query!r}")
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
