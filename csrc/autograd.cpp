// Eager-mode autograd of the fused ops, in C++: peftcore::lora_linear_autograd and
// peftcore::bottleneck_autograd.
//
// The ops peftcore::lora_linear and peftcore::bottleneck get their autograd formulas from Python
// (register_autograd in peftcore/ops/lora_cpp.py and bottleneck_cpp.py), which torch.compile
// needs; in eager mode that Python layer cost about 0.1-0.3 ms per layer and step, forward plus
// backward, whatever the shapes. These ops run the same formulas as C++ autograd Functions: the
// same kernels, the same saved tensors (inputs as passed in, so layers sharing one input save it
// once; the rank-sized intermediate), and no Python in the backward. Registered as
// CompositeImplicitAutograd, so they serve every device the kernel ops have (CPU here, CUDA in a
// CUDA build). Python calls them from the cpp backends' eager training path; under
// torch.compile the registered ops are used instead.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/functions/basic_ops.h>
#include <torch/library.h>

#include <array>
#include <string>
#include <tuple>
#include <vector>

namespace peftcore {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

std::tuple<at::Tensor, at::Tensor> call_forward(const at::Tensor& x, const at::Tensor& weight,
                                                const c10::optional<at::Tensor>& bias, const at::Tensor& A,
                                                const at::Tensor& B, double scale, double dropout_p,
                                                const at::Tensor& seed) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("peftcore::lora_linear", "")
                             .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                        const c10::optional<at::Tensor>&, const at::Tensor&,
                                                                        const at::Tensor&, double, double, const at::Tensor&)>();
  return op.call(x, weight, bias, A, B, scale, dropout_p, seed);
}

std::tuple<c10::optional<at::Tensor>, c10::optional<at::Tensor>, c10::optional<at::Tensor>> call_backward(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& A, const at::Tensor& B,
    const at::Tensor& h, double scale, double dropout_p, const at::Tensor& seed, std::array<bool, 3> output_mask) {
  using Grads = std::tuple<c10::optional<at::Tensor>, c10::optional<at::Tensor>, c10::optional<at::Tensor>>;
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("peftcore::lora_linear_backward", "")
                             .typed<Grads(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                          const at::Tensor&, const at::Tensor&, double, double, const at::Tensor&,
                                          std::array<bool, 3>)>();
  return op.call(grad_y, x, weight, A, B, h, scale, dropout_p, seed, output_mask);
}

// Under create_graph=True: the gradients get a node that raises if they are ever differentiated,
// instead of silently acting as constants.
void mark_once_differentiable(variable_list& grads, const char* op) {
  variable_list leaves;
  std::vector<size_t> where;
  for (size_t i = 0; i < grads.size(); ++i) {
    if (!grads[i].defined()) continue;
    leaves.push_back(grads[i].detach().requires_grad_(true));
    where.push_back(i);
  }
  if (leaves.empty()) return;
  auto error = std::make_shared<torch::autograd::DelayedError>(
      std::string("peftcore::") + op + " is differentiable once: the gradients of its backward were asked for "
      "(create_graph=True, then a second differentiation); use backend='reference' for higher-order gradients",
      static_cast<int64_t>(leaves.size()));
  const variable_list wrapped = (*error)(std::move(leaves));
  for (size_t k = 0; k < where.size(); ++k) grads[where[k]] = wrapped[k];
}

// A backward the way Python's @once_differentiable runs one: no gradients for an undefined
// grad_y (materialize_grads is off), body(grad_y, out) under no_grad filling the n_inputs
// gradients, and under create_graph=True gradients that refuse a second differentiation.
template <typename Body>
variable_list once_differentiable(const variable_list& grads, size_t n_inputs, const char* op, Body&& body) {
  variable_list out(n_inputs);
  if (!grads[0].defined()) return out;
  const bool create_graph = at::GradMode::is_enabled();
  {
    at::NoGradGuard no_grad;
    body(grads[0], out);
  }
  if (create_graph) mark_once_differentiable(out, op);
  return out;
}

}  // namespace

