// The compacted-convolution kernel, written once over a vector type V and instantiated by
// each ISA unit (compact_conv2d_{scalar,avx2,avx512}.cpp) with its own V and tile shape.
// Everything here has internal linkage: each unit compiles it with its own -m flags, and
// shared inline symbols would let the linker keep one unit's (e.g. the AVX-512) copy for all.
//
// V provides: T (the register type), L (lanes), zero(), load(p), bcast(p), fma(a, b, c)
// = a * b + c rounded once, store(p, v) (p aligned to 4 * L bytes).
#pragma once
#include <algorithm>
#include <cstring>

#include "compact_conv2d.h"

namespace pysparse {
namespace cpu {
namespace {
namespace conv_detail {

// ReLU that keeps NaN, as torch.relu: NaN < 0 is false.
inline float relu_keep_nan(float v) { return v < 0.f ? 0.f : v; }

// Output rows [p0, p1) before any kept channel is written: zeros, or the residual (ReLU'd
// when relu: the channels the conv does not touch are relu(residual); the kept ones are
// overwritten by the epilogue, which reads the residual from a.residual, not from out).
// Here, in the chunk, not as a separate pass: the rows are in cache when the epilogue
// scatters into them.
inline void fill_rows(const CompactConvArgs& a, int64_t p0, int64_t p1) {
  float* o = a.out + p0 * a.ldo;
  const int64_t n = (p1 - p0) * a.ldo;
  if (!a.residual) {
    std::memset(o, 0, size_t(n) * sizeof(float));
    return;
  }
  const float* r = a.residual + p0 * a.ldo;
  if (!a.relu) {
    std::memcpy(o, r, size_t(n) * sizeof(float));
    return;
  }
  for (int64_t i = 0; i < n; ++i) o[i] = relu_keep_nan(r[i]);
}

// One MR x (NB * 16) output tile over all of K. rows[t * MR + r]: the address of pixel r's
// input for tap t (x + n*sN + ih*sH + iw*sW), or a.zeros where the tap is in the padding;
// channel c of it is rows[.][coff[c]]. wp: the first panel of this pass; panel j is at
// wp + j * pstride. The result goes to tmp[MR][NB * 16].
template <class V, int MR, int NB>
inline void tile(const CompactConvArgs& a, const float* const* rows, const float* wp, int64_t pstride,
                 float* tmp) {
  constexpr int VP = kConvPanel / V::L;  // registers per panel row: 1 zmm, 2 ymm, 16 floats
  constexpr int NV = NB * VP;
  typename V::T acc[MR][NV];
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 16
    for (int j = 0; j < NV; ++j) acc[r][j] = V::zero();
  const int64_t taps = a.KH * a.KW, Cin = a.Cin;
  const int64_t* coff = a.coff;
  for (int64_t t = 0; t < taps; ++t) {
    const float* p[MR];
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) p[r] = rows[t * MR + r];
    const float* wk = wp + t * Cin * kConvPanel;
    for (int64_t c = 0; c < Cin; ++c, wk += kConvPanel) {
      const int64_t off = coff[c];  // the gather: one index load for all MR rows
      typename V::T b[NV];
#pragma GCC unroll 16
      for (int j = 0; j < NV; ++j) b[j] = V::load(wk + (j / VP) * pstride + (j % VP) * V::L);
#pragma GCC unroll 16
      for (int r = 0; r < MR; ++r) {
        const typename V::T xv = V::bcast(p[r] + off);
#pragma GCC unroll 16
        for (int j = 0; j < NV; ++j) acc[r][j] = V::fma(xv, b[j], acc[r][j]);
      }
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 16
    for (int j = 0; j < NV; ++j) V::store(tmp + r * (NB * kConvPanel) + j * V::L, acc[r][j]);
}

// The scatter: kept outputs n0 .. n0 + nn of rows p .. p + m, + bias, + residual, ReLU.
inline void epilogue(const CompactConvArgs& a, int64_t p, int64_t m, int64_t n0, int64_t nn, const float* tmp,
                     int64_t ldt) {
  const int64_t* oi = a.oidx + n0;
  const float* bias = a.bias ? a.bias + n0 : nullptr;
  for (int64_t r = 0; r < m; ++r) {
    const float* t = tmp + r * ldt;
    float* o = a.out + (p + r) * a.ldo;
    const float* res = a.residual ? a.residual + (p + r) * a.ldo : nullptr;
    for (int64_t j = 0; j < nn; ++j) {
      float v = t[j];
      if (bias) v = v + bias[j];
      if (res) v = res[oi[j]] + v;
      if (a.relu) v = relu_keep_nan(v);
      o[oi[j]] = v;
    }
  }
}

// Pixels [p0, p1) in chunks of a.chunk: per chunk, the row addresses of every tile and tap
// once (reused by every panel pass), the output rows filled, then for each pass of NBMAX
// panels (its weights stay in L1/L2 across the chunk's tiles) every MR-row tile.
template <class V, int MR, int NBMAX>
void run(const CompactConvArgs& a, int64_t p0, int64_t p1, const float** rows) {
  static_assert(kConvRowAlign % MR == 0, "chunks must start on a tile");
  const int64_t taps = a.KH * a.KW, P = (a.Cout + kConvPanel - 1) / kConvPanel;
  const int64_t pstride = taps * a.Cin * kConvPanel;
  const int64_t HoWo = a.Ho * a.Wo;
  alignas(64) float tmp[MR * NBMAX * kConvPanel];
  for (int64_t c0 = p0; c0 < p1; c0 += a.chunk) {
    const int64_t c1 = std::min(p1, c0 + a.chunk);
    fill_rows(a, c0, c1);
    if (P == 0) continue;
    const int64_t ntiles = (c1 - c0 + MR - 1) / MR;
    for (int64_t ti = 0; ti < ntiles; ++ti)
      for (int r = 0; r < MR; ++r) {
        const int64_t p = c0 + ti * MR + r;
        const float** dst = rows + ti * taps * MR + r;
        if (p >= c1) {  // rows past the chunk: computed on zeros, never stored
          for (int64_t t = 0; t < taps; ++t) dst[t * MR] = a.zeros;
          continue;
        }
        const int64_t n = p / HoWo, oh = (p % HoWo) / a.Wo, ow = p % a.Wo;
        const float* xn = a.x + n * a.sN;
        for (int64_t kh = 0; kh < a.KH; ++kh) {
          const int64_t ih = oh * a.sh - a.ph + kh * a.dh;
          for (int64_t kw = 0; kw < a.KW; ++kw) {
            const int64_t iw = ow * a.sw - a.pw + kw * a.dw;
            const bool in = ih >= 0 && ih < a.H && iw >= 0 && iw < a.W;
            dst[(kh * a.KW + kw) * MR] = in ? xn + ih * a.sH + iw * a.sW : a.zeros;
          }
        }
      }
    for (int64_t g = 0; g < P; g += NBMAX) {
      const int64_t nb = std::min<int64_t>(NBMAX, P - g);
      const float* wp = a.w + g * pstride;
      const int64_t n0 = g * kConvPanel, nn = std::min(nb * kConvPanel, a.Cout - n0);
      for (int64_t ti = 0; ti < ntiles; ++ti) {
        const float* const* rt = rows + ti * taps * MR;
        if constexpr (NBMAX >= 2) {
          if (nb == 2) tile<V, MR, 2>(a, rt, wp, pstride, tmp);
          else tile<V, MR, 1>(a, rt, wp, pstride, tmp);
        } else {
          tile<V, MR, 1>(a, rt, wp, pstride, tmp);
        }
        const int64_t p = c0 + ti * MR;
        epilogue(a, p, std::min<int64_t>(MR, c1 - p), n0, nn, tmp, nb * kConvPanel);
      }
    }
  }
}

}  // namespace conv_detail
}  // namespace
}  // namespace cpu
}  // namespace pysparse
