"""HF PEFT's on-disk format <-> peftcore's native ``(config dict, tensors)``.

A PEFT adapter directory holds ``adapter_config.json`` (with ``peft_type``) and
``adapter_model.safetensors`` with keys such as ``base_model.model.<path>.lora_A.weight``.
Conversion is dispatched by PEFT's ``peft_type`` (reading) or peftcore's method name (writing)
to one converter module per method family, each exposing ``PEFT_TYPES``, ``METHODS``,
``to_native(model, peft_config, tensors, source)`` and ``from_native(model, native_config, tensors)``:

=====================================  ============================  ====================
module                                 PEFT types                    peftcore methods
=====================================  ============================  ====================
:mod:`peftcore.formats.peft_lora`      LORA (``use_dora``: DoRA)     lora, dora (plugin)
:mod:`peftcore.formats.peft_ia3`       IA3                           ia3 (plugin)
:mod:`peftcore.formats.peft_prompt`    PROMPT_TUNING, PREFIX_TUNING  prompt, prefix
=====================================  ============================  ====================

The native config dict returned by :func:`to_native` has at least ``method``, ``name``,
``options`` (keyword arguments of the method's ``config_class``), ``targets`` (module paths),
``trainable`` (module paths trained in full: PEFT's ``modules_to_save``) and ``trainable_keys``
(the tensor keys of those); tensors are native-keyed (see :mod:`peftcore.persistence`).
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

import torch
from torch import nn

from peftcore.errors import CheckpointError

#: The converter modules, asked in this order.
CONVERTERS = ("peftcore.formats.peft_lora", "peftcore.formats.peft_ia3", "peftcore.formats.peft_prompt")

#: Which converter handles what, without importing them (a converter may import a plugin).
_PEFT_TYPES = {"LORA": CONVERTERS[0], "IA3": CONVERTERS[1], "PROMPT_TUNING": CONVERTERS[2], "PREFIX_TUNING": CONVERTERS[2]}
_METHODS = {"lora": CONVERTERS[0], "dora": CONVERTERS[0], "ia3": CONVERTERS[1], "prompt": CONVERTERS[2],
            "prefix": CONVERTERS[2]}


#: Methods whose adapters PEFT's format holds without loss (with the extra ``"peftcore"`` key):
#: ``peftcore.save`` writes these in PEFT's format by default. IA3, prompt and prefix tuning
#: convert, but some of their options do not survive the trip (docs/interop.md).
DEFAULT_PEFT_METHODS = ("lora", "dora")


def is_peft_config(config: Any) -> bool:
    """Whether a parsed ``adapter_config.json`` is HF PEFT's (it names a ``peft_type``)."""
    return isinstance(config, dict) and "peft_type" in config


def peft_types() -> tuple[str, ...]:
    """The PEFT types peftcore reads."""
    return tuple(_PEFT_TYPES)


def methods() -> tuple[str, ...]:
    """The peftcore methods that can be written in PEFT's format."""
    return tuple(_METHODS)


def _converter(name: str) -> ModuleType:
    module = importlib.import_module(name)
    missing = [a for a in ("to_native", "from_native", "PEFT_TYPES", "METHODS") if not hasattr(module, a)]
    if missing:  # a converter that is half there is a bug of ours, not of the file
        raise RuntimeError(f"the PEFT converter {name} lacks {', '.join(missing)}")
    return module


def to_native(model: nn.Module | None, peft_config: dict[str, Any], tensors: dict[str, torch.Tensor],
              source: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """A PEFT adapter as peftcore's native config dict and native-keyed tensors; the model is only read.

    Args:
        model: the base model (plain or wrapped); ``None`` where the converter does not need it
            (LoRA/DoRA: the module paths are in the keys).
        peft_config: the parsed ``adapter_config.json``.
        tensors: the PEFT-keyed tensors of ``adapter_model.safetensors``.
        source: where the adapter came from, for messages.

    Raises:
        CheckpointError: a ``peft_type`` no converter handles, or an option, target or tensor
            the converter cannot read (the message names it and lists what is supported).
    """
    peft_type = peft_config.get("peft_type")
    if peft_type not in _PEFT_TYPES:
        raise CheckpointError(
            f"the HF PEFT adapter in {source!r} has peft_type {peft_type!r}, which peftcore does not read; "
            f"it reads {', '.join(_PEFT_TYPES)}"
        )
    return _converter(_PEFT_TYPES[peft_type]).to_native(model, peft_config, tensors, source)


def from_native(model: nn.Module | None, native_config: dict[str, Any],
                tensors: dict[str, torch.Tensor]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """A native adapter as PEFT's ``adapter_config.json`` dict and PEFT-keyed tensors.

    Args:
        model: the model the adapter belongs to; ``None`` where the converter does not need it.
        native_config: a native config dict (as :mod:`peftcore.persistence` writes it).
        tensors: native-keyed tensors, adapter and ``trainable=`` ones.

    Raises:
        CheckpointError: a method or option PEFT's format cannot hold (the message says which
            and that ``format='peftcore'`` keeps it).
    """
    method = native_config.get("method")
    if method not in _METHODS:
        raise CheckpointError(
            f"HF PEFT's format cannot hold a {method!r} adapter (it holds {', '.join(_METHODS)}); "
            "save it with format='peftcore'"
        )
    return _converter(_METHODS[method]).from_native(model, native_config, tensors)
