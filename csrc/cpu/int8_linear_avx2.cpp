// AVX2 path (Haswell and later, AMD Zen): s8 x s8 widened to s16 and multiplied with
// VPMADDWD. VPMADDUBSW would be twice as dense but saturates at s16 (255 * -128 * 2
// overflows), which would break exactness; VPMADDWD pairs never overflow.
#include <immintrin.h>

#include "int8_linear_impl.h"

namespace pysparse {
namespace cpu {

void quantize_rows_avx2(const void* x, InType t, int64_t ldx, int64_t K, int64_t Kp,
                        int64_t m0, int64_t m1, float scale_in, bool u8, int8_t* a,
                        float* scale_out) {
  detail::quantize_rows(x, t, ldx, K, Kp, m0, m1, scale_in, u8, a, scale_out);
}

namespace {
// rows x 16 columns, MR rows at once: MR x 4 accumulators + 4 B registers + A.
template <int MR>
inline void micro16(const int8_t* a, int64_t lda, const int8_t* b, int64_t k0, int64_t k1,
                    int32_t* C, bool accumulate) {
  __m256i acc[MR][4];
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < 4; ++j) acc[r][j] = _mm256_setzero_si256();
  for (int64_t k = k0; k < k1; k += 4) {
    const int8_t* bk = b + k * 16;
    __m256i bw[4];
    for (int j = 0; j < 4; ++j)  // 4 columns x 4 k widened to 16 x s16
      bw[j] = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bk + 16 * j)));
    for (int r = 0; r < MR; ++r) {
      int32_t a4;
      std::memcpy(&a4, a + r * lda + k, 4);
      // (a0 a1 a2 a3) as s16, repeated: each VPMADDWD lane pair = one column's 4 products
      __m256i aw = _mm256_cvtepi8_epi16(_mm_set1_epi32(a4));
      for (int j = 0; j < 4; ++j) acc[r][j] = _mm256_add_epi32(acc[r][j], _mm256_madd_epi16(aw, bw[j]));
    }
  }
  for (int r = 0; r < MR; ++r) {
    alignas(32) int32_t t[32];
    for (int j = 0; j < 4; ++j) _mm256_store_si256(reinterpret_cast<__m256i*>(t + 8 * j), acc[r][j]);
    for (int col = 0; col < 16; ++col) {
      int32_t v = t[2 * col] + t[2 * col + 1];
      C[r * kPackN + col] = accumulate ? C[r * kPackN + col] + v : v;
    }
  }
}
}  // namespace

void gemm_avx2(const GemmArgs& g, int64_t m0, int64_t m1, int64_t c0, int64_t c1,
                 int32_t* cbuf, float* fbuf) {
  const int64_t bstride = g.Kp * 16;
  auto micro = [&](int64_t m, int64_t rows, int64_t c, int64_t k0, int64_t k1, int32_t* C,
                   bool accumulate) {
    const int8_t* a = g.a + m * g.Kp;
    for (int64_t nb = 0; nb < 4; ++nb) {
      const int8_t* b = g.b + (c * 4 + nb) * bstride;
      if (rows == 2)
        micro16<2>(a, g.Kp, b, k0, k1, C + nb * 16, accumulate);
      else
        micro16<1>(a, g.Kp, b, k0, k1, C + nb * 16, accumulate);
    }
  };
  detail::run_tiles(g, m0, m1, c0, c1, /*u8=*/false, /*mr=*/2, cbuf, fbuf, micro);
}

}  // namespace cpu
}  // namespace pysparse
