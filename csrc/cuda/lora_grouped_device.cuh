// Device code of peftcore::lora_grouped on CUDA (spec: peftcore/ops/lora_grouped.py): three
// kernels over per-adapter factor pointers, each row reading its adapter from the index.
//
//   grouped_shrink_kernel   out[m, j] = scale_g * sum_c keep_g(m, c) in[m, c] F_g(j, c)   h (fwd), gh (bwd)
//   grouped_expand_kernel   out[m, c] += keep_g(m, c) * scale_g * sum_j h[m, j] F_g(j, c)  y (fwd), grad_x (bwd)
//   grouped_outer_kernel    G_g(j, c) = scale_g * sum_{m of g} L[m, j] keep_g(m, c) R[m, c]  grad_A, grad_B
//
// where keep_g includes 1 / (1 - p_g) and is the Philox mask of lora_linear (offset m * C + c).
// One thread per output element, no shared memory: a first, correct version (not tuned; no GPU
// where it was written). The base GEMMs go to cuBLAS through ATen (lora_grouped.cu).
// F_g(j, c) is factor g's element at j * ld_j + c * ld_c; with `rank_major` false the factor is
// read transposed with its own rank as the row stride (B_g, (N, r_g), read as (r_g, N)).
//
// Like lora_linear_device.cuh this header includes neither torch nor the CUDA runtime, so the
// tests run these very kernels on the CPU (tests/ops/cuda_grouped_emulation.cpp).
#pragma once

#include <cstdint>

#include "../philox.h"
#include "lora_linear_device.cuh"

namespace peftcore {
namespace cuda {

// Per-adapter arrays (device memory on the GPU), G entries each.
template <typename Acc>
struct GroupedAdapters {
  const int64_t* factor;      // addresses of the factors (A_g or B_g), as integers
  const int64_t* rank;        // r_g
  const Acc* scale;           // scale_g (or 1)
  const uint32_t* threshold;  // floor(p_g * 2^16); 0: keep all
  const Acc* keep_scale;      // 1 / (1 - p_g) (or 1)
};

namespace device {

constexpr int kGroupedThreads = 256;

template <typename T>
__device__ __forceinline__ const T* factor_of(const int64_t* factor, int64_t g) {
  return reinterpret_cast<const T*>(static_cast<uintptr_t>(factor[g]));
}

// keep_scale_g if element (m, c) of an (., C) operand is kept, else 0.
template <typename Acc>
__device__ __forceinline__ Acc keep(bool dropout, uint64_t seed, uint32_t threshold, Acc keep_scale, int64_t m,
                                    int64_t c, int64_t C) {
  if (!dropout || threshold == 0) return Acc(1);
  const uint64_t o = static_cast<uint64_t>(m) * static_cast<uint64_t>(C) + static_cast<uint64_t>(c);
  uint32_t out[4];
  philox::block(seed, o >> 3, out);
  return philox::draw16(out, o) >= threshold ? keep_scale : Acc(0);
}

// F_g(j, c): rank-major (A_g: (r, C), row stride C) or transposed (B_g: (C, r), row stride r).
template <typename T>
__device__ __forceinline__ T factor_at(const T* f, bool rank_major, int64_t r, int64_t C, int64_t j, int64_t c) {
  return rank_major ? f[j * C + c] : f[c * r + j];
}

template <typename T, typename Acc>
__global__ void grouped_shrink_kernel(const T* in, const int64_t* index, GroupedAdapters<Acc> ad, bool rank_major,
                                      bool dropout, uint64_t seed, Acc* out, int64_t M, int64_t C, int64_t R) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * kGroupedThreads + threadIdx.x;
  if (e >= M * R) return;
  const int64_t m = e / R, j = e % R;
  const int64_t g = index[m];
  Acc acc = Acc(0);
  if (g >= 0 && j < ad.rank[g]) {
    const T* f = factor_of<T>(ad.factor, g);
    const int64_t r = ad.rank[g];
    for (int64_t c = 0; c < C; ++c) {
      const Acc k = keep<Acc>(dropout, seed, ad.threshold[g], ad.keep_scale[g], m, c, C);
      acc += k * static_cast<Acc>(in[m * C + c]) * static_cast<Acc>(factor_at(f, rank_major, r, C, j, c));
    }
    acc *= ad.scale[g];
  }
  out[m * R + j] = acc;  // zero beyond the row's rank and for base rows
}

template <typename T, typename Acc, typename H>
__global__ void grouped_expand_kernel(const H* h, const int64_t* index, GroupedAdapters<Acc> ad, bool rank_major,
                                      bool dropout, uint64_t seed, T* out, int64_t M, int64_t C, int64_t R) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * kGroupedThreads + threadIdx.x;
  if (e >= M * C) return;
  const int64_t m = e / C, c = e % C;
  const int64_t g = index[m];
  if (g < 0) return;  // base rows: the base GEMM's output as it is
  const T* f = factor_of<T>(ad.factor, g);
  const int64_t r = ad.rank[g];
  Acc acc = Acc(0);
  for (int64_t j = 0; j < r; ++j) acc += static_cast<Acc>(h[m * R + j]) * static_cast<Acc>(factor_at(f, rank_major, r, C, j, c));
  acc *= ad.scale[g] * keep<Acc>(dropout, seed, ad.threshold[g], ad.keep_scale[g], m, c, C);
  out[m * C + c] = static_cast<T>(static_cast<Acc>(out[m * C + c]) + acc);
}

// grad_g(j, c) for every adapter g (rows of g at rows[starts[g] .. starts[g + 1])), written to
// out_g = factor address g (rank-major (r_g, C), or transposed (C, r_g)). L is (M, R) in Acc.
template <typename T, typename Acc>
__global__ void grouped_outer_kernel(const Acc* L, const T* Rm, const int64_t* rows, const int64_t* starts,
                                     GroupedAdapters<Acc> ad, const int64_t* out_factor, bool rank_major, bool dropout,
                                     uint64_t seed, int64_t G, int64_t C, int64_t R) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * kGroupedThreads + threadIdx.x;
  if (e >= G * R * C) return;
  const int64_t g = e / (R * C), j = (e / C) % R, c = e % C;
  const int64_t r = ad.rank[g];
  if (j >= r) return;
  Acc acc = Acc(0);
  for (int64_t i = starts[g]; i < starts[g + 1]; ++i) {  // a fixed order: deterministic
    const int64_t m = rows[i];
    const Acc k = keep<Acc>(dropout, seed, ad.threshold[g], ad.keep_scale[g], m, c, C);
    acc += L[m * R + j] * k * static_cast<Acc>(Rm[m * C + c]);
  }
  T* out = const_cast<T*>(factor_of<T>(out_factor, g));
  out[rank_major ? j * C + c : c * r + j] = static_cast<T>(acc * ad.scale[g]);
}

}  // namespace device
}  // namespace cuda
}  // namespace peftcore
