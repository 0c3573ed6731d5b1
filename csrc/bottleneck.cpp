// The bottleneck adapter op on the CPU: y = r + scale * (act(x W_d^T + b_d) W_u^T + b_u), r = x
// unless a residual is given. Spec: peftcore/ops/bottleneck.py::reference_bottleneck; fake (meta)
// kernels and the autograd formula are registered from Python (peftcore/ops/bottleneck_cpp.py).
//
// The matmuls and activations are ATen's (MKL/oneDNN GEMMs, vectorised activation kernels); what
// this op adds is the order that spares passes and temporaries:
//   forward:  h = x W_d^T + b_d (one addmm), a = act(h) (M, r); y = r + scale b_u in one pass
//             that writes the output, then the up-projection GEMM accumulates scale a W_u^T into
//             it (beta = 1): no (M, N) temporary, no separate bias, scale and residual passes;
//   backward: grad_h = act'(h) * scale (grad_y W_u) and a = act(h) recomputed (never saved);
//             the identity path of grad_x is fused into its matmul (addmm).
// Autograd saves x, W_d, W_u and h (M, r): no activation and no (M, N) tensor.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
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

// act(h) and, for backward, grad * act'(h): ATen's own vectorised CPU kernels (the very functions
// the reference calls), so the activation costs what F.gelu costs and rounds as it does.
at::Tensor act_forward(Act act, const at::Tensor& h) {
  switch (act) {
    case Act::Relu:
      return at::relu(h);
    case Act::Gelu:
      return at::gelu(h);
    case Act::GeluTanh:
      return at::gelu(h, "tanh");
    case Act::Silu:
      return at::silu(h);
  }
  return h;
}

at::Tensor act_backward(Act act, const at::Tensor& grad, const at::Tensor& h) {
  switch (act) {
    case Act::Relu:
      return at::threshold_backward(grad, h, 0);
    case Act::Gelu:
      return at::gelu_backward(grad, h);
    case Act::GeluTanh:
      return at::gelu_backward(grad, h, "tanh");
    case Act::Silu:
      return at::silu_backward(grad, h);
  }
  return grad;
}

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
  const int64_t M = x.size(0), N = W_up.size(0);

  // h = x W_d^T + b_d as one GEMM with the bias (one rounding, as F.linear does: a separate bias
  // add would round twice in bf16 and can flip the sign of h near 0, i.e. relu's gradient).
  at::Tensor h = b_down.has_value() ? at::addmm(*b_down, x, W_down.t()) : at::mm(x, W_down.t());  // (M, R)
  const at::Tensor a = act_forward(act, h);  // (M, R), vectorised
  // y = (r + scale b_u) + scale a W_u^T: one vectorised pass writes y (residual and bias), then the
  // GEMM accumulates into it (beta = 1): no (M, N) temporary and no extra pass for the scale.
  const at::Tensor base = residual.has_value() ? *residual : x;
  at::Tensor y = at::empty({M, N}, x.options());
  if (b_up.has_value()) {
    at::add_out(y, base, *b_up, scale);
  } else {
    y.copy_(base);
  }
  y.addmm_(a, W_up.t(), 1.0, scale);
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

  // grad_h = act'(h) * (scale grad_y W_u) and a = act(h) (recomputed, never saved), both with
  // ATen's vectorised activation kernels.
  const at::Tensor grad_h = need_grad_h ? act_backward(act, at::mm(grad_y, W_up).mul_(scale), h) : at::Tensor();
  const at::Tensor a = need_a ? act_forward(act, h) : at::Tensor();

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
  // bottleneck with its autograd formula in C++ (csrc/autograd.cpp): returns y only; the eager
  // training path. Its backward calls bottleneck_backward below.
  m.def("bottleneck_autograd(Tensor x, Tensor W_down, Tensor? b_down, Tensor W_up, Tensor? b_up, float scale, "
        "str activation, Tensor? residual) -> Tensor");
  // Gradients (grad_x, grad_W_down, grad_b_down, grad_W_up, grad_b_up); an output whose
  // output_mask entry is false is returned as None. residual_is_x adds grad_y to grad_x.
  m.def("bottleneck_backward(Tensor grad_y, Tensor x, Tensor W_down, Tensor W_up, Tensor h, float scale, "
        "str activation, bool residual_is_x, bool[5] output_mask) -> (Tensor?, Tensor?, Tensor?, Tensor?, Tensor?)");
}

TORCH_LIBRARY_IMPL(peftcore, CPU, m) {
  m.impl("bottleneck", &peftcore::bottleneck_cpu);
  m.impl("bottleneck_backward", &peftcore::bottleneck_backward_cpu);
}
