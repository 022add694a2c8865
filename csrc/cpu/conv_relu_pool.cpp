// CPU kernels of fastmnist::conv_relu_pool and its backward:
//     out = AvgPool2d(pool)(ReLU(Conv2d(x, weight, bias, stride 1, padding)))
// (ReLU optional). A network's transition (a 1x1 conv, ReLU, AvgPool2d(2); the
// default network's is 24 -> 16 on 24x24) and head (a 1x1 conv to 10 channels,
// global average pooling; the default network's pools 6x6) are each one call:
// the convolution runs on ConvProducts (engine/conv_products.h) and the
// activation and pooling are applied while an image is in cache; the backward
// runs on the chunk driver both ops share (engine/conv_backward.h).
//
// Backward, with A = pool * pool and cell(p) the pooling window holding pixel
// p (pixels past the last whole window, which floor-mode pooling drops, get
// none):
//     dz[p, c] = grad_out[cell(p), c] / A,   times [r[p, c] > 0 or NaN] with ReLU
//     grad_bias[c] = sum_p dz[p, c],  grad_weight and grad_x as for any convolution of dz.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../checks.h"
#include "../entry.h"
#include "engine/conv_backward.h"
#include "engine/conv_products.h"
#include "dispatch_channels.h"
#include "relu.h"

#include <algorithm>
#include <optional>
#include <vector>

namespace {

using namespace fastmnist_cpu;
using fastmnist::ConvGeometry;

constexpr const char* kOp = "conv_relu_pool";
constexpr const char* kBackwardOp = "conv_relu_pool_backward";

ConvGeometry check_pool_inputs(const char* op, const at::Tensor& x, const at::Tensor& weight,
                               at::IntArrayRef padding, int64_t pool) {
  const ConvGeometry g = fastmnist::check_conv_inputs(op, x, weight, padding);
  TORCH_CHECK(pool >= 1 && pool <= g.hout && pool <= g.wout, op, ": pool must be in [1, ", std::min(g.hout, g.wout),
              "] for a convolution output of ", g.hout, "x", g.wout, " (input ", x.sizes(), ", weight ",
              weight.sizes(), "), got ", pool);
  return g;
}

// One image: r = act(z + bias) in place (z is (hout * wout, C)). CO as in dispatch_channels.
template <typename scalar_t, int64_t CO>
void activate_impl(scalar_t* __restrict__ z, const scalar_t* __restrict__ bias, const ConvGeometry& g, bool relu) {
  const int64_t C = CO > 0 ? CO : g.cout, P = g.pixels();
  for (int64_t p = 0; p < P; ++p) {
    scalar_t* zp = z + p * C;
    if (relu) {
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) {
        const scalar_t v = zp[c] + bias[c];
        zp[c] = fastmnist_cpu::relu(v);  // the parameter `relu` hides the function
      }
    } else {
      for (int64_t c = 0; c < C; ++c) zp[c] += bias[c];
    }
  }
}

// One image: the pooled means of r ((hout, wout, C)) into out ((hout / pool) * (wout / pool), C).
template <typename scalar_t, int64_t CO>
void pool_impl(const scalar_t* __restrict__ z, const ConvGeometry& g, int64_t pool, scalar_t* __restrict__ out) {
  const int64_t C = CO > 0 ? CO : g.cout, ph = g.hout / pool, pw = g.wout / pool;
  const scalar_t inv_area = scalar_t(1) / static_cast<scalar_t>(pool * pool);
  for (int64_t oy = 0; oy < ph; ++oy) {
    for (int64_t ox = 0; ox < pw; ++ox) {
      scalar_t* o = out + (oy * pw + ox) * C;
      for (int64_t c = 0; c < C; ++c) o[c] = scalar_t(0);
      for (int64_t dy = 0; dy < pool; ++dy)
        for (int64_t dx = 0; dx < pool; ++dx) {
          const scalar_t* r = z + ((oy * pool + dy) * g.wout + ox * pool + dx) * C;
          for (int64_t c = 0; c < C; ++c) o[c] += r[c];
        }
      for (int64_t c = 0; c < C; ++c) o[c] *= inv_area;
    }
  }
}

