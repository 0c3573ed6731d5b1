"""The handlers that attach DoRA (the ``peftcore-dora`` plugin's method) to quantized linear layers.

Entry points ``dora.bnb_4bit``, ``dora.bnb_8bit`` and ``dora.torchao`` (group ``peftcore.layers``)
name the handlers below. peftcore asks for them only when ``peftcore.wrap(model, "dora")`` runs,
which needs the ``dora`` method, i.e. the ``peftcore-dora`` plugin. This module does not import
that plugin: the layers (:mod:`peftcore_quant.dora_layers`) are imported when the first layer is
built, so that peftcore-quant's LoRA works with or without ``peftcore-dora`` installed, and a
``dora`` method from elsewhere gets an error naming what is missing instead of an import failure.
"""

from __future__ import annotations

import functools

from torch import nn

from peftcore.errors import PluginError
from peftcore.tuners.modules import Handler

from peftcore_quant.layers import _is_bnb, _is_torchao_linear


def _build(layer: str, module: nn.Module) -> nn.Module:
    try:
        from peftcore_quant import dora_layers
    except ImportError as exc:
        raise PluginError(
            f"DoRA over a quantized layer ({type(module).__name__}) needs the peftcore-dora plugin, whose "
            f"DoraLayer peftcore-quant's {layer} builds on: pip install peftcore-dora ({type(exc).__name__}: {exc})"
        ) from exc
    return getattr(dora_layers, layer)(module)


BNB_4BIT = Handler("bitsandbytes Linear4bit", lambda m: _is_bnb(m, "Linear4bit"), functools.partial(_build, "Dora4bit"),
                   method="dora", linear_like=True, priority=1, peftcore_api=1)
BNB_8BIT = Handler("bitsandbytes Linear8bitLt", lambda m: _is_bnb(m, "Linear8bitLt"), functools.partial(_build, "Dora8bit"),
                   method="dora", linear_like=True, priority=1, peftcore_api=1)
TORCHAO = Handler("torch.nn.Linear with a torchao quantized weight", _is_torchao_linear,
                  functools.partial(_build, "DoraTorchao"), method="dora", linear_like=True, priority=1, peftcore_api=1)
