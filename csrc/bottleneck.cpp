// The bottleneck adapter op on the CPU: y = r + scale * (act(x W_d^T + b_d) W_u^T + b_u), r = x
// unless a residual is given. Spec: peftcore/ops/bottleneck.py::reference_bottleneck; fake (meta)
// kernels and the autograd formula are registered from Python (peftcore/ops/bottleneck_cpp.py).
//
// The matmuls are ATen's (MKL/oneDNN); what this file adds is the elementwise work fused into one
// OpenMP pass each (at::parallel_for runs on OpenMP in torch's CPU builds):
//   forward:  a = act(h) in one pass over (M, r) (h = x W_d^T + b_d is one addmm); then
//             y = r + scale * (a W_u^T + b_u) in place over the matmul's output, one pass over (M, N)
//             (no separate bias, scale and residual passes);
//   backward: grad_h = scale * (grad_y W_u) * act'(h) and a = act(h) (recomputed, never saved) in one
//             pass over (M, r); the identity path of grad_x is fused into its matmul (addmm).
// Autograd saves x, W_d, W_u and h (M, r): no activation and no (M, N) tensor.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <string>
#include <tuple>

namespace peftcore {
namespace {

enum class Act { Relu, Gelu, GeluTanh, Silu };

Act parse_activation(c10::string_view name) {
  if (name == "relu") return Act::Relu;
  if (name == "gelu") return Act::Gelu;
  if (name == "gelu_tanh") return Act::GeluTanh;
  if (name == "silu") return Act::Silu;
  TORCH_CHECK(false, "peftcore::bottleneck: unknown activation '", std::string(name.data(), name.size()),
              "'; expected one of relu, gelu, gelu_tanh, silu");
}

constexpr double kSqrtHalf = 0.70710678118654752440;     // 1 / sqrt(2)
constexpr double kSqrt2OverPi = 0.79788456080286535588;  // sqrt(2 / pi)
constexpr double kInvSqrt2Pi = 0.39894228040143267794;   // 1 / sqrt(2 pi)
constexpr double kGeluCubic = 0.044715;

// act(h) and act'(h) in the op-math type (float for bf16/fp16/fp32, double for fp64), with the
// formulas of torch's relu / gelu / gelu(approximate="tanh") / silu and of their backward.
template <typename T>
inline T act_forward(Act act, T h) {
  switch (act) {
    case Act::Relu:
      return h > T(0) ? h : T(0);
    case Act::Gelu:
      return T(0.5) * h * (T(1) + std::erf(h * T(kSqrtHalf)));
    case Act::GeluTanh:
      return T(0.5) * h * (T(1) + std::tanh(T(kSqrt2OverPi) * (h + T(kGeluCubic) * h * h * h)));
    case Act::Silu:
      return h / (T(1) + std::exp(-h));
  }
  return h;
}

template <typename T>
inline T act_derivative(Act act, T h) {
  switch (act) {
    case Act::Relu:
      return h > T(0) ? T(1) : T(0);
    case Act::Gelu:
      return T(0.5) * (T(1) + std::erf(h * T(kSqrtHalf))) + h * T(kInvSqrt2Pi) * std::exp(T(-0.5) * h * h);
    case Act::GeluTanh: {
      const T t = std::tanh(T(kSqrt2OverPi) * (h + T(kGeluCubic) * h * h * h));
      return T(0.5) * (T(1) + t) +
             T(0.5) * h * (T(1) - t * t) * T(kSqrt2OverPi) * (T(1) + T(3 * kGeluCubic) * h * h);
    }
    case Act::Silu: {
      const T s = T(1) / (T(1) + std::exp(-h));
      return s * (T(1) + h * (T(1) - s));
    }
  }
  return T(1);
}

// Rows per OpenMP task: about 32k elements, so that scheduling costs stay negligible.
int64_t grain_rows(int64_t cols) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(cols, 1)); }

void check_same_dtype(const at::Tensor& x, const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), "peftcore::bottleneck: ", name, " has dtype ", t.scalar_type(),
              " but x has ", x.scalar_type(), "; every tensor must share x's dtype");
}

