"""LoRA layers over quantized frozen linear layers (QLoRA), and the handlers that attach them.

The base output is the quantized layer's own (``base_layer(x)``: bitsandbytes' 4-bit/8-bit matmul,
torchao's quantized ``F.linear``); the low-rank path goes through peftcore's op, added into that
output in place (``LoraLinear.base_output`` -> ``peftcore.ops.lora_add.lora_add_``: seeded dropout,
no stored mask). Factors are float32 whatever the base stores (as QLoRA and HF PEFT keep them);
under a bf16 compute dtype the path casts them.

Merging (bitsandbytes only): dequantize, add ``scale * B A`` in float32, quantize again with the
layer's own settings. The merged weight differs from ``W + scale B A`` by the requantization
error (at most half a quantization step per element, see docs/quantization.md). ``unmerge``
puts the original quantized tensors back bit for bit. torchao weights refuse to merge.
"""

from __future__ import annotations

import ctypes
import threading
from typing import Any

import torch
from torch import nn

from peftcore.errors import AdapterStateError
from peftcore.tuners.lora.layers import LoraLinear
from peftcore.tuners.modules import Handler


def _bnb():
    import bitsandbytes as bnb  # imported when a handler is first asked, not with peftcore

    return bnb


class _RequantizingMerge:
    """Mixin for an adapter layer over a quantized base: the quantized-base interface and the merge stack.

    Merging snapshots the base's quantized tensors, computes the merged weight in float32
    (:meth:`_merged_weight`, per method) and quantizes it again into the base (:meth:`_requantize`,
    per kind of base). ``unmerge`` restores the snapshot taken before the first of the adapters it
    takes out, bit for bit, and merges the later ones again. A per-kind base mixin (``_Bnb4bitBase``,
    ``_Bnb8bitBase``, ``_TorchaoBase``) supplies ``dequantized``, ``_snapshot``, ``_restore`` and
    ``_requantize``. Bases go in that order: ``Lora4bit(_Bnb4bitBase, QuantLoraLinear)`` with
    ``QuantLoraLinear(_RequantizingMerge, LoraLinear)`` (DoRA alike), so each mixin's ``super()``
    reaches the method's layer class.
    """

    _adapter_noun = "adapter"  # how refusals name an adapter

    def __init__(self, base_layer: nn.Module):
        super().__init__(base_layer)
        self._saved_quant: dict[str, Any] = {}  # adapter -> the base's quantized state before its merge

    def dequantized(self) -> torch.Tensor:
        """The base weight dequantized, ``(out_features, in_features)``: a new tensor each call."""
        raise NotImplementedError

    def factor_dtype(self) -> torch.dtype:
        """The dtype of the adapter's tensors (factors; DoRA: also the magnitude and the norm
        computation): float32 whatever the base stores."""
        return torch.float32

    def _snapshot(self) -> Any:
        raise NotImplementedError

    def _restore(self, snapshot: Any) -> None:
        raise NotImplementedError

    def _requantize(self, weight: torch.Tensor) -> None:
        raise NotImplementedError

    def _merged_weight(self, name: str) -> torch.Tensor:
        """The base weight with adapter ``name`` merged, ``(out, in)`` float32, before requantization
        (called under ``no_grad``; may be a fresh tensor written in place)."""
        raise NotImplementedError

    def merge(self, name: str) -> None:
        if name in self.merged_adapters:
            return
        snapshot = self._snapshot()
        with torch.no_grad():
            self._requantize(self._merged_weight(name))
        self._saved_quant[name] = snapshot
        self.merged_adapters.append(name)

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


