// AVX2 pieces of int8_conv2d: the depthwise convolution (16 channels at a time: s8
// widened to s16, one VPMULLW per tap (|x * w| <= 128 * 128 = 16384 fits s16 exactly), the products widened
// to s32 and summed, so the sums are exact and equal the scalar path's), the input
// quantization, the dynamic amax and the int8 requantization of GEMM blocks.
#include <immintrin.h>

#include "int8_conv2d_impl.h"

namespace pysparse {
namespace cpu {

// Channels in blocks of 16, output pixels of a row inner: the block's kh*kw weight vectors
// are widened once per (row, block) (not once per pixel), and each tap costs one load,
// VPMULLW and two widening adds. (The pixel-outer order measured 2.1 ms against fp32's
// 0.37 at 56x56x144, one thread: bound by per-pixel tap bookkeeping, not by the MACs.)
void depthwise_avx2(const DwArgs& a, int64_t r0, int64_t r1, int32_t* acc) {
  const ConvGeom& g = a.geom;
  const int64_t C = g.C, c16 = C / 16 * 16, T = g.kh * g.kw;
  float* sa_row = reinterpret_cast<float*>(acc + C);      // [Wo] each pixel's scale
  int16_t* w16 = reinterpret_cast<int16_t*>(acc + C + g.Wo);  // [T][16] widened weights
  const __m256 zero = _mm256_setzero_ps(), six = _mm256_set1_ps(6.f);
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t n = r / g.Ho, oh = r % g.Ho;
    for (int64_t ow = 0; ow < g.Wo; ++ow)
      sa_row[ow] = dwdetail::window_bad(a, n, oh, ow) ? std::nanf("") : a.img_scale[n];
    for (int64_t c = 0; c < c16; c += 16) {
      for (int64_t t = 0; t < T; ++t)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(w16 + t * 16),
                            _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(a.w + t * C + c))));
      const __m256 ws0 = _mm256_loadu_ps(a.w_scale + c), ws1 = _mm256_loadu_ps(a.w_scale + c + 8);
      for (int64_t ow = 0; ow < g.Wo; ++ow) {
        __m256i lo = _mm256_setzero_si256(), hi = _mm256_setzero_si256();
        for (int64_t ki = 0; ki < g.kh; ++ki) {
          const int64_t ih = oh * g.sh - g.ph + ki * g.dh;
          if (ih < 0 || ih >= g.H) continue;
          const int8_t* xrow = a.x + (n * g.H + ih) * g.W * C + c;
          const int16_t* wrow = w16 + ki * g.kw * 16;
          for (int64_t kj = 0; kj < g.kw; ++kj) {
            const int64_t iw = ow * g.sw - g.pw + kj * g.dw;
            if (iw < 0 || iw >= g.W) continue;
            const __m256i x16 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(xrow + iw * C)));
            const __m256i p = _mm256_mullo_epi16(x16, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wrow + kj * 16)));
            lo = _mm256_add_epi32(lo, _mm256_cvtepi16_epi32(_mm256_castsi256_si128(p)));
            hi = _mm256_add_epi32(hi, _mm256_cvtepi16_epi32(_mm256_extracti128_si256(p, 1)));
          }
        }
        const int64_t pix = (n * g.Ho + oh) * g.Wo + ow;
        if (a.qout) {  // int8 output: the shared scalar epilogue (its requant rounding)
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(acc + c), lo);
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(acc + c + 8), hi);
          dwdetail::store(a, acc, sa_row[ow], c, c + 16, pix);
          continue;
        }
        // dwdetail::store's operations in its order: ((float(acc) * ws) * sa) + bias, act
        const __m256 sa = _mm256_set1_ps(sa_row[ow]);
        __m256 v[2] = {_mm256_mul_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(lo), ws0), sa),
                       _mm256_mul_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(hi), ws1), sa)};
        for (int j = 0; j < 2; ++j) {
          if (a.bias) v[j] = _mm256_add_ps(v[j], _mm256_loadu_ps(a.bias + c + 8 * j));
          if (a.act != Act::None) {  // v < 0 -> 0 and v > 6 -> 6 keep NaN, as apply_act
            v[j] = _mm256_blendv_ps(v[j], zero, _mm256_cmp_ps(v[j], zero, _CMP_LT_OQ));
            if (a.act == Act::Relu6) v[j] = _mm256_blendv_ps(v[j], six, _mm256_cmp_ps(v[j], six, _CMP_GT_OQ));
          }
          _mm256_storeu_ps(a.out + pix * C + c + 8 * j, v[j]);
        }
      }
    }
    if (c16 < C) {
      for (int64_t ow = 0; ow < g.Wo; ++ow) {
        dwdetail::accumulate_scalar(a, n, oh, ow, c16, C, acc);
        dwdetail::store(a, acc, sa_row[ow], c16, C, (n * g.Ho + oh) * g.Wo + ow);
      }
    }
  }
}

