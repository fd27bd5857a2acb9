// AVX-512 VNNI path (Cascade Lake and later, Zen 4): VPDPBUSD multiplies u8 x s8 and adds
// 4 products into each int32 lane. Activations are stored as u8 = s8 + 128; the epilogue
// subtracts 128 * column sum (precomputed at packing time), which is exact in int32.
#include <immintrin.h>

#include "int8_linear_impl.h"

namespace pysparse {
namespace cpu {

namespace {
inline __m512 load16(const void* x, InType t, int64_t k) {
  switch (t) {
    case InType::F32: return _mm512_loadu_ps(static_cast<const float*>(x) + k);
    case InType::BF16:
      return _mm512_castsi512_ps(_mm512_slli_epi32(
          _mm512_cvtepu16_epi32(_mm256_loadu_si256(
              reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(x) + k))), 16));
    default:
      return _mm512_cvtph_ps(
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(x) + k)));
  }
}

// Same arithmetic as detail::quantize_row_t (x * (127 / amax), clamp, round half to
// even), 16 at a time: the scalar loop cost 4.5 of 30 ms at M = 512, K = 4096.
void quantize_row_avx512(const void* x, InType t, int64_t K, int64_t Kp, float scale_in, bool u8,
                         int8_t* a, float* scale_out) {
  const int64_t K16 = K / 16 * 16;
  const __m512 fmax = _mm512_set1_ps(3.402823466e38f);
  __m512 vmax = _mm512_setzero_ps();
  __mmask16 bad = 0;
  for (int64_t k = 0; k < K16; k += 16) {
    const __m512 v = _mm512_abs_ps(load16(x, t, k));
    bad |= _mm512_cmp_ps_mask(v, fmax, _CMP_NLE_UQ);  // Inf or NaN
    vmax = _mm512_max_ps(vmax, v);
  }
  float amax = _mm512_reduce_max_ps(vmax);
  bool finite = bad == 0;
  for (int64_t k = K16; k < K; ++k) {
    const float v = t == InType::F32 ? static_cast<const float*>(x)[k]
                    : t == InType::BF16 ? detail::bf16_to_f32(static_cast<const uint16_t*>(x)[k])
                                        : detail::f16_to_f32(static_cast<const uint16_t*>(x)[k]);
    finite &= std::isfinite(v);
    amax = std::max(amax, std::fabs(v));
  }
  float scale, inv;
  if (scale_in > 0.f) {
    scale = scale_in;
    inv = 1.0f / scale_in;
  } else {
    scale = amax > 0.f ? amax / 127.0f : 1.0f;
    inv = amax > 0.f ? 127.0f / amax : 1.0f;
  }
  if (!finite) scale = std::nanf("");
  *scale_out = scale;
  const __m512 vinv = _mm512_set1_ps(inv), lo = _mm512_set1_ps(-128.f), hi = _mm512_set1_ps(127.f);
  const __m128i shift = _mm_set1_epi8(u8 ? char(0x80) : 0);
  int64_t k = 0;
  for (; k < K16; k += 16) {
    __m512 v = _mm512_mul_ps(load16(x, t, k), vinv);
    v = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(v, v, _CMP_ORD_Q), v);  // NaN -> 0, as the reference
    __m512 q = _mm512_min_ps(_mm512_max_ps(v, lo), hi);
    __m512i qi = _mm512_cvt_roundps_epi32(q, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m128i q8 = _mm_xor_si128(_mm512_cvtsepi32_epi8(qi), shift);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(a + k), q8);
  }
  const int8_t s8 = u8 ? int8_t(-128) : int8_t(0);
  for (; k < K; ++k) {
    const float v = t == InType::F32 ? static_cast<const float*>(x)[k]
                    : t == InType::BF16 ? detail::bf16_to_f32(static_cast<const uint16_t*>(x)[k])
                                        : detail::f16_to_f32(static_cast<const uint16_t*>(x)[k]);
    float vi = v * inv;
    if (!(vi == vi)) vi = 0.f;
    float q = std::nearbyint(std::min(127.f, std::max(-128.f, vi)));
    a[k] = static_cast<int8_t>(static_cast<int>(q)) ^ s8;
  }
  for (; k < Kp; ++k) a[k] = s8;
}
}  // namespace

void quantize_rows_avx512(const void* x, InType t, int64_t ldx, int64_t K, int64_t Kp,
                          int64_t m0, int64_t m1, float scale_in, bool u8, int8_t* a,
                          float* scale_out) {
  const int64_t esize = t == InType::F32 ? 4 : 2;
  for (int64_t m = m0; m < m1; ++m)
    quantize_row_avx512(static_cast<const char*>(x) + m * ldx * esize, t, K, Kp, scale_in, u8,
                        a + m * Kp, scale_out + m);
}

