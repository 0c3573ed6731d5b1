// peftcore::lora_linear_autograd: lora_linear with its autograd in C++, for eager training.
//
// The op peftcore::lora_linear gets its autograd formula from Python (register_autograd in
// peftcore/ops/lora_cpp.py), which torch.compile needs; in eager mode that Python layer cost
// about 0.3 ms per layer and step, forward plus backward, whatever the shapes. This op runs the
// same formula as a C++ autograd Function: the same kernels, the same saved tensors (x as passed
// in, so q/k/v sharing one input save it once; weight, A, B; the rank-sized h; the seed), and no
// Python in the backward. Registered as CompositeImplicitAutograd, so it serves every device the
// two kernel ops have (CPU here, CUDA in a CUDA build). Python calls it from the cpp backend's
// eager path; under torch.compile the registered lora_linear is used instead.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/functions/basic_ops.h>
#include <torch/library.h>

#include <array>
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

// What Python's @once_differentiable does: under create_graph=True the gradients get a node that
// raises if they are ever differentiated, instead of silently acting as constants.
void mark_once_differentiable(variable_list& grads) {
  variable_list leaves;
  std::vector<size_t> where;
  for (size_t i = 0; i < grads.size(); ++i) {
    if (!grads[i].defined()) continue;
    leaves.push_back(grads[i].detach().requires_grad_(true));
    where.push_back(i);
  }
  if (leaves.empty()) return;
  auto error = std::make_shared<torch::autograd::DelayedError>(
      "peftcore::lora_linear is differentiable once: the gradients of its backward were asked for "
      "(create_graph=True, then a second differentiation); use backend='reference' for higher-order gradients",
      static_cast<int64_t>(leaves.size()));
  const variable_list wrapped = (*error)(std::move(leaves));
  for (size_t k = 0; k < where.size(); ++k) grads[where[k]] = wrapped[k];
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
    variable_list out(8);
    const at::Tensor& grad_y = grads[0];
    if (!grad_y.defined()) return out;
    const bool create_graph = at::GradMode::is_enabled();
    at::NoGradGuard no_grad;
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
    // The base weight is frozen under LoRA, so this weight-sized product normally never runs; it
    // is here so that a user who unfreezes the weight gets its gradient rather than none.
    if (need_w) out[1] = grad_y.t().mm(x);
    if (need_bias) out[2] = grad_y.sum(0);
    if (create_graph) {
      at::AutoGradMode grad_mode(true);
      mark_once_differentiable(out);
    }
    return out;
  }
};

namespace {

at::Tensor lora_linear_autograd(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                                const at::Tensor& A, const at::Tensor& B, double scale, double dropout_p,
                                const at::Tensor& seed) {
  return LoraLinearFunction::apply(x, weight, bias, A, B, scale, dropout_p, seed);
}

}  // namespace
}  // namespace peftcore

TORCH_LIBRARY_IMPL(peftcore, CompositeImplicitAutograd, m) {
  m.impl("lora_linear_autograd", &peftcore::lora_linear_autograd);
}
