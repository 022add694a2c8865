// CUDA kernels of fastmnist::conv_relu_bn, fastmnist::conv_relu_bn_backward and
// fastmnist::conv_path (schemas in csrc/ops.cpp; input checks in csrc/checks.h,
// shared with the CPU so both devices give the same messages).
//
// Every activation is NHWC in memory (channels_last): a pixel's channels are
// contiguous. The convolution is stride 1 with zero padding.
//
// Numerics: products and their sums run in scalar_t (fp32 FMAs for float32),
// in register micro-tiles of kTileP pixels x kTileC channels per thread. Sums
// over the batch (BN statistics, BN-backward sums, grad_bias, grad_weight) are
// per-block partials that a second kernel adds in double in a fixed order: no
// atomics, bitwise-repeatable results for a given shape and device.
//
// Forward (3 launches):
//   conv_forward_kernel          r = relu(conv(x) + bias), per-block sum(r), sum(r^2) (training)
//   batch_stats_forward_kernel   training: mean, biased var, BN's affine map (scale, shift)
//     or bn_eval_affine_forward_kernel   eval: the affine map from the running statistics
//   bn_normalize_forward_kernel  y = (r * scale + shift) * channel_scale[n]
// Backward (6 launches, 7 with grad_x):
//   bn_grad_partials_backward_kernel  per-block sum(dy), sum(dy * xhat), dy = grad_y * channel_scale[n]
//   bn_grad_finalize_backward_kernel  grad_bn_bias, grad_bn_weight, dz coefficients
//   bn_relu_backward_kernel           dz (BN + ReLU gradient), per-block sum(dz)
//   row_sum_kernel                    grad_bias
//   conv_weight_partials_backward_kernel + weight_reduce_backward_kernel   grad_weight
//   conv_forward_kernel               grad_x (when asked): the convolution of dz with the flipped weight
// BatchNorm's per-channel arithmetic (statistics, affine map, backward
// coefficients) is csrc/bn_math.h's, the same functions the CPU kernels call.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
// c10::cuda::getCurrentCUDAStream is what at::cuda::getCurrentCUDAStream names;
// ATen/cuda/CUDAContext.h would also pull in cuBLAS/cuSPARSE headers that a
// minimal CUDA 13 toolkit lacks.
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <optional>
#include <string>
#include <tuple>

#include "../bn_math.h"
#include "../checks.h"
#include "../entry.h"

namespace {

constexpr int kThreads = 256;      // threads per block (at most)
constexpr int kTileP = 4;          // pixels per thread (register micro-tile)
constexpr int kTileC = 4;          // output channels per thread
constexpr int kMaxTileChannels = 64;  // output channels per block
constexpr int kCinChunk = 32;      // input channels of weight staged in shared memory at once
constexpr int kReduceRowsMax = 256;
constexpr int64_t kMaxGrid = 65535;
constexpr const char* kOp = "conv_relu_bn";
constexpr const char* kBackwardOp = "conv_relu_bn_backward";

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// A stride-1 convolution on NHWC data: input (N, H, W, Cin), weight staged as
// (KH, KW, Cin, Cout), output (N, Hout, Wout, Cout); output pixel (ho, wo)
// reads input row ho + i - ph, column wo + j - pw (zero outside). ph and pw
// may be negative (the input gradient's flipped convolution). Sizes inside an
// image fit int32 (checked on the host); image offsets are int64.
struct ConvDims {
  int n, h, w, cin, hout, wout, cout, kh, kw, ph, pw;
};

ConvDims forward_dims(const fastmnist::ConvGeometry& g) {
  return ConvDims{int(g.n), int(g.h), int(g.w), int(g.cin), int(g.hout), int(g.wout), int(g.cout), int(g.kh),
                  int(g.kw), int(g.pad_h), int(g.pad_w)};
}

// The input gradient as a convolution: grad_x[hi, wi, ci] = sum dz[hi - i + pad_h, wi - j + pad_w, co] w[co, ci, i, j]
// = sum dz[hi + i' - (KH-1-pad_h), wi + j' - (KW-1-pad_w), co] w[co, ci, KH-1-i', KW-1-j']: input dz, weight
// flipped, Cin <-> Cout.
ConvDims input_grad_dims(const fastmnist::ConvGeometry& g) {
  return ConvDims{int(g.n), int(g.hout), int(g.wout), int(g.cout), int(g.h), int(g.w), int(g.cin), int(g.kh),
                  int(g.kw), int(g.kh - 1 - g.pad_h), int(g.kw - 1 - g.pad_w)};
}

// Launch shape of the convolution and of the per-channel passes: threads_c
// threads cover a tile of up to kMaxTileChannels output channels, kTileC each
// (24 channels: 6 threads, no padding to a power of two); threads_p rows of
// threads cover the block's pixels.
struct Tiling {
  int threads_c, threads_p, tile_channels;
  int64_t pixels_per_block, blocks_p, tiles_c;
  dim3 grid() const { return dim3(unsigned(blocks_p), unsigned(tiles_c)); }
  dim3 block() const { return dim3(unsigned(threads_c * threads_p)); }
};

Tiling make_tiling(int64_t pixels, int64_t channels, int pixels_per_thread) {
  Tiling t;
  t.tile_channels = int(std::min<int64_t>(channels, kMaxTileChannels));
  t.threads_c = int(ceil_div(t.tile_channels, kTileC));
  t.threads_p = kThreads / t.threads_c;
  t.pixels_per_block = int64_t{t.threads_p} * pixels_per_thread;
  t.blocks_p = ceil_div(pixels, t.pixels_per_block);
  t.tiles_c = ceil_div(channels, t.tile_channels);
  TORCH_CHECK(t.blocks_p <= std::numeric_limits<int32_t>::max() && t.tiles_c <= kMaxGrid, kOp,
              ": too many pixels (", pixels, ") or channels (", channels, ") for one launch");
  return t;
}

// Adds each thread's kTileC double values over the block's pixel rows, row 0
// first (a fixed order), and stores them as block blockIdx.x's partials:
// out[c * gridDim.x + blockIdx.x]. red holds kThreads * kTileC doubles.
__device__ void store_block_partials(const double (&v)[kTileC], int tc, int tp, int threads_c, int threads_p,
                                     int c0, int channels, double* red, double* __restrict__ out) {
  for (int t = 0; t < kTileC; ++t) red[(tp * threads_c + tc) * kTileC + t] = v[t];
  __syncthreads();
  if (tp == 0) {
    for (int t = 0; t < kTileC; ++t) {
      const int c = c0 + tc * kTileC + t;
      double s = 0.0;
      for (int row = 0; row < threads_p; ++row) s += red[(row * threads_c + tc) * kTileC + t];
      if (c < channels) out[int64_t{c} * gridDim.x + blockIdx.x] = s;
    }
  }
  __syncthreads();
}

// Sum of row[0, len) by a 1-D block of kReduceRowsMax threads in a fixed order.
__device__ double block_row_sum(const double* __restrict__ row, int64_t len, double* shm) {
  double acc = 0.0;
  for (int64_t i = threadIdx.x; i < len; i += blockDim.x) acc += row[i];
  shm[threadIdx.x] = acc;
  __syncthreads();
  for (unsigned stride = blockDim.x / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) shm[threadIdx.x] += shm[threadIdx.x + stride];
    __syncthreads();
  }
  const double total = shm[0];
  __syncthreads();
  return total;
}

