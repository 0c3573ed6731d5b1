// The CUDA implementation of peftcore::lora_linear and peftcore::lora_linear_backward (schemas
// and contract: csrc/schemas.cpp; specification: peftcore/ops/lora.py::reference_lora_linear).
// Compiled only when torch has CUDA and a toolkit is found (setup.py). The fake kernels and the
// autograd formula are registered from Python (peftcore/ops/lora_cpp.py) and cover this device.
//
// Forward:  y = addmm(bias, x, W^T)                    cuBLAS via ATen; W^T is a view, never copied
//           h = dropout(x) A^T                         dropout_project_kernel: mask drawn in-kernel,
//                                                      dropout(x) never materialised
//           y += scale * h B^T                         addmm_ into y: no output-sized temporary
// Backward: grad_B = scale * grad_y^T h; grad_h = scale * grad_y B; grad_x = grad_y W   (cuBLAS)
//           grad_x += mask / (1 - p) * (grad_h A)      lowrank_grad_x_kernel, in place
//           grad_A = grad_h^T dropout(x)               dropout_grad_a_kernel, row-split partials
// Without dropout the low-rank parts are plain cuBLAS matmuls. The kernels are in
// lora_linear_kernels.cu / lora_linear_device.cuh, which include no torch header.
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <array>
#include <cstdint>
#include <tuple>
#include <type_traits>

#include "../philox.h"
#include "lora_linear_kernels.cuh"

namespace peftcore {
namespace {

void check_inputs(const char* op, const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                  const at::Tensor& A, const at::Tensor& B, double dropout_p, const at::Tensor& seed) {
  TORCH_CHECK(x.dim() == 2, op, ": x must be (M, K), got ", x.sizes());
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == x.size(1), op, ": weight must be (N, K) with K = ", x.size(1),
              ", got ", weight.sizes());
  TORCH_CHECK(A.dim() == 2 && A.size(1) == x.size(1), op, ": A must be (r, K) with K = ", x.size(1), ", got ",
              A.sizes());
  TORCH_CHECK(B.dim() == 2 && B.size(0) == weight.size(0) && B.size(1) == A.size(0), op, ": B must be (N, r) = (",
              weight.size(0), ", ", A.size(0), "), got ", B.sizes());
  std::array<const at::Tensor*, 4> tensors = {&x, &weight, &A, &B};
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0), op, ": bias must be (N,), got ", bias->sizes());
    TORCH_CHECK(bias->scalar_type() == x.scalar_type() && bias->device() == x.device(), op,
                ": bias must share x's dtype and device");
  }
  for (const at::Tensor* t : tensors) {
    TORCH_CHECK(t->is_cuda() && t->device() == x.device(), op, ": all tensors must be on x's CUDA device ",
                x.device(), ", got one on ", t->device());
    TORCH_CHECK(t->scalar_type() == x.scalar_type(), op, ": all tensors must share x's dtype ", x.scalar_type(),
                ", got ", t->scalar_type());
  }
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, op, ": dropout_p must be in [0, 1), got ", dropout_p);
  TORCH_CHECK(seed.numel() == 1 && seed.scalar_type() == at::kLong && seed.device().is_cpu(), op,
              ": seed must be a one-element int64 CPU tensor");
}

cuda::DropoutSpec dropout_spec(double p, const at::Tensor& seed) {
  if (p <= 0.0) return {false, 0, 0, 1.0};
  // The seed lives on the CPU (schema contract): reading it costs no device synchronisation.
  return {true, static_cast<uint64_t>(seed.item<int64_t>()), philox::threshold(p), 1.0 / (1.0 - p)};
}

template <typename T>
cuda::StridedMatrix<T> strided(const at::Tensor& t) {
  return {reinterpret_cast<const T*>(t.const_data_ptr()), t.stride(0), t.stride(1)};
}

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "peftcore::lora_linear (CUDA): ", what, " failed: ", cudaGetErrorString(err));
}

// Calls f with a null pointer of the CUDA element type matching `dtype` (the tag selects T).
template <typename F>
void dispatch_dtype(at::ScalarType dtype, const char* op, F&& f) {
  switch (dtype) {
    case at::kFloat: f(static_cast<float*>(nullptr)); break;
    case at::kDouble: f(static_cast<double*>(nullptr)); break;
    case at::kHalf: f(static_cast<__half*>(nullptr)); break;
    case at::kBFloat16: f(static_cast<__nv_bfloat16*>(nullptr)); break;
    default: TORCH_CHECK(false, op, ": unsupported dtype ", dtype, " (float32, float64, float16, bfloat16)");
  }
}

// h = dropout(x) A^T, (M, r) in x's dtype.
at::Tensor dropout_project(const at::Tensor& x, const at::Tensor& A, const cuda::DropoutSpec& drop) {
  const int64_t M = x.size(0), K = x.size(1), r = A.size(0);
  at::Tensor h = at::empty({M, r}, x.options());
  if (K == 0) return h.zero_();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_dtype(x.scalar_type(), "peftcore::lora_linear", [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    check_launch(cuda::launch_dropout_project<T>(strided<T>(x), strided<T>(A), reinterpret_cast<T*>(h.data_ptr()), M,
                                                 K, r, drop, stream),
                 "dropout_project_kernel");
  });
  return h;
}