# -- the kinds of quantized base, mixed in before the method's layer class -------------------------
class _Bnb4bitBase:
    """A bitsandbytes ``Linear4bit`` base (nf4 or fp4, with or without double quantization)."""

    def __init__(self, base_layer: nn.Module):
        super().__init__(base_layer)
        # bitsandbytes repacks a 4-bit weight for its AVX512-BF16 CPU kernel on the first eval
        # forward without autograd. That kernel computes in bf16 whatever the compute dtype (outputs
        # move by ~5e-3 on a 64-wide layer), has no backward, and the repacking does not round-trip
        # exactly; a wrapped layer keeps the portable layout so train and eval compute alike.
        if hasattr(base_layer, "support_avx512bf16_for_cpu"):
            base_layer.support_avx512bf16_for_cpu = False
        _unpack_for_cpu(base_layer.weight)  # repacked by an eval pass before wrapping

    def dequantized(self) -> torch.Tensor:
        return dequantize_4bit(self.base_layer.weight)

    def base_output(self, x: torch.Tensor) -> torch.Tensor:
        """``base_layer(x)``, bit for bit, computed faster (LoRA and DoRA layers over 4-bit bases)."""
        base = self.base_layer
        state = getattr(base.weight, "quant_state", None)
        if (x.device.type != "cpu" or state is None or base.compute_dtype is None
                or getattr(state, "packing_format_for_cpu", False) or x.numel() == 0):
            return base(x)
        # bitsandbytes' own computation (dequantize_4bit, then F.linear; backward dequantizes
        # again), with the block scales' double quantization undone once per quantized state
        # instead of in every forward and backward: that step (dequantize_blockwise) took about
        # as long as the 4-bit dequantization itself (9 of 18 ms for a 2816 x 1024 weight here).
        # The scales cost 4 bytes per 64 weights (+12.5 % over the 4-bit weight); outputs and
        # gradients are bitsandbytes' own bit for bit (tests/test_layers.py). The dequantized
        # weight goes into a reused buffer (_dequantize_4bit_scratch), not a new one per call.
        cached = self.__dict__.get("_absmax")
        if cached is None or cached[0] is not state:
            if state.nested:
                absmax = _bnb().functional.dequantize_blockwise(state.absmax, state.state2) + state.offset
            else:
                absmax = state.absmax
            cached = self.__dict__["_absmax"] = (state, absmax.float())
        bias = base.bias
        x_c = x.to(base.compute_dtype)
        y = _Dequantized4bitLinear.apply(x_c, base.weight.data, cached[1], None if bias is None else bias.to(base.compute_dtype),
                                         tuple(state.shape), state.blocksize, state.quant_type)
        return y.to(x.dtype)

    def _snapshot(self) -> Any:
        weight = self.base_layer.weight
        _unpack_for_cpu(weight)  # merge and unmerge work on bitsandbytes' portable layout
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


class _Bnb8bitBase:
    """A bitsandbytes ``Linear8bitLt`` base (int8 weight with one scale per output row)."""

    def dequantized(self) -> torch.Tensor:
        CB, SCB = int8_weight(self.base_layer)
        return CB.float() * (SCB.float()[:, None] / 127.0)

    def _snapshot(self) -> Any:
        return int8_weight(self.base_layer)

    def _restore(self, snapshot: Any) -> None:
        set_int8_weight(self.base_layer, *snapshot)

    def _requantize(self, merged: torch.Tensor) -> None:
        requantize_int8(self.base_layer, merged)


class _TorchaoBase:
    """An ``nn.Linear`` base whose weight is a torchao quantized tensor (e.g. int8 weight-only)."""

    def dequantized(self) -> torch.Tensor:
        return self.base_layer.weight.dequantize()

    def factor_dtype(self) -> torch.dtype:
        return self.base_layer.weight.dtype  # the weight's logical (compute) dtype

    def merge(self, name: str) -> None:
        raise AdapterStateError(
            f"{self._adapter_noun} {name!r}: merging into a torchao-quantized weight ({type(self.base_layer.weight).__name__}) "
            "is not supported (requantizing needs the quantization config, which the tensor does not record); "
            "keep the adapter unmerged, or load the base unquantized, merge there, and quantize the result"
        )


