// Register-only peak loops of the AVX2 path (peak.h): VFMADD231PS ymm (the fp32 block-sparse
// and compact-conv kernels) and VPMADDWD ymm + VPADDD ymm, the pair the AVX2 int8 GEMM
// (int8_linear_avx2.cpp) issues per 16 int8 MACs after widening s8 to s16.
//
// The loops are written in asm, registers named: with intrinsics GCC 12 kept some of the 12
// accumulators on the stack (loads and stores in the loop) and computed the VPMADDWD of
// loop-invariant operands once. Here each round is exactly the 12 instructions (or pairs)
// plus DEC/JNZ, and nothing touches memory.
#include "peak.h"

namespace pysparse {
namespace cpu {

#define PEAK_FMA(i) "vfmadd231ps %%ymm15, %%ymm15, %%ymm" #i "\n\t"
#define PEAK_ZERO(i) "vpxor %%ymm" #i ", %%ymm" #i ", %%ymm" #i "\n\t"
#define PEAK_STORE(i) "vmovdqu %%ymm" #i ", " #i "*32(%[out])\n\t"
#define PEAK_12(M) M(0) M(1) M(2) M(3) M(4) M(5) M(6) M(7) M(8) M(9) M(10) M(11)
#define PEAK_CLOBBERS "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", \
                      "xmm10", "xmm11", "xmm12", "xmm13", "xmm14", "xmm15", "cc", "memory"

int64_t peak_loop_fma_avx2(int64_t iters) {
  static_assert(kPeakChainsYmm == 12, "the asm below has 12 chains");
  if (iters <= 0) return 0;
  // 1.0 * 1.0 + acc: the sums stay exact or round to large normals, never denormals (a
  // denormal result takes a slow microcode path on some cores and would lower the peak).
  const float one = 1.0f;
  alignas(32) float out[12 * 8];
  __asm__ volatile(
      "vbroadcastss %[one], %%ymm15\n\t" PEAK_12(PEAK_ZERO)
      "1:\n\t" PEAK_12(PEAK_FMA)
      "dec %[n]\n\t"
      "jnz 1b\n\t" PEAK_12(PEAK_STORE)
      "vzeroupper\n\t"
      : [n] "+r"(iters)
      : [one] "m"(one), [out] "r"(out)
      : PEAK_CLOBBERS);
  double s = 0;
  for (float v : out) s += v;
  return int64_t(s);
}

// Each VPMADDWD is independent (the kernel's broadcast A times B, a new product each time);
// only the VPADDD chains carry from round to round. Two product registers alternate.
#define PEAK_MADD(i, t) "vpmaddwd %%ymm15, %%ymm14, %%ymm" #t "\n\tvpaddd %%ymm" #t ", %%ymm" #i ", %%ymm" #i "\n\t"
#define PEAK_MADD2(i, j) PEAK_MADD(i, 12) PEAK_MADD(j, 13)

int64_t peak_loop_maddwd_avx2(int64_t iters) {
  static_assert(kPeakChainsYmm == 12, "the asm below has 12 chains");
  if (iters <= 0) return 0;
  const int16_t a = 1, b = 2;
  alignas(32) int32_t out[12 * 8];
  __asm__ volatile(
      "vpbroadcastw %[a], %%ymm14\n\t"
      "vpbroadcastw %[b], %%ymm15\n\t" PEAK_12(PEAK_ZERO)
      "1:\n\t" PEAK_MADD2(0, 1) PEAK_MADD2(2, 3) PEAK_MADD2(4, 5) PEAK_MADD2(6, 7) PEAK_MADD2(8, 9)
      PEAK_MADD2(10, 11)
      "dec %[n]\n\t"
      "jnz 1b\n\t" PEAK_12(PEAK_STORE)
      "vzeroupper\n\t"
      : [n] "+r"(iters)
      : [a] "m"(a), [b] "m"(b), [out] "r"(out)
      : PEAK_CLOBBERS);
  int64_t s = 0;
  for (int32_t v : out) s += v;
  return s;
}

}  // namespace cpu
}  // namespace pysparse
