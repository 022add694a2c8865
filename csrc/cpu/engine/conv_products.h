// The convolution's three products (forward, weight gradient, input gradient)
// for a chunk of NHWC images, shared by the CPU operators. One decision, made
// once per call: register tiles straight from the image (conv_tiles.h; float32
// on a CPU and ATen capability with AVX2 or AVX-512) or else a patch matrix
// (im2col) per cache-sized chunk and torch's BLAS GEMM. describe() names the
// path, so a caller can see which one ran (fastmnist.ops.conv_path).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include "../../checks.h"
#include "conv_tiles.h"
#include "im2col.h"

#include <algorithm>
#include <string>
#include <type_traits>
#include <vector>

namespace fastmnist_cpu {

// The tiles sum a thread's weight gradient in float over this many images
// (~4,600 pixels per entry for the 24x24 block), then add it to the double
// partials: per image, that addition was 6% of the weight gradient's time.
constexpr int64_t kImagesPerFlush = 8;

// Patch matrices are built for this many bytes' worth of images at a time,
// so that a chunk's col and GEMM output stay in a core's L2 cache.
constexpr int64_t kChunkBytes = 256 * 1024;

inline int64_t images_per_chunk(const ConvGeometry& g, int64_t elem_size) {
  const int64_t per_image = g.pixels() * std::max(g.patch(), g.cout) * elem_size;
  return std::max<int64_t>(1, kChunkBytes / std::max<int64_t>(per_image, 1));
}

// wmat[co, (ky * KW + kx) * Cin + ci] = weight[co, ci, ky, kx]
inline at::Tensor weight_as_matrix(const at::Tensor& weight) {
  return weight.permute({0, 2, 3, 1}).contiguous().view({weight.size(0), -1});
}

// A (rows, cols) matrix view of raw memory, for at::mm_out.
inline at::Tensor as_matrix(void* data, int64_t rows, int64_t cols, const at::TensorOptions& opts) {
  return at::from_blob(data, {rows, cols}, opts);
}

// Copies rows x cols of src (row stride ss) to dst (row stride ds).
template <typename scalar_t>
void copy_rows(const scalar_t* src, int64_t ss, int64_t rows, int64_t cols, scalar_t* dst, int64_t ds) {
  for (int64_t i = 0; i < rows; ++i) std::copy_n(src + i * ss, cols, dst + i * ds);
}

// Why the tiles do not serve this convolution, or nullptr when they do.
// (They serve any Cin and Cout: other counts than multiples of 8 are padded.)
inline const char* tiles_refusal(const ConvGeometry& g, bool is_float) {
  if (!is_float) return "float64 (the tiles are float32)";
  if (tile_isa() == TileIsa::none) return "no AVX2/AVX-512 (CPU, or ATEN_CPU_CAPABILITY=default)";
  if (g.pad_h >= g.kh || g.pad_w >= g.kw) return "padding >= kernel size";
  return nullptr;
}

// The tiles' geometry of the forward (the zero-padded image) and of the input
// gradient (a valid convolution of dz padded by k - 1 - pad with the flipped weight),
// each dimension with its own padding.
inline ImageGeometry forward_image(const ConvGeometry& g) {
  return {g.h + 2 * g.pad_h, g.w + 2 * g.pad_w, g.cin, g.kh, g.kw, g.hout, g.wout, g.pad_h, g.pad_w};
}
inline ImageGeometry input_grad_image(const ConvGeometry& g) {
  const int64_t ph = g.kh - 1 - g.pad_h, pw = g.kw - 1 - g.pad_w;
  return {g.hout + 2 * ph, g.wout + 2 * pw, g.cout, g.kh, g.kw, g.h, g.w, ph, pw};
}

// The path a convolution of this geometry takes, e.g. "avx2 tiles",
// "avx2 tiles, Winograd F(2x2,3x3) forward and input gradient",
// "avx512 tiles, Cout 20 padded to 24" or "im2col+BLAS: float64 (...)".
inline std::string describe_conv_path(const ConvGeometry& g, bool is_float, bool need_grad_x) {
  if (const char* why = tiles_refusal(g, is_float)) return std::string("im2col+BLAS: ") + why;
  std::string path = std::string(tile_isa_name(tile_isa())) + " tiles";
  const bool wf = winograd_applies(forward_image(g)), wx = need_grad_x && winograd_applies(input_grad_image(g));
  if (wf || wx)
    path += std::string(", Winograd F(2x2,3x3) ") + (wf && wx ? "forward and input gradient" : wf ? "forward" : "input gradient");
  if (tile_channels(g.cout) != g.cout)
    path += ", Cout " + std::to_string(g.cout) + " padded to " + std::to_string(tile_channels(g.cout));
  if (need_grad_x && tile_channels(g.cin) != g.cin)
    path += ", Cin " + std::to_string(g.cin) + " padded to " + std::to_string(tile_channels(g.cin));
  return path;
}

template <typename scalar_t>
struct ConvProducts {
  const ConvGeometry& g;
  at::TensorOptions opts;
  bool tiled;
  int64_t co_t = 0, ci_t = 0;  // tiled: Cout and Cin rounded up to the tiles' multiple
  at::Tensor wmat;             // im2col: (Cout, K), k = (ky, kx, ci)
  std::vector<float> w_packed;   // tiled: (K, co_t) for the forward
  std::vector<float> w_flipped;  // tiled: (KH * KW * Cout, ci_t), the flipped, transposed weight for grad_x
  std::vector<float> wino_fwd, wino_dx;  // Winograd: w_packed, w_flipped transformed (empty where it does not apply)
  // Per-thread buffers. padded_x and padded_dz each hold one geometry for the
  // whole call, so their zero borders are written once, not per image.
  std::vector<std::vector<scalar_t>> col, padded_x, padded_dz, grad_tile, out_pad, y_pad;
  std::vector<int64_t> pending;  // tiled: images summed into the thread's grad_tile since its last flush
  std::vector<std::vector<float>> wino_scratch;  // per thread: Winograd's transformed image and products

