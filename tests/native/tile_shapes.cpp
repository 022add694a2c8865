// The tile loops of csrc/cpu/engine/conv_tiles_kernels.h at the AVX-512 build's tile shapes, run with AVX2
// instructions, against a direct convolution in double: on a CPU without AVX-512 this still checks
// everything of that build but its eight intrinsic wrappers (16-lane blocks with 32 registers, 8-lane
// blocks with 32 registers, several channel blocks, tiles that wrap across rows, the remainder tiles,
// the forward's epilogue: bias, ReLU, batch statistics and the affine map; and Winograd F(2x2, 3x3)
// where it applies, with the same epilogues), at square and rectangular kernels (3x5, 5x3, 1x3) whose
// zero borders differ between rows and columns, as per-dimension padding makes them.
// Built and run by tests/test_ops.py::test_tile_loops_at_the_avx512_builds_shapes; exit 0 when all agree.
#include <cstdint>
#include <cstdio>
#include <algorithm>
#include <cmath>
#include <vector>
#include <random>
#include <immintrin.h>
#include "conv_tiles.h"
bool fastmnist_cpu::winograd_enabled() { return true; }  // conv_tiles.cpp's reads the environment
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#include "conv_tiles_ymm.h"
namespace {
struct Zmm16 {  // a 16-lane vector made of two ymm: the Zmm tile shapes, on AVX2
  struct type { __m256 a, b; };
  static constexpr int L = 16, kRegisters = 32;
  static inline type zero() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
  static inline type load(const float* p) { return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
  static inline void store(float* p, type v) { _mm256_storeu_ps(p, v.a); _mm256_storeu_ps(p + 8, v.b); }
  static inline type broadcast(const float* p) { __m256 x = _mm256_broadcast_ss(p); return {x, x}; }
  static inline type fmadd(type a, type b, type c) { return {_mm256_fmadd_ps(a.a, b.a, c.a), _mm256_fmadd_ps(a.b, b.b, c.b)}; }
  static inline type add(type a, type b) { return {_mm256_add_ps(a.a, b.a), _mm256_add_ps(a.b, b.b)}; }
  static inline type sub(type a, type b) { return {_mm256_sub_ps(a.a, b.a), _mm256_sub_ps(a.b, b.b)}; }
  static inline type relu(type v) { return {Ymm<16>::relu(v.a), Ymm<16>::relu(v.b)}; }
  static inline void add_to_double(double* d, type v) { Ymm<16>::add_to_double(d, v.a); Ymm<16>::add_to_double(d + 8, v.b); }
};
}
#include "conv_tiles_kernels.h"
#include "conv_winograd_kernels.h"
// A KH x KW kernel; border_rows / border_cols > 0: the input's outer rows / columns are zero and the
// geometry says so (valid_conv then skips the taps that read only them, as the input gradient does).
template <class V> double check(int H, int W, int CI, int CO, int KH, int KW, int border_rows, int border_cols) {
  using fastmnist_cpu::ImageGeometry;
  ImageGeometry g{H, W, CI, KH, KW, H - KH + 1, W - KW + 1, border_rows, border_cols};
  std::mt19937 rng(1); std::uniform_real_distribution<float> u(-1, 1);
  std::vector<float> in(H * W * CI), w(KH * KW * CI * CO), out(g.out_h * g.out_w * CO), dz(g.out_h * g.out_w * CO), dw(KH * KW * CI * CO);
  for (auto& v : in) v = u(rng); for (auto& v : w) v = u(rng); for (auto& v : dz) v = u(rng);
  for (int y = 0; y < H; ++y) for (int x = 0; x < W; ++x)
    if (y < border_rows || y >= H - border_rows || x < border_cols || x >= W - border_cols)
      for (int c = 0; c < CI; ++c) in[(y * W + x) * CI + c] = 0.0f;
  valid_conv_all<V>(in.data(), w.data(), g, CO, out.data(), nullptr);
  weight_grad_all<V>(in.data(), dz.data(), g, CO, dw.data(), false);
  weight_grad_all<V>(in.data(), dz.data(), g, CO, dw.data(), true);  // adds the same again: dw is twice the sum
  // The epilogue, once with statistics (training) and once with the affine map (eval).
  std::vector<float> bias(CO), scale(CO), shift(CO), r(out.size()), r2(out.size()), y(out.size());
  for (auto& v : bias) v = u(rng); for (auto& v : scale) v = u(rng); for (auto& v : shift) v = u(rng);
  std::vector<double> sum(CO, 0.0), sumsq(CO, 0.0);
  fastmnist_cpu::TileEpilogue train, eval;
  train.bias = eval.bias = bias.data();
  train.relu = eval.relu = true;
  train.sum = sum.data(), train.sumsq = sumsq.data();
  eval.scale = scale.data(), eval.shift = shift.data(), eval.y = y.data();
  valid_conv_all<V>(in.data(), w.data(), g, CO, r.data(), &train);
  valid_conv_all<V>(in.data(), w.data(), g, CO, r2.data(), &eval);
  // Winograd F(2x2, 3x3) where it applies (input transform in ymm registers, as the AVX-512 build runs it),
  // with no epilogue, the training one and the eval one: wy stays equal to the reference's y.
  const bool wino = fastmnist_cpu::winograd_applies(g);
  std::vector<float> wt(16 * CI * CO), scratch(fastmnist_cpu::winograd_scratch_floats(g, CO));
  std::vector<float> wout(out.size()), wr(out.size()), wr2(out.size()), wy(out.size());
  std::vector<double> wsum(CO, 0.0), wsumsq(CO, 0.0);
  if (wino) {
    fastmnist_cpu::winograd_weights(w.data(), CI, CO, wt.data());
    fastmnist_cpu::TileEpilogue wtrain = train, weval = eval;
    wtrain.sum = wsum.data(), wtrain.sumsq = wsumsq.data(), weval.y = wy.data();
    winograd_conv_all<Ymm<32>, V>(in.data(), wt.data(), g, CO, wout.data(), nullptr, scratch.data());
    winograd_conv_all<Ymm<32>, V>(in.data(), wt.data(), g, CO, wr.data(), &wtrain, scratch.data());
    winograd_conv_all<Ymm<32>, V>(in.data(), wt.data(), g, CO, wr2.data(), &weval, scratch.data());
  } else {
    wout = out, wr = r, wr2 = r2, wy = y, wsum = sum, wsumsq = sumsq;
  }
  std::vector<double> ref_sum(CO, 0.0), ref_sumsq(CO, 0.0);
  double err = 0;
  for (int oy = 0; oy < g.out_h; ++oy) for (int ox = 0; ox < g.out_w; ++ox) for (int co = 0; co < CO; ++co) {
    double s = 0;
    for (int ky = 0; ky < KH; ++ky) for (int kx = 0; kx < KW; ++kx) for (int ci = 0; ci < CI; ++ci)
      s += in[((oy + ky) * W + ox + kx) * CI + ci] * w[((ky * KW + kx) * CI + ci) * CO + co];
    const int at = (oy * g.out_w + ox) * CO + co;
    const double rv = std::max(s + bias[co], 0.0);
    ref_sum[co] += rv, ref_sumsq[co] += rv * rv;
    err = std::max({err, std::fabs(s - out[at]), std::fabs(rv - r[at]), std::fabs(rv - r2[at]),
                    std::fabs(rv * scale[co] + shift[co] - y[at]), std::fabs(s - wout[at]), std::fabs(rv - wr[at]),
                    std::fabs(rv - wr2[at]), std::fabs(rv * scale[co] + shift[co] - wy[at])});
  }
  const double pixels = g.out_h * g.out_w;
  for (int co = 0; co < CO; ++co)
    err = std::max({err, std::fabs(ref_sum[co] - sum[co]) / pixels, std::fabs(ref_sumsq[co] - sumsq[co]) / pixels,
                    std::fabs(ref_sum[co] - wsum[co]) / pixels, std::fabs(ref_sumsq[co] - wsumsq[co]) / pixels});
  for (int k = 0; k < KH * KW * CI; ++k) for (int co = 0; co < CO; ++co) {
    int ci = k % CI, tap = k / CI, ky = tap / KW, kx = tap % KW; double s = 0;
    for (int oy = 0; oy < g.out_h; ++oy) for (int ox = 0; ox < g.out_w; ++ox)
      s += in[((oy + ky) * W + ox + kx) * CI + ci] * dz[(oy * g.out_w + ox) * CO + co];
    err = std::max(err, std::fabs(2 * s - dw[k * CO + co]));
  }
  return err;
}
#pragma GCC pop_options
int main() {
  // {H, W, Cin, Cout, KH, KW, zero border rows, zero border columns}
  int shapes[][8] = {{9, 9, 16, 32, 3, 3, 0, 0}, {7, 7, 24, 16, 3, 3, 0, 0}, {28, 28, 1, 16, 3, 3, 0, 0},
                     {26, 26, 16, 48, 3, 3, 0, 0}, {11, 11, 24, 64, 3, 3, 0, 0}, {5, 30, 8, 80, 3, 3, 0, 0},
                     {22, 22, 32, 16, 1, 1, 0, 0}, {3, 3, 5, 16, 3, 3, 0, 0}, {10, 10, 24, 16, 3, 3, 2, 2},
                     {12, 12, 24, 32, 3, 3, 2, 2}, {7, 30, 8, 48, 3, 3, 1, 1}, {6, 6, 16, 16, 3, 3, 2, 2},
                     // Winograd: even outputs, Cin % 8 == 0 (one with a border only at the columns)
                     {26, 26, 16, 24, 3, 3, 0, 0}, {10, 12, 24, 64, 3, 3, 0, 0}, {8, 6, 40, 16, 3, 3, 0, 0},
                     {12, 12, 16, 48, 3, 3, 2, 2}, {12, 12, 16, 32, 3, 3, 0, 1},
                     // rectangular kernels, borders differing between rows and columns
                     {16, 17, 16, 32, 3, 5, 1, 2}, {14, 13, 24, 16, 3, 5, 0, 2}, {12, 9, 8, 48, 5, 3, 2, 1},
                     {10, 12, 16, 32, 5, 3, 4, 0}, {9, 13, 8, 16, 1, 3, 0, 1}, {11, 8, 16, 32, 1, 3, 0, 2}};
  double worst = 0;
  for (auto& s : shapes) {
    double e1 = (s[3] % 16 == 0) ? check<Zmm16>(s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7]) : 0;  // the build's choice
    double e2 = (s[3] % 8 == 0) ? check<Ymm<32>>(s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7]) : 0;
    printf("%2dx%2d ci%2d co%2d k%dx%d border %d,%d: zmm-shaped err %.2e, ymm32 err %.2e\n", s[0], s[1], s[2], s[3],
           s[4], s[5], s[6], s[7], e1, e2);
    worst = std::max(worst, std::max(e1, e2));
  }
  printf("worst %.2e\n", worst);
  return worst < 1e-3 ? 0 : 1;
}
