// Register-only peak loops of the AVX-512 path (peak.h): VFMADD231PS zmm (the fp32
// block-sparse kernels) and VPDPBUSD zmm (AVX-512 VNNI: the int8 GEMM and block-sparse
// int8 kernels, u8 activations x s8 weights). In asm with named registers, as in
// peak_avx2.cpp: from intrinsics GCC 12 copied every accumulator to another register and
// back in each round (twice the instructions the loop is meant to have).
#include "peak.h"

namespace pysparse {
namespace cpu {

#define PEAK_ZZERO(i) "vpxord %%zmm" #i ", %%zmm" #i ", %%zmm" #i "\n\t"
#define PEAK_ZSTORE(i) "vmovdqu32 %%zmm" #i ", " #i "*64(%[out])\n\t"
#define PEAK_16(M) M(0) M(1) M(2) M(3) M(4) M(5) M(6) M(7) M(8) M(9) M(10) M(11) M(12) M(13) M(14) M(15)
#define PEAK_ZCLOBBERS "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", \
                       "xmm10", "xmm11", "xmm12", "xmm13", "xmm14", "xmm15", "xmm30", "xmm31", "cc", "memory"
#define PEAK_ZFMA(i) "vfmadd231ps %%zmm30, %%zmm30, %%zmm" #i "\n\t"
#define PEAK_DPBUSD(i) "vpdpbusd %%zmm31, %%zmm30, %%zmm" #i "\n\t"

int64_t peak_loop_fma_avx512(int64_t iters) {
  static_assert(kPeakChainsZmm == 16, "the asm below has 16 chains");
  if (iters <= 0) return 0;
  const float one = 1.0f;  // no denormals ever (see peak_avx2.cpp)
  alignas(64) float out[16 * 16];
  __asm__ volatile(
      "vbroadcastss %[one], %%zmm30\n\t" PEAK_16(PEAK_ZZERO)
      "1:\n\t" PEAK_16(PEAK_ZFMA)
      "dec %[n]\n\t"
      "jnz 1b\n\t" PEAK_16(PEAK_ZSTORE)
      "vzeroupper\n\t"
      : [n] "+r"(iters)
      : [one] "m"(one), [out] "r"(out)
      : PEAK_ZCLOBBERS);
  double s = 0;
  for (float v : out) s += v;
  return int64_t(s);
}

int64_t peak_loop_dpbusd_avx512(int64_t iters) {
  static_assert(kPeakChainsZmm == 16, "the asm below has 16 chains");
  if (iters <= 0) return 0;
  const int8_t a = 1, b = 2;  // each lane gains 4 x 1 x 2 = 8 per instruction
  alignas(64) int32_t out[16 * 16];
  __asm__ volatile(
      "vpbroadcastb %[a], %%zmm30\n\t"
      "vpbroadcastb %[b], %%zmm31\n\t" PEAK_16(PEAK_ZZERO)
      "1:\n\t" PEAK_16(PEAK_DPBUSD)
      "dec %[n]\n\t"
      "jnz 1b\n\t" PEAK_16(PEAK_ZSTORE)
      "vzeroupper\n\t"
      : [n] "+r"(iters)
      : [a] "m"(a), [b] "m"(b), [out] "r"(out)
      : PEAK_ZCLOBBERS);
  int64_t s = 0;
  for (int32_t v : out) s += v;
  return s;
}

}  // namespace cpu
}  // namespace pysparse
