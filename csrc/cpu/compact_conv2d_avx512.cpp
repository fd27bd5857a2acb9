// AVX-512 compacted convolution: tiles of 12 pixels x 32 output channels (2 panels, one zmm
// each) = 24 accumulators + 2 weights + 1 broadcast of the 32 zmm. 32 columns because a
// 50%-kept ResNet layer of 64 has 32 (4 zmm x 6 rows would compute half zero columns there);
// wider layers run in passes of 32.
#include <immintrin.h>

#include "compact_conv2d_impl.h"

namespace pysparse {
namespace cpu {

namespace {
struct Avx512Vec {
  using T = __m512;
  static constexpr bool kExpand8 = false;
  static constexpr int L = 16;
  static T zero() { return _mm512_setzero_ps(); }
  static T load(const float* p) { return _mm512_loadu_ps(p); }
  static T bcast(const float* p) { return _mm512_set1_ps(*p); }
  static T fma(T a, T b, T c) { return _mm512_fmadd_ps(a, b, c); }
  static T add(T a, T b) { return _mm512_add_ps(a, b); }
  static T relu(T v) { return _mm512_max_ps(_mm512_setzero_ps(), v); }  // NaN: the second operand
  static void store(float* p, T v) { _mm512_store_ps(p, v); }
};
}  // namespace

void compact_conv2d_f32_avx512(const CompactConvArgs& a, int64_t p0, int64_t p1, const float** rows,
                               float* tmp) {
  conv_detail::run<Avx512Vec, 12, 2>(a, p0, p1, rows, tmp);
}

}  // namespace cpu
}  // namespace pysparse