// 32 floats a step: x * inv, NaN -> 0 (an unordered compare), clamp, round half even
// (VROUNDPS nearest = nearbyint in the default rounding mode), then packed to s8 (the
// values are already in range, so the saturating packs are exact).
void quantize_pixels_avx2(const float* x, int64_t ldx, int64_t K, int64_t lda, int64_t m0, int64_t m1,
                          float scale, bool u8, int8_t* a, uint8_t* bad) {
  const float inv = 1.0f / scale;
  const int8_t shift = u8 ? int8_t(-128) : int8_t(0);
  const __m256 vinv = _mm256_set1_ps(inv), lo = _mm256_set1_ps(-128.f), hi = _mm256_set1_ps(127.f);
  const __m256 fmax = _mm256_set1_ps(3.4028235e38f);
  const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  const __m256i perm = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7), vshift = _mm256_set1_epi8(shift);
  const int64_t K32 = K / 32 * 32;
  for (int64_t m = m0; m < m1; ++m) {
    const float* xm = x + m * ldx;
    int8_t* am = a + m * lda;
    __m256 finite = _mm256_castsi256_ps(_mm256_set1_epi32(-1));
    for (int64_t k = 0; k < K32; k += 32) {
      __m256i q[4];
      for (int j = 0; j < 4; ++j) {
        const __m256 xv = _mm256_loadu_ps(xm + k + 8 * j);
        finite = _mm256_and_ps(finite, _mm256_cmp_ps(_mm256_and_ps(xv, absmask), fmax, _CMP_LE_OQ));
        __m256 v = _mm256_mul_ps(xv, vinv);
        v = _mm256_andnot_ps(_mm256_cmp_ps(v, v, _CMP_UNORD_Q), v);  // NaN -> 0
        v = _mm256_min_ps(hi, _mm256_max_ps(lo, v));
        q[j] = _mm256_cvtps_epi32(_mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
      }
      const __m256i s16a = _mm256_packs_epi32(q[0], q[1]), s16b = _mm256_packs_epi32(q[2], q[3]);
      __m256i s8 = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(s16a, s16b), perm);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(am + k), _mm256_xor_si256(s8, vshift));
    }
    const bool ok = _mm256_movemask_ps(finite) == 0xff;
    bad[m] = dwdetail::quantize_tail(xm, K32, K, inv, shift, am) && ok ? 0 : 1;
    for (int64_t k = K; k < lda; ++k) am[k] = shift;
  }
}

// 8 outputs a step, the scalar path's operations in order: act (v < 0 -> 0 keeps NaN, as
// the blend on an ordered compare does; min with 6 likewise), * inv, NaN -> 0, clamp, round.
void act_requant_rows_avx2(const float* f, int64_t ldf, int64_t rows, int64_t j0, int64_t j1, Act act,
                           float inv, int8_t* o, int64_t ldo) {
  const __m256 vinv = _mm256_set1_ps(inv), lo = _mm256_set1_ps(-128.f), hi = _mm256_set1_ps(127.f);
  const __m256 zero = _mm256_setzero_ps(), six = _mm256_set1_ps(6.f);
  const __m256i perm = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  for (int64_t r = 0; r < rows; ++r) {
    const float* fr = f + r * ldf;
    int8_t* orow = o + r * ldo;
    int64_t j = j0;
    for (; j + 8 <= j1; j += 8) {
      __m256 v = _mm256_loadu_ps(fr + j);
      if (act != Act::None) {
        v = _mm256_blendv_ps(v, zero, _mm256_cmp_ps(v, zero, _CMP_LT_OQ));
        if (act == Act::Relu6) v = _mm256_blendv_ps(v, six, _mm256_cmp_ps(v, six, _CMP_GT_OQ));
      }
      v = _mm256_mul_ps(v, vinv);
      v = _mm256_andnot_ps(_mm256_cmp_ps(v, v, _CMP_UNORD_Q), v);  // NaN -> 0
      v = _mm256_min_ps(hi, _mm256_max_ps(lo, v));
      const __m256i q = _mm256_cvtps_epi32(_mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
      const __m256i s16 = _mm256_packs_epi32(q, q);  // lanes: q0..3 q0..3 | q4..7 q4..7
      const __m256i s8 = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(s16, s16), perm);
      const int64_t bytes = _mm256_extract_epi64(s8, 0);
      std::memcpy(orow + j, &bytes, 8);
    }
    for (; j < j1; ++j) orow[j] = requant(apply_act(fr[j], act), inv);
  }
}

float amax_finite_avx2(const float* x, int64_t n) {
  const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  const __m256 fmax = _mm256_set1_ps(3.4028235e38f);
  __m256 acc = _mm256_setzero_ps();
  const int64_t n8 = n / 8 * 8;
  for (int64_t i = 0; i < n8; i += 8) {
    const __m256 v = _mm256_and_ps(_mm256_loadu_ps(x + i), absmask);
    // Inf and NaN fail v <= FLT_MAX and are masked to 0 (max is exact: no rounding)
    acc = _mm256_max_ps(acc, _mm256_and_ps(v, _mm256_cmp_ps(v, fmax, _CMP_LE_OQ)));
  }
  alignas(32) float t[8];
  _mm256_store_ps(t, acc);
  float amax = 0.f;
  for (int j = 0; j < 8; ++j) amax = std::max(amax, t[j]);
  return dwdetail::amax_tail(x, n8, n, amax);
}

}  // namespace cpu
}  // namespace pysparse
