"""The grouped LoRA op: many adapters in one batch, one adapter (or none) per row.

``y[m] = x[m] W^T + b + scale[g] * dropout(x)[m] A[g]^T B[g]^T`` with ``g = index[m]``; rows
with ``index[m] == -1`` get the base output only. The adapters may differ in rank and scale.

``reference_lora_grouped`` is the specification, in plain PyTorch with ordinary autograd; every
backend is tested against it. :func:`lora_grouped` is what routed adapter layers call (see
:mod:`peftcore.routing`): it picks a backend through :mod:`peftcore.ops.dispatch` (op name
``lora_grouped``) and runs it.

Each adapter has its own dropout probability. The draws are those of ``lora_linear``
(:func:`peftcore.ops.philox.keep_mask` of ``(seed, m * K + k)`` over ``x`` viewed as ``(M, K)``),
compared with the row's adapter's threshold: a batch routed to one adapter gets exactly
``lora_linear``'s mask and result.

Backends (see ``docs/kernels.md``): ``reference`` (here) and ``cpp``
(:mod:`peftcore.ops.lora_grouped_cpp`, ``csrc/lora_grouped.cpp``).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from peftcore.ops import autocast, dispatch, philox

OP = "lora_grouped"

#: The row index of a row that gets no adapter (the base model's output).
BASE_ROW = -1


def reference_lora_grouped(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    A: Sequence[torch.Tensor],
    B: Sequence[torch.Tensor],
    scales: Sequence[float],
    index: torch.Tensor,
    dropout_p: Sequence[float] | float = 0.0,
    seed: int | torch.Tensor = 0,
) -> torch.Tensor:
    """Grouped LoRA linear in plain PyTorch: the meaning every backend must reproduce.

    Args:
        x: input, shape ``(M, K)``.
        weight: frozen base weight, shape ``(N, K)``.
        bias: base bias, shape ``(N,)``, or ``None``.
        A: ``G`` down-projections, adapter ``g`` of shape ``(r_g, K)`` (ranks may differ).
        B: ``G`` up-projections, adapter ``g`` of shape ``(N, r_g)``.
        scales: ``G`` multipliers of the low-rank paths (alpha / r, or alpha / sqrt(r)).
        index: ``(M,)`` integer tensor on ``x``'s device: the adapter of each row, in
            ``[0, G)``, or ``-1`` for the base output. Groups may be empty.
        dropout_p: ``G`` dropout probabilities on the low-rank paths' input, each in ``[0, 1)``
            (a float applies to every adapter).
        seed: 64-bit seed of the dropout mask (int or 0-dim int64 tensor).

    Returns:
        Output of shape ``(M, N)``.
    """
    ps = _per_adapter(dropout_p, len(A))
    y = F.linear(x, weight, bias)
    for g, (A_g, B_g, scale, p) in enumerate(zip(A, B, scales, ps)):
        rows = (index == g).nonzero().squeeze(1)  # (M_g,); empty groups still give zero gradients
        x_g = x
        if p > 0.0:
            keep = philox.keep_mask(seed, x.shape, p, x.device)
            x_g = x * keep.to(x.dtype) * (1.0 / (1.0 - p))
        y = y.index_add(0, rows, scale * F.linear(F.linear(x_g.index_select(0, rows), A_g), B_g))
    return y


def _per_adapter(dropout_p: Sequence[float] | float, G: int) -> list[float]:
    if isinstance(dropout_p, (int, float)):
        return [float(dropout_p)] * G
    return [float(p) for p in dropout_p]


def check_inputs(x, weight, A, B, scales, index) -> None:
    """Raises ``ValueError`` naming the mismatch (shapes, lengths, index range)."""
    M, K = x.shape
    N = weight.shape[0]
    if not (len(A) == len(B) == len(scales)):
        raise ValueError(f"lora_grouped: {len(A)} A factors, {len(B)} B factors and {len(scales)} scales; they must match")
    for g, (A_g, B_g) in enumerate(zip(A, B)):
        if A_g.dim() != 2 or A_g.shape[1] != K or B_g.dim() != 2 or B_g.shape[0] != N or B_g.shape[1] != A_g.shape[0]:
            raise ValueError(
                f"lora_grouped: adapter {g} has A {tuple(A_g.shape)} and B {tuple(B_g.shape)}; "
                f"with x (M, {K}) and weight ({N}, {K}) they must be (r, {K}) and ({N}, r)"
            )
    if index.shape != (M,) or index.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"lora_grouped: index must be an int64 tensor of shape ({M},), got {index.dtype} {tuple(index.shape)}")


class _ReferenceKernel:
    """The ``reference`` backend of ``lora_grouped``: runs anywhere torch runs."""

    op = OP
    backend = "reference"
    devices = ("cpu", "cuda", "mps", "xpu", "meta")
    priority = 0
    hint = ""
    seed_tensor = True

    def available(self) -> tuple[bool, str]:
        return True, ""

    def __call__(self, *args, **kwargs) -> torch.Tensor:
        return reference_lora_grouped(*args, **kwargs)


REFERENCE = _ReferenceKernel()


def lora_grouped(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    A: Sequence[torch.Tensor],
    B: Sequence[torch.Tensor],
    scales: Sequence[float],
    index: torch.Tensor,
    dropout_p: Sequence[float] | float = 0.0,
    seed: int | torch.Tensor = 0,
    *,
    backend: str | None = None,
    cache: dispatch.KernelCache | None = None,
) -> torch.Tensor:
    """Grouped LoRA linear on the chosen backend; arguments as in :func:`reference_lora_grouped`,
    except that ``x`` may have leading dimensions ``(*, K)`` with ``index`` of shape ``(prod(*),)``.

    Under ``torch.autocast`` it computes in the region's dtype, as ``lora_linear`` does.

    Args:
        backend: ``"auto"``/``None`` (best available, or ``PEFTCORE_BACKEND``), or a backend name.
        cache: an adapter layer's kernels (resolved once per backend, device type and dtype).

    Returns:
        Output of shape ``(*, N)``.

    Raises:
        BackendUnavailableError: ``backend`` names a backend that cannot run here (with the reason).
    """
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        x, weight, bias = autocast.cast(device_type, x, weight, bias)
        A = autocast.cast(device_type, *A)
        B = autocast.cast(device_type, *B)
    if cache is None:
        kernel = dispatch.select(OP, device_type, backend)
    else:
        kernel = cache(backend, device_type, x.dtype)
    if isinstance(seed, torch.Tensor) and not getattr(kernel, "seed_tensor", False):
        seed = int(seed)
    lead = x.shape[:-1]
    y = kernel(x.reshape(-1, x.shape[-1]), weight, bias, list(A), list(B), [float(s) for s in scales], index,
                _per_adapter(dropout_p, len(A)), seed)
    return y.reshape(*lead, y.shape[-1])