void check_inputs(const at::Tensor& x, const at::Tensor& W_down, const c10::optional<at::Tensor>& b_down,
                  const at::Tensor& W_up, const c10::optional<at::Tensor>& b_up,
                  const c10::optional<at::Tensor>& residual) {
  TORCH_CHECK(x.dim() == 2, "peftcore::bottleneck: x must be 2-D (M, K) (callers flatten leading dims), got ",
              x.sizes());
  TORCH_CHECK(W_down.dim() == 2 && W_up.dim() == 2,
              "peftcore::bottleneck: W_down (r, K) and W_up (N, r) must be 2-D, got ", W_down.sizes(), " and ",
              W_up.sizes());
  const int64_t K = x.size(1), R = W_down.size(0), N = W_up.size(0);
  TORCH_CHECK(W_down.size(1) == K, "peftcore::bottleneck: W_down ", W_down.sizes(), " does not fit x ", x.sizes());
  TORCH_CHECK(W_up.size(1) == R, "peftcore::bottleneck: W_up ", W_up.sizes(), " does not fit W_down ",
              W_down.sizes());
  TORCH_CHECK(!b_down.has_value() || (b_down->dim() == 1 && b_down->size(0) == R),
              "peftcore::bottleneck: b_down must have shape (", R, ")");
  TORCH_CHECK(!b_up.has_value() || (b_up->dim() == 1 && b_up->size(0) == N),
              "peftcore::bottleneck: b_up must have shape (", N, ")");
  if (residual.has_value()) {
    TORCH_CHECK(residual->dim() == 2 && residual->size(0) == x.size(0) && residual->size(1) == N,
                "peftcore::bottleneck: residual must have shape (", x.size(0), ", ", N, "), got ", residual->sizes());
    check_same_dtype(x, *residual, "residual");
  } else {
    TORCH_CHECK(N == K, "peftcore::bottleneck: without a residual, the output width N=", N,
                " must equal the input width K=", K);
  }
  check_same_dtype(x, W_down, "W_down");
  check_same_dtype(x, W_up, "W_up");
  if (b_down.has_value()) check_same_dtype(x, *b_down, "b_down");
  if (b_up.has_value()) check_same_dtype(x, *b_up, "b_up");
}

// Returns (y (M, N), h (M, r)); h = x W_d^T + b_d is what autograd saves.
std::tuple<at::Tensor, at::Tensor> bottleneck_cpu(const at::Tensor& x, const at::Tensor& W_down,
                                                  const c10::optional<at::Tensor>& b_down, const at::Tensor& W_up,
                                                  const c10::optional<at::Tensor>& b_up, double scale,
                                                  c10::string_view activation,
                                                  const c10::optional<at::Tensor>& residual) {
  check_inputs(x, W_down, b_down, W_up, b_up, residual);
  const Act act = parse_activation(activation);
  const int64_t M = x.size(0), R = W_down.size(0), N = W_up.size(0);

  // h = x W_d^T + b_d as one GEMM with the bias (one rounding, as F.linear does: a separate bias
  // add would round twice in bf16 and can flip the sign of h near 0, i.e. relu's gradient).
  at::Tensor h = b_down.has_value() ? at::addmm(*b_down, x, W_down.t()) : at::mm(x, W_down.t());  // (M, R)
  at::Tensor a = at::empty_like(h);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "peftcore_bottleneck_act", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const scalar_t* hp = h.const_data_ptr<scalar_t>();
    scalar_t* ap = a.data_ptr<scalar_t>();
    at::parallel_for(0, M, grain_rows(R), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        for (int64_t j = 0; j < R; ++j) {
          ap[i * R + j] = static_cast<scalar_t>(act_forward<opmath_t>(act, static_cast<opmath_t>(hp[i * R + j])));
        }
      }
    });
  });

  at::Tensor y = at::mm(a, W_up.t());  // (M, N), fresh and contiguous; becomes the output in place
  const at::Tensor base = residual.has_value() ? residual->contiguous() : x.contiguous();
  const at::Tensor bu = b_up.has_value() ? b_up->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "peftcore_bottleneck_residual", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    scalar_t* yp = y.data_ptr<scalar_t>();
    const scalar_t* rp = base.const_data_ptr<scalar_t>();
    const scalar_t* bp = bu.defined() ? bu.const_data_ptr<scalar_t>() : nullptr;
    const opmath_t s = static_cast<opmath_t>(scale);
    at::parallel_for(0, M, grain_rows(N), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        for (int64_t j = 0; j < N; ++j) {
          const opmath_t delta = static_cast<opmath_t>(yp[i * N + j]) + (bp ? static_cast<opmath_t>(bp[j]) : opmath_t(0));
          yp[i * N + j] = static_cast<scalar_t>(static_cast<opmath_t>(rp[i * N + j]) + s * delta);
        }
      }
    });
  });
  return {y, h};
}

// Gradients of bottleneck (the residual's gradient is grad_y itself, passed on in Python):
//   grad_h  = scale * (grad_y W_u) * act'(h)        (M, r)
//   grad_x  = grad_h W_d (+ grad_y when r = x)      (M, K)   [output_mask[0]]
//   grad_Wd = grad_h^T x                            (r, K)   [output_mask[1]]
//   grad_bd = sum_rows grad_h                       (r,)     [output_mask[2]]
//   grad_Wu = scale * grad_y^T act(h)               (N, r)   [output_mask[3]]
//   grad_bu = scale * sum_rows grad_y               (N,)     [output_mask[4]]
std::tuple<c10::optional<at::Tensor>, c10::optional<at::Tensor>, c10::optional<at::Tensor>,
           c10::optional<at::Tensor>, c10::optional<at::Tensor>>
