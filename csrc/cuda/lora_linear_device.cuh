// Device code of peftcore::lora_linear's low-rank path on CUDA: the argument types shared with
// the launchers (lora_linear_kernels.cuh), the in-kernel dropout mask and the three kernels:
//
//   dropout_project_kernel   h = dropout(x) A^T                      forward
//   lowrank_grad_x_kernel    grad_x += mask / (1 - p) * (grad_h A)    backward, in place
//   dropout_grad_a_kernel    grad_A = grad_h^T dropout(x)             backward, split over rows
//
// Base matmuls, the low-rank matmuls without dropout and grad_B go to cuBLAS through ATen (see
// lora_linear.cu); these kernels are what cuBLAS cannot do without materialising dropout(x) or
// the mask. Every kernel draws the mask itself with csrc/philox.h, the one Philox4x32-10 of
// peftcore/ops/philox.py (element offset o = m * K + k, block counter o >> 3, 16-bit draw = half
// o & 1 of output (o >> 1) & 3, keep iff draw >= threshold): it is never stored, and forward and
// backward regenerate the same bits as the CPU and Triton backends.
//
// Tiling: 32 x 32 tiles staged in shared memory (rows padded to 33: no bank conflicts), 256
// threads; each thread loads (and, where the output is x-shaped, owns) a "quad" of four
// consecutive columns of one row, so its four mask draws come from one Philox block (two when
// the quad crosses a multiple of 8 in offset). Accumulation is in float (double for double).
//
// This header includes neither torch nor the CUDA runtime: besides nvcc, the tests compile it as
// host C++ with one std::thread per CUDA thread (tests/ops/cuda_emulation.cpp) and check these
// very kernels against the reference where no GPU is present. Half and bfloat16 conversions are
// CUDA-only; the emulation covers float and double.
#pragma once

#include <cstdint>

#ifdef __CUDACC__
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

#include "../philox.h"

