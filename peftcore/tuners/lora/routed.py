"""Forward of LoRA layers under per-example routing (see :mod:`peftcore.routing`).

Linear-like layers (``nn.Linear``, GPT-2's ``Conv1D``) hand every routed adapter's factors and a
per-row index to one grouped op (:func:`peftcore.ops.lora_grouped.lora_grouped`): one call per
layer whatever the number of adapters, and each adapter's gradient comes from its own rows only.
A layer whose base computes its own output (``LoraLinear.base_output`` returns a tensor: a
quantized base) keeps that output and gets the routed adapters' paths added into it
(:func:`peftcore.ops.lora_grouped_add.lora_grouped_add_`, same rows, same dropout mask).
Embedding and convolution layers, rarer targets, add each routed adapter's delta to its own
examples (a loop over the adapters of the batch, in plain PyTorch).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from peftcore.ops import dispatch, philox
from peftcore.ops.lora import new_seed_tensor
from peftcore.ops.lora_grouped import OP, lora_grouped
from peftcore.ops.lora_grouped_add import lora_grouped_add_

_CACHE = "_grouped_kernels"


def _where(layer: nn.Module) -> str:
    return f"a LoRA layer on {type(layer.base_layer).__name__}"


def _kernels(layer: nn.Module) -> dispatch.KernelCache:
    cache = layer.__dict__.get(_CACHE)
    if cache is None:
        cache = layer.__dict__[_CACHE] = dispatch.KernelCache(OP)
    return cache


def _backend(configs: list[Any], routing: Any) -> str | None:
    """The adapters' common backend if ``lora_grouped`` has it, else auto (a kernel plugin's
    backend of ``lora_linear`` only). The names are looked up once per routed call."""
    chosen = {c.backend for c in configs}
    if len(chosen) != 1:
        return None
    backend = chosen.pop()
    if backend == dispatch.AUTO:
        return None
    known = routing.__dict__.get("_grouped_backends")
    if known is None:
        known = routing.__dict__["_grouped_backends"] = frozenset(dispatch.known_backends(OP))
    return backend if backend in known else None


def linear_forward(layer: Any, x: torch.Tensor, routing: Any) -> torch.Tensor:
    """``base(x)`` plus, for each row, its example's adapter (a ``LoraLinear`` or subclass)."""
    names, index = routing.plan(layer.adapter_names(), x, _where(layer))
    configs = [layer.lora_config[n] for n in names]
    ps = [c.dropout if layer.training else 0.0 for c in configs]
    seed = new_seed_tensor() if any(p > 0.0 for p in ps) else 0
    A, B, scales = [layer.lora_A[n] for n in names], [layer.lora_B[n] for n in names], [c.scale for c in configs]
    base = layer.base_output(x)
    if base is not None:  # the base's own matmul (a quantized layer): add each row's adapter into it
        return lora_grouped_add_(base, x, A, B, scales, index, ps, seed)
    return lora_grouped(
        x, layer._weight_for_op(), layer.base_layer.bias, A, B, scales,
        index, ps, seed, backend=_backend(configs, routing), cache=_kernels(layer),
    )


def _embedding_delta(layer: Any, name: str, ids: torch.Tensor) -> torch.Tensor:
    cfg = layer.lora_config[name]
    h = layer._embed(ids, layer.lora_A[name].t())  # (*, r)
    return cfg.scale * F.linear(h, layer.lora_B[name])


def _conv_delta(layer: Any, name: str, x: torch.Tensor) -> torch.Tensor:
    cfg = layer.lora_config[name]
    base = layer.base_layer
    if layer.training and cfg.dropout > 0.0:
        keep = philox.keep_mask(new_seed_tensor(), x.shape, cfg.dropout, x.device)
        x = x * keep.to(x.dtype) * (1.0 / (1.0 - cfg.dropout))
    h = layer._conv(x, layer.lora_A[name], base.stride, base.padding, base.dilation)
    return cfg.scale * layer._conv(h, layer.lora_B[name], 1, 0, 1)


def looped_forward(layer: Any, x: torch.Tensor, routing: Any) -> torch.Tensor:
    """``base(x)`` plus each routed adapter's delta on its own examples (embedding, convolution)."""
    routing.used = True
    if x.dim() < 1:
        raise routing_error(layer, x)
    held = set(layer.adapter_names())
    routing.examples_per_name(x.shape[0], _where(layer))  # raises on a batch of the wrong size
    delta = _embedding_delta if isinstance(layer.base_layer, nn.Embedding) else _conv_delta
    y = layer.base_layer(x)
    for name in routing.groups:
        if name not in held:
            continue
        examples = routing.examples(name, x.shape[0], x.device)
        y = y.index_add(0, examples, delta(layer, name, x.index_select(0, examples)).to(y.dtype))
    return y


def routing_error(layer: Any, x: torch.Tensor) -> Exception:
    from peftcore.errors import ConfigError

    return ConfigError(f"adapter_names needs a batch dimension, but {_where(layer)} got an input of shape {tuple(x.shape)}")
