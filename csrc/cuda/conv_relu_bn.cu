// CUDA kernels of fastmnist::conv_relu_bn and fastmnist::conv_relu_bn_backward
// (schemas in csrc/ops.cpp).
//
// Every activation is NHWC in memory (channels_last), so a pixel's channels are
// contiguous and "channel = flat index % C". The convolution is stride 1 with
// zero padding. Sums that feed the batch statistics and the weight gradients
// are accumulated in double, per block, into partial buffers that a second
// kernel reduces in a fixed order: no atomics, bitwise-deterministic results.
// The convolution's inner products are also accumulated in double and rounded
// once, which keeps the fused float32 error below the stock layers' error.
//
// Forward (3 launches):
//   conv_bias_relu_forward_kernel   r = relu(conv(x) + bias); per-block partial
//                                   sum(r), sum(r^2) per channel (training)
//   batch_stats_forward_kernel      mean, biased var, and y = r*scale + shift's
//   (or bn_eval_coefficients_...)   per-channel scale and shift
//   bn_normalize_forward_kernel     y
// Backward (5 or 6 launches):
//   bn_grad_partials_backward_kernel   per-block partial sum(dy), sum(dy*xhat)
//   bn_grad_finalize_backward_kernel   grad_bn_bias, grad_bn_weight, coefficients
//   bn_relu_backward_kernel            dz, the fused BN + ReLU gradient
//   conv_weight_partials_backward_kernel, conv_weight_reduce_backward_kernel
//                                      grad_weight and grad_bias
//   conv_input_backward_kernel         grad_x (when asked for)
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
// c10::cuda::getCurrentCUDAStream is the function at::cuda::getCurrentCUDAStream
// names (ATen/cuda/CUDAContext.h re-exports c10::cuda). That header also pulls
// in cuSPARSE, cuBLAS and cuSOLVER headers which a minimal toolkit (CUDA 13
// without the math libraries' dev files) lacks, and this file needs none of them.
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>

namespace {

constexpr int kThreads = 256;          // threads per block, a power of two
constexpr int kPixelsPerThread = 8;    // pixels each thread reduces per chunk
constexpr int kMaxChannelsPerBlock = 32;
// Weight-gradient work is split over pixel chunks until about this many
// threads run; each writes one double partial.
constexpr int64_t kWeightGradThreads = int64_t{1} << 19;
constexpr int64_t kMaxGridY = 65535;
constexpr int64_t kMaxElementwiseBlocks = int64_t{1} << 20;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

unsigned elementwise_blocks(int64_t numel) {
  return static_cast<unsigned>(std::min(ceil_div(numel, kThreads), kMaxElementwiseBlocks));
}

// Shape of a stride-1 convolution: x (N, Cin, H, W) stored NHWC, weight
// (Cout, Cin, KH, KW), output (N, Cout, Hout, Wout) stored NHWC.
struct ConvShape {
  int64_t n, cin, h, w;
  int64_t cout, kh, kw;
  int64_t hout, wout, pad;
  __host__ __device__ int64_t pixels() const { return n * hout * wout; }
};

// Per-channel reductions over pixels run on blocks of (channels, pixels)
// threads: threadIdx.x picks a channel of a tile of up to 32, threadIdx.y
// strides over the pixels of the block's chunk, so a warp reads and writes
// whole contiguous runs of NHWC channels.
struct ChannelTiling {
  dim3 block;
  dim3 grid;                 // (chunks, channel tiles)
  int64_t pixels_per_chunk;
  int64_t chunks;
};

ChannelTiling make_channel_tiling(int64_t pixels, int64_t channels) {
  int channels_per_block = 1;
  while (channels_per_block < channels && channels_per_block < kMaxChannelsPerBlock) {
    channels_per_block *= 2;
  }
  const int pixel_rows = kThreads / channels_per_block;
  const int64_t pixels_per_chunk = int64_t{pixel_rows} * kPixelsPerThread;
  const int64_t chunks = ceil_div(pixels, pixels_per_chunk);
  const int64_t channel_tiles = ceil_div(channels, channels_per_block);
  TORCH_CHECK(chunks <= std::numeric_limits<int32_t>::max() && channel_tiles <= kMaxGridY,
              "conv_relu_bn: too many pixels (", pixels, ") or channels (", channels,
              ") for one launch");
  ChannelTiling t;
  t.block = dim3(channels_per_block, pixel_rows);
  t.grid = dim3(static_cast<unsigned>(chunks), static_cast<unsigned>(channel_tiles));
  t.pixels_per_chunk = pixels_per_chunk;
  t.chunks = chunks;
  return t;
}

// Sums a and b over threadIdx.y for each threadIdx.x in a fixed tree order and
// stores them as chunk blockIdx.x's partials of channel c: pa[c * gridDim.x +
// blockIdx.x]. Every thread of a ChannelTiling block must call it.
__device__ void store_channel_partials(double a, double b, int64_t c, int64_t channels,
                                       double* __restrict__ pa, double* __restrict__ pb) {
  __shared__ double sa[kThreads];
  __shared__ double sb[kThreads];
  const unsigned tid = threadIdx.y * blockDim.x + threadIdx.x;
  sa[tid] = a;
  sb[tid] = b;
  __syncthreads();
  for (unsigned stride = blockDim.y / 2; stride > 0; stride /= 2) {
    if (threadIdx.y < stride) {
      sa[tid] += sa[tid + stride * blockDim.x];
      sb[tid] += sb[tid + stride * blockDim.x];
    }
    __syncthreads();
  }
  if (threadIdx.y == 0 && c < channels) {
    const int64_t at = c * gridDim.x + blockIdx.x;
    pa[at] = sa[threadIdx.x];
    pb[at] = sb[threadIdx.x];
  }
}

// Sum of row[0, len) by a 1-D block whose size is a power of two, in a fixed
// order; every thread gets the total. shm holds blockDim.x doubles.
__device__ double block_row_sum(const double* __restrict__ row, int64_t len, double* shm) {
  double acc = 0.0;
  for (int64_t i = threadIdx.x; i < len; i += blockDim.x) {
    acc += row[i];
  }
  shm[threadIdx.x] = acc;
  __syncthreads();
  for (unsigned stride = blockDim.x / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) {
      shm[threadIdx.x] += shm[threadIdx.x + stride];
    }
    __syncthreads();
  }
  const double total = shm[0];
  __syncthreads();  // shm is free for the caller's next sum
  return total;
}

