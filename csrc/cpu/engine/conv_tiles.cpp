// Run-time choice of the convolution tiles' instruction set (conv_tiles.h).
#include "conv_tiles.h"

#include <ATen/Version.h>
#include <c10/util/Exception.h>

#include <cstdlib>
#include <string>

namespace fastmnist_cpu {

#if defined(__x86_64__) && defined(__GNUC__)
#define FASTMNIST_X86_TILES 1
#endif

namespace {

TileIsa choose_tile_isa() {
#ifdef FASTMNIST_X86_TILES
  // ATen's capability says what the user (ATEN_CPU_CAPABILITY) and torch's
  // own checks allow; it believes a forced value without asking the CPU, so
  // the CPU is asked too.
  const std::string cap = at::get_cpu_capability();
  const bool cpu_avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  const bool cpu_avx512 = cpu_avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
                          __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq");
  if (cap == "AVX512") {
    if (cpu_avx512) return TileIsa::avx512;
    TORCH_WARN_ONCE("fastmnist: ATen's CPU capability is AVX512 but this CPU lacks AVX-512; "
                    "the convolution tiles use ", cpu_avx2 ? "AVX2" : "no vector ISA (im2col + BLAS)", " instead");
  }
  if ((cap == "AVX2" || cap == "AVX512") && cpu_avx2) return TileIsa::avx2;
#endif
  return TileIsa::none;
}

}  // namespace

TileIsa tile_isa() {
  static const TileIsa isa = choose_tile_isa();
  return isa;
}

const char* tile_isa_name(TileIsa isa) {
  switch (isa) {
    case TileIsa::avx2: return "avx2";
    case TileIsa::avx512: return "avx512";
    default: return "none";
  }
}

namespace {

// The table of tile_isa()'s build, or nullptr where there are no tiles.
const TileKernels* choose_kernels() {
#ifdef FASTMNIST_X86_TILES
  switch (tile_isa()) {
    case TileIsa::avx512: return &avx512::kernels;
    case TileIsa::avx2: return &avx2::kernels;
    default: break;
  }
#endif
  return nullptr;
}

const TileKernels& kernels() {
  static const TileKernels* chosen = choose_kernels();
  TORCH_INTERNAL_ASSERT(chosen != nullptr, "conv tiles called with no tile ISA");
  return *chosen;
}

}  // namespace

void valid_conv(const float* in, const float* w, const ImageGeometry& g, int64_t CO, float* out,
                const TileEpilogue* epilogue) {
  kernels().valid_conv(in, w, g, CO, out, epilogue);
}

void weight_grad(const float* in, const float* dz, const ImageGeometry& g, int64_t CO, float* dw,
                 bool accumulate) {
  kernels().weight_grad(in, dz, g, CO, dw, accumulate);
}

void winograd_conv(const float* in, const float* wt, const ImageGeometry& g, int64_t CO, float* out,
                   const TileEpilogue* epilogue, float* scratch) {
  kernels().winograd_conv(in, wt, g, CO, out, epilogue, scratch);
}

bool winograd_enabled() {
  static const bool enabled = [] {
    const char* v = std::getenv("FASTMNIST_WINOGRAD");
    return v == nullptr || std::string(v) != "0";
  }();
  return enabled;
}

}  // namespace fastmnist_cpu
