"""The bottleneck op: ``y = r + scale * (act(x W_d^T + b_d) W_u^T + b_u)``, ``r = x`` unless given.

This is the computation of a bottleneck adapter (Houlsby et al. 2019): a down-projection to a
small width, an activation, an up-projection back, added as a residual. Sequential adapters
(Houlsby, Pfeiffer) read the residual stream itself (``r = x``); a parallel adapter reads the
feed-forward block's input ``x`` and adds its output to the block's output ``r``.

``reference_bottleneck`` is the specification, in plain PyTorch with ordinary autograd; every
backend (``bottleneck_cpp``, ``bottleneck_triton``) is tested against it. :func:`bottleneck` is
what adapter layers call: it checks shapes, picks a backend (see :mod:`peftcore.ops.dispatch`)
and runs it.

Backends save only ``x``, the two weights and the pre-activation ``h = x W_d^T + b_d``
(``(M, r)``, small) for backward; the activation is recomputed from ``h``.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from peftcore.errors import ConfigError
from peftcore.ops import autocast, dispatch

OP = "bottleneck"

#: Activation name -> function. Every backend implements exactly these (and their derivatives).
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu,
    "gelu": F.gelu,  # exact, erf-based (BERT, GPT-2's adapters in AdapterHub use this one)
    "gelu_tanh": lambda h: F.gelu(h, approximate="tanh"),
    "silu": F.silu,
}


def reference_bottleneck(
    x: torch.Tensor,
    W_down: torch.Tensor,
    b_down: torch.Tensor | None,
    W_up: torch.Tensor,
    b_up: torch.Tensor | None,
    scale: float,
    activation: str = "gelu",
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """The bottleneck op in plain PyTorch: the meaning every backend must reproduce.

    Args:
        x: adapter input, shape ``(*, K)``.
        W_down: down-projection, shape ``(r, K)``.
        b_down: its bias, shape ``(r,)``, or ``None``.
        W_up: up-projection, shape ``(N, r)``.
        b_up: its bias, shape ``(N,)``, or ``None``.
        scale: multiplier of the adapter's output.
        activation: a key of :data:`ACTIVATIONS`.
        residual: what the adapter's output is added to, shape ``(*, N)``; ``None`` means ``x``
            (then ``N == K``).

    Returns:
        Output of shape ``(*, N)``.
    """
    h = F.linear(x, W_down, b_down)  # (*, r)
    delta = F.linear(ACTIVATIONS[activation](h), W_up, b_up)  # (*, N)
    return (x if residual is None else residual) + scale * delta


def check_args(
    x: torch.Tensor,
    W_down: torch.Tensor,
    b_down: torch.Tensor | None,
    W_up: torch.Tensor,
    b_up: torch.Tensor | None,
    activation: str,
    residual: torch.Tensor | None,
) -> None:
    """Raises :class:`ConfigError` naming the first argument whose shape or dtype does not fit."""
    if activation not in ACTIVATIONS:
        raise ConfigError(f"bottleneck activation must be one of {', '.join(ACTIVATIONS)}, got {activation!r}")
    if x.dim() < 1 or W_down.dim() != 2 or W_up.dim() != 2:
        raise ConfigError(
            f"bottleneck expects x (*, K), W_down (r, K), W_up (N, r); got x {tuple(x.shape)}, "
            f"W_down {tuple(W_down.shape)}, W_up {tuple(W_up.shape)}"
        )
    r, k = W_down.shape
    n = W_up.shape[0]
    problems = []
    if x.shape[-1] != k:
        problems.append(f"x has {x.shape[-1]} features but W_down {tuple(W_down.shape)} expects {k}")
    if W_up.shape[1] != r:
        problems.append(f"W_up {tuple(W_up.shape)} must have {r} columns (the bottleneck width of W_down)")
    if b_down is not None and tuple(b_down.shape) != (r,):
        problems.append(f"b_down has shape {tuple(b_down.shape)}, expected ({r},)")
    if b_up is not None and tuple(b_up.shape) != (n,):
        problems.append(f"b_up has shape {tuple(b_up.shape)}, expected ({n},)")
    if residual is None and n != k:
        problems.append(f"without a residual the output width N={n} must equal the input width K={k}")
    if residual is not None and tuple(residual.shape) != (*x.shape[:-1], n):
        problems.append(f"residual has shape {tuple(residual.shape)}, expected {(*x.shape[:-1], n)}")
    tensors = [t for t in (x, W_down, b_down, W_up, b_up, residual) if t is not None]
    if len({t.dtype for t in tensors}) > 1:
        problems.append(f"all tensors must share one dtype, got {sorted({str(t.dtype) for t in tensors})}")
    if problems:
        raise ConfigError("bottleneck: " + "; ".join(problems))


class _ReferenceKernel:
    """The ``reference`` backend of ``bottleneck``: runs anywhere torch runs."""

    op = OP
    backend = "reference"
    devices = ("cpu", "cuda", "mps", "xpu", "meta")
    priority = 0
    hint = ""
    peftcore_api = 1

    def available(self) -> tuple[bool, str]:
        return True, ""

    def __call__(self, *args, **kwargs) -> torch.Tensor:
        return reference_bottleneck(*args, **kwargs)


REFERENCE = _ReferenceKernel()


def bottleneck(
    x: torch.Tensor,
    W_down: torch.Tensor,
    b_down: torch.Tensor | None,
    W_up: torch.Tensor,
    b_up: torch.Tensor | None,
    scale: float,
    activation: str = "gelu",
    residual: torch.Tensor | None = None,
    *,
    backend: str | None = None,
    cache: dispatch.KernelCache | None = None,
) -> torch.Tensor:
    """The bottleneck op on the chosen backend; arguments as in :func:`reference_bottleneck`.

    Under ``torch.autocast`` on ``x``'s device type every tensor is cast to the autocast dtype
    first, as ``nn.Linear`` does (see :mod:`peftcore.ops.autocast`).

    Args:
        backend: ``"auto"``/``None`` (best available, or ``PEFTCORE_BACKEND``), or a backend name.
        cache: an adapter layer's kernels; the kernel is looked up there (resolved once per
            backend, device type and dtype) instead of through :func:`dispatch.select`.

    Raises:
        ConfigError: shapes, dtypes or the activation do not fit (the message says which).
        BackendUnavailableError: a named backend cannot run here.
        PluginError: ``backend`` comes from a kernel plugin that failed to import.
    """
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):  # as nn.Linear: compute in the region's dtype
        x, W_down, b_down, W_up, b_up, residual = autocast.cast(device_type, x, W_down, b_down, W_up, b_up, residual)
    check_args(x, W_down, b_down, W_up, b_up, activation, residual)
    if cache is None:
        kernel = dispatch.select(OP, device_type, backend)
    else:
        kernel = cache(backend, device_type, x.dtype)
    return kernel(x, W_down, b_down, W_up, b_up, float(scale), activation, residual)