// ---------------------------------------------------------------- forward

// out[p, c] = act(bias[c] + sum_{i, j, ci} in[n, ho + i - ph, wo + j - pw, ci] * wt[i, j, ci, c])
// with act = ReLU (NaN passes, as torch.relu: v < 0 ? 0 : v) when relu, else
// identity; bias may be null. Thread (tc, tp) of block (bx, by) computes
// pixels bx * pixels_per_block + tp + k * threads_p (k < kTileP) and channels
// by * tile + tc * kTileC + t (t < kTileC): an fp32 register tile. The weight
// slab of the block's channels is staged in shared memory kCinChunk input
// channels at a time. When partial_sum is given, also writes the block's
// partial sum(out) and sum(out^2) per channel (for the batch statistics).
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) conv_forward_kernel(
    const scalar_t* __restrict__ in, const scalar_t* __restrict__ wt, const scalar_t* __restrict__ bias,
    scalar_t* __restrict__ out, double* __restrict__ partial_sum, double* __restrict__ partial_sumsq, ConvDims d,
    int threads_c, int threads_p, int tile_channels, bool relu) {
  __shared__ scalar_t ws[kCinChunk][kMaxTileChannels];
  const int tc = threadIdx.x % threads_c;
  const int tp = threadIdx.x / threads_c;
  const int c0 = blockIdx.y * tile_channels;
  const int cbase = c0 + tc * kTileC;  // first channel of this thread
  const int pixels_per_image = d.hout * d.wout;
  const int64_t total = int64_t{d.n} * pixels_per_image;
  const int64_t first = int64_t{blockIdx.x} * threads_p * kTileP;

  int64_t image_in[kTileP];  // element offset of the pixel's image in `in`, or -1 past the end
  int oh[kTileP], ow[kTileP];
#pragma unroll
  for (int k = 0; k < kTileP; ++k) {
    const int64_t p = first + tp + int64_t{k} * threads_p;
    if (p < total) {
      const int64_t n = p / pixels_per_image;
      const int q = int(p - n * pixels_per_image);
      oh[k] = q / d.wout;
      ow[k] = q - oh[k] * d.wout;
      image_in[k] = n * d.h * d.w * d.cin;
    } else {
      image_in[k] = -1;
      oh[k] = ow[k] = 0;
    }
  }
  scalar_t acc[kTileP][kTileC];
#pragma unroll
  for (int t = 0; t < kTileC; ++t) {
    const int c = cbase + t;
    const scalar_t b = (bias != nullptr && c < d.cout) ? bias[c] : scalar_t(0);
#pragma unroll
    for (int k = 0; k < kTileP; ++k) acc[k][t] = b;
  }
  const int tile_c = min(tile_channels, d.cout - c0);
  for (int i = 0; i < d.kh; ++i) {
    for (int j = 0; j < d.kw; ++j) {
      for (int ci0 = 0; ci0 < d.cin; ci0 += kCinChunk) {
        const int chunk = min(kCinChunk, d.cin - ci0);
        __syncthreads();  // the previous slab is no longer read
        const int width = threads_c * kTileC;  // every column a thread reads, zero past the tile
        for (int e = threadIdx.x; e < kCinChunk * width; e += blockDim.x) {
          const int cc = e / width, cl = e - cc * width;
          ws[cc][cl] = (cc < chunk && cl < tile_c)
                           ? wt[((int64_t{i} * d.kw + j) * d.cin + ci0 + cc) * d.cout + c0 + cl]
                           : scalar_t(0);
        }
        __syncthreads();
#pragma unroll
        for (int k = 0; k < kTileP; ++k) {
          const int hi = oh[k] + i - d.ph, wi = ow[k] + j - d.pw;
          if (image_in[k] < 0 || hi < 0 || hi >= d.h || wi < 0 || wi >= d.w) continue;
          const scalar_t* xp = in + image_in[k] + (int64_t{hi} * d.w + wi) * d.cin + ci0;
          for (int cc = 0; cc < chunk; ++cc) {
            const scalar_t xv = xp[cc];
#pragma unroll
            for (int t = 0; t < kTileC; ++t) {
              const int cl = tc * kTileC + t;
              acc[k][t] = fma(xv, ws[cc][cl < kMaxTileChannels ? cl : 0], acc[k][t]);
            }
          }
        }
      }
    }
  }
  double sum[kTileC] = {}, sumsq[kTileC] = {};
#pragma unroll
  for (int k = 0; k < kTileP; ++k) {
    if (image_in[k] < 0) continue;
    const int64_t p = first + tp + int64_t{k} * threads_p;
#pragma unroll
    for (int t = 0; t < kTileC; ++t) {
      const int c = cbase + t;
      if (tc * kTileC + t >= tile_c) continue;
      scalar_t v = acc[k][t];
      if (relu) v = v < scalar_t(0) ? scalar_t(0) : v;  // NaN passes through, as torch.relu
      out[p * d.cout + c] = v;
      sum[t] += double(v);
      sumsq[t] += double(v) * double(v);
    }
  }
  if (partial_sum != nullptr) {  // uniform over the block
    __shared__ double red[kThreads * kTileC];
    store_block_partials(sum, tc, tp, threads_c, threads_p, c0, d.cout, red, partial_sum);
    store_block_partials(sumsq, tc, tp, threads_c, threads_p, c0, d.cout, red, partial_sumsq);
  }
}

