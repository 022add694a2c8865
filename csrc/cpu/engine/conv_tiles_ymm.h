// The 8-lane ymm vector type of the convolution tiles, for both builds that
// use it (conv_tiles_avx2.cpp with 16 registers, conv_tiles_avx512.cpp with
// the 32 of AVX-512VL). Include it only inside a `#pragma GCC target` region
// that enables AVX2 and FMA, after <immintrin.h>.
#pragma once

namespace {

template <int Registers>
struct Ymm {
  using type = __m256;
  static constexpr int L = 8, kRegisters = Registers;
  static inline type zero() { return _mm256_setzero_ps(); }
  static inline type load(const float* p) { return _mm256_loadu_ps(p); }
  static inline void store(float* p, type v) { _mm256_storeu_ps(p, v); }
  static inline type broadcast(const float* p) { return _mm256_broadcast_ss(p); }
  static inline type fmadd(type a, type b, type c) { return _mm256_fmadd_ps(a, b, c); }
  static inline type add(type a, type b) { return _mm256_add_ps(a, b); }
  static inline type sub(type a, type b) { return _mm256_sub_ps(a, b); }
  // torch.relu: 0 where v < 0; NaN (an unordered compare is false) passes.
  static inline type relu(type v) { return _mm256_andnot_ps(_mm256_cmp_ps(v, _mm256_setzero_ps(), _CMP_LT_OQ), v); }
  // d[0 .. 7] += v, in double.
  static inline void add_to_double(double* d, type v) {
    const __m256d lo = _mm256_cvtps_pd(_mm256_castps256_ps128(v));
    const __m256d hi = _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1));
    _mm256_storeu_pd(d, _mm256_add_pd(_mm256_loadu_pd(d), lo));
    _mm256_storeu_pd(d + 4, _mm256_add_pd(_mm256_loadu_pd(d + 4), hi));
  }
};

}  // namespace
