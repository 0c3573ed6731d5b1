"""The ``cpp`` backend of ``lora_grouped``: the C++ op of ``csrc/lora_grouped.cpp`` made a full PyTorch op.

``csrc/lora_grouped.cpp`` declares ``peftcore::lora_grouped`` and ``peftcore::lora_grouped_backward``
(a ``TORCH_LIBRARY_FRAGMENT``) and implements them for the CPU. This module adds the fake (meta)
kernels, so ``torch.compile`` and ``torch.library.opcheck`` trace the op, and the autograd formula
(``register_autograd``): forward saves ``x`` as passed in, the rank-sized ``h`` (padded to the
largest rank) and the seed, plus references to the factors; backward calls
``lora_grouped_backward``, which regenerates the dropout mask.

Registration runs once, when :func:`peftcore.ops._extension.load` first imports ``peftcore._C``.
"""

from __future__ import annotations

import threading

import torch

from peftcore.ops import _extension
from peftcore.ops.lora_grouped import _per_adapter

OP = "lora_grouped"
_registered = False
_lock = threading.Lock()


# -- fake kernels ---------------------------------------------------------------------------------
def _lora_grouped_fake(x, weight, bias, A, B, scales, index, dropout_p, seed):
    M = x.shape[0]
    R = max((a.shape[0] for a in A), default=0)
    return x.new_empty((M, weight.shape[0])), x.new_empty((M, R))


def _lora_grouped_backward_fake(grad_y, x, weight, A, B, h, scales, index, dropout_p, seed, output_mask):
    want_x, want_A, want_B = output_mask
    grad_x = x.new_empty(x.shape) if want_x else None
    grad_A = [a.new_empty(a.shape) for a in A] if want_A else []
    grad_B = [b.new_empty(b.shape) for b in B] if want_B else []
    return grad_x, grad_A, grad_B


# -- autograd -------------------------------------------------------------------------------------
def _setup_context(ctx, inputs, output) -> None:
    x, weight, bias, A, B, scales, index, dropout_p, seed = inputs
    _, h = output
    ctx.mark_non_differentiable(h)
    ctx.set_materialize_grads(False)
    ctx.n_adapters = len(A)
    ctx.save_for_backward(x, weight, h, index, seed, *A, *B)
    ctx.scales = list(scales)
    ctx.dropout_p = list(dropout_p)


def _backward(ctx, grad_y, grad_h):
    """Gradients of x, weight, bias, A[], B[] (None for the scalars, the index and the seed)."""
    del grad_h
    G = ctx.n_adapters
    if grad_y is None:
        return None, None, None, [None] * G, [None] * G, _no_grad(G), None, _no_grad(G), None
    x, weight, h, index, seed, *factors = ctx.saved_tensors
    A, B = factors[:G], factors[G:]
    need_x, need_w, need_bias, need_A, need_B = ctx.needs_input_grad[:5]
    # needs_input_grad holds one flag per list argument: any factor in the list needs a gradient.
    need_A, need_B = bool(need_A), bool(need_B)
    grad_x, grad_A, grad_B = None, [None] * G, [None] * G
    if need_x or need_A or need_B:
        gx, gA, gB = torch.ops.peftcore.lora_grouped_backward(
            grad_y, x, weight, A, B, h, ctx.scales, index, ctx.dropout_p, seed, [need_x, need_A, need_B]
        )
        grad_x = gx if need_x else None
        grad_A = list(gA) if need_A else grad_A
        grad_B = list(gB) if need_B else grad_B
    grad_w = grad_y.t().mm(x) if need_w else None  # only if a user unfroze the base weight
    grad_bias = grad_y.sum(0) if need_bias else None
    return grad_x, grad_w, grad_bias, grad_A, grad_B, _no_grad(G), None, _no_grad(G), None


def _no_grad(G: int) -> list | None:
    """The "gradient" of a float list argument: ``None``, or ``[]`` for an empty list (torch.library
    compares the structure of backward's return with the inputs')."""
    return None if G else []


def register() -> None:
    """Registers the fake kernels and autograd of ``peftcore::lora_grouped`` (idempotent)."""
    global _registered
    with _lock:
        if _registered:
            return
        torch.library.register_fake("peftcore::lora_grouped")(_lora_grouped_fake)
        torch.library.register_fake("peftcore::lora_grouped_backward")(_lora_grouped_backward_fake)
        torch.library.register_autograd("peftcore::lora_grouped", _backward, setup_context=_setup_context)
        _registered = True


# -- the kernel object ----------------------------------------------------------------------------
_ZERO_SEED = torch.zeros((), dtype=torch.int64)


def cpp_lora_grouped(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    A: list[torch.Tensor],
    B: list[torch.Tensor],
    scales: list[float],
    index: torch.Tensor,
    dropout_p: list[float] | float = 0.0,
    seed: int | torch.Tensor = 0,
) -> torch.Tensor:
    """``lora_grouped`` through the C++ op; arguments as in
    :func:`peftcore.ops.lora_grouped.reference_lora_grouped` (``x`` is ``(M, K)``).

    Returns:
        ``(M, N)``.
    """
    if not isinstance(seed, torch.Tensor):
        seed = _ZERO_SEED if seed == 0 else torch.tensor(seed, dtype=torch.int64)
    elif seed.device.type != "cpu" or seed.dtype != torch.int64:
        seed = seed.to("cpu", torch.int64)
    y, _ = torch.ops.peftcore.lora_grouped.default(
        x, weight, bias, list(A), list(B), [float(s) for s in scales], index, _per_adapter(dropout_p, len(A)), seed
    )
    return y


class _CppKernel:
    """The ``cpp`` backend of ``lora_grouped`` (entry point ``lora_grouped.cpp``)."""

    op = OP
    backend = "cpp"
    devices = ("cpu",)
    priority = 10
    seed_tensor = True
    peftcore_api = 1
    hint = (
        "Build the C++ extension for the grouped CPU kernel: 'pip install --no-build-isolation -e .' "
        "in the peftcore source tree, see docs/kernels.md"
    )

    def available(self) -> tuple[bool, str]:
        ok, reason = _extension.load()
        if not ok:
            return False, reason
        if not _extension.torch_has_op(OP):
            return False, "the loaded peftcore._C has no lora_grouped op (an old build; rebuild it)"
        return True, ""

    def __call__(self, *args, **kwargs) -> torch.Tensor:
        return cpp_lora_grouped(*args, **kwargs)


CPP = _CppKernel()
