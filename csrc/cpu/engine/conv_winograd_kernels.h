// Winograd F(2x2, 3x3) for the 3x3 convolutions, written once for every
// vector width (included after conv_tiles_kernels.h by each per-ISA unit).
//
// A 2x2 block of outputs needs a 4x4 patch d of the input. With
//     B^T = [1 0 -1 0; 0 1 1 0; 0 -1 1 0; 0 1 0 -1],  G = [1 0 0; .5 .5 .5; .5 -.5 .5; 0 0 1],
//     A^T = [1 1 1 0; 0 1 -1 -1],
// the block is A^T [ sum_ci (G g[ci, co] G^T) . (B^T d[ci] B) ] A, where . is
// the element-wise product of 4x4 matrices. Per element e of those 4x4
// matrices the sum over ci is a matrix product, (blocks x Cin) (Cin x Cout):
// 16 of them do the work of the direct convolution with 16 / 36 of its
// multiply-adds (2.25 times fewer), and run on the same register tiles
// (valid_conv_all with a 1x1 kernel). The input transform and the output
// transform (with the TileEpilogue: bias, ReLU, statistics) are passes over
// the image that stay in L2.
//
//   winograd_input:   U[e][t][ci] = (B^T d_t[ci] B)[e]      (t: the 2x2 output block)
//   16 products:      M[e][t][co] = sum_ci U[e][t][ci] W[e][ci][co]
//   winograd_output:  out block t = A^T M[.][t][co] A       (then the epilogue)
//
// TVec vectorises over the input channels (in_c a multiple of TVec::L) and
// OVec over the output channels (CO a multiple of OVec::L).
#pragma once

namespace {

// U (16, T, C) from the image (in_h, in_w, C), T = (out_h / 2) * (out_w / 2) blocks in row order.
template <typename TVec>
void winograd_input(const float* __restrict__ in, const ImageGeometry& g, float* __restrict__ U) {
  constexpr int L = TVec::L;
  const int64_t C = g.in_c, bh = g.out_h / 2, bw = g.out_w / 2, T = bh * bw;
  for (int64_t by = 0; by < bh; ++by) {
    for (int64_t bx = 0; bx < bw; ++bx) {
      const int64_t t = by * bw + bx;
      const float* d = in + ((2 * by) * g.in_w + 2 * bx) * C;
      for (int64_t c = 0; c < C; c += L) {
        typename TVec::type r[4][4];  // B^T d: rows combined
        FASTMNIST_UNROLL for (int x = 0; x < 4; ++x) {
          const auto d0 = TVec::load(d + (0 * g.in_w + x) * C + c), d1 = TVec::load(d + (1 * g.in_w + x) * C + c);
          const auto d2 = TVec::load(d + (2 * g.in_w + x) * C + c), d3 = TVec::load(d + (3 * g.in_w + x) * C + c);
          r[0][x] = TVec::sub(d0, d2);
          r[1][x] = TVec::add(d1, d2);
          r[2][x] = TVec::sub(d2, d1);
          r[3][x] = TVec::sub(d1, d3);
        }
        FASTMNIST_UNROLL for (int y = 0; y < 4; ++y) {  // (B^T d) B: columns combined
          float* u = U + ((y * 4) * T + t) * C + c;
          TVec::store(u + 0 * T * C, TVec::sub(r[y][0], r[y][2]));
          TVec::store(u + 1 * T * C, TVec::add(r[y][1], r[y][2]));
          TVec::store(u + 2 * T * C, TVec::sub(r[y][2], r[y][1]));
          TVec::store(u + 3 * T * C, TVec::sub(r[y][1], r[y][3]));
        }
      }
    }
  }
}

// The output blocks from M (16, T, CO), through the epilogue (or stored as
// they are), into out (out_h, out_w, CO). Block by block, all channels of a
// block at once: M's 16 rows of the block are read whole. partial holds 2 CO
// floats: the statistics' float partials, flushed once per block row.
template <typename OVec>
void winograd_output(const float* __restrict__ M, const ImageGeometry& g, int64_t CO,
                     const fastmnist_cpu::TileEpilogue* ep, float* __restrict__ out, float* __restrict__ partial) {
  constexpr int L = OVec::L;
  const int64_t bh = g.out_h / 2, bw = g.out_w / 2, T = bh * bw;
  const bool stats = ep != nullptr && ep->sum != nullptr;
  float* sum = partial;
  float* sumsq = partial + CO;
  for (int64_t c = 0; c < 2 * CO; ++c) partial[c] = 0.0f;
  for (int64_t by = 0; by < bh; ++by) {
    for (int64_t bx = 0; bx < bw; ++bx) {
      const int64_t t = by * bw + bx;
      for (int64_t c0 = 0; c0 < CO; c0 += L) {
        const float* m = M + t * CO + c0;
        typename OVec::type r[2][4];  // A^T M: rows combined
        FASTMNIST_UNROLL for (int x = 0; x < 4; ++x) {
          const auto m0 = OVec::load(m + (0 * 4 + x) * T * CO), m1 = OVec::load(m + (1 * 4 + x) * T * CO);
          const auto m2 = OVec::load(m + (2 * 4 + x) * T * CO), m3 = OVec::load(m + (3 * 4 + x) * T * CO);
          r[0][x] = OVec::add(OVec::add(m0, m1), m2);
          r[1][x] = OVec::sub(OVec::sub(m1, m2), m3);
        }
        FASTMNIST_UNROLL for (int y = 0; y < 2; ++y) {  // (A^T M) A: columns combined; two pixels of output row 2 by + y
          typename OVec::type px[2][1] = {{OVec::add(OVec::add(r[y][0], r[y][1]), r[y][2])},
                                          {OVec::sub(OVec::sub(r[y][1], r[y][2]), r[y][3])}};
          const int64_t at = ((2 * by + y) * g.out_w + 2 * bx) * CO + c0;
          if (ep == nullptr) {
            OVec::store(out + at, px[0][0]);
            OVec::store(out + at + CO, px[1][0]);
          } else {
            store_with_epilogue<OVec, 2, 1>(px, *ep, CO, c0, at, out, sum + c0, sumsq + c0);
          }
        }
      }
    }
    if (stats)
      for (int64_t c0 = 0; c0 < CO; c0 += L) flush_statistics<OVec, 1>(*ep, c0, sum + c0, sumsq + c0);
  }
}

// The whole convolution of one image; scratch holds winograd_scratch_floats(g, CO) floats:
// U, M and the statistics' partials.
template <typename TVec, typename OVec>
void winograd_conv_all(const float* in, const float* wt, const ImageGeometry& g, int64_t CO, float* out,
                       const fastmnist_cpu::TileEpilogue* ep, float* scratch) {
  const int64_t T = (g.out_h / 2) * (g.out_w / 2), C = g.in_c;
  float* U = scratch;
  float* M = scratch + 16 * T * C;
  winograd_input<TVec>(in, g, U);
  const ImageGeometry product{1, T, C, 1, 1, 1, T};  // (T x C) (C x CO) as a 1x1 convolution of a 1 x T image
  for (int e = 0; e < 16; ++e) valid_conv_all<OVec>(U + e * T * C, wt + e * C * CO, product, CO, M + e * T * CO, nullptr);
  winograd_output<OVec>(M, g, CO, ep, out, M + 16 * T * CO);
}

}  // namespace
