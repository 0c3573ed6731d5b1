"""Triton kernels of the LoRA linear op ``y = x W^T + b + scale * dropout(x) A^T B^T``.

The file reads top to bottom: the in-kernel dropout mask, the forward kernels, the backward
kernels, the launchers, :class:`LoRALinearFunction`, and the ``triton`` kernel object that
dispatch finds through the entry point ``lora_linear.triton``.

Forward, two launches:

1. ``_lora_fwd_h_kernel``: ``hs = scale * dropout(x) A^T``, shape (M, r). The dropout mask is
   drawn in the kernel from (seed, offset) and never reaches memory.
2. ``_lora_fwd_kernel``: ``y = x W^T + b + hs B^T``, tiled (BLOCK_M, BLOCK_N) over K. The
   low-rank product seeds the accumulator before the K loop, so ``y`` is written once and no
   output-sized temporary exists.

Backward, up to four launches, each skipped when its gradient is not needed:

* ``_lora_bwd_dh_kernel``: ``dh = scale * dy B``, (M, r);
* ``_lora_bwd_db_kernel``: ``dB = dy^T hs`` and ``db = sum_m dy``, split over M;
* ``_lora_bwd_da_kernel``: ``dA = dh^T (keep * x) / (1 - p)``, split over M, mask regenerated;
* ``_lora_bwd_dx_kernel``: ``dx = dy W + keep * (dh A) / (1 - p)``, mask regenerated.

Saved for backward: the caller's ``x`` itself (q/k/v layers reading one input save one
tensor), ``hs`` (M, r) and the seed; the frozen weight gets no gradient and no weight-sized work.

The mask is :func:`peftcore.ops.philox.keep_mask` bit for bit (``tests/ops/test_lora_triton.py``
checks it); see ``docs/gpu-kernels.md`` for the design and for what was verified without a GPU.
"""

from __future__ import annotations

import functools

import torch

from peftcore.errors import BackendUnavailableError, ConfigError
from peftcore.ops import philox
from peftcore.ops.lora import OP

try:
    import triton
    import triton.language as tl
except ImportError as exc:  # the kernels below are then plain functions that are never launched
    triton = tl = None
    _TRITON_MISSING = f"the triton package is not importable ({type(exc).__name__}: {exc})"
else:
    _TRITON_MISSING = ""

# Triton decides at decoration time whether kernels run on the GPU or in its numpy interpreter
# (TRITON_INTERPRET=1 set before triton was imported); this module follows the same decision.
INTERPRETED = triton is not None and bool(triton.knobs.runtime.interpret)

_SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _jit(**kwargs):
    """``triton.jit(**kwargs)``, or the function unchanged when triton is absent."""
    return triton.jit(**kwargs) if triton is not None else (lambda fn: fn)


def _autotune(configs: list, key: list[str]):
    """``triton.autotune``, or the function unchanged when triton is absent."""
    return triton.autotune(configs=configs, key=key) if triton is not None else (lambda fn: fn)


def _matmul_configs(out_cols: str, red: str, masked: bool) -> list:
    """Tile configurations of the two output-sized matmul kernels (forward and dx).

    ``out_cols`` and ``red`` name the kernel's output-column and reduction block parameters.
    The GPU list follows the Triton matmul tutorial's fp16 configurations; it is not tuned on
    real hardware (none here, see docs/gpu-kernels.md). A ``masked`` kernel (dx) skips the
    128 x 256 tile: its Philox draws would hold another 128 registers per thread beside the
    accumulator. The interpreter gets one small tile, so the autotuner never benchmarks.
    """
    if triton is None:
        return []
    if INTERPRETED:
        return [triton.Config({"BLOCK_M": 32, out_cols: 32, red: 32, "GROUP_M": 2})]
    shapes = [(128, 128, 32, 4, 4), (64, 128, 32, 4, 4), (128, 64, 32, 4, 4), (64, 64, 64, 3, 4)]
    if not masked:
        shapes.insert(0, (128, 256, 64, 3, 8))
    return [
        triton.Config({"BLOCK_M": bm, out_cols: bn, red: bk, "GROUP_M": 8}, num_stages=stages, num_warps=warps)
        for bm, bn, bk, stages, warps in shapes
    ]


# ---------------------------------------------------------------------------------------------
# In-kernel helpers
# ---------------------------------------------------------------------------------------------


