"""The LoRA linear op: ``y = x W^T + b + scale * dropout(x) A^T B^T``.

``reference_lora_linear`` is the specification, in plain PyTorch with ordinary autograd; every
backend is tested against it. :func:`lora_linear` is what adapter layers call: it picks a
backend (see :mod:`peftcore.ops.dispatch`) and runs it.

The dropout mask is :func:`peftcore.ops.philox.keep_mask` of ``(seed, offset)`` over ``x`` viewed
row-major, so backends that regenerate it in backward agree with the reference bit for bit.
Seeds are Python ints or 0-dim int64 CPU tensors; layers pass tensors (:func:`new_seed_tensor`)
so that ``torch.compile`` draws them inside the graph instead of breaking it at ``.item()``.

Backends (see ``docs/kernels.md``): ``reference`` (here), ``cpp`` (:mod:`peftcore.ops.lora_cpp`,
the C++ op in ``csrc/``), and the GPU kernels ``triton`` and ``cuda``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from peftcore.ops import autocast, dispatch, philox

OP = "lora_linear"


def reference_lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    A: torch.Tensor,
    B: torch.Tensor,
    scale: float,
    dropout_p: float = 0.0,
    seed: int | torch.Tensor = 0,
) -> torch.Tensor:
    """LoRA linear in plain PyTorch: the meaning every backend must reproduce.

    Args:
        x: input, shape ``(*, K)``.
        weight: frozen base weight, shape ``(N, K)``.
        bias: base bias, shape ``(N,)``, or ``None``.
        A: down-projection, shape ``(r, K)``.
        B: up-projection, shape ``(N, r)``.
        scale: multiplier of the low-rank path (alpha / r, or alpha / sqrt(r) for rsLoRA).
        dropout_p: dropout probability on the low-rank path's input, in ``[0, 1)``.
        seed: 64-bit seed of the dropout mask, an int or a 0-dim int64 tensor (ignored when
            ``dropout_p == 0``).

    Returns:
        Output of shape ``(*, N)``.
    """
    y = F.linear(x, weight, bias)
    if dropout_p > 0.0:
        keep = philox.keep_mask(seed, x.shape, dropout_p, x.device)
        x = x * keep.to(x.dtype) * (1.0 / (1.0 - dropout_p))
    return y + scale * F.linear(F.linear(x, A), B)


class _ReferenceKernel:
    """The ``reference`` backend of ``lora_linear``: runs anywhere torch runs."""

    op = OP
    backend = "reference"
    devices = ("cpu", "cuda", "mps", "xpu", "meta")
    priority = 0
    hint = ""
    seed_tensor = True

    def available(self) -> tuple[bool, str]:
        return True, ""

    def __call__(self, *args, **kwargs) -> torch.Tensor:
        return reference_lora_linear(*args, **kwargs)


REFERENCE = _ReferenceKernel()


def new_seed() -> int:
    """A fresh dropout seed from torch's default generator (so ``torch.manual_seed`` fixes it)."""
    return int(new_seed_tensor().item())


def new_seed_tensor() -> torch.Tensor:
    """A fresh dropout seed as a 0-dim int64 CPU tensor, drawn like :func:`new_seed`.

    Layers use this form: under ``torch.compile`` it stays a graph value (no ``.item()``, so no
    graph break, and no recompile for each new seed value).
    """
    return torch.randint(0, 2**62, (), dtype=torch.int64)


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    A: torch.Tensor,
    B: torch.Tensor,
    scale: float,
    dropout_p: float = 0.0,
    seed: int | torch.Tensor = 0,
    *,
    backend: str | None = None,
    cache: dispatch.KernelCache | None = None,
) -> torch.Tensor:
    """LoRA linear on the chosen backend; arguments as in :func:`reference_lora_linear`.

    Kernels receive ``x`` flattened to ``(M, K)`` (a view for contiguous ``x``, so layers that
    share one input, like q/k/v, still save one tensor's memory) and return ``(M, N)``. A
    kernel gets the seed as a tensor only if it sets ``seed_tensor = True``, else as an int.

    Under ``torch.autocast`` on ``x``'s device type it runs as ``nn.Linear`` does: every tensor is
    cast to the autocast dtype (float32 parameters stay float32 and get float32 gradients through
    the casts) and the result has that dtype; see :mod:`peftcore.ops.autocast`.

    Args:
        backend: ``"auto"``/``None`` (best available, or ``PEFTCORE_BACKEND``), or a backend name.
        cache: an adapter layer's kernels; the kernel is looked up there (resolved once per
            backend, device type and dtype) instead of through :func:`dispatch.select`.

    Returns:
        Output of shape ``(*, N)``.

    Raises:
        BackendUnavailableError: ``backend`` names a backend that cannot run here (with the reason).
        PluginError: ``backend`` comes from a kernel plugin that failed to import.
    """
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):  # as nn.Linear: compute in the region's dtype
        x, weight, bias, A, B = autocast.cast(device_type, x, weight, bias, A, B)
    if cache is None:
        kernel = dispatch.select(OP, device_type, backend)
    else:
        kernel = cache(backend, device_type, x.dtype)
    if isinstance(seed, torch.Tensor) and not getattr(kernel, "seed_tensor", False):
        seed = int(seed)
    lead = x.shape[:-1]
    y = kernel(x.reshape(-1, x.shape[-1]), weight, bias, A, B, scale, dropout_p, seed)
    return y.reshape(*lead, y.shape[-1])
