// Register-only peak loop of VDPBF16PS zmm (AVX512-BF16: the bf16 block-sparse kernel where
// it is chosen; peak.h), in asm with named registers as in peak_avx512.cpp.
#include "peak.h"

namespace pysparse {
namespace cpu {

#define PEAK_ZZERO(i) "vpxord %%zmm" #i ", %%zmm" #i ", %%zmm" #i "\n\t"
#define PEAK_ZSTORE(i) "vmovdqu32 %%zmm" #i ", " #i "*64(%[out])\n\t"
#define PEAK_DPBF16(i) "vdpbf16ps %%zmm30, %%zmm30, %%zmm" #i "\n\t"
#define PEAK_16(M) M(0) M(1) M(2) M(3) M(4) M(5) M(6) M(7) M(8) M(9) M(10) M(11) M(12) M(13) M(14) M(15)

int64_t peak_loop_dpbf16_avx512(int64_t iters) {
  static_assert(kPeakChainsZmm == 16, "the asm below has 16 chains");
  if (iters <= 0) return 0;
  const uint32_t pair = 0x3F803F80;  // the bf16 pair (1.0, 1.0): each lane gains 2, sums stay normal
  alignas(64) float out[16 * 16];
  __asm__ volatile(
      "vpbroadcastd %[p], %%zmm30\n\t" PEAK_16(PEAK_ZZERO)
      "1:\n\t" PEAK_16(PEAK_DPBF16)
      "dec %[n]\n\t"
      "jnz 1b\n\t" PEAK_16(PEAK_ZSTORE)
      "vzeroupper\n\t"
      : [n] "+r"(iters)
      : [p] "m"(pair), [out] "r"(out)
      : "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", "xmm10", "xmm11",
        "xmm12", "xmm13", "xmm14", "xmm15", "xmm30", "cc", "memory");
  double s = 0;
  for (float v : out) s += v;
  return int64_t(s);
}

}  // namespace cpu
}  // namespace pysparse
