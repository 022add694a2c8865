// Autograd for fastmnist::conv_relu_bn and fastmnist::conv_relu_pool, one
// registration for every device (TORCH_LIBRARY_IMPL Autograd): each forward
// records a node whose backward calls the registered backward op.
//
// Registered in C++ rather than with torch.library.register_autograd in
// Python: the Python route costs 60-100 us of interpreter time per call
// (torch._library's argument filling and redispatch, the autograd.Function,
// setup_context and backward in Python), 0.5 ms of every training step of
// the default network's seven calls, while the other core waits. Fake
// tensors stay registered in Python (fastmnist/ops.py).
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using Tensor = at::Tensor;

// y = BN(ReLU(conv(x))): only y carries a gradient (relu_out, mean and var are
// what the backward reads). set_materialize_grads(false) keeps autograd from
// allocating and zero-filling a relu_out-sized gradient on every backward.
class ConvReluBn : public torch::autograd::Function<ConvReluBn> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const Tensor& weight, const Tensor& bias,
                               const Tensor& bn_weight, const Tensor& bn_bias, const Tensor& running_mean,
                               const Tensor& running_var, bool training, double eps, c10::IntArrayRef padding,
                               const std::optional<Tensor>& channel_scale) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("fastmnist::conv_relu_bn", "")
                         .typed<std::tuple<Tensor, Tensor, Tensor, Tensor>(
                             const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                             const Tensor&, bool, double, c10::IntArrayRef, const std::optional<Tensor>&)>();
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [y, relu_out, mean, var] = op.call(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, training,
                                            eps, padding, channel_scale);
    ctx->save_for_backward({x, weight, relu_out, bn_weight, mean, var, channel_scale.value_or(Tensor())});
    ctx->saved_data["training"] = training;
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["padding"] = padding.vec();
    ctx->mark_non_differentiable({relu_out, mean, var});
    ctx->set_materialize_grads(false);
    return {y, relu_out, mean, var};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list none(11);
    if (!grads[0].defined()) return none;  // y did not reach the loss
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("fastmnist::conv_relu_bn_backward", "")
                         .typed<std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>(
                             const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                             const Tensor&, bool, double, c10::IntArrayRef, bool, const std::optional<Tensor>&)>();
    const variable_list s = ctx->get_saved_variables();
    const bool need_x = ctx->needs_input_grad(0);
    const std::optional<Tensor> channel_scale = s[6].defined() ? std::optional<Tensor>(s[6]) : std::nullopt;
    auto [gx, gw, gb, gbw, gbb] =
        op.call(grads[0], s[0], s[1], s[2], s[3], s[4], s[5], ctx->saved_data["training"].toBool(),
                ctx->saved_data["eps"].toDouble(), ctx->saved_data["padding"].toIntVector(), need_x, channel_scale);
    // channel_scale is a constant (a dropout mask): no gradient flows to it.
    none[0] = need_x ? gx : Tensor();
    none[1] = gw, none[2] = gb, none[3] = gbw, none[4] = gbb;
    return none;
  }
};

// out = AvgPool(ReLU(conv(x))): only out carries a gradient.
class ConvReluPool : public torch::autograd::Function<ConvReluPool> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const Tensor& weight, const Tensor& bias,
                               bool relu, c10::IntArrayRef padding, int64_t pool) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("fastmnist::conv_relu_pool", "")
                         .typed<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, bool,
                                                           c10::IntArrayRef, int64_t)>();
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [out, relu_out] = op.call(x, weight, bias, relu, padding, pool);
    ctx->save_for_backward({x, weight, relu_out});
    ctx->saved_data["relu"] = relu;
    ctx->saved_data["padding"] = padding.vec();
    ctx->saved_data["pool"] = pool;
    ctx->mark_non_differentiable({relu_out});
    ctx->set_materialize_grads(false);
    return {out, relu_out};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list none(6);
    if (!grads[0].defined()) return none;
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("fastmnist::conv_relu_pool_backward", "")
                         .typed<std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                                                   const Tensor&, bool, c10::IntArrayRef, int64_t, bool)>();
    const variable_list s = ctx->get_saved_variables();
    const bool need_x = ctx->needs_input_grad(0);
    auto [gx, gw, gb] = op.call(grads[0], s[0], s[1], s[2], ctx->saved_data["relu"].toBool(),
                                ctx->saved_data["padding"].toIntVector(), ctx->saved_data["pool"].toInt(), need_x);
    none[0] = need_x ? gx : Tensor();
    none[1] = gw, none[2] = gb;
    return none;
  }
};

std::tuple<Tensor, Tensor, Tensor, Tensor> conv_relu_bn_autograd(
    const Tensor& x, const Tensor& weight, const Tensor& bias, const Tensor& bn_weight, const Tensor& bn_bias,
    const Tensor& running_mean, const Tensor& running_var, bool training, double eps, c10::IntArrayRef padding,
    const std::optional<Tensor>& channel_scale) {
  auto out = ConvReluBn::apply(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, training, eps, padding,
                               channel_scale);
  return {out[0], out[1], out[2], out[3]};
}

std::tuple<Tensor, Tensor> conv_relu_pool_autograd(const Tensor& x, const Tensor& weight, const Tensor& bias,
                                                   bool relu, c10::IntArrayRef padding, int64_t pool) {
  auto out = ConvReluPool::apply(x, weight, bias, relu, padding, pool);
  return {out[0], out[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastmnist, Autograd, m) {
  m.impl("conv_relu_bn", &conv_relu_bn_autograd);
  m.impl("conv_relu_pool", &conv_relu_pool_autograd);
}
