"""The LoRA linear op: ``y = x W^T + b + scale * dropout(x) A^T B^T``.

``reference_lora_linear`` is the specification, in plain PyTorch with ordinary autograd; every
backend is tested against it. :func:`lora_linear` is what adapter layers call: it picks a
backend (see :mod:`peftcore.ops.dispatch`) and runs it.

The dropout mask is :func:`peftcore.ops.philox.keep_mask` of ``(seed, offset)`` over ``x`` viewed
row-major, so backends that regenerate it in backward agree with the reference bit for bit.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from peftcore.ops import dispatch, philox

OP = "lora_linear"


def reference_lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    A: torch.Tensor,
    B: torch.Tensor,
    scale: float,
    dropout_p: float = 0.0,
    seed: int = 0,
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
        seed: 64-bit seed of the dropout mask (ignored when ``dropout_p == 0``).

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

    def available(self) -> tuple[bool, str]:
        return True, ""

    def __call__(self, *args, **kwargs) -> torch.Tensor:
        return reference_lora_linear(*args, **kwargs)


REFERENCE = _ReferenceKernel()


def new_seed() -> int:
    """A fresh dropout seed from torch's default generator (so ``torch.manual_seed`` fixes it)."""
    return int(torch.randint(0, 2**62, (), dtype=torch.int64).item())


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    A: torch.Tensor,
    B: torch.Tensor,
    scale: float,
    dropout_p: float = 0.0,
    seed: int = 0,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """LoRA linear on the chosen backend; arguments as in :func:`reference_lora_linear`.

    Args:
        backend: ``"auto"``/``None`` (best available, or ``PEFTCORE_BACKEND``), or a backend name.
    """
    kernel = dispatch.select(OP, x.device.type, backend)
    return kernel(x, weight, bias, A, B, scale, dropout_p, seed)
