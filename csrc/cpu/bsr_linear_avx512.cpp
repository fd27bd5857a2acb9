// AVX-512 block-sparse kernels. fp32: MR rows x bn outputs of accumulators stay in zmm
// registers across every nonzero block of a block row (no C traffic per block); per k,
// bn/16 loads of the block's values feed MR * bn/16 FMAs. int8: the VPDPBUSD loop of the
// dense kernel over 64 x 64 blocks stored in the dense packed layout.
#include <immintrin.h>

#include "bsr_linear_impl.h"

namespace pysparse {
namespace cpu {

namespace {

template <int MR, int NB>
inline void f32_rows(const BsrF32Args& g, int64_t m0, int64_t rb) {
  __m512 acc[MR][NB];
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int j = 0; j < NB; ++j) acc[r][j] = _mm512_setzero_ps();
  const float* x = g.x + m0 * g.ldx;
  for (int32_t b = g.row_ptr[rb]; b < g.row_ptr[rb + 1]; ++b) {
    const int64_t k0 = int64_t(g.col_idx[b]) * g.bk, kn = std::min(g.bk, g.K - k0);
    const float* v = g.values + int64_t(b) * g.bk * g.bn;
    const float* xk = x + k0;
    for (int64_t k = 0; k < kn; ++k, v += g.bn, ++xk) {
      __m512 w[NB];
#pragma GCC unroll 4
      for (int j = 0; j < NB; ++j) w[j] = _mm512_loadu_ps(v + 16 * j);
#pragma GCC unroll 16
      for (int r = 0; r < MR; ++r) {
        const __m512 xv = _mm512_set1_ps(xk[r * g.ldx]);
#pragma GCC unroll 4
        for (int j = 0; j < NB; ++j) acc[r][j] = _mm512_fmadd_ps(xv, w[j], acc[r][j]);
      }
    }
  }
  alignas(64) float tmp[MR * 64];
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int j = 0; j < NB; ++j) _mm512_store_ps(tmp + r * 64 + 16 * j, acc[r][j]);
  detail::bsr_f32_store(g, m0, MR, rb * g.bn, tmp, 64);
}

template <int NB, int MR>
void f32_block_row(const BsrF32Args& g, int64_t rb) {
  int64_t m = 0;
  for (; m + MR <= g.M; m += MR) f32_rows<MR, NB>(g, m, rb);
  for (; m < g.M; ++m) f32_rows<1, NB>(g, m, rb);
}
template <int MR>
inline void i8_rows(const BsrI8Args& b, int64_t m0, int64_t rb, int32_t* C) {
  const GemmArgs& g = b.g;
  __m512i acc[MR][4];
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) acc[r][j] = _mm512_setzero_si512();
  const int8_t* a = g.a + m0 * g.Kp;
  for (int32_t blk = b.row_ptr[rb]; blk < b.row_ptr[rb + 1]; ++blk) {
    const int8_t* v = b.values + int64_t(blk) * kBsrI8Block * kBsrI8Block;
    const int8_t* ak = a + int64_t(b.col_idx[blk]) * kBsrI8Block;
#pragma GCC unroll 2
    for (int kg = 0; kg < 16; ++kg, v += 64, ak += 4) {
      __m512i w[4];
#pragma GCC unroll 4
      for (int j = 0; j < 4; ++j) w[j] = _mm512_loadu_si512(v + j * 1024);
#pragma GCC unroll 16
      for (int r = 0; r < MR; ++r) {
        const __m512i av = _mm512_set1_epi32(*reinterpret_cast<const int32_t*>(ak + r * g.Kp));
#pragma GCC unroll 4
        for (int j = 0; j < 4; ++j) acc[r][j] = _mm512_dpbusd_epi32(acc[r][j], av, w[j]);
      }
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) _mm512_storeu_si512(C + r * kPackN + 16 * j, acc[r][j]);
  detail::bsr_i8_store(b, m0, MR, rb, C, /*u8=*/true);
}
}  // namespace

void bsr_i8_avx512(const BsrI8Args& b, int64_t r0, int64_t r1, int32_t* C, float*) {
  for (int64_t rb = r0; rb < r1; ++rb) {
    int64_t m = 0;
    for (; m + 6 <= b.g.M; m += 6) i8_rows<6>(b, m, rb, C);
    for (; m < b.g.M; ++m) i8_rows<1>(b, m, rb, C);
  }
}

void bsr_f32_avx512(const BsrF32Args& g, int64_t r0, int64_t r1) {
  for (int64_t rb = r0; rb < r1; ++rb) {
    // 24 accumulators of the 32 zmm: 6 rows x 4 (bn 64), 12 x 2 (bn 32), 12 x 1 (bn 16).
    if (g.bn == 64) f32_block_row<4, 6>(g, rb);
    else if (g.bn == 32) f32_block_row<2, 12>(g, rb);
    else f32_block_row<1, 12>(g, rb);
  }
}

}  // namespace cpu
}  // namespace pysparse