// Training statistics of channel blockIdx.x over its M = N*Hout*Wout values
// (mean = sum / M, biased var = sum(r^2) / M - mean^2, in double from the
// partials; NaN propagates as on the CPU), then BN's affine map
// y = r * scale + shift, rounded to scalar_t as the CPU rounds it.
template <typename scalar_t>
__global__ void __launch_bounds__(kReduceRowsMax) batch_stats_forward_kernel(
    const double* __restrict__ partial_sum, const double* __restrict__ partial_sumsq, int64_t chunks, int64_t count,
    const scalar_t* __restrict__ bn_weight, const scalar_t* __restrict__ bn_bias, double eps,
    scalar_t* __restrict__ mean_out, scalar_t* __restrict__ var_out, scalar_t* __restrict__ scale,
    scalar_t* __restrict__ shift) {
  __shared__ double shm[kReduceRowsMax];
  const int64_t c = blockIdx.x;
  const double sum = block_row_sum(partial_sum + c * chunks, chunks, shm);
  const double sumsq = block_row_sum(partial_sumsq + c * chunks, chunks, shm);
  if (threadIdx.x == 0) {
    const fastmnist::BatchMoments m = fastmnist::batch_moments(sum, sumsq, double(count));
    mean_out[c] = scalar_t(m.mean);
    var_out[c] = scalar_t(m.var);
    const fastmnist::BnAffine map = fastmnist::bn_affine(double(bn_weight[c]), double(bn_bias[c]), m.mean, m.var, eps);
    scale[c] = scalar_t(map.scale);
    shift[c] = scalar_t(map.shift);
  }
}

// Eval: the affine map from the running statistics.
template <typename scalar_t>
__global__ void bn_eval_affine_forward_kernel(const scalar_t* __restrict__ mean, const scalar_t* __restrict__ var,
                                              const scalar_t* __restrict__ bn_weight,
                                              const scalar_t* __restrict__ bn_bias, double eps, int channels,
                                              scalar_t* __restrict__ scale, scalar_t* __restrict__ shift) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c < channels) {
    const fastmnist::BnAffine map =
        fastmnist::bn_affine(double(bn_weight[c]), double(bn_bias[c]), double(mean[c]), double(var[c]), eps);
    scale[c] = scalar_t(map.scale);
    shift[c] = scalar_t(map.shift);
  }
}

// y = r * (scale[c] s[n, c]) + shift[c] s[n, c]: the channel scale (dropout)
// folds into the affine map, as on the CPU; no pass of its own.
template <typename scalar_t>
__global__ void bn_normalize_forward_kernel(const scalar_t* __restrict__ r, const scalar_t* __restrict__ scale,
                                            const scalar_t* __restrict__ shift,
                                            const scalar_t* __restrict__ channel_scale, int64_t numel,
                                            int channels, int64_t per_image, scalar_t* __restrict__ y) {
  const int64_t step = int64_t{gridDim.x} * blockDim.x;
  for (int64_t i = int64_t{blockIdx.x} * blockDim.x + threadIdx.x; i < numel; i += step) {
    const int c = int(i % channels);
    scalar_t a = scale[c], b = shift[c];
    if (channel_scale != nullptr) {
      const scalar_t s = channel_scale[(i / per_image) * channels + c];
      a *= s;
      b *= s;
    }
    y[i] = fma(r[i], a, b);
  }
}

