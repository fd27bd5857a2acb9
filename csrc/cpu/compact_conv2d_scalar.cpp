// Scalar compacted convolution: the portable fallback, and the reference for the vector
// paths' arithmetic. std::fmaf rounds once as VFMADD does (glibc picks the hardware FMA at
// run time where there is one), so this path's results equal the AVX2 / AVX-512 ones bit for bit.
#include <cmath>

#include "compact_conv2d_impl.h"

namespace pysparse {
namespace cpu {

namespace {
struct ScalarVec {
  using T = float;
  static constexpr bool kExpand8 = false;
  static constexpr int L = 1;
  static T zero() { return 0.f; }
  static T load(const float* p) { return *p; }
  static T bcast(const float* p) { return *p; }
  static T fma(T a, T b, T c) { return std::fmaf(a, b, c); }
  static T add(T a, T b) { return a + b; }
  static T relu(T v) { return conv_detail::relu_keep_nan(v); }
  static void store(float* p, T v) { *p = v; }
};
}  // namespace

// 4 rows x 16 columns: 64 accumulators (the compiler spills; this path is for CPUs without AVX2).
void compact_conv2d_f32_scalar(const CompactConvArgs& a, int64_t p0, int64_t p1, const float** rows,
                               float* tmp) {
  conv_detail::run<ScalarVec, 4, 1>(a, p0, p1, rows, tmp);
}

}  // namespace cpu
}  // namespace pysparse
