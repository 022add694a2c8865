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
// GCC 12 warns inside its own headers that _mm512_cvtps_pd's and
// _mm512_extractf32x8_ps's "undefined" pass-through operand (self-initialised
// on purpose) may be used uninitialised; it is masked off and never read.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
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
  static inline type sub(type a, type b) { return _mm512_sub_ps(a, b); }
  // torch.relu: 0 where v < 0; NaN (an unordered compare is false) passes.
  static inline type relu(type v) {
    return _mm512_mask_mov_ps(v, _mm512_cmp_ps_mask(v, _mm512_setzero_ps(), _CMP_LT_OQ), _mm512_setzero_ps());
  }
  // d[0 .. 15] += v, in double.
  static inline void add_to_double(double* d, type v) {
    const __m512d lo = _mm512_cvtps_pd(_mm512_castps512_ps256(v));
    const __m512d hi = _mm512_cvtps_pd(_mm512_extractf32x8_ps(v, 1));
    _mm512_storeu_pd(d, _mm512_add_pd(_mm512_loadu_pd(d), lo));
    _mm512_storeu_pd(d + 8, _mm512_add_pd(_mm512_loadu_pd(d + 8), hi));
  }
};
}  // namespace
#include "conv_tiles_kernels.h"
#include "conv_winograd_kernels.h"

namespace {
using fastmnist_cpu::TileEpilogue;
void valid_conv_here(const float* in, const float* w, const ImageGeometry& g, int64_t CO, float* out,
                     const TileEpilogue* epilogue) {
  if (CO % Zmm::L == 0) return valid_conv_all<Zmm>(in, w, g, CO, out, epilogue);
  valid_conv_all<Ymm<32>>(in, w, g, CO, out, epilogue);
}
void weight_grad_here(const float* in, const float* dz, const ImageGeometry& g, int64_t CO, float* dw,
                      bool accumulate) {
  if (CO % Zmm::L == 0) return weight_grad_all<Zmm>(in, dz, g, CO, dw, accumulate);
  weight_grad_all<Ymm<32>>(in, dz, g, CO, dw, accumulate);
}
void winograd_conv_here(const float* in, const float* wt, const ImageGeometry& g, int64_t CO, float* out,
                        const TileEpilogue* epilogue, float* scratch) {
  // The input transform runs over in_c (a multiple of 8) in ymm registers.
  if (CO % Zmm::L == 0) return winograd_conv_all<Ymm<32>, Zmm>(in, wt, g, CO, out, epilogue, scratch);
  winograd_conv_all<Ymm<32>, Ymm<32>>(in, wt, g, CO, out, epilogue, scratch);
}
}  // namespace

namespace fastmnist_cpu::avx512 {
// (named _here: inside fastmnist_cpu, plain valid_conv would be the dispatching one)
const TileKernels kernels = {valid_conv_here, weight_grad_here, winograd_conv_here};
}  // namespace fastmnist_cpu::avx512
#pragma GCC diagnostic pop
#pragma GCC pop_options

#endif