// --------------------------------------------------------------- backward

// Per-block partials of sum(dy) and sum(dy * xhat) per channel, with
// dy = grad_y * s[n, c] and xhat = (r - mean) * invstd. Same tiling as the
// convolution (kTileP pixels x kTileC channels per thread).
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) bn_grad_partials_backward_kernel(
    const scalar_t* __restrict__ grad_y, const scalar_t* __restrict__ r, const scalar_t* __restrict__ channel_scale,
    const scalar_t* __restrict__ mean, const scalar_t* __restrict__ var, double eps, int64_t pixels,
    int64_t pixels_per_image, int channels, int threads_c, int threads_p, int tile_channels,
    double* __restrict__ partial_dy, double* __restrict__ partial_dy_xhat) {
  const int tc = threadIdx.x % threads_c, tp = threadIdx.x / threads_c;
  const int c0 = blockIdx.y * tile_channels;
  const int tile_c = min(tile_channels, channels - c0);
  const int64_t first = int64_t{blockIdx.x} * threads_p * kTileP;
  double sdy[kTileC] = {}, sdyx[kTileC] = {};
#pragma unroll
  for (int t = 0; t < kTileC; ++t) {
    if (tc * kTileC + t >= tile_c) continue;
    const int c = c0 + tc * kTileC + t;
    const double m = double(mean[c]), invstd = fastmnist::bn_invstd(double(var[c]), eps);
    for (int k = 0; k < kTileP; ++k) {
      const int64_t p = first + tp + int64_t{k} * threads_p;
      if (p >= pixels) break;
      double dy = double(grad_y[p * channels + c]);
      if (channel_scale != nullptr) dy *= double(channel_scale[(p / pixels_per_image) * channels + c]);
      sdy[t] += dy;
      sdyx[t] += dy * (double(r[p * channels + c]) - m) * invstd;
    }
  }
  __shared__ double red[kThreads * kTileC];
  store_block_partials(sdy, tc, tp, threads_c, threads_p, c0, channels, red, partial_dy);
  store_block_partials(sdyx, tc, tp, threads_c, threads_p, c0, channels, red, partial_dy_xhat);
}

// BN backward through y = xhat * w + b over the M values of a channel:
//   grad_bn_bias = sum(dy), grad_bn_weight = sum(dy * xhat)
//   dr = a dy + b r + d   (bn_backward_coefficients, csrc/bn_math.h; eval: b = d = 0,
//                          no r term, so a NaN r gives no NaN gradient)
// stored as coef[c] = {a, b, d} in scalar_t: the CPU's coefficients, from the same function.
template <typename scalar_t>
__global__ void __launch_bounds__(kReduceRowsMax) bn_grad_finalize_backward_kernel(
    const double* __restrict__ partial_dy, const double* __restrict__ partial_dy_xhat, int64_t chunks, int64_t count,
    const scalar_t* __restrict__ bn_weight, const scalar_t* __restrict__ mean, const scalar_t* __restrict__ var,
    double eps, bool training, scalar_t* __restrict__ grad_bn_weight, scalar_t* __restrict__ grad_bn_bias,
    scalar_t* __restrict__ coef) {
  __shared__ double shm[kReduceRowsMax];
  const int64_t c = blockIdx.x;
  const double sum_dy = block_row_sum(partial_dy + c * chunks, chunks, shm);
  const double sum_dy_xhat = block_row_sum(partial_dy_xhat + c * chunks, chunks, shm);
  if (threadIdx.x == 0) {
    grad_bn_bias[c] = scalar_t(sum_dy);
    grad_bn_weight[c] = scalar_t(sum_dy_xhat);
    const fastmnist::BnBackwardCoefficients k = fastmnist::bn_backward_coefficients(
        double(bn_weight[c]), double(mean[c]), double(var[c]), eps, sum_dy, sum_dy_xhat, double(count), training);
    coef[3 * c + 0] = scalar_t(k.a);
    coef[3 * c + 1] = scalar_t(k.b);
    coef[3 * c + 2] = scalar_t(k.d);
  }
}

