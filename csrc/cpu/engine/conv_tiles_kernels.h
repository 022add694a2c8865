// The register-tiled convolution loops, written once for every vector width.
//
// Included only by the per-ISA translation units (conv_tiles_avx2.cpp,
// conv_tiles_avx512.cpp), each of which turns on its instruction set with
// `#pragma GCC target` and passes its vector types as `Vec` (a struct of
// inline intrinsics: L lanes, kRegisters registers), as ATen compiles its
// native/cpu kernels once per capability. Everything here is in an anonymous
// namespace and uses no standard-library templates, so no out-of-line copy
// compiled for one ISA can be picked by the linker for another.
//
// Both loops work on one NHWC image, straight from the image (no im2col):
//
//   valid_conv:   out[oy, ox, co] = sum_{ky, kx, ci} in[oy + ky, ox + kx, ci] * w[(ky, kx, ci), co]
//                 (forward on the zero-padded input; grad_x on the padded grad_z
//                 with the flipped, transposed weight)
//   weight_grad:  dw[(ky, kx, ci), co] = sum_{oy, ox} in[oy + ky, ox + kx, ci] * dz[oy, ox, co]
//
// CO, the output channels, is a multiple of L. They are covered in blocks of
// V <= 4 registers (L V channels) per pixel; a tile is NP pixels (or NK patch
// entries) x V registers of accumulators, sized so that the accumulators, the
// V weight registers and a broadcast fill the register file.
#pragma once

namespace {

using fastmnist_cpu::ImageGeometry;

#define FASTMNIST_UNROLL _Pragma("GCC unroll 32")

inline int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }
inline int64_t imax(int64_t a, int64_t b) { return a > b ? a : b; }

template <int N>
struct IntC {
  static constexpr int value = N;
};

// Pixels (or patch entries) per tile for V registers per pixel: about 24
// accumulators of 32 registers (AVX-512), 12 of 16 (AVX2), as measured best.
template <typename Vec, int V>
constexpr int tile_rows() {
  return Vec::kRegisters >= 32 ? (V == 1 ? 24 : V == 2 ? 12 : V == 3 ? 8 : 6)
                               : (V == 1 ? 12 : V == 2 ? 6 : V == 3 ? 4 : 3);
}

// Calls fn(IntC<n>) for n in 1 .. N (n = N when larger).
template <int N, typename Fn>
inline void with_tile_size(int64_t n, const Fn& fn) {
  if constexpr (N == 1) {
    fn(IntC<1>{});
  } else {
    if (n >= N) return fn(IntC<N>{});
    with_tile_size<N - 1>(n, fn);
  }
}

// Stores a tile's accumulators acc[j][v] (pixel j, channels c0 + L v ..) at
// out + at + j CO + L v through the epilogue (conv_tiles.h, TileEpilogue).
// The statistics go into the float partials sum[L v ..], sumsq[L v ..] (the
// block adds them to the epilogue's doubles every few tiles). The branches
// are per tile, outside the multiply-add loop.
template <typename Vec, int NP, int V>
inline void store_with_epilogue(typename Vec::type (&acc)[NP][V], const fastmnist_cpu::TileEpilogue& ep,
                                int64_t CO, int64_t c0, int64_t at, float* __restrict__ out,
                                float* __restrict__ sum, float* __restrict__ sumsq) {
  constexpr int L = Vec::L;
  FASTMNIST_UNROLL for (int v = 0; v < V; ++v) {
    const auto bias = ep.bias ? Vec::load(ep.bias + c0 + L * v) : Vec::zero();
    FASTMNIST_UNROLL for (int j = 0; j < NP; ++j) {
      auto r = Vec::add(acc[j][v], bias);
      if (ep.relu) r = Vec::relu(r);
      acc[j][v] = r;
      Vec::store(out + at + j * CO + L * v, r);
    }
  }
  if (ep.sum) {
    FASTMNIST_UNROLL for (int v = 0; v < V; ++v) {
      auto s = Vec::load(sum + L * v), q = Vec::load(sumsq + L * v);
      FASTMNIST_UNROLL for (int j = 0; j < NP; ++j) {
        s = Vec::add(s, acc[j][v]);
        q = Vec::fmadd(acc[j][v], acc[j][v], q);
      }
      Vec::store(sum + L * v, s);
      Vec::store(sumsq + L * v, q);
    }
  }
  if (ep.y) {
    FASTMNIST_UNROLL for (int v = 0; v < V; ++v) {
      const auto scale = Vec::load(ep.scale + c0 + L * v), shift = Vec::load(ep.shift + c0 + L * v);
      FASTMNIST_UNROLL for (int j = 0; j < NP; ++j)
        Vec::store(ep.y + at + j * CO + L * v, Vec::fmadd(acc[j][v], scale, shift));
    }
  }
}