# -- LoRA layers --------------------------------------------------------------------------------------
class QuantLoraLinear(_RequantizingMerge, LoraLinear):
    """LoRA on a quantized linear layer: ``y = base_layer(x) + scale * dropout(x) A^T B^T``.

    Subclasses say how to dequantize (and, for merging, requantize) their base's weight: a base
    mixin first, e.g. ``Lora4bit(_Bnb4bitBase, QuantLoraLinear)``.
    """

    supports_routing = True  # routed rows: the base's own output plus lora_grouped_add_ (peftcore/tuners/lora/routed.py)

    # -- what LoraLinear reads -----------------------------------------------------------------
    def factor_shapes(self, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        base = self.base_layer
        return (rank, base.in_features), (base.out_features, rank)

    def base_output(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x)

    def base_weight(self) -> torch.Tensor:
        """The dequantized base weight, ``(out, in)`` float (a new tensor: for PiSSA and checks)."""
        return self.dequantized()

    def weight_for_op(self) -> torch.Tensor:
        return self.dequantized()

    # -- merge -----------------------------------------------------------------------------------
    def merge(self, name: str) -> None:
        if name not in self.merged_adapters and self.lora_config[name].init == "pissa":
            raise AdapterStateError(f"adapter {name!r}: merging a PiSSA adapter into a quantized base is not supported")
        super().merge(name)

    def _merged_weight(self, name: str) -> torch.Tensor:
        return self.dequantized().float() + self.delta_weight(name)


class Lora4bit(_Bnb4bitBase, QuantLoraLinear):
    """LoRA on bitsandbytes' ``Linear4bit`` (nf4 or fp4, with or without double quantization)."""


class Lora8bit(_Bnb8bitBase, QuantLoraLinear):
    """LoRA on bitsandbytes' ``Linear8bitLt`` (int8 weight with one scale per output row)."""


class LoraTorchao(_TorchaoBase, QuantLoraLinear):
    """LoRA on ``nn.Linear`` whose weight is a torchao quantized tensor (e.g. int8 weight-only)."""


# -- the 4-bit weight dequantized into a reused buffer ----------------------------------------------
# bitsandbytes' CPU op returns a new tensor for every dequantization (4 to 11 MB per layer of the
# 0.4 B benchmark model, in forward and again in backward). Once glibc's mmap threshold has risen,
# such blocks come from its heap, and the activations allocated between them keep the freed blocks
# from being reused: the heap grows by about their total. Its .out kernels exist for GPUs only, so
# the buffer is filled by the CPU kernel that op calls, checked once per (quant type, dtype)
# against the op and used only where the two agree bit for bit; otherwise, and while compiling,
# the op itself runs.
_scratch = threading.local()  # per thread (CPU autograd runs backward in the calling thread): dtype -> flat buffer
_direct_agrees: dict[tuple[str, torch.dtype], bool] = {}  # (quant_type, dtype) -> the direct kernel matched the op
_KERNEL_DTYPE = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def _dequantize_4bit_op(packed, absmax, blocksize, quant_type, shape, dtype) -> torch.Tensor:
    return torch.ops.bitsandbytes.dequantize_4bit.default(packed.view(-1, 1), absmax, blocksize, quant_type, shape, dtype)


def _dequantize_4bit_direct(packed, absmax, blocksize, quant_type, out) -> None:
    """bitsandbytes' CPU 4-bit dequantization kernel (the one its CPU op calls) writing into
    ``out``, ``(rows, cols)`` contiguous; ``packed`` uint8, ``absmax`` float32, both contiguous."""
    from bitsandbytes.cextension import lib  # no public form: the op allocates its own output

    kernel = getattr(lib, f"cdequantize_blockwise_cpu_{quant_type}_{_KERNEL_DTYPE[out.dtype]}")
    rows, cols = out.shape
    kernel(ctypes.c_void_p(packed.data_ptr()), ctypes.c_void_p(absmax.data_ptr()), ctypes.c_void_p(out.data_ptr()),
           ctypes.c_longlong(blocksize), ctypes.c_longlong(rows), ctypes.c_longlong(cols))


def _direct_applies(quant_type: str, dtype: torch.dtype) -> bool:
    """Whether the direct kernel gives the op's result bit for bit here (checked once, on a small weight)."""
    key = (quant_type, dtype)
    if key not in _direct_agrees:
        try:
            w = torch.randn(6, 128, generator=torch.Generator().manual_seed(0)).to(dtype)
            packed, state = _bnb().functional.quantize_4bit(w, blocksize=64, quant_type=quant_type, compress_statistics=False)
            absmax = state.absmax.float()
            out = torch.empty(6, 128, dtype=dtype)
            _dequantize_4bit_direct(packed.view(torch.uint8), absmax, 64, quant_type, out)
            _direct_agrees[key] = torch.equal(out, _dequantize_4bit_op(packed, absmax, 64, quant_type, (6, 128), dtype))
        except Exception:  # a bitsandbytes without these kernels (or with other arguments): the op
            _direct_agrees[key] = False
    return _direct_agrees[key]


def _dequantize_4bit_scratch(packed, absmax, blocksize, quant_type, shape, dtype) -> torch.Tensor:
    """A 4-bit weight dequantized as bitsandbytes' op does, written into this thread's buffer.

    Args:
        packed: the packed weight (``Params4bit.data``), ``out * in / 2`` bytes.
        absmax: float32 block scales, ``(out * in / blocksize,)``.
        blocksize, quant_type, shape, dtype: as for ``torch.ops.bitsandbytes.dequantize_4bit``.

    Returns:
        ``(out, in)`` in ``dtype``: a view of a buffer that the next call in this thread overwrites,
        so the caller uses it at once and lets nothing keep it (autograd must not save it). Where
        the direct kernel does not apply, a new tensor (the op's).
    """
    if (len(shape) != 2 or shape[-1] % 2 or blocksize >= 2048 or dtype not in _KERNEL_DTYPE  # the op's own fallbacks
            or torch.compiler.is_compiling() or not packed.is_contiguous() or absmax.dtype != torch.float32
            or not absmax.is_contiguous() or not _direct_applies(quant_type, dtype)):
        return _dequantize_4bit_op(packed, absmax, blocksize, quant_type, shape, dtype)
    n = shape[0] * shape[1]
    buffers = _scratch.__dict__.setdefault("buffers", {})
    buffer = buffers.get(dtype)
    if buffer is None or buffer.numel() < n:
        buffer = buffers[dtype] = torch.empty(n, dtype=dtype)  # per thread and dtype, as large as the largest weight
    out = buffer[:n].view(shape)
    _dequantize_4bit_direct(packed.view(torch.uint8), absmax, blocksize, quant_type, out)
    return out


class _Dequantized4bitLinear(torch.autograd.Function):
    """``F.linear(x, dequantize_4bit(packed, absmax), bias)`` as bitsandbytes' ``MatMul4Bit``
    computes it on the CPU (no weight gradient; backward dequantizes again, nothing weight-sized is
    saved), given block scales that are already plain float32. The dequantized weight lives in the
    thread's reused buffer (``_dequantize_4bit_scratch``) only while the matmul runs."""

    @staticmethod
    def forward(ctx, x, packed, absmax, bias, shape, blocksize, quant_type):
        weight = _dequantize_4bit_scratch(packed, absmax, blocksize, quant_type, shape, x.dtype)
        ctx.save_for_backward(packed, absmax)
        ctx.meta = (shape, blocksize, quant_type)
        return torch.nn.functional.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_y):
        packed, absmax = ctx.saved_tensors
        shape, blocksize, quant_type = ctx.meta
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            # Under create_graph the matmul saves its operands: a weight of its own then.
            dequantize = _dequantize_4bit_op if torch.is_grad_enabled() else _dequantize_4bit_scratch
            weight = dequantize(packed, absmax, blocksize, quant_type, shape, grad_y.dtype)
            grad_x = torch.matmul(grad_y, weight)
        if ctx.needs_input_grad[3]:
            grad_bias = grad_y.reshape(-1, grad_y.shape[-1]).sum(0)
        return grad_x, None, None, grad_bias, None, None, None


