// Shared, ISA-agnostic pieces of the depthwise int8 convolution: the per-pixel loop over
// taps and the epilogue. Included by each int8_conv2d_<isa>.cpp unit and compiled with its
// flags (internal linkage, see int8_linear_impl.h for why); -ffp-contract=off keeps the
// epilogue's roundings the same on every path.
#pragma once
#include <algorithm>
#include <cmath>

#include "int8_conv2d.h"

namespace pysparse {
namespace cpu {
namespace {
namespace dwdetail {

// Whether any input pixel under output pixel (n, oh, ow)'s window held NaN/Inf.
inline bool window_bad(const DwArgs& a, int64_t n, int64_t oh, int64_t ow) {
  const ConvGeom& g = a.geom;
  for (int64_t ki = 0; ki < g.kh; ++ki) {
    const int64_t ih = oh * g.sh - g.ph + ki * g.dh;
    if (ih < 0 || ih >= g.H) continue;
    for (int64_t kj = 0; kj < g.kw; ++kj) {
      const int64_t iw = ow * g.sw - g.pw + kj * g.dw;
      if (iw >= 0 && iw < g.W && a.pix_bad[(n * g.H + ih) * g.W + iw]) return true;
    }
  }
  return false;
}

// Channels [c0, c1) of one output pixel: int32 sums into acc[c0..c1), exact (kh*kw*16384
// < 2^31 for any kernel up to 362 x 362).
inline void accumulate_scalar(const DwArgs& a, int64_t n, int64_t oh, int64_t ow, int64_t c0,
                              int64_t c1, int32_t* acc) {
  const ConvGeom& g = a.geom;
  for (int64_t c = c0; c < c1; ++c) acc[c] = 0;
  for (int64_t ki = 0; ki < g.kh; ++ki) {
    const int64_t ih = oh * g.sh - g.ph + ki * g.dh;
    if (ih < 0 || ih >= g.H) continue;
    for (int64_t kj = 0; kj < g.kw; ++kj) {
      const int64_t iw = ow * g.sw - g.pw + kj * g.dw;
      if (iw < 0 || iw >= g.W) continue;
      const int8_t* xp = a.x + ((n * g.H + ih) * g.W + iw) * g.C;
      const int8_t* wp = a.w + (ki * g.kw + kj) * g.C;
      for (int64_t c = c0; c < c1; ++c) acc[c] += int32_t(xp[c]) * int32_t(wp[c]);
    }
  }
}

// out[pix][c] = act(((float(acc[c]) * w_scale[c]) * sa) + bias[c]) for c in [c0, c1)
// (or requantized into qout[c]).
inline void store(const DwArgs& a, const int32_t* acc, float sa, int64_t c0, int64_t c1, int64_t pix) {
  for (int64_t c = c0; c < c1; ++c) {
    float v = static_cast<float>(acc[c]) * a.w_scale[c];
    v = v * sa;
    if (a.bias) v = v + a.bias[c];
    v = apply_act(v, a.act);
    if (a.qout)
      a.qout[pix * a.geom.C + c] = requant(v, a.qinv);
    else
      a.out[pix * a.geom.C + c] = v;
  }
}

// Elements [k0, K) of one row (the scalar path, and the AVX2 path's tail).
inline bool quantize_tail(const float* x, int64_t k0, int64_t K, float inv, int8_t shift, int8_t* a) {
  bool finite = true;
  for (int64_t k = k0; k < K; ++k) {
    finite &= std::isfinite(x[k]);
    float v = x[k] * inv;
    if (!(v == v)) v = 0.f;
    const float q = std::nearbyint(std::min(127.f, std::max(-128.f, v)));
    a[k] = static_cast<int8_t>(static_cast<int>(q)) ^ shift;
  }
  return finite;
}

inline float amax_tail(const float* x, int64_t i0, int64_t n, float amax) {
  for (int64_t i = i0; i < n; ++i) {
    const float v = std::fabs(x[i]);
    amax = v <= 3.4028235e38f && v > amax ? v : amax;  // finite values only
  }
  return amax;
}

// The driver: `acc_fn(n, oh, ow, acc)` fills acc[0..C) for one output pixel.
template <class AccFn>
void depthwise_rows(const DwArgs& a, int64_t r0, int64_t r1, int32_t* acc, AccFn&& acc_fn) {
  const ConvGeom& g = a.geom;
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t n = r / g.Ho, oh = r % g.Ho;
    for (int64_t ow = 0; ow < g.Wo; ++ow) {
      acc_fn(n, oh, ow, acc);
      const float sa = window_bad(a, n, oh, ow) ? std::nanf("") : a.img_scale[n];
      store(a, acc, sa, 0, g.C, (n * g.Ho + oh) * g.Wo + ow);
    }
  }
}

}  // namespace dwdetail
}  // namespace
}  // namespace cpu
}  // namespace pysparse
