// The convolution tiles built for AVX2 + FMA: 8 float lanes, 16 ymm registers.
// (Compiled on x86-64 only; tile_isa() never picks AVX2 elsewhere.)
#include "conv_tiles.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>

#pragma GCC push_options
#pragma GCC target("avx2,fma")
#include "conv_tiles_ymm.h"
#include "conv_tiles_kernels.h"
#include "conv_winograd_kernels.h"

namespace {
using fastmnist_cpu::TileEpilogue;
void valid_conv_here(const float* in, const float* w, const ImageGeometry& g, int64_t CO, float* out,
                     const TileEpilogue* epilogue) {
  valid_conv_all<Ymm<16>>(in, w, g, CO, out, epilogue);
}
void weight_grad_here(const float* in, const float* dz, const ImageGeometry& g, int64_t CO, float* dw,
                      bool accumulate) {
  weight_grad_all<Ymm<16>>(in, dz, g, CO, dw, accumulate);
}
void winograd_conv_here(const float* in, const float* wt, const ImageGeometry& g, int64_t CO, float* out,
                        const TileEpilogue* epilogue, float* scratch) {
  winograd_conv_all<Ymm<16>, Ymm<16>>(in, wt, g, CO, out, epilogue, scratch);
}
}  // namespace

namespace fastmnist_cpu::avx2 {
// (named _here: inside fastmnist_cpu, plain valid_conv would be the dispatching one)
const TileKernels kernels = {valid_conv_here, weight_grad_here, winograd_conv_here};
}  // namespace fastmnist_cpu::avx2
#pragma GCC pop_options

#endif
