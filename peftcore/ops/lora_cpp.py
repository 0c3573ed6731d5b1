"""The ``cpp`` backend of ``lora_linear``: the C++ op of ``csrc/`` made a full PyTorch op.

``csrc/schemas.cpp`` declares ``peftcore::lora_linear`` and ``peftcore::lora_linear_backward``;
``csrc/lora_linear.cpp`` implements them for the CPU (the CUDA build adds CUDA kernels for the
same ops). This module adds what the C++ side leaves to Python, for every device:

* fake (meta) kernels, so ``torch.compile`` and ``torch.library.opcheck`` can trace the ops;
* autocast kernels (:func:`peftcore.ops.autocast.register`): under ``torch.autocast`` the ops
  cast their inputs to the autocast dtype, as ``nn.Linear`` does;
* the autograd formula (``register_autograd``): forward saves ``x`` (the caller's tensor, not a
  copy), the rank-sized ``h`` and the seed, plus references to the parameters; backward calls
  ``lora_linear_backward``, which regenerates the dropout mask instead of reading a stored one.
  ``torch.compile`` traces this one. Eager training calls ``peftcore::lora_linear_autograd``
  instead (``csrc/autograd.cpp``): the same formula and saved tensors as a C++ autograd
  Function, without Python in the backward.

Registration runs once, when :func:`peftcore.ops._extension.load` first imports ``peftcore._C``.
"""

from __future__ import annotations

import threading

import torch

from peftcore.ops import _extension, autocast

OP = "lora_linear"
_registered = False
_lock = threading.Lock()


# -- fake kernels ---------------------------------------------------------------------------------
def _lora_linear_fake(x, weight, bias, A, B, scale, dropout_p, seed):
    M = x.shape[0]
    return x.new_empty((M, weight.shape[0])), x.new_empty((M, A.shape[0]))


def _lora_linear_backward_fake(grad_y, x, weight, A, B, h, scale, dropout_p, seed, output_mask):
    want_x, want_A, want_B = output_mask
    grad_x = x.new_empty(x.shape) if want_x else None
    grad_A = A.new_empty(A.shape) if want_A else None
    grad_B = B.new_empty(B.shape) if want_B else None
    return grad_x, grad_A, grad_B


# -- autograd -------------------------------------------------------------------------------------
def _setup_context(ctx, inputs, output) -> None:
    x, weight, bias, A, B, scale, dropout_p, seed = inputs
    _, h = output
    ctx.mark_non_differentiable(h)
    ctx.set_materialize_grads(False)
    # x is saved as passed in: q, k and v reading one hidden state save one tensor between them.
    # weight, A, B are parameters (references, no memory); h is (M, r); seed is a 0-dim tensor.
    ctx.save_for_backward(x, weight, A, B, h, seed)
    ctx.scale = scale
    ctx.dropout_p = dropout_p


def _backward(ctx, grad_y, grad_h):
    """Gradients of x, weight, bias, A, B (None for the scalars and the seed)."""
    del grad_h  # h is marked non-differentiable
    if grad_y is None:
        return (None,) * 8
    x, weight, A, B, h, seed = ctx.saved_tensors
    need_x, need_w, need_bias, need_A, need_B = ctx.needs_input_grad[:5]
    grad_x = grad_A = grad_B = None
    if need_x or need_A or need_B:
        grad_x, grad_A, grad_B = torch.ops.peftcore.lora_linear_backward(
            grad_y, x, weight, A, B, h, ctx.scale, ctx.dropout_p, seed, [need_x, need_A, need_B]
        )
    # The base weight is frozen under LoRA, so this weight-sized product normally never runs;
    # it is here so that a user who unfreezes the weight gets its gradient rather than none.
    grad_w = grad_y.t().mm(x) if need_w else None
    grad_bias = grad_y.sum(0) if need_bias else None
    return grad_x, grad_w, grad_bias, grad_A, grad_B, None, None, None


def register() -> None:
    """Registers the fake kernels and autograd of the ops in ``peftcore._C`` (idempotent).

    Called by :func:`peftcore.ops._extension.load` right after importing the extension.
    """
    global _registered
    with _lock:
        if _registered:
            return
        torch.library.register_fake("peftcore::lora_linear")(_lora_linear_fake)
        torch.library.register_fake("peftcore::lora_linear_backward")(_lora_linear_backward_fake)
        torch.library.register_autograd("peftcore::lora_linear", _backward, setup_context=_setup_context)
        autocast.register("peftcore::lora_linear")
        if hasattr(torch.ops.peftcore, "lora_linear_autograd"):  # absent from old builds
            autocast.register("peftcore::lora_linear_autograd")
        _registered = True