def _unpack_for_cpu(weight: Any) -> None:
    """Puts a 4-bit weight that bitsandbytes repacked for its CPU inference kernel (it does so in
    the first eval forward without autograd, on CPUs with AVX512-BF16) back into the portable
    layout, as its own ``state_dict`` does."""
    if getattr(weight.quant_state, "packing_format_for_cpu", False):
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse  # no public form

        weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, weight.quant_state)


def dequantize_4bit(weight: Any) -> torch.Tensor:
    """A bitsandbytes ``Params4bit`` dequantized: ``(out, in)`` in the dtype it was quantized from."""
    _unpack_for_cpu(weight)
    return _bnb().functional.dequantize_4bit(weight.data, weight.quant_state)


def int8_weight(base: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """A bitsandbytes ``Linear8bitLt``'s int8 weight ``(out, in)`` and row scales ``(out,)``.

    bitsandbytes keeps the scales on the weight (``weight.SCB``) until the layer's first forward,
    then moves them to ``state.SCB`` (``init_8bit_state``). Doing that move here first keeps one
    place for them, so dequantizing or merging before or after a forward is the same.
    """
    if getattr(base.weight, "CB", None) is not None:
        base.init_8bit_state()
    return base.weight.data, base.state.SCB


def set_int8_weight(base: nn.Module, CB: torch.Tensor, SCB: torch.Tensor) -> None:
    """Gives a ``Linear8bitLt`` a new int8 weight and row scales, where its forward reads them."""
    int8_weight(base)
    base.weight.data = CB
    base.state.CB, base.state.SCB = CB, SCB


def requantize_int8(base: nn.Module, merged: torch.Tensor) -> None:
    """Quantizes ``merged`` (``(out, in)`` float) to int8 with one absmax scale per row, into ``base``."""
    CB, SCB, _ = _bnb().functional.int8_vectorwise_quant(merged.to(torch.float16 if merged.is_cuda else merged.dtype))
    set_int8_weight(base, CB, SCB)


# -- handlers ---------------------------------------------------------------------------------------
def _is_bnb(module: nn.Module, name: str) -> bool:
    # A cheap test before importing bitsandbytes: only its modules can match.
    if not type(module).__module__.startswith("bitsandbytes"):
        return False
    return isinstance(module, getattr(_bnb().nn, name))


def _is_torchao_linear(module: nn.Module) -> bool:
    if type(module) is not nn.Linear:
        return False
    weight = module.weight
    return type(weight) is not nn.Parameter and type(weight).__module__.startswith("torchao")


BNB_4BIT = Handler("bitsandbytes Linear4bit", lambda m: _is_bnb(m, "Linear4bit"), Lora4bit,
                   method="lora", linear_like=True, priority=1, peftcore_api=1)
BNB_8BIT = Handler("bitsandbytes Linear8bitLt", lambda m: _is_bnb(m, "Linear8bitLt"), Lora8bit,
                   method="lora", linear_like=True, priority=1, peftcore_api=1)
TORCHAO = Handler("torch.nn.Linear with a torchao quantized weight", _is_torchao_linear, LoraTorchao,
                  method="lora", linear_like=True, priority=1, peftcore_api=1)
