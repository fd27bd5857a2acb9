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

// Shape dispatch on AMX machines (issue 12): below these rows of x the AVX-512 VNNI kernels
// run instead of the AMX ones, which pay a tile configuration and whole 16-row tiles per
// pass. From issue 12's table (a 2-core AMX Xeon, 2 threads, K = N = 4096, one run each):
//  - int8_linear / int8_mm: AMX vs VNNI 1.32 vs 1.11 ms at M = 16, 3.51 vs 6.08 ms at
//    M = 128. Lines through those points, AMX 1.32 + 0.01955 (M - 16) and VNNI
//    1.11 + 0.04438 (M - 16), cross at M - 16 = 0.21 / 0.02482 = 8.5, M ~ 24.5 (M = 1:
//    1.35 vs 0.73; M = 512: 12.5 vs 25.0, so AMX wins from there on). Rounded up to 32, the
//    AMX kernel's full pass of two 16-row tiles: from 32 rows no tile row is padding.
//  - bsr_int8_linear (density 0.1): AMX vs VNNI 0.37 vs 0.09 ms at M = 1; at M = 128 AMX
//    0.46-1.40 ms over five runs (midpoint 0.93), VNNI 1.26-1.30 (midpoint 1.28); M = 512
//    3.94 vs 4.98. Lines through M = 1 and the M = 128 midpoints, AMX 0.37 + 0.00441 (M - 1)
//    and VNNI 0.09 + 0.00937 (M - 1), cross at M - 1 = 0.28 / 0.00496 = 56.4, M ~ 57 (56
//    with VNNI's 1.30). Rounded up to 64, two full 32-row passes.
// Two points per line on a noisy machine: bench/bench_amx.py measures the crossover on an
// AMX machine and prints the thresholds it suggests; PYSPARSE_AMX_MIN_ROWS and
// PYSPARSE_AMX_BSR_MIN_ROWS (rows, >= 0; 0 = AMX for every M) override these at load.
constexpr int64_t kAmxMinRowsDense = 32;
constexpr int64_t kAmxMinRowsBsr = 64;

// Which AMX dense int8 GEMM int8_linear / int8_mm run (PYSPARSE_AMX_GEMM=tiles|rows at
// load; tiles by default): Tiles is gemm_amx (tile-packed activations, C in tiles across a
// scale group's K), Rows the previous gemm_amx_rows (row-major activations, C reloaded per
// 512-k block), kept so an AMX machine compares both in one run (bench/bench_amx.py).
enum class AmxGemm : int { Tiles = 0, Rows = 1 };
// How far ahead the AMX int8 kernels prefetch (PYSPARSE_AMX_PREFETCH at load, 0..64, 0 = off):
// 64-k steps for the dense kernel, stored blocks for the block-sparse one. Unmeasured: see
// kAmxPrefetchDefault in amx_tiles.h for the reasoning behind the default.

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
Isa capped_isa(const Policy& p, Isa best);      // best capped by p.isa_cap
bool bf16_dot_enabled(const Policy& p);         // VDPBF16PS for bf16 blocks under p
double bf16_dot_speedup_measured();             // measured at init; 0 without AVX512-BF16
bool bf16_choice_forced(const Policy& p);       // p.bf16 is 0 or 1 (not measured)

// The AMX knobs read once at load (init_policy() first; fixed for the process).
int64_t amx_min_rows(Op op);  // the threshold in force for op: Int8Linear / Int8Mm, BsrInt8Linear; else 0
AmxGemm amx_gemm_variant();
int amx_prefetch();
const char* amx_gemm_name(AmxGemm v);  // "tiles" / "rows"

// The rule itself, for a CPU whose best ISA is `best` (kernel_path passes best_isa(); the
// test hook _C.kernel_path(..., best_isa=...) passes another, so the shape rule of an AMX
// machine is testable anywhere). Only the ISA level is pretended: the bf16 features
// (AMX-BF16, AVX512-BF16) stay this CPU's.
Kernel kernel_path_for(Op op, const OpShape& s, const Policy& p, Isa best);
Kernel kernel_path(Op op, const OpShape& s, const Policy& p);
inline Kernel kernel_path(Op op, const OpShape& s) { return kernel_path(op, s, policy_now()); }
Isa kernel_isa(Kernel k);          // the ISA unit the kernel lives in
const char* kernel_name(Kernel k);  // "cpu-avx512", "cpu-avx512bf16", "cpu-avx2-widen", "cpu-aten", ...
const char* op_name(Op op);
bool parse_op(const char* s, Op* op);

}  // namespace cpu
}  // namespace pysparse