// Adds the float partials of the statistics (V registers of channels from c0)
// to the epilogue's doubles and clears them.
template <typename Vec, int V>
inline void flush_statistics(const fastmnist_cpu::TileEpilogue& ep, int64_t c0, float* sum, float* sumsq) {
  FASTMNIST_UNROLL for (int v = 0; v < V; ++v) {
    Vec::add_to_double(ep.sum + c0 + Vec::L * v, Vec::load(sum + Vec::L * v));
    Vec::add_to_double(ep.sumsq + c0 + Vec::L * v, Vec::load(sumsq + Vec::L * v));
    Vec::store(sum + Vec::L * v, Vec::zero());
    Vec::store(sumsq + Vec::L * v, Vec::zero());
  }
}

// The statistics are summed in float over this many tiles' pixels (at most
// 4 * 24 = 96 values), then added in double: the rounding error of a short
// float sum, at a tenth of the conversions that a per-tile flush costs.
constexpr int kTilesPerFlush = 4;

// NP consecutive output pixels p0 .. p0 + NP - 1 (p = oy * out_w + ox; a tile
// may wrap onto the next row, so narrow images leave no ragged tiles at row
// ends) x output channels c0 .. c0 + L V of CO. (oy0, ox0) is pixel p0.
template <typename Vec, int NP, int V, int S>
inline void valid_conv_tile(const float* __restrict__ in, const float* __restrict__ w, const ImageGeometry& g,
                            int64_t co_runtime, int64_t c0, int64_t p0, int64_t oy0, int64_t ox0, float* __restrict__ out,
                            const fastmnist_cpu::TileEpilogue* ep, float* sum, float* sumsq) {
  constexpr int L = Vec::L;
  const int64_t CO = S > 0 ? S : co_runtime;
  const int64_t ci_n = g.in_c;
  const float* base[NP];  // each pixel's top-left input
  int64_t oy = oy0, ox = ox0;
  FASTMNIST_UNROLL for (int j = 0; j < NP; ++j) {
    if (j > 0 && ++ox == g.out_w) ox = 0, ++oy;  // no division: a tile spans few rows
    base[j] = in + (oy * g.in_w + ox) * ci_n;
  }
  // The taps that read any input of the tile's pixels inside the zero border:
  // output row r reads input rows r + ky, which are not padding for
  // zero_rows <= r + ky < in_h - zero_rows (oy is now the last pixel's row, ox
  // its column; the columns' bound holds when the tile is within one row).
  // Skipping a tap skips only additions of exact zeros.
  const int64_t ky0 = imax(0, g.zero_rows - oy), ky1 = imin(g.kh, g.in_h - g.zero_rows - oy0);
  const bool one_row = oy == oy0;
  const int64_t kx0 = one_row ? imax(0, g.zero_cols - ox) : 0;
  const int64_t kx1 = one_row ? imin(g.kw, g.in_w - g.zero_cols - ox0) : g.kw;
  typename Vec::type acc[NP][V];
  FASTMNIST_UNROLL for (int j = 0; j < NP; ++j)
    FASTMNIST_UNROLL for (int v = 0; v < V; ++v) acc[j][v] = Vec::zero();
  for (int64_t ky = ky0; ky < ky1; ++ky) {
    for (int64_t kx = kx0; kx < kx1; ++kx) {
      const int64_t tap = (ky * g.in_w + kx) * ci_n;
      const float* wt = w + (ky * g.kw + kx) * ci_n * CO + c0;
      for (int64_t ci = 0; ci < ci_n; ++ci) {
        typename Vec::type wv[V];
        FASTMNIST_UNROLL for (int v = 0; v < V; ++v) wv[v] = Vec::load(wt + ci * CO + L * v);
        FASTMNIST_UNROLL for (int j = 0; j < NP; ++j) {
          const auto xb = Vec::broadcast(base[j] + tap + ci);
          FASTMNIST_UNROLL for (int v = 0; v < V; ++v) acc[j][v] = Vec::fmadd(xb, wv[v], acc[j][v]);
        }
      }
    }
  }
  const int64_t at = p0 * CO + c0;
  if (ep == nullptr) {
    FASTMNIST_UNROLL for (int j = 0; j < NP; ++j)
      FASTMNIST_UNROLL for (int v = 0; v < V; ++v) Vec::store(out + at + j * CO + L * v, acc[j][v]);
    return;
  }
  store_with_epilogue<Vec, NP, V>(acc, *ep, CO, c0, at, out, sum, sumsq);
}

