// Input checks shared by the CPU and CUDA entry points, so that the same bad
// input gets the same message on either device.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <vector>

namespace fastmnist {

// A stride-1 convolution of x (N, Cin, H, W) with weight (Cout, Cin, KH, KW) and zero padding of
// pad_h rows above and below and pad_w columns left and right (nn.Conv2d's padding=(pad_h, pad_w)).
struct ConvGeometry {
  int64_t n, cin, h, w, cout, kh, kw, pad_h, pad_w, hout, wout;
  int64_t pixels() const { return hout * wout; }  // output pixels per image
  int64_t patch() const { return kh * kw * cin; }  // K of the GEMM
  bool is_pointwise() const { return kh == 1 && kw == 1 && pad_h == 0 && pad_w == 0; }
};

inline void check_same(const char* op, const at::Tensor& t, const at::Tensor& x, const char* name) {
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " is on ", t.device(), " but x is on ", x.device(),
              "; move every argument to one device");
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), op, ": ", name, " has dtype ", t.scalar_type(),
              " but x has dtype ", x.scalar_type(), "; convert both to float32 or float64");
}

inline void check_channel_vector(const char* op, const at::Tensor& t, const at::Tensor& x, int64_t cout,
                                 const char* name) {
  check_same(op, t, x, name);
  TORCH_CHECK(t.dim() == 1 && t.size(0) == cout, op, ": ", name, " must have shape (", cout,
              ",) to match weight's output channels, got ", t.sizes());
}

// channel_scale, when given, must be (N, Cout) like x: one factor per image and output channel.
inline const at::Tensor* check_channel_scale(const char* op, const std::optional<at::Tensor>& channel_scale,
                                             const at::Tensor& x, int64_t n, int64_t cout) {
  if (!channel_scale.has_value()) return nullptr;
  const at::Tensor& t = *channel_scale;
  check_same(op, t, x, "channel_scale");
  TORCH_CHECK(t.dim() == 2 && t.size(0) == n && t.size(1) == cout, op, ": channel_scale must have shape (", n,
              ", ", cout, ") (batch, output channels), got ", t.sizes());
  return &t;
}

// padding is the schema's int[2]: (rows, columns), as nn.Conv2d's padding.
inline ConvGeometry check_conv_inputs(const char* op, const at::Tensor& x, const at::Tensor& weight,
                                      at::IntArrayRef padding) {
  TORCH_CHECK(x.dim() == 4, op, ": x must be 4-D (N, C, H, W), got shape ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, op,
              ": x must be float32 or float64, got ", x.scalar_type());
  check_same(op, weight, x, "weight");
  TORCH_CHECK(weight.dim() == 4, op, ": weight must be 4-D (Cout, Cin, KH, KW), got shape ", weight.sizes());
  TORCH_CHECK(weight.size(1) == x.size(1), op, ": x has ", x.size(1), " channels (shape ", x.sizes(),
              ") but weight expects ", weight.size(1), " (shape ", weight.sizes(), ")");
  TORCH_CHECK(weight.size(0) >= 1 && weight.size(2) >= 1 && weight.size(3) >= 1, op,
              ": weight must have at least one output channel and a kernel of at least 1x1, got shape ",
              weight.sizes());
  // An empty input (no channels, or no rows or columns) would reach a division by its size (the CUDA
  // launch shape) or an empty grid; the stock layers refuse most of these too.
  TORCH_CHECK(x.size(1) >= 1 && x.size(2) >= 1 && x.size(3) >= 1, op,
              ": x must have at least one channel, row and column, got shape ", x.sizes());
  TORCH_CHECK(padding.size() == 2, op, ": padding must be (rows, columns), got ", padding);
  TORCH_CHECK(padding[0] >= 0 && padding[1] >= 0, op, ": padding must be >= 0, got ", padding);
  ConvGeometry g{x.size(0), x.size(1), x.size(2), x.size(3), weight.size(0), weight.size(2),
                 weight.size(3), padding[0], padding[1], 0, 0};
  g.hout = g.h + 2 * g.pad_h - g.kh + 1;
  g.wout = g.w + 2 * g.pad_w - g.kw + 1;
  TORCH_CHECK(g.n >= 1, op, ": batch size must be >= 1, got shape ", x.sizes());
  TORCH_CHECK(g.hout >= 1 && g.wout >= 1, op, ": input ", x.sizes(), " with padding ", padding,
              " is smaller than the kernel ", weight.sizes());
  return g;
}

// An activation-shaped argument of a backward op (grad_y, relu_out, ...).
inline void check_activation(const char* op, const at::Tensor& t, const at::Tensor& x,
                             at::IntArrayRef expected, const char* name) {
  check_same(op, t, x, name);
  TORCH_CHECK(t.sizes() == expected, op, ": ", name, " has shape ", t.sizes(), ", expected ", expected);
}

// What the conv_relu_bn entry points of every device read from checked arguments.
struct ConvReluBnArgs {
  ConvGeometry g;
  const at::Tensor* channel_scale;  // nullptr when there is none
};

// Every check of conv_relu_bn's arguments (op names the op in the messages).
inline ConvReluBnArgs check_conv_relu_bn_args(const char* op, const at::Tensor& x, const at::Tensor& weight,
                                              const at::Tensor& bias, const at::Tensor& bn_weight,
                                              const at::Tensor& bn_bias, const at::Tensor& running_mean,
                                              const at::Tensor& running_var, bool training, at::IntArrayRef padding,
                                              const std::optional<at::Tensor>& channel_scale) {
  const ConvGeometry g = check_conv_inputs(op, x, weight, padding);
  const at::Tensor* scale = check_channel_scale(op, channel_scale, x, g.n, g.cout);
  check_channel_vector(op, bias, x, g.cout, "bias");
  check_channel_vector(op, bn_weight, x, g.cout, "bn_weight");
  check_channel_vector(op, bn_bias, x, g.cout, "bn_bias");
  check_channel_vector(op, running_mean, x, g.cout, "running_mean");
  check_channel_vector(op, running_var, x, g.cout, "running_var");
  TORCH_CHECK(!training || g.n * g.pixels() > 1, op, ": expected more than 1 value per channel when training, got output of ",
              g.n, "x", g.pixels(), " pixels per channel (input ", x.sizes(), ")");
  return {g, scale};
}

// Every check of conv_relu_bn_backward's arguments.
inline ConvReluBnArgs check_conv_relu_bn_backward_args(const char* op, const at::Tensor& grad_y, const at::Tensor& x,
                                                       const at::Tensor& weight, const at::Tensor& relu_out,
                                                       const at::Tensor& bn_weight, const at::Tensor& mean,
                                                       const at::Tensor& var, at::IntArrayRef padding,
                                                       const std::optional<at::Tensor>& channel_scale) {
  const ConvGeometry g = check_conv_inputs(op, x, weight, padding);
  const at::Tensor* scale = check_channel_scale(op, channel_scale, x, g.n, g.cout);
  const std::vector<int64_t> out_shape{g.n, g.cout, g.hout, g.wout};
  check_activation(op, grad_y, x, out_shape, "grad_y");
  check_activation(op, relu_out, x, out_shape, "relu_out");
  check_channel_vector(op, bn_weight, x, g.cout, "bn_weight");
  check_channel_vector(op, mean, x, g.cout, "mean");
  check_channel_vector(op, var, x, g.cout, "var");
  return {g, scale};
}

}  // namespace fastmnist
