"""Prompt-tuning options."""

from __future__ import annotations

import dataclasses
from typing import Any

from peftcore.errors import ConfigError

KEYWORDS = ("random", "vocab")


@dataclasses.dataclass
class PromptConfig:
    """Options of a prompt-tuning adapter: ``virtual_tokens`` learned embeddings put before the input.

    Attributes:
        virtual_tokens: number of virtual tokens V (> 0).
        init: ``"vocab"`` starts from V random rows of the word embedding matrix, ``"random"``
            from a normal distribution with the mean and standard deviation of that matrix, and
            any other string is a text whose tokens' embeddings are the start (repeated to fill V
            when the text is shorter, cut when longer).
        tokenizer: used only when ``init`` is a text: a tokenizer object, or the path of a local
            tokenizer directory; ``None`` loads the tokenizer from the model's own directory
            (``model.name_or_path``). Kept in saved adapters as a path (or None).
        init_ids: the token ids of the ``init`` text, filled in from the tokenizer; a saved
            adapter keeps them so that loading needs no tokenizer.
    """

    virtual_tokens: int = 20
    init: str = "vocab"
    tokenizer: Any = None
    init_ids: list[int] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.virtual_tokens, bool) or not isinstance(self.virtual_tokens, int) or self.virtual_tokens <= 0:
            raise ConfigError(f"prompt virtual_tokens must be a positive int, got {self.virtual_tokens!r}")
        if not isinstance(self.init, str) or not self.init.strip():
            raise ConfigError(f"prompt init must be 'random', 'vocab' or a non-empty text, got {self.init!r}")
        if self.init_ids is not None:
            ids = list(self.init_ids)
            if not ids or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
                raise ConfigError(f"prompt init_ids must be a non-empty list of token ids, got {self.init_ids!r}")
            self.init_ids = ids
        if self.tokenizer is not None and not isinstance(self.tokenizer, str):
            # encode now: the config is saved as JSON, which holds a path but not a tokenizer object
            tokenizer = self.tokenizer
            if self.is_text and self.init_ids is None:
                self.init_ids = encode(tokenizer, self.init)
            self.tokenizer = getattr(tokenizer, "name_or_path", None) or None

    @property
    def is_text(self) -> bool:
        """Whether ``init`` is a text (not one of the keywords)."""
        return self.init not in KEYWORDS


def encode(tokenizer: Any, text: str) -> list[int]:
    """The token ids of ``text`` without special tokens.

    Raises:
        ConfigError: the tokenizer cannot encode it, or it has no tokens.
    """
    try:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    except Exception as exc:
        raise ConfigError(
            f"prompt init={text!r}: the tokenizer {type(tokenizer).__name__} could not encode the text ({exc}); pass a "
            "transformers tokenizer as tokenizer="
        ) from exc
    ids = [int(i) for i in ids]
    if not ids:
        raise ConfigError(f"prompt init={text!r} has no tokens; give a longer text or use init='vocab'")
    return ids