// BN as an affine map per channel: y = (r - mean) / sqrt(var + eps) * w + b
//                                    = r * scale + shift.
__device__ void bn_affine_coefficients(double mean, double var, double w, double b, double eps,
                                       double* scale, double* shift) {
  const double s = w / sqrt(var + eps);
  *scale = s;
  *shift = b - mean * s;
}

// ---------------------------------------------------------------- forward

// r[p, c] = relu(bias[c] + sum_{i, j, ci} x[n, ho + i - pad, wo + j - pad, ci]
//                                          * weight[c, ci, i, j])
// with x zero outside the image; weight_t is the weight as (KH, KW, Cin, Cout)
// so neighbouring threads (channels) read neighbouring weights. In training,
// also writes this chunk's partial sum(r) and sum(r^2) per channel.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) conv_bias_relu_forward_kernel(
    const scalar_t* __restrict__ x, const scalar_t* __restrict__ weight_t,
    const scalar_t* __restrict__ bias, scalar_t* __restrict__ relu_out,
    double* __restrict__ partial_sum, double* __restrict__ partial_sumsq, ConvShape s,
    int64_t pixels_per_chunk) {
  const int64_t c = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  const int64_t total = s.pixels();
  const int64_t begin = static_cast<int64_t>(blockIdx.x) * pixels_per_chunk;
  const int64_t end = begin + pixels_per_chunk < total ? begin + pixels_per_chunk : total;
  const int64_t tap_stride = s.cin * s.cout;
  double sum = 0.0;
  double sumsq = 0.0;
  if (c < s.cout) {
    const double b = static_cast<double>(bias[c]);
    for (int64_t p = begin + threadIdx.y; p < end; p += blockDim.y) {
      const int64_t wo = p % s.wout;
      const int64_t ho = (p / s.wout) % s.hout;
      const int64_t n = p / (s.wout * s.hout);
      double z = b;
      for (int64_t i = 0; i < s.kh; ++i) {
        const int64_t hi = ho + i - s.pad;
        if (hi < 0 || hi >= s.h) continue;
        for (int64_t j = 0; j < s.kw; ++j) {
          const int64_t wi = wo + j - s.pad;
          if (wi < 0 || wi >= s.w) continue;
          const scalar_t* xp = x + ((n * s.h + hi) * s.w + wi) * s.cin;
          const scalar_t* wp = weight_t + (i * s.kw + j) * tap_stride + c;
          for (int64_t ci = 0; ci < s.cin; ++ci, wp += s.cout) {
            z += static_cast<double>(xp[ci]) * static_cast<double>(*wp);
          }
        }
      }
      // z < 0 is false for NaN, which passes through as in torch.relu.
      const scalar_t r = static_cast<scalar_t>(z < 0.0 ? 0.0 : z);
      relu_out[p * s.cout + c] = r;
      sum += static_cast<double>(r);
      sumsq += static_cast<double>(r) * static_cast<double>(r);
    }
  }
  if (partial_sum != nullptr) {  // uniform over the block
    store_channel_partials(sum, sumsq, c, s.cout, partial_sum, partial_sumsq);
  }
}