// Named outside the anonymous namespace: autograd shows it as CppNode<peftcore::LoraLinearFunction>.
struct LoraLinearFunction : public torch::autograd::Function<LoraLinearFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                            const c10::optional<at::Tensor>& bias, const at::Tensor& A, const at::Tensor& B, double scale,
                            double dropout_p, const at::Tensor& seed) {
    at::Tensor y, h;
    {
      // Straight to the device kernel: lora_linear's own (Python) autograd kernel has nothing to do here.
      at::AutoDispatchBelowADInplaceOrView guard;
      std::tie(y, h) = call_forward(x, weight, bias, A, B, scale, dropout_p, seed);
    }
    ctx->set_materialize_grads(false);
    ctx->save_for_backward({x, weight, A, B, h, seed});
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["dropout_p"] = dropout_p;
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    return y;
  }

  // Gradients of x, weight, bias, A, B (undefined for scale, dropout_p and seed).
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    return once_differentiable(grads, 8, "lora_linear", [ctx](const at::Tensor& grad_y, variable_list& out) {
      const variable_list saved = ctx->get_saved_variables();
      const at::Tensor &x = saved[0], &weight = saved[1], &A = saved[2], &B = saved[3], &h = saved[4], &seed = saved[5];
      // needs_input_grad counts tensor inputs only: without a bias, A and B are inputs 2 and 3.
      const bool has_bias = ctx->saved_data["has_bias"].toBool();
      const int64_t a_input = has_bias ? 3 : 2;
      const bool need_x = ctx->needs_input_grad(0), need_w = ctx->needs_input_grad(1);
      const bool need_bias = has_bias && ctx->needs_input_grad(2);
      const bool need_A = ctx->needs_input_grad(a_input), need_B = ctx->needs_input_grad(a_input + 1);
      if (need_x || need_A || need_B) {
        auto [gx, gA, gB] = call_backward(grad_y, x, weight, A, B, h, ctx->saved_data["scale"].toDouble(),
                                          ctx->saved_data["dropout_p"].toDouble(), seed, {need_x, need_A, need_B});
        if (gx.has_value()) out[0] = *gx;
        if (gA.has_value()) out[3] = *gA;
        if (gB.has_value()) out[4] = *gB;
      }
      // The base weight is frozen under LoRA, so this weight-sized product normally never runs;
      // it is here so that a user who unfreezes the weight gets its gradient rather than none.
      if (need_w) out[1] = grad_y.t().mm(x);
      if (need_bias) out[2] = grad_y.sum(0);
    });
  }
};

namespace {

std::tuple<at::Tensor, at::Tensor> call_bottleneck(const at::Tensor& x, const at::Tensor& W_down,
                                                   const c10::optional<at::Tensor>& b_down, const at::Tensor& W_up,
                                                   const c10::optional<at::Tensor>& b_up, double scale,
                                                   c10::string_view activation, const c10::optional<at::Tensor>& residual) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("peftcore::bottleneck", "")
                             .typed<std::tuple<at::Tensor, at::Tensor>(
                                 const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&, const at::Tensor&,
                                 const c10::optional<at::Tensor>&, double, c10::string_view,
                                 const c10::optional<at::Tensor>&)>();
  return op.call(x, W_down, b_down, W_up, b_up, scale, activation, residual);
}

using BottleneckGrads = std::tuple<c10::optional<at::Tensor>, c10::optional<at::Tensor>, c10::optional<at::Tensor>,
                                   c10::optional<at::Tensor>, c10::optional<at::Tensor>>;

BottleneckGrads call_bottleneck_backward(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& W_down,
                                         const at::Tensor& W_up, const at::Tensor& h, double scale,
                                         c10::string_view activation, bool residual_is_x, std::array<bool, 5> mask) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("peftcore::bottleneck_backward", "")
                             .typed<BottleneckGrads(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                    const at::Tensor&, const at::Tensor&, double, c10::string_view,
                                                    bool, std::array<bool, 5>)>();
  return op.call(grad_y, x, W_down, W_up, h, scale, activation, residual_is_x, mask);
}

}  // namespace

