// The compacted-convolution kernel, written once over a vector type V and instantiated by
// each ISA unit (compact_conv2d_{scalar,avx2,avx512}.cpp) with its own V and tile shape.
// Everything here has internal linkage: each unit compiles it with its own -m flags, and
// shared inline symbols would let the linker keep one unit's (e.g. the AVX-512) copy for all.
//
// V provides: T (the register type), L (lanes), zero(), load(p), bcast(p), fma(a, b, c)
// = a * b + c rounded once, add(a, b), relu(v) (= relu_keep_nan per lane: MAXPS(0, v)
// returns v when v is NaN, and -0 for -0, as v < 0 ? 0 : v), store(p, v) (p aligned to 4 * L
// bytes), and kExpand8: the unit is built with AVX2 and uses the vector scatter (expand_rows).
#pragma once
#include <algorithm>
#include <cstring>
#if defined(__AVX2__)
#include <immintrin.h>
#endif

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
// wp + j * pstride. The result goes to tmp[r * ldt + (0 .. NB * 16)].
// FLAT (a tile whose every real row has every tap inside the input): one loop over all K
// with offsets a.koff[k] = tap offset + channel offset from each row's tap-0 address, instead
// of a loop per tap (3x3 with 32 kept inputs: the per-tap loop exits and pointer reloads every
// 32 k measured ~10% of the tile). Rows past the chunk read row 0's input (never stored).
template <class V, int MR, int NB, bool FLAT>
inline void tile(const CompactConvArgs& a, const float* const* rows, const float* wp, int64_t pstride,
                 const float* bias, bool relu, float* tmp, int64_t ldt) {
  constexpr int VP = kConvPanel / V::L;  // registers per panel row: 1 zmm, 2 ymm, 16 floats
  constexpr int NV = NB * VP;
  typename V::T acc[MR][NV];
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 16
    for (int j = 0; j < NV; ++j) acc[r][j] = V::zero();
  const int64_t taps = a.KH * a.KW, Cin = a.Cin;
  if constexpr (FLAT) {
    const float* p[MR];
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) p[r] = rows[r];
    const int64_t* koff = a.koff;
    const float* wk = wp;
    for (int64_t k = 0, K = taps * Cin; k < K; ++k, wk += kConvPanel) {
      const int64_t off = koff[k];
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
  const int64_t* coff = a.coff;
  for (int64_t t = 0; t < (FLAT ? 0 : taps); ++t) {
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
  // + bias and (without a residual) ReLU in registers: a scalar epilogue doing them cost
  // 9% of a 3x3 tile and 20% of a 1x1 one (K = 128); only the scatter stays scalar.
  if (bias) {
#pragma GCC unroll 16
    for (int j = 0; j < NV; ++j) {
      const typename V::T bv = V::load(bias + j * V::L);
#pragma GCC unroll 16
      for (int r = 0; r < MR; ++r) acc[r][j] = V::add(acc[r][j], bv);
    }
  }
  if (relu) {
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r)
#pragma GCC unroll 16
      for (int j = 0; j < NV; ++j) acc[r][j] = V::relu(acc[r][j]);
  }
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 16
    for (int j = 0; j < NV; ++j) V::store(tmp + r * ldt + j * V::L, acc[r][j]);
}

// The scalar scatter, after fill_rows: rows p .. p + m of the kept outputs (tmp row r at
// tmp + r * ldt holds conv + bias, ReLU'd already when there is no residual), + residual, ReLU.
inline void scatter_rows(const CompactConvArgs& a, int64_t p, int64_t m, const float* tmp, int64_t ldt) {
  const int64_t* oi = a.oidx;
  const int64_t nn = a.Cout;
  for (int64_t r = 0; r < m; ++r) {
    const float* t = tmp + r * ldt;
    float* o = a.out + (p + r) * a.ldo;
    if (!a.residual) {
      for (int64_t j = 0; j < nn; ++j) o[oi[j]] = t[j];
      continue;
    }
    const float* res = a.residual + (p + r) * a.ldo;
    if (a.relu)
      for (int64_t j = 0; j < nn; ++j) o[oi[j]] = relu_keep_nan(res[oi[j]] + t[j]);
    else
      for (int64_t j = 0; j < nn; ++j) o[oi[j]] = res[oi[j]] + t[j];
  }
}

// One output value of lane l of block b, from tmp row t (the expand's scalar tail).
inline float expand_one(const CompactConvArgs& a, const float* t, const float* res, int64_t b, int l) {
  const int64_t i = b * 8 + l;
  if (!res) return a.xmask[i] ? t[a.xsrc[b] + a.xperm[i]] : 0.f;
  const float v = a.xmask[i] ? res[i] + t[a.xsrc[b] + a.xperm[i]] : res[i];
  return a.relu ? relu_keep_nan(v) : v;
}

#if defined(__AVX2__)
// The vector scatter: rows p .. p + m, every channel, each written once (no fill_rows):
// block b of 8 output channels = its kept outputs (8 consecutive results from tmp at
// xsrc[b], permuted into their lanes) and 0 (or the residual) in the other lanes. Replaces
// the fill and the scalar scatter (10-30% of a 50%-kept layer when both were left out; with
// this one the whole kernel measured 1.02-1.15x, 1x1 256->64 the most; 1 thread, Zen 3).
// The same fp32 operations as scatter_rows: res + t, then ReLU; lanes not kept are
// relu(res) (res itself, never res + 0, which would turn -0 into +0).
inline void expand_rows(const CompactConvArgs& a, int64_t p, int64_t m, const float* tmp, int64_t ldt) {
  const int64_t nb = a.ldo / 8, tail = a.ldo % 8;
  const __m256 zero = _mm256_setzero_ps();
  // locals: the stores to out would otherwise make the compiler reload them per block
  const int32_t* const xsrc = a.xsrc;
  const int32_t* const xperm = a.xperm;
  const float* const xmask = reinterpret_cast<const float*>(a.xmask);
  const bool relu = a.relu;
  for (int64_t r = 0; r < m; ++r) {
    const float* t = tmp + r * ldt;
    float* o = a.out + (p + r) * a.ldo;
    const float* res = a.residual ? a.residual + (p + r) * a.ldo : nullptr;
    if (!res) {
      for (int64_t b = 0; b < nb; ++b) {
        const __m256i pi = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xperm + b * 8));
        const __m256 mk = _mm256_loadu_ps(xmask + b * 8);
        const __m256 v = _mm256_permutevar8x32_ps(_mm256_loadu_ps(t + xsrc[b]), pi);
        _mm256_storeu_ps(o + b * 8, _mm256_and_ps(v, mk));
      }
    } else {
      for (int64_t b = 0; b < nb; ++b) {
        const __m256i pi = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xperm + b * 8));
        const __m256 mk = _mm256_loadu_ps(xmask + b * 8);
        const __m256 v = _mm256_permutevar8x32_ps(_mm256_loadu_ps(t + xsrc[b]), pi);
        const __m256 rv = _mm256_loadu_ps(res + b * 8);
        __m256 y = _mm256_blendv_ps(rv, _mm256_add_ps(rv, v), mk);
        if (relu) y = _mm256_max_ps(zero, y);  // NaN and -0 kept, as relu_keep_nan
        _mm256_storeu_ps(o + b * 8, y);
      }
    }
    for (int l = 0; l < tail; ++l) o[nb * 8 + l] = expand_one(a, t, res, nb, l);
  }
}
#else
inline void expand_rows(const CompactConvArgs&, int64_t, int64_t, const float*, int64_t) {}  // kExpand8 is false
#endif

