// Portable path: plain C++ over the packed layout. Baseline for CPUs without AVX2 and
// the path every other one is checked against in the tests (PYSPARSE_CPU_ISA=scalar).
#include "int8_linear_impl.h"

namespace pysparse {
namespace cpu {

void quantize_rows_scalar(const void* x, InType t, int64_t ldx, int64_t K, int64_t Kp,
                          int64_t m0, int64_t m1, float scale_in, bool u8, int8_t* a,
                          float* scale_out) {
  detail::quantize_rows(x, t, ldx, K, Kp, m0, m1, scale_in, u8, a, scale_out);
}

void gemm_scalar(const GemmArgs& g, int64_t m0, int64_t m1, int64_t c0, int64_t c1,
                 int32_t* cbuf, float* fbuf) {
  const int64_t bstride = g.Kp * 16;  // bytes between consecutive 16-column blocks
  auto micro = [&](int64_t m, int64_t rows, int64_t c, int64_t k0, int64_t k1, int32_t* C,
                   bool accumulate) {
    for (int64_t r = 0; r < rows; ++r) {
      const int8_t* a = g.a + (m + r) * g.Kp;
      int32_t* cr = C + r * kPackN;
      for (int64_t nb = 0; nb < kPackN / 16; ++nb) {
        const int8_t* b = g.b + (c * 4 + nb) * bstride;
        int32_t acc[16];
        for (int j = 0; j < 16; ++j) acc[j] = accumulate ? cr[nb * 16 + j] : 0;
        for (int64_t k = k0; k < k1; k += 4) {
          const int8_t* bk = b + k * 16;  // (k / 4) * 64
          for (int j = 0; j < 16; ++j)
            for (int i = 0; i < 4; ++i) acc[j] += int32_t(a[k + i]) * int32_t(bk[j * 4 + i]);
        }
        for (int j = 0; j < 16; ++j) cr[nb * 16 + j] = acc[j];
      }
    }
  };
  detail::run_tiles(g, m0, m1, c0, c1, /*u8=*/false, /*mr=*/1, cbuf, fbuf, micro);
}

}  // namespace cpu
}  // namespace pysparse
