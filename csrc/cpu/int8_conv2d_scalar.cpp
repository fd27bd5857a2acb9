// Portable depthwise int8 convolution: plain loops (the reference path the AVX2 one is
// tested against with PYSPARSE_CPU_ISA=scalar).
#include "int8_conv2d_impl.h"

namespace pysparse {
namespace cpu {

void depthwise_scalar(const DwArgs& a, int64_t r0, int64_t r1, int32_t* acc) {
  dwdetail::depthwise_rows(a, r0, r1, acc, [&](int64_t n, int64_t oh, int64_t ow, int32_t* ac) {
    dwdetail::accumulate_scalar(a, n, oh, ow, 0, a.geom.C, ac);
  });
}

void quantize_pixels_scalar(const float* x, int64_t ldx, int64_t K, int64_t lda, int64_t m0, int64_t m1,
                            float scale, bool u8, int8_t* a, uint8_t* bad) {
  const float inv = 1.0f / scale;
  const int8_t shift = u8 ? int8_t(-128) : int8_t(0);
  for (int64_t m = m0; m < m1; ++m) {
    int8_t* am = a + m * lda;
    bad[m] = dwdetail::quantize_tail(x + m * ldx, 0, K, inv, shift, am) ? 0 : 1;
    for (int64_t k = K; k < lda; ++k) am[k] = shift;
  }
}

void act_requant_rows_scalar(const float* f, int64_t ldf, int64_t rows, int64_t j0, int64_t j1, Act act,
                             float inv, int8_t* o, int64_t ldo) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j = j0; j < j1; ++j) o[r * ldo + j] = requant(apply_act(f[r * ldf + j], act), inv);
}

float amax_finite_scalar(const float* x, int64_t n) { return dwdetail::amax_tail(x, 0, n, 0.f); }

}  // namespace cpu
}  // namespace pysparse
