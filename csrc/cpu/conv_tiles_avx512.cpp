// The convolution tiles built for AVX-512 (F, VL, BW, DQ): 16 float lanes in
// zmm registers when the output channels are a multiple of 16, else 8 lanes
// in ymm registers, which AVX-512VL also gives 32 of: either way twice the
// accumulators of AVX2 (conv_tiles_kernels.h sizes the tiles from kRegisters).
// (Compiled on x86-64 only; tile_isa() never picks AVX-512 elsewhere.)
#include "conv_tiles.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>

#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma")
#include "conv_tiles_ymm.h"
namespace {
struct Zmm {
  using type = __m512;
  static constexpr int L = 16, kRegisters = 32;
  static inline type zero() { return _mm512_setzero_ps(); }
  static inline type load(const float* p) { return _mm512_loadu_ps(p); }
  static inline void store(float* p, type v) { _mm512_storeu_ps(p, v); }
  static inline type broadcast(const float* p) { return _mm512_set1_ps(*p); }
  static inline type fmadd(type a, type b, type c) { return _mm512_fmadd_ps(a, b, c); }
  static inline type add(type a, type b) { return _mm512_add_ps(a, b); }
};
}  // namespace
#include "conv_tiles_kernels.h"

namespace fastmnist_cpu::avx512 {
void valid_conv(const float* in, const float* w, const ImageGeometry& g, int64_t CO, float* out) {
  if (CO % Zmm::L == 0) return valid_conv_all<Zmm>(in, w, g, CO, out);
  valid_conv_all<Ymm<32>>(in, w, g, CO, out);
}
void weight_grad(const float* in, const float* dz, const ImageGeometry& g, int64_t CO, float* dw) {
  if (CO % Zmm::L == 0) return weight_grad_all<Zmm>(in, dz, g, CO, dw);
  weight_grad_all<Ymm<32>>(in, dz, g, CO, dw);
}
}  // namespace fastmnist_cpu::avx512
#pragma GCC pop_options

#endif
