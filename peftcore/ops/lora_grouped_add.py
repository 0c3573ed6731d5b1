"""The grouped LoRA update added into a given base output: one adapter (or none) per row, in place.

``y[m] += scale[g] * dropout(x)[m] A[g]^T B[g]^T`` with ``g = index[m]``; rows with
``index[m] == -1`` keep the base output. It is to :func:`peftcore.ops.lora_grouped.lora_grouped`
what :func:`peftcore.ops.lora_add.lora_add_` is to ``lora_linear``: a base whose matmul is its own
(a quantized layer, see ``LoraLinear.base_output``) computes ``y``, and the routed adapters'
low-rank paths go into it, without the base weight as a plain tensor.

``reference_lora_grouped_add`` is the specification (out of place, ordinary autograd). The op
gathers each adapter's rows once: ``h_g = dropout(x[rows_g]) A_g^T`` (rank-sized), then adds
``scale_g h_g B_g^T`` into those rows of ``y``. It saves ``x`` (the caller's tensor), the ``h_g``,
the row indices and the seed; backward redraws each adapter's mask for its rows from the seed
(:func:`peftcore.ops.philox.keep_mask_rows`: the mask ``lora_grouped`` and ``lora_linear`` draw for
those rows) and gives each adapter the gradient of its own rows only.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from peftcore.ops import philox
from peftcore.ops.lora_add import seed_tensor
from peftcore.ops.lora_grouped import _per_adapter


def reference_lora_grouped_add(
    y: torch.Tensor,
    x: torch.Tensor,
    A: Sequence[torch.Tensor],
    B: Sequence[torch.Tensor],
    scales: Sequence[float],
    index: torch.Tensor,
    dropout_p: Sequence[float] | float = 0.0,
    seed: int | torch.Tensor = 0,
) -> torch.Tensor:
    """``y`` plus each row's adapter's LoRA path, in plain PyTorch: the meaning of :func:`lora_grouped_add_`.

    Args:
        y: base output, shape ``(M, N)``.
        x: input, shape ``(M, K)``.
        A: ``G`` down-projections, adapter ``g`` of shape ``(r_g, K)`` (ranks may differ).
        B: ``G`` up-projections, adapter ``g`` of shape ``(N, r_g)``.
        scales: ``G`` multipliers of the low-rank paths.
        index: ``(M,)`` int64: each row's adapter in ``[0, G)``, or ``-1`` (base output only).
        dropout_p: ``G`` dropout probabilities (a float applies to every adapter).
        seed: 64-bit seed of the dropout mask (int or 0-dim int64 tensor).

    Returns:
        A new tensor of shape ``(M, N)``.
    """
    for rows, A_g, B_g, scale, p in zip(group_rows(index, len(A)), A, B, scales, _per_adapter(dropout_p, len(A))):
        x_g = x
        if p > 0.0:
            keep = philox.keep_mask(seed, x.shape, p, x.device)
            x_g = x * keep.to(x.dtype) * (1.0 / (1.0 - p))
        y = y.index_add(0, rows, scale * F.linear(F.linear(x_g.index_select(0, rows), A_g), B_g))
    return y


def _dropped_rows(x_g: torch.Tensor, rows: torch.Tensor, K: int, p: float, seed: torch.Tensor) -> torch.Tensor:
    """``dropout(x)[rows]`` given ``x_g = x[rows]`` (or a gradient of that shape): the rows' mask."""
    if p == 0.0:
        return x_g
    keep = philox.keep_mask_rows(seed, rows, K, p)
    return x_g * keep.to(x_g.dtype) * (1.0 / (1.0 - p))


