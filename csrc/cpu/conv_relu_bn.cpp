// CPU kernels of fastmnist::conv_relu_bn and its backward.
//
// Layout: everything runs in NHWC (channels_last). With k = (ky * KW + kx) * Cin + ci
// indexing a pixel's KH x KW patch and wmat[co, k] the weight in that order,
//     z[p, co] = sum_k patch(p)[k] wmat[co, k] + bias[co].
// Work is split over images. ConvProducts computes the convolution's three
// products (forward, weight gradient, input gradient) for a chunk of images
// (engine/conv_products.h: register tiles per ISA, or im2col and torch's BLAS). The
// output values are finished while they are still in registers (tiles: the
// TileEpilogue) or in cache (im2col: relu_epilogue): bias, ReLU and the
// per-channel sums of the batch statistics. One more pass normalises. BatchNorm's
// per-channel arithmetic is csrc/bn_math.h's, shared with the CUDA kernels; the
// backward's chunk loop is engine/conv_backward.h's, shared with conv_relu_pool.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../bn_math.h"
#include "../checks.h"
#include "../entry.h"
#include "engine/conv_backward.h"
#include "engine/conv_products.h"
#include "dispatch_channels.h"
#include "relu.h"

#include <algorithm>
#include <cmath>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

namespace {

using namespace fastmnist_cpu;
using fastmnist::ConvGeometry;

constexpr const char* kOp = "conv_relu_bn";
constexpr const char* kBackwardOp = "conv_relu_bn_backward";

// The per-channel loops below carry `#pragma omp simd`: with CO fixed at
// compile time GCC unrolls them fully and then, because of the ReLU selects,
// leaves them scalar (measured 3.5x slower in the pooling op's dz pass).

// Rows are summed in blocks of this many in scalar_t, then added into double
// accumulators: vectorisable, and the float rounding error stays that of a
// 64-term sum.
constexpr int64_t kRowBlock = 8;

// r = relu(z + bias) in place over rows x C, then either the per-channel
// sum and sum of squares of r (training) or y = r * scale + shift (eval).
// CO > 0 fixes the channel count at compile time (see dispatch_channels).
template <typename scalar_t, int64_t CO>
void relu_epilogue_impl(scalar_t* __restrict__ z, const scalar_t* __restrict__ bias, int64_t rows,
                        int64_t channels, bool training, double* __restrict__ sum, double* __restrict__ sumsq,
                        const scalar_t* __restrict__ scale, const scalar_t* __restrict__ shift,
                        scalar_t* __restrict__ y, scalar_t* __restrict__ bs, scalar_t* __restrict__ bq) {
  const int64_t C = CO > 0 ? CO : channels;
  for (int64_t i0 = 0; i0 < rows; i0 += kRowBlock) {
    const int64_t i1 = std::min(rows, i0 + kRowBlock);
    for (int64_t c = 0; c < C; ++c) bs[c] = bq[c] = scalar_t(0);
    for (int64_t i = i0; i < i1; ++i) {
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) {
        const scalar_t v = z[i * C + c] + bias[c];
        const scalar_t r = relu(v);
        z[i * C + c] = r;
        if (training) {
          bs[c] += r;
          bq[c] += r * r;
        } else {
          y[i * C + c] = r * scale[c] + shift[c];
        }
      }
    }
    if (training) {
      for (int64_t c = 0; c < C; ++c) {
        sum[c] += bs[c];
        sumsq[c] += bq[c];
      }
    }
  }
}

// Image n's row of an (N, C) channel scale, or nullptr when there is no scale.
template <typename scalar_t>
const scalar_t* image_scale(const scalar_t* channel_scale, int64_t n, int64_t C) {
  return channel_scale ? channel_scale + n * C : nullptr;
}

// scaled[c] = v[c] * s[c] for c < C, or v itself when there is no s.
template <typename scalar_t>
const scalar_t* times_scale(const scalar_t* v, const scalar_t* s, int64_t C, scalar_t* scaled) {
  if (s == nullptr) return v;
  for (int64_t c = 0; c < C; ++c) scaled[c] = v[c] * s[c];
  return scaled;
}