  ConvProducts(const ConvGeometry& geom, const at::Tensor& weight, const at::TensorOptions& options, int threads,
               bool need_grad_x)
      : g(geom), opts(options), col(threads), padded_x(threads), padded_dz(threads), grad_tile(threads),
        out_pad(threads), y_pad(threads), pending(threads, 0), wino_scratch(threads) {
    tiled = tiles_refusal(g, std::is_same<scalar_t, float>::value) == nullptr;
    if (!tiled) {
      wmat = weight_as_matrix(weight);
      return;
    }
    // Packed by hand from the weight's own strides (contiguous or
    // channels_last): tensor ops would cost several dispatches and copies per call.
    co_t = tile_channels(g.cout);
    ci_t = tile_channels(g.cin);
    const float* wt = weight.const_data_ptr<float>();
    const auto st = weight.strides();
    w_packed.assign(g.patch() * co_t, 0.0f);
    if (need_grad_x) w_flipped.assign(g.kh * g.kw * g.cout * ci_t, 0.0f);
    for (int64_t co = 0; co < g.cout; ++co)
      for (int64_t ci = 0; ci < g.cin; ++ci)
        for (int64_t ky = 0; ky < g.kh; ++ky)
          for (int64_t kx = 0; kx < g.kw; ++kx) {
            const float v = wt[co * st[0] + ci * st[1] + ky * st[2] + kx * st[3]];
            w_packed[((ky * g.kw + kx) * g.cin + ci) * co_t + co] = v;
            if (need_grad_x) w_flipped[(((g.kh - 1 - ky) * g.kw + (g.kw - 1 - kx)) * g.cout + co) * ci_t + ci] = v;
          }
    if (winograd_applies(forward_image(g))) {
      wino_fwd.resize(16 * g.cin * co_t);
      winograd_weights(w_packed.data(), g.cin, co_t, wino_fwd.data());
    }
    if (need_grad_x && winograd_applies(input_grad_image(g))) {
      wino_dx.resize(16 * g.cout * ci_t);
      winograd_weights(w_flipped.data(), g.cout, ci_t, wino_dx.data());
    }
  }

  // The image's convolution on the tiles: Winograd where its weights were
  // transformed (wt not empty), else the direct tiles.
  void tiles_conv(const float* in, const std::vector<float>& w, const std::vector<float>& wt, const ImageGeometry& ig,
                  int64_t CO, float* out, const TileEpilogue* ep, int thread) {
    if (wt.empty()) return valid_conv(in, w.data(), ig, CO, out, ep);
    auto& scratch = wino_scratch[thread];
    scratch.resize(winograd_scratch_floats(ig, CO));
    winograd_conv(in, wt.data(), ig, CO, out, ep, scratch.data());
  }

