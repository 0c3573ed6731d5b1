"""Prompt tuning: learned virtual token embeddings before the input."""

from peftcore.tuners.prompt.config import PromptConfig
from peftcore.tuners.prompt.method import PromptMethod

__all__ = ["PromptConfig", "PromptMethod"]