// Training statistics of channel blockIdx.x over its M = N*Hout*Wout values:
// mean = sum / M, var = sum(r^2) / M - mean^2 (biased, as BN normalises with),
// both from double sums; then the affine coefficients of y.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) batch_stats_forward_kernel(
    const double* __restrict__ partial_sum, const double* __restrict__ partial_sumsq,
    int64_t chunks, int64_t count, const scalar_t* __restrict__ bn_weight,
    const scalar_t* __restrict__ bn_bias, double eps, scalar_t* __restrict__ mean_out,
    scalar_t* __restrict__ var_out, double* __restrict__ scale, double* __restrict__ shift) {
  __shared__ double shm[kThreads];
  const int64_t c = blockIdx.x;
  const double sum = block_row_sum(partial_sum + c * chunks, chunks, shm);
  const double sumsq = block_row_sum(partial_sumsq + c * chunks, chunks, shm);
  if (threadIdx.x == 0) {
    const double mean = sum / static_cast<double>(count);
    const double var = fmax(sumsq / static_cast<double>(count) - mean * mean, 0.0);
    mean_out[c] = static_cast<scalar_t>(mean);
    var_out[c] = static_cast<scalar_t>(var);
    bn_affine_coefficients(mean, var, static_cast<double>(bn_weight[c]),
                           static_cast<double>(bn_bias[c]), eps, &scale[c], &shift[c]);
  }
}

// Eval: the affine coefficients of y from the running statistics.
template <typename scalar_t>
__global__ void bn_eval_coefficients_forward_kernel(
    const scalar_t* __restrict__ mean, const scalar_t* __restrict__ var,
    const scalar_t* __restrict__ bn_weight, const scalar_t* __restrict__ bn_bias, double eps,
    int64_t channels, double* __restrict__ scale, double* __restrict__ shift) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c < channels) {
    bn_affine_coefficients(static_cast<double>(mean[c]), static_cast<double>(var[c]),
                           static_cast<double>(bn_weight[c]), static_cast<double>(bn_bias[c]),
                           eps, &scale[c], &shift[c]);
  }
}

// y = r * scale[c] + shift[c], in double, rounded once.
template <typename scalar_t>
__global__ void bn_normalize_forward_kernel(const scalar_t* __restrict__ relu_out,
                                            const double* __restrict__ scale,
                                            const double* __restrict__ shift, int64_t numel,
                                            int64_t channels, scalar_t* __restrict__ y) {
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < numel;
       i += step) {
    const int64_t c = i % channels;
    y[i] = static_cast<scalar_t>(static_cast<double>(relu_out[i]) * scale[c] + shift[c]);
  }
}

// --------------------------------------------------------------- backward

// Per-block partials of sum(dy) and sum(dy * xhat) per channel, with
// xhat = (r - mean) * invstd, invstd = 1 / sqrt(var + eps).
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) bn_grad_partials_backward_kernel(
    const scalar_t* __restrict__ grad_y, const scalar_t* __restrict__ relu_out,
    const scalar_t* __restrict__ mean, const scalar_t* __restrict__ var, double eps,
    int64_t pixels, int64_t channels, int64_t pixels_per_chunk,
    double* __restrict__ partial_dy, double* __restrict__ partial_dy_xhat) {
  const int64_t c = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  const int64_t begin = static_cast<int64_t>(blockIdx.x) * pixels_per_chunk;
  const int64_t end = begin + pixels_per_chunk < pixels ? begin + pixels_per_chunk : pixels;
  double sum_dy = 0.0;
  double sum_dy_xhat = 0.0;
  if (c < channels) {
    const double m = static_cast<double>(mean[c]);
    const double invstd = 1.0 / sqrt(static_cast<double>(var[c]) + eps);
    for (int64_t p = begin + threadIdx.y; p < end; p += blockDim.y) {
      const int64_t i = p * channels + c;
      const double dy = static_cast<double>(grad_y[i]);
      sum_dy += dy;
      sum_dy_xhat += dy * (static_cast<double>(relu_out[i]) - m) * invstd;
    }
  }
  store_channel_partials(sum_dy, sum_dy_xhat, c, channels, partial_dy, partial_dy_xhat);
}

