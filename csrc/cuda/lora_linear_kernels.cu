// Launchers of the low-rank CUDA kernels (contract in lora_linear_kernels.cuh, kernels in
// lora_linear_device.cuh), instantiated for float, double, half and bfloat16. No torch headers.
#include "lora_linear_kernels.cuh"

#include <algorithm>

namespace peftcore {
namespace cuda {
namespace {

using device::kThreads;
using device::kTile;

int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Grid dimensions y and z are limited to 65535 blocks.
constexpr int64_t kMaxGridYZ = 65535;

}  // namespace

template <typename T>
cudaError_t launch_dropout_project(StridedMatrix<T> x, StridedMatrix<T> A, T* h, int64_t M, int64_t K, int64_t r,
                                   DropoutSpec drop, cudaStream_t stream) {
  if (M == 0 || r == 0) return cudaSuccess;
  if (cdiv(r, kTile) > kMaxGridYZ) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>(cdiv(M, kTile)), static_cast<unsigned>(cdiv(r, kTile)));
  device::dropout_project_kernel<T><<<grid, kThreads, 0, stream>>>(x, A, h, M, K, r, drop);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_lowrank_grad_x(const typename AccType<T>::type* grad_h, StridedMatrix<T> A, T* grad_x,
                                  int64_t ld_grad_x, int64_t M, int64_t K, int64_t r, DropoutSpec drop,
                                  cudaStream_t stream) {
  if (M == 0 || K == 0 || r == 0) return cudaSuccess;
  if (cdiv(K, kTile) > kMaxGridYZ) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>(cdiv(M, kTile)), static_cast<unsigned>(cdiv(K, kTile)));
  device::lowrank_grad_x_kernel<T><<<grid, kThreads, 0, stream>>>(grad_h, A, grad_x, ld_grad_x, M, K, r, drop);
  return cudaGetLastError();
}

RowSplit grad_a_row_split(int64_t M, int64_t K, int64_t r, int device) {
  int sms = 0;
  if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess || sms <= 0) {
    cudaGetLastError();  // clear it: only this heuristic wanted the count
    sms = 64;
  }
  const int64_t m_tiles = std::max<int64_t>(1, cdiv(M, kTile));
  const int64_t blocks = std::max<int64_t>(1, cdiv(K, kTile) * cdiv(r, kTile));
  const int64_t wanted = std::min<int64_t>({std::max<int64_t>(1, 2 * sms / blocks), m_tiles, kMaxGridYZ});
  const int64_t tiles_per_split = cdiv(m_tiles, wanted);
  return {cdiv(m_tiles, tiles_per_split), tiles_per_split * kTile};
}

template <typename T>
cudaError_t launch_dropout_grad_a(const typename AccType<T>::type* grad_h, StridedMatrix<T> x,
                                  typename AccType<T>::type* partial, int64_t M, int64_t K, int64_t r, RowSplit split,
                                  DropoutSpec drop, cudaStream_t stream) {
  if (K == 0 || r == 0) return cudaSuccess;
  if (cdiv(r, kTile) > kMaxGridYZ || split.splits > kMaxGridYZ || split.rows_per_split % kTile != 0) {
    return cudaErrorInvalidValue;
  }
  const dim3 grid(static_cast<unsigned>(cdiv(K, kTile)), static_cast<unsigned>(cdiv(r, kTile)),
                  static_cast<unsigned>(split.splits));
  device::dropout_grad_a_kernel<T>
      <<<grid, kThreads, 0, stream>>>(grad_h, x, partial, M, K, r, split.rows_per_split, drop);
  return cudaGetLastError();
}

#define PEFTCORE_INSTANTIATE(T)                                                                                     \
  template cudaError_t launch_dropout_project<T>(StridedMatrix<T>, StridedMatrix<T>, T*, int64_t, int64_t, int64_t, \
                                                 DropoutSpec, cudaStream_t);                                         \
  template cudaError_t launch_lowrank_grad_x<T>(const AccType<T>::type*, StridedMatrix<T>, T*, int64_t, int64_t,    \
                                                int64_t, int64_t, DropoutSpec, cudaStream_t);                        \
  template cudaError_t launch_dropout_grad_a<T>(const AccType<T>::type*, StridedMatrix<T>, AccType<T>::type*,       \
                                                int64_t, int64_t, int64_t, RowSplit, DropoutSpec, cudaStream_t);

PEFTCORE_INSTANTIATE(float)
PEFTCORE_INSTANTIATE(double)
PEFTCORE_INSTANTIATE(__half)
PEFTCORE_INSTANTIATE(__nv_bfloat16)
#undef PEFTCORE_INSTANTIATE

}  // namespace cuda
}  // namespace peftcore
