// CUDA implementation of peftcore::lora_grouped and peftcore::lora_grouped_backward (schemas in
// csrc/lora_grouped.cpp; the autograd formula and fake kernels in peftcore/ops/lora_grouped_cpp.py
// apply to every device). The base GEMMs go to cuBLAS through ATen (y = b + x W^T, then the
// low-rank product added in place; grad_x = grad_y W, then the masked low-rank part added in
// place); the grouped parts are the kernels of lora_grouped_device.cuh, which read each
// adapter's factors through a device array of addresses, so adapters of different ranks need no
// stacking or padding. Launch order and arguments are those tests/ops/cuda_grouped_emulation.cpp
// runs on the CPU.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

#include "../philox.h"
#include "lora_grouped_device.cuh"

namespace peftcore {
namespace cuda {
namespace {

// at::Half/at::BFloat16 are layout-compatible with CUDA's types; the kernels use the CUDA ones.
template <typename T>
struct CudaType {
  using type = T;
};
template <>
struct CudaType<at::Half> {
  using type = __half;
};
template <>
struct CudaType<at::BFloat16> {
  using type = __nv_bfloat16;
};

unsigned blocks(int64_t n) {
  return static_cast<unsigned>((n + device::kGroupedThreads - 1) / device::kGroupedThreads);
}

// The per-adapter arrays on the device: factor addresses, ranks, scales, thresholds, 1 / (1 - p).
struct Arrays {
  at::Tensor rank, scale, ones, threshold, keep;
  bool dropout = false;
  uint64_t seed = 0;

