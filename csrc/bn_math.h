// BatchNorm's per-channel arithmetic, written once for the CPU and the CUDA kernels
// (csrc/cpu/conv_relu_bn.cpp, csrc/cuda/conv_relu_bn.cu): both devices call these functions, in
// double, on the same inputs, so their statistics, affine maps and backward coefficients agree to
// the last bit before each device rounds them to scalar_t.
#pragma once

#include <cmath>
#include <cstdint>

#ifdef __CUDACC__
#define FASTMNIST_HOST_DEVICE __host__ __device__
#else
#define FASTMNIST_HOST_DEVICE
#endif

namespace fastmnist {

// Training statistics of a channel from its M values' sum and sum of squares:
//   mean = sum / M,  var = sumsq / M - mean^2   (biased: what BN normalises with).
// Rounding can make var slightly negative; it is clamped at 0 by a comparison, so a NaN (a NaN
// input, an overflow) stays NaN as in the stock layers (fmax(NaN, 0) would return 0 and hide it).
struct BatchMoments {
  double mean, var;
};
FASTMNIST_HOST_DEVICE inline BatchMoments batch_moments(double sum, double sumsq, double count) {
  const double mean = sum / count;
  const double var = sumsq / count - mean * mean;
  return {mean, var < 0.0 ? 0.0 : var};
}

// BN's affine map y = r * scale + shift, with s = gamma / sqrt(var + eps):
//   scale = s,  shift = beta - mean * s.
struct BnAffine {
  double scale, shift;
};
FASTMNIST_HOST_DEVICE inline BnAffine bn_affine(double gamma, double beta, double mean, double var, double eps) {
  const double s = gamma / sqrt(var + eps);
  return {s, beta - mean * s};
}

// BN's backward over the M values of a channel, with invstd = 1 / sqrt(var + eps),
// xhat = (r - mean) invstd, dy the gradient reaching BN's output, sum_dy = sum dy and
// sum_dy_xhat = sum dy xhat (BN's grad_bias and grad_weight):
//   training: dr = gamma invstd (dy - sum_dy / M - xhat sum_dy_xhat / M)
//   eval:     dr = gamma invstd dy
// dr is affine in (dy, r) per channel: dr = a dy + b r + d with
//   a = gamma invstd,  b = -a k,  d = a (k mean - sum_dy / M),  k = invstd sum_dy_xhat / M
// (b = d = 0 in eval, where the statistics are constants). The kernels apply ReLU's mask after.
struct BnBackwardCoefficients {
  double a, b, d;
};
FASTMNIST_HOST_DEVICE inline double bn_invstd(double var, double eps) { return 1.0 / sqrt(var + eps); }
FASTMNIST_HOST_DEVICE inline BnBackwardCoefficients bn_backward_coefficients(double gamma, double mean, double var,
                                                                             double eps, double sum_dy,
                                                                             double sum_dy_xhat, double count,
                                                                             bool training) {
  const double invstd = bn_invstd(var, eps);
  const double a = gamma * invstd;
  if (!training) return {a, 0.0, 0.0};
  const double k = sum_dy_xhat / count * invstd;  // coefficient of (r - mean)
  return {a, -a * k, a * (k * mean - sum_dy / count)};
}

}  // namespace fastmnist
