// The one CPU dispatch policy: given an op and the facts of a call that can change the
// choice (the blocks' dtype and depth, the rows M), which kernel runs. The ATen wrappers
// (csrc/ops/*.cpp) dispatch through kernel_path(); pysparse.cpu_info() and
// pysparse.ops.kernel_for() report through the same function (_C.kernel_path), so what is
// reported is what runs.
//
// The user's choices (a cap on the ISA, the bf16 dot-product mode) are read from the
// environment once, when the library loads (PYSPARSE_CPU_ISA, PYSPARSE_CPU_BF16), into one
// atomic word; pysparse.set_cpu_isa / set_cpu_bf16 change it at run time. A call takes one
// snapshot of it, so a setter racing a call gives that call one whole path, old or new,
// never a mix and never a getenv while another thread writes os.environ.
#pragma once
#include <cstdint>

#include "isa.h"

namespace pysparse {
namespace cpu {

enum class Op : int { Int8Linear, Int8Mm, BsrLinear, BsrLinearGradX, BsrLinearGradValues, BsrInt8Linear,
                      CompactConv2d, Int8Conv2d };

// What runs. The *Widen kernels take bf16 blocks and widen them to fp32 in registers;
// Avx512Bf16 multiplies bf16 pairs with VDPBF16PS; Aten is ATen ops (addmm per block).
enum class Kernel : int { Scalar, Avx2, Avx512, Amx, Avx512Bf16, ScalarWiden, Avx2Widen, Avx512Widen, Aten };

// The facts of one call that the choice may depend on; defaults mean "not known" (cpu_info
// asks before any call) and give the choice for a typical call.
struct OpShape {
  bool bf16 = false;  // bsr_linear*: bf16 blocks (else fp32)
  int64_t bk = 0;     // bsr_linear*: inputs per block (0: not known)
  int64_t M = -1;     // rows of x (-1: not known)
};

// The user's choices, as one snapshot: isa_cap -1 = none, else an Isa; bf16 -1 = measured
// (VDPBF16PS where bf16_dot_speedup() >= kBf16DotMinSpeedup), 0 = widen, 1 = VDPBF16PS.
struct Policy {
  int isa_cap = -1;
  int bf16 = -1;
};

// VDPBF16PS is used only where it does at least this many MACs per fp32 FMA MAC: below
// 1.25 the widening kernels (exact products too, and one rounding fewer) are as fast.
constexpr double kBf16DotMinSpeedup = 1.25;

// Reads PYSPARSE_CPU_ISA / PYSPARSE_CPU_BF16 and measures bf16_dot_speedup, once (the
// first call does it; the extension calls it at import). Throws std::invalid_argument
// naming the variable for a bad value.
void init_policy();
Policy policy_now();                  // one snapshot (init_policy() first)
int set_isa_cap(int cap);             // -1 or an Isa; returns the previous cap
int set_bf16_mode(int mode);          // -1, 0 or 1; returns the previous mode
// "amx"/"avx512"/"avx2"/"scalar" -> Isa (as int); throws std::invalid_argument
// "<what>='<s>' is not one of amx, avx512, avx2, scalar".
int parse_isa(const char* s, const char* what);

Isa selected_isa(const Policy& p);              // best_isa() capped by p.isa_cap
bool bf16_dot_enabled(const Policy& p);         // VDPBF16PS for bf16 blocks under p
double bf16_dot_speedup_measured();             // measured at init; 0 without AVX512-BF16
bool bf16_choice_forced(const Policy& p);       // p.bf16 is 0 or 1 (not measured)

Kernel kernel_path(Op op, const OpShape& s, const Policy& p);
inline Kernel kernel_path(Op op, const OpShape& s) { return kernel_path(op, s, policy_now()); }
Isa kernel_isa(Kernel k);          // the ISA unit the kernel lives in
const char* kernel_name(Kernel k);  // "cpu-avx512", "cpu-avx512bf16", "cpu-avx2-widen", "cpu-aten", ...
const char* op_name(Op op);
bool parse_op(const char* s, Op* op);

}  // namespace cpu
}  // namespace pysparse
