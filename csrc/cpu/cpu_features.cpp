// Run-time CPU feature detection: CPUID says what the core has, XGETBV what the OS saves
// on a context switch, and for AMX the kernel must also grant the process permission to
// use the 8 KB tile state (Linux >= 5.16, arch_prctl(ARCH_REQ_XCOMP_PERM)). Off x86-64
// nothing is detected and the scalar path serves.
#include "cpu_features.h"

#if PYSPARSE_X86
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace pysparse {
namespace cpu {

namespace {
#if PYSPARSE_X86
constexpr long kArchReqXcompPerm = 0x1023;
constexpr long kXfeatureXtiledata = 18;

uint64_t xgetbv0() {
  uint32_t eax, edx;
  __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
  return (uint64_t(edx) << 32) | eax;
}

CpuFeatures detect() {
  CpuFeatures f;
  unsigned a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return f;
  const bool osxsave = c & (1u << 27);
  const bool fma = c & (1u << 12), f16c = c & (1u << 29);
  if (!osxsave) return f;
  const uint64_t xcr0 = xgetbv0();
  const bool os_avx = (xcr0 & 0x6) == 0x6;            // XMM and YMM state
  const bool os_avx512 = os_avx && (xcr0 & 0xE0) == 0xE0;  // opmask, ZMM_Hi256, Hi16_ZMM
  const bool os_amx = (xcr0 & (3ull << 17)) == (3ull << 17);  // XTILECFG, XTILEDATA
  if (__get_cpuid_max(0, nullptr) < 7) return f;
  __cpuid_count(7, 0, a, b, c, d);
  f.avx2 = os_avx && (b & (1u << 5));
  f.fma = os_avx && fma;
  f.f16c = os_avx && f16c;
  f.avx512f = os_avx512 && (b & (1u << 16));
  f.avx512bw = os_avx512 && (b & (1u << 30));
  f.avx512vl = os_avx512 && (b & (1u << 31));
  f.avx512_vnni = os_avx512 && (c & (1u << 11));
  f.amx_bf16 = os_amx && (d & (1u << 22));
  f.amx_tile = os_amx && (d & (1u << 24));
  f.amx_int8 = os_amx && (d & (1u << 25));
  unsigned a1, b1, c1, d1;
  __cpuid_count(7, 1, a1, b1, c1, d1);
  f.avx512_bf16 = os_avx512 && (a1 & (1u << 5));
  if (f.amx_tile) f.amx_os_permission = syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
  return f;
}
#else
CpuFeatures detect() { return {}; }
#endif
}  // namespace

const CpuFeatures& cpu_features() {
  static const CpuFeatures f = detect();
  return f;
}

Isa best_isa() {
  const CpuFeatures& f = cpu_features();
  // AMX machines also run the VNNI kernels (quantization, int8 block-sparse): require both.
  const bool vnni = f.avx512f && f.avx512bw && f.avx512vl && f.avx512_vnni;
  if (f.amx_tile && f.amx_int8 && f.amx_os_permission && vnni) return Isa::Amx;
  if (vnni) return Isa::Avx512;
  if (f.avx2) return Isa::Avx2;
  return Isa::Scalar;
}

}  // namespace cpu
}  // namespace pysparse
