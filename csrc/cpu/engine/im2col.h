// im2col and its adjoint col2im for NHWC images: the generic convolution
// path (with torch's BLAS) where no register tiles apply (conv_tiles.h).
#pragma once

#include "../../checks.h"
#include "../dispatch_channels.h"

#include <algorithm>
#include <cstdint>
#include <type_traits>

namespace fastmnist_cpu {

using fastmnist::ConvGeometry;

// col[p, (ky * KW + kx) * Cin + ci] = x[iy, ix, ci] (zero outside the image)
// for `count` images starting at x; rows are image-major. For a fixed output
// row and tap (ky, kx), consecutive output pixels read consecutive input
// pixels, so the inner loop is a strided run of Cin-wide copies with no
// bounds checks; only the padded border columns are special.
template <typename scalar_t, int64_t CIN>
void im2col_impl(const scalar_t* __restrict__ x, int64_t count, const ConvGeometry& g, scalar_t* __restrict__ col) {
  const int64_t cin = CIN > 0 ? CIN : g.cin;
  const int64_t K = g.kh * g.kw * cin;
  for (int64_t b = 0; b < count; ++b) {
    const scalar_t* img = x + b * g.h * g.w * cin;
    for (int64_t oy = 0; oy < g.hout; ++oy) {
      scalar_t* rows = col + (b * g.hout + oy) * g.wout * K;
      for (int64_t ky = 0; ky < g.kh; ++ky) {
        const int64_t iy = oy + ky - g.pad_h;
        const bool row_inside = iy >= 0 && iy < g.h;
        for (int64_t kx = 0; kx < g.kw; ++kx) {
          scalar_t* dst = rows + (ky * g.kw + kx) * cin;
          // output columns [lo, hi) read input columns inside the image
          const int64_t lo = std::max<int64_t>(0, g.pad_w - kx);
          const int64_t hi = std::min<int64_t>(g.wout, g.w + g.pad_w - kx);
          for (int64_t ox = 0; ox < g.wout; ++ox) {
            scalar_t* d = dst + ox * K;
            if (row_inside && ox >= lo && ox < hi) {
              const scalar_t* s = img + (iy * g.w + ox + kx - g.pad_w) * cin;
              for (int64_t c = 0; c < cin; ++c) d[c] = s[c];
            } else {
              for (int64_t c = 0; c < cin; ++c) d[c] = scalar_t(0);
            }
          }
        }
      }
    }
  }
}

// The adjoint of im2col: dx[iy, ix, ci] = sum of dcol[p, (ky * KW + kx) * Cin + ci]
// over the (p, ky, kx) that read (iy, ix). Same loop order as im2col_impl.
template <typename scalar_t, int64_t CIN>
void col2im_impl(const scalar_t* __restrict__ dcol, int64_t count, const ConvGeometry& g, scalar_t* __restrict__ dx) {
  const int64_t cin = CIN > 0 ? CIN : g.cin;
  const int64_t K = g.kh * g.kw * cin;
  std::fill(dx, dx + count * g.h * g.w * cin, scalar_t(0));
  for (int64_t b = 0; b < count; ++b) {
    scalar_t* img = dx + b * g.h * g.w * cin;
    for (int64_t oy = 0; oy < g.hout; ++oy) {
      const scalar_t* rows = dcol + (b * g.hout + oy) * g.wout * K;
      for (int64_t ky = 0; ky < g.kh; ++ky) {
        const int64_t iy = oy + ky - g.pad_h;
        if (iy < 0 || iy >= g.h) continue;
        for (int64_t kx = 0; kx < g.kw; ++kx) {
          const scalar_t* src = rows + (ky * g.kw + kx) * cin;
          const int64_t lo = std::max<int64_t>(0, g.pad_w - kx);
          const int64_t hi = std::min<int64_t>(g.wout, g.w + g.pad_w - kx);
          scalar_t* dst = img + (iy * g.w + lo + kx - g.pad_w) * cin;
          for (int64_t ox = lo; ox < hi; ++ox, dst += cin) {
            const scalar_t* s = src + ox * K;
            for (int64_t c = 0; c < cin; ++c) dst[c] += s[c];
          }
        }
      }
    }
  }
}

template <typename scalar_t>
void im2col(const scalar_t* x, int64_t count, const ConvGeometry& g, scalar_t* col) {
  dispatch_channels(g.cin, [&](auto CIN) { im2col_impl<scalar_t, decltype(CIN)::value>(x, count, g, col); });
}

template <typename scalar_t>
void col2im(const scalar_t* dcol, int64_t count, const ConvGeometry& g, scalar_t* dx) {
  dispatch_channels(g.cin, [&](auto CIN) { col2im_impl<scalar_t, decltype(CIN)::value>(dcol, count, g, dx); });
}

}  // namespace fastmnist_cpu
