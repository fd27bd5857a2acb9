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

// Leftover rows (M % MR) go through one call of the matching height: with single rows
// the block row's values would stream once per row (M = 16 at bn 64: 6 + 6 + 4, not
// 6 + 6 + 1 + 1 + 1 + 1).
template <int NB, int R>
inline void f32_tail(const BsrF32Args& g, int64_t m, int64_t rows, int64_t rb) {
  if constexpr (R > 0) {
    if (rows == R) return f32_rows<R, NB>(g, m, rb);
    f32_tail<NB, R - 1>(g, m, rows, rb);
  }
}

template <int NB, int MR>
void f32_block_row(const BsrF32Args& g, int64_t rb) {
  int64_t m = 0;
  for (; m + MR <= g.M; m += MR) f32_rows<MR, NB>(g, m, rb);
  if (m < g.M) f32_tail<NB, MR - 1>(g, m, g.M - m, rb);
}
// Blocks per L1 pass: 8 int8 blocks are 32 KB, which stay in L1 while every row of the
// task streams over them (the dense kernel's K blocking). Without it each 6-row step
// re-read the block row from L2: 6.5x of the ideal 10x at density 0.1, M = 128.
constexpr int32_t kBlocksPerPass = 8;
// Rows per pass: the C scratch of 256 x 64 int32 (64 KB) stays in L2.
constexpr int64_t kRowsPerPass = 256;

template <int MR>
inline void i8_rows(const BsrI8Args& b, int64_t m0, int32_t blk0, int32_t blk1, int32_t* C, bool accumulate) {
  const GemmArgs& g = b.g;
  __m512i acc[MR][4];
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j)
      acc[r][j] = accumulate ? _mm512_loadu_si512(C + r * kPackN + 16 * j) : _mm512_setzero_si512();
  const int8_t* a = g.a + m0 * g.Kp;
  for (int32_t blk = blk0; blk < blk1; ++blk) {
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
}

inline void i8_rows_any(const BsrI8Args& b, int64_t m, int64_t rows, int32_t blk0, int32_t blk1, int32_t* C,
                        bool accumulate) {
  switch (rows) {
    case 6: i8_rows<6>(b, m, blk0, blk1, C, accumulate); break;
    case 5: i8_rows<5>(b, m, blk0, blk1, C, accumulate); break;
    case 4: i8_rows<4>(b, m, blk0, blk1, C, accumulate); break;
    case 3: i8_rows<3>(b, m, blk0, blk1, C, accumulate); break;
    case 2: i8_rows<2>(b, m, blk0, blk1, C, accumulate); break;
    default: i8_rows<1>(b, m, blk0, blk1, C, accumulate);
  }
}
}  // namespace

void bsr_i8_avx512(const BsrI8Args& b, int64_t r0, int64_t r1, int32_t* C, float*) {
  for (int64_t rb = r0; rb < r1; ++rb) {
    const int32_t b0 = b.row_ptr[rb], b1 = b.row_ptr[rb + 1];
    for (int64_t mc = 0; mc < b.g.M; mc += kRowsPerPass) {
      const int64_t rows = std::min(kRowsPerPass, b.g.M - mc);
      if (b0 == b1)  // no stored block: the output is the bias
        std::memset(C, 0, sizeof(int32_t) * rows * kPackN);
      for (int32_t bb = b0; bb < b1; bb += kBlocksPerPass) {
        const int32_t be = std::min(b1, bb + kBlocksPerPass);
        for (int64_t m = 0; m < rows; m += 6)
          i8_rows_any(b, mc + m, std::min<int64_t>(6, rows - m), bb, be, C + m * kPackN, bb != b0);
      }
      detail::bsr_i8_store(b, mc, rows, rb, C, /*u8=*/true);
    }
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