@_jit()
def _dot(a, b, acc, DOT_F32: tl.constexpr, PRECISION: tl.constexpr):
    """``acc + a @ b`` in fp32; ``DOT_F32`` upcasts the operands first.

    The interpreter's ``tl.dot`` multiplies bf16 tiles as their raw uint16 bits (numpy has no
    bfloat16), so interpreted bf16 kernels upcast; on the GPU bf16 goes to the tensor cores.
    """
    if DOT_F32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=PRECISION)


@_jit()
def _keep_mask(seed, offs_m, k_start, K, threshold,
               BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, K_ALIGNED: tl.constexpr):
    """Keep-mask (BLOCK_M, BLOCK_K) of rows ``offs_m`` and columns ``k_start + [0, BLOCK_K)``.

    Element (m, k) has offset ``o = m * K + k``; Philox4x32-10 of block counter ``o >> 3`` gives
    four 32-bit outputs, and the element's 16-bit draw is half ``o & 1`` (low first) of output
    ``(o >> 1) & 3`` (see :mod:`peftcore.ops.philox`). With ``K_ALIGNED`` (K and k_start
    multiples of 8) every eight columns are one Philox call whose outputs are cut and
    interleaved back into place: an eighth of the generator work.
    Rows or columns past the tensor get draws too; callers mask them on load and store.
    """
    if K_ALIGNED:
        blocks = ((offs_m[:, None].to(tl.int64) * K + k_start) >> 3) + tl.arange(0, BLOCK_K // 8)[None, :]
        r0, r1, r2, r3 = tl.randint4x(seed, blocks)  # each (BLOCK_M, BLOCK_K // 8)
        # join puts its new axis last: [..., g, a, b] = output 2a + b, so a row-major reshape of
        # join(low halves, high halves), [..., g, a, b, h], yields column 8g + 2(2a + b) + h.
        low = tl.join(tl.join(r0 & 0xFFFF, r2 & 0xFFFF), tl.join(r1 & 0xFFFF, r3 & 0xFFFF))
        high = tl.join(tl.join(r0 >> 16, r2 >> 16), tl.join(r1 >> 16, r3 >> 16))
        draws = tl.reshape(tl.join(low, high), (BLOCK_M, BLOCK_K))
    else:
        offsets = offs_m[:, None].to(tl.int64) * K + (k_start + tl.arange(0, BLOCK_K))[None, :]
        r0, r1, r2, r3 = tl.randint4x(seed, offsets >> 3)
        word = (offsets >> 1) & 3
        bits = tl.where(word == 0, r0, tl.where(word == 1, r1, tl.where(word == 2, r2, r3)))
        draws = tl.where((offsets & 1) == 0, bits & 0xFFFF, bits >> 16)
    return draws.to(tl.int32) >= threshold


@_jit()
def _grouped_tile(pid, rows, cols, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr, GROUP: tl.constexpr):
    """Program id -> (row tile, column tile), GROUP row tiles at a time so they share L2."""
    tiles_r = (rows + BLOCK_ROWS - 1) // BLOCK_ROWS
    tiles_c = (cols + BLOCK_COLS - 1) // BLOCK_COLS
    per_group = GROUP * tiles_c
    first = (pid // per_group) * GROUP
    size = tl.minimum(tiles_r - first, GROUP)
    return first + (pid % per_group) % size, (pid % per_group) // size


# ---------------------------------------------------------------------------------------------
# Forward kernels
# ---------------------------------------------------------------------------------------------


@_jit(do_not_specialize=["seed"])
def _lora_fwd_h_kernel(
    x_ptr, a_ptr, hs_ptr,
    M, K, R,
    stride_xm, stride_xk, stride_ar, stride_ak, stride_hm, stride_hr,
    seed, threshold, out_scale,
    HAS_DROPOUT: tl.constexpr, K_ALIGNED: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """hs[m, r] = out_scale * sum_k keep[m, k] x[m, k] A[r, k]; one (BLOCK_M, BLOCK_R) tile each."""
    pid_m = tl.program_id(0)
    pid_r = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = offs_m < M
    x_rows = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k_start in range(0, K, BLOCK_K):
        offs_k = k_start + tl.arange(0, BLOCK_K)
        x = tl.load(x_rows + offs_k[None, :] * stride_xk, mask=row_ok[:, None] & (offs_k[None, :] < K), other=0.0)
        if HAS_DROPOUT:
            keep = _keep_mask(seed, offs_m, k_start, K, threshold, BLOCK_M, BLOCK_K, K_ALIGNED)
            x = tl.where(keep, x, 0.0)
        a_t = tl.load(  # (BLOCK_K, BLOCK_R): A^T
            a_ptr + offs_r[None, :] * stride_ar + offs_k[:, None] * stride_ak,
            mask=(offs_r[None, :] < R) & (offs_k[:, None] < K), other=0.0,
        )
        acc = _dot(x, a_t, acc, DOT_F32, PRECISION)
    # out_scale = scale / (1 - p): the 1 / (1 - p) of kept elements is applied once here, in fp32.
    acc = acc * out_scale
    tl.store(
        hs_ptr + offs_m[:, None].to(tl.int64) * stride_hm + offs_r[None, :] * stride_hr,
        acc.to(hs_ptr.dtype.element_ty), mask=row_ok[:, None] & (offs_r[None, :] < R),
    )


@_autotune(_matmul_configs("BLOCK_N", "BLOCK_K", masked=False), key=["N", "K"])
@_jit()
def _lora_fwd_kernel(
    x_ptr, w_ptr, bias_ptr, hs_ptr, b_ptr, y_ptr,
    M, N, K, R,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_hm, stride_hr, stride_bn, stride_br,
    stride_ym, stride_yn,
    HAS_BIAS: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """y = x W^T + b + hs B^T, one (BLOCK_M, BLOCK_N) tile per program; W may have any strides."""
    pid_m, pid_n = _grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = offs_m < M
    col_ok = offs_n < N
    # Low-rank path first: its (BLOCK_M, BLOCK_N) product becomes the accumulator the base
    # matmul adds into, so the epilogue needs no second output-sized register tile.
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r_start in range(0, R, BLOCK_R):
        offs_r = r_start + tl.arange(0, BLOCK_R)
        hs = tl.load(
            hs_ptr + offs_m[:, None].to(tl.int64) * stride_hm + offs_r[None, :] * stride_hr,
            mask=row_ok[:, None] & (offs_r[None, :] < R), other=0.0,
        )
        b_t = tl.load(  # (BLOCK_R, BLOCK_N): B^T
            b_ptr + offs_n[None, :] * stride_bn + offs_r[:, None] * stride_br,
            mask=col_ok[None, :] & (offs_r[:, None] < R), other=0.0,
        )
        acc = _dot(hs, b_t, acc, DOT_F32, PRECISION)
    x_rows = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm
    w_cols = w_ptr + offs_n[None, :] * stride_wn
    for k_start in range(0, K, BLOCK_K):
        offs_k = k_start + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        x = tl.load(x_rows + offs_k[None, :] * stride_xk, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w_t = tl.load(w_cols + offs_k[:, None] * stride_wk, mask=col_ok[None, :] & k_ok[:, None], other=0.0)
        acc = _dot(x, w_t, acc, DOT_F32, PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(
        y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :] * stride_yn,
        acc.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :],
    )


# ---------------------------------------------------------------------------------------------
# Backward kernels
# ---------------------------------------------------------------------------------------------


@_jit()
def _lora_bwd_dh_kernel(
    dy_ptr, b_ptr, dh_ptr,
    M, N, R,
    stride_dym, stride_dyn, stride_bn, stride_br, stride_dhm, stride_dhr,
    scale,
    DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """dh = scale * dy B, shape (M, r); one (BLOCK_M, BLOCK_R) tile per program."""
    pid_m = tl.program_id(0)
    pid_r = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = offs_m < M
    dy_rows = dy_ptr + offs_m[:, None].to(tl.int64) * stride_dym
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for n_start in range(0, N, BLOCK_N):
        offs_n = n_start + tl.arange(0, BLOCK_N)
        dy = tl.load(dy_rows + offs_n[None, :] * stride_dyn, mask=row_ok[:, None] & (offs_n[None, :] < N), other=0.0)
        b = tl.load(
            b_ptr + offs_n[:, None] * stride_bn + offs_r[None, :] * stride_br,
            mask=(offs_n[:, None] < N) & (offs_r[None, :] < R), other=0.0,
        )
        acc = _dot(dy, b, acc, DOT_F32, PRECISION)
    tl.store(
        dh_ptr + offs_m[:, None].to(tl.int64) * stride_dhm + offs_r[None, :] * stride_dhr,
        (acc * scale).to(dh_ptr.dtype.element_ty), mask=row_ok[:, None] & (offs_r[None, :] < R),
    )


@_jit()
def _lora_bwd_db_kernel(
    dy_ptr, hs_ptr, dbp_ptr, dbiasp_ptr,
    M, N, R, rows_per_split,
    stride_dym, stride_dyn, stride_hm, stride_hr,
    HAS_DB: tl.constexpr, HAS_DBIAS: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """Partial sums over one slice of rows of dB = dy^T hs (N, r) and of db = sum_m dy (N,).

    Grid (N tiles, r tiles, splits); split s writes fp32 partials to ``dbp[s]`` (N, r) and
    ``dbiasp[s]`` (N,), which the launcher sums: more programs than N / BLOCK_N alone.
    """
    pid_n = tl.program_id(0)
    pid_r = tl.program_id(1)
    split = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    col_ok = offs_n < N
    m_begin = split * rows_per_split
    m_end = tl.minimum(m_begin + rows_per_split, M)
    acc = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
    bias_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for m_start in range(m_begin, m_end, BLOCK_M):
        offs_m = m_start + tl.arange(0, BLOCK_M)
        row_ok = offs_m < m_end
        dy_t = tl.load(  # (BLOCK_N, BLOCK_M): dy^T
            dy_ptr + offs_m[None, :].to(tl.int64) * stride_dym + offs_n[:, None] * stride_dyn,
            mask=row_ok[None, :] & col_ok[:, None], other=0.0,
        )
        if HAS_DB:
            hs = tl.load(
                hs_ptr + offs_m[:, None].to(tl.int64) * stride_hm + offs_r[None, :] * stride_hr,
                mask=row_ok[:, None] & (offs_r[None, :] < R), other=0.0,
            )
            acc = _dot(dy_t, hs, acc, DOT_F32, PRECISION)
        if HAS_DBIAS:
            bias_acc += tl.sum(dy_t.to(tl.float32), axis=1)
    if HAS_DB:
        tl.store(
            dbp_ptr + (split * N + offs_n[:, None]).to(tl.int64) * R + offs_r[None, :], acc,
            mask=col_ok[:, None] & (offs_r[None, :] < R),
        )
    if HAS_DBIAS:
        if pid_r == 0:  # every r tile summed the same dy; the first writes
            tl.store(dbiasp_ptr + split * N + offs_n, bias_acc, mask=col_ok)


@_jit(do_not_specialize=["seed"])
def _lora_bwd_da_kernel(
    dh_ptr, x_ptr, dap_ptr,
    M, K, R, rows_per_split,
    stride_dhm, stride_dhr, stride_xm, stride_xk,
    seed, threshold, keep_scale,
    HAS_DROPOUT: tl.constexpr, K_ALIGNED: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """Partial sum over one slice of rows of dA = dh^T (keep * x) / (1 - p), shape (r, K).

    Grid (K tiles, r tiles, splits); the mask of each (rows, k-tile) block is regenerated from
    the seed exactly as in the forward h kernel. Split s writes fp32 partials to ``dap[s]``.
    """
    pid_k = tl.program_id(0)
    pid_r = tl.program_id(1)
    split = tl.program_id(2)
    k_start = pid_k * BLOCK_K
    offs_k = k_start + tl.arange(0, BLOCK_K)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    k_ok = offs_k < K
    m_begin = split * rows_per_split
    m_end = tl.minimum(m_begin + rows_per_split, M)
    acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    for m_start in range(m_begin, m_end, BLOCK_M):
        offs_m = m_start + tl.arange(0, BLOCK_M)
        row_ok = offs_m < m_end
        dh_t = tl.load(  # (BLOCK_R, BLOCK_M): dh^T
            dh_ptr + offs_m[None, :].to(tl.int64) * stride_dhm + offs_r[:, None] * stride_dhr,
            mask=row_ok[None, :] & (offs_r[:, None] < R), other=0.0,
        )
        x = tl.load(
            x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :] * stride_xk,
            mask=row_ok[:, None] & k_ok[None, :], other=0.0,
        )
        if HAS_DROPOUT:
            keep = _keep_mask(seed, offs_m, k_start, K, threshold, BLOCK_M, BLOCK_K, K_ALIGNED)
            x = tl.where(keep, x, 0.0)
        acc = _dot(dh_t, x, acc, DOT_F32, PRECISION)
    tl.store(
        dap_ptr + (split * R + offs_r[:, None]).to(tl.int64) * K + offs_k[None, :], acc * keep_scale,
        mask=(offs_r[:, None] < R) & k_ok[None, :],
    )


@_autotune(_matmul_configs("BLOCK_K", "BLOCK_N", masked=True), key=["N", "K"])
@_jit(do_not_specialize=["seed"])
def _lora_bwd_dx_kernel(
    dy_ptr, w_ptr, dh_ptr, a_ptr, dx_ptr,
    M, N, K, R,
    stride_dym, stride_dyn, stride_wn, stride_wk, stride_dhm, stride_dhr, stride_ar, stride_ak,
    stride_dxm, stride_dxk,
    seed, threshold, keep_scale,
    HAS_DROPOUT: tl.constexpr, K_ALIGNED: tl.constexpr,
    DOT_F32: tl.constexpr, PRECISION: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr,
):
    """dx = dy W + keep * (dh A) / (1 - p), one (BLOCK_M, BLOCK_K) tile per program."""
    pid_m, pid_k = _grouped_tile(tl.program_id(0), M, K, BLOCK_M, BLOCK_K, GROUP_M)
    k_start = pid_k * BLOCK_K
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = k_start + tl.arange(0, BLOCK_K)
    row_ok = offs_m < M
    k_ok = offs_k < K
    # As in the forward: the masked low-rank term is the starting accumulator.
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for r_start in range(0, R, BLOCK_R):
        offs_r = r_start + tl.arange(0, BLOCK_R)
        dh = tl.load(
            dh_ptr + offs_m[:, None].to(tl.int64) * stride_dhm + offs_r[None, :] * stride_dhr,
            mask=row_ok[:, None] & (offs_r[None, :] < R), other=0.0,
        )
        a = tl.load(
            a_ptr + offs_r[:, None] * stride_ar + offs_k[None, :] * stride_ak,
            mask=(offs_r[:, None] < R) & k_ok[None, :], other=0.0,
        )
        acc = _dot(dh, a, acc, DOT_F32, PRECISION)
    if HAS_DROPOUT:
        keep = _keep_mask(seed, offs_m, k_start, K, threshold, BLOCK_M, BLOCK_K, K_ALIGNED)
        acc = tl.where(keep, acc * keep_scale, 0.0)
    dy_rows = dy_ptr + offs_m[:, None].to(tl.int64) * stride_dym
    w_cols = w_ptr + offs_k[None, :] * stride_wk
    for n_start in range(0, N, BLOCK_N):
        offs_n = n_start + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        dy = tl.load(dy_rows + offs_n[None, :] * stride_dyn, mask=row_ok[:, None] & n_ok[None, :], other=0.0)
        w = tl.load(w_cols + offs_n[:, None] * stride_wn, mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        acc = _dot(dy, w, acc, DOT_F32, PRECISION)
    tl.store(
        dx_ptr + offs_m[:, None].to(tl.int64) * stride_dxm + offs_k[None, :] * stride_dxk,
        acc.to(dx_ptr.dtype.element_ty), mask=row_ok[:, None] & k_ok[None, :],
    )


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _block_r(rank: int) -> int:
    # tl.dot needs every dimension >= 16; ranks past the cap loop over rank chunks. The
    # interpreter's cap is lower so that the tests reach the chunk loop with small ranks.
    cap = 16 if INTERPRETED else 64
    return min(cap, max(16, triton.next_power_of_2(rank)))


# Tile edge of the rank-sized (memory-bound) kernels along M, N or K.
_RANK_BLOCK = 32 if INTERPRETED else 64


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _splits(m_tiles: int, programs: int, device: torch.device) -> tuple[int, int]:
    """How many slices of rows the reduction kernels split M into, and tiles per slice.

    Aims at two programs per SM (dB and dA have only N/BLOCK_N or K/BLOCK_K tiles of their
    own). The interpreter aims at two programs in all, so the tests exercise the split sum.
    """
    target = 2 if device.type != "cuda" else 2 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    splits = max(1, min(m_tiles, target // max(programs, 1)))
    per_split = _cdiv(m_tiles, splits)
    return _cdiv(m_tiles, per_split), per_split


def _flags(x: torch.Tensor) -> dict:
    """Constexpr flags that depend on dtype: fp32 honours torch's matmul precision setting."""
    fp32_ieee = x.dtype != torch.float32 or torch.get_float32_matmul_precision() == "highest"
    return {
        "DOT_F32": INTERPRETED and x.dtype == torch.bfloat16,
        "PRECISION": "ieee" if x.dtype == torch.float32 and fp32_ieee else "tf32",
    }


def _dropout_args(dropout_p: float, seed: int, K: int) -> dict:
    # Seeds are taken modulo 2**64 and passed as int64 (two's complement), which the kernel's
    # Philox reads back as the same 64 bits.
    seed &= 0xFFFFFFFFFFFFFFFF
    if seed >= 1 << 63:
        seed -= 1 << 64
    return {"seed": seed, "threshold": philox.threshold(dropout_p), "HAS_DROPOUT": dropout_p > 0.0,
            "K_ALIGNED": K % 8 == 0}


def _check_inputs(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, A: torch.Tensor,
                  B: torch.Tensor, dropout_p: float) -> None:
    """Raises a peftcore error naming what does not fit the op's shapes, dtypes or devices."""
    if triton is None:
        raise BackendUnavailableError(f"the triton backend of {OP} cannot run: {_TRITON_MISSING}")
    if x.dim() != 2:
        raise ConfigError(f"{OP} (triton): x must be 2-D (M, K) here, got shape {tuple(x.shape)}")
    M, K = x.shape
    N = weight.shape[0]
    if A.dim() != 2 or A.shape[0] == 0:
        raise ConfigError(f"{OP} (triton): A must be (r, K) with rank r >= 1, got shape {tuple(A.shape)}")
    shapes = {"weight": (weight, (N, K)), "A": (A, (A.shape[0], K)), "B": (B, (N, A.shape[0]))}
    if bias is not None:
        shapes["bias"] = (bias, (N,))
    for name, (tensor, expected) in shapes.items():
        if tuple(tensor.shape) != expected:
            raise ConfigError(
                f"{OP} (triton): {name} has shape {tuple(tensor.shape)}, expected {expected} for x of "
                f"shape {(M, K)}, weight (N, K), A (r, K), B (N, r), bias (N,)"
            )
    if x.dtype not in _SUPPORTED_DTYPES:
        raise ConfigError(f"{OP} (triton): dtype {x.dtype} is not supported; use float32, bfloat16 or float16")
    for name, tensor in [("weight", weight), ("A", A), ("B", B)] + ([("bias", bias)] if bias is not None else []):
        if tensor.dtype != x.dtype:
            raise ConfigError(
                f"{OP} (triton): {name} is {tensor.dtype} but x is {x.dtype}; cast the adapter and the "
                "input to one dtype (e.g. model.to(dtype))"
            )
        if tensor.device != x.device:
            raise ConfigError(f"{OP} (triton): {name} is on {tensor.device} but x is on {x.device}")
    if not 0.0 <= dropout_p < 1.0:
        raise ConfigError(f"{OP} (triton): dropout_p must be in [0, 1), got {dropout_p}")
    if x.device.type != "cuda" and not (INTERPRETED and x.device.type == "cpu"):
        raise BackendUnavailableError(
            f"the triton backend of {OP} runs on CUDA tensors (or on CPU tensors under TRITON_INTERPRET=1), "
            f"got {x.device.type} tensors"
        )


def lora_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    A: torch.Tensor,
    B: torch.Tensor,
    scale: float,
    dropout_p: float,
    seed: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Runs the forward kernels.

    Args:
        x: input, shape ``(M, K)``, any strides.
        weight: base weight, shape ``(N, K)``, any strides (a transposed view is not copied).
        bias: shape ``(N,)`` or ``None``.
        A: shape ``(r, K)``. B: shape ``(N, r)``.
        scale: low-rank multiplier. dropout_p: in ``[0, 1)``. seed: 64-bit dropout seed.

    Returns:
        ``(y, hs)``: ``y`` of shape ``(M, N)`` and ``hs = scale * dropout(x) A^T`` of shape
        ``(M, r)``, the only tensor the backward needs besides the inputs.

    Raises:
        ConfigError: shapes, dtypes or devices do not fit, or ``dropout_p`` is outside [0, 1).
        BackendUnavailableError: triton is missing or the tensors are not on a device it runs on.
    """
    _check_inputs(x, weight, bias, A, B, dropout_p)
    M, K = x.shape
    N, R = B.shape
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    hs = torch.empty((M, R), dtype=x.dtype, device=x.device)
    if M == 0 or N == 0:
        return y, hs
    flags = _flags(x)
    block_m, block_k, block_r = _RANK_BLOCK, _RANK_BLOCK, _block_r(R)
    _lora_fwd_h_kernel[(_cdiv(M, block_m), _cdiv(R, block_r))](
        x, A, hs, M, K, R,
        x.stride(0), x.stride(1), A.stride(0), A.stride(1), hs.stride(0), hs.stride(1),
        out_scale=scale / (1.0 - dropout_p), **_dropout_args(dropout_p, seed, K), **flags,
        BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_R=block_r, num_warps=4,
    )

    def grid(meta):
        return (_cdiv(M, meta["BLOCK_M"]) * _cdiv(N, meta["BLOCK_N"]),)

    _lora_fwd_kernel[grid](
        x, weight, bias if bias is not None else x, hs, B, y, M, N, K, R,
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), hs.stride(0), hs.stride(1),
        B.stride(0), B.stride(1), y.stride(0), y.stride(1),
        HAS_BIAS=bias is not None, BLOCK_R=block_r, **flags,
    )
    return y, hs


def lora_backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    hs: torch.Tensor,
    scale: float,
    dropout_p: float,
    seed: int,
    needs: tuple[bool, bool, bool, bool],
) -> tuple[torch.Tensor | None, ...]:
    """Runs the backward kernels for the gradients asked for.

    Args:
        dy: output gradient, shape ``(M, N)``, any strides (expanded gradients are not copied).
        x, weight, A, B: the forward's inputs. hs: the forward's ``(M, r)`` output.
        scale, dropout_p, seed: as in the forward (the mask is regenerated from the seed).
        needs: whether to compute ``(dx, dbias, dA, dB)``.

    Returns:
        ``(dx (M, K), dbias (N,), dA (r, K), dB (N, r))``, ``None`` where not needed.
    """
    need_x, need_bias, need_a, need_b = needs
    M, K = x.shape
    N, R = B.shape
    dx = torch.empty_like(x, memory_format=torch.contiguous_format) if need_x else None
    dbias = dA = dB = None
    if M == 0:  # nothing flowed through: the parameter gradients are zero
        zeros = functools.partial(torch.zeros, dtype=x.dtype, device=x.device)
        return dx, zeros(N) if need_bias else None, zeros(R, K) if need_a else None, zeros(N, R) if need_b else None
    flags = _flags(x)
    drop = _dropout_args(dropout_p, seed, K)
    keep_scale = 1.0 / (1.0 - dropout_p)
    block_r = _block_r(R)
    bm = _RANK_BLOCK
    m_tiles = _cdiv(M, bm)

    dh = None
    if need_x or need_a:
        dh = torch.empty((M, R), dtype=x.dtype, device=x.device)
        _lora_bwd_dh_kernel[(m_tiles, _cdiv(R, block_r))](
            dy, B, dh, M, N, R,
            dy.stride(0), dy.stride(1), B.stride(0), B.stride(1), dh.stride(0), dh.stride(1),
            scale, **flags, BLOCK_M=bm, BLOCK_N=_RANK_BLOCK, BLOCK_R=block_r, num_warps=4,
        )

    if need_b or need_bias:
        bn = _RANK_BLOCK
        r_tiles = _cdiv(R, block_r) if need_b else 1
        splits, per_split = _splits(m_tiles, _cdiv(N, bn) * r_tiles, x.device)
        f32 = functools.partial(torch.empty, dtype=torch.float32, device=x.device)
        dB_parts = f32((splits, N, R)) if need_b else hs
        dbias_parts = f32((splits, N)) if need_bias else hs
        _lora_bwd_db_kernel[(_cdiv(N, bn), r_tiles, splits)](
            dy, hs, dB_parts, dbias_parts, M, N, R, per_split * bm,
            dy.stride(0), dy.stride(1), hs.stride(0), hs.stride(1),
            HAS_DB=need_b, HAS_DBIAS=need_bias, **flags, BLOCK_M=bm, BLOCK_N=bn, BLOCK_R=block_r, num_warps=4,
        )
        dB = dB_parts.sum(0).to(B.dtype) if need_b else None
        dbias = dbias_parts.sum(0).to(x.dtype) if need_bias else None

    if need_a:
        bk = _RANK_BLOCK
        r_tiles = _cdiv(R, block_r)
        splits, per_split = _splits(m_tiles, _cdiv(K, bk) * r_tiles, x.device)
        dA_parts = torch.empty((splits, R, K), dtype=torch.float32, device=x.device)
        _lora_bwd_da_kernel[(_cdiv(K, bk), r_tiles, splits)](
            dh, x, dA_parts, M, K, R, per_split * bm,
            dh.stride(0), dh.stride(1), x.stride(0), x.stride(1),
            keep_scale=keep_scale, **drop, **flags, BLOCK_M=bm, BLOCK_K=bk, BLOCK_R=block_r, num_warps=4,
        )
        dA = dA_parts.sum(0).to(A.dtype)

    if need_x:
        def grid(meta):
            return (_cdiv(M, meta["BLOCK_M"]) * _cdiv(K, meta["BLOCK_K"]),)

        _lora_bwd_dx_kernel[grid](
            dy, weight, dh, A, dx, M, N, K, R,
            dy.stride(0), dy.stride(1), weight.stride(0), weight.stride(1),
            dh.stride(0), dh.stride(1), A.stride(0), A.stride(1), dx.stride(0), dx.stride(1),
            keep_scale=keep_scale, BLOCK_R=block_r, **drop, **flags,
        )
    return dx, dbias, dA, dB


# ---------------------------------------------------------------------------------------------
# Autograd
# ---------------------------------------------------------------------------------------------


class LoRALinearFunction(torch.autograd.Function):
    """Autograd of the Triton LoRA op; arguments as in :func:`peftcore.ops.lora.reference_lora_linear`.

    Saves the caller's ``x`` (not a copy or a reshaped view), ``hs`` (M, r) and the seed.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, A, B, scale, dropout_p, seed):
        lead = x.shape[:-1]
        y, hs = lora_forward(x.reshape(-1, x.shape[-1]), weight, bias, A, B, scale, dropout_p, seed)
        ctx.save_for_backward(x, weight, A, B, hs)
        ctx.scale, ctx.dropout_p, ctx.seed = scale, dropout_p, seed
        return y.view(*lead, y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        x, weight, A, B, hs = ctx.saved_tensors
        need_x, need_w, need_bias, need_a, need_b = ctx.needs_input_grad[:5]
        x2 = x.reshape(-1, x.shape[-1])
        dy2 = dy.reshape(-1, dy.shape[-1])
        dx, dbias, dA, dB = lora_backward(
            dy2, x2, weight, A, B, hs, ctx.scale, ctx.dropout_p, ctx.seed, (need_x, need_bias, need_a, need_b)
        )
        # Only when the caller trains the base weight too (peftcore freezes it): plain torch.
        dW = dy2.t().mm(x2) if need_w else None
        return (dx.view(x.shape) if dx is not None else None), dW, dbias, dA, dB, None, None, None


# ---------------------------------------------------------------------------------------------
# Dispatch
# ---------------------------------------------------------------------------------------------


class _TritonKernel:
    """The ``triton`` backend of ``lora_linear``: CUDA tensors, or CPU ones in the interpreter.

    Under ``TRITON_INTERPRET=1`` the kernels run in Triton's numpy interpreter, which is for
    tests: the backend then also accepts CPU tensors, but only when asked for by name (its
    priority drops below ``reference``, so ``auto`` never picks it).
    """

    op = OP
    backend = "triton"
    peftcore_api = 1
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
            build = f"torch {torch.__version__} is a CPU-only build" if torch.version.cuda is None else "torch sees none"
            return False, f"no CUDA device ({build}); the triton backend needs one (or TRITON_INTERPRET=1 for tests)"
        return True, ""

    def __call__(self, x, weight, bias, A, B, scale, dropout_p=0.0, seed=0) -> torch.Tensor:
        return LoRALinearFunction.apply(x, weight, bias, A, B, float(scale), float(dropout_p), int(seed))


TRITON = _TritonKernel()