  // The image zero-padded by (ph, pw) into buf (or itself when no padding).
  // buf is zero-filled only when first sized: later images of the same
  // geometry overwrite the interior and leave the zero border as it is.
  static const scalar_t* pad_image(const scalar_t* img, int64_t h, int64_t w, int64_t c, int64_t ph, int64_t pw,
                                   std::vector<scalar_t>& buf) {
    if (ph == 0 && pw == 0) return img;
    const int64_t W = w + 2 * pw, size = (h + 2 * ph) * W * c;
    if (static_cast<int64_t>(buf.size()) != size) buf.assign(size, scalar_t(0));
    for (int64_t y = 0; y < h; ++y) std::copy_n(img + y * w * c, w * c, buf.data() + ((y + ph) * W + pw) * c);
    return buf.data();
  }

  // This thread's scratch for the y of a tile epilogue with padded channels.
  scalar_t* padded_y(int thread, int64_t size) {
    y_pad[thread].resize(size);
    return y_pad[thread].data();
  }

  // This thread's (rows, cols) scratch for a tile output padded to cols channels.
  float* scratch(int thread, int64_t rows, int64_t cols) {
    auto& buf = out_pad[thread];
    buf.resize(rows * cols);
    return reinterpret_cast<float*>(buf.data());
  }

  // Channels in a tile row: what the arrays of a TileEpilogue hold (Cout, or
  // Cout padded to the tiles' multiple; the padded channels' entries are 0).
  int64_t epilogue_channels() const { return tiled ? co_t : g.cout; }

  // A per-channel vector v (Cout entries) as a TileEpilogue's array: padded with zeros to epilogue_channels().
  std::vector<float> epilogue_vector(const scalar_t* v) const {
    std::vector<float> out(epilogue_channels(), 0.0f);
    std::copy_n(v, g.cout, out.begin());
    return out;
  }

