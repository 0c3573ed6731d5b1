"""DoRA layers over quantized frozen linear layers (the ``peftcore-dora`` plugin's DoRA, QLoRA-style).

DoRA's output, ``y = (m / ||V||) * (x W^T + s x A^T B^T) + b`` with ``V = W + s B A``, is computed
around the quantized layer's own matmul, as HF PEFT does for bitsandbytes layers::

    base = base_layer(x)                                      # x W^T + b, the quantized matmul
    y    = base + (m / ||V|| - 1) * (base - b) + (m / ||V||) * s * dropout(x) A^T B^T

(the same thing rearranged so that the bias is not scaled, and so that a fresh adapter, where
``m == ||V||`` and ``B == 0``, gives ``base`` bit for bit). The last term goes through peftcore's
op ``lora_add_`` as ``s * dropout(x) A^T (diag(m / ||V||) B)^T``, added into ``y`` in place, with
the dropout mask drawn from a seed and regenerated in backward (as for the LoRA layers). ``||V||`` (row norms, ``(out,)``)
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

import torch

from peftcore.ops.lora import new_seed_tensor
from peftcore.ops.lora_add import lora_add_
from peftcore_dora.layers import DoraLayer

from peftcore_quant.layers import _Bnb4bitBase, _Bnb8bitBase, _RequantizingMerge, _TorchaoBase


class QuantDoraLayer(_RequantizingMerge, DoraLayer):
    """DoRA on a quantized linear layer; the original stays as ``base_layer``.

    Subclasses say how to dequantize (and, for merging, snapshot, restore and requantize) their
    base's weight: a base mixin first, e.g. ``Dora4bit(_Bnb4bitBase, QuantDoraLayer)``. As
    :class:`DoraLayer`, at most one unmerged adapter runs at a time. ``factor_dtype`` (from
    ``_RequantizingMerge``) is the dtype of ``lora_A``, ``lora_B`` and the magnitude, and of the
    norm computation.
    """

    _adapter_noun = "DoRA adapter"

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

    # -- forward (DoraLayer.forward: routing, the one running adapter) -------------------------------
    # base_output: DoraLayer's (the quantized layer's own output), or _Bnb4bitBase's faster,
    # bit-identical path for 4-bit bases.
    def adapter_forward(self, x: torch.Tensor, name: str) -> torch.Tensor:
        cfg = self.dora_config[name]
        A, B, m = self.lora_A[name], self.lora_B[name], self.lora_magnitude_vector[name]
        factor = m / self.weight_norm(name)  # (out,); gradient to m only
        base = self.base_output(x)  # (*, out): the quantized layer's own matmul, bias included
        bias = self.base_layer.bias
        unbiased = base if bias is None else base - bias
        y = base + (factor - 1) * unbiased  # a new tensor, in the factors' dtype
        # + factor * s * dropout(x) A^T B^T = s * dropout(x) A^T (factor B)^T, added in place by
        # peftcore's op: seeded dropout regenerated in backward (no stored mask), no second output buffer
        p = cfg.dropout if self.training else 0.0
        y = lora_add_(y, x, A, factor[:, None] * B, cfg.scale, p, new_seed_tensor() if p > 0.0 else 0)
        return y.to(base.dtype)

    # -- merge -------------------------------------------------------------------------------------
    def _merged_weight(self, name: str) -> torch.Tensor:
        cfg = self.dora_config[name]
        A, B = self.lora_A[name].float(), self.lora_B[name].float()
        direction = self.dequantized().float().addmm_(B, A, alpha=cfg.scale)  # V, (out, in)
        factor = self.lora_magnitude_vector[name].float() / direction.norm(p=2, dim=1)  # (out,)
        return direction.mul_(factor[:, None])  # W' = m V / ||V||

    def unmerge_problem(self, name: str) -> str | None:
        return None  # unmerge restores the saved quantized tensors; nothing is divided out


class Dora4bit(_Bnb4bitBase, QuantDoraLayer):
    """DoRA on bitsandbytes' ``Linear4bit`` (nf4 or fp4, with or without double quantization)."""


class Dora8bit(_Bnb8bitBase, QuantDoraLayer):
    """DoRA on bitsandbytes' ``Linear8bitLt`` (int8 weight with one scale per output row)."""


class DoraTorchao(_TorchaoBase, QuantDoraLayer):
    """DoRA on ``nn.Linear`` whose weight is a torchao quantized tensor (e.g. int8 weight-only)."""