# -- the kernel object ----------------------------------------------------------------------------
_ZERO_SEED = torch.zeros((), dtype=torch.int64)


def cpp_lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    A: torch.Tensor,
    B: torch.Tensor,
    scale: float,
    dropout_p: float = 0.0,
    seed: int | torch.Tensor = 0,
) -> torch.Tensor:
    """``lora_linear`` through the C++ op (the extension must be loaded).

    Args:
        x: input ``(M, K)``.
        weight: base weight ``(N, K)``, any strides (a transposed view is read in place).
        bias: ``(N,)`` or ``None``.
        A: ``(r, K)``; B: ``(N, r)``.
        scale: multiplier of the low-rank path.
        dropout_p: dropout probability in ``[0, 1)``.
        seed: int or 0-dim int64 tensor (see :mod:`peftcore.ops.philox`).

    Returns:
        ``(M, N)``.
    """
    if not isinstance(seed, torch.Tensor):
        seed = _ZERO_SEED if seed == 0 else torch.tensor(seed, dtype=torch.int64)
    elif seed.device.type != "cpu" or seed.dtype != torch.int64:
        seed = seed.to("cpu", torch.int64)
    if _merged_is_cheaper(x, weight, A, dropout_p):
        return _merged_forward(x, weight, bias, A, B, float(scale))
    args = (x, weight, bias, A, B, float(scale), float(dropout_p), seed)
    if torch.compiler.is_compiling() or not torch.is_grad_enabled():
        y, _ = torch.ops.peftcore.lora_linear.default(*args)
        return y
    # Eager training: the same formula as the registration above, as a C++ autograd Function
    # (csrc/autograd.cpp). The registered Python autograd cost about 0.3 ms per layer and
    # step whatever the shapes (forward + backward of a 16 x 64 layer: 0.35 ms through a Python
    # Function, 0.24 ms through this op, against 0.09 ms for the frozen nn.Linear alone).
    return torch.ops.peftcore.lora_linear_autograd.default(*args)


def _merged_is_cheaper(x: torch.Tensor, weight: torch.Tensor, A: torch.Tensor, dropout_p: float) -> bool:
    """Whether an inference call should fold the update into a temporary weight instead.

    Without autograd and dropout, ``x (W + scale B A)^T`` equals the op's result. Forming the
    temporary weight costs ``N K r`` multiply-adds and one weight-sized buffer (freed on return);
    the low-rank path costs ``M (K + N) r`` and a pass over the output. So for batches with more
    rows than ``N K / (K + N)`` (a few hundred for a BERT layer) the merged form is cheaper; for
    few rows (decoding one token) the low-rank path is. Only fp32/fp64: in bf16/fp16 a small
    update vanishes when rounded into the weight (8 or 11 mantissa bits), so those keep the
    low-rank path. The user's weights are never touched.
    """
    if dropout_p != 0.0 or torch.is_grad_enabled() or torch.compiler.is_compiling():
        return False
    if x.dtype not in (torch.float32, torch.float64):
        return False
    M, K = x.shape
    N = weight.shape[0]
    return N * K <= M * (K + N)


def _merged_forward(x, weight, bias, A, B, scale: float) -> torch.Tensor:
    merged = torch.addmm(weight, B, A, alpha=scale)  # W + scale B A, a fresh (N, K) buffer
    return torch.addmm(bias, x, merged.t()) if bias is not None else torch.mm(x, merged.t())


class _CppKernel:
    """The ``cpp`` backend of ``lora_linear`` (entry point ``lora_linear.cpp``)."""

    op = OP
    backend = "cpp"
    devices = ("cpu",)
    priority = 10
    seed_tensor = True
    peftcore_api = 1
    hint = (
        "Build the C++ extension for the fused CPU kernel: 'pip install --no-build-isolation -e .' "
        "in the peftcore source tree (torch installed first; a C++17 compiler), see docs/kernels.md"
    )

    def available(self) -> tuple[bool, str]:
        ok, reason = _extension.load()
        if not ok:
            return False, reason
        if not torch._C._dispatch_has_kernel_for_dispatch_key(f"peftcore::{OP}", "CPU"):
            return False, "the loaded peftcore._C has no CPU kernel for lora_linear (an old build; rebuild it)"
        if not hasattr(torch.ops.peftcore, "lora_linear_autograd"):
            return False, "the loaded peftcore._C has no lora_linear_autograd op (an old build; rebuild it)"
        return True, ""

    def __call__(self, *args, **kwargs) -> torch.Tensor:
        return cpp_lora_linear(*args, **kwargs)


CPP = _CppKernel()
