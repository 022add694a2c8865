// CPU kernels of fastmnist::conv_relu_bn and its backward.
//
// Layout: everything runs in NHWC (channels_last). With k = (ky * KW + kx) * Cin + ci
// indexing a pixel's 3x3 (or 1x1) patch and wmat[co, k] the weight in that order,
//     z[p, co] = sum_k patch(p)[k] wmat[co, k] + bias[co].
// Work is split over images. ConvProducts computes the convolution's three
// products (forward, weight gradient, input gradient) for a chunk of images:
// on CPUs with AVX2 and FMA with register-tiled loops straight from the image
// (conv_tiles_avx2.h), elsewhere by building the patch matrix (im2col) of a
// few images in a cache-sized buffer and calling torch's BLAS. The rows of z
// are finished while they are still in cache: bias, ReLU and the per-channel
// sums of the batch statistics in one epilogue. One more pass normalises.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "conv_tiles_avx2.h"

#include <algorithm>
#include <cmath>
#include <optional>
#include <type_traits>
#include <vector>

namespace {

// Patch matrices are built for this many bytes' worth of images at a time,
// so that a chunk's col and GEMM output stay in a core's L2 cache.
constexpr int64_t kChunkBytes = 256 * 1024;

struct ConvGeometry {
  int64_t n, cin, h, w, cout, kh, kw, pad, hout, wout;
  int64_t pixels() const { return hout * wout; }  // output pixels per image
  int64_t patch() const { return kh * kw * cin; }  // K of the GEMM
  bool is_pointwise() const { return kh == 1 && kw == 1 && pad == 0; }
  int64_t images_per_chunk(int64_t elem_size) const {
    int64_t per_image = pixels() * std::max(patch(), cout) * elem_size;
    return std::max<int64_t>(1, kChunkBytes / std::max<int64_t>(per_image, 1));
  }
};

void check_same(const at::Tensor& t, const at::Tensor& x, const char* name) {
  TORCH_CHECK(t.device() == x.device(), "conv_relu_bn: ", name, " is on ", t.device(), " but x is on ", x.device());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), "conv_relu_bn: ", name, " has dtype ", t.scalar_type(),
              " but x has dtype ", x.scalar_type(), "; convert both to float32 or float64");
}

void check_channel_vector(const at::Tensor& t, const at::Tensor& x, int64_t cout, const char* name) {
  check_same(t, x, name);
  TORCH_CHECK(t.dim() == 1 && t.size(0) == cout, "conv_relu_bn: ", name, " must have shape (", cout,
              ",) to match weight's output channels, got ", t.sizes());
}

// channel_scale, when given, must be (N, Cout) like x: one factor per image and output channel.
const at::Tensor* check_channel_scale(const std::optional<at::Tensor>& channel_scale, const at::Tensor& x,
                                      int64_t n, int64_t cout) {
  if (!channel_scale.has_value()) return nullptr;
  const at::Tensor& t = *channel_scale;
  check_same(t, x, "channel_scale");
  TORCH_CHECK(t.dim() == 2 && t.size(0) == n && t.size(1) == cout, "conv_relu_bn: channel_scale must have shape (",
              n, ", ", cout, ") (batch, output channels), got ", t.sizes());
  return &t;
}

