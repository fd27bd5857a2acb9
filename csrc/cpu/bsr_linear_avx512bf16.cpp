// AVX512-BF16 block-sparse kernel: VDPBF16PS multiplies a pair of bf16 inputs by the pair of
// bf16 weights in each 32-bit lane and adds both products to an fp32 accumulator, so one
// instruction does the work of two fp32 FMAs (the blocks' [bk/2][bn][2] order is its
// operand order). Own translation unit: only this file is built with -mavx512bf16.
#include <chrono>

#include "bsr_linear_zmm.h"

namespace pysparse {
namespace cpu {

namespace {

// MR rows x NB zmm of outputs stay in registers over the whole block row, as the fp32
// kernel: 24 accumulators + NB weights + 1 broadcast of the 32 zmm.
template <int MR, int NB>
inline void dp_rows(const BsrBf16Args& b, int64_t m0, int64_t rb) {
  const BsrF32Args& g = b.f;
  __m512 acc[MR][NB];
  zmm::zero(acc);
  const uint16_t* x = b.x + m0 * b.ldxb;
  for (int32_t blk = g.row_ptr[rb]; blk < g.row_ptr[rb + 1]; ++blk) {
    const int64_t k0 = int64_t(g.col_idx[blk]) * g.bk, kn = std::min(g.bk, g.K - k0), kp = (kn + 1) / 2;
    const uint16_t* v = b.values + int64_t(blk) * g.bk * g.bn;
    const uint16_t* xk = x + k0;
    const __m512i all = _mm512_set1_epi32(-1), even = _mm512_set1_epi32(0xFFFF);
    for (int64_t p = 0; p < kp; ++p, v += 2 * g.bn, xk += 2) {
      // K odd: the last pair's second weight is padding (row K) and is never read
      const __m512i keep = (kn & 1) && p + 1 == kp ? even : all;
      __m512bh w[NB];
#pragma GCC unroll 4
      for (int j = 0; j < NB; ++j) w[j] = (__m512bh)_mm512_and_si512(_mm512_loadu_si512(v + 32 * j), keep);
#pragma GCC unroll 16
      for (int r = 0; r < MR; ++r) {
        uint32_t pair;
        std::memcpy(&pair, xk + r * b.ldxb, 4);
        const __m512bh xp = (__m512bh)_mm512_set1_epi32(int32_t(pair));
#pragma GCC unroll 4
        for (int j = 0; j < NB; ++j) acc[r][j] = _mm512_dpbf16_ps(acc[r][j], xp, w[j]);
      }
    }
  }
  zmm::store_rows(g, m0, rb, acc);
}

template <int NB, int MR>
void dp_block_row(const BsrBf16Args& b, int64_t rb) {
  detail::for_steps<MR>(0, b.f.M, [&](auto rows, int64_t m0) { dp_rows<rows.value, NB>(b, m0, rb); });
}

}  // namespace

void bsr_bf16_avx512bf16(const BsrBf16Args& b, int64_t r0, int64_t r1) {
  for (int64_t rb = r0; rb < r1; ++rb) {
    if (b.f.bn == 64) dp_block_row<4, 6>(b, rb);
    else if (b.f.bn == 32) dp_block_row<2, 12>(b, rb);
    else dp_block_row<1, 12>(b, rb);
  }
}

namespace {
// Seconds for `iters` rounds of 12 independent VDPBF16PS (dot) or VFMADD (fma) in registers.
template <bool DOT>
double time_loop(long iters) {
  __m512 acc[12];
  for (int i = 0; i < 12; ++i) acc[i] = _mm512_setzero_ps();
  // Operands 1.0: sums stay exact small integers (denormal results would take a slow
  // microcode path on Intel cores and distort the ratio).
  __m512 a = _mm512_set1_ps(1.0f);
  __m512i ai = _mm512_set1_epi32(0x3F803F80);  // the bf16 pair (1.0, 1.0)
  const auto t0 = std::chrono::steady_clock::now();
  for (long i = 0; i < iters; ++i) {
#pragma GCC unroll 12
    for (int j = 0; j < 12; ++j) {
      if constexpr (DOT) acc[j] = _mm512_dpbf16_ps(acc[j], (__m512bh)ai, (__m512bh)ai);
      else acc[j] = _mm512_fmadd_ps(a, a, acc[j]);
    }
    __asm__ volatile("" : "+v"(a), "+v"(ai));  // keep the loop from being folded
  }
  const double t = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  for (int i = 1; i < 12; ++i) acc[0] = _mm512_add_ps(acc[0], acc[i]);
  volatile float sink = _mm512_reduce_add_ps(acc[0]);
  (void)sink;
  return t;
}
}  // namespace

double bf16_dot_speedup() {
  double dot = 1e30, fma = 1e30;
  for (int trial = 0; trial < 5; ++trial) {  // min of 5: a preempted trial only ever runs slower
    dot = std::min(dot, time_loop<true>(20000));
    fma = std::min(fma, time_loop<false>(20000));
  }
  return 2.0 * fma / dot;  // one VDPBF16PS lane does 2 MACs, one FMA lane 1
}

}  // namespace cpu
}  // namespace pysparse
