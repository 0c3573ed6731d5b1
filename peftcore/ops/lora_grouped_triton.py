"""Triton kernels of the grouped LoRA op (``lora_grouped``), in the manner of Punica/vLLM's SGMV.

The rows are sorted by adapter once per call on the device (``argsort`` of the index, segment
starts from ``bincount``; no host sync), and every kernel's grid is (adapter, row or column
tile): a program works on one adapter's rows only, gathering them through the sorted order.

Forward, two launches after the base GEMM (``y = x W^T + b``, cuBLAS through ATen):

1. ``_shrink_kernel``: ``h[m] = dropout_g(x[m]) A[g]^T`` for each row ``m`` of adapter ``g``,
   ``(M, R)`` with ``R`` the largest rank (A stacked and zero-padded to ``(G, R, K)``); the
   mask drawn in the kernel from (seed, m * K + k) with the adapter's threshold.
2. ``_expand_kernel``: ``y[m] += scale_g h[m] B[g]^T``, read-modify-write of the routed rows
   (base rows are never touched).

Backward: ``dh = scale_g dy B[g]`` (shrink of ``dy`` with ``B^T``), ``dx = dy W`` (ATen) plus
``mask * (dh A[g]) / (1 - p_g)`` (expand with the mask on its output), and per adapter
``dA[g] = dh_g^T dropout(x_g)``, ``dB[g]^T = scale_g h_g^T dy_g`` (``_segment_outer_kernel``:
grid (adapter, column tile), a loop over the adapter's rows).

The kernels accumulate in fp32 (operands upcast, ``tl.dot`` in IEEE precision): exact against
the reference, not tuned for tensor cores (no GPU where this was written; see docs/kernels.md).
The grid's row tiles are sized for the whole batch (``cdiv(M, BLOCK_M)`` per adapter) so that no
segment length is read on the host; programs past their adapter's rows return at once.
"""

from __future__ import annotations

import torch

from peftcore.ops import philox
from peftcore.ops.lora_grouped import OP, _per_adapter
from peftcore.ops.lora_triton import INTERPRETED, _TRITON_MISSING, _jit, _keep_mask, tl, triton

_BLOCK_M = 16
_BLOCK_C = 32  # columns (K or N) per tile


@_jit()
def _row_tile(order_ptr, starts_ptr, BLOCK_M: tl.constexpr):
    """The rows of this program's tile: adapter ``g = program_id(0)``, row tile ``program_id(1)``.

    Returns:
        ``(g, rows, row_ok, past_end)``: ``rows`` (BLOCK_M,) through the sorted order, masked by
        ``row_ok`` (BLOCK_M,); ``past_end`` when the tile starts past the adapter's rows (the kernel
        returns then: a ``return`` here would only leave this function).
    """
    g = tl.program_id(0)
    start = tl.load(starts_ptr + g)
    end = tl.load(starts_ptr + g + 1)
    first = start + tl.program_id(1) * BLOCK_M
    pos = first + tl.arange(0, BLOCK_M)
    row_ok = pos < end
    rows = tl.load(order_ptr + pos, mask=row_ok, other=0)
    return g, rows, row_ok, first >= end


