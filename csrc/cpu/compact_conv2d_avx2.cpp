// AVX2 compacted convolution: tiles of 3 pixels x 32 output channels (two panels, 4 ymm) or
// 6 pixels x 16 (one panel, 2 ymm): 12 accumulators + the weights + 1 broadcast of the 16
// ymm, 12 FMAs per k either way. 3x32 reads each gathered input once for two panels (per k,
// 4 weight loads from L1 and 3 broadcasts, against 2 and 6). With the vector scatter, 3x32
// measured 1.03-1.06x the 6x16 tile on the bench/bench_compact_conv2d.py shapes in a
// standalone kernel harness (thread CPU time, interleaved, 1 thread, Zen 3); in the bench
// itself, within noise on 1x1 and 28x28, 1.05-1.2x on 56x56 3x3 and stride 2 at batch 8. So
// it runs wherever the panels pair up; an odd panel count keeps 6x16 (3x32's last, lone
// panel would run a 3x16 tile of 6 accumulators, latency-bound).
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
  if ((a.Cout + kConvPanel - 1) / kConvPanel % 2 == 0) conv_detail::run<Avx2Vec, 3, 2>(a, p0, p1, rows, tmp);
  else conv_detail::run<Avx2Vec, 6, 1>(a, p0, p1, rows, tmp);
}

}  // namespace cpu
}  // namespace pysparse