// Channels c0 .. c0 + L V of all out_h * out_w pixels, in tiles of NP and one smaller tile for the rest.
template <typename Vec, int V, int S>
void valid_conv_block(const float* in, const float* w, const ImageGeometry& g, int64_t CO, int64_t c0, float* out,
                      const fastmnist_cpu::TileEpilogue* ep) {
  constexpr int NP = tile_rows<Vec, V>();
  const bool stats = ep != nullptr && ep->sum != nullptr;
  alignas(64) float sum[4 * 16] = {}, sumsq[4 * 16] = {};  // float partials of the statistics (V L <= 64)
  const int64_t P = g.out_h * g.out_w;
  int64_t p = 0, oy = 0, ox = 0;
  for (int tiles = 1; p + NP <= P; p += NP, ++tiles) {
    valid_conv_tile<Vec, NP, V, S>(in, w, g, CO, c0, p, oy, ox, out, ep, sum, sumsq);
    for (ox += NP; ox >= g.out_w; ox -= g.out_w) ++oy;
    if (stats && tiles % kTilesPerFlush == 0) flush_statistics<Vec, V>(*ep, c0, sum, sumsq);
  }
  if (p < P)
    with_tile_size<NP - 1>(P - p, [&](auto n) {
      valid_conv_tile<Vec, decltype(n)::value, V, S>(in, w, g, CO, c0, p, oy, ox, out, ep, sum, sumsq);
    });
  if (stats) flush_statistics<Vec, V>(*ep, c0, sum, sumsq);
}

// NK consecutive patch entries k0 .. k0 + NK - 1 (k = (ky * KW + kx) * Cin + ci)
// x channels c0 .. c0 + L V, summed over the output rows [oy0, oy1) and stored
// into dw (first) or added to it.
template <typename Vec, int NK, int V, int S>
inline void weight_grad_tile(const float* __restrict__ in, const float* __restrict__ dz, const ImageGeometry& g,
                             int64_t co_runtime, int64_t c0, int64_t k0, int64_t oy0, int64_t oy1, bool first,
                             float* __restrict__ dw) {
  constexpr int L = Vec::L;
  const int64_t CO = S > 0 ? S : co_runtime;
  int64_t offset[NK];  // where patch entry k0 + j sits relative to the pixel's top-left input
  FASTMNIST_UNROLL for (int j = 0; j < NK; ++j) {
    const int64_t k = k0 + j, ci = k % g.in_c, tap = k / g.in_c;
    offset[j] = ((tap / g.kw) * g.in_w + tap % g.kw) * g.in_c + ci;
  }
  typename Vec::type acc[NK][V];
  FASTMNIST_UNROLL for (int j = 0; j < NK; ++j)
    FASTMNIST_UNROLL for (int v = 0; v < V; ++v) acc[j][v] = Vec::zero();
  for (int64_t oy = oy0; oy < oy1; ++oy) {
    const float* row = in + oy * g.in_w * g.in_c;
    const float* d = dz + oy * g.out_w * CO + c0;
    for (int64_t ox = 0; ox < g.out_w; ++ox) {
      typename Vec::type dv[V];
      FASTMNIST_UNROLL for (int v = 0; v < V; ++v) dv[v] = Vec::load(d + ox * CO + L * v);
      const float* px = row + ox * g.in_c;
      FASTMNIST_UNROLL for (int j = 0; j < NK; ++j) {
        const auto xb = Vec::broadcast(px + offset[j]);
        FASTMNIST_UNROLL for (int v = 0; v < V; ++v) acc[j][v] = Vec::fmadd(xb, dv[v], acc[j][v]);
      }
    }
  }
  FASTMNIST_UNROLL for (int j = 0; j < NK; ++j) {
    FASTMNIST_UNROLL for (int v = 0; v < V; ++v) {
      float* d = dw + (k0 + j) * CO + c0 + L * v;
      Vec::store(d, first ? acc[j][v] : Vec::add(Vec::load(d), acc[j][v]));
    }
  }
}