// Pixels [p0, p1) in chunks of a.chunk: per chunk, the row addresses of every tile and tap
// once (reused by every panel pass), then for each pass of NBMAX panels (its weights stay
// in L1/L2 across the chunk's tiles) every MR-row tile into tmp, then the scatter.
template <class V, int MR, int NBMAX>
void run(const CompactConvArgs& a, int64_t p0, int64_t p1, const float** rows, float* tmp) {
  static_assert(kConvRowAlign % MR == 0, "chunks must start on a tile");
  const int64_t taps = a.KH * a.KW, P = (a.Cout + kConvPanel - 1) / kConvPanel;
  const int64_t pstride = taps * a.Cin * kConvPanel;
  const int64_t HoWo = a.Ho * a.Wo;
  const int64_t ldt = conv_tmp_ld(a.Cout);
  const bool expand = V::kExpand8 && a.xsrc != nullptr;
  constexpr int64_t kAhead = 2;
  int64_t cmin = 0, cmax = -1;  // the span of kept input channels in a pixel's row
  // Only past the caches: 56x56x256 1x1 at batch 8 (a 26 MB input) went 0.72x -> 1.0x the dense
  // conv of the kept size; at batch 1 (3 MB, cached) the prefetches cost 0.94x -> 0.84x.
  const bool far = a.N * a.sN * int64_t(sizeof(float)) > (int64_t(8) << 20);
  if (far && a.koff != nullptr && a.KH * a.KW == 1) {
    cmin = cmax = a.coff[0];
    for (int64_t c = 1; c < a.Cin; ++c) cmin = std::min(cmin, a.coff[c]), cmax = std::max(cmax, a.coff[c]);
  }
  bool flat[kConvMaxChunk / MR];  // per tile of the chunk: every tap of every real row inside x
  for (int64_t c0 = p0; c0 < p1; c0 += a.chunk) {
    const int64_t c1 = std::min(p1, c0 + a.chunk);
    if (P == 0) {
      fill_rows(a, c0, c1);
      continue;
    }
    const int64_t ntiles = (c1 - c0 + MR - 1) / MR;
    // Row addresses. (n, oh, ow) of the chunk's first pixel, then stepped (three 64-bit
    // divisions per pixel cost ~20% of a 1x1 tile); a tile whose every tap of every row is
    // inside x runs the flat K loop and needs only tap 0's addresses (per-tap addresses for
    // all 9 taps cost ~15% of a 3x3 tile with 32 kept inputs).
    int64_t n = c0 / HoWo, oh = (c0 % HoWo) / a.Wo, ow = c0 % a.Wo;
    const int64_t hspan = (a.KH - 1) * a.dh, wspan = (a.KW - 1) * a.dw;
    for (int64_t ti = 0; ti < ntiles; ++ti) {
      const float** dt = rows + ti * taps * MR;
      const int m = int(std::min<int64_t>(MR, c1 - c0 - ti * MR));
      int64_t ih0[MR], iw0[MR];
      const float* xn[MR];
      bool inside = a.koff != nullptr;
      for (int r = 0; r < m; ++r) {
        ih0[r] = oh * a.sh - a.ph;
        iw0[r] = ow * a.sw - a.pw;
        xn[r] = a.x + n * a.sN;
        inside = inside && ih0[r] >= 0 && ih0[r] + hspan < a.H && iw0[r] >= 0 && iw0[r] + wspan < a.W;
        if (++ow == a.Wo) {
          ow = 0;
          if (++oh == a.Ho) oh = 0, ++n;
        }
      }
      flat[ti] = inside;
      const int64_t nt = inside ? 1 : taps;
      for (int r = 0; r < m; ++r) {
        if (inside) {
          dt[r] = xn[r] + ih0[r] * a.sH + iw0[r] * a.sW;
          continue;
        }
        for (int64_t kh = 0; kh < a.KH; ++kh) {
          const int64_t ih = ih0[r] + kh * a.dh;
          for (int64_t kw = 0; kw < a.KW; ++kw) {
            const int64_t iw = iw0[r] + kw * a.dw;
            const bool in = ih >= 0 && ih < a.H && iw >= 0 && iw < a.W;
            dt[(kh * a.KW + kw) * MR + r] = in ? xn[r] + ih * a.sH + iw * a.sW : a.zeros;
          }
        }
      }
      // rows past the chunk: computed on row 0's input (valid memory), never stored
      for (int r = m; r < MR; ++r)
        for (int64_t t = 0; t < nt; ++t) dt[t * MR + r] = dt[t * MR];
    }
    // Panels in blocks whose weights fit half of L1 (16 KB; Zen 3 and Intel cores have 32-48
    // KB), tile-outer within a block: a tile's input rows stay in L1 across the block's
    // passes while the block's weights stay in L1 across the tiles (1x1 256->64 at 50%: two
    // 8 KB panels). A panel larger than that (3x3 with 32 kept inputs: 18 KB) is a block of
    // its own (NBMAX panels for the AVX-512 tile), so its weights stay in L1 across the
    // chunk's tiles, and the tiles' inputs (a few KB each) are re-read from L1/L2.
    const int64_t gblk = std::max<int64_t>(1, (int64_t(16) << 10) / std::max<int64_t>(pstride * 4 * NBMAX, 1)) *
                         NBMAX;
    const bool relu_in_tile = a.relu && !a.residual;
    for (int64_t g0 = 0; g0 < P; g0 += gblk) {
      const int64_t g1 = std::min(P, g0 + gblk);
      for (int64_t ti = 0; ti < ntiles; ++ti) {
        const float* const* rt = rows + ti * taps * MR;
        // The rows a flat tile (a 1x1, or a window wholly inside) reads two tiles ahead, every
        // line of the kept span: a full-width input past the caches (batch 8) streams three
        // rows at once with gaps, which the hardware prefetcher follows late.
        if (g0 == 0 && ti + kAhead < ntiles && flat[ti + kAhead]) {
          const float* const* rn = rows + (ti + kAhead) * taps * MR;
          for (int r = 0; r < MR; ++r)
            for (int64_t o = cmin; o <= cmax; o += 16) __builtin_prefetch(rn[r] + o, 0, 3);
        }
        for (int64_t g = g0; g < g1; g += NBMAX) {
          const int64_t nb = std::min<int64_t>(NBMAX, g1 - g);
          const float* wp = a.w + g * pstride;
          const int64_t n0 = g * kConvPanel;
          const float* bias = a.bias ? a.bias + n0 : nullptr;
          float* t = tmp + ti * MR * ldt + n0;
          if (flat[ti]) {
            if (NBMAX >= 2 && nb == 2) tile<V, MR, NBMAX, true>(a, rt, wp, pstride, bias, relu_in_tile, t, ldt);
            else tile<V, MR, 1, true>(a, rt, wp, pstride, bias, relu_in_tile, t, ldt);
          } else {
            if (NBMAX >= 2 && nb == 2) tile<V, MR, NBMAX, false>(a, rt, wp, pstride, bias, relu_in_tile, t, ldt);
            else tile<V, MR, 1, false>(a, rt, wp, pstride, bias, relu_in_tile, t, ldt);
          }
        }
      }
    }
    // the scatter, once per chunk (its results are in L1/L2), each output row written once
    if (expand) {
      expand_rows(a, c0, c1 - c0, tmp, ldt);
    } else {
      fill_rows(a, c0, c1);
      scatter_rows(a, c0, c1 - c0, tmp, ldt);
    }
  }
}

}  // namespace conv_detail
}  // namespace
}  // namespace cpu
}  // namespace pysparse