// One image's activation (unless the tiles' epilogue applied it: bias == nullptr) and pooling.
template <typename scalar_t>
void activate_and_pool(scalar_t* z, const scalar_t* bias, const ConvGeometry& g, bool relu, int64_t pool,
                       scalar_t* out) {
  dispatch_channels(g.cout, [&](auto CO) {
    if (bias) activate_impl<scalar_t, decltype(CO)::value>(z, bias, g, relu);
    pool_impl<scalar_t, decltype(CO)::value>(z, g, pool, out);
  });
}

std::tuple<at::Tensor, at::Tensor> conv_relu_pool_forward(const at::Tensor& x_in, const at::Tensor& weight,
                                                          const at::Tensor& bias, bool relu,
                                                          at::IntArrayRef padding, int64_t pool) {
  const ConvGeometry g = check_pool_inputs(kOp, x_in, weight, padding, pool);
  fastmnist::check_channel_vector(kOp, bias, x_in, g.cout, "bias");
  TORCH_INTERNAL_ASSERT(x_in.device().is_cpu());
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // our internals are not ops autograd records

  const at::Tensor x = x_in.contiguous(at::MemoryFormat::ChannelsLast);
  at::Tensor out = fastmnist::empty_channels_last(x, g.n, g.cout, g.hout / pool, g.wout / pool);
  // relu_out is what the backward's ReLU mask needs; without ReLU it needs none.
  at::Tensor relu_out = relu ? fastmnist::empty_channels_last(x, g.n, g.cout, g.hout, g.wout)
                             : at::empty({0}, x.options());
  const at::Tensor b = bias.contiguous();
  const int threads = at::get_num_threads();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), kOp, [&] {
    ConvProducts<scalar_t> conv(g, weight, x.options(), threads, /*need_grad_x=*/false);
    const int64_t P = g.pixels(), C = g.cout, pooled = (g.hout / pool) * (g.wout / pool);
    std::vector<std::vector<scalar_t>> z_buffers(threads);
    // Tiled, bias and ReLU are applied in registers (TileEpilogue) and only the pooling is left.
    const std::vector<float> bias_t = conv.epilogue_vector(b.const_data_ptr<scalar_t>());
    TileEpilogue ep;
    ep.bias = bias_t.data();
    ep.relu = relu;
    for_each_chunk(g, conv.chunk(), [&](int64_t first, int64_t count, int thread) {
      scalar_t* z;
      if (relu) {
        z = relu_out.mutable_data_ptr<scalar_t>() + first * P * C;
      } else {
        z_buffers[thread].resize(count * P * C);
        z = z_buffers[thread].data();
      }
      conv.forward(x.const_data_ptr<scalar_t>(), first, count, thread, z, conv.tiled ? &ep : nullptr);
      for (int64_t i = 0; i < count; ++i)
        activate_and_pool(z + i * P * C, conv.tiled ? nullptr : b.const_data_ptr<scalar_t>(), g, relu, pool,
                          out.mutable_data_ptr<scalar_t>() + (first + i) * pooled * C);
    });
  });
  return {out, relu_out};
}