// dz = r <= 0 ? 0 : a s[n, c] grad_y + b r + d (ReLU's gradient as torch's
// threshold_backward: it passes where r is NaN), and per-block partial
// sum(dz) per channel for grad_bias.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) bn_relu_backward_kernel(
    const scalar_t* __restrict__ grad_y, const scalar_t* __restrict__ r, const scalar_t* __restrict__ channel_scale,
    const scalar_t* __restrict__ coef, bool training, int64_t pixels, int64_t pixels_per_image, int channels,
    int threads_c, int threads_p, int tile_channels, scalar_t* __restrict__ dz, double* __restrict__ partial_dz) {
  const int tc = threadIdx.x % threads_c, tp = threadIdx.x / threads_c;
  const int c0 = blockIdx.y * tile_channels;
  const int tile_c = min(tile_channels, channels - c0);
  const int64_t first = int64_t{blockIdx.x} * threads_p * kTileP;
  double sdz[kTileC] = {};
#pragma unroll
  for (int t = 0; t < kTileC; ++t) {
    if (tc * kTileC + t >= tile_c) continue;
    const int c = c0 + tc * kTileC + t;
    const scalar_t a = coef[3 * c], b = coef[3 * c + 1], d = coef[3 * c + 2];
    for (int k = 0; k < kTileP; ++k) {
      const int64_t p = first + tp + int64_t{k} * threads_p;
      if (p >= pixels) break;
      const int64_t i = p * channels + c;
      const scalar_t rv = r[i];
      scalar_t an = a;
      if (channel_scale != nullptr) an *= channel_scale[(p / pixels_per_image) * channels + c];
      scalar_t v = an * grad_y[i];
      if (training) v = v + b * rv + d;
      v = rv <= scalar_t(0) ? scalar_t(0) : v;
      dz[i] = v;
      sdz[t] += double(v);
    }
  }
  __shared__ double red[kThreads * kTileC];
  store_block_partials(sdz, tc, tp, threads_c, threads_p, c0, channels, red, partial_dz);
}

// out[row] = sum of partial[row, 0..chunks) in a fixed order.
template <typename scalar_t>
__global__ void __launch_bounds__(kReduceRowsMax) row_sum_kernel(const double* __restrict__ partial, int64_t chunks,
                                                                 scalar_t* __restrict__ out) {
  __shared__ double shm[kReduceRowsMax];
  const double total = block_row_sum(partial + int64_t{blockIdx.x} * chunks, chunks, shm);
  if (threadIdx.x == 0) out[blockIdx.x] = scalar_t(total);
}

// Weight gradient as a tiled split-K GEMM over pixels:
//   gw[k, c] = sum_p patch(p)[k] dz[p, c],  k = (i * KW + j) * Cin + ci
// Block (kt, ct, chunk) owns a tile of kTileK rows x up to kMaxTileChannels
// columns and the pixels of its chunk; kWPix pixels at a time are staged in
// shared memory (the patch rows and the dz rows), and each thread accumulates
// a kTileC x kTileC register tile with fp32 FMAs. The block's tile goes to
// partial[chunk, k, c] (scalar_t); weight_reduce_backward_kernel adds the
// chunks in order, in double.
constexpr int kWPix = 32;
constexpr int kTileK = 64;

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) conv_weight_partials_backward_kernel(
    const scalar_t* __restrict__ x, const scalar_t* __restrict__ dz, ConvDims d, int64_t pixels_per_chunk,
    int threads_c, int tile_channels, scalar_t* __restrict__ partial) {
  __shared__ scalar_t xs[kWPix][kTileK];
  __shared__ scalar_t zs[kWPix][kMaxTileChannels];
  __shared__ int kh_of[kTileK], kw_of[kTileK], ci_of[kTileK];
  __shared__ int64_t pix_image[kWPix];
  __shared__ int pix_h[kWPix], pix_w[kWPix];
  const int K = d.kh * d.kw * d.cin;
  const int k0 = blockIdx.x * kTileK, c0 = blockIdx.y * tile_channels;
  const int tile_c = min(tile_channels, d.cout - c0);
  const int tc = threadIdx.x % threads_c, tk = threadIdx.x / threads_c;  // tk < kTileK / kTileC
  const bool active = tk < kTileK / kTileC;
  for (int e = threadIdx.x; e < kTileK; e += blockDim.x) {
    const int k = k0 + e;
    const int tap = k / d.cin;
    ci_of[e] = k < K ? k - tap * d.cin : -1;
    kh_of[e] = tap / d.kw;
    kw_of[e] = tap - (tap / d.kw) * d.kw;
  }
  const int pixels_per_image = d.hout * d.wout;
  const int64_t total = int64_t{d.n} * pixels_per_image;
  const int64_t begin = int64_t{blockIdx.z} * pixels_per_chunk;
  const int64_t end = min(begin + pixels_per_chunk, total);
  scalar_t acc[kTileC][kTileC] = {};
  for (int64_t p0 = begin; p0 < end; p0 += kWPix) {
    __syncthreads();  // the previous stage is no longer read (and the k tables are written)
    for (int e = threadIdx.x; e < kWPix; e += blockDim.x) {
      const int64_t p = p0 + e;
      if (p < end) {
        const int64_t n = p / pixels_per_image;
        const int q = int(p - n * pixels_per_image);
        pix_image[e] = n * d.h * d.w * d.cin;
        pix_h[e] = q / d.wout;
        pix_w[e] = q - pix_h[e] * d.wout;
      } else {
        pix_image[e] = -1;
      }
    }
    for (int e = threadIdx.x; e < kWPix * kMaxTileChannels; e += blockDim.x) {
      const int q = e / kMaxTileChannels, cl = e - q * kMaxTileChannels;
      const int64_t p = p0 + q;
      zs[q][cl] = (p < end && cl < tile_c) ? dz[p * d.cout + c0 + cl] : scalar_t(0);
    }
    __syncthreads();
    for (int e = threadIdx.x; e < kWPix * kTileK; e += blockDim.x) {
      const int q = e / kTileK, kl = e - q * kTileK;
      scalar_t v = scalar_t(0);
      if (pix_image[q] >= 0 && ci_of[kl] >= 0) {
        const int hi = pix_h[q] + kh_of[kl] - d.ph, wi = pix_w[q] + kw_of[kl] - d.pw;
        if (hi >= 0 && hi < d.h && wi >= 0 && wi < d.w) v = x[pix_image[q] + (int64_t{hi} * d.w + wi) * d.cin + ci_of[kl]];
      }
      xs[q][kl] = v;
    }
    __syncthreads();
    if (active) {
      for (int q = 0; q < kWPix; ++q) {
        scalar_t xv[kTileC], zv[kTileC];
#pragma unroll
        for (int a = 0; a < kTileC; ++a) xv[a] = xs[q][tk * kTileC + a];
#pragma unroll
        for (int b = 0; b < kTileC; ++b) zv[b] = zs[q][min(tc * kTileC + b, kMaxTileChannels - 1)];
#pragma unroll
        for (int a = 0; a < kTileC; ++a)
#pragma unroll
          for (int b = 0; b < kTileC; ++b) acc[a][b] = fma(xv[a], zv[b], acc[a][b]);
      }
    }
  }
  if (!active) return;
  scalar_t* out = partial + int64_t{blockIdx.z} * K * d.cout;
#pragma unroll
  for (int a = 0; a < kTileC; ++a) {
    const int k = k0 + tk * kTileC + a;
    if (k >= K) continue;
#pragma unroll
    for (int b = 0; b < kTileC; ++b) {
      const int cl = tc * kTileC + b;
      if (cl < tile_c) out[int64_t{k} * d.cout + c0 + cl] = acc[a][b];
    }
  }
}

