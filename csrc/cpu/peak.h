// Register-only peaks of the multiply instructions pysparse's CPU kernels are built on: for
// each, a loop of many independent accumulator chains with no memory traffic inside it, so
// its rate is what the core's execution units give at best. The benchmark harness measures
// them on every thread at once in each run (pysparse/bench/peak.py) and shows each kernel's
// MAC rate as a fraction of the peak of the instruction it used.
//
// The loops live in one translation unit per ISA (peak_avx2.cpp, peak_avx512.cpp,
// peak_avx512bf16.cpp, peak_amx.cpp), each built with its own -m flags; they include no
// torch headers and time nothing (no inline std:: templates in an ISA unit, see
// int8_linear_impl.h). peak.cpp, built without -m flags, checks CPUID, sizes the loops,
// runs them on threads and times them.
#pragma once
#include <cstdint>

#include "isa.h"

namespace pysparse {
namespace cpu {

// Each loop runs `iters` rounds of independent instructions and returns a checksum of its
// accumulators (so the loop cannot be removed; the AMX test under the tile model checks it).
// MACs per round, counted per instruction as the hardware does them:
//   VFMADD231PS ymm 8, zmm 16 fp32 MACs; VPMADDWD ymm 16 s16 MACs (the AVX2 int8 kernels
//   widen s8 to s16 and pair VPMADDWD with VPADDD: 16 int8 MACs per pair); VPDPBUSD zmm 64
//   u8 x s8 MACs; VDPBF16PS zmm 32 bf16 MACs; TDPBSSD 16 x 16 x 64 = 16384 s8 MACs and
//   TDPBF16PS 16 x 16 x 32 = 8192 bf16 MACs (one 16 x 64-byte A tile by one 16-row B tile).
// Chains: enough to cover latency x throughput (FMA: 4-5 cycles x 2 ports = 10 in flight;
// VPDPBUSD 5 x 2; TDPBSSD: Intel gives 52 cycles latency and one per 16 cycles on Sapphire
// Rapids, so 4 C tiles; VPMADDWD + VPADDD: only the 1-cycle VPADDD carries a chain).
constexpr int kPeakChainsYmm = 12;  // of 16 ymm registers: 12 accumulators + operands
constexpr int kPeakChainsZmm = 16;  // of 32 zmm registers
constexpr int kPeakChainsTile = 4;  // C tiles tmm0..3 (A: tmm4..5, B: tmm6..7; amx_tiles.h)

#if PYSPARSE_X86  // declared only where they are built
int64_t peak_loop_fma_avx2(int64_t iters);        // 12 x VFMADD231PS ymm per round
int64_t peak_loop_maddwd_avx2(int64_t iters);     // 12 x (VPMADDWD ymm + VPADDD ymm)
int64_t peak_loop_fma_avx512(int64_t iters);      // 16 x VFMADD231PS zmm
int64_t peak_loop_dpbusd_avx512(int64_t iters);   // 16 x VPDPBUSD zmm
int64_t peak_loop_dpbf16_avx512(int64_t iters);   // 16 x VDPBF16PS zmm
int64_t peak_loop_tdpbssd_amx(int64_t iters);     // 4 x TDPBSSD (configures and releases tiles)
int64_t peak_loop_tdpbf16ps_amx(int64_t iters);   // 4 x TDPBF16PS
#endif

// One instruction's loop as the harness sees it.
struct PeakInstr {
  const char* name;         // "vpdpbusd", ...: the key in the results JSON
  const char* instruction;  // "VPDPBUSD zmm", ...: for people
  const char* kind;         // "int8", "bf16" or "fp32": what a MAC multiplies
  double macs_per_instr;
  int instrs_per_round;
};
constexpr int kNumPeakInstrs = 7;
const PeakInstr& peak_instr(int i);  // 0 .. kNumPeakInstrs - 1
bool peak_available(int i);          // this CPU (and OS, for AMX) runs it

// Per-repetition figures of one measurement; at most kMaxPeakReps repetitions.
constexpr int kMaxPeakReps = 16;
struct PeakRun {
  int threads = 0, reps = 0;
  int64_t iters = 0;                  // rounds per thread per repetition
  double macs_per_thread = 0;         // MACs one thread does in one repetition
  double wall_s[kMaxPeakReps] = {};   // first thread's start to last thread's end
  double slowest_s[kMaxPeakReps] = {};  // the slowest thread's own time
  double fastest_s[kMaxPeakReps] = {};  // the fastest thread's own time
};
// Runs instruction i's loop on `threads` threads at once (released together), sized so one
// thread's loop takes about target_ms, `reps` times. Throws std::invalid_argument when i is
// out of range or not available here, or threads / reps / target_ms are not positive.
PeakRun measure_peak(int i, int threads, double target_ms, int reps);

}  // namespace cpu
}  // namespace pysparse
