// AVX2 depthwise int8 convolution. 16 channels at a time: s8 widened to s16, one
// VPMULLW per tap (|x * w| <= 128 * 128 = 16384 fits s16 exactly), the products widened
// to s32 and summed, so the sums are exact and equal the scalar path's.
#include <immintrin.h>

#include "int8_conv2d_impl.h"

namespace pysparse {
namespace cpu {

void depthwise_avx2(const DwArgs& a, int64_t r0, int64_t r1, int32_t* acc) {
  const ConvGeom& g = a.geom;
  const int64_t c16 = g.C / 16 * 16;
  dwdetail::depthwise_rows(a, r0, r1, acc, [&](int64_t n, int64_t oh, int64_t ow, int32_t* ac) {
    for (int64_t c = 0; c < c16; c += 16) {
      __m256i lo = _mm256_setzero_si256(), hi = _mm256_setzero_si256();
      for (int64_t ki = 0; ki < g.kh; ++ki) {
        const int64_t ih = oh * g.sh - g.ph + ki * g.dh;
        if (ih < 0 || ih >= g.H) continue;
        for (int64_t kj = 0; kj < g.kw; ++kj) {
          const int64_t iw = ow * g.sw - g.pw + kj * g.dw;
          if (iw < 0 || iw >= g.W) continue;
          const int8_t* xp = a.x + ((n * g.H + ih) * g.W + iw) * g.C + c;
          const int8_t* wp = a.w + (ki * g.kw + kj) * g.C + c;
          const __m256i x16 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(xp)));
          const __m256i w16 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wp)));
          const __m256i p = _mm256_mullo_epi16(x16, w16);
          lo = _mm256_add_epi32(lo, _mm256_cvtepi16_epi32(_mm256_castsi256_si128(p)));
          hi = _mm256_add_epi32(hi, _mm256_cvtepi16_epi32(_mm256_extracti128_si256(p, 1)));
        }
      }
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(ac + c), lo);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(ac + c + 8), hi);
    }
    if (c16 < g.C) dwdetail::accumulate_scalar(a, n, oh, ow, c16, g.C, ac);
  });
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