// grad_A = grad_h^T dropout(x) (if want_A) and grad_x += mask / (1 - p) * (grad_h A) (if grad_x
// is defined), the mask regenerated from the seed.
at::Tensor dropout_backward(const at::Tensor& x, const at::Tensor& grad_h, const at::Tensor& A,
                            const cuda::DropoutSpec& drop, at::Tensor& grad_x, bool want_A) {
  const int64_t M = x.size(0), K = x.size(1), r = A.size(0);
  if (M == 0 || K == 0 || r == 0) return want_A ? at::zeros({r, K}, x.options()) : at::Tensor();
  const auto acc_dtype = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor gh = grad_h.to(acc_dtype).contiguous();  // (M, r): rank-sized
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor grad_A;
  dispatch_dtype(x.scalar_type(), "peftcore::lora_linear_backward", [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    using Acc = typename cuda::AccType<T>::type;
    const Acc* ghp = reinterpret_cast<const Acc*>(gh.const_data_ptr());
    if (grad_x.defined()) {
      TORCH_CHECK(grad_x.is_contiguous(), "peftcore::lora_linear_backward: internal: grad_x layout");
      check_launch(cuda::launch_lowrank_grad_x<T>(ghp, strided<T>(A), reinterpret_cast<T*>(grad_x.data_ptr()),
                                                  grad_x.stride(0), M, K, r, drop, stream),
                   "lowrank_grad_x_kernel");
    }
    if (want_A) {
      const cuda::RowSplit split = cuda::grad_a_row_split(M, K, r, x.get_device());
      at::Tensor partial = at::empty({split.splits, r, K}, x.options().dtype(acc_dtype));
      check_launch(cuda::launch_dropout_grad_a<T>(ghp, strided<T>(x), reinterpret_cast<Acc*>(partial.data_ptr()), M, K,
                                                  r, split, drop, stream),
                   "dropout_grad_a_kernel");
      grad_A = partial.sum(0).to(x.scalar_type());
    }
  });
  return grad_A;
}

std::tuple<at::Tensor, at::Tensor> lora_linear_cuda(const at::Tensor& x, const at::Tensor& weight,
                                                    const c10::optional<at::Tensor>& bias, const at::Tensor& A,
                                                    const at::Tensor& B, double scale, double dropout_p,
                                                    const at::Tensor& seed) {
  check_inputs("peftcore::lora_linear", x, weight, bias, A, B, dropout_p, seed);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y = (bias.has_value() && bias->defined()) ? at::addmm(*bias, x, weight.t()) : at::mm(x, weight.t());
  at::Tensor h = dropout_p > 0.0 ? dropout_project(x, A, dropout_spec(dropout_p, seed)) : at::mm(x, A.t());
  y.addmm_(h, B.t(), /*beta=*/1.0, /*alpha=*/scale);
  return {y, h};
}

std::tuple<c10::optional<at::Tensor>, c10::optional<at::Tensor>, c10::optional<at::Tensor>> lora_linear_backward_cuda(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& A, const at::Tensor& B,
    const at::Tensor& h, double scale, double dropout_p, const at::Tensor& seed, std::array<bool, 3> output_mask) {
  check_inputs("peftcore::lora_linear_backward", x, weight, c10::nullopt, A, B, dropout_p, seed);
  TORCH_CHECK(grad_y.dim() == 2 && grad_y.size(0) == x.size(0) && grad_y.size(1) == weight.size(0),
              "peftcore::lora_linear_backward: grad_y must be (M, N), got ", grad_y.sizes());
  TORCH_CHECK(h.dim() == 2 && h.size(0) == x.size(0) && h.size(1) == A.size(0),
              "peftcore::lora_linear_backward: h must be (M, r), got ", h.sizes());
  const c10::cuda::CUDAGuard guard(x.device());
  const bool want_x = output_mask[0], want_A = output_mask[1], want_B = output_mask[2];
  c10::optional<at::Tensor> grad_x, grad_A, grad_B;
  if (want_B) grad_B = at::mm(grad_y.t(), h).mul_(scale);  // (N, r)
  if (!want_x && !want_A) return {grad_x, grad_A, grad_B};
  const at::Tensor gh = at::mm(grad_y, B).mul_(scale);           // (M, r)
  at::Tensor gx = want_x ? at::mm(grad_y, weight) : at::Tensor();  // (M, K), contiguous
  if (dropout_p > 0.0) {
    at::Tensor gA = dropout_backward(x, gh, A, dropout_spec(dropout_p, seed), gx, want_A);
    if (want_A) grad_A = gA;
  } else {
    if (want_A) grad_A = at::mm(gh.t(), x);
    if (want_x) gx.addmm_(gh, A);
  }
  if (want_x) grad_x = gx;
  return {grad_x, grad_A, grad_B};
}

}  // namespace
}  // namespace peftcore

TORCH_LIBRARY_IMPL(peftcore, CUDA, m) {
  m.impl("lora_linear", &peftcore::lora_linear_cuda);
  m.impl("lora_linear_backward", &peftcore::lora_linear_backward_cuda);
}
