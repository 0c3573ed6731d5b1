"""The ``triton`` backend of the bottleneck op: one fused kernel per direction, on CUDA devices.

Read top to bottom: the activation helpers, the forward kernel, the backward kernel, their
launchers, the ``autograd.Function``, the kernel object.

* Forward (``_bottleneck_fwd_kernel``): one program per ``BLOCK_M`` rows computes
  ``h = x W_d^T + b_d`` over K in ``BLOCK_K`` steps (the whole bottleneck width ``r`` stays in
  registers, padded to a power of two), stores ``h`` (saved for backward), applies the
  activation, then sweeps N in ``BLOCK_N`` steps writing ``r + scale * (a W_u^T + b_u)``. The
  activation never goes to memory.
* Backward (``_bottleneck_bwd_kernel``): one program per ``BLOCK_M`` rows sweeps N to form
  ``grad_y W_u`` and writes ``grad_h = scale * (grad_y W_u) * act'(h)`` and ``a = act(h)``
  (recomputed from ``h``); the weight gradients and ``grad_x`` are then single matmuls over those
  ``(M, r)`` tensors, which cuBLAS does better than a hand-written reduction.

``TRITON_INTERPRET=1`` runs the kernels on CPU tensors (slowly; used by the tests). It must be set
before this module is imported, because ``triton.jit`` reads it when the kernels are defined.
The interpreter multiplies bfloat16/float16 blocks incorrectly, so there (only) the dot
products read their operands as float32 (``UPCAST``). float32 dot products use IEEE precision (no
TF32), so float32 results match the reference as closely as ATen's matmuls do.
"""

from __future__ import annotations

import os

import torch

from peftcore.ops.bottleneck import ACTIVATIONS, OP

try:
    import triton
    import triton.language as tl

    _IMPORT_ERROR = ""
except ImportError as exc:  # triton is optional (Linux + CUDA only)
    triton = None
    tl = None
    _IMPORT_ERROR = f"triton is not installed ({exc}); pip install 'peftcore[triton]'"

_ACT_CODES = {name: i for i, name in enumerate(ACTIVATIONS)}  # relu 0, gelu 1, gelu_tanh 2, silu 3