// grad_weight[co, ci, i, j] = sum over chunks (in order, in double) of
// partial[chunk, (i * KW + j) * Cin + ci, co], written through the weight's
// strides: grad_weight comes in the weight's own memory format.
template <typename scalar_t>
__global__ void weight_reduce_backward_kernel(const scalar_t* __restrict__ partial, int64_t chunks, ConvDims d,
                                              int64_t s0, int64_t s1, int64_t s2, int64_t s3,
                                              scalar_t* __restrict__ grad_weight) {
  const int64_t outputs = int64_t{d.kh} * d.kw * d.cin * d.cout;
  const int64_t o = int64_t{blockIdx.x} * blockDim.x + threadIdx.x;
  if (o >= outputs) return;
  double acc = 0.0;
  for (int64_t ch = 0; ch < chunks; ++ch) acc += double(partial[ch * outputs + o]);
  const int co = int(o % d.cout);
  const int64_t k = o / d.cout;
  const int ci = int(k % d.cin);
  const int tap = int(k / d.cin);
  const int i = tap / d.kw, j = tap % d.kw;
  grad_weight[co * s0 + ci * s1 + i * s2 + j * s3] = scalar_t(acc);
}

// ------------------------------------------------------------ host side

// Sizes inside one image are indexed in int32.
void check_int32_images(const char* op, const fastmnist::ConvGeometry& g) {
  const int64_t limit = std::numeric_limits<int32_t>::max();
  TORCH_CHECK(g.h * g.w * g.cin < limit && g.hout * g.wout * g.cout < limit &&
                  g.hout * g.wout * std::max(g.cin, g.cout) < limit && g.patch() * g.cout < limit,
              op, ": an image of ", g.h, "x", g.w, "x", g.cin, " (output ", g.hout, "x", g.wout, "x", g.cout,
              ") is too large for the CUDA kernels' 32-bit indexing");
}

using fastmnist::empty_channels_last;

