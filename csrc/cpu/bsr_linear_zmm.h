// Pieces the AVX-512 block-sparse units share (included only by units built with
// -mavx512f; internal linkage, see int8_linear_impl.h).
#pragma once
#include <immintrin.h>

#include "bsr_linear_impl.h"

namespace pysparse {
namespace cpu {
namespace {
namespace zmm {

// The accumulators of rows [m0, m0 + MR) x block row rb -> bias, ReLU, store.
template <int MR, int NB>
inline void store_rows(const BsrF32Args& g, int64_t m0, int64_t rb, const __m512 (&acc)[MR][NB]) {
  alignas(64) float tmp[MR * 64];
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int j = 0; j < NB; ++j) _mm512_store_ps(tmp + r * 64 + 16 * j, acc[r][j]);
  detail::bsr_f32_store(g, m0, MR, rb * g.bn, tmp, 64);
}

template <int MR, int NB>
inline void zero(__m512 (&acc)[MR][NB]) {
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int j = 0; j < NB; ++j) acc[r][j] = _mm512_setzero_ps();
}

}  // namespace zmm
}  // namespace
}  // namespace cpu
}  // namespace pysparse
