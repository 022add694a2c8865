// Register-tiled convolution loops for x86-64 CPUs with AVX2 and FMA, chosen
// at run time (conv_tiles_supported()) so that one wheel still runs on any
// x86-64 CPU: the rest of the extension is built without -mavx2.
//
// Both work on one NHWC image and compute the convolution directly from the
// image, without the patch matrix (im2col) a GEMM would need:
//
//   valid_conv:   out[oy, ox, co] = sum_{ky, kx, ci} in[oy + ky, ox + kx, ci] * w[(ky, kx, ci), co]
//                 (forward on the zero-padded input; grad_x on the padded grad_z
//                 with the flipped, transposed weight)
//   weight_grad:  dw[(ky, kx, ci), co] = sum_{oy, ox} in[oy + ky, ox + kx, ci] * dz[oy, ox, co]
//
// CO, the channels of the output vector, is 8 V (V ymm registers per pixel);
// a tile holds NP pixels (or NK patch entries) x V registers of accumulators,
// 12 of the 16 ymm registers.
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define FASTMNIST_HAVE_AVX2_TILES 1
#define FASTMNIST_AVX2 __attribute__((target("avx2,fma")))
// Full unrolling of the tile loops lets the compiler keep acc[][] in registers.
#define FASTMNIST_UNROLL _Pragma("GCC unroll 16")
#endif

namespace fastmnist_cpu {

struct ImageGeometry {
  int64_t in_h, in_w, in_c;   // the (already padded) input image, NHWC
  int64_t kh, kw;             // kernel
  int64_t out_h, out_w;       // in_h - kh + 1, in_w - kw + 1
};

#ifdef FASTMNIST_HAVE_AVX2_TILES

inline bool conv_tiles_supported() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
}

// NP consecutive output pixels p0 .. p0 + NP - 1 (p = oy * out_w + ox; a
// tile may wrap onto the next row, so narrow images leave no ragged tiles at
// row ends) x 8V output channels.
// (oy0, ox0) is pixel p0's position.
template <int NP, int V>
FASTMNIST_AVX2 inline void valid_conv_tile(const float* __restrict__ in, const float* __restrict__ w,
                                           const ImageGeometry& g, int64_t p0, int64_t oy0, int64_t ox0,
                                           float* __restrict__ out) {
  constexpr int CO = 8 * V;
  const int64_t ci_n = g.in_c;
  const float* base[NP];  // each pixel's top-left input
  FASTMNIST_UNROLL for (int j = 0; j < NP; ++j) {
    int64_t oy = oy0, ox = ox0 + j;
    while (ox >= g.out_w) ox -= g.out_w, ++oy;  // no division: a tile spans few rows
    base[j] = in + (oy * g.in_w + ox) * ci_n;
  }
  __m256 acc[NP][V];
  FASTMNIST_UNROLL for (int j = 0; j < NP; ++j)
    FASTMNIST_UNROLL for (int v = 0; v < V; ++v) acc[j][v] = _mm256_setzero_ps();
  for (int64_t ky = 0; ky < g.kh; ++ky) {
    for (int64_t kx = 0; kx < g.kw; ++kx) {
      const int64_t tap = (ky * g.in_w + kx) * ci_n;
      const float* wt = w + (ky * g.kw + kx) * ci_n * CO;
      for (int64_t ci = 0; ci < ci_n; ++ci) {
        __m256 wv[V];
        FASTMNIST_UNROLL for (int v = 0; v < V; ++v) wv[v] = _mm256_loadu_ps(wt + ci * CO + 8 * v);
        FASTMNIST_UNROLL for (int j = 0; j < NP; ++j) {
          const __m256 xb = _mm256_broadcast_ss(base[j] + tap + ci);
          FASTMNIST_UNROLL for (int v = 0; v < V; ++v) acc[j][v] = _mm256_fmadd_ps(xb, wv[v], acc[j][v]);
        }
      }
    }
  }
  float* dst = out + p0 * CO;
  FASTMNIST_UNROLL for (int j = 0; j < NP; ++j)
    FASTMNIST_UNROLL for (int v = 0; v < V; ++v) _mm256_storeu_ps(dst + j * CO + 8 * v, acc[j][v]);
}

// Calls fn(std::integral_constant<int, n>{}) for a tile size n in 1 .. 12.
template <typename Fn>
inline void with_tile_size(int64_t n, const Fn& fn) {
  switch (n) {
    case 1: return fn(std::integral_constant<int, 1>{});
    case 2: return fn(std::integral_constant<int, 2>{});
    case 3: return fn(std::integral_constant<int, 3>{});
    case 4: return fn(std::integral_constant<int, 4>{});
    case 5: return fn(std::integral_constant<int, 5>{});
    case 6: return fn(std::integral_constant<int, 6>{});
    case 7: return fn(std::integral_constant<int, 7>{});
    case 8: return fn(std::integral_constant<int, 8>{});
    case 9: return fn(std::integral_constant<int, 9>{});
    case 10: return fn(std::integral_constant<int, 10>{});
    case 11: return fn(std::integral_constant<int, 11>{});
    default: return fn(std::integral_constant<int, 12>{});
  }
}

// All out_h * out_w pixels in tiles of NP, and one smaller tile for the rest.
template <int NP, int V>
FASTMNIST_AVX2 void valid_conv_all(const float* __restrict__ in, const float* __restrict__ w,
                                   const ImageGeometry& g, float* __restrict__ out) {
  const int64_t P = g.out_h * g.out_w;
  int64_t p = 0, oy = 0, ox = 0;
  for (; p + NP <= P; p += NP) {
    valid_conv_tile<NP, V>(in, w, g, p, oy, ox, out);
    for (ox += NP; ox >= g.out_w; ox -= g.out_w) ++oy;
  }
  if (p < P)
    with_tile_size(P - p, [&](auto n) { valid_conv_tile<decltype(n)::value, V>(in, w, g, p, oy, ox, out); });
}