// BN backward through y = xhat * w + b, xhat = (r - mean) * invstd, over the
// M = N*Hout*Wout values of a channel:
//   grad_bn_bias   = sum(dy)
//   grad_bn_weight = sum(dy * xhat)
//   training: dr = w * invstd * (dy - sum(dy)/M - xhat * sum(dy * xhat)/M)
//   eval:     dr = w * invstd * dy            (mean and var are constants)
// This kernel reduces the partials of channel blockIdx.x and stores, for
// bn_relu_backward_kernel, coef[c] = {w * invstd, sum(dy)/M, mean,
// invstd * sum(dy * xhat)/M} (the two means are 0 in eval), so that
//   dr = coef0 * (dy - coef1 - (r - coef2) * coef3).
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) bn_grad_finalize_backward_kernel(
    const double* __restrict__ partial_dy, const double* __restrict__ partial_dy_xhat,
    int64_t chunks, int64_t count, const scalar_t* __restrict__ bn_weight,
    const scalar_t* __restrict__ mean, const scalar_t* __restrict__ var, double eps,
    bool training, scalar_t* __restrict__ grad_bn_weight, scalar_t* __restrict__ grad_bn_bias,
    double* __restrict__ coef) {
  __shared__ double shm[kThreads];
  const int64_t c = blockIdx.x;
  const double sum_dy = block_row_sum(partial_dy + c * chunks, chunks, shm);
  const double sum_dy_xhat = block_row_sum(partial_dy_xhat + c * chunks, chunks, shm);
  if (threadIdx.x == 0) {
    grad_bn_bias[c] = static_cast<scalar_t>(sum_dy);
    grad_bn_weight[c] = static_cast<scalar_t>(sum_dy_xhat);
    const double invstd = 1.0 / sqrt(static_cast<double>(var[c]) + eps);
    const double m = static_cast<double>(count);
    coef[4 * c + 0] = static_cast<double>(bn_weight[c]) * invstd;
    coef[4 * c + 1] = training ? sum_dy / m : 0.0;
    coef[4 * c + 2] = static_cast<double>(mean[c]);
    coef[4 * c + 3] = training ? invstd * sum_dy_xhat / m : 0.0;
  }
}

// dz = dr where r > 0 else 0: BN's dr (formula above) and ReLU's backward
// (threshold on the output, as torch's threshold_backward) in one pass.
template <typename scalar_t>
__global__ void bn_relu_backward_kernel(const scalar_t* __restrict__ grad_y,
                                        const scalar_t* __restrict__ relu_out,
                                        const double* __restrict__ coef, int64_t numel,
                                        int64_t channels, scalar_t* __restrict__ grad_z) {
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < numel;
       i += step) {
    const int64_t c = i % channels;
    const scalar_t r = relu_out[i];
    double dz = 0.0;
    if (r > scalar_t(0)) {
      const double* k = coef + 4 * c;
      dz = k[0] * (static_cast<double>(grad_y[i]) - k[1] - (static_cast<double>(r) - k[2]) * k[3]);
    }
    grad_z[i] = static_cast<scalar_t>(dz);
  }
}

// Partial weight and bias gradients over the pixel chunk blockIdx.y:
//   grad_weight[co, ci, i, j] = sum_p dz[p, co] * x[n, ho + i - pad, wo + j - pad, ci]
//   grad_bias[co]             = sum_p dz[p, co]
// Output o < KH*KW*Cin*Cout is the weight entry ((i*KW + j)*Cin + ci)*Cout + co
// (neighbouring threads take neighbouring co, so dz reads coalesce); the last
// Cout outputs are the bias. Stores partial[o * gridDim.y + chunk].
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) conv_weight_partials_backward_kernel(
    const scalar_t* __restrict__ grad_z, const scalar_t* __restrict__ x, ConvShape s,
    int64_t pixels_per_chunk, int64_t outputs, double* __restrict__ partial) {
  const int64_t o = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (o >= outputs) return;
  const int64_t total = s.pixels();
  const int64_t begin = static_cast<int64_t>(blockIdx.y) * pixels_per_chunk;
  const int64_t end = begin + pixels_per_chunk < total ? begin + pixels_per_chunk : total;
  const int64_t co = o % s.cout;
  const bool is_bias = o >= s.kh * s.kw * s.cin * s.cout;
  int64_t ci = 0, i = 0, j = 0;
  if (!is_bias) {
    const int64_t t = o / s.cout;
    ci = t % s.cin;
    i = (t / s.cin) / s.kw;
    j = (t / s.cin) % s.kw;
  }
  // Walk the chunk's pixels with counters, not a division per pixel.
  int64_t wo = begin % s.wout;
  int64_t ho = (begin / s.wout) % s.hout;
  int64_t n = begin / (s.wout * s.hout);
  double acc = 0.0;
  for (int64_t p = begin; p < end; ++p) {
    if (is_bias) {
      acc += static_cast<double>(grad_z[p * s.cout + co]);
    } else {
      const int64_t hi = ho + i - s.pad;
      const int64_t wi = wo + j - s.pad;
      if (hi >= 0 && hi < s.h && wi >= 0 && wi < s.w) {
        acc += static_cast<double>(grad_z[p * s.cout + co]) *
               static_cast<double>(x[((n * s.h + hi) * s.w + wi) * s.cin + ci]);
      }
    }
    if (++wo == s.wout) {
      wo = 0;
      if (++ho == s.hout) {
        ho = 0;
        ++n;
      }
    }
  }
  partial[o * gridDim.y + blockIdx.y] = acc;
}