namespace {
// MR rows x 64 columns: MR x 4 zmm accumulators (24 at MR = 6) + 4 B zmm + 1 broadcast,
// 29 of the 32 zmm registers. Per 4 k: 4 B loads from L1 serve 4 * MR VPDPBUSD.
// Written with named registers and `if constexpr`: with an accumulator array GCC 12 kept
// copies on the stack and moved them every iteration (0.3 TOPS instead of ~1 at M = 512).
#define PS_ROW(r)                                                                       \
  __m512i c##r##0, c##r##1, c##r##2, c##r##3;                                         \
  if constexpr (MR > r) {                                                              \
    if (accumulate) {                                                                  \
      c##r##0 = _mm512_loadu_si512(C + r * kPackN);                                    \
      c##r##1 = _mm512_loadu_si512(C + r * kPackN + 16);                               \
      c##r##2 = _mm512_loadu_si512(C + r * kPackN + 32);                               \
      c##r##3 = _mm512_loadu_si512(C + r * kPackN + 48);                               \
    } else {                                                                           \
      c##r##0 = c##r##1 = c##r##2 = c##r##3 = _mm512_setzero_si512();                  \
    }                                                                                  \
  }
#define PS_FMA(r)                                                                       \
  if constexpr (MR > r) {                                                              \
    const __m512i av = _mm512_set1_epi32(*reinterpret_cast<const int32_t*>(a + r * lda + k)); \
    c##r##0 = _mm512_dpbusd_epi32(c##r##0, av, b0);                                    \
    c##r##1 = _mm512_dpbusd_epi32(c##r##1, av, b1);                                    \
    c##r##2 = _mm512_dpbusd_epi32(c##r##2, av, b2);                                    \
    c##r##3 = _mm512_dpbusd_epi32(c##r##3, av, b3);                                    \
  }
#define PS_STORE(r)                                                                     \
  if constexpr (MR > r) {                                                              \
    _mm512_storeu_si512(C + r * kPackN, c##r##0);                                      \
    _mm512_storeu_si512(C + r * kPackN + 16, c##r##1);                                 \
    _mm512_storeu_si512(C + r * kPackN + 32, c##r##2);                                 \
    _mm512_storeu_si512(C + r * kPackN + 48, c##r##3);                                 \
  }

template <int MR>
inline void micro64(const int8_t* a, int64_t lda, const int8_t* b, int64_t bstride,
                    int64_t k0, int64_t k1, int32_t* C, bool accumulate) {
  PS_ROW(0) PS_ROW(1) PS_ROW(2) PS_ROW(3) PS_ROW(4) PS_ROW(5)
  const int8_t* bp = b + k0 * 16;
  for (int64_t k = k0; k < k1; k += 4, bp += 64) {
    const __m512i b0 = _mm512_loadu_si512(bp);
    const __m512i b1 = _mm512_loadu_si512(bp + bstride);
    const __m512i b2 = _mm512_loadu_si512(bp + 2 * bstride);
    const __m512i b3 = _mm512_loadu_si512(bp + 3 * bstride);
    PS_FMA(0) PS_FMA(1) PS_FMA(2) PS_FMA(3) PS_FMA(4) PS_FMA(5)
  }
  PS_STORE(0) PS_STORE(1) PS_STORE(2) PS_STORE(3) PS_STORE(4) PS_STORE(5)
}
#undef PS_ROW
#undef PS_FMA
#undef PS_STORE
}  // namespace

void gemm_avx512(const GemmArgs& g, int64_t m0, int64_t m1, int64_t c0, int64_t c1,
                 int32_t* cbuf, float* fbuf) {
  const int64_t bstride = g.Kp * 16;
  auto micro = [&](int64_t m, int64_t rows, int64_t c, int64_t k0, int64_t k1, int32_t* C,
                   bool accumulate) {
    const int8_t* a = g.a + m * g.Kp;
    const int8_t* b = g.b + c * 4 * bstride;
    switch (rows) {
      case 6: micro64<6>(a, g.Kp, b, bstride, k0, k1, C, accumulate); break;
      case 5: micro64<5>(a, g.Kp, b, bstride, k0, k1, C, accumulate); break;
      case 4: micro64<4>(a, g.Kp, b, bstride, k0, k1, C, accumulate); break;
      case 3: micro64<3>(a, g.Kp, b, bstride, k0, k1, C, accumulate); break;
      case 2: micro64<2>(a, g.Kp, b, bstride, k0, k1, C, accumulate); break;
      default: micro64<1>(a, g.Kp, b, bstride, k0, k1, C, accumulate);
    }
  };
  detail::run_tiles(g, m0, m1, c0, c1, /*u8=*/true, /*mr=*/6, cbuf, fbuf, micro);
}

}  // namespace cpu
}  // namespace pysparse
