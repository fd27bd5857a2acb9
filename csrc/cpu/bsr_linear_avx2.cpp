// AVX2 block-sparse fp32 kernel: as the AVX-512 one with ymm (16 registers: 12 accumulators).
#include <immintrin.h>

#include "bsr_linear_impl.h"

namespace pysparse {
namespace cpu {

namespace {
template <int MR, int NB>
inline void f32_rows(const BsrF32Args& g, int64_t m0, int64_t n0, int64_t rb, int64_t jb) {
  __m256 acc[MR][NB];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int j = 0; j < NB; ++j) acc[r][j] = _mm256_setzero_ps();
  const float* x = g.x + m0 * g.ldx;
  for (int32_t b = g.row_ptr[rb]; b < g.row_ptr[rb + 1]; ++b) {
    const int64_t k0 = int64_t(g.col_idx[b]) * g.bk, kn = std::min(g.bk, g.K - k0);
    const float* v = g.values + int64_t(b) * g.bk * g.bn + jb;
    const float* xk = x + k0;
    for (int64_t k = 0; k < kn; ++k, v += g.bn, ++xk) {
      __m256 w[NB];
#pragma GCC unroll 4
      for (int j = 0; j < NB; ++j) w[j] = _mm256_loadu_ps(v + 8 * j);
#pragma GCC unroll 8
      for (int r = 0; r < MR; ++r) {
        const __m256 xv = _mm256_broadcast_ss(xk + r * g.ldx);
#pragma GCC unroll 4
        for (int j = 0; j < NB; ++j) acc[r][j] = _mm256_fmadd_ps(xv, w[j], acc[r][j]);
      }
    }
  }
  alignas(32) float tmp[MR * 64];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int j = 0; j < NB; ++j) _mm256_store_ps(tmp + r * 64 + 8 * j, acc[r][j]);
  // this pass owns 16 of the block row's outputs: bias, ReLU, store them
  const int64_t nn = std::min<int64_t>(8 * NB, g.N - n0);
  for (int r = 0; r < MR; ++r) {
    float* o = g.out + (m0 + r) * g.ldo + n0;
    for (int64_t j = 0; j < nn; ++j) {
      float v = tmp[r * 64 + j];
      if (g.bias) v = v + g.bias[n0 + j];
      if (g.relu) v = v > 0.f ? v : (v == v ? 0.f : v);
      o[j] = v;
    }
  }
}
}  // namespace

void bsr_f32_avx2(const BsrF32Args& g, int64_t r0, int64_t r1) {
  // 16 outputs (2 ymm) per pass x 6 rows = 12 accumulators of the 16 ymm registers.
  for (int64_t rb = r0; rb < r1; ++rb)
    for (int64_t jb = 0; jb < g.bn; jb += 16) {
      const int64_t n0 = rb * g.bn + jb;
      if (n0 >= g.N) break;
      int64_t m = 0;
      for (; m + 6 <= g.M; m += 6) f32_rows<6, 2>(g, m, n0, rb, jb);
      for (; m < g.M; ++m) f32_rows<1, 2>(g, m, n0, rb, jb);
    }
}

}  // namespace cpu
}  // namespace pysparse