// relu_epilogue_impl over `images` images of P pixels each. In eval the
// affine map is multiplied by each image's channel scale (when there is one).
template <typename scalar_t>
void relu_epilogue(scalar_t* z, const scalar_t* bias, int64_t images, int64_t P, int64_t channels, bool training,
                   double* sum, double* sumsq, const scalar_t* scale, const scalar_t* shift,
                   const scalar_t* channel_scale, scalar_t* y) {
  std::vector<scalar_t> acc(4 * channels);
  scalar_t* scale_n = acc.data() + 2 * channels;
  scalar_t* shift_n = scale_n + channels;
  dispatch_channels(channels, [&](auto CO) {
    for (int64_t b = 0; b < images; ++b) {
      const scalar_t* s = image_scale(channel_scale, b, channels);
      const int64_t at = b * P * channels;
      relu_epilogue_impl<scalar_t, decltype(CO)::value>(
          z + at, bias, P, channels, training, sum, sumsq, times_scale(scale, s, channels, scale_n),
          times_scale(shift, s, channels, shift_n), y + at, acc.data(), acc.data() + channels);
    }
  });
}

// y = r * scale[c] + shift[c] over rows x C. CO as in relu_epilogue_impl.
template <typename scalar_t, int64_t CO>
void normalize_rows(const scalar_t* __restrict__ r, int64_t rows, int64_t channels, const scalar_t* __restrict__ sc,
                    const scalar_t* __restrict__ sh, scalar_t* __restrict__ y) {
  const int64_t C = CO > 0 ? CO : channels;
  for (int64_t i = 0; i < rows; ++i) {
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) y[i * C + c] = r[i * C + c] * sc[c] + sh[c];
  }
}