template <typename scalar_t>
void launch_conv(const at::Tensor& in_nhwc, const at::Tensor& wt, const scalar_t* bias, at::Tensor& out,
                 double* partial_sum, double* partial_sumsq, const ConvDims& d, const Tiling& t, bool relu,
                 cudaStream_t stream) {
  conv_forward_kernel<scalar_t><<<t.grid(), t.block(), 0, stream>>>(
      in_nhwc.const_data_ptr<scalar_t>(), wt.const_data_ptr<scalar_t>(), bias, out.mutable_data_ptr<scalar_t>(),
      partial_sum, partial_sumsq, d, t.threads_c, t.threads_p, t.tile_channels, relu);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

unsigned elementwise_blocks(int64_t numel) {
  return unsigned(std::min<int64_t>(ceil_div(numel, kThreads), int64_t{1} << 20));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> conv_relu_bn_cuda(
    const at::Tensor& x_in, const at::Tensor& weight, const at::Tensor& bias, const at::Tensor& bn_weight,
    const at::Tensor& bn_bias, const at::Tensor& running_mean, const at::Tensor& running_var, bool training,
    double eps, at::IntArrayRef padding, const std::optional<at::Tensor>& channel_scale) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // our internals are not ops autograd records
  const c10::cuda::CUDAGuard device_guard(x_in.device());
  fastmnist::ConvReluBnForwardCall call = fastmnist::begin_conv_relu_bn(
      kOp, at::kCUDA, x_in, weight, bias, bn_weight, bn_bias, running_mean, running_var, training, padding,
      channel_scale);
  const fastmnist::ConvGeometry& g = call.g;
  check_int32_images(kOp, g);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  const at::Tensor& x = call.x;
  const at::Tensor wt = weight.permute({2, 3, 1, 0}).contiguous();  // (KH, KW, Cin, Cout)
  at::Tensor& relu_out = call.relu_out;
  at::Tensor& y = call.y;
  at::Tensor& mean = call.mean;
  at::Tensor& var = call.var;
  at::Tensor affine = at::empty({2, g.cout}, x.options());  // scale, shift
  const int64_t pixels = g.n * g.pixels();
  const ConvDims d = forward_dims(g);
  const Tiling t = make_tiling(pixels, g.cout, kTileP);
  at::Tensor partials = training ? at::empty({2, g.cout, t.blocks_p}, x.options().dtype(at::kDouble)) : at::Tensor();

  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "conv_relu_bn_cuda", [&] {
    double* psum = training ? partials.data_ptr<double>() : nullptr;
    double* psumsq = training ? psum + g.cout * t.blocks_p : nullptr;
    launch_conv<scalar_t>(x, wt, call.bias.const_data_ptr<scalar_t>(), relu_out, psum, psumsq, d, t, true, stream);
    scalar_t* scale = affine.mutable_data_ptr<scalar_t>();
    scalar_t* shift = scale + g.cout;
    if (training) {
      batch_stats_forward_kernel<scalar_t><<<unsigned(g.cout), kReduceRowsMax, 0, stream>>>(
          psum, psumsq, t.blocks_p, pixels, call.gamma.const_data_ptr<scalar_t>(), call.beta.const_data_ptr<scalar_t>(), eps,
          mean.mutable_data_ptr<scalar_t>(), var.mutable_data_ptr<scalar_t>(), scale, shift);
    } else {
      bn_eval_affine_forward_kernel<scalar_t><<<unsigned(ceil_div(g.cout, kThreads)), kThreads, 0, stream>>>(
          mean.const_data_ptr<scalar_t>(), var.const_data_ptr<scalar_t>(), call.gamma.const_data_ptr<scalar_t>(),
          call.beta.const_data_ptr<scalar_t>(), eps, int(g.cout), scale, shift);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const int64_t numel = pixels * g.cout;
    bn_normalize_forward_kernel<scalar_t><<<elementwise_blocks(numel), kThreads, 0, stream>>>(
        relu_out.const_data_ptr<scalar_t>(), scale, shift,
        fastmnist::data_or_null<scalar_t>(call.channel_scale), numel, int(g.cout), g.pixels() * g.cout,
        y.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return call.outputs();
}

// Pixel chunks of the weight gradient: about 4 blocks per SM-sized slice of
// the grid in all, at least kWPix pixels a chunk.
int64_t weight_grad_chunks(int64_t pixels, int64_t tiles) {
  const int64_t wanted = std::max<int64_t>(1, 1024 / tiles);
  return std::max<int64_t>(1, std::min({wanted, ceil_div(pixels, 4 * kWPix), kMaxGrid}));
}

template <typename scalar_t>
void launch_weight_grad(const at::Tensor& x, const at::Tensor& dz, const ConvDims& d, at::Tensor& grad_weight,
                        cudaStream_t stream) {
  const int64_t K = int64_t{d.kh} * d.kw * d.cin;
  const int64_t pixels = int64_t{d.n} * d.hout * d.wout;
  const int tile_channels = std::min(d.cout, kMaxTileChannels);
  const int threads_c = int(ceil_div(tile_channels, kTileC));
  const int64_t tiles_k = ceil_div(K, kTileK), tiles_c = ceil_div(d.cout, tile_channels);
  TORCH_CHECK(tiles_k <= std::numeric_limits<int32_t>::max() && tiles_c <= kMaxGrid, kBackwardOp,
              ": weight too large (", K, "x", d.cout, ")");
  const int64_t chunks = weight_grad_chunks(pixels, tiles_k * tiles_c);
  const int64_t pixels_per_chunk = ceil_div(pixels, chunks);
  const int64_t used_chunks = ceil_div(pixels, pixels_per_chunk);
  at::Tensor partial = at::empty({used_chunks, K, d.cout}, x.options());
  const dim3 grid(static_cast<unsigned>(tiles_k), static_cast<unsigned>(tiles_c), static_cast<unsigned>(used_chunks));
  const unsigned threads = unsigned(threads_c * (kTileK / kTileC));
  conv_weight_partials_backward_kernel<scalar_t><<<grid, threads, 0, stream>>>(
      x.const_data_ptr<scalar_t>(), dz.const_data_ptr<scalar_t>(), d, pixels_per_chunk, threads_c, tile_channels,
      partial.mutable_data_ptr<scalar_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const int64_t outputs = K * d.cout;
  weight_reduce_backward_kernel<scalar_t><<<unsigned(ceil_div(outputs, kThreads)), kThreads, 0, stream>>>(
      partial.const_data_ptr<scalar_t>(), used_chunks, d, grad_weight.stride(0), grad_weight.stride(1),
      grad_weight.stride(2), grad_weight.stride(3), grad_weight.mutable_data_ptr<scalar_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> conv_relu_bn_backward_cuda(
    const at::Tensor& grad_y, const at::Tensor& x_in, const at::Tensor& weight, const at::Tensor& relu_out,
    const at::Tensor& bn_weight, const at::Tensor& mean, const at::Tensor& var, bool training, double eps,
    at::IntArrayRef padding, bool compute_grad_x, const std::optional<at::Tensor>& channel_scale) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // our internals are not ops autograd records
  const c10::cuda::CUDAGuard device_guard(x_in.device());
  fastmnist::ConvReluBnBackwardCall call = fastmnist::begin_conv_relu_bn_backward(
      kBackwardOp, at::kCUDA, grad_y, x_in, weight, relu_out, bn_weight, mean, var, padding, compute_grad_x,
      channel_scale);
  const fastmnist::ConvGeometry& g = call.g;
  check_int32_images(kBackwardOp, g);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  const at::Tensor &x = call.x, &dy = call.grad_y, &r = call.relu_out;
  const at::Tensor &gamma = call.gamma, &mean_c = call.mean, &var_c = call.var;
  const int64_t pixels = g.n * g.pixels();
  const Tiling t = make_tiling(pixels, g.cout, kTileP);
  const at::TensorOptions f64 = x.options().dtype(at::kDouble);
  at::Tensor partials = at::empty({3, g.cout, t.blocks_p}, f64);  // sum dy, sum dy xhat, sum dz
  at::Tensor coef = at::empty({g.cout, 3}, x.options());
  at::Tensor dz = empty_channels_last(x, g.n, g.cout, g.hout, g.wout);
  at::Tensor &grad_x = call.grad_x, &grad_weight = call.grad_weight, &grad_bias = call.grad_bias;
  at::Tensor &grad_gamma = call.grad_gamma, &grad_beta = call.grad_beta;

  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "conv_relu_bn_backward_cuda", [&] {
    const scalar_t* s = fastmnist::data_or_null<scalar_t>(call.channel_scale);
    double* p_dy = partials.data_ptr<double>();
    double* p_dyx = p_dy + g.cout * t.blocks_p;
    double* p_dz = p_dyx + g.cout * t.blocks_p;
    bn_grad_partials_backward_kernel<scalar_t><<<t.grid(), t.block(), 0, stream>>>(
        dy.const_data_ptr<scalar_t>(), r.const_data_ptr<scalar_t>(), s, mean_c.const_data_ptr<scalar_t>(),
        var_c.const_data_ptr<scalar_t>(), eps, pixels, g.pixels(), int(g.cout), t.threads_c, t.threads_p,
        t.tile_channels, p_dy, p_dyx);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    bn_grad_finalize_backward_kernel<scalar_t><<<unsigned(g.cout), kReduceRowsMax, 0, stream>>>(
        p_dy, p_dyx, t.blocks_p, pixels, gamma.const_data_ptr<scalar_t>(), mean_c.const_data_ptr<scalar_t>(),
        var_c.const_data_ptr<scalar_t>(), eps, training, grad_gamma.mutable_data_ptr<scalar_t>(),
        grad_beta.mutable_data_ptr<scalar_t>(), coef.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    bn_relu_backward_kernel<scalar_t><<<t.grid(), t.block(), 0, stream>>>(
        dy.const_data_ptr<scalar_t>(), r.const_data_ptr<scalar_t>(), s, coef.const_data_ptr<scalar_t>(), training,
        pixels, g.pixels(), int(g.cout), t.threads_c, t.threads_p, t.tile_channels, dz.mutable_data_ptr<scalar_t>(),
        p_dz);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    row_sum_kernel<scalar_t><<<unsigned(g.cout), kReduceRowsMax, 0, stream>>>(p_dz, t.blocks_p,
                                                                            grad_bias.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    launch_weight_grad<scalar_t>(x, dz, forward_dims(g), grad_weight, stream);
    if (compute_grad_x) {
      const at::Tensor wt = weight.flip({2, 3}).permute({2, 3, 0, 1}).contiguous();  // (KH, KW, Cout, Cin)
      const ConvDims di = input_grad_dims(g);
      const Tiling ti = make_tiling(g.n * g.h * g.w, g.cin, kTileP);
      launch_conv<scalar_t>(dz, wt, nullptr, grad_x, nullptr, nullptr, di, ti, false, stream);
    }
  });
  return call.outputs();
}

// The path the CUDA kernels take (for fastmnist.ops.conv_path and tests).
std::string conv_path_cuda(const at::Tensor& x, const at::Tensor& weight, at::IntArrayRef padding,
                           bool compute_grad_x) {
  const fastmnist::ConvGeometry g = fastmnist::check_conv_inputs("conv_path", x, weight, padding);
  const Tiling t = make_tiling(g.n * g.pixels(), g.cout, kTileP);
  std::string s = "cuda register tiles (" + std::to_string(kTileP) + " pixels x " + std::to_string(kTileC) +
                  " channels a thread, " + std::to_string(t.tile_channels) + " channels a block, " +
                  (x.scalar_type() == at::kFloat ? "fp32" : "fp64") + " FMAs), split-K weight gradient";
  if (compute_grad_x) s += ", input gradient as a flipped convolution";
  return s;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastmnist, CUDA, m) {
  m.impl("conv_relu_bn", &conv_relu_bn_cuda);
  m.impl("conv_relu_bn_backward", &conv_relu_bn_backward_cuda);
  m.impl("conv_path", &conv_path_cuda);
}
