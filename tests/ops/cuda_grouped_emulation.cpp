// Runs the CUDA kernels of csrc/cuda/lora_grouped_device.cuh on the CPU (one std::thread per CUDA
// thread, through tests/ops/cuda_emulation_launch.h as for lora_linear), in the order and with the
// arguments that csrc/cuda/lora_grouped.cu launches them; tests/ops/test_lora_grouped_cuda.py
// builds it and checks the results against the reference through ctypes. The base GEMMs (cuBLAS
// through ATen in the real op) are done by the test with torch.
#include <cstdint>
#include <vector>

#include "cuda_emulation_launch.h"

#include "../../csrc/cuda/lora_grouped_device.cuh"

namespace {

namespace dev = peftcore::cuda::device;
using peftcore::cuda::GroupedAdapters;
constexpr unsigned kThreads = dev::kGroupedThreads;

emu::Dim3 blocks(int64_t n) { return {static_cast<unsigned>((n + kThreads - 1) / kThreads), 1, 1}; }

template <typename T>
void forward(const T* x, const int64_t* index, const int64_t* A, const int64_t* B, const int64_t* rank,
             const T* scale, const uint32_t* thr, const T* keep, T* y, T* h, int64_t M, int64_t K, int64_t N,
             int64_t R, int64_t G, int dropout, uint64_t seed) {
  std::vector<T> ones(G, T(1));
  std::vector<T> acc_h(M * R);
  // h = dropout(x) A^T (scale 1; keep carries 1 / (1 - p)), then y += scale h B^T (no dropout).
  GroupedAdapters<T> shrink{A, rank, ones.data(), thr, keep};
  emu::launch(blocks(M * R), kThreads, [&] {
    dev::grouped_shrink_kernel<T, T>(x, index, shrink, true, dropout != 0, seed, acc_h.data(), M, K, R);
  });
  for (int64_t i = 0; i < M * R; ++i) h[i] = acc_h[i];
  GroupedAdapters<T> expand{B, rank, scale, thr, ones.data()};
  emu::launch(blocks(M * N), kThreads, [&] {
    dev::grouped_expand_kernel<T, T, T>(h, index, expand, false, false, seed, y, M, N, R);
  });
}

template <typename T>
void backward(const T* dy, const T* x, const T* h, const int64_t* index, const int64_t* rows, const int64_t* starts,
              const int64_t* A, const int64_t* B, const int64_t* gA, const int64_t* gB, const int64_t* rank,
              const T* scale, const uint32_t* thr, const T* keep, T* gx, int64_t M, int64_t K, int64_t N, int64_t R,
              int64_t G, int dropout, uint64_t seed) {
  std::vector<T> ones(G, T(1));
  std::vector<T> gh(M * R);
  GroupedAdapters<T> by_B{B, rank, scale, thr, ones.data()};  // gh = scale dy B
  emu::launch(blocks(M * R), kThreads, [&] {
    dev::grouped_shrink_kernel<T, T>(dy, index, by_B, false, false, seed, gh.data(), M, N, R);
  });
  GroupedAdapters<T> by_A{A, rank, ones.data(), thr, keep};  // gx += keep (gh A)
  emu::launch(blocks(M * K), kThreads, [&] {
    dev::grouped_expand_kernel<T, T, T>(gh.data(), index, by_A, true, dropout != 0, seed, gx, M, K, R);
  });
  emu::launch(blocks(G * R * K), kThreads, [&] {  // grad_A = gh^T dropout(x)
    dev::grouped_outer_kernel<T, T>(gh.data(), x, rows, starts, by_A, gA, true, dropout != 0, seed, G, K, R);
  });
  GroupedAdapters<T> outer_B{B, rank, scale, thr, ones.data()};  // grad_B = scale dy^T h
  emu::launch(blocks(G * R * N), kThreads, [&] {
    dev::grouped_outer_kernel<T, T>(h, dy, rows, starts, outer_B, gB, false, false, seed, G, N, R);
  });
}

}  // namespace

#define PEFTCORE_GROUPED_ENTRY_POINTS(T, SUFFIX)                                                                     \
  extern "C" void emu_grouped_forward_##SUFFIX(const T* x, const int64_t* index, const int64_t* A, const int64_t* B, \
                                                const int64_t* rank, const T* scale, const uint32_t* thr,            \
                                                const T* keep, T* y, T* h, int64_t M, int64_t K, int64_t N,          \
                                                int64_t R, int64_t G, int dropout, uint64_t seed) {                  \
    forward<T>(x, index, A, B, rank, scale, thr, keep, y, h, M, K, N, R, G, dropout, seed);                          \
  }                                                                                                                  \
  extern "C" void emu_grouped_backward_##SUFFIX(                                                                     \
      const T* dy, const T* x, const T* h, const int64_t* index, const int64_t* rows, const int64_t* starts,         \
      const int64_t* A, const int64_t* B, const int64_t* gA, const int64_t* gB, const int64_t* rank, const T* scale, \
      const uint32_t* thr, const T* keep, T* gx, int64_t M, int64_t K, int64_t N, int64_t R, int64_t G, int dropout, \
      uint64_t seed) {                                                                                               \
    backward<T>(dy, x, h, index, rows, starts, A, B, gA, gB, rank, scale, thr, keep, gx, M, K, N, R, G, dropout,     \
                seed);                                                                                               \
  }

PEFTCORE_GROUPED_ENTRY_POINTS(float, f32)
PEFTCORE_GROUPED_ENTRY_POINTS(double, f64)
