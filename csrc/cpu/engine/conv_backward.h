// The backward's chunk driver, shared by the CPU ops: each op supplies how to turn its upstream
// gradient into dz, the gradient at the convolution's output (conv_relu_bn: the BN and ReLU
// gradient; conv_relu_pool: the pooling and ReLU gradient); this file does the rest, chunk by
// chunk of images while dz is in cache:
//   grad_bias[co] = sum_p dz[p, co],  grad_wmat[co, k] = sum_p dz[p, co] patch(p)[k],
//   grad_x = the transposed convolution of dz (ConvProducts).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include "conv_products.h"

#include <vector>

namespace fastmnist_cpu {

// make_dz(first, count, dz, grad_bias) writes dz for images [first, first + count) ((count * P, Cout),
// NHWC) and adds each channel's sum of it into grad_bias (Cout doubles, the thread's partials).
// x is the forward's input (channels_last); grad_x (channels_last) is written only when compute_grad_x.
template <typename scalar_t, typename MakeDz>
void conv_backward_chunks(const ConvGeometry& g, const at::Tensor& x, const at::Tensor& weight, bool compute_grad_x,
                          const MakeDz& make_dz, at::Tensor& grad_x, at::Tensor& grad_weight, at::Tensor& grad_bias) {
  const int64_t P = g.pixels(), K = g.patch(), C = g.cout;
  const int threads = at::get_num_threads();
  ConvProducts<scalar_t> conv(g, weight, x.options(), threads, compute_grad_x);
  // The weight gradient is summed in scalar_t over a chunk (im2col) or up to
  // kImagesPerFlush images of a thread (tiles), then across those in double:
  // a float running sum over the whole batch would lose digits to cancellation.
  std::vector<double> grad_w_acc(threads * C * K, 0.0), grad_b_acc(threads * C, 0.0);
  std::vector<std::vector<scalar_t>> dz_buffers(threads);
  const scalar_t* x_ptr = x.const_data_ptr<scalar_t>();
  scalar_t* dx = compute_grad_x ? grad_x.mutable_data_ptr<scalar_t>() : nullptr;
  for_each_chunk(g, conv.chunk(), [&](int64_t first, int64_t count, int thread) {
    auto& dz = dz_buffers[thread];
    dz.resize(count * P * C);
    make_dz(first, count, dz.data(), grad_b_acc.data() + thread * C);
    conv.weight_grad(x_ptr, dz.data(), first, count, thread, grad_w_acc.data() + thread * C * K);
    if (compute_grad_x) conv.input_grad(dz.data(), first, count, thread, dx + first * g.h * g.w * g.cin);
  });
  write_weight_grad(conv, grad_w_acc, threads, grad_weight);
  scalar_t* gb = grad_bias.mutable_data_ptr<scalar_t>();
  for (int64_t c = 0; c < C; ++c) gb[c] = static_cast<scalar_t>(sum_over_threads(grad_b_acc, threads, C, c));
}

}  // namespace fastmnist_cpu
