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

}  // namespace cpu
}  // namespace pysparse
