// Types every CPU kernel family shares: the ISA paths and small integer helpers. No ATen
// and no intrinsics here: the ISA translation units (built with their own -m flags) and
// the scalar units built for any architecture include it.
#pragma once
#include <cstdint>

// The x86 ISA units (AVX2, AVX-512, AMX) exist only where the compiler targets x86-64
// (setup.py builds them only there); elsewhere the scalar path serves every op.
#if defined(__x86_64__) || defined(_M_X64)
#define PYSPARSE_X86 1
#else
#define PYSPARSE_X86 0
#endif

namespace pysparse {
namespace cpu {

inline constexpr int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// The ISA paths, in increasing order; pysparse.set_cpu_isa / PYSPARSE_CPU_ISA cap the choice.
enum class Isa : int { Scalar = 0, Avx2 = 1, Avx512 = 2, Amx = 3 };
constexpr int kNumIsas = 4;

inline const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::Amx: return "amx";
    case Isa::Avx512: return "avx512";
    case Isa::Avx2: return "avx2";
    default: return "scalar";
  }
}

}  // namespace cpu
}  // namespace pysparse
