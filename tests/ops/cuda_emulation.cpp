// Runs the CUDA kernels of csrc/cuda/lora_linear_device.cuh on the CPU, for tests on machines
// without a GPU (tests/ops/test_lora_cuda.py builds this file into a shared library and calls it
// through ctypes with torch CPU tensors).
//
// Each CUDA block runs as 256 std::threads (tests/ops/cuda_emulation_launch.h). What this cannot
// show: half/bfloat16 conversions (CUDA-only), warp-level timing, and the launchers in
// lora_linear_kernels.cu (they only size the grid; nvcc compiles them in the same tests).
#include <cstdint>

#include "cuda_emulation_launch.h"

#include "../../csrc/cuda/lora_linear_device.cuh"

namespace {

using peftcore::cuda::DropoutSpec;
using peftcore::cuda::StridedMatrix;
namespace dev = peftcore::cuda::device;

unsigned cdiv(int64_t a, int64_t b) { return static_cast<unsigned>((a + b - 1) / b); }

DropoutSpec spec(int enabled, uint64_t seed, uint32_t threshold, double keep_scale) {
  return {enabled != 0, seed, threshold, keep_scale};
}

template <typename T>
void project(const T* x, int64_t sxm, int64_t sxk, const T* A, int64_t sar, int64_t sak, T* h, int64_t M, int64_t K,
             int64_t r, DropoutSpec drop) {
  emu::launch({cdiv(M, dev::kTile), cdiv(r, dev::kTile), 1}, dev::kThreads, [&] {
    dev::dropout_project_kernel<T>(StridedMatrix<T>{x, sxm, sxk}, StridedMatrix<T>{A, sar, sak}, h, M, K, r, drop);
  });
}

template <typename T>
void grad_x(const T* gh, const T* A, int64_t sar, int64_t sak, T* gx, int64_t ld, int64_t M, int64_t K, int64_t r,
            DropoutSpec drop) {
  emu::launch({cdiv(M, dev::kTile), cdiv(K, dev::kTile), 1}, dev::kThreads, [&] {
    dev::lowrank_grad_x_kernel<T>(gh, StridedMatrix<T>{A, sar, sak}, gx, ld, M, K, r, drop);
  });
}

template <typename T>
void grad_a(const T* gh, const T* x, int64_t sxm, int64_t sxk, T* partial, int64_t M, int64_t K, int64_t r,
            int64_t splits, int64_t rows_per_split, DropoutSpec drop) {
  emu::launch({cdiv(K, dev::kTile), cdiv(r, dev::kTile), static_cast<unsigned>(splits)}, dev::kThreads, [&] {
    dev::dropout_grad_a_kernel<T>(gh, StridedMatrix<T>{x, sxm, sxk}, partial, M, K, r, rows_per_split, drop);
  });
}

}  // namespace

// C entry points, one per kernel and accumulation-type dtype (f32: float, f64: double). Every
// tensor argument is a pointer to a CPU tensor's data; strides are in elements.
#define PEFTCORE_EMULATION_ENTRY_POINTS(T, SUFFIX)                                                                    \
  extern "C" void emu_dropout_project_##SUFFIX(const T* x, int64_t sxm, int64_t sxk, const T* A, int64_t sar,          \
                                                int64_t sak, T* h, int64_t M, int64_t K, int64_t r, int enabled,       \
                                                uint64_t seed, uint32_t threshold, double keep_scale) {                \
    project<T>(x, sxm, sxk, A, sar, sak, h, M, K, r, spec(enabled, seed, threshold, keep_scale));                      \
  }                                                                                                                    \
  extern "C" void emu_lowrank_grad_x_##SUFFIX(const T* gh, const T* A, int64_t sar, int64_t sak, T* gx, int64_t ld,    \
                                               int64_t M, int64_t K, int64_t r, int enabled, uint64_t seed,            \
                                               uint32_t threshold, double keep_scale) {                                \
    grad_x<T>(gh, A, sar, sak, gx, ld, M, K, r, spec(enabled, seed, threshold, keep_scale));                           \
  }                                                                                                                    \
  extern "C" void emu_dropout_grad_a_##SUFFIX(const T* gh, const T* x, int64_t sxm, int64_t sxk, T* partial,           \
                                               int64_t M, int64_t K, int64_t r, int64_t splits,                        \
                                               int64_t rows_per_split, int enabled, uint64_t seed, uint32_t threshold, \
                                               double keep_scale) {                                                    \
    grad_a<T>(gh, x, sxm, sxk, partial, M, K, r, splits, rows_per_split, spec(enabled, seed, threshold, keep_scale));  \
  }

PEFTCORE_EMULATION_ENTRY_POINTS(float, f32)
PEFTCORE_EMULATION_ENTRY_POINTS(double, f64)
