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

}  // namespace cpu
}  // namespace pysparse
