// What this CPU (and OS) can run: CPUID, XGETBV and, for AMX, the Linux permission request.
// Detected once per process. On a CPU that is not x86-64 every feature reads false.
#pragma once
#include "isa.h"

namespace pysparse {
namespace cpu {

struct CpuFeatures {
  bool avx2 = false, fma = false, f16c = false;
  bool avx512f = false, avx512bw = false, avx512vl = false, avx512_vnni = false,
       avx512_bf16 = false;
  bool amx_tile = false, amx_int8 = false, amx_bf16 = false;
  bool amx_os_permission = false;  // arch_prctl(ARCH_REQ_XCOMP_PERM) granted
};
const CpuFeatures& cpu_features();
Isa best_isa();  // the best path this CPU (and OS) supports

}  // namespace cpu
}  // namespace pysparse
