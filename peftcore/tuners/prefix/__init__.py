"""Prefix tuning: learned keys and values in front of every attention layer, through the transformers cache."""

from peftcore.tuners.prefix.config import PrefixConfig
from peftcore.tuners.prefix.method import PrefixMethod

__all__ = ["PrefixConfig", "PrefixMethod"]