class LoraGroupedAddFunction(torch.autograd.Function):
    """In-place ``y[rows_g] += scale_g * dropout(x[rows_g]) A_g^T B_g^T`` for every adapter ``g``;
    ``y``'s gradient passes through unchanged. ``factors`` is ``A_0 .. A_{G-1}, B_0 .. B_{G-1}``."""

    @staticmethod
    def forward(ctx, y, x, rows, scales, dropout_p, seed, *factors):  # noqa: D401 - autograd signature
        G = len(scales)
        A, B = factors[:G], factors[G:]
        K, N = x.shape[-1], y.shape[-1]
        x2 = x.reshape(-1, K)  # (M, K)
        if y._base is not None:
            # A view (bitsandbytes' 8-bit matmul returns one from its autograd Function) cannot be
            # written in place under autograd: one new output-sized buffer instead, as lora_add_.
            out = y.reshape(-1, N).clone()
        else:
            out = y.view(-1, N)  # the base layer's fresh output: contiguous
        hs = []
        for g in range(G):
            x_g = _dropped_rows(x2.index_select(0, rows[g]), rows[g], K, dropout_p[g], seed)  # (M_g, K)
            h = x_g.mm(A[g].t())  # (M_g, r_g)
            out.index_add_(0, rows[g], h.mm(B[g].t()), alpha=scales[g])
            hs.append(h)
        ctx.save_for_backward(x, seed, *factors, *hs, *rows)
        ctx.scales, ctx.dropout_p = scales, dropout_p
        if y._base is not None:
            return out.view(y.shape)
        ctx.mark_dirty(y)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        G = len(ctx.scales)
        x, seed, *rest = ctx.saved_tensors
        A, B, hs, rows = rest[:G], rest[G:2 * G], rest[2 * G:3 * G], rest[3 * G:]
        need_y, need_x = ctx.needs_input_grad[:2]
        need_factor = ctx.needs_input_grad[6:]
        K, N = x.shape[-1], grad_y.shape[-1]
        g2 = grad_y.reshape(-1, N)  # (M, N)
        grad_x = torch.zeros(x.shape, dtype=grad_y.dtype, device=grad_y.device).view(-1, K) if need_x else None
        grad_A, grad_B = [None] * G, [None] * G
        for g in range(G):
            need_A, need_B = need_factor[g], need_factor[G + g]
            if not (need_x or need_A or need_B):
                continue
            scale, p = ctx.scales[g], ctx.dropout_p[g]
            g_y = g2.index_select(0, rows[g])  # (M_g, N)
            if need_B:
                grad_B[g] = g_y.t().mm(hs[g]).mul_(scale)  # (N, r_g)
            if need_A or need_x:
                g_h = g_y.mm(B[g]).mul_(scale)  # (M_g, r_g)
                if need_A:
                    x_g = _dropped_rows(x.reshape(-1, K).index_select(0, rows[g]), rows[g], K, p, seed)
                    grad_A[g] = g_h.t().mm(x_g)  # (r_g, K)
                if need_x:
                    grad_x.index_add_(0, rows[g], _dropped_rows(g_h.mm(A[g]), rows[g], K, p, seed))
        if grad_x is not None:
            grad_x = grad_x.view(x.shape)
        return (grad_y if need_y else None), grad_x, None, None, None, None, *grad_A, *grad_B


def group_rows(index: torch.Tensor, G: int) -> list[torch.Tensor]:
    """The rows of each group ``0 .. G-1`` of a ``(M,)`` index (``-1``: no group), in ascending order:
    one stable sort and one host sync for all groups."""
    order = torch.argsort(index, stable=True)
    counts = torch.bincount(index + 1, minlength=G + 1).tolist()  # [no group, group 0, ...]
    return list(order.split(counts)[1:])


def lora_grouped_add_(
    y: torch.Tensor,
    x: torch.Tensor,
    A: Sequence[torch.Tensor],
    B: Sequence[torch.Tensor],
    scales: Sequence[float],
    index: torch.Tensor,
    dropout_p: Sequence[float] | float = 0.0,
    seed: int | torch.Tensor = 0,
) -> torch.Tensor:
    """Adds each row's adapter's LoRA path into ``y`` in place and returns ``y``; arguments as
    :func:`reference_lora_grouped_add`, except that ``x`` and ``y`` may have leading dimensions
    ``(*, K)`` and ``(*, N)`` with ``index`` of shape ``(prod(*),)``.

    ``y`` must be a fresh output (a base layer's result, not a tensor autograd saved); a view is
    not written in place (autograd forbids it for a custom Function's output): the sum is then a
    new tensor. The factors are cast to ``y``'s dtype (a bf16 compute dtype, autocast). Adapters
    listed but without rows get zero gradients.

    Returns:
        ``y``, now holding the sum (or a new tensor for a view ``y``).

    Raises:
        ValueError: factor counts, shapes or the index do not match ``x`` and ``y``.
    """
    G = len(A)
    K, N = x.shape[-1], y.shape[-1]
    M = x.numel() // K if K else x.shape[:-1].numel()
    if not (len(B) == G == len(scales)):
        raise ValueError(f"lora_grouped_add_: {G} A factors, {len(B)} B factors and {len(scales)} scales; they must match")
    for g, (A_g, B_g) in enumerate(zip(A, B)):
        if A_g.dim() != 2 or A_g.shape[1] != K or B_g.dim() != 2 or B_g.shape[0] != N or B_g.shape[1] != A_g.shape[0]:
            raise ValueError(f"lora_grouped_add_: adapter {g} has A {tuple(A_g.shape)} and B {tuple(B_g.shape)}; "
                             f"with x (*, {K}) and y (*, {N}) they must be (r, {K}) and ({N}, r)")
    if y.shape[:-1] != x.shape[:-1] or index.shape != (M,):
        raise ValueError(f"lora_grouped_add_: x {tuple(x.shape)}, y {tuple(y.shape)} and index {tuple(index.shape)} "
                         f"do not match (index must be ({M},))")
    seed = seed_tensor(seed)
    rows = group_rows(index, G)
    dtype = y.dtype
    if x.dtype != dtype:
        x = x.to(dtype)
    factors = [f.to(dtype) for f in A] + [f.to(dtype) for f in B]
    if not y.is_contiguous():
        y = y.contiguous()
    return LoraGroupedAddFunction.apply(y, x, tuple(rows), tuple(float(s) for s in scales),
                                        tuple(_per_adapter(dropout_p, G)), seed, *factors)
