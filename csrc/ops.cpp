// The fastmnist operator library: every schema is defined here, once.
// Device kernels register against these names in csrc/cpu and csrc/cuda;
// autograd in csrc/autograd.cpp (Autograd key, every device); fake (meta)
// implementations are registered in fastmnist/ops.py.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// Importing fastmnist._C runs the static TORCH_LIBRARY initialisers below and
// in the kernel files; the module itself exposes no Python functions.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(fastmnist, m) {
  // y = BatchNorm2d(ReLU(Conv2d(x, weight, bias, stride=1, padding)))
  // padding is (rows, columns), as nn.Conv2d's; a single int means both (int[2]).
  // Returns (y, relu_out, mean, var). relu_out, mean and var are what the
  // backward needs: in training, mean and var are the batch statistics (var is
  // the biased variance, the one BN normalises with); in eval they are copies
  // of running_mean and running_var. The op is functional (autograd cannot be
  // registered on a mutating op); fastmnist.ops updates the running statistics
  // from its mean and var outputs.
  // channel_scale, when given, is an (N, Cout) tensor s that multiplies the
  // output: y[n, c] = s[n, c] * BN(...)[n, c]. Dropout2d is such a scale (0 or
  // 1 / (1 - p) per image and channel), so the block's dropout costs no pass
  // of its own.
  m.def(
      "conv_relu_bn(Tensor x, Tensor weight, Tensor bias, Tensor bn_weight, "
      "Tensor bn_bias, Tensor running_mean, Tensor running_var, "
      "bool training, float eps, int[2] padding, Tensor? channel_scale=None) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  // Gradients of conv_relu_bn's y with respect to (x, weight, bias, bn_weight,
  // bn_bias). grad_x is an empty tensor when compute_grad_x is false (the
  // first layer's input needs none). channel_scale is the forward's.
  m.def(
      "conv_relu_bn_backward(Tensor grad_y, Tensor x, Tensor weight, "
      "Tensor relu_out, Tensor bn_weight, Tensor mean, Tensor var, "
      "bool training, float eps, int[2] padding, bool compute_grad_x, "
      "Tensor? channel_scale=None) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // The path the kernels take for a convolution of x with weight: on the
  // CPU e.g. "avx2 tiles", "avx512 tiles, Cout 20 padded to 24" or
  // "im2col+BLAS: <why the tiles do not apply>". compute_grad_x: whether
  // the input gradient is asked for too. For tests and for users who want to
  // see that no block runs on the generic path unnoticed.
  // out = AvgPool2d(pool)(ReLU(Conv2d(x, weight, bias, stride=1, padding)))
  // with the ReLU only when relu is true: the network's transition (1x1 conv,
  // ReLU, AvgPool2d(2)) and head (1x1 conv, global average pooling) as one
  // op each. Returns (out, relu_out); relu_out is what the backward's ReLU
  // mask needs (an empty tensor without ReLU). Pooling is floor-mode with
  // stride = pool, as nn.AvgPool2d(pool).
  m.def(
      "conv_relu_pool(Tensor x, Tensor weight, Tensor bias, bool relu, int[2] padding, int pool) "
      "-> (Tensor, Tensor)");
  // Gradients of conv_relu_pool's out with respect to (x, weight, bias);
  // grad_x is an empty tensor when compute_grad_x is false.
  m.def(
      "conv_relu_pool_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor relu_out, bool relu, "
      "int[2] padding, int pool, bool compute_grad_x) -> (Tensor, Tensor, Tensor)");
  m.def("conv_path(Tensor x, Tensor weight, int[2] padding, bool compute_grad_x) -> str");
}