// Reduces output blockIdx.x's partials over the chunks and writes it to
// grad_weight (contiguous (Cout, Cin, KH, KW)) or grad_bias.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) conv_weight_reduce_backward_kernel(
    const double* __restrict__ partial, int64_t chunks, ConvShape s,
    scalar_t* __restrict__ grad_weight, scalar_t* __restrict__ grad_bias) {
  __shared__ double shm[kThreads];
  const int64_t o = blockIdx.x;
  const double total = block_row_sum(partial + o * chunks, chunks, shm);
  if (threadIdx.x == 0) {
    const int64_t co = o % s.cout;
    const int64_t t = o / s.cout;
    if (t >= s.kh * s.kw * s.cin) {
      grad_bias[co] = static_cast<scalar_t>(total);
    } else {
      const int64_t ci = t % s.cin;
      const int64_t tap = t / s.cin;  // i * KW + j
      grad_weight[(co * s.cin + ci) * s.kh * s.kw + tap] = static_cast<scalar_t>(total);
    }
  }
}

// Transposed convolution (a gather, so no atomics):
//   grad_x[n, hi, wi, ci] = sum_{co, i, j} dz[n, hi - i + pad, wi - j + pad, co]
//                                          * weight[co, ci, i, j]
// over the (ho, wo) inside the output; weight_t is the weight as
// (KH, KW, Cout, Cin) so neighbouring threads (ci) read neighbouring weights.
template <typename scalar_t>
__global__ void conv_input_backward_kernel(const scalar_t* __restrict__ grad_z,
                                           const scalar_t* __restrict__ weight_t, ConvShape s,
                                           int64_t numel, scalar_t* __restrict__ grad_x) {
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t tap_stride = s.cout * s.cin;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < numel;
       idx += step) {
    const int64_t ci = idx % s.cin;
    const int64_t wi = (idx / s.cin) % s.w;
    const int64_t hi = (idx / (s.cin * s.w)) % s.h;
    const int64_t n = idx / (s.cin * s.w * s.h);
    double acc = 0.0;
    for (int64_t i = 0; i < s.kh; ++i) {
      const int64_t ho = hi + s.pad - i;
      if (ho < 0 || ho >= s.hout) continue;
      for (int64_t j = 0; j < s.kw; ++j) {
        const int64_t wo = wi + s.pad - j;
        if (wo < 0 || wo >= s.wout) continue;
        const scalar_t* dzp = grad_z + ((n * s.hout + ho) * s.wout + wo) * s.cout;
        const scalar_t* wp = weight_t + (i * s.kw + j) * tap_stride + ci;
        for (int64_t co = 0; co < s.cout; ++co, wp += s.cin) {
          acc += static_cast<double>(dzp[co]) * static_cast<double>(*wp);
        }
      }
    }
    grad_x[idx] = static_cast<scalar_t>(acc);
  }
}

// ------------------------------------------------------------ host side

void check_like_x(const at::Tensor& t, const char* op, const char* name, const at::Tensor& x) {
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got device ", t.device());
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " is on ", t.device(), " but x is on ",
              x.device());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), op, ": ", name, " has dtype ",
              t.scalar_type(), " but x has dtype ", x.scalar_type());
}

void check_channel_vector(const at::Tensor& t, const char* op, const char* name,
                          const at::Tensor& x, int64_t channels) {
  check_like_x(t, op, name, x);
  TORCH_CHECK(t.dim() == 1 && t.size(0) == channels, op, ": ", name, " must have shape (",
              channels, ",) to match weight's output channels, got ", t.sizes());
}

