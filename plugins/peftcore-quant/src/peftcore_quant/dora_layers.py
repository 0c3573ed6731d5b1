"""DoRA layers over quantized frozen linear layers (the ``peftcore-dora`` plugin's DoRA, QLoRA-style).

DoRA's output, ``y = (m / ||V||) * (x W^T + s x A^T B^T) + b`` with ``V = W + s B A``, is computed
around the quantized layer's own matmul, as HF PEFT does for bitsandbytes layers::

    base = base_layer(x)                                      # x W^T + b, the quantized matmul
    y    = base + (m / ||V|| - 1) * (base - b) + (m / ||V||) * s * dropout(x) A^T B^T

(the same thing rearranged so that the bias is not scaled, and so that a fresh adapter, where
``m == ||V||`` and ``B == 0``, gives ``base`` bit for bit). ``||V||`` (row norms, ``(out,)``)
needs the weight itself: each forward dequantizes it under ``no_grad`` and drops it again, so no
full-precision copy of the weight outlives the call (caching it would undo the quantization's
memory saving). ``||V||`` is a constant in backward (DoRA section 4.3), as in ``DoraLayer``.
Factors and magnitude are float32 (torchao: the weight's logical dtype, as ``LoraTorchao``).

Merging (bitsandbytes only): dequantize, form ``W' = m V / ||V||`` in float32, quantize ``W'``
again with the layer's own settings. The merged weight differs from ``W'`` by the
requantization error, at most half a quantization step of ``W'`` per element (see
docs/quantization.md); ``unmerge`` puts the quantized tensors from before the merge back, bit for
bit. torchao weights refuse to merge.

This module needs the ``peftcore-dora`` plugin; :mod:`peftcore_quant.dora` (the handlers) imports
it only when a layer is built.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from peftcore.errors import AdapterStateError
from peftcore_dora.layers import DoraLayer

from peftcore_quant.layers import _bnb, _unpack_for_cpu, dequantize_4bit, int8_weight, requantize_int8, set_int8_weight


class QuantDoraLayer(DoraLayer):
    """DoRA on a quantized linear layer; the original stays as ``base_layer``.

    Subclasses say how to dequantize (and, for merging, snapshot, restore and requantize) their
    base's weight. As :class:`DoraLayer`, at most one unmerged adapter runs at a time.
    """

    supports_routing = False  # the grouped op needs a plain base weight

    def __init__(self, base_layer: nn.Module):
        super().__init__(base_layer)
        self._saved_quant: dict[str, Any] = {}  # adapter -> the base's quantized state before its merge

    def dequantized(self) -> torch.Tensor:
        """The base weight dequantized, ``(out_features, in_features)``: a new tensor each call."""
        raise NotImplementedError

    def factor_dtype(self) -> torch.dtype:
        """The dtype of ``lora_A``, ``lora_B`` and the magnitude, and of the norm computation."""
        return torch.float32

    def base_weight(self) -> torch.Tensor:
        """The dequantized base weight in :meth:`factor_dtype`, ``(out, in)``; a new tensor, so
        writing to it changes nothing (``DoraLayer.add_adapter`` reads shape, dtype and norms)."""
        return self.dequantized().to(self.factor_dtype())

    def weight_norm(self, name: str) -> torch.Tensor:
        """``||W + s B A||`` per output row for adapter ``name``, ``(out,)``, without autograd."""
        cfg = self.dora_config[name]
        A, B = self.lora_A[name], self.lora_B[name]
        with torch.no_grad():
            direction = self.base_weight()  # (out, in), a fresh tensor: added to in place
            direction.addmm_(B.to(direction.dtype), A.to(direction.dtype), alpha=cfg.scale)
            return direction.norm(p=2, dim=1)

    # -- forward -------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        running = self.running_adapters()
        if not running:
            return self.base_layer(x)
        if len(running) > 1:
            raise AdapterStateError(f"DoRA adapters {list(running)} cannot run together on one layer; activate one")
        name = running[0]
        cfg = self.dora_config[name]
        A, B, m = self.lora_A[name], self.lora_B[name], self.lora_magnitude_vector[name]
        factor = m / self.weight_norm(name)  # (out,); gradient to m only
        base = self.base_layer(x)  # (*, out): the quantized layer's own matmul, bias included
        h = F.dropout(x, cfg.dropout, self.training) if cfg.dropout > 0 else x
        low_rank = cfg.scale * F.linear(F.linear(h.to(A.dtype), A), B)  # (*, out), in the factors' dtype
        bias = self.base_layer.bias
        unbiased = base if bias is None else base - bias
        y = base + (factor - 1) * unbiased + factor * low_rank  # promotes to the factors' dtype
        return y.to(base.dtype)

    # -- merge -------------------------------------------------------------------------------------
    def _snapshot(self) -> Any:
        raise NotImplementedError

    def _restore(self, snapshot: Any) -> None:
        raise NotImplementedError

    def _requantize(self, weight: torch.Tensor) -> None:
        raise NotImplementedError

    def merge(self, name: str) -> None:
        if name in self.merged_adapters:
            return
        cfg = self.dora_config[name]
        snapshot = self._snapshot()
        with torch.no_grad():
            A, B = self.lora_A[name].float(), self.lora_B[name].float()
            direction = self.dequantized().float().addmm_(B, A, alpha=cfg.scale)  # V, (out, in)
            factor = self.lora_magnitude_vector[name].float() / direction.norm(p=2, dim=1)  # (out,)
            self._requantize(direction.mul_(factor[:, None]))  # W' = m V / ||V||
        self._saved_quant[name] = snapshot
        self.merged_adapters.append(name)

    def unmerge_problem(self, name: str) -> str | None:
        return None  # unmerge restores the saved quantized tensors; nothing is divided out

    def unmerge(self, name: str) -> None:
        if name not in self.merged_adapters:
            return
        # Later merges were made on top of this one: take them out first (exact restore), then redo them.
        later = self.merged_adapters[self.merged_adapters.index(name):]
        self._restore(self._saved_quant[later[0]])
        for other in later:
            self._saved_quant.pop(other, None)
            self.merged_adapters.remove(other)
        for other in later[1:]:
            self.merge(other)

    def remove_adapter(self, name: str) -> None:
        self._saved_quant.pop(name, None)
        super().remove_adapter(name)


class Dora4bit(QuantDoraLayer):
    """DoRA on bitsandbytes' ``Linear4bit`` (nf4 or fp4, with or without double quantization)."""

    def __init__(self, base_layer: nn.Module):
        super().__init__(base_layer)
        # As Lora4bit: bitsandbytes' AVX512-BF16 eval kernel computes in bf16, has no backward and
        # repacks the weight in place; a wrapped layer keeps the portable layout.
        if hasattr(base_layer, "support_avx512bf16_for_cpu"):
            base_layer.support_avx512bf16_for_cpu = False
        _unpack_for_cpu(base_layer.weight)

    def dequantized(self) -> torch.Tensor:
        return dequantize_4bit(self.base_layer.weight)

    def _snapshot(self) -> Any:
        weight = self.base_layer.weight
        _unpack_for_cpu(weight)
        return weight.data, weight.quant_state

    def _restore(self, snapshot: Any) -> None:
        weight = self.base_layer.weight
        weight.data, weight.quant_state = snapshot

    def _requantize(self, merged: torch.Tensor) -> None:
        weight = self.base_layer.weight
        state = weight.quant_state
        packed, new_state = _bnb().functional.quantize_4bit(
            merged.to(state.dtype), blocksize=state.blocksize, compress_statistics=state.nested,
            quant_type=state.quant_type, quant_storage=weight.quant_storage,
        )
        weight.data, weight.quant_state = packed, new_state


