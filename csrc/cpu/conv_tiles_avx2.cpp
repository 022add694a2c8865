// The convolution tiles built for AVX2 + FMA: 8 float lanes, 16 ymm registers.
#include "conv_tiles.h"

#include <c10/util/Exception.h>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>

#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace {
struct Ymm {
  using type = __m256;
  static constexpr int L = 8, kRegisters = 16;
  static inline type zero() { return _mm256_setzero_ps(); }
  static inline type load(const float* p) { return _mm256_loadu_ps(p); }
  static inline void store(float* p, type v) { _mm256_storeu_ps(p, v); }
  static inline type broadcast(const float* p) { return _mm256_broadcast_ss(p); }
  static inline type fmadd(type a, type b, type c) { return _mm256_fmadd_ps(a, b, c); }
  static inline type add(type a, type b) { return _mm256_add_ps(a, b); }
};
}  // namespace
#include "conv_tiles_kernels.h"

namespace fastmnist_cpu::avx2 {
void valid_conv(const float* in, const float* w, const ImageGeometry& g, int64_t CO, float* out) {
  valid_conv_all<Ymm>(in, w, g, CO, out);
}
void weight_grad(const float* in, const float* dz, const ImageGeometry& g, int64_t CO, float* dw) {
  weight_grad_all<Ymm>(in, dz, g, CO, dw);
}
}  // namespace fastmnist_cpu::avx2
#pragma GCC pop_options

#else  // not x86-64: tile_isa() is never avx2 there

namespace fastmnist_cpu::avx2 {
void valid_conv(const float*, const float*, const ImageGeometry&, int64_t, float*) {
  TORCH_INTERNAL_ASSERT(false, "AVX2 tiles called on a non-x86 build");
}
void weight_grad(const float*, const float*, const ImageGeometry&, int64_t, float*) {
  TORCH_INTERNAL_ASSERT(false, "AVX2 tiles called on a non-x86 build");
}
}  // namespace fastmnist_cpu::avx2

#endif
