"""LoRA: low-rank adaptation."""

from peftcore.tuners.lora.config import LoraConfig
from peftcore.tuners.lora.method import LoraMethod

__all__ = ["LoraConfig", "LoraMethod"]
