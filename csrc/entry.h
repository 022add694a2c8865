// The opening that every device's entry point of conv_relu_bn and conv_relu_bn_backward shares:
// the argument checks (checks.h), the inputs in the kernels' layout (channels_last activations,
// contiguous per-channel vectors) and the outputs allocated. Each device's kernel then fills the
// outputs; the same call gets the same messages, shapes and memory formats on every device.
#pragma once

#include <ATen/ATen.h>

#include "checks.h"

#include <optional>
#include <tuple>

namespace fastmnist {

inline at::Tensor empty_channels_last(const at::Tensor& like, int64_t n, int64_t c, int64_t h, int64_t w) {
  return at::empty({n, c, h, w}, like.options().memory_format(at::MemoryFormat::ChannelsLast));
}

// The contiguous channel scale's data, or nullptr when there is none.
template <typename scalar_t>
const scalar_t* data_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<scalar_t>() : nullptr;
}

struct ConvReluBnForwardCall {
  ConvGeometry g;
  at::Tensor x;                       // channels_last
  at::Tensor bias, gamma, beta;       // contiguous
  at::Tensor channel_scale;           // contiguous (N, Cout), or undefined
  at::Tensor y, relu_out, mean, var;  // the outputs; in eval, mean and var are the running statistics
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> outputs() const { return {y, relu_out, mean, var}; }
};

// Call it after an at::AutoDispatchBelowADInplaceOrView guard: the layout copies are our
// internals, not ops autograd should record (the registered backward owns the gradient).
inline ConvReluBnForwardCall begin_conv_relu_bn(const char* op, at::DeviceType device, const at::Tensor& x,
                                                const at::Tensor& weight, const at::Tensor& bias,
                                                const at::Tensor& bn_weight, const at::Tensor& bn_bias,
                                                const at::Tensor& running_mean, const at::Tensor& running_var,
                                                bool training, at::IntArrayRef padding,
                                                const std::optional<at::Tensor>& channel_scale) {
  const ConvReluBnArgs args = check_conv_relu_bn_args(op, x, weight, bias, bn_weight, bn_bias, running_mean,
                                                      running_var, training, padding, channel_scale);
  TORCH_INTERNAL_ASSERT(x.device().type() == device);
  const ConvGeometry& g = args.g;
  ConvReluBnForwardCall call{g};
  call.x = x.contiguous(at::MemoryFormat::ChannelsLast);
  call.bias = bias.contiguous();
  call.gamma = bn_weight.contiguous();
  call.beta = bn_bias.contiguous();
  if (args.channel_scale) call.channel_scale = args.channel_scale->contiguous();
  call.y = empty_channels_last(call.x, g.n, g.cout, g.hout, g.wout);
  call.relu_out = empty_channels_last(call.x, g.n, g.cout, g.hout, g.wout);
  call.mean = training ? at::empty({g.cout}, x.options()) : running_mean.clone(at::MemoryFormat::Contiguous);
  call.var = training ? at::empty({g.cout}, x.options()) : running_var.clone(at::MemoryFormat::Contiguous);
  return call;
}

struct ConvReluBnBackwardCall {
  ConvGeometry g;
  at::Tensor x, grad_y, relu_out;      // channels_last
  at::Tensor gamma, mean, var;         // contiguous
  at::Tensor channel_scale;            // contiguous (N, Cout), or undefined
  // The outputs: grad_x channels_last (an empty tensor unless compute_grad_x), grad_weight in the
  // weight's own memory format (so AccumulateGrad keeps it without a copy).
  at::Tensor grad_x, grad_weight, grad_bias, grad_gamma, grad_beta;
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> outputs() const {
    return {grad_x, grad_weight, grad_bias, grad_gamma, grad_beta};
  }
};

// As begin_conv_relu_bn, after an at::AutoDispatchBelowADInplaceOrView guard.
inline ConvReluBnBackwardCall begin_conv_relu_bn_backward(const char* op, at::DeviceType device,
                                                          const at::Tensor& grad_y, const at::Tensor& x,
                                                          const at::Tensor& weight, const at::Tensor& relu_out,
                                                          const at::Tensor& bn_weight, const at::Tensor& mean,
                                                          const at::Tensor& var, at::IntArrayRef padding,
                                                          bool compute_grad_x,
                                                          const std::optional<at::Tensor>& channel_scale) {
  const ConvReluBnArgs args =
      check_conv_relu_bn_backward_args(op, grad_y, x, weight, relu_out, bn_weight, mean, var, padding, channel_scale);
  TORCH_INTERNAL_ASSERT(x.device().type() == device);
  const ConvGeometry& g = args.g;
  const auto cl = at::MemoryFormat::ChannelsLast;
  ConvReluBnBackwardCall call{g};
  call.x = x.contiguous(cl);
  call.grad_y = grad_y.contiguous(cl);
  call.relu_out = relu_out.contiguous(cl);
  call.gamma = bn_weight.contiguous();
  call.mean = mean.contiguous();
  call.var = var.contiguous();
  if (args.channel_scale) call.channel_scale = args.channel_scale->contiguous();
  call.grad_x = compute_grad_x ? empty_channels_last(call.x, g.n, g.cin, g.h, g.w) : at::empty({0}, x.options());
  call.grad_weight = at::empty_like(weight);
  call.grad_bias = at::empty({g.cout}, x.options());
  call.grad_gamma = at::empty({g.cout}, x.options());
  call.grad_beta = at::empty({g.cout}, x.options());
  return call;
}

}  // namespace fastmnist
