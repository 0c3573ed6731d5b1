"""The ``cpp`` backend of the bottleneck op: ``torch.ops.peftcore.bottleneck`` from ``csrc/bottleneck.cpp``.

The C++ file declares the two ops (forward, backward) with ``TORCH_LIBRARY_FRAGMENT`` and
implements them for the CPU with ``TORCH_LIBRARY_IMPL``; this module adds what makes them
first-class torch ops: fake (meta) kernels, so ``torch.compile`` and meta tensors can trace them,
and the autograd formula (``torch.library.register_autograd``), which saves ``x``, both weights and
the pre-activation ``h`` (``(M, r)``) and calls the backward op. Eager training calls
``peftcore::bottleneck_autograd`` instead (``csrc/autograd.cpp``): the same formula and saved
tensors as a C++ autograd Function, without Python in the backward.

Registration runs once, when :func:`peftcore.ops._extension.load` first imports ``peftcore._C``
(as for the ``lora_linear`` op), and only if the build declares these ops.
"""

from __future__ import annotations

import threading
from typing import Any

import torch

from peftcore.ops import _extension, autocast
from peftcore.ops.bottleneck import OP

FORWARD = "peftcore::bottleneck"
BACKWARD = "peftcore::bottleneck_backward"


def _ops_present() -> tuple[bool, str]:
    ok, reason = _extension.load()
    if not ok:
        return False, reason
    try:
        present = torch._C._dispatch_has_kernel_for_dispatch_key(FORWARD, "CPU")
    except RuntimeError:  # "operator peftcore::bottleneck does not exist"
        present = False
    if not present:
        return False, (
            "the built extension peftcore._C predates csrc/bottleneck.cpp (no peftcore::bottleneck op); "
            "rebuild it with 'pip install --no-build-isolation -e .'"
        )
    if not hasattr(torch.ops.peftcore, "bottleneck_autograd"):
        return False, (
            "the built extension peftcore._C has no peftcore::bottleneck_autograd op (an old build); "
            "rebuild it with 'pip install --no-build-isolation -e .'"
        )
    return True, ""


# -- fake kernels and autograd ---------------------------------------------------------------------
def _fake_forward(x, W_down, b_down, W_up, b_up, scale, activation, residual):
    # (M, K) -> y (M, N), h (M, r)
    return x.new_empty((x.shape[0], W_up.shape[0])), x.new_empty((x.shape[0], W_down.shape[0]))


def _fake_backward(grad_y, x, W_down, W_up, h, scale, activation, residual_is_x, output_mask):
    shapes = (x.shape, W_down.shape, W_down.shape[:1], W_up.shape, W_up.shape[:1])
    return tuple(x.new_empty(s) if need else None for s, need in zip(shapes, output_mask))


def _setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
    x, W_down, b_down, W_up, b_up, scale, activation, residual = inputs
    _, h = output
    ctx.save_for_backward(x, W_down, W_up, h)
    ctx.scale, ctx.activation = scale, activation
    ctx.has_b_down, ctx.has_b_up, ctx.has_residual = b_down is not None, b_up is not None, residual is not None
    ctx.mark_non_differentiable(h)


def _backward(ctx: Any, grad_y: torch.Tensor, _grad_h: torch.Tensor | None):
    x, W_down, W_up, h = ctx.saved_tensors
    needs = ctx.needs_input_grad
    mask = [needs[0], needs[1], needs[2] and ctx.has_b_down, needs[3], needs[4] and ctx.has_b_up]
    grad_x = grad_Wd = grad_bd = grad_Wu = grad_bu = None
    if any(mask):
        grad_x, grad_Wd, grad_bd, grad_Wu, grad_bu = torch.ops.peftcore.bottleneck_backward(
            grad_y.contiguous(), x, W_down, W_up, h, ctx.scale, ctx.activation, not ctx.has_residual, mask
        )
    grad_residual = grad_y if ctx.has_residual and needs[7] else None
    return grad_x, grad_Wd, grad_bd, grad_Wu, grad_bu, None, None, grad_residual


_registered = False
_lock = threading.Lock()


def register() -> None:
    """Registers the fake kernels and autograd of the bottleneck ops (idempotent).

    Called by :func:`peftcore.ops._extension.load` right after importing the extension.
    """
    global _registered
    with _lock:
        if _registered:
            return
        torch.library.register_fake(FORWARD)(_fake_forward)
        torch.library.register_fake(BACKWARD)(_fake_backward)
        torch.library.register_autograd(FORWARD, _backward, setup_context=_setup_context)
        autocast.register(FORWARD)  # under torch.autocast: compute in its dtype, as nn.Linear
        if hasattr(torch.ops.peftcore, "bottleneck_autograd"):  # absent from old builds
            autocast.register("peftcore::bottleneck_autograd")
        _registered = True


# -- launcher and kernel object ----------------------------------------------------------------------
def cpp_bottleneck(
    x: torch.Tensor,
    W_down: torch.Tensor,
    b_down: torch.Tensor | None,
    W_up: torch.Tensor,
    b_up: torch.Tensor | None,
    scale: float,
    activation: str = "gelu",
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """The bottleneck op through ``torch.ops.peftcore.bottleneck``; arguments as in the reference.

    Leading dimensions of ``x`` (``(*, K)``) and ``residual`` are flattened for the op and restored.
    """
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])  # (M, K)
    r2 = None if residual is None else residual.reshape(-1, residual.shape[-1])  # (M, N)
    args = (x2, W_down, b_down, W_up, b_up, float(scale), activation, r2)
    if torch.compiler.is_compiling() or not torch.is_grad_enabled():
        y, _ = torch.ops.peftcore.bottleneck.default(*args)
    else:
        # Eager training: the registered formula as a C++ autograd Function (csrc/autograd.cpp);
        # forward plus backward of a 111 x 129 adapter: see docs/benchmarks.md.
        y = torch.ops.peftcore.bottleneck_autograd.default(*args)
    return y.reshape(*lead, W_up.shape[0])


class _CppKernel:
    """The ``cpp`` backend of ``bottleneck``: ATen GEMMs and vectorised activations, ordered so that
    no output-sized temporary is made (see ``csrc/bottleneck.cpp``)."""

    op = OP
    backend = "cpp"
    devices = ("cpu",)
    priority = 10
    hint = "Build the C++ extension: pip install --no-build-isolation -e ."
    peftcore_api = 1

    def available(self) -> tuple[bool, str]:
        return _ops_present()  # loading the extension registers the ops' Python halves

    def __call__(self, *args, **kwargs) -> torch.Tensor:
        return cpp_bottleneck(*args, **kwargs)


CPP = _CppKernel()
