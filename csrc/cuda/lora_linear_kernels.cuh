// Launchers of the CUDA kernels of peftcore::lora_linear's low-rank path (the kernels and the
// argument types are in lora_linear_device.cuh). They take raw pointers, sizes and a stream and
// include no torch header: lora_linear_kernels.cu compiles with the CUDA toolkit alone (CI
// compiles it with nvcc even where torch has no CUDA); lora_linear.cu, the torch-facing half,
// turns tensors into these arguments. Each returns the launch's cudaError_t.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "lora_linear_device.cuh"

namespace peftcore {
namespace cuda {

// h = dropout(x) A^T, written contiguous (M, r). x: (M, K), A: (r, K).
template <typename T>
cudaError_t launch_dropout_project(StridedMatrix<T> x, StridedMatrix<T> A, T* h, int64_t M, int64_t K, int64_t r,
                                   DropoutSpec drop, cudaStream_t stream);

// grad_x += keep * (1 / (1 - p)) * (grad_h A), in place. grad_h: contiguous (M, r) in the
// accumulation type; grad_x: (M, K) with unit column stride and row stride ld_grad_x.
template <typename T>
cudaError_t launch_lowrank_grad_x(const typename AccType<T>::type* grad_h, StridedMatrix<T> A, T* grad_x,
                                  int64_t ld_grad_x, int64_t M, int64_t K, int64_t r, DropoutSpec drop,
                                  cudaStream_t stream);

// How grad_A's reduction over M is split: `splits` slices of `rows_per_split` rows (a multiple
// of the 32-row tile), about two blocks per SM of `device` in all.
struct RowSplit {
  int64_t splits;
  int64_t rows_per_split;
};
RowSplit grad_a_row_split(int64_t M, int64_t K, int64_t r, int device);

// partial[s] = sum over the rows of slice s of grad_h^T dropout(x), (r, K) each, contiguous
// (splits, r, K) in the accumulation type; the caller sums over s (a fixed order, so the result
// does not depend on scheduling).
template <typename T>
cudaError_t launch_dropout_grad_a(const typename AccType<T>::type* grad_h, StridedMatrix<T> x,
                                  typename AccType<T>::type* partial, int64_t M, int64_t K, int64_t r, RowSplit split,
                                  DropoutSpec drop, cudaStream_t stream);

}  // namespace cuda
}  // namespace peftcore