  // z[rows of images first .. first + count, Cout] = conv(x), no bias; or,
  // with an epilogue (tiled only), what the epilogue makes of it (relu_out in
  // z, and its y).
  void forward(const scalar_t* x, int64_t first, int64_t count, int thread, scalar_t* z,
               const TileEpilogue* epilogue = nullptr) {
    const int64_t P = g.pixels(), K = g.patch(), C = g.cout, image = g.h * g.w * g.cin;
    TORCH_INTERNAL_ASSERT(tiled || epilogue == nullptr, "a tile epilogue without tiles");
    // An epilogue's y (and its per-image channel scale) is one image's: the tiled chunk is one image.
    TORCH_INTERNAL_ASSERT(count == 1 || epilogue == nullptr || epilogue->y == nullptr, "an eval epilogue for ",
                          count, " images");
    if (tiled) {
      for (int64_t b = first; b < first + count; ++b) {
        const scalar_t* in = pad_image(x + b * image, g.h, g.w, g.cin, g.pad_h, g.pad_w, padded_x[thread]);
        float* zb = reinterpret_cast<float*>(z + (b - first) * P * C);
        if (co_t == C) {
          tiles_conv(reinterpret_cast<const float*>(in), w_packed, wino_fwd, forward_image(g), C, zb, epilogue, thread);
          continue;
        }
        // Padded channels: the tiles write (P, co_t) scratch rows, copied out without the padding.
        TileEpilogue ep = epilogue ? *epilogue : TileEpilogue{};
        float* y = ep.y;
        if (y) ep.y = reinterpret_cast<float*>(padded_y(thread, P * co_t));
        float* out = scratch(thread, P, co_t);
        tiles_conv(reinterpret_cast<const float*>(in), w_packed, wino_fwd, forward_image(g), co_t, out,
                   epilogue ? &ep : nullptr, thread);
        copy_rows(out, co_t, P, C, zb, C);
        if (y) copy_rows(ep.y, co_t, P, C, y, C);
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
  // summed in scalar_t per chunk (im2col) or over up to kImagesPerFlush images
  // (tiled: the rest wait in the thread's tile for flush_weight_grad), and
  // across those in double (acc, laid out (K, Cout) when tiled, else (Cout, K):
  // see acc_index).
  void weight_grad(const scalar_t* x, const scalar_t* dz, int64_t first, int64_t count, int thread, double* acc) {
    const int64_t P = g.pixels(), K = g.patch(), C = g.cout, image = g.h * g.w * g.cin;
    auto& tile = grad_tile[thread];
    if (tiled) {  // tile is (K, co_t) here
      tile.resize(K * co_t);
      for (int64_t b = first; b < first + count; ++b) {
        const scalar_t* in = pad_image(x + b * image, g.h, g.w, g.cin, g.pad_h, g.pad_w, padded_x[thread]);
        const float* dzb = reinterpret_cast<const float*>(dz + (b - first) * P * C);
        if (co_t != C) {  // dz padded with zero channels, which the tiles' extra columns then sum
          float* d = scratch(thread, P, co_t);
          for (int64_t p = 0; p < P; ++p) {
            std::copy_n(dzb + p * C, C, d + p * co_t);
            std::fill(d + p * co_t + C, d + (p + 1) * co_t, 0.0f);
          }
          dzb = d;
        }
        fastmnist_cpu::weight_grad(reinterpret_cast<const float*>(in), dzb, forward_image(g), co_t,
                                   reinterpret_cast<float*>(tile.data()), /*accumulate=*/pending[thread] > 0);
        if (++pending[thread] == kImagesPerFlush) flush_weight_grad(thread, acc);
      }
      return;
    }
    tile.resize(K * C);
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

  // Adds the thread's tile of pending images (tiled) to acc, its double partials.
  void flush_weight_grad(int thread, double* acc) {
    if (pending[thread] == 0) return;
    const auto& tile = grad_tile[thread];
    const int64_t K = g.patch(), C = g.cout;
    for (int64_t k = 0; k < K; ++k)
      for (int64_t c = 0; c < C; ++c) acc[k * C + c] += tile[k * co_t + c];
    pending[thread] = 0;
  }

  // dx for the chunk's images: the transposed convolution of dz.
  void input_grad(const scalar_t* dz, int64_t first, int64_t count, int thread, scalar_t* dx) {
    (void)first;
    const int64_t P = g.pixels(), K = g.patch(), C = g.cout, image = g.h * g.w * g.cin;
    if (tiled) {  // a valid convolution of dz padded by (k - 1 - pad) with the flipped weight
      const ImageGeometry gx = input_grad_image(g);
      for (int64_t b = 0; b < count; ++b) {
        const scalar_t* in = pad_image(dz + b * P * C, g.hout, g.wout, C, gx.zero_rows, gx.zero_cols, padded_dz[thread]);
        float* dxb = reinterpret_cast<float*>(dx + b * image);
        float* out = ci_t == g.cin ? dxb : scratch(thread, g.h * g.w, ci_t);
        tiles_conv(reinterpret_cast<const float*>(in), w_flipped, wino_dx, gx, ci_t, out, nullptr, thread);
        if (out != dxb) copy_rows(out, ci_t, g.h * g.w, g.cin, dxb, g.cin);
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
  int64_t chunk() const { return tiled ? 1 : images_per_chunk(g, sizeof(scalar_t)); }
};

// Entry i of per-thread partials laid out as partials[thread * n + i], summed
// over the threads in thread order: the same result for the same thread count.
inline double sum_over_threads(const std::vector<double>& partials, int threads, int64_t n, int64_t i) {
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

// grad_wmat sums (double, at acc_index) into grad_weight, in grad_weight's
// own layout (the weight's: channels_last weights get a channels_last
// gradient, so AccumulateGrad keeps it without a copy). Flushes the images
// still pending in the threads' tiles into their partials first.
template <typename scalar_t>
void write_weight_grad(ConvProducts<scalar_t>& conv, std::vector<double>& partials, int threads,
                       at::Tensor& grad_weight) {
  const ConvGeometry& g = conv.g;
  const int64_t K = g.patch();
  for (int t = 0; t < threads; ++t) conv.flush_weight_grad(t, partials.data() + t * g.cout * K);
  const auto st = grad_weight.strides();
  scalar_t* gw = grad_weight.mutable_data_ptr<scalar_t>();
  for (int64_t co = 0; co < g.cout; ++co)
    for (int64_t ky = 0; ky < g.kh; ++ky)
      for (int64_t kx = 0; kx < g.kw; ++kx)
        for (int64_t ci = 0; ci < g.cin; ++ci) {
          const int64_t k = (ky * g.kw + kx) * g.cin + ci;
          gw[co * st[0] + ci * st[1] + ky * st[2] + kx * st[3]] =
              static_cast<scalar_t>(sum_over_threads(partials, threads, g.cout * K, conv.acc_index(co, k)));
        }
}

}  // namespace fastmnist_cpu