ConvGeometry check_conv_inputs(const at::Tensor& x, const at::Tensor& weight, int64_t padding) {
  TORCH_CHECK(x.dim() == 4, "conv_relu_bn: x must be 4-D (N, C, H, W), got shape ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "conv_relu_bn: x must be float32 or float64, got ", x.scalar_type());
  check_same(weight, x, "weight");
  TORCH_CHECK(weight.dim() == 4, "conv_relu_bn: weight must be 4-D (Cout, Cin, KH, KW), got shape ", weight.sizes());
  TORCH_CHECK(weight.size(1) == x.size(1), "conv_relu_bn: x has ", x.size(1), " channels (shape ", x.sizes(),
              ") but weight expects ", weight.size(1), " (shape ", weight.sizes(), ")");
  TORCH_CHECK(padding >= 0, "conv_relu_bn: padding must be >= 0, got ", padding);
  ConvGeometry g{x.size(0), x.size(1), x.size(2), x.size(3), weight.size(0), weight.size(2),
                 weight.size(3), padding, 0, 0};
  g.hout = g.h + 2 * padding - g.kh + 1;
  g.wout = g.w + 2 * padding - g.kw + 1;
  TORCH_CHECK(g.n >= 1, "conv_relu_bn: batch size must be >= 1, got shape ", x.sizes());
  TORCH_CHECK(g.hout >= 1 && g.wout >= 1, "conv_relu_bn: input ", x.sizes(), " with padding ", padding,
              " is smaller than the kernel ", weight.sizes());
  return g;
}

// wmat[co, (ky * KW + kx) * Cin + ci] = weight[co, ci, ky, kx]
at::Tensor weight_as_matrix(const at::Tensor& weight) {
  return weight.permute({0, 2, 3, 1}).contiguous().view({weight.size(0), -1});
}

// Calls fn(std::integral_constant<int64_t, N>) with N = channels for the
// channel counts this network uses, else N = 0 (meaning "read it at run time"),
// so the per-pixel channel loops below compile to straight vector moves.
template <typename Fn>
void dispatch_channels(int64_t channels, const Fn& fn) {
  switch (channels) {
    case 1: return fn(std::integral_constant<int64_t, 1>{});
    case 16: return fn(std::integral_constant<int64_t, 16>{});
    case 24: return fn(std::integral_constant<int64_t, 24>{});
    case 32: return fn(std::integral_constant<int64_t, 32>{});
    default: return fn(std::integral_constant<int64_t, 0>{});
  }
}

// col[p, (ky * KW + kx) * Cin + ci] = x[iy, ix, ci] (zero outside the image)
// for `count` images starting at x; rows are image-major. For a fixed output
// row and tap (ky, kx), consecutive output pixels read consecutive input
// pixels, so the inner loop is a strided run of Cin-wide copies with no
// bounds checks; only the padded border columns are special.
template <typename scalar_t, int64_t CIN>
void im2col_impl(const scalar_t* __restrict__ x, int64_t count, const ConvGeometry& g, scalar_t* __restrict__ col) {
  const int64_t cin = CIN > 0 ? CIN : g.cin;
  const int64_t K = g.kh * g.kw * cin;
  for (int64_t b = 0; b < count; ++b) {
    const scalar_t* img = x + b * g.h * g.w * cin;
    for (int64_t oy = 0; oy < g.hout; ++oy) {
      scalar_t* rows = col + (b * g.hout + oy) * g.wout * K;
      for (int64_t ky = 0; ky < g.kh; ++ky) {
        const int64_t iy = oy + ky - g.pad;
        const bool row_inside = iy >= 0 && iy < g.h;
        for (int64_t kx = 0; kx < g.kw; ++kx) {
          scalar_t* dst = rows + (ky * g.kw + kx) * cin;
          // output columns [lo, hi) read input columns inside the image
          const int64_t lo = std::max<int64_t>(0, g.pad - kx);
          const int64_t hi = std::min<int64_t>(g.wout, g.w + g.pad - kx);
          for (int64_t ox = 0; ox < g.wout; ++ox) {
            scalar_t* d = dst + ox * K;
            if (row_inside && ox >= lo && ox < hi) {
              const scalar_t* s = img + (iy * g.w + ox + kx - g.pad) * cin;
              for (int64_t c = 0; c < cin; ++c) d[c] = s[c];
            } else {
              for (int64_t c = 0; c < cin; ++c) d[c] = scalar_t(0);
            }
          }
        }
      }
    }
  }
}

// The adjoint of im2col: dx[iy, ix, ci] = sum of dcol[p, (ky * KW + kx) * Cin + ci]
// over the (p, ky, kx) that read (iy, ix). Same loop order as im2col_impl.
template <typename scalar_t, int64_t CIN>
void col2im_impl(const scalar_t* __restrict__ dcol, int64_t count, const ConvGeometry& g, scalar_t* __restrict__ dx) {
  const int64_t cin = CIN > 0 ? CIN : g.cin;
  const int64_t K = g.kh * g.kw * cin;
  std::fill(dx, dx + count * g.h * g.w * cin, scalar_t(0));
  for (int64_t b = 0; b < count; ++b) {
    scalar_t* img = dx + b * g.h * g.w * cin;
    for (int64_t oy = 0; oy < g.hout; ++oy) {
      const scalar_t* rows = dcol + (b * g.hout + oy) * g.wout * K;
      for (int64_t ky = 0; ky < g.kh; ++ky) {
        const int64_t iy = oy + ky - g.pad;
        if (iy < 0 || iy >= g.h) continue;
        for (int64_t kx = 0; kx < g.kw; ++kx) {
          const scalar_t* src = rows + (ky * g.kw + kx) * cin;
          const int64_t lo = std::max<int64_t>(0, g.pad - kx);
          const int64_t hi = std::min<int64_t>(g.wout, g.w + g.pad - kx);
          scalar_t* dst = img + (iy * g.w + lo + kx - g.pad) * cin;
          for (int64_t ox = lo; ox < hi; ++ox, dst += cin) {
            const scalar_t* s = src + ox * K;
            for (int64_t c = 0; c < cin; ++c) dst[c] += s[c];
          }
        }
      }
    }
  }
}

template <typename scalar_t>
void im2col(const scalar_t* x, int64_t count, const ConvGeometry& g, scalar_t* col) {
  dispatch_channels(g.cin, [&](auto CIN) { im2col_impl<scalar_t, decltype(CIN)::value>(x, count, g, col); });
}

template <typename scalar_t>
void col2im(const scalar_t* dcol, int64_t count, const ConvGeometry& g, scalar_t* dx) {
  dispatch_channels(g.cin, [&](auto CIN) { col2im_impl<scalar_t, decltype(CIN)::value>(dcol, count, g, dx); });
}

// A (rows, cols) matrix view of raw memory, for at::mm_out.
at::Tensor as_matrix(void* data, int64_t rows, int64_t cols, const at::TensorOptions& opts) {
  return at::from_blob(data, {rows, cols}, opts);
}

// The convolution's three products for a chunk of images, by one of two
// methods: register-tiled AVX2 loops straight from the (padded) image
// (conv_tiles_avx2.h; float32 on CPUs that have AVX2 and FMA), or else a
// patch matrix (im2col) and torch's BLAS GEMM. Buffers are per thread.
template <typename scalar_t>
struct ConvProducts {
  const ConvGeometry& g;
  at::TensorOptions opts;
  at::Tensor wmat;      // (Cout, K), k = (ky, kx, ci)
  at::Tensor w_packed;  // tiled: (K, Cout) for the forward
  at::Tensor w_flipped; // tiled: (KH * KW * Cout, Cin), the flipped, transposed weight for grad_x
  bool tiled;
  std::vector<std::vector<scalar_t>> col, padded, grad_tile;

  ConvProducts(const ConvGeometry& geom, const at::Tensor& weight, const at::TensorOptions& options, int threads,
               bool need_grad_x)
      : g(geom), opts(options), wmat(weight_as_matrix(weight)), col(threads), padded(threads), grad_tile(threads) {
    tiled = std::is_same<scalar_t, float>::value && fastmnist_cpu::conv_tiles_handle(g.cout) &&
            g.pad < g.kh && g.pad < g.kw && (!need_grad_x || fastmnist_cpu::conv_tiles_handle(g.cin));
    if (tiled) {
      w_packed = wmat.t().contiguous();
      if (need_grad_x) w_flipped = weight.flip({2, 3}).permute({2, 3, 0, 1}).contiguous().view({-1, g.cin});
    }
  }

  // The image zero-padded by (ph, pw) into this thread's buffer (or itself when no padding).
  const scalar_t* pad_image(const scalar_t* img, int64_t h, int64_t w, int64_t c, int64_t ph, int64_t pw,
                            int thread) {
    if (ph == 0 && pw == 0) return img;
    auto& buf = padded[thread];
    const int64_t W = w + 2 * pw;
    buf.assign((h + 2 * ph) * W * c, scalar_t(0));
    for (int64_t y = 0; y < h; ++y) std::copy_n(img + y * w * c, w * c, buf.data() + ((y + ph) * W + pw) * c);
    return buf.data();
  }

  fastmnist_cpu::ImageGeometry forward_geometry() const {
    return {g.h + 2 * g.pad, g.w + 2 * g.pad, g.cin, g.kh, g.kw, g.hout, g.wout};
  }

  // z[rows of images first .. first + count, Cout] = conv(x), no bias.
  void forward(const scalar_t* x, int64_t first, int64_t count, int thread, scalar_t* z) {
    const int64_t P = g.pixels(), K = g.patch(), C = g.cout, image = g.h * g.w * g.cin;
    if (tiled) {
      for (int64_t b = first; b < first + count; ++b) {
        const scalar_t* in = pad_image(x + b * image, g.h, g.w, g.cin, g.pad, g.pad, thread);
        fastmnist_cpu::valid_conv(reinterpret_cast<const float*>(in), w_packed.const_data_ptr<float>(),
                                  forward_geometry(), C, reinterpret_cast<float*>(z + (b - first) * P * C));
      }
      return;
    }
    const int64_t rows = count * P;
    at::Tensor z_mat = as_matrix(z, rows, C, opts);
    if (g.is_pointwise()) {
      at::mm_out(z_mat, as_matrix(const_cast<scalar_t*>(x) + first * image, rows, K, opts), wmat.t());
    } else {
      col[thread].resize(rows * K);
      im2col(x + first * image, count, g, col[thread].data());
      at::mm_out(z_mat, as_matrix(col[thread].data(), rows, K, opts), wmat.t());
    }
  }

  // grad_wmat[co, k] += sum over the chunk's pixels of dz[p, co] col[p, k],
  // summed per chunk in scalar_t and across chunks in double (acc, laid out
  // (K, Cout) when tiled, as the tiles are, else (Cout, K): see acc_index).
  void weight_grad(const scalar_t* x, const scalar_t* dz, int64_t first, int64_t count, int thread, double* acc) {
    const int64_t P = g.pixels(), K = g.patch(), C = g.cout, image = g.h * g.w * g.cin;
    auto& tile = grad_tile[thread];
    tile.resize(K * C);
    if (tiled) {  // tile is (K, Cout) here
      for (int64_t b = first; b < first + count; ++b) {
        const scalar_t* in = pad_image(x + b * image, g.h, g.w, g.cin, g.pad, g.pad, thread);
        fastmnist_cpu::weight_grad(reinterpret_cast<const float*>(in),
                                   reinterpret_cast<const float*>(dz + (b - first) * P * C), forward_geometry(), C,
                                   reinterpret_cast<float*>(tile.data()));
        for (int64_t i = 0; i < K * C; ++i) acc[i] += tile[i];
      }
      return;
    }
    const int64_t rows = count * P;
    at::Tensor col_mat;
    if (g.is_pointwise()) {
      col_mat = as_matrix(const_cast<scalar_t*>(x) + first * image, rows, K, opts);
    } else {
      col[thread].resize(rows * K);
      im2col(x + first * image, count, g, col[thread].data());
      col_mat = as_matrix(col[thread].data(), rows, K, opts);
    }
    at::Tensor tile_mat = as_matrix(tile.data(), C, K, opts);
    at::mm_out(tile_mat, as_matrix(const_cast<scalar_t*>(dz), rows, C, opts).t(), col_mat);
    for (int64_t i = 0; i < C * K; ++i) acc[i] += tile[i];
  }

  // dx for the chunk's images: the transposed convolution of dz.
  void input_grad(const scalar_t* dz, int64_t first, int64_t count, int thread, scalar_t* dx) {
    const int64_t P = g.pixels(), K = g.patch(), C = g.cout, image = g.h * g.w * g.cin;
    if (tiled) {  // a valid convolution of dz padded by (k - 1 - pad) with the flipped weight
      const int64_t ph = g.kh - 1 - g.pad, pw = g.kw - 1 - g.pad;
      const fastmnist_cpu::ImageGeometry gx{g.hout + 2 * ph, g.wout + 2 * pw, C, g.kh, g.kw, g.h, g.w};
      for (int64_t b = 0; b < count; ++b) {
        const scalar_t* in = pad_image(dz + b * P * C, g.hout, g.wout, C, ph, pw, thread);
        fastmnist_cpu::valid_conv(reinterpret_cast<const float*>(in), w_flipped.const_data_ptr<float>(), gx,
                                  g.cin, reinterpret_cast<float*>(dx + b * image));
      }
      return;
    }
    const int64_t rows = count * P;
    at::Tensor dz_mat = as_matrix(const_cast<scalar_t*>(dz), rows, C, opts);
    if (g.is_pointwise()) {
      at::Tensor dx_mat = as_matrix(dx, rows, K, opts);
      at::mm_out(dx_mat, dz_mat, wmat);
    } else {
      col[thread].resize(rows * K);
      at::Tensor dcol = as_matrix(col[thread].data(), rows, K, opts);
      at::mm_out(dcol, dz_mat, wmat);
      col2im(col[thread].data(), count, g, dx);
    }
  }

  // Where weight_grad's acc holds grad_wmat[co, k].
  int64_t acc_index(int64_t co, int64_t k) const { return tiled ? k * g.cout + co : co * g.patch() + k; }

  // Images per chunk: one for the tiled loops, else enough rows for the GEMM.
  int64_t chunk() const { return tiled ? 1 : g.images_per_chunk(sizeof(scalar_t)); }
};

// Entry i of per-thread partials laid out as partials[thread * n + i], summed
// over the threads in thread order: the same result for the same thread count.
double sum_over_threads(const std::vector<double>& partials, int threads, int64_t n, int64_t i) {
  double total = 0.0;
  for (int t = 0; t < threads; ++t) total += partials[t * n + i];
  return total;
}

// Runs fn(first_image, count, thread) over chunks of images in parallel.
template <typename Fn>
void for_each_chunk(const ConvGeometry& g, int64_t chunk, const Fn& fn) {
  const int64_t n_chunks = (g.n + chunk - 1) / chunk;
  at::parallel_for(0, n_chunks, 1, [&](int64_t begin, int64_t end) {
    const int thread = at::get_thread_num();
    for (int64_t c = begin; c < end; ++c) {
      const int64_t first = c * chunk;
      fn(first, std::min(chunk, g.n - first), thread);
    }
  });
}

// Rows are summed in blocks of this many in scalar_t, then added into double
// accumulators: vectorisable, and the float rounding error stays that of a
// 64-term sum.
constexpr int64_t kRowBlock = 8;

// r = max(z + bias, 0) in place over rows x C, then either the per-channel
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
      for (int64_t c = 0; c < C; ++c) {
        const scalar_t v = z[i * C + c] + bias[c];
        const scalar_t r = v > scalar_t(0) ? v : scalar_t(0);
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
      const double s = static_cast<double>(gm[c]) / std::sqrt(v[c] + eps);
      scale[c] = static_cast<scalar_t>(s);
      shift[c] = static_cast<scalar_t>(static_cast<double>(bt[c]) - m[c] * s);
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

  std::vector<double> partial_sum(threads * C, 0.0), partial_sumsq(threads * C, 0.0);
  ConvProducts<scalar_t> conv(g, weight, x.options(), threads, /*need_grad_x=*/false);
  for_each_chunk(g, conv.chunk(), [&](int64_t first, int64_t count, int thread) {
    scalar_t* z = r_ptr + first * P * C;
    conv.forward(x_ptr, first, count, thread, z);
    relu_epilogue<scalar_t>(z, b_ptr, count, P, C, training, partial_sum.data() + thread * C,
                            partial_sumsq.data() + thread * C, scale.data(), shift.data(),
                            image_scale(channel_scale, first, C), y_ptr + first * P * C);
  });
  if (!training) return;

  const double M = static_cast<double>(g.n * P);
  scalar_t* mean_ptr = mean.mutable_data_ptr<scalar_t>();
  scalar_t* var_ptr = var.mutable_data_ptr<scalar_t>();
  for (int64_t c = 0; c < C; ++c) {
    m64[c] = sum_over_threads(partial_sum, threads, C, c) / M;
    v64[c] = std::max(sum_over_threads(partial_sumsq, threads, C, c) / M - m64[c] * m64[c], 0.0);
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
    const at::Tensor& x_in, const at::Tensor& weight, const at::Tensor& bias, const at::Tensor& bn_weight,
    const at::Tensor& bn_bias, const at::Tensor& running_mean, const at::Tensor& running_var, bool training,
    double eps, int64_t padding, const std::optional<at::Tensor>& channel_scale_in) {
  const ConvGeometry g = check_conv_inputs(x_in, weight, padding);
  const at::Tensor* channel_scale = check_channel_scale(channel_scale_in, x_in, g.n, g.cout);
  check_channel_vector(bias, x_in, g.cout, "bias");
  check_channel_vector(bn_weight, x_in, g.cout, "bn_weight");
  check_channel_vector(bn_bias, x_in, g.cout, "bn_bias");
  check_channel_vector(running_mean, x_in, g.cout, "running_mean");
  check_channel_vector(running_var, x_in, g.cout, "running_var");
  TORCH_CHECK(!training || g.n * g.pixels() > 1,
              "conv_relu_bn: expected more than 1 value per channel when training, got output of ", g.n, "x",
              g.pixels(), " pixels per channel (input ", x_in.sizes(), ")");
  TORCH_INTERNAL_ASSERT(x_in.device().is_cpu());
  // The ATen calls below (layout copies, GEMMs) are our internals, not ops
  // autograd should record: the registered backward owns the gradient.
  at::AutoDispatchBelowADInplaceOrView below_autograd;

  const at::Tensor x = x_in.contiguous(at::MemoryFormat::ChannelsLast);
  const auto out_opts = x.options().memory_format(at::MemoryFormat::ChannelsLast);
  at::Tensor relu_out = at::empty({g.n, g.cout, g.hout, g.wout}, out_opts);
  at::Tensor y = at::empty({g.n, g.cout, g.hout, g.wout}, out_opts);
  at::Tensor mean = training ? at::empty({g.cout}, x.options()) : running_mean.clone(at::MemoryFormat::Contiguous);
  at::Tensor var = training ? at::empty({g.cout}, x.options()) : running_var.clone(at::MemoryFormat::Contiguous);
  const at::Tensor scale = channel_scale ? channel_scale->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "conv_relu_bn_forward", [&] {
    conv_relu_bn_forward_kernel<scalar_t>(x, weight, bias.contiguous(), bn_weight.contiguous(), bn_bias.contiguous(),
                                          g, training, eps,
                                          scale.defined() ? scale.const_data_ptr<scalar_t>() : nullptr, mean, var,
                                          relu_out, y);
  });
  return {y, relu_out, mean, var};
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
template <typename scalar_t, int64_t CO>
void relu_bn_grad_impl(const scalar_t* __restrict__ dy, const scalar_t* __restrict__ r,
                       const scalar_t* __restrict__ a, const scalar_t* __restrict__ b,
                       const scalar_t* __restrict__ d, int64_t rows, int64_t channels, scalar_t* __restrict__ dz,
                       double* __restrict__ grad_bias, scalar_t* __restrict__ bs) {
  const int64_t C = CO > 0 ? CO : channels;
  for (int64_t i0 = 0; i0 < rows; i0 += kRowBlock) {
    const int64_t i1 = std::min(rows, i0 + kRowBlock);
    for (int64_t c = 0; c < C; ++c) bs[c] = scalar_t(0);
    for (int64_t i = i0; i < i1; ++i) {
      for (int64_t c = 0; c < C; ++c) {
        const scalar_t rv = r[i * C + c];
        const scalar_t g = a[c] * dy[i * C + c] + b[c] * rv + d[c];
        const scalar_t v = rv > scalar_t(0) ? g : scalar_t(0);
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
                  const scalar_t* channel_scale, int64_t images, int64_t P, int64_t channels, scalar_t* dz,
                  double* grad_bias) {
  std::vector<scalar_t> acc(2 * channels);
  dispatch_channels(channels, [&](auto CO) {
    for (int64_t i = 0; i < images; ++i) {
      const int64_t at = i * P * channels;
      const scalar_t* a_n = times_scale(a, image_scale(channel_scale, i, channels), channels,
                                        acc.data() + channels);
      relu_bn_grad_impl<scalar_t, decltype(CO)::value>(dy + at, r + at, a_n, b, d, P, channels, dz + at, grad_bias,
                                                       acc.data());
    }
  });
}

// Backward, with M values per channel, invstd = 1 / sqrt(var + eps),
// xhat = (r - mean) invstd and dy = grad_y * channel_scale (or grad_y).
// BatchNorm (training, batch statistics):
//   dr = gamma invstd (dy - sum_dy / M - xhat sum_dy_xhat / M)
// or, in eval (fixed statistics), dr = gamma invstd dy. ReLU passes dr where
// r > 0: dz = dr [r > 0]. That elementwise pass is fused with the convolution
// backward, chunk by chunk:
//   grad_bias[co] = sum_p dz[p, co],  grad_wmat[co, k] = sum_p dz[p, co] patch(p)[k],
//   dx = the transposed convolution of dz (ConvProducts).
template <typename scalar_t>
void conv_relu_bn_backward_kernel(const at::Tensor& dy_t, const at::Tensor& x, const at::Tensor& weight,
                                  const at::Tensor& r_t, const at::Tensor& gamma, const at::Tensor& mean_t,
                                  const at::Tensor& var_t, const ConvGeometry& g, bool training, double eps,
                                  bool compute_grad_x, const scalar_t* channel_scale, at::Tensor& grad_x, at::Tensor& grad_wmat,
                                  at::Tensor& grad_bias, at::Tensor& grad_gamma, at::Tensor& grad_beta) {
  const int64_t P = g.pixels(), K = g.patch(), C = g.cout, rows_total = g.n * P;
  const int threads = at::get_num_threads();
  const scalar_t* dy = dy_t.const_data_ptr<scalar_t>();
  const scalar_t* r = r_t.const_data_ptr<scalar_t>();
  const scalar_t* x_ptr = x.const_data_ptr<scalar_t>();
  const auto opts = x.options();

  std::vector<double> mean(C), invstd(C), sum_dy(C), sum_dy_xhat(C);
  for (int64_t c = 0; c < C; ++c) {
    mean[c] = mean_t.const_data_ptr<scalar_t>()[c];
    invstd[c] = 1.0 / std::sqrt(static_cast<double>(var_t.const_data_ptr<scalar_t>()[c]) + eps);
  }
  bn_grad_sums_kernel(dy, r, channel_scale, mean, invstd, g.n, P, C, sum_dy, sum_dy_xhat);

  // dz = a[c] * dy + b[c] * r + d[c] where r > 0, else 0: the BN gradient is
  // affine in (dy, r) per channel, so it is three coefficients.
  std::vector<scalar_t> a(C), b(C), d(C);
  const double M = static_cast<double>(rows_total);
  for (int64_t c = 0; c < C; ++c) {
    const double gi = static_cast<double>(gamma.const_data_ptr<scalar_t>()[c]) * invstd[c];
    if (training) {
      const double k = sum_dy_xhat[c] / M * invstd[c];  // coefficient of (r - mean)
      a[c] = static_cast<scalar_t>(gi);
      b[c] = static_cast<scalar_t>(-gi * k);
      d[c] = static_cast<scalar_t>(gi * (k * mean[c] - sum_dy[c] / M));
    } else {
      a[c] = static_cast<scalar_t>(gi);
      b[c] = scalar_t(0);
      d[c] = scalar_t(0);
    }
    grad_beta.mutable_data_ptr<scalar_t>()[c] = static_cast<scalar_t>(sum_dy[c]);
    grad_gamma.mutable_data_ptr<scalar_t>()[c] = static_cast<scalar_t>(sum_dy_xhat[c]);
  }

  ConvProducts<scalar_t> conv(g, weight, opts, threads, compute_grad_x);
  // Each chunk's weight gradient is summed over its rows in scalar_t, then
  // across chunks in double: a float running sum over the whole batch would
  // lose digits to cancellation.
  std::vector<double> grad_w_acc(threads * C * K, 0.0);
  std::vector<double> grad_b_acc(threads * C, 0.0);
  std::vector<std::vector<scalar_t>> dz_buffers(threads);
  scalar_t* dx_ptr = compute_grad_x ? grad_x.mutable_data_ptr<scalar_t>() : nullptr;

  for_each_chunk(g, conv.chunk(), [&](int64_t first, int64_t count, int thread) {
    const int64_t rows = count * P;
    auto& dz = dz_buffers[thread];
    dz.resize(rows * C);
    relu_bn_grad<scalar_t>(dy + first * P * C, r + first * P * C, a.data(), b.data(), d.data(),
                           image_scale(channel_scale, first, C), count, P, C, dz.data(),
                           grad_b_acc.data() + thread * C);
    conv.weight_grad(x_ptr, dz.data(), first, count, thread, grad_w_acc.data() + thread * C * K);
    if (compute_grad_x) conv.input_grad(dz.data(), first, count, thread, dx_ptr + first * g.h * g.w * g.cin);
  });

  scalar_t* gwm = grad_wmat.mutable_data_ptr<scalar_t>();
  for (int64_t c = 0; c < C; ++c)
    for (int64_t k = 0; k < K; ++k)
      gwm[c * K + k] = static_cast<scalar_t>(sum_over_threads(grad_w_acc, threads, C * K, conv.acc_index(c, k)));
  scalar_t* gbias = grad_bias.mutable_data_ptr<scalar_t>();
  for (int64_t c = 0; c < C; ++c) gbias[c] = static_cast<scalar_t>(sum_over_threads(grad_b_acc, threads, C, c));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> conv_relu_bn_backward(
    const at::Tensor& grad_y, const at::Tensor& x_in, const at::Tensor& weight, const at::Tensor& relu_out,
    const at::Tensor& bn_weight, const at::Tensor& mean, const at::Tensor& var, bool training, double eps,
    int64_t padding, bool compute_grad_x, const std::optional<at::Tensor>& channel_scale_in) {
  const ConvGeometry g = check_conv_inputs(x_in, weight, padding);
  const at::Tensor* channel_scale = check_channel_scale(channel_scale_in, x_in, g.n, g.cout);
  const std::vector<int64_t> out_shape{g.n, g.cout, g.hout, g.wout};
  TORCH_CHECK(grad_y.sizes() == out_shape, "conv_relu_bn_backward: grad_y has shape ", grad_y.sizes(),
              ", expected ", out_shape);
  TORCH_CHECK(relu_out.sizes() == out_shape, "conv_relu_bn_backward: relu_out has shape ", relu_out.sizes(),
              ", expected ", out_shape);
  check_same(grad_y, x_in, "grad_y");
  check_same(relu_out, x_in, "relu_out");
  check_channel_vector(bn_weight, x_in, g.cout, "bn_weight");
  check_channel_vector(mean, x_in, g.cout, "mean");
  check_channel_vector(var, x_in, g.cout, "var");
  TORCH_INTERNAL_ASSERT(x_in.device().is_cpu());
  // The ATen calls below (layout copies, GEMMs) are our internals, not ops
  // autograd should record: the registered backward owns the gradient.
  at::AutoDispatchBelowADInplaceOrView below_autograd;

  const auto cl = at::MemoryFormat::ChannelsLast;
  const at::Tensor x = x_in.contiguous(cl);
  const at::Tensor dy = grad_y.contiguous(cl);
  const at::Tensor r = relu_out.contiguous(cl);
  at::Tensor grad_x = compute_grad_x ? at::empty(x.sizes(), x.options().memory_format(cl)) : at::empty({0}, x.options());
  at::Tensor grad_wmat = at::empty({g.cout, g.patch()}, x.options());
  at::Tensor grad_bias = at::empty({g.cout}, x.options());
  at::Tensor grad_gamma = at::empty({g.cout}, x.options());
  at::Tensor grad_beta = at::empty({g.cout}, x.options());
  const at::Tensor scale = channel_scale ? channel_scale->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "conv_relu_bn_backward", [&] {
    conv_relu_bn_backward_kernel<scalar_t>(dy, x, weight, r, bn_weight.contiguous(), mean.contiguous(),
                                           var.contiguous(), g, training, eps, compute_grad_x,
                                           scale.defined() ? scale.const_data_ptr<scalar_t>() : nullptr, grad_x,
                                           grad_wmat, grad_bias, grad_gamma, grad_beta);
  });
  // grad_wmat[co, (ky, kx, ci)] -> grad_weight[co, ci, ky, kx]
  at::Tensor grad_weight =
      grad_wmat.view({g.cout, g.kh, g.kw, g.cin}).permute({0, 3, 1, 2}).contiguous();
  return {grad_x, grad_weight, grad_bias, grad_gamma, grad_beta};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastmnist, CPU, m) {
  m.impl("conv_relu_bn", &conv_relu_bn_forward);
  m.impl("conv_relu_bn_backward", &conv_relu_bn_backward);
}