@_jit(do_not_specialize=["seed"])
def _shrink_kernel(
    in_ptr, f_ptr, out_ptr, order_ptr, starts_ptr, scale_ptr, thr_ptr, inv_ptr,
    C, R, seed,
    stride_im, stride_fg, stride_fr, stride_om,
    HAS_DROPOUT: tl.constexpr, C_ALIGNED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """out[m, :R] = scale_g * sum_c keep_g(m, c) in[m, c] F[g, :, c] for the rows m of adapter g."""
    g, rows, row_ok, past_end = _row_tile(order_ptr, starts_ptr, BLOCK_M)
    if past_end:
        return
    offs_r = tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        a = tl.load(in_ptr + rows[:, None].to(tl.int64) * stride_im + offs_c[None, :],
                    mask=row_ok[:, None] & (offs_c[None, :] < C), other=0.0).to(tl.float32)
        if HAS_DROPOUT:
            keep = _keep_mask(seed, rows, c0, C, tl.load(thr_ptr + g), BLOCK_M, BLOCK_C, C_ALIGNED)
            a = tl.where(keep, a, 0.0)
        f = tl.load(f_ptr + g * stride_fg + offs_r[None, :] * stride_fr + offs_c[:, None],
                    mask=(offs_r[None, :] < R) & (offs_c[:, None] < C), other=0.0).to(tl.float32)
        acc = tl.dot(a, f, acc, input_precision="ieee")
    acc = acc * (tl.load(scale_ptr + g) * tl.load(inv_ptr + g))
    tl.store(out_ptr + rows[:, None].to(tl.int64) * stride_om + offs_r[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & (offs_r[None, :] < R))


@_jit(do_not_specialize=["seed"])
def _expand_kernel(
    h_ptr, f_ptr, out_ptr, order_ptr, starts_ptr, scale_ptr, thr_ptr, inv_ptr,
    C, R, seed,
    stride_hm, stride_fg, stride_fr, stride_om,
    HAS_DROPOUT: tl.constexpr, C_ALIGNED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """out[m, c] += keep_g(m, c) * inv_g * scale_g * sum_r h[m, r] F[g, r, c] for the rows of adapter g."""
    g, rows, row_ok, past_end = _row_tile(order_ptr, starts_ptr, BLOCK_M)
    if past_end:
        return
    offs_r = tl.arange(0, BLOCK_R)
    h = tl.load(h_ptr + rows[:, None].to(tl.int64) * stride_hm + offs_r[None, :],
                mask=row_ok[:, None] & (offs_r[None, :] < R), other=0.0).to(tl.float32)
    h = h * (tl.load(scale_ptr + g) * tl.load(inv_ptr + g))
    offs_c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    f = tl.load(f_ptr + g * stride_fg + offs_r[:, None] * stride_fr + offs_c[None, :],
                mask=(offs_r[:, None] < R) & (offs_c[None, :] < C), other=0.0).to(tl.float32)
    delta = tl.dot(h, f, input_precision="ieee")
    if HAS_DROPOUT:
        keep = _keep_mask(seed, rows, tl.program_id(2) * BLOCK_C, C, tl.load(thr_ptr + g), BLOCK_M, BLOCK_C, C_ALIGNED)
        delta = tl.where(keep, delta, 0.0)
    ptrs = out_ptr + rows[:, None].to(tl.int64) * stride_om + offs_c[None, :]
    ok = row_ok[:, None] & (offs_c[None, :] < C)
    y = tl.load(ptrs, mask=ok, other=0.0).to(tl.float32)
    tl.store(ptrs, (y + delta).to(out_ptr.dtype.element_ty), mask=ok)


@_jit(do_not_specialize=["seed"])
def _segment_outer_kernel(
    l_ptr, r_ptr, out_ptr, order_ptr, starts_ptr, scale_ptr, thr_ptr, inv_ptr,
    C, R, seed,
    stride_lm, stride_rm, stride_og, stride_or,
    HAS_DROPOUT: tl.constexpr, C_ALIGNED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """out[g, :R, c] = scale_g * sum_{m of g} L[m, :R]^T (keep_g(m, c) inv_g Rt[m, c]); fixed row order."""
    g = tl.program_id(0)
    start = tl.load(starts_ptr + g)
    end = tl.load(starts_ptr + g + 1)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_r = tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    for first in range(start, end, BLOCK_M):
        pos = first + tl.arange(0, BLOCK_M)
        row_ok = pos < end
        rows = tl.load(order_ptr + pos, mask=row_ok, other=0)
        left = tl.load(l_ptr + rows[None, :].to(tl.int64) * stride_lm + offs_r[:, None],
                       mask=row_ok[None, :] & (offs_r[:, None] < R), other=0.0).to(tl.float32)  # (R, M)
        right = tl.load(r_ptr + rows[:, None].to(tl.int64) * stride_rm + offs_c[None, :],
                        mask=row_ok[:, None] & (offs_c[None, :] < C), other=0.0).to(tl.float32)  # (M, C)
        if HAS_DROPOUT:
            keep = _keep_mask(seed, rows, tl.program_id(1) * BLOCK_C, C, tl.load(thr_ptr + g), BLOCK_M, BLOCK_C, C_ALIGNED)
            right = tl.where(keep, right, 0.0)
        acc = tl.dot(left, right, acc, input_precision="ieee")
    acc = acc * (tl.load(scale_ptr + g) * tl.load(inv_ptr + g))
    tl.store(out_ptr + g * stride_og + offs_r[:, None] * stride_or + offs_c[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=(offs_r[:, None] < R) & (offs_c[None, :] < C))


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------


def _block_r(R: int) -> int:
    return max(16, triton.next_power_of_2(max(R, 1)))


class _Plan:
    """Per-call device tensors shared by the launches: sorted rows, segment starts, per-adapter
    scales, dropout thresholds and 1 / (1 - p)."""

    def __init__(self, index: torch.Tensor, scales: list[float], ps: list[float], seed: int, device: torch.device):
        G = len(scales)
        index = index.to(device=device, dtype=torch.int64)
        self.order = torch.argsort(index, stable=True).to(torch.int32)  # base rows (-1) first
        counts = torch.bincount(index + 1, minlength=G + 1)
        starts = torch.cumsum(counts, 0)  # starts[g] = first sorted position of adapter g (g >= 0)
        self.starts = starts.to(torch.int32).contiguous()
        self.scales = torch.tensor(scales, dtype=torch.float32, device=device)
        self.ones = torch.ones(G, dtype=torch.float32, device=device)
        self.thr = torch.tensor([philox.threshold(p) for p in ps], dtype=torch.int32, device=device)
        self.inv = torch.tensor([1.0 / (1.0 - p) for p in ps], dtype=torch.float32, device=device)
        self.has_dropout = any(p > 0.0 for p in ps)
        seed &= 0xFFFFFFFFFFFFFFFF
        self.seed = seed - (1 << 64) if seed >= 1 << 63 else seed
        self.G = G


def _stack(factors: list[torch.Tensor], R: int, dim: int) -> torch.Tensor:
    """Factors zero-padded along ``dim`` to ``R`` and stacked: ``(G, ...)``, contiguous."""
    padded = []
    for f in factors:
        pad = R - f.shape[dim]
        if pad:
            shape = list(f.shape)
            shape[dim] = pad
            f = torch.cat([f, f.new_zeros(shape)], dim=dim)
        padded.append(f)
    return torch.stack(padded).contiguous()


def _shrink(inp, stacked, out, plan, R, scale, inv, dropout: bool):
    M, C = inp.shape
    grid = (plan.G, triton.cdiv(M, _BLOCK_M))
    _shrink_kernel[grid](
        inp, stacked, out, plan.order, plan.starts, scale, plan.thr, inv, C, R, plan.seed,
        inp.stride(0), stacked.stride(0), stacked.stride(1), out.stride(0),
        HAS_DROPOUT=dropout, C_ALIGNED=C % 8 == 0, BLOCK_M=_BLOCK_M, BLOCK_C=_BLOCK_C, BLOCK_R=_block_r(R),
    )


def _expand(h, stacked, out, plan, R, scale, inv, dropout: bool):
    M, C = out.shape
    grid = (plan.G, triton.cdiv(M, _BLOCK_M), triton.cdiv(C, _BLOCK_C))
    _expand_kernel[grid](
        h, stacked, out, plan.order, plan.starts, scale, plan.thr, inv, C, R, plan.seed,
        h.stride(0), stacked.stride(0), stacked.stride(1), out.stride(0),
        HAS_DROPOUT=dropout, C_ALIGNED=C % 8 == 0, BLOCK_M=_BLOCK_M, BLOCK_C=_BLOCK_C, BLOCK_R=_block_r(R),
    )


def _segment_outer(left, right, out, plan, R, scale, inv, dropout: bool):
    C = right.shape[1]
    grid = (plan.G, triton.cdiv(C, _BLOCK_C))
    _segment_outer_kernel[grid](
        left, right, out, plan.order, plan.starts, scale, plan.thr, inv, C, R, plan.seed,
        left.stride(0), right.stride(0), out.stride(0), out.stride(1),
        HAS_DROPOUT=dropout, C_ALIGNED=C % 8 == 0, BLOCK_M=_BLOCK_M, BLOCK_C=_BLOCK_C, BLOCK_R=_block_r(R),
    )


class LoRAGroupedFunction(torch.autograd.Function):
    """Autograd of the Triton grouped op; saves ``x``, ``h`` (M, R) and the per-call plan."""

    @staticmethod
    def forward(ctx, x, weight, bias, index, scales, ps, seed, n_adapters, *factors):
        A, B = list(factors[:n_adapters]), list(factors[n_adapters:])
        x = x.contiguous()
        R = max((a.shape[0] for a in A), default=0)
        y = torch.nn.functional.linear(x, weight, bias).contiguous()
        plan = _Plan(index, scales, ps, seed, x.device)
        h = x.new_zeros((x.shape[0], R))
        if n_adapters and R:
            A_stack = _stack(A, R, 0)  # (G, R, K)
            Bt_stack = _stack([b.t() for b in B], R, 0)  # (G, R, N)
            _shrink(x, A_stack, h, plan, R, plan.ones, plan.inv, plan.has_dropout)
            _expand(h, Bt_stack, y, plan, R, plan.scales, plan.ones, False)
        ctx.save_for_backward(x, weight, h, *A, *B)
        ctx.plan, ctx.R, ctx.n = plan, R, n_adapters
        ctx.shapes = [a.shape[0] for a in A]
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, h, *factors = ctx.saved_tensors
        G, R, plan = ctx.n, ctx.R, ctx.plan
        A, B = factors[:G], factors[G:]
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        dy = dy.contiguous()
        dx = dy.mm(weight).contiguous() if need_x else None
        grads_A, grads_B = [None] * G, [None] * G
        if G and R:
            A_stack = _stack(list(A), R, 0)
            B_stack = _stack([b.t() for b in B], R, 0)  # (G, R, N): dh = scale dy B is a shrink with B^T
            dh = x.new_zeros((x.shape[0], R), dtype=torch.float32)
            _shrink(dy, B_stack, dh, plan, R, plan.scales, plan.ones, False)
            if need_x:
                _expand(dh, A_stack, dx, plan, R, plan.ones, plan.inv, plan.has_dropout)
            dA = torch.zeros((G, R, x.shape[1]), dtype=torch.float32, device=x.device)
            _segment_outer(dh, x, dA, plan, R, plan.ones, plan.inv, plan.has_dropout)
            dBt = torch.zeros((G, R, dy.shape[1]), dtype=torch.float32, device=x.device)
            _segment_outer(h, dy, dBt, plan, R, plan.scales, plan.ones, False)
            for g, r in enumerate(ctx.shapes):
                grads_A[g] = dA[g, :r].to(A[g].dtype)
                grads_B[g] = dBt[g, :r].t().to(B[g].dtype)
        dw = dy.t().mm(x) if need_w else None
        db = dy.sum(0) if need_b else None
        return (dx, dw, db, None, None, None, None, None, *grads_A, *grads_B)


def triton_lora_grouped(x, weight, bias, A, B, scales, index, dropout_p=0.0, seed=0) -> torch.Tensor:
    """``lora_grouped`` through the Triton kernels; arguments as in
    :func:`peftcore.ops.lora_grouped.reference_lora_grouped` (``x`` is ``(M, K)``)."""
    ps = _per_adapter(dropout_p, len(A))
    return LoRAGroupedFunction.apply(x, weight, bias, index, [float(s) for s in scales], ps, int(seed), len(A), *A, *B)


class _TritonKernel:
    """The ``triton`` backend of ``lora_grouped``: CUDA tensors, or CPU ones in the interpreter
    (asked for by name only: its priority is below ``reference`` there)."""

    op = OP
    backend = "triton"
    peftcore_api = 1
    seed_tensor = False
    hint = "Install triton (pip install triton, Linux) and run on a CUDA GPU."

    @property
    def devices(self) -> tuple[str, ...]:
        return ("cuda", "cpu") if INTERPRETED else ("cuda",)

    @property
    def priority(self) -> int:
        return -1 if INTERPRETED else 20

    def available(self) -> tuple[bool, str]:
        if triton is None:
            return False, _TRITON_MISSING
        if INTERPRETED:
            return True, ""
        if not torch.cuda.is_available():
            return False, "no CUDA device; the triton backend needs one (or TRITON_INTERPRET=1 for tests)"
        return True, ""

    def __call__(self, *args, **kwargs) -> torch.Tensor:
        return triton_lora_grouped(*args, **kwargs)


TRITON = _TritonKernel()