// NK consecutive patch entries k0 .. k0 + NK - 1 (k = (ky * KW + kx) * Cin + ci)
// x 8V channels, summed over the output rows [oy0, oy1) and stored into dw
// (first) or added to it.
template <int NK, int V>
FASTMNIST_AVX2 inline void weight_grad_tile(const float* __restrict__ in, const float* __restrict__ dz,
                                            const ImageGeometry& g, int64_t k0, int64_t oy0, int64_t oy1,
                                            bool first, float* __restrict__ dw) {
  constexpr int CO = 8 * V;
  int64_t offset[NK];  // where patch entry k0 + j sits relative to the pixel's top-left input
  FASTMNIST_UNROLL for (int j = 0; j < NK; ++j) {
    const int64_t k = k0 + j, ci = k % g.in_c, tap = k / g.in_c;
    offset[j] = ((tap / g.kw) * g.in_w + tap % g.kw) * g.in_c + ci;
  }
  __m256 acc[NK][V];
  FASTMNIST_UNROLL for (int j = 0; j < NK; ++j)
    FASTMNIST_UNROLL for (int v = 0; v < V; ++v) acc[j][v] = _mm256_setzero_ps();
  for (int64_t oy = oy0; oy < oy1; ++oy) {
    const float* row = in + oy * g.in_w * g.in_c;
    const float* d = dz + oy * g.out_w * CO;
    for (int64_t ox = 0; ox < g.out_w; ++ox) {
      __m256 dv[V];
      FASTMNIST_UNROLL for (int v = 0; v < V; ++v) dv[v] = _mm256_loadu_ps(d + ox * CO + 8 * v);
      const float* px = row + ox * g.in_c;
      FASTMNIST_UNROLL for (int j = 0; j < NK; ++j) {
        const __m256 xb = _mm256_broadcast_ss(px + offset[j]);
        FASTMNIST_UNROLL for (int v = 0; v < V; ++v) acc[j][v] = _mm256_fmadd_ps(xb, dv[v], acc[j][v]);
      }
    }
  }
  FASTMNIST_UNROLL for (int j = 0; j < NK; ++j) {
    FASTMNIST_UNROLL for (int v = 0; v < V; ++v) {
      float* d = dw + (k0 + j) * CO + 8 * v;
      _mm256_storeu_ps(d, first ? acc[j][v] : _mm256_add_ps(_mm256_loadu_ps(d), acc[j][v]));
    }
  }
}

// Output rows go in blocks whose dz (and input rows) fit the L1 cache, each
// block visiting every patch-entry tile: every tile pass over the image
// would otherwise stream dz from L2.
constexpr int64_t kWeightGradBlockBytes = 12 * 1024;

template <int NK, int V>
FASTMNIST_AVX2 void weight_grad_all(const float* __restrict__ in, const float* __restrict__ dz,
                                    const ImageGeometry& g, float* __restrict__ dw) {
  const int64_t K = g.kh * g.kw * g.in_c;
  const int64_t row_bytes = g.out_w * 8 * V * static_cast<int64_t>(sizeof(float));
  const int64_t block = std::max<int64_t>(1, kWeightGradBlockBytes / row_bytes);
  for (int64_t oy0 = 0; oy0 < g.out_h; oy0 += block) {
    const int64_t oy1 = std::min(g.out_h, oy0 + block);
    const bool first = oy0 == 0;
    int64_t k = 0;
    for (; k + NK <= K; k += NK) weight_grad_tile<NK, V>(in, dz, g, k, oy0, oy1, first, dw);
    if (k < K)
      with_tile_size(K - k,
                     [&](auto n) { weight_grad_tile<decltype(n)::value, V>(in, dz, g, k, oy0, oy1, first, dw); });
  }
}

// Entry points: out channels co must be 8, 16, 24 or 32 (see conv_tiles_handle).
inline void valid_conv(const float* in, const float* w, const ImageGeometry& g, int64_t co, float* out) {
  switch (co) {
    case 8: return valid_conv_all<12, 1>(in, w, g, out);
    case 16: return valid_conv_all<6, 2>(in, w, g, out);
    case 24: return valid_conv_all<4, 3>(in, w, g, out);
    default: return valid_conv_all<3, 4>(in, w, g, out);
  }
}

inline void weight_grad(const float* in, const float* dz, const ImageGeometry& g, int64_t co, float* dw) {
  switch (co) {
    case 8: return weight_grad_all<12, 1>(in, dz, g, dw);
    case 16: return weight_grad_all<6, 2>(in, dz, g, dw);
    case 24: return weight_grad_all<4, 3>(in, dz, g, dw);
    default: return weight_grad_all<3, 4>(in, dz, g, dw);
  }
}

#else

inline bool conv_tiles_supported() { return false; }
inline void valid_conv(const float*, const float*, const ImageGeometry&, int64_t, float*) {}
inline void weight_grad(const float*, const float*, const ImageGeometry&, int64_t, float*) {}

#endif

// Whether these loops serve a convolution with `co` output-vector channels.
inline bool conv_tiles_handle(int64_t co) {
  return conv_tiles_supported() && (co == 8 || co == 16 || co == 24 || co == 32);
}

}  // namespace fastmnist_cpu