class Dora8bit(QuantDoraLayer):
    """DoRA on bitsandbytes' ``Linear8bitLt`` (int8 weight with one scale per output row)."""

    def dequantized(self) -> torch.Tensor:
        CB, SCB = int8_weight(self.base_layer)
        return CB.float() * (SCB.float()[:, None] / 127.0)

    def _snapshot(self) -> Any:
        return int8_weight(self.base_layer)

    def _restore(self, snapshot: Any) -> None:
        set_int8_weight(self.base_layer, *snapshot)

    def _requantize(self, merged: torch.Tensor) -> None:
        requantize_int8(self.base_layer, merged)


class DoraTorchao(QuantDoraLayer):
    """DoRA on ``nn.Linear`` whose weight is a torchao quantized tensor (e.g. int8 weight-only)."""

    def dequantized(self) -> torch.Tensor:
        return self.base_layer.weight.dequantize()

    def factor_dtype(self) -> torch.dtype:
        return self.base_layer.weight.dtype  # the weight's logical (compute) dtype, as LoraTorchao

    def merge(self, name: str) -> None:
        raise AdapterStateError(
            f"DoRA adapter {name!r}: merging into a torchao-quantized weight ({type(self.base_layer.weight).__name__}) "
            "is not supported (requantizing needs the quantization config, which the tensor does not record); "
            "keep the adapter unmerged, or load the base unquantized, merge there, and quantize the result"
        )