// Output rows go in blocks whose dz (and input rows) fit the L1 cache, each
// block visiting every patch-entry tile: every tile pass over the image
// would otherwise stream dz from L2.
constexpr int64_t kWeightGradBlockBytes = 12 * 1024;

template <typename Vec, int V, int S>
void weight_grad_block(const float* in, const float* dz, const ImageGeometry& g, int64_t CO, int64_t c0,
                       float* dw, bool accumulate) {
  constexpr int NK = tile_rows<Vec, V>();
  const int64_t K = g.kh * g.kw * g.in_c;
  const int64_t row_bytes = g.out_w * Vec::L * V * static_cast<int64_t>(sizeof(float));
  const int64_t block = imax(1, kWeightGradBlockBytes / row_bytes);
  for (int64_t oy0 = 0; oy0 < g.out_h; oy0 += block) {
    const int64_t oy1 = imin(g.out_h, oy0 + block);
    const bool first = oy0 == 0 && !accumulate;
    int64_t k = 0;
    for (; k + NK <= K; k += NK) weight_grad_tile<Vec, NK, V, S>(in, dz, g, CO, c0, k, oy0, oy1, first, dw);
    if (k < K)
      with_tile_size<NK - 1>(K - k, [&](auto n) {
        weight_grad_tile<Vec, decltype(n)::value, V, S>(in, dz, g, CO, c0, k, oy0, oy1, first, dw);
      });
  }
}

// Calls fn(c0, IntC<V>, IntC<S>) for channel blocks covering CO = L T
// channels with V <= 4 registers each, as even as possible (T = 6 -> 3 + 3,
// T = 7 -> 4 + 3). S is CO when one block covers it (a compile-time stride
// lets the tiles address rows with constant offsets, ~8% faster), else 0.
template <typename Vec, typename Fn>
void for_each_channel_block(int64_t CO, const Fn& fn) {
  const int64_t T = CO / Vec::L;
  switch (T) {
    case 1: return fn(int64_t{0}, IntC<1>{}, IntC<Vec::L>{});
    case 2: return fn(int64_t{0}, IntC<2>{}, IntC<2 * Vec::L>{});
    case 3: return fn(int64_t{0}, IntC<3>{}, IntC<3 * Vec::L>{});
    case 4: return fn(int64_t{0}, IntC<4>{}, IntC<4 * Vec::L>{});
    default: break;
  }
  const int64_t blocks = (T + 3) / 4;
  int64_t c0 = 0;
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t v = (T - c0 / Vec::L + (blocks - b) - 1) / (blocks - b);  // ceil(remaining / blocks left)
    switch (v) {
      case 1: fn(c0, IntC<1>{}, IntC<0>{}); break;
      case 2: fn(c0, IntC<2>{}, IntC<0>{}); break;
      case 3: fn(c0, IntC<3>{}, IntC<0>{}); break;
      default: fn(c0, IntC<4>{}, IntC<0>{}); break;
    }
    c0 += v * Vec::L;
  }
}

template <typename Vec>
void valid_conv_all(const float* in, const float* w, const ImageGeometry& g, int64_t CO, float* out,
                    const fastmnist_cpu::TileEpilogue* ep) {
  for_each_channel_block<Vec>(CO, [&](int64_t c0, auto V, auto S) {
    valid_conv_block<Vec, decltype(V)::value, decltype(S)::value>(in, w, g, CO, c0, out, ep);
  });
}

template <typename Vec>
void weight_grad_all(const float* in, const float* dz, const ImageGeometry& g, int64_t CO, float* dw,
                     bool accumulate) {
  for_each_channel_block<Vec>(CO, [&](int64_t c0, auto V, auto S) {
    weight_grad_block<Vec, decltype(V)::value, decltype(S)::value>(in, dz, g, CO, c0, dw, accumulate);
  });
}

}  // namespace