// Checks x and weight and returns the convolution's shape.
ConvShape conv_shape(const at::Tensor& x, const at::Tensor& weight, int64_t padding,
                     const char* op) {
  TORCH_CHECK(x.is_cuda(), op, ": x must be a CUDA tensor, got device ", x.device());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, op,
              ": x must be float32 or float64, got ", x.scalar_type());
  TORCH_CHECK(x.dim() == 4, op, ": x must be 4-D (N, C, H, W), got shape ", x.sizes());
  check_like_x(weight, op, "weight", x);
  TORCH_CHECK(weight.dim() == 4, op, ": weight must be 4-D (Cout, Cin, KH, KW), got shape ",
              weight.sizes());
  TORCH_CHECK(weight.size(1) == x.size(1), op, ": weight has ", weight.size(1),
              " input channels but x has ", x.size(1), " (x ", x.sizes(), ", weight ",
              weight.sizes(), ")");
  TORCH_CHECK(padding >= 0, op, ": padding must be >= 0, got ", padding);
  TORCH_CHECK(x.size(0) > 0, op, ": batch size must be >= 1, got x of shape ", x.sizes());
  TORCH_CHECK(weight.size(0) > 0 && weight.size(2) > 0 && weight.size(3) > 0, op,
              ": weight must have at least one output channel and a non-empty kernel, got ",
              weight.sizes());
  ConvShape s;
  s.n = x.size(0);
  s.cin = x.size(1);
  s.h = x.size(2);
  s.w = x.size(3);
  s.cout = weight.size(0);
  s.kh = weight.size(2);
  s.kw = weight.size(3);
  s.pad = padding;
  s.hout = s.h + 2 * padding - s.kh + 1;
  s.wout = s.w + 2 * padding - s.kw + 1;
  TORCH_CHECK(s.hout > 0 && s.wout > 0, op, ": kernel ", weight.sizes(),
              " is larger than the padded input ", x.sizes(), " with padding ", padding);
  return s;
}

// channel_scale (N, Cout) as a broadcastable (N, Cout, 1, 1) view, or an
// undefined tensor. On the GPU it is applied with one elementwise multiply
// (forward on y, backward on grad_y) rather than inside our kernels.
at::Tensor channel_scale_view(const std::optional<at::Tensor>& channel_scale, const char* op,
                              const at::Tensor& x, const ConvShape& s) {
  if (!channel_scale.has_value()) return at::Tensor();
  const at::Tensor& t = *channel_scale;
  check_like_x(t, op, "channel_scale", x);
  TORCH_CHECK(t.dim() == 2 && t.size(0) == s.n && t.size(1) == s.cout, op,
              ": channel_scale must have shape (", s.n, ", ", s.cout,
              ") (batch, output channels), got ", t.sizes());
  return t.view({s.n, s.cout, 1, 1});
}