// Forward, per chunk of images:
//   z = conv(x)                        (ConvProducts::forward)
//   r = max(z + bias, 0)               (epilogue, in place)
//   sum[c] += r, sumsq[c] += r^2       (epilogue; per-thread double partials)
// then, over the batch of M = N * Hout * Wout values per channel,
//   mean = sum / M,  var = sumsq / M - mean^2   (biased, what BN normalises with)
//   y = (r - mean) / sqrt(var + eps) * gamma + beta.
// In eval mode mean and var are the running statistics and the normalisation
// happens in the epilogue itself: a single pass.
template <typename scalar_t>
void conv_relu_bn_forward_kernel(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                                 const at::Tensor& gamma, const at::Tensor& beta, const ConvGeometry& g,
                                 bool training, double eps, const scalar_t* channel_scale, at::Tensor& mean,
                                 at::Tensor& var, at::Tensor& relu_out, at::Tensor& y) {
  const int64_t P = g.pixels(), C = g.cout;
  const int threads = at::get_num_threads();
  const scalar_t* x_ptr = x.const_data_ptr<scalar_t>();
  const scalar_t* b_ptr = bias.const_data_ptr<scalar_t>();
  scalar_t* r_ptr = relu_out.mutable_data_ptr<scalar_t>();
  scalar_t* y_ptr = y.mutable_data_ptr<scalar_t>();

  // Eval: the affine map y = r * scale + shift is known before the GEMM.
  std::vector<scalar_t> scale(C), shift(C);
  auto set_affine = [&](const double* m, const double* v) {
    const scalar_t* gm = gamma.const_data_ptr<scalar_t>();
    const scalar_t* bt = beta.const_data_ptr<scalar_t>();
    for (int64_t c = 0; c < C; ++c) {
      const fastmnist::BnAffine map = fastmnist::bn_affine(gm[c], bt[c], m[c], v[c], eps);
      scale[c] = static_cast<scalar_t>(map.scale);
      shift[c] = static_cast<scalar_t>(map.shift);
    }
  };
  std::vector<double> m64(C), v64(C);
  if (!training) {
    for (int64_t c = 0; c < C; ++c) {
      m64[c] = static_cast<double>(mean.const_data_ptr<scalar_t>()[c]);
      v64[c] = static_cast<double>(var.const_data_ptr<scalar_t>()[c]);
    }
    set_affine(m64.data(), v64.data());
  }

  ConvProducts<scalar_t> conv(g, weight, x.options(), threads, /*need_grad_x=*/false);
  // Per-thread double partials of the statistics, CT channels each (CT >= C:
  // the tiles' epilogue works on whole tile rows, padded channels included).
  const int64_t CT = conv.epilogue_channels();
  std::vector<double> partial_sum(threads * CT, 0.0), partial_sumsq(threads * CT, 0.0);
  if (conv.tiled) {
    if constexpr (std::is_same<scalar_t, float>::value) {
      // The tiles apply bias, ReLU and the statistics (training) or the affine
      // map (eval) to each output value while it is in a register.
      const std::vector<float> bias_t = conv.epilogue_vector(b_ptr);
      std::vector<std::vector<float>> affine(threads, std::vector<float>(2 * CT, 0.0f));
      for_each_chunk(g, conv.chunk(), [&](int64_t first, int64_t count, int thread) {
        TileEpilogue ep;
        ep.bias = bias_t.data();
        ep.relu = true;
        if (training) {
          ep.sum = partial_sum.data() + thread * CT;
          ep.sumsq = partial_sumsq.data() + thread * CT;
        } else {  // chunk() is one image when tiled: its channel scale folds into the map
          const float* s = image_scale(channel_scale, first, C);
          float* sc = affine[thread].data();
          for (int64_t c = 0; c < C; ++c) {
            sc[c] = s ? scale[c] * s[c] : scale[c];
            sc[CT + c] = s ? shift[c] * s[c] : shift[c];
          }
          ep.scale = sc;
          ep.shift = sc + CT;
          ep.y = y_ptr + first * P * C;
        }
        conv.forward(x_ptr, first, count, thread, r_ptr + first * P * C, &ep);
      });
    }
  } else {
    for_each_chunk(g, conv.chunk(), [&](int64_t first, int64_t count, int thread) {
      scalar_t* z = r_ptr + first * P * C;
      conv.forward(x_ptr, first, count, thread, z);
      relu_epilogue<scalar_t>(z, b_ptr, count, P, C, training, partial_sum.data() + thread * CT,
                              partial_sumsq.data() + thread * CT, scale.data(), shift.data(),
                              image_scale(channel_scale, first, C), y_ptr + first * P * C);
    });
  }
  if (!training) return;

  const double M = static_cast<double>(g.n * P);
  scalar_t* mean_ptr = mean.mutable_data_ptr<scalar_t>();
  scalar_t* var_ptr = var.mutable_data_ptr<scalar_t>();
  for (int64_t c = 0; c < C; ++c) {
    const fastmnist::BatchMoments moments = fastmnist::batch_moments(
        sum_over_threads(partial_sum, threads, CT, c), sum_over_threads(partial_sumsq, threads, CT, c), M);
    m64[c] = moments.mean;
    v64[c] = moments.var;
    mean_ptr[c] = static_cast<scalar_t>(m64[c]);
    var_ptr[c] = static_cast<scalar_t>(v64[c]);
  }
  set_affine(m64.data(), v64.data());
  // y = r * scale + shift, image by image so each image's channel scale folds into the affine map.
  at::parallel_for(0, g.n, std::max<int64_t>(1, 2048 / P), [&](int64_t begin, int64_t end) {
    std::vector<scalar_t> affine_n(2 * C);
    dispatch_channels(C, [&](auto CO) {
      for (int64_t b = begin; b < end; ++b) {
        const scalar_t* s = image_scale(channel_scale, b, C);
        normalize_rows<scalar_t, decltype(CO)::value>(r_ptr + b * P * C, P, C,
                                                      times_scale(scale.data(), s, C, affine_n.data()),
                                                      times_scale(shift.data(), s, C, affine_n.data() + C),
                                                      y_ptr + b * P * C);
      }
    });
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> conv_relu_bn_forward(
    const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, const at::Tensor& bn_weight,
    const at::Tensor& bn_bias, const at::Tensor& running_mean, const at::Tensor& running_var, bool training,
    double eps, at::IntArrayRef padding, const std::optional<at::Tensor>& channel_scale) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // our internals are not ops autograd records
  fastmnist::ConvReluBnForwardCall call = fastmnist::begin_conv_relu_bn(
      kOp, at::kCPU, x, weight, bias, bn_weight, bn_bias, running_mean, running_var, training, padding, channel_scale);
  AT_DISPATCH_FLOATING_TYPES(call.x.scalar_type(), "conv_relu_bn_forward", [&] {
    conv_relu_bn_forward_kernel<scalar_t>(call.x, weight, call.bias, call.gamma, call.beta, call.g, training, eps,
                                          fastmnist::data_or_null<scalar_t>(call.channel_scale), call.mean, call.var,
                                          call.relu_out, call.y);
  });
  return call.outputs();
}

// sum_dy[c] += sum of dy and sum_dy_r[c] += sum of dy * r over rows x C.
template <typename scalar_t, int64_t CO>
void bn_grad_sums_impl(const scalar_t* __restrict__ dy, const scalar_t* __restrict__ r, int64_t rows,
                       int64_t channels, double* __restrict__ sum_dy, double* __restrict__ sum_dy_r,
                       scalar_t* __restrict__ bs, scalar_t* __restrict__ br) {
  const int64_t C = CO > 0 ? CO : channels;
  for (int64_t i0 = 0; i0 < rows; i0 += kRowBlock) {
    const int64_t i1 = std::min(rows, i0 + kRowBlock);
    for (int64_t c = 0; c < C; ++c) bs[c] = br[c] = scalar_t(0);
    for (int64_t i = i0; i < i1; ++i) {
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) {
        bs[c] += dy[i * C + c];
        br[c] += dy[i * C + c] * r[i * C + c];
      }
    }
    for (int64_t c = 0; c < C; ++c) {
      sum_dy[c] += bs[c];
      sum_dy_r[c] += br[c];
    }
  }
}

// Per-channel reductions the BN backward needs, with xhat = (r - mean) * invstd
// and dy the gradient reaching BN's output (grad_y times the channel scale):
//   sum_dy[c] = sum dy,   sum_dy_xhat[c] = sum dy * xhat
// (grad of beta and gamma respectively). Summed image by image, so an
// image's channel scale multiplies its two sums rather than every element.
template <typename scalar_t>
void bn_grad_sums_kernel(const scalar_t* __restrict__ dy, const scalar_t* __restrict__ r,
                         const scalar_t* channel_scale, const std::vector<double>& mean,
                         const std::vector<double>& invstd, int64_t images, int64_t P, int64_t C,
                         std::vector<double>& sum_dy, std::vector<double>& sum_dy_xhat) {
  const int threads = at::get_num_threads();
  std::vector<double> p_dy(threads * C, 0.0), p_dyr(threads * C, 0.0);
  at::parallel_for(0, images, std::max<int64_t>(1, 2048 / P), [&](int64_t begin, int64_t end) {
    const int64_t t = at::get_thread_num();
    std::vector<scalar_t> acc(2 * C);
    std::vector<double> image_dy(C), image_dyr(C);
    dispatch_channels(C, [&](auto CO) {
      for (int64_t b = begin; b < end; ++b) {
        std::fill(image_dy.begin(), image_dy.end(), 0.0);
        std::fill(image_dyr.begin(), image_dyr.end(), 0.0);
        bn_grad_sums_impl<scalar_t, decltype(CO)::value>(dy + b * P * C, r + b * P * C, P, C, image_dy.data(),
                                                         image_dyr.data(), acc.data(), acc.data() + C);
        const scalar_t* s = image_scale(channel_scale, b, C);
        for (int64_t c = 0; c < C; ++c) {
          const double k = s ? static_cast<double>(s[c]) : 1.0;
          p_dy[t * C + c] += k * image_dy[c];
          p_dyr[t * C + c] += k * image_dyr[c];
        }
      }
    });
  });
  for (int64_t c = 0; c < C; ++c) {
    const double s = sum_over_threads(p_dy, threads, C, c), sr = sum_over_threads(p_dyr, threads, C, c);
    sum_dy[c] = s;
    // sum dy (r - mean) invstd = (sum dy r - mean sum dy) invstd
    sum_dy_xhat[c] = (sr - mean[c] * s) * invstd[c];
  }
}

// dz = (a[c] dy + b[c] r + d[c]) where r > 0, else 0, over rows x C; also
// accumulates grad_bias[c] += sum of dz. CO as in relu_epilogue_impl.
// In eval (TRAINING false) b and d are 0 and r is not read into the sum:
// 0 * r would turn a NaN r into a NaN gradient where the stock layers pass
// a finite one (their eval BN gradient does not depend on r).
template <typename scalar_t, int64_t CO, bool TRAINING>
void relu_bn_grad_impl(const scalar_t* __restrict__ dy, const scalar_t* __restrict__ r,
                       const scalar_t* __restrict__ a, const scalar_t* __restrict__ b,
                       const scalar_t* __restrict__ d, int64_t rows, int64_t channels, scalar_t* __restrict__ dz,
                       double* __restrict__ grad_bias, scalar_t* __restrict__ bs) {
  const int64_t C = CO > 0 ? CO : channels;
  for (int64_t i0 = 0; i0 < rows; i0 += kRowBlock) {
    const int64_t i1 = std::min(rows, i0 + kRowBlock);
    for (int64_t c = 0; c < C; ++c) bs[c] = scalar_t(0);
    for (int64_t i = i0; i < i1; ++i) {
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) {
        const scalar_t rv = r[i * C + c];
        const scalar_t g = TRAINING ? a[c] * dy[i * C + c] + b[c] * rv + d[c] : a[c] * dy[i * C + c];
        const scalar_t v = relu_grad(rv, g);
        dz[i * C + c] = v;
        bs[c] += v;
      }
    }
    for (int64_t c = 0; c < C; ++c) grad_bias[c] += bs[c];
  }
}

