"""peftcore-quant: LoRA over a quantized frozen base (QLoRA) for peftcore.

peftcore finds the layer handlers through entry points (``peftcore.layers``: ``lora.bnb_4bit``,
``lora.bnb_8bit``, ``lora.torchao``); ``peftcore.wrap(model, "lora")`` on a quantized model uses
them without importing this package. ``quantize_model``, ``prepare_for_training`` and
``init_from_quantization_error`` (LoRA factors from the quantization error) are helpers.
"""

from peftcore_quant.error_init import LayerError, init_from_quantization_error
from peftcore_quant.layers import Lora4bit, Lora8bit, LoraTorchao, QuantLoraLinear
from peftcore_quant.quantize import KINDS, prepare_for_training, quantize_model

__version__ = "0.1.0"
__all__ = ["KINDS", "LayerError", "Lora4bit", "Lora8bit", "LoraTorchao", "QuantLoraLinear", "init_from_quantization_error", "prepare_for_training",
           "quantize_model", "__version__"]