def interpreting() -> bool:
    """Whether Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "").strip() not in {"", "0"}


#: Read once, as ``triton.jit`` reads it once: the kernels below are interpreted or compiled for good.
INTERPRETED = interpreting()


if triton is not None:

    @triton.jit
    def _tanh(v):
        return 2.0 * tl.sigmoid(2.0 * v) - 1.0

    @triton.jit
    def _act_fwd(h, ACT: tl.constexpr):
        # h: float32 block. Same formulas as torch's relu / gelu / gelu(tanh) / silu.
        if ACT == 0:
            out = tl.where(h > 0.0, h, 0.0)
        elif ACT == 1:
            out = 0.5 * h * (1.0 + tl.math.erf(h * 0.7071067811865476))
        elif ACT == 2:
            out = 0.5 * h * (1.0 + _tanh(0.7978845608028654 * (h + 0.044715 * h * h * h)))
        else:
            out = h * tl.sigmoid(h)
        return out

    @triton.jit
    def _act_grad(h, ACT: tl.constexpr):
        # d act / d h, float32.
        if ACT == 0:
            out = tl.where(h > 0.0, 1.0, 0.0)
        elif ACT == 1:
            out = 0.5 * (1.0 + tl.math.erf(h * 0.7071067811865476)) + h * 0.3989422804014327 * tl.exp(-0.5 * h * h)
        elif ACT == 2:
            t = _tanh(0.7978845608028654 * (h + 0.044715 * h * h * h))
            out = 0.5 * (1.0 + t) + 0.5 * h * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 0.134145 * h * h)
        else:
            s = tl.sigmoid(h)
            out = s * (1.0 + h * (1.0 - s))
        return out

    @triton.jit
    def _bottleneck_fwd_kernel(
        X, WD, BD, WU, BU, RES, Y, H,
        M, K, N, R, scale,
        stride_xm, stride_xk, stride_wdr, stride_wdk, stride_wun, stride_wur,
        stride_rm, stride_rn, stride_ym, stride_yn, stride_hm, stride_hr,
        HAS_BD: tl.constexpr, HAS_BU: tl.constexpr, HAS_RES: tl.constexpr, ACT: tl.constexpr,
        UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_R: tl.constexpr,
    ):
        rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        rr = tl.arange(0, BLOCK_R)
        row_ok = rm < M
        # h = x W_d^T: (BLOCK_M, BLOCK_R), float32 accumulator
        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(X + rm[:, None] * stride_xm + rk[None, :] * stride_xk,
                        mask=row_ok[:, None] & (rk[None, :] < K), other=0.0)
            wd = tl.load(WD + rr[None, :] * stride_wdr + rk[:, None] * stride_wdk,
                         mask=(rr[None, :] < R) & (rk[:, None] < K), other=0.0)  # (BLOCK_K, BLOCK_R)
            if UPCAST:
                x = x.to(tl.float32)
                wd = wd.to(tl.float32)
            acc += tl.dot(x, wd, input_precision="ieee")
        if HAS_BD:
            acc += tl.load(BD + rr, mask=rr < R, other=0.0).to(tl.float32)[None, :]
        # Round h to the storage dtype first: backward recomputes act from the stored value.
        h = acc.to(H.dtype.element_ty)
        tl.store(H + rm[:, None] * stride_hm + rr[None, :] * stride_hr, h, mask=row_ok[:, None] & (rr[None, :] < R))
        a = _act_fwd(h.to(tl.float32), ACT).to(WU.dtype.element_ty)  # padded columns: act(0) = 0
        if UPCAST:
            a = a.to(tl.float32)
        # y = r + scale * (a W_u^T + b_u), N swept in BLOCK_N columns
        for n0 in range(0, N, BLOCK_N):
            rn = n0 + tl.arange(0, BLOCK_N)
            col_ok = rn < N
            wu = tl.load(WU + rn[None, :] * stride_wun + rr[:, None] * stride_wur,
                         mask=col_ok[None, :] & (rr[:, None] < R), other=0.0)  # (BLOCK_R, BLOCK_N)
            if UPCAST:
                wu = wu.to(tl.float32)
            delta = tl.dot(a, wu, input_precision="ieee")
            if HAS_BU:
                delta += tl.load(BU + rn, mask=col_ok, other=0.0).to(tl.float32)[None, :]
            ok = row_ok[:, None] & col_ok[None, :]
            if HAS_RES:
                base = tl.load(RES + rm[:, None] * stride_rm + rn[None, :] * stride_rn, mask=ok, other=0.0)
            else:
                base = tl.load(X + rm[:, None] * stride_xm + rn[None, :] * stride_xk, mask=ok, other=0.0)
            y = base.to(tl.float32) + scale * delta
            tl.store(Y + rm[:, None] * stride_ym + rn[None, :] * stride_yn, y.to(Y.dtype.element_ty), mask=ok)

    @triton.jit
    def _bottleneck_bwd_kernel(
        G, WU, H, GH, A,
        M, N, R, scale,
        stride_gm, stride_gn, stride_wun, stride_wur, stride_hm, stride_hr,
        ACT: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_R: tl.constexpr,
    ):
        rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        rr = tl.arange(0, BLOCK_R)
        row_ok = rm < M
        r_ok = rr < R
        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)  # grad_y W_u
        for n0 in range(0, N, BLOCK_N):
            rn = n0 + tl.arange(0, BLOCK_N)
            g = tl.load(G + rm[:, None] * stride_gm + rn[None, :] * stride_gn,
                        mask=row_ok[:, None] & (rn[None, :] < N), other=0.0)
            wu = tl.load(WU + rn[:, None] * stride_wun + rr[None, :] * stride_wur,
                         mask=(rn[:, None] < N) & r_ok[None, :], other=0.0)  # (BLOCK_N, BLOCK_R)
            if UPCAST:
                g = g.to(tl.float32)
                wu = wu.to(tl.float32)
            acc += tl.dot(g, wu, input_precision="ieee")
        ok = row_ok[:, None] & r_ok[None, :]
        offs = rm[:, None] * stride_hm + rr[None, :] * stride_hr
        h = tl.load(H + offs, mask=ok, other=0.0).to(tl.float32)
        tl.store(GH + offs, (scale * acc * _act_grad(h, ACT)).to(GH.dtype.element_ty), mask=ok)
        tl.store(A + offs, _act_fwd(h, ACT).to(A.dtype.element_ty), mask=ok)


# -- launchers ---------------------------------------------------------------------------------------
def _block_r(r: int) -> int:
    return max(16, triton.next_power_of_2(r))


def _block_m(block_r: int) -> int:
    # The (BLOCK_M, BLOCK_R) float32 accumulator lives in registers: shrink M as r grows.
    return 64 if block_r <= 64 else (32 if block_r <= 128 else 16)


def bottleneck_forward(x, W_down, b_down, W_up, b_up, scale, activation, residual):
    """Launches the forward kernel on 2-D ``x`` (M, K); returns ``y`` (M, N) and ``h`` (M, r)."""
    M, K = x.shape
    R, N = W_down.shape[0], W_up.shape[0]
    y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    h = torch.empty((M, R), device=x.device, dtype=x.dtype)
    if M == 0:
        return y, h
    block_r = _block_r(R)
    block_m = _block_m(block_r)
    res = residual if residual is not None else x
    dummy = x  # pointer for absent biases; never read (HAS_* is False)
    _bottleneck_fwd_kernel[(triton.cdiv(M, block_m),)](
        x, W_down, b_down if b_down is not None else dummy, W_up, b_up if b_up is not None else dummy, res, y, h,
        M, K, N, R, float(scale),
        x.stride(0), x.stride(1), W_down.stride(0), W_down.stride(1), W_up.stride(0), W_up.stride(1),
        res.stride(0), res.stride(1), y.stride(0), y.stride(1), h.stride(0), h.stride(1),
        HAS_BD=b_down is not None, HAS_BU=b_up is not None, HAS_RES=residual is not None,
        ACT=_ACT_CODES[activation], UPCAST=INTERPRETED,
        BLOCK_M=block_m, BLOCK_K=32, BLOCK_N=64, BLOCK_R=block_r,
    )
    return y, h


def bottleneck_backward(grad_y, x, W_down, W_up, h, scale, activation, residual_is_x, needs):
    """Gradients ``(x, W_down, b_down, W_up, b_up)``; ``needs`` says which to compute."""
    M, N = grad_y.shape
    R = W_down.shape[0]
    grad_h = torch.empty_like(h)  # (M, r)
    a = torch.empty_like(h)  # (M, r)
    if M > 0:
        block_r = _block_r(R)
        block_m = _block_m(block_r)
        _bottleneck_bwd_kernel[(triton.cdiv(M, block_m),)](
            grad_y, W_up, h, grad_h, a,
            M, N, R, float(scale),
            grad_y.stride(0), grad_y.stride(1), W_up.stride(0), W_up.stride(1), h.stride(0), h.stride(1),
            ACT=_ACT_CODES[activation], UPCAST=INTERPRETED,
            BLOCK_M=block_m, BLOCK_N=64, BLOCK_R=block_r,
        )
    grad_x = grad_Wd = grad_bd = grad_Wu = grad_bu = None
    if needs[0]:
        grad_x = torch.addmm(grad_y, grad_h, W_down) if residual_is_x else grad_h @ W_down  # (M, K)
    if needs[1]:
        grad_Wd = grad_h.t() @ x  # (r, K)
    if needs[2]:
        grad_bd = grad_h.sum(0)
    if needs[3]:
        grad_Wu = (grad_y.t() @ a).mul_(scale)  # (N, r)
    if needs[4]:
        grad_bu = grad_y.sum(0).mul_(scale)
    return grad_x, grad_Wd, grad_bd, grad_Wu, grad_bu


class BottleneckFunction(torch.autograd.Function):
    """Autograd of the Triton bottleneck: saves x, W_down, W_up and h (M, r) only."""

    @staticmethod
    def forward(ctx, x, W_down, b_down, W_up, b_up, scale, activation, residual):
        y, h = bottleneck_forward(x, W_down, b_down, W_up, b_up, scale, activation, residual)
        ctx.save_for_backward(x, W_down, W_up, h)
        ctx.scale, ctx.activation = scale, activation
        ctx.has_b_down, ctx.has_b_up, ctx.has_residual = b_down is not None, b_up is not None, residual is not None
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, W_down, W_up, h = ctx.saved_tensors
        n = ctx.needs_input_grad
        needs = (n[0], n[1], n[2] and ctx.has_b_down, n[3], n[4] and ctx.has_b_up)
        grads = bottleneck_backward(grad_y.contiguous(), x, W_down, W_up, h, ctx.scale, ctx.activation,
                                    not ctx.has_residual, needs)
        grad_residual = grad_y if ctx.has_residual and n[7] else None
        return (*grads, None, None, grad_residual)


def triton_bottleneck(x, W_down, b_down, W_up, b_up, scale, activation="gelu", residual=None):
    """The bottleneck op through the Triton kernels; arguments as in the reference (``x``: ``(*, K)``)."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])  # (M, K)
    r2 = None if residual is None else residual.reshape(-1, residual.shape[-1])  # (M, N)
    y = BottleneckFunction.apply(x2, W_down, b_down, W_up, b_up, float(scale), activation, r2)
    return y.reshape(*lead, W_up.shape[0])


class _TritonKernel:
    """The ``triton`` backend of ``bottleneck``: fused kernels on CUDA.

    Under the interpreter it also runs on the CPU, for tests, when asked for by name; its
    priority then drops below the reference's, so ``auto`` never picks the (very slow) interpreter.
    """

    op = OP
    backend = "triton"
    hint = "Triton kernels need a CUDA GPU and the triton package (pip install 'peftcore[triton]')."
    peftcore_api = 1

    @property
    def devices(self) -> tuple[str, ...]:
        return ("cuda", "cpu") if INTERPRETED else ("cuda",)

    @property
    def priority(self) -> int:
        return -1 if INTERPRETED else 20

    def available(self) -> tuple[bool, str]:
        if triton is None:
            return False, _IMPORT_ERROR
        if INTERPRETED or torch.cuda.is_available():
            return True, ""
        return False, "no CUDA device (set TRITON_INTERPRET=1 to run the kernels slowly on the CPU, for testing)"

    def __call__(self, *args, **kwargs) -> torch.Tensor:
        return triton_bottleneck(*args, **kwargs)


TRITON = _TritonKernel()