// One image's dz from grad_out (see the file comment); adds sum dz into
// grad_bias. CO > 0 fixes the channel count at compile time (dispatch_channels).
template <typename scalar_t, int64_t CO>
void pooled_relu_grad_impl(const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ r,
                           const ConvGeometry& g, int64_t pool, scalar_t* __restrict__ dz,
                           scalar_t* __restrict__ bias_sum) {
  const int64_t C = CO > 0 ? CO : g.cout, ph = g.hout / pool, pw = g.wout / pool;
  const scalar_t inv_area = scalar_t(1) / static_cast<scalar_t>(pool * pool);
  for (int64_t y = 0; y < g.hout; ++y) {
    scalar_t* drow = dz + y * g.wout * C;
    const scalar_t* rrow = r ? r + y * g.wout * C : nullptr;
    int64_t x = 0;
    if (y < ph * pool) {
      const scalar_t* gorow = grad_out + (y / pool) * pw * C;
      for (; x < pw * pool; ++x) {
        const scalar_t* go = gorow + (x / pool) * C;
        scalar_t* d = drow + x * C;
        // Branch-free (the product is formed either way), so the loop vectorises;
        // rp is read only when masked (it points at go otherwise, never at null).
        const bool masked = rrow != nullptr;
        const scalar_t* rp = masked ? rrow + x * C : go;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) {
          const scalar_t v = go[c] * inv_area;
          const scalar_t dv = masked ? relu_grad(rp[c], v) : v;
          d[c] = dv;
          bias_sum[c] += dv;
        }
      }
    }
    std::fill(drow + x * C, drow + g.wout * C, scalar_t(0));  // outside every whole window
  }
}

template <typename scalar_t>
void pooled_relu_grad(const scalar_t* grad_out, const scalar_t* r, const ConvGeometry& g, int64_t pool,
                      scalar_t* dz, double* grad_bias) {
  std::vector<scalar_t> bias_sum(g.cout, scalar_t(0));
  dispatch_channels(g.cout, [&](auto CO) {
    pooled_relu_grad_impl<scalar_t, decltype(CO)::value>(grad_out, r, g, pool, dz, bias_sum.data());
  });
  for (int64_t c = 0; c < g.cout; ++c) grad_bias[c] += bias_sum[c];
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv_relu_pool_backward(
    const at::Tensor& grad_out_in, const at::Tensor& x_in, const at::Tensor& weight, const at::Tensor& relu_out_in,
    bool relu, at::IntArrayRef padding, int64_t pool, bool compute_grad_x) {
  const ConvGeometry g = check_pool_inputs(kBackwardOp, x_in, weight, padding, pool);
  fastmnist::check_activation(kBackwardOp, grad_out_in, x_in, {g.n, g.cout, g.hout / pool, g.wout / pool},
                              "grad_out");
  if (relu) fastmnist::check_activation(kBackwardOp, relu_out_in, x_in, {g.n, g.cout, g.hout, g.wout}, "relu_out");
  TORCH_INTERNAL_ASSERT(x_in.device().is_cpu());
  at::AutoDispatchBelowADInplaceOrView below_autograd;

  const auto cl = at::MemoryFormat::ChannelsLast;
  const at::Tensor x = x_in.contiguous(cl);
  const at::Tensor grad_out = grad_out_in.contiguous(cl);
  const at::Tensor relu_out = relu ? relu_out_in.contiguous(cl) : at::Tensor();
  at::Tensor grad_x = compute_grad_x ? fastmnist::empty_channels_last(x, g.n, g.cin, g.h, g.w)
                                     : at::empty({0}, x.options());
  at::Tensor grad_weight = at::empty_like(weight);  // in the weight's memory format (write_weight_grad)
  at::Tensor grad_bias = at::empty({g.cout}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), kBackwardOp, [&] {
    const int64_t P = g.pixels(), C = g.cout, pooled = (g.hout / pool) * (g.wout / pool);
    const scalar_t* go = grad_out.const_data_ptr<scalar_t>();
    const scalar_t* r = relu ? relu_out.const_data_ptr<scalar_t>() : nullptr;
    auto make_dz = [&](int64_t first, int64_t count, scalar_t* dz, double* bias_sums) {
      for (int64_t i = 0; i < count; ++i)
        pooled_relu_grad(go + (first + i) * pooled * C, r ? r + (first + i) * P * C : nullptr, g, pool,
                         dz + i * P * C, bias_sums);
    };
    conv_backward_chunks<scalar_t>(g, x, weight, compute_grad_x, make_dz, grad_x, grad_weight, grad_bias);
  });
  return {grad_x, grad_weight, grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastmnist, CPU, m) {
  m.impl("conv_relu_pool", &conv_relu_pool_forward);
  m.impl("conv_relu_pool_backward", &conv_relu_pool_backward);
}