  Arrays(at::TensorList A, at::ArrayRef<double> scales, at::ArrayRef<double> dropout_p, const at::Tensor& seed_t,
         at::ScalarType acc, const at::Device& dev) {
    const int64_t G = static_cast<int64_t>(A.size());
    TORCH_CHECK(static_cast<int64_t>(dropout_p.size()) == G, "lora_grouped: ", dropout_p.size(),
                " dropout probabilities for ", G, " adapters");
    std::vector<int64_t> ranks;
    std::vector<double> keep_v;
    std::vector<int32_t> thr;
    for (int64_t g = 0; g < G; ++g) {
      const double p = dropout_p[g];
      TORCH_CHECK(p >= 0.0 && p < 1.0, "lora_grouped: dropout_p must be in [0, 1), got ", p);
      ranks.push_back(A[g].size(0));
      keep_v.push_back(1.0 / (1.0 - p));
      thr.push_back(static_cast<int32_t>(philox::threshold(p)));
      dropout = dropout || p > 0.0;
    }
    if (dropout) seed = static_cast<uint64_t>(seed_t.item<int64_t>());  // a CPU tensor: no sync
    const auto cpu = at::TensorOptions().device(at::kCPU);
    rank = at::tensor(ranks, cpu.dtype(at::kLong)).to(dev);
    scale = at::tensor(std::vector<double>(scales.begin(), scales.end()), cpu.dtype(at::kDouble)).to(dev, acc);
    ones = at::ones({G}, at::TensorOptions().device(dev).dtype(acc));
    threshold = at::tensor(thr, cpu.dtype(at::kInt)).to(dev);
    keep = at::tensor(keep_v, cpu.dtype(at::kDouble)).to(dev, acc);
  }
};

at::Tensor addresses(const std::vector<at::Tensor>& ts, const at::Device& dev) {
  std::vector<int64_t> a;
  for (const auto& t : ts) a.push_back(reinterpret_cast<int64_t>(t.data_ptr()));
  return at::tensor(a, at::TensorOptions().dtype(at::kLong)).to(dev);
}

template <typename Acc>
GroupedAdapters<Acc> view(const at::Tensor& factors, const Arrays& arr, const at::Tensor& scale, const at::Tensor& keep) {
  return {factors.data_ptr<int64_t>(), arr.rank.data_ptr<int64_t>(), scale.data_ptr<Acc>(),
          reinterpret_cast<const uint32_t*>(arr.threshold.data_ptr<int32_t>()), keep.data_ptr<Acc>()};
}

std::vector<at::Tensor> contiguous(at::TensorList ts) {
  std::vector<at::Tensor> out;
  for (const auto& t : ts) out.push_back(t.contiguous());
  return out;
}

std::tuple<at::Tensor, at::Tensor> lora_grouped_cuda(const at::Tensor& x_in, const at::Tensor& weight,
                                                     const std::optional<at::Tensor>& bias, at::TensorList A_in,
                                                     at::TensorList B_in, at::ArrayRef<double> scales,
                                                     const at::Tensor& index_in, at::ArrayRef<double> dropout_p,
                                                     const at::Tensor& seed) {
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const at::Tensor index = index_in.to(at::kLong).contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0), G = static_cast<int64_t>(A_in.size());
  int64_t R = 0;
  for (const auto& a : A_in) R = std::max(R, a.size(0));
  TORCH_CHECK(B_in.size() == A_in.size() && scales.size() == A_in.size(), "lora_grouped: ", A_in.size(),
              " A factors, ", B_in.size(), " B factors and ", scales.size(), " scales; they must match");
  at::Tensor y = bias.has_value() && bias->defined() ? at::addmm(*bias, x, weight.t()) : at::mm(x, weight.t());
  y = y.contiguous();
  at::Tensor h = at::zeros({M, R}, x.options());
  if (G == 0 || R == 0 || M == 0) return {y, h};
  const auto A = contiguous(A_in), B = contiguous(B_in);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "peftcore_lora_grouped_cuda", [&] {
    using T = typename CudaType<scalar_t>::type;
    using Acc = at::opmath_type<scalar_t>;
    const auto acc_type = c10::CppTypeToScalarType<Acc>::value;
    const Arrays arr(A_in, scales, dropout_p, seed, acc_type, x.device());
    const at::Tensor A_addr = addresses(A, x.device()), B_addr = addresses(B, x.device());
    at::Tensor h_acc = at::empty({M, R}, x.options().dtype(acc_type));
    device::grouped_shrink_kernel<T, Acc><<<blocks(M * R), device::kGroupedThreads, 0, stream>>>(
        reinterpret_cast<const T*>(x.data_ptr<scalar_t>()), index.data_ptr<int64_t>(),
        view<Acc>(A_addr, arr, arr.ones, arr.keep), true, arr.dropout, arr.seed, h_acc.data_ptr<Acc>(), M, K, R);
    h.copy_(h_acc);
    device::grouped_expand_kernel<T, Acc, T><<<blocks(M * N), device::kGroupedThreads, 0, stream>>>(
        reinterpret_cast<const T*>(h.data_ptr<scalar_t>()), index.data_ptr<int64_t>(),
        view<Acc>(B_addr, arr, arr.scale, arr.ones), false, false, arr.seed,
        reinterpret_cast<T*>(y.data_ptr<scalar_t>()), M, N, R);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {y, h};
}

std::tuple<std::optional<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>> lora_grouped_backward_cuda(
    const at::Tensor& grad_y_in, const at::Tensor& x_in, const at::Tensor& weight, at::TensorList A_in,
    at::TensorList B_in, const at::Tensor& h_in, at::ArrayRef<double> scales, const at::Tensor& index_in,
    at::ArrayRef<double> dropout_p, const at::Tensor& seed, std::array<bool, 3> output_mask) {
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous(), grad_y = grad_y_in.contiguous(), h = h_in.contiguous();
  const at::Tensor index = index_in.to(at::kLong).contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0), G = static_cast<int64_t>(A_in.size());
  const int64_t R = h.size(1);
  const auto [want_x, want_A, want_B] = output_mask;
  const auto A = contiguous(A_in), B = contiguous(B_in);
  at::Tensor grad_x = want_x ? at::mm(grad_y, weight).contiguous() : at::Tensor();
  std::vector<at::Tensor> grad_A, grad_B;
  for (int64_t g = 0; g < G; ++g) {
    if (want_A) grad_A.push_back(at::empty_like(A[g]));
    if (want_B) grad_B.push_back(at::empty_like(B[g]));
  }
  if (G > 0 && R > 0 && M > 0) {
    const auto stream = c10::cuda::getCurrentCUDAStream();
    // Rows sorted by adapter (stable: a fixed summation order), base rows first.
    const at::Tensor rows = std::get<1>(index.sort(/*stable=*/true, /*dim=*/0, /*descending=*/false)).contiguous();
    const at::Tensor starts = at::cumsum(at::bincount(index + 1, {}, G + 1), 0).contiguous();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "peftcore_lora_grouped_bwd_cuda", [&] {
      using T = typename CudaType<scalar_t>::type;
      using Acc = at::opmath_type<scalar_t>;
      const auto acc_type = c10::CppTypeToScalarType<Acc>::value;
      const Arrays arr(A_in, scales, dropout_p, seed, acc_type, x.device());
      const at::Tensor A_addr = addresses(A, x.device()), B_addr = addresses(B, x.device());
      at::Tensor gh = at::empty({M, R}, x.options().dtype(acc_type));
      device::grouped_shrink_kernel<T, Acc><<<blocks(M * R), device::kGroupedThreads, 0, stream>>>(
          reinterpret_cast<const T*>(grad_y.data_ptr<scalar_t>()), index.data_ptr<int64_t>(),
          view<Acc>(B_addr, arr, arr.scale, arr.ones), false, false, arr.seed, gh.data_ptr<Acc>(), M, N, R);
      const auto by_A = view<Acc>(A_addr, arr, arr.ones, arr.keep);
      if (want_x)
        device::grouped_expand_kernel<T, Acc, Acc><<<blocks(M * K), device::kGroupedThreads, 0, stream>>>(
            gh.data_ptr<Acc>(), index.data_ptr<int64_t>(), by_A, true, arr.dropout, arr.seed,
            reinterpret_cast<T*>(grad_x.data_ptr<scalar_t>()), M, K, R);
      if (want_A)
        device::grouped_outer_kernel<T, Acc><<<blocks(G * R * K), device::kGroupedThreads, 0, stream>>>(
            gh.data_ptr<Acc>(), reinterpret_cast<const T*>(x.data_ptr<scalar_t>()), rows.data_ptr<int64_t>(),
            starts.data_ptr<int64_t>(), by_A, addresses(grad_A, x.device()).data_ptr<int64_t>(), true, arr.dropout,
            arr.seed, G, K, R);
      if (want_B) {
        const at::Tensor h_acc = h.to(acc_type);
        device::grouped_outer_kernel<T, Acc><<<blocks(G * R * N), device::kGroupedThreads, 0, stream>>>(
            h_acc.data_ptr<Acc>(), reinterpret_cast<const T*>(grad_y.data_ptr<scalar_t>()), rows.data_ptr<int64_t>(),
            starts.data_ptr<int64_t>(), view<Acc>(B_addr, arr, arr.scale, arr.ones),
            addresses(grad_B, x.device()).data_ptr<int64_t>(), false, false, arr.seed, G, N, R);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  std::optional<at::Tensor> gx;
  if (want_x) gx = grad_x;
  return {gx, grad_A, grad_B};
}

}  // namespace
}  // namespace cuda
}  // namespace peftcore

TORCH_LIBRARY_IMPL(peftcore, CUDA, m) {
  m.impl("lora_grouped", &peftcore::cuda::lora_grouped_cuda);
  m.impl("lora_grouped_backward", &peftcore::cuda::lora_grouped_backward_cuda);
}
