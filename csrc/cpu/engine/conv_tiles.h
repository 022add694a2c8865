// Register-tiled convolution loops for x86-64, one build per instruction set
// (conv_tiles_avx2.cpp, conv_tiles_avx512.cpp, both from conv_tiles_kernels.h)
// and one choice at run time (tile_isa()), the way ATen builds and picks its
// own CPU kernels: one wheel runs on any x86-64 CPU, and ATEN_CPU_CAPABILITY
// (default | avx2 | avx512) forces a path for a user or a test. Where no tile
// ISA applies, ConvProducts uses im2col and torch's BLAS instead.
#pragma once

#include <cstdint>

namespace fastmnist_cpu {

struct ImageGeometry {
  int64_t in_h, in_w, in_c;  // the (already padded) input image, NHWC
  int64_t kh, kw;            // kernel
  int64_t out_h, out_w;      // in_h - kh + 1, in_w - kw + 1
  // Rows at the top and bottom, and columns at the left and right, of the
  // input that are zero padding: valid_conv skips the taps that would only
  // read them (the input gradient's padding is k - 1 wide: on a 6x6 dz, 44%
  // of its multiply-adds would be by zero).
  int64_t zero_rows = 0, zero_cols = 0;
};

enum class TileIsa { none, avx2, avx512 };

// The tiles this process runs: the best instruction set that both ATen's CPU
// capability (at::get_cpu_capability(), which honours ATEN_CPU_CAPABILITY)
// allows and this CPU has; `none` off x86-64 or with ATEN_CPU_CAPABILITY=default.
TileIsa tile_isa();
const char* tile_isa_name(TileIsa isa);

// The tiles compute CO output channels where CO is a multiple of this; other
// counts are padded up to it (zero weights) by the caller.
constexpr int64_t kTileChannelMultiple = 8;
inline int64_t tile_channels(int64_t c) {
  return (c + kTileChannelMultiple - 1) / kTileChannelMultiple * kTileChannelMultiple;
}

// What valid_conv does with an output value z of channel c while it is still
// in a register, before storing it: the forward's bias, ReLU and batch
// statistics cost no pass over the output of their own. (With no epilogue,
// valid_conv stores z as it is.)
struct TileEpilogue {
  const float* bias = nullptr;  // CO entries: z + bias[c] (nullptr: no bias)
  bool relu = false;            // r = ReLU(z + bias), as torch.relu (NaN passes); else r = z + bias
  double* sum = nullptr;        // CO entries each, when set: += r and += r * r over the pixels
  double* sumsq = nullptr;      //   (summed in float within a tile, then added here in double)
  const float* scale = nullptr; // CO entries each, when set: y = r * scale[c] + shift[c] is
  const float* shift = nullptr; //   stored too, into y (laid out as out)
  float* y = nullptr;
};

// The two loops (see conv_tiles_kernels.h), run with tile_isa()'s build.
// w is (KH * KW * Cin, CO) and out (out_h * out_w, CO); dw is (KH * KW * Cin, CO),
// overwritten, or added to when accumulate.
void valid_conv(const float* in, const float* w, const ImageGeometry& g, int64_t CO, float* out,
                const TileEpilogue* epilogue = nullptr);
void weight_grad(const float* in, const float* dz, const ImageGeometry& g, int64_t CO, float* dw,
                 bool accumulate);

// Winograd F(2x2, 3x3) (conv_winograd_kernels.h): valid_conv's result with
// 2.25 times fewer multiply-adds, for 3x3 kernels on in_c a multiple of 8
// with an even output size (winograd_applies). winograd_weights transforms w,
// laid out as valid_conv's, into wt (16, Cin, CO) once per call of the op;
// scratch holds winograd_scratch_floats(g, CO) floats per thread. It computes
// every tap (no zero-border skipping).
// False when the environment sets FASTMNIST_WINOGRAD=0: the direct tiles then
// run every convolution (to compare the two, or to rule Winograd out).
bool winograd_enabled();
inline bool winograd_applies(const ImageGeometry& g) {
  return winograd_enabled() && g.kh == 3 && g.kw == 3 && g.in_c % 8 == 0 && g.out_h % 2 == 0 && g.out_w % 2 == 0;
}

inline int64_t winograd_scratch_floats(const ImageGeometry& g, int64_t CO) {
  return 16 * (g.out_h / 2) * (g.out_w / 2) * (g.in_c + CO) + 2 * CO;
}

// wt[e][ci][co] = (G g G^T)[e] with g[ky][kx] = w[(ky * 3 + kx) * cin + ci][co]
// and G = [1 0 0; .5 .5 .5; .5 -.5 .5; 0 0 1] (conv_winograd_kernels.h).
inline void winograd_weights(const float* w, int64_t cin, int64_t CO, float* wt) {
  static const float G[4][3] = {{1.0f, 0.0f, 0.0f}, {0.5f, 0.5f, 0.5f}, {0.5f, -0.5f, 0.5f}, {0.0f, 0.0f, 1.0f}};
  for (int64_t ci = 0; ci < cin; ++ci)
    for (int64_t co = 0; co < CO; ++co) {
      float t[4][3];  // G g
      for (int i = 0; i < 4; ++i)
        for (int kx = 0; kx < 3; ++kx) {
          t[i][kx] = 0.0f;
          for (int ky = 0; ky < 3; ++ky) t[i][kx] += G[i][ky] * w[((ky * 3 + kx) * cin + ci) * CO + co];
        }
      for (int i = 0; i < 4; ++i)
        for (int j = 0; j < 4; ++j)
          wt[((i * 4 + j) * cin + ci) * CO + co] = t[i][0] * G[j][0] + t[i][1] * G[j][1] + t[i][2] * G[j][2];
    }
}

void winograd_conv(const float* in, const float* wt, const ImageGeometry& g, int64_t CO, float* out,
                   const TileEpilogue* epilogue, float* scratch);

// One instruction set's build of the three loops (conv_tiles_avx2.cpp,
// conv_tiles_avx512.cpp; defined on x86-64 only), as a table: the functions
// above call the table of tile_isa(), chosen once, as ATen's DispatchStub holds
// a kernel per capability.
struct TileKernels {
  void (*valid_conv)(const float* in, const float* w, const ImageGeometry& g, int64_t CO, float* out,
                     const TileEpilogue* epilogue);
  void (*weight_grad)(const float* in, const float* dz, const ImageGeometry& g, int64_t CO, float* dw,
                      bool accumulate);
  void (*winograd_conv)(const float* in, const float* wt, const ImageGeometry& g, int64_t CO, float* out,
                        const TileEpilogue* epilogue, float* scratch);
};
namespace avx2 {
extern const TileKernels kernels;
}
namespace avx512 {
extern const TileKernels kernels;
}

}  // namespace fastmnist_cpu
