// AVX2 compacted convolution: tiles of 6 pixels x 16 output channels (one panel, 2 ymm) =
// 12 accumulators + 2 weights + 1 broadcast of the 16 ymm (the classic 6x16 fp32 tile:
// per k, 12 FMAs for 2 + 6 loads and the one index load of the gather). 3 pixels x 32
// channels (two panels per pass, the x broadcasts shared by both) measured the same within
// 4% on every bench/bench_compact_conv2d.py shape (1 thread, Zen 3), so the simpler tile stays.
#include <immintrin.h>

#include "compact_conv2d_impl.h"

namespace pysparse {
namespace cpu {

namespace {
struct Avx2Vec {
  using T = __m256;
  static constexpr bool kExpand8 = true;
  static constexpr int L = 8;
  static T zero() { return _mm256_setzero_ps(); }
  static T load(const float* p) { return _mm256_loadu_ps(p); }
  static T bcast(const float* p) { return _mm256_broadcast_ss(p); }
  static T fma(T a, T b, T c) { return _mm256_fmadd_ps(a, b, c); }
  static T add(T a, T b) { return _mm256_add_ps(a, b); }
  static T relu(T v) { return _mm256_max_ps(_mm256_setzero_ps(), v); }  // NaN: the second operand
  static void store(float* p, T v) { _mm256_store_ps(p, v); }
};
}  // namespace

void compact_conv2d_f32_avx2(const CompactConvArgs& a, int64_t p0, int64_t p1, const float** rows,
                             float* tmp) {
  conv_detail::run<Avx2Vec, 6, 1>(a, p0, p1, rows, tmp);
}

}  // namespace cpu
}  // namespace pysparse