// relu_bn_grad_impl over `images` images of P pixels; an image's channel
// scale s multiplies its dy, so it folds into the coefficient a.
template <typename scalar_t>
void relu_bn_grad(const scalar_t* dy, const scalar_t* r, const scalar_t* a, const scalar_t* b, const scalar_t* d,
                  const scalar_t* channel_scale, int64_t images, int64_t P, int64_t channels, bool training,
                  scalar_t* dz, double* grad_bias) {
  std::vector<scalar_t> acc(2 * channels);
  auto run = [&](auto CO, auto TRAINING) {
    for (int64_t i = 0; i < images; ++i) {
      const int64_t at = i * P * channels;
      const scalar_t* a_n = times_scale(a, image_scale(channel_scale, i, channels), channels,
                                        acc.data() + channels);
      relu_bn_grad_impl<scalar_t, decltype(CO)::value, decltype(TRAINING)::value>(
          dy + at, r + at, a_n, b, d, P, channels, dz + at, grad_bias, acc.data());
    }
  };
  dispatch_channels(channels, [&](auto CO) {
    if (training)
      run(CO, std::true_type{});
    else
      run(CO, std::false_type{});
  });
}

// Backward, with M values per channel, invstd = 1 / sqrt(var + eps),
// xhat = (r - mean) invstd and dy = grad_y * channel_scale (or grad_y).
// BatchNorm's gradient is affine in (dy, r) per channel, dr = a dy + b r + d
// (bn_backward_coefficients in csrc/bn_math.h gives the formula; in eval
// b = d = 0). ReLU passes dr where r > 0: dz = dr [r > 0]. That elementwise
// pass is fused with the convolution backward, chunk by chunk
// (engine/conv_backward.h).
template <typename scalar_t>
void conv_relu_bn_backward_kernel(const fastmnist::ConvReluBnBackwardCall& call, const at::Tensor& weight,
                                  bool training, double eps, bool compute_grad_x, at::Tensor& grad_x,
                                  at::Tensor& grad_weight, at::Tensor& grad_bias, at::Tensor& grad_gamma,
                                  at::Tensor& grad_beta) {
  const ConvGeometry& g = call.g;
  const int64_t P = g.pixels(), C = g.cout;
  const scalar_t* dy = call.grad_y.const_data_ptr<scalar_t>();
  const scalar_t* r = call.relu_out.const_data_ptr<scalar_t>();
  const scalar_t* channel_scale = fastmnist::data_or_null<scalar_t>(call.channel_scale);
  const scalar_t* gamma = call.gamma.const_data_ptr<scalar_t>();

  std::vector<double> mean(C), invstd(C), sum_dy(C), sum_dy_xhat(C);
  for (int64_t c = 0; c < C; ++c) {
    mean[c] = call.mean.const_data_ptr<scalar_t>()[c];
    invstd[c] = fastmnist::bn_invstd(call.var.const_data_ptr<scalar_t>()[c], eps);
  }
  bn_grad_sums_kernel(dy, r, channel_scale, mean, invstd, g.n, P, C, sum_dy, sum_dy_xhat);

  std::vector<scalar_t> a(C), b(C), d(C);
  const double M = static_cast<double>(g.n * P);
  for (int64_t c = 0; c < C; ++c) {
    const fastmnist::BnBackwardCoefficients k = fastmnist::bn_backward_coefficients(
        gamma[c], mean[c], call.var.const_data_ptr<scalar_t>()[c], eps, sum_dy[c], sum_dy_xhat[c], M, training);
    a[c] = static_cast<scalar_t>(k.a);
    b[c] = static_cast<scalar_t>(k.b);
    d[c] = static_cast<scalar_t>(k.d);
    grad_beta.mutable_data_ptr<scalar_t>()[c] = static_cast<scalar_t>(sum_dy[c]);
    grad_gamma.mutable_data_ptr<scalar_t>()[c] = static_cast<scalar_t>(sum_dy_xhat[c]);
  }

  auto make_dz = [&](int64_t first, int64_t count, scalar_t* dz, double* bias_sums) {
    relu_bn_grad<scalar_t>(dy + first * P * C, r + first * P * C, a.data(), b.data(), d.data(),
                           image_scale(channel_scale, first, C), count, P, C, training, dz, bias_sums);
  };
  conv_backward_chunks<scalar_t>(g, call.x, weight, compute_grad_x, make_dz, grad_x, grad_weight, grad_bias);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> conv_relu_bn_backward(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& relu_out,
    const at::Tensor& bn_weight, const at::Tensor& mean, const at::Tensor& var, bool training, double eps,
    at::IntArrayRef padding, bool compute_grad_x, const std::optional<at::Tensor>& channel_scale) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // our internals are not ops autograd records
  fastmnist::ConvReluBnBackwardCall call = fastmnist::begin_conv_relu_bn_backward(
      kBackwardOp, at::kCPU, grad_y, x, weight, relu_out, bn_weight, mean, var, padding, compute_grad_x, channel_scale);
  AT_DISPATCH_FLOATING_TYPES(call.x.scalar_type(), "conv_relu_bn_backward", [&] {
    conv_relu_bn_backward_kernel<scalar_t>(call, weight, training, eps, compute_grad_x, call.grad_x, call.grad_weight,
                                           call.grad_bias, call.grad_gamma, call.grad_beta);
  });
  return call.outputs();
}

// Which convolution path the CPU kernels take for these arguments (for
// fastmnist.ops.conv_path: tests and users can see that no block fell back
// to the generic path unnoticed).
std::string conv_path(const at::Tensor& x, const at::Tensor& weight, at::IntArrayRef padding, bool compute_grad_x) {
  const ConvGeometry g = fastmnist::check_conv_inputs("conv_path", x, weight, padding);
  return describe_conv_path(g, x.scalar_type() == at::kFloat, compute_grad_x);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastmnist, CPU, m) {
  m.impl("conv_relu_bn", &conv_relu_bn_forward);
  m.impl("conv_relu_bn_backward", &conv_relu_bn_backward);
  m.impl("conv_path", &conv_path);
}