at::Tensor empty_channels_last(const at::Tensor& x, int64_t n, int64_t c, int64_t h, int64_t w) {
  return at::empty({n, c, h, w}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> conv_relu_bn_cuda(
    const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
    const at::Tensor& bn_weight, const at::Tensor& bn_bias, const at::Tensor& running_mean,
    const at::Tensor& running_var, bool training, double eps, int64_t padding,
    const std::optional<at::Tensor>& channel_scale) {
  const char* op = "conv_relu_bn";
  const ConvShape s = conv_shape(x, weight, padding, op);
  const at::Tensor scale_view = channel_scale_view(channel_scale, op, x, s);
  check_channel_vector(bias, op, "bias", x, s.cout);
  check_channel_vector(bn_weight, op, "bn_weight", x, s.cout);
  check_channel_vector(bn_bias, op, "bn_bias", x, s.cout);
  check_channel_vector(running_mean, op, "running_mean", x, s.cout);
  check_channel_vector(running_var, op, "running_var", x, s.cout);
  const int64_t pixels = s.pixels();
  TORCH_CHECK(!training || pixels > 1, op,
              ": expected more than 1 value per channel when training, got output shape (",
              s.n, ", ", s.cout, ", ", s.hout, ", ", s.wout, ")");

  const c10::cuda::CUDAGuard device_guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor x_nhwc = x.contiguous(at::MemoryFormat::ChannelsLast);
  const at::Tensor weight_t = weight.permute({2, 3, 1, 0}).contiguous();  // (KH, KW, Cin, Cout)
  const at::Tensor bias_c = bias.contiguous();
  const at::Tensor bn_weight_c = bn_weight.contiguous();
  const at::Tensor bn_bias_c = bn_bias.contiguous();
  at::Tensor y = empty_channels_last(x, s.n, s.cout, s.hout, s.wout);
  at::Tensor relu_out = empty_channels_last(x, s.n, s.cout, s.hout, s.wout);
  at::Tensor mean = at::empty({s.cout}, x.options());
  at::Tensor var = at::empty({s.cout}, x.options());
  if (!training) {
    mean.copy_(running_mean);
    var.copy_(running_var);
  }
  const at::TensorOptions f64 = x.options().dtype(at::kDouble);
  at::Tensor affine = at::empty({2, s.cout}, f64);  // scale, shift
  const ChannelTiling tiling = make_channel_tiling(pixels, s.cout);
  at::Tensor partials = training ? at::empty({2, s.cout, tiling.chunks}, f64) : at::Tensor();

  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "conv_relu_bn_cuda", [&] {
    double* scale = affine.data_ptr<double>();
    double* shift = scale + s.cout;
    double* partial_sum = training ? partials.data_ptr<double>() : nullptr;
    double* partial_sumsq = training ? partial_sum + s.cout * tiling.chunks : nullptr;
    conv_bias_relu_forward_kernel<scalar_t><<<tiling.grid, tiling.block, 0, stream>>>(
        x_nhwc.data_ptr<scalar_t>(), weight_t.data_ptr<scalar_t>(), bias_c.data_ptr<scalar_t>(),
        relu_out.data_ptr<scalar_t>(), partial_sum, partial_sumsq, s, tiling.pixels_per_chunk);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (training) {
      batch_stats_forward_kernel<scalar_t><<<static_cast<unsigned>(s.cout), kThreads, 0, stream>>>(
          partial_sum, partial_sumsq, tiling.chunks, pixels, bn_weight_c.data_ptr<scalar_t>(),
          bn_bias_c.data_ptr<scalar_t>(), eps, mean.data_ptr<scalar_t>(),
          var.data_ptr<scalar_t>(), scale, shift);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    } else {
      bn_eval_coefficients_forward_kernel<scalar_t>
          <<<static_cast<unsigned>(ceil_div(s.cout, kThreads)), kThreads, 0, stream>>>(
              mean.data_ptr<scalar_t>(), var.data_ptr<scalar_t>(),
              bn_weight_c.data_ptr<scalar_t>(), bn_bias_c.data_ptr<scalar_t>(), eps, s.cout,
              scale, shift);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    const int64_t numel = pixels * s.cout;
    bn_normalize_forward_kernel<scalar_t><<<elementwise_blocks(numel), kThreads, 0, stream>>>(
        relu_out.data_ptr<scalar_t>(), scale, shift, numel, s.cout, y.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  if (scale_view.defined()) y.mul_(scale_view);
  return std::make_tuple(y, relu_out, mean, var);
}

void check_activation(const at::Tensor& t, const char* op, const char* name, const at::Tensor& x,
                      const ConvShape& s) {
  check_like_x(t, op, name, x);
  TORCH_CHECK(t.dim() == 4 && t.size(0) == s.n && t.size(1) == s.cout && t.size(2) == s.hout &&
                  t.size(3) == s.wout,
              op, ": ", name, " must have the output shape (", s.n, ", ", s.cout, ", ", s.hout,
              ", ", s.wout, "), got ", t.sizes());
}

// Number of pixel chunks for the weight gradient: enough threads to fill the
// GPU, at least 32 pixels a chunk, at most kMaxGridY chunks.
int64_t weight_grad_chunks(int64_t pixels, int64_t outputs) {
  const int64_t wanted = ceil_div(kWeightGradThreads, outputs);
  const int64_t most = std::min(ceil_div(pixels, 32), kMaxGridY);
  return std::max<int64_t>(1, std::min(wanted, most));
}

// Launches the weight and bias gradients of the convolution from dz.
template <typename scalar_t>
void launch_conv_weight_backward(const at::Tensor& grad_z, const at::Tensor& x_nhwc,
                                 const ConvShape& s, at::Tensor& grad_weight,
                                 at::Tensor& grad_bias, cudaStream_t stream) {
  const int64_t outputs = s.kh * s.kw * s.cin * s.cout + s.cout;
  const int64_t pixels = s.pixels();
  const int64_t pixels_per_chunk = ceil_div(pixels, weight_grad_chunks(pixels, outputs));
  const int64_t chunks = ceil_div(pixels, pixels_per_chunk);
  const int64_t output_blocks = ceil_div(outputs, kThreads);
  TORCH_CHECK(outputs <= std::numeric_limits<int32_t>::max(),
              "conv_relu_bn_backward: weight too large (", outputs, " gradient entries)");
  at::Tensor partial = at::empty({outputs, chunks}, x_nhwc.options().dtype(at::kDouble));
  const dim3 grid(static_cast<unsigned>(output_blocks), static_cast<unsigned>(chunks));
  conv_weight_partials_backward_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(
      grad_z.data_ptr<scalar_t>(), x_nhwc.data_ptr<scalar_t>(), s, pixels_per_chunk, outputs,
      partial.data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  int reduce_threads = 32;  // a power of two, no wider than the rows
  while (reduce_threads < chunks && reduce_threads < kThreads) reduce_threads *= 2;
  conv_weight_reduce_backward_kernel<scalar_t>
      <<<static_cast<unsigned>(outputs), reduce_threads, 0, stream>>>(
      partial.data_ptr<double>(), chunks, s, grad_weight.data_ptr<scalar_t>(),
      grad_bias.data_ptr<scalar_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
conv_relu_bn_backward_cuda(const at::Tensor& grad_y, const at::Tensor& x,
                           const at::Tensor& weight, const at::Tensor& relu_out,
                           const at::Tensor& bn_weight, const at::Tensor& mean,
                           const at::Tensor& var, bool training, double eps, int64_t padding,
                           bool compute_grad_x, const std::optional<at::Tensor>& channel_scale) {
  const char* op = "conv_relu_bn_backward";
  const ConvShape s = conv_shape(x, weight, padding, op);
  const at::Tensor scale_view = channel_scale_view(channel_scale, op, x, s);
  check_activation(grad_y, op, "grad_y", x, s);
  check_activation(relu_out, op, "relu_out", x, s);
  check_channel_vector(bn_weight, op, "bn_weight", x, s.cout);
  check_channel_vector(mean, op, "mean", x, s.cout);
  check_channel_vector(var, op, "var", x, s.cout);
  const int64_t pixels = s.pixels();

  const c10::cuda::CUDAGuard device_guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  // The gradient reaching BN's output: grad_y times the channel scale.
  const at::Tensor dy = (scale_view.defined() ? grad_y * scale_view : grad_y)
                            .contiguous(at::MemoryFormat::ChannelsLast);
  const at::Tensor r = relu_out.contiguous(at::MemoryFormat::ChannelsLast);
  const at::Tensor x_nhwc = x.contiguous(at::MemoryFormat::ChannelsLast);
  const at::Tensor bn_weight_c = bn_weight.contiguous();
  const at::Tensor mean_c = mean.contiguous();
  const at::Tensor var_c = var.contiguous();
  const at::TensorOptions f64 = x.options().dtype(at::kDouble);
  const ChannelTiling tiling = make_channel_tiling(pixels, s.cout);
  at::Tensor partials = at::empty({2, s.cout, tiling.chunks}, f64);
  at::Tensor coef = at::empty({s.cout, 4}, f64);
  at::Tensor grad_z = empty_channels_last(x, s.n, s.cout, s.hout, s.wout);
  at::Tensor grad_weight = at::empty({s.cout, s.cin, s.kh, s.kw}, x.options());
  at::Tensor grad_bias = at::empty({s.cout}, x.options());
  at::Tensor grad_bn_weight = at::empty({s.cout}, x.options());
  at::Tensor grad_bn_bias = at::empty({s.cout}, x.options());
  at::Tensor grad_x = compute_grad_x ? empty_channels_last(x, s.n, s.cin, s.h, s.w)
                                     : at::empty({0}, x.options());

  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "conv_relu_bn_backward_cuda", [&] {
    double* partial_dy = partials.data_ptr<double>();
    double* partial_dy_xhat = partial_dy + s.cout * tiling.chunks;
    bn_grad_partials_backward_kernel<scalar_t><<<tiling.grid, tiling.block, 0, stream>>>(
        dy.data_ptr<scalar_t>(), r.data_ptr<scalar_t>(), mean_c.data_ptr<scalar_t>(),
        var_c.data_ptr<scalar_t>(), eps, pixels, s.cout, tiling.pixels_per_chunk, partial_dy,
        partial_dy_xhat);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    bn_grad_finalize_backward_kernel<scalar_t><<<static_cast<unsigned>(s.cout), kThreads, 0, stream>>>(
        partial_dy, partial_dy_xhat, tiling.chunks, pixels, bn_weight_c.data_ptr<scalar_t>(),
        mean_c.data_ptr<scalar_t>(), var_c.data_ptr<scalar_t>(), eps, training,
        grad_bn_weight.data_ptr<scalar_t>(), grad_bn_bias.data_ptr<scalar_t>(),
        coef.data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const int64_t numel = pixels * s.cout;
    bn_relu_backward_kernel<scalar_t><<<elementwise_blocks(numel), kThreads, 0, stream>>>(
        dy.data_ptr<scalar_t>(), r.data_ptr<scalar_t>(), coef.data_ptr<double>(), numel, s.cout,
        grad_z.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    launch_conv_weight_backward<scalar_t>(grad_z, x_nhwc, s, grad_weight, grad_bias, stream);
    const int64_t x_numel = s.n * s.cin * s.h * s.w;
    if (compute_grad_x && x_numel > 0) {
      const at::Tensor weight_t = weight.permute({2, 3, 0, 1}).contiguous();  // (KH, KW, Cout, Cin)
      conv_input_backward_kernel<scalar_t><<<elementwise_blocks(x_numel), kThreads, 0, stream>>>(
          grad_z.data_ptr<scalar_t>(), weight_t.data_ptr<scalar_t>(), s, x_numel,
          grad_x.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return std::make_tuple(grad_x, grad_weight, grad_bias, grad_bn_weight, grad_bn_bias);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastmnist, CUDA, m) {
  m.impl("conv_relu_bn", &conv_relu_bn_cuda);
  m.impl("conv_relu_bn_backward", &conv_relu_bn_backward_cuda);
}