struct BottleneckFunction : public torch::autograd::Function<BottleneckFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& W_down,
                            const c10::optional<at::Tensor>& b_down, const at::Tensor& W_up,
                            const c10::optional<at::Tensor>& b_up, double scale, c10::string_view activation,
                            const c10::optional<at::Tensor>& residual) {
    at::Tensor y, h;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      std::tie(y, h) = call_bottleneck(x, W_down, b_down, W_up, b_up, scale, activation, residual);
    }
    ctx->set_materialize_grads(false);
    ctx->save_for_backward({x, W_down, W_up, h});
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["activation"] = std::string(activation);
    ctx->saved_data["has_b_down"] = b_down.has_value() && b_down->defined();
    ctx->saved_data["has_b_up"] = b_up.has_value() && b_up->defined();
    ctx->saved_data["has_residual"] = residual.has_value() && residual->defined();
    return y;
  }

  // Gradients of x, W_down, b_down, W_up, b_up and residual (undefined for scale and activation).
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    return once_differentiable(grads, 8, "bottleneck", [ctx](const at::Tensor& grad_y, variable_list& out) {
      const variable_list saved = ctx->get_saved_variables();
      const bool has_b_down = ctx->saved_data["has_b_down"].toBool(), has_b_up = ctx->saved_data["has_b_up"].toBool();
      const bool has_residual = ctx->saved_data["has_residual"].toBool();
      // needs_input_grad counts tensor inputs only: absent biases and residual take no index.
      int64_t next = 2;
      const bool need_x = ctx->needs_input_grad(0), need_Wd = ctx->needs_input_grad(1);
      const bool need_bd = has_b_down && ctx->needs_input_grad(next++);
      const bool need_Wu = ctx->needs_input_grad(next++);
      const bool need_bu = has_b_up && ctx->needs_input_grad(next++);
      const bool need_residual = has_residual && ctx->needs_input_grad(next);
      const std::array<bool, 5> mask = {need_x, need_Wd, need_bd, need_Wu, need_bu};
      if (need_x || need_Wd || need_bd || need_Wu || need_bu) {
        auto grads5 = call_bottleneck_backward(grad_y.contiguous(), saved[0], saved[1], saved[2], saved[3],
                                               ctx->saved_data["scale"].toDouble(),
                                               ctx->saved_data["activation"].toStringRef(), !has_residual, mask);
        const std::array<c10::optional<at::Tensor>, 5> g = {std::get<0>(grads5), std::get<1>(grads5),
                                                            std::get<2>(grads5), std::get<3>(grads5),
                                                            std::get<4>(grads5)};
        for (size_t i = 0; i < 5; ++i) {
          if (mask[i] && g[i].has_value()) out[i] = *g[i];
        }
      }
      if (need_residual) out[7] = grad_y;
    });
  }
};

namespace {

at::Tensor bottleneck_autograd(const at::Tensor& x, const at::Tensor& W_down, const c10::optional<at::Tensor>& b_down,
                               const at::Tensor& W_up, const c10::optional<at::Tensor>& b_up, double scale,
                               c10::string_view activation, const c10::optional<at::Tensor>& residual) {
  return BottleneckFunction::apply(x, W_down, b_down, W_up, b_up, scale, activation, residual);
}

at::Tensor lora_linear_autograd(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                                const at::Tensor& A, const at::Tensor& B, double scale, double dropout_p,
                                const at::Tensor& seed) {
  return LoraLinearFunction::apply(x, weight, bias, A, B, scale, dropout_p, seed);
}

}  // namespace
}  // namespace peftcore

TORCH_LIBRARY_IMPL(peftcore, CompositeImplicitAutograd, m) {
  m.impl("lora_linear_autograd", &peftcore::lora_linear_autograd);
  m.impl("bottleneck_autograd", &peftcore::bottleneck_autograd);
}