namespace peftcore {
namespace cuda {

// A 2-D operand read through its element strides (the op accepts non-contiguous x, A).
template <typename T>
struct StridedMatrix {
  const T* data;
  int64_t stride_row;
  int64_t stride_col;
};

// The dropout of the low-rank path's input.
struct DropoutSpec {
  bool enabled;        // false: p == 0, nothing dropped, no draws
  uint64_t seed;       // the 64-bit Philox key
  uint32_t threshold;  // floor(p * 2^16): drop iff the 16-bit draw < threshold
  double keep_scale;   // 1 / (1 - p), applied to kept elements (1 without dropout)
};

// Accumulation type: float for float, half and bfloat16; double for double.
template <typename T>
struct AccType {
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};

namespace device {

constexpr int kTile = 32;     // rows, ranks and columns of the shared-memory tiles
constexpr int kThreads = 256;  // threads per block
constexpr int kQuad = 4;       // consecutive columns one thread loads (one Philox block)
constexpr int kQuadsPerRow = kTile / kQuad;
static_assert(kTile * kTile == kThreads * kQuad, "each thread owns exactly one quad of a tile");

template <typename Acc, typename T>
__device__ __forceinline__ Acc to_acc(T v) {
  return static_cast<Acc>(v);
}
#ifdef __CUDACC__
template <>
__device__ __forceinline__ float to_acc<float, __half>(__half v) {
  return __half2float(v);
}
template <>
__device__ __forceinline__ float to_acc<float, __nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}
#endif

template <typename T, typename Acc>
__device__ __forceinline__ T from_acc(Acc v) {
  return static_cast<T>(v);
}
#ifdef __CUDACC__
template <>
__device__ __forceinline__ __half from_acc<__half, float>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16, float>(float v) {
  return __float2bfloat16_rn(v);
}
#endif

// Keep flags of elements (m, k), ..., (m, k + 3) of the (M, K) input: offset o = m * K + k + e,
// Philox block o >> 3, 16-bit draw = half o & 1 (low first) of output (o >> 1) & 3, kept iff
// draw >= threshold. Columns past K (a quad that sticks out of the last tile) get flags too;
// callers ignore them.
__device__ __forceinline__ void keep_quad(const DropoutSpec& drop, int64_t m, int64_t K, int64_t k, bool keep[kQuad]) {
  if (!drop.enabled) {
#pragma unroll
    for (int e = 0; e < kQuad; ++e) keep[e] = true;
    return;
  }
  const uint64_t first = static_cast<uint64_t>(m) * static_cast<uint64_t>(K) + static_cast<uint64_t>(k);
  uint32_t lo[4], hi[4] = {0u, 0u, 0u, 0u};
  philox::block(drop.seed, first >> 3, lo);
  const bool straddles = ((first + kQuad - 1) >> 3) != (first >> 3);  // the quad reaches into the next block
  if (straddles) philox::block(drop.seed, (first >> 3) + 1, hi);
#pragma unroll
  for (int e = 0; e < kQuad; ++e) {
    const uint64_t offset = first + e;
    const uint32_t draw = (offset >> 3) == (first >> 3) ? philox::draw16(lo, offset) : philox::draw16(hi, offset);
    keep[e] = draw >= drop.threshold;
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    dropout_project_kernel(StridedMatrix<T> x, StridedMatrix<T> A, T* h, int64_t M, int64_t K, int64_t r,
                           DropoutSpec drop) {
  using Acc = typename AccType<T>::type;
  __shared__ Acc xs[kTile][kTile + 1];  // dropped x: rows x columns
  __shared__ Acc as[kTile][kTile + 1];  // A: ranks x columns
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * kTile;
  const int t = threadIdx.x;
  const int slot_row = t / kQuadsPerRow, slot_col = (t % kQuadsPerRow) * kQuad;  // this thread's loads
  const int out_rank = t % kTile, out_row = t / kTile;  // outputs (out_row + 8 i, out_rank)
  constexpr int kOut = kTile * kTile / kThreads;
  Acc acc[kOut] = {};
  for (int64_t k0 = 0; k0 < K; k0 += kTile) {
    const int64_t m = m0 + slot_row, k = k0 + slot_col, j = r0 + slot_row;
    bool keep[kQuad];
    keep_quad(drop, m, K, k, keep);
#pragma unroll
    for (int e = 0; e < kQuad; ++e) {
      const bool in_k = k + e < K;
      xs[slot_row][slot_col + e] =
          (m < M && in_k && keep[e]) ? to_acc<Acc>(x.data[m * x.stride_row + (k + e) * x.stride_col]) : Acc(0);
      as[slot_row][slot_col + e] = (j < r && in_k) ? to_acc<Acc>(A.data[j * A.stride_row + (k + e) * A.stride_col]) : Acc(0);
    }
    __syncthreads();
#pragma unroll 8
    for (int kk = 0; kk < kTile; ++kk) {
      const Acc a = as[out_rank][kk];
#pragma unroll
      for (int i = 0; i < kOut; ++i) acc[i] += xs[out_row + i * (kThreads / kTile)][kk] * a;
    }
    __syncthreads();
  }
  const int64_t j = r0 + out_rank;
  const Acc scale = static_cast<Acc>(drop.keep_scale);
#pragma unroll
  for (int i = 0; i < kOut; ++i) {
    const int64_t m = m0 + out_row + i * (kThreads / kTile);
    if (m < M && j < r) h[m * r + j] = from_acc<T>(acc[i] * scale);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    lowrank_grad_x_kernel(const typename AccType<T>::type* grad_h, StridedMatrix<T> A, T* grad_x, int64_t ld_grad_x,
                          int64_t M, int64_t K, int64_t r, DropoutSpec drop) {
  using Acc = typename AccType<T>::type;
  __shared__ Acc ghs[kTile][kTile + 1];  // grad_h: rows x ranks
  __shared__ Acc as[kTile][kTile + 1];   // A: ranks x columns
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int64_t k0 = static_cast<int64_t>(blockIdx.y) * kTile;
  const int t = threadIdx.x;
  const int row = t / kQuadsPerRow, col = (t % kQuadsPerRow) * kQuad;  // load slot = output quad
  Acc acc[kQuad] = {};
  for (int64_t j0 = 0; j0 < r; j0 += kTile) {
#pragma unroll
    for (int e = 0; e < kQuad; ++e) {
      const int64_t m = m0 + row, j = j0 + col + e;
      ghs[row][col + e] = (m < M && j < r) ? grad_h[m * r + j] : Acc(0);
      const int64_t ja = j0 + row, k = k0 + col + e;
      as[row][col + e] = (ja < r && k < K) ? to_acc<Acc>(A.data[ja * A.stride_row + k * A.stride_col]) : Acc(0);
    }
    __syncthreads();
#pragma unroll 8
    for (int jj = 0; jj < kTile; ++jj) {
      const Acc g = ghs[row][jj];
#pragma unroll
      for (int e = 0; e < kQuad; ++e) acc[e] += g * as[jj][col + e];
    }
    __syncthreads();
  }
  const int64_t m = m0 + row, k = k0 + col;
  if (m >= M) return;
  bool keep[kQuad];
  keep_quad(drop, m, K, k, keep);
  const Acc scale = static_cast<Acc>(drop.keep_scale);
#pragma unroll
  for (int e = 0; e < kQuad; ++e) {
    if (k + e < K && keep[e]) {
      T* out = grad_x + m * ld_grad_x + k + e;
      *out = from_acc<T>(to_acc<Acc>(*out) + acc[e] * scale);
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    dropout_grad_a_kernel(const typename AccType<T>::type* grad_h, StridedMatrix<T> x, typename AccType<T>::type* partial,
                          int64_t M, int64_t K, int64_t r, int64_t rows_per_split, DropoutSpec drop) {
  using Acc = typename AccType<T>::type;
  __shared__ Acc xs[kTile][kTile + 1];   // dropped x: rows x columns
  __shared__ Acc ghs[kTile][kTile + 1];  // grad_h: rows x ranks
  const int64_t k0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int64_t j0 = static_cast<int64_t>(blockIdx.y) * kTile;
  const int64_t split = blockIdx.z;
  const int64_t m_begin = split * rows_per_split;
  const int64_t m_end = m_begin + rows_per_split < M ? m_begin + rows_per_split : M;
  const int t = threadIdx.x;
  const int row = t / kQuadsPerRow, col = (t % kQuadsPerRow) * kQuad;  // load slot; output (rank row, quad col)
  Acc acc[kQuad] = {};
  for (int64_t mt = m_begin; mt < m_end; mt += kTile) {
    const int64_t m = mt + row, k = k0 + col;
    bool keep[kQuad];
    keep_quad(drop, m, K, k, keep);
#pragma unroll
    for (int e = 0; e < kQuad; ++e) {
      xs[row][col + e] =
          (m < m_end && k + e < K && keep[e]) ? to_acc<Acc>(x.data[m * x.stride_row + (k + e) * x.stride_col]) : Acc(0);
      const int64_t j = j0 + col + e;
      ghs[row][col + e] = (m < m_end && j < r) ? grad_h[m * r + j] : Acc(0);
    }
    __syncthreads();
#pragma unroll 8
    for (int mm = 0; mm < kTile; ++mm) {
      const Acc g = ghs[mm][row];
#pragma unroll
      for (int e = 0; e < kQuad; ++e) acc[e] += g * xs[mm][col + e];
    }
    __syncthreads();
  }
  const int64_t j = j0 + row;
  if (j >= r) return;
  const Acc scale = static_cast<Acc>(drop.keep_scale);
#pragma unroll
  for (int e = 0; e < kQuad; ++e) {
    const int64_t k = k0 + col + e;
    if (k < K) partial[(split * r + j) * K + k] = acc[e] * scale;
  }
}

}  // namespace device
}  // namespace cuda
}  // namespace peftcore
