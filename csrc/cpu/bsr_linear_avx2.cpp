// AVX2 block-sparse fp32 kernel: as the AVX-512 one with ymm (16 registers: 12 accumulators).
#include <immintrin.h>

#include "bsr_linear_impl.h"

namespace pysparse {
namespace cpu {

namespace {
// v0: the block row's first block (g.values + row_ptr[rb] * bk * bn, or a widened copy).
template <int MR, int NB>
inline void f32_rows(const BsrF32Args& g, int64_t m0, int64_t n0, int64_t rb, int64_t jb, const float* v0) {
  __m256 acc[MR][NB];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int j = 0; j < NB; ++j) acc[r][j] = _mm256_setzero_ps();
  const float* x = g.x + m0 * g.ldx;
  for (int32_t b = g.row_ptr[rb]; b < g.row_ptr[rb + 1]; ++b) {
    const int64_t k0 = int64_t(g.col_idx[b]) * g.bk, kn = std::min(g.bk, g.K - k0);
    const float* v = v0 + int64_t(b - g.row_ptr[rb]) * g.bk * g.bn + jb;
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

// bf16 blocks widened in registers: a 32-byte load holds 8 outputs x an input pair; the
// lane shifted left by 16 is the even input's fp32 weight, the lane masked the odd one's.
// 16 outputs per pass x 4 rows = 8 accumulators + 4 weights + 2 x + mask of 16 ymm.
template <int MR>
inline void bf16w_rows(const BsrBf16Args& b, int64_t m0, int64_t n0, int64_t rb, int64_t jb) {
  const BsrF32Args& g = b.f;
  __m256 acc[MR][2];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  const __m256i hi = _mm256_set1_epi32(int32_t(0xFFFF0000u));
  const uint16_t* x = b.x + m0 * b.ldxb;
  for (int32_t blk = g.row_ptr[rb]; blk < g.row_ptr[rb + 1]; ++blk) {
    const int64_t k0 = int64_t(g.col_idx[blk]) * g.bk, kn = std::min(g.bk, g.K - k0), kp = (kn + 1) / 2;
    const uint16_t* v = b.values + int64_t(blk) * g.bk * g.bn + 2 * jb;
    const uint16_t* xk = x + k0;
    for (int64_t p = 0; p < kp; ++p, v += 2 * g.bn, xk += 2) {
      // K odd: the last pair's second weight is padding (row K) and is never read
      const __m256i odd = (kn & 1) && p + 1 == kp ? _mm256_setzero_si256() : hi;
      __m256 we[2], wo[2];
      for (int j = 0; j < 2; ++j) {
        const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(v + 16 * j));
        we[j] = _mm256_castsi256_ps(_mm256_slli_epi32(raw, 16));
        wo[j] = _mm256_castsi256_ps(_mm256_and_si256(raw, odd));
      }
#pragma GCC unroll 8
      for (int r = 0; r < MR; ++r) {
        uint32_t pair;
        std::memcpy(&pair, xk + r * b.ldxb, 4);
        const __m256i xp = _mm256_set1_epi32(int32_t(pair));
        const __m256 xe = _mm256_castsi256_ps(_mm256_slli_epi32(xp, 16));
        const __m256 xo = _mm256_castsi256_ps(_mm256_and_si256(xp, hi));
        for (int j = 0; j < 2; ++j) {  // k ascending, as the fp32 kernel (see the AVX-512 unit)
          acc[r][j] = _mm256_fmadd_ps(xe, we[j], acc[r][j]);
          acc[r][j] = _mm256_fmadd_ps(xo, wo[j], acc[r][j]);
        }
      }
    }
  }
  alignas(32) float tmp[MR * 64];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < 2; ++j) _mm256_store_ps(tmp + r * 64 + 8 * j, acc[r][j]);
  // This pass owns outputs n0 .. n0 + 16: the shared epilogue sees them as a 16-wide
  // block row of a layer shifted left by jb columns.
  BsrF32Args part = g;
  part.bn = 16;
  part.N = g.N - jb;
  part.bias = g.bias ? g.bias + jb : nullptr;
  part.out = g.out + jb;
  detail::bsr_f32_store(part, m0, MR, n0 - jb, tmp, 64);
}

// Block row rb's bf16 blocks widened to fp32 k-major into this thread's scratch (as the
// AVX-512 unit: 8 outputs per 32-byte load, shift for the even input, mask for the odd).
inline const float* widen_block_row(const BsrBf16Args& b, int64_t rb) {
  float* const out = detail::widen_scratch(b, rb);
  const int64_t bn = b.f.bn, pairs = int64_t(b.f.row_ptr[rb + 1] - b.f.row_ptr[rb]) * b.f.bk / 2;
  const uint16_t* src = b.values + int64_t(b.f.row_ptr[rb]) * b.f.bk * bn;
  const __m256i hi = _mm256_set1_epi32(int32_t(0xFFFF0000u));
  float* dst = out;
  for (int64_t i = 0; i < pairs; ++i, src += 2 * bn, dst += 2 * bn)
    for (int64_t j = 0; j < bn; j += 8) {
      const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + 2 * j));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + j), _mm256_slli_epi32(raw, 16));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + bn + j), _mm256_and_si256(raw, hi));
    }
  return out;
}

void bf16w_block_row(const BsrBf16Args& b, int64_t rb) {
  for (int64_t jb = 0; jb < b.f.bn; jb += 16) {
    const int64_t n0 = rb * b.f.bn + jb;
    if (n0 >= b.f.N) break;
    int64_t m = 0;
    for (; m + 4 <= b.f.M; m += 4) bf16w_rows<4>(b, m, n0, rb, jb);
    for (; m < b.f.M; ++m) bf16w_rows<1>(b, m, n0, rb, jb);
  }
}

// 16 outputs (2 ymm) per pass x 6 rows = 12 accumulators of the 16 ymm registers.
void f32_block_row(const BsrF32Args& g, int64_t rb, const float* v0) {
  for (int64_t jb = 0; jb < g.bn; jb += 16) {
    const int64_t n0 = rb * g.bn + jb;
    if (n0 >= g.N) break;
    int64_t m = 0;
    for (; m + 6 <= g.M; m += 6) f32_rows<6, 2>(g, m, n0, rb, jb, v0);
    for (; m < g.M; ++m) f32_rows<1, 2>(g, m, n0, rb, jb, v0);
  }
}
}  // namespace

void bsr_bf16_avx2(const BsrBf16Args& b, int64_t r0, int64_t r1) {
  for (int64_t rb = r0; rb < r1; ++rb) {
    if (b.f.x) f32_block_row(b.f, rb, widen_block_row(b, rb));
    else bf16w_block_row(b, rb);
  }
}

void bsr_f32_avx2(const BsrF32Args& g, int64_t r0, int64_t r1) {
  for (int64_t rb = r0; rb < r1; ++rb) f32_block_row(g, rb, g.values + int64_t(g.row_ptr[rb]) * g.bk * g.bn);
}

void bsr_grad_values_avx2(const BsrGradArgs& a, int64_t r0, int64_t r1) {
  detail::bsr_grad_values_generic(a, r0, r1);
}

}  // namespace cpu
}  // namespace pysparse