bottleneck_backward_cpu(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& W_down,
                        const at::Tensor& W_up, const at::Tensor& h, double scale, c10::string_view activation,
                        bool residual_is_x, std::array<bool, 5> output_mask) {
  TORCH_CHECK(x.dim() == 2 && grad_y.dim() == 2 && h.dim() == 2, "peftcore::bottleneck_backward: expects 2-D tensors");
  const int64_t M = x.size(0), R = W_down.size(0), N = W_up.size(0);
  TORCH_CHECK(grad_y.size(0) == M && grad_y.size(1) == N, "peftcore::bottleneck_backward: grad_y must be (", M, ", ",
              N, "), got ", grad_y.sizes());
  TORCH_CHECK(h.size(0) == M && h.size(1) == R, "peftcore::bottleneck_backward: h must be (", M, ", ", R, "), got ",
              h.sizes());
  check_same_dtype(x, grad_y, "grad_y");
  check_same_dtype(x, h, "h");
  const Act act = parse_activation(activation);
  const bool need_grad_h = output_mask[0] || output_mask[1] || output_mask[2];
  const bool need_a = output_mask[3];

  at::Tensor grad_h;  // (M, R)
  at::Tensor a;       // (M, R)
  const at::Tensor hc = h.contiguous();
  if (need_grad_h || need_a) {
    grad_h = need_grad_h ? at::mm(grad_y, W_up) : at::Tensor();  // scale and act' applied below
    a = need_a ? at::empty_like(hc) : at::Tensor();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "peftcore_bottleneck_bwd_act", [&] {
      using opmath_t = at::opmath_type<scalar_t>;
      const scalar_t* hp = hc.const_data_ptr<scalar_t>();
      scalar_t* gp = grad_h.defined() ? grad_h.data_ptr<scalar_t>() : nullptr;
      scalar_t* ap = a.defined() ? a.data_ptr<scalar_t>() : nullptr;
      const opmath_t s = static_cast<opmath_t>(scale);
      at::parallel_for(0, M, grain_rows(R), [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
          for (int64_t j = 0; j < R; ++j) {
            const opmath_t hv = static_cast<opmath_t>(hp[i * R + j]);
            if (gp) {
              gp[i * R + j] = static_cast<scalar_t>(s * static_cast<opmath_t>(gp[i * R + j]) * act_derivative(act, hv));
            }
            if (ap) ap[i * R + j] = static_cast<scalar_t>(act_forward(act, hv));
          }
        }
      });
    });
  }

  c10::optional<at::Tensor> grad_x, grad_Wd, grad_bd, grad_Wu, grad_bu;
  if (output_mask[0]) grad_x = residual_is_x ? at::addmm(grad_y, grad_h, W_down) : at::mm(grad_h, W_down);
  if (output_mask[1]) grad_Wd = at::mm(grad_h.t(), x);
  if (output_mask[2]) grad_bd = grad_h.sum(0);
  if (output_mask[3]) grad_Wu = at::mm(grad_y.t(), a).mul_(scale);
  if (output_mask[4]) grad_bu = grad_y.sum(0).mul_(scale);
  return {grad_x, grad_Wd, grad_bd, grad_Wu, grad_bu};
}

}  // namespace
}  // namespace peftcore

TORCH_LIBRARY_FRAGMENT(peftcore, m) {
  // y = r + scale * (act(x W_d^T + b_d) W_u^T + b_u), r = residual or x; returns (y, h = x W_d^T + b_d).
  // x: (M, K); W_down: (r, K); b_down: (r,) or None; W_up: (N, r); b_up: (N,) or None;
  // residual: (M, N) or None (then N == K); activation: relu | gelu | gelu_tanh | silu.
  m.def("bottleneck(Tensor x, Tensor W_down, Tensor? b_down, Tensor W_up, Tensor? b_up, float scale, "
        "str activation, Tensor? residual) -> (Tensor, Tensor)");
  // Gradients (grad_x, grad_W_down, grad_b_down, grad_W_up, grad_b_up); an output whose
  // output_mask entry is false is returned as None. residual_is_x adds grad_y to grad_x.
  m.def("bottleneck_backward(Tensor grad_y, Tensor x, Tensor W_down, Tensor W_up, Tensor h, float scale, "
        "str activation, bool residual_is_x, bool[5] output_mask) -> (Tensor?, Tensor?, Tensor?, Tensor?, Tensor?)");
}

TORCH_LIBRARY_IMPL(peftcore, CPU, m) {
  m.impl("bottleneck", &peftcore::bottleneck_cpu);
  m.impl("bottleneck_backward", &peftcore::bottleneck_backward_cpu);
}
