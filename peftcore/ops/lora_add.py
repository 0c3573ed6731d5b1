"""The LoRA update added into a given base output: ``y += scale * dropout(x) A^T B^T``, in place.

``lora_linear`` fuses the base matmul with the low-rank path, which needs the base weight as a
plain ``(N, K)`` tensor. A quantized base (bitsandbytes' ``Linear4bit``, a torchao weight) computes
its output with its own matmul; the adapter layer then hands that output to :func:`lora_add_`,
which adds the low-rank path into it without a second output-sized buffer.

``reference_lora_add`` is the specification (out of place, ordinary autograd). The in-place op
saves ``x`` (the caller's tensor), the rank-sized ``h = dropout(x) A^T`` and the seed; backward
regenerates the dropout mask from the seed (:func:`peftcore.ops.philox.keep_mask`, the same mask
``lora_linear`` draws for that seed) instead of storing it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from peftcore.ops import philox


def reference_lora_add(
    y: torch.Tensor,
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    scale: float,
    dropout_p: float = 0.0,
    seed: int | torch.Tensor = 0,
) -> torch.Tensor:
    """``y + scale * dropout(x) A^T B^T`` in plain PyTorch: the meaning of :func:`lora_add_`.

    Args:
        y: base output, shape ``(*, N)``.
        x: input, shape ``(*, K)``.
        A: down-projection, shape ``(r, K)``.
        B: up-projection, shape ``(N, r)``.
        scale: multiplier of the low-rank path.
        dropout_p: dropout probability on ``x``, in ``[0, 1)``.
        seed: 64-bit seed of the mask (int or 0-dim int64 tensor), as for ``lora_linear``.

    Returns:
        A new tensor of shape ``(*, N)``.
    """
    if dropout_p > 0.0:
        keep = philox.keep_mask(seed, x.shape, dropout_p, x.device)
        x = x * keep.to(x.dtype) * (1.0 / (1.0 - dropout_p))
    return y + scale * F.linear(F.linear(x, A), B)


def _dropped(x2: torch.Tensor, dropout_p: float, seed: torch.Tensor) -> torch.Tensor:
    """``dropout(x)`` for ``x`` viewed ``(M, K)``: the mask regenerated from the seed."""
    if dropout_p == 0.0:
        return x2
    keep = philox.keep_mask(seed, x2.shape, dropout_p, x2.device)
    return x2 * keep.to(x2.dtype) * (1.0 / (1.0 - dropout_p))


class LoraAddFunction(torch.autograd.Function):
    """In-place ``y += scale * dropout(x) A^T B^T``; ``y``'s gradient passes through unchanged."""

    @staticmethod
    def forward(ctx, y, x, A, B, scale, dropout_p, seed):  # noqa: D401 - autograd signature
        K, N = x.shape[-1], y.shape[-1]
        x2 = x.reshape(-1, K)  # (M, K), a view for contiguous x
        h = _dropped(x2, dropout_p, seed).mm(A.t())  # (M, r)
        ctx.save_for_backward(x, A, B, h, seed)
        ctx.scale, ctx.dropout_p = scale, dropout_p
        if y._base is not None:
            # A view (bitsandbytes' 8-bit matmul returns one from its autograd Function) cannot be
            # written in place under autograd: one new output-sized buffer instead.
            return torch.addmm(y.reshape(-1, N), h, B.t(), alpha=scale).view(y.shape)
        y.view(-1, N).addmm_(h, B.t(), alpha=scale)  # y is the base layer's fresh output: contiguous
        ctx.mark_dirty(y)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, A, B, h, seed = ctx.saved_tensors
        need_y, need_x, need_A, need_B = ctx.needs_input_grad[:4]
        K, N = x.shape[-1], grad_y.shape[-1]
        g = grad_y.reshape(-1, N)  # (M, N)
        grad_x = grad_A = grad_B = None
        if need_B:
            grad_B = g.t().mm(h).mul_(ctx.scale)  # (N, r)
        if need_x or need_A:
            g_h = g.mm(B).mul_(ctx.scale)  # (M, r)
            if need_A:
                grad_A = g_h.t().mm(_dropped(x.reshape(-1, K), ctx.dropout_p, seed))  # (r, K)
            if need_x:
                gx = g_h.mm(A)  # (M, K)
                if ctx.dropout_p > 0.0:
                    gx = _dropped(gx, ctx.dropout_p, seed)
                grad_x = gx.reshape(x.shape)
        return (grad_y if need_y else None), grad_x, grad_A, grad_B, None, None, None


_ZERO_SEED = torch.zeros((), dtype=torch.int64)


def seed_tensor(seed: int | torch.Tensor) -> torch.Tensor:
    """A dropout seed as the 0-dim int64 tensor the autograd Functions save (0: one shared tensor)."""
    if isinstance(seed, torch.Tensor):
        return seed
    return _ZERO_SEED if seed == 0 else torch.tensor(seed, dtype=torch.int64)


def lora_add_(
    y: torch.Tensor,
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    scale: float,
    dropout_p: float = 0.0,
    seed: int | torch.Tensor = 0,
) -> torch.Tensor:
    """Adds the LoRA path into ``y`` in place and returns ``y``; arguments as :func:`reference_lora_add`.

    ``y`` must be a fresh output (a base layer's result, not a tensor autograd saved); a view is
    not written in place (autograd forbids it for a custom Function's output): the sum is then a
    new tensor. The factors are cast to ``y``'s dtype (a bf16 compute dtype, autocast).

    Returns:
        ``y``, now holding ``y + scale * dropout(x) A^T B^T`` (or a new tensor for a view ``y``).
    """
    seed = seed_tensor(seed)
    dtype = y.dtype
    if x.dtype != dtype:
        x = x.to(dtype)
    A, B = A.to(dtype), B.to(dtype)
    if not y.is_contiguous():
        y = y.contiguous()
    return LoraAddFunction.apply(y, x, A, B, float(scale), float(dropout_p), seed)
