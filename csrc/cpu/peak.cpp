// The register-only peak measurement (peak.h): which loops this CPU runs, how long to run
// them, and timing them on many threads at once. Built without -m flags; the loops are in
// the ISA units and are called only where CPUID (and, for AMX, the OS) allows.
#include "peak.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "cpu_features.h"

namespace pysparse {
namespace cpu {

namespace {
using Loop = int64_t (*)(int64_t);

#if PYSPARSE_X86
#define PEAK_LOOP(f) f
#else
#define PEAK_LOOP(f) nullptr
#endif

struct Entry {
  PeakInstr info;
  Loop loop;
};

// Order: the order of the table in the report.
const Entry kEntries[kNumPeakInstrs] = {
    {{"vpmaddwd", "VPMADDWD ymm + VPADDD", "int8", 16, kPeakChainsYmm}, PEAK_LOOP(peak_loop_maddwd_avx2)},
    {{"vpdpbusd", "VPDPBUSD zmm", "int8", 64, kPeakChainsZmm}, PEAK_LOOP(peak_loop_dpbusd_avx512)},
    {{"tdpbssd", "TDPBSSD", "int8", 16 * 16 * 64, kPeakChainsTile}, PEAK_LOOP(peak_loop_tdpbssd_amx)},
    {{"fma-avx2", "VFMADD231PS ymm", "fp32", 8, kPeakChainsYmm}, PEAK_LOOP(peak_loop_fma_avx2)},
    {{"fma-avx512", "VFMADD231PS zmm", "fp32", 16, kPeakChainsZmm}, PEAK_LOOP(peak_loop_fma_avx512)},
    {{"vdpbf16ps", "VDPBF16PS zmm", "bf16", 32, kPeakChainsZmm}, PEAK_LOOP(peak_loop_dpbf16_avx512)},
    {{"tdpbf16ps", "TDPBF16PS", "bf16", 16 * 16 * 32, kPeakChainsTile}, PEAK_LOOP(peak_loop_tdpbf16ps_amx)},
};
#undef PEAK_LOOP

bool available(int i) {
  const CpuFeatures& f = cpu_features();
  const bool amx = f.amx_tile && f.amx_os_permission;
  switch (i) {
    case 0: return f.avx2;
    case 1: return f.avx512f && f.avx512_vnni;
    case 2: return amx && f.amx_int8;
    case 3: return f.avx2 && f.fma;
    case 4: return f.avx512f;
    case 5: return f.avx512f && f.avx512_bf16;
    case 6: return amx && f.amx_bf16;
    default: return false;
  }
}

using Clock = std::chrono::steady_clock;
double seconds_since(Clock::time_point t0, Clock::time_point t) {
  return std::chrono::duration<double>(t - t0).count();
}

std::atomic<int64_t> g_sink{0};  // the loops' checksums land here: their work is used

double time_once(Loop loop, int64_t iters) {
  const auto t0 = Clock::now();
  g_sink.fetch_add(loop(iters), std::memory_order_relaxed);
  return seconds_since(t0, Clock::now());
}

// Rounds for about target_s on one thread: grow a trial until it takes 2 ms (timer and
// start-up noise below 1%), then scale by the fastest of three such trials (a trial that a
// neighbour preempted only ever runs slower, and would make every loop too short).
int64_t size_loop(Loop loop, double target_s) {
  int64_t iters = 256;
  double t = time_once(loop, iters);
  while (t < 2e-3 && iters < (int64_t(1) << 40)) {
    iters *= t > 1e-5 ? std::max<int64_t>(2, int64_t(2e-3 / t) + 1) : 8;
    t = time_once(loop, iters);
  }
  for (int trial = 0; trial < 2; ++trial) t = std::min(t, time_once(loop, iters));
  return std::max<int64_t>(1, int64_t(double(iters) * target_s / t));
}
}  // namespace

const PeakInstr& peak_instr(int i) {
  if (i < 0 || i >= kNumPeakInstrs) throw std::invalid_argument("peak_instr: index out of range");
  return kEntries[i].info;
}

bool peak_available(int i) { return i >= 0 && i < kNumPeakInstrs && kEntries[i].loop && available(i); }

PeakRun measure_peak(int i, int threads, double target_ms, int reps) {
  if (i < 0 || i >= kNumPeakInstrs) throw std::invalid_argument("measure_peak: no such instruction");
  if (!peak_available(i))
    throw std::invalid_argument(std::string("measure_peak: this CPU (or OS) cannot run ") +
                                kEntries[i].info.instruction);
  if (threads < 1 || threads > 4096) throw std::invalid_argument("measure_peak: threads must be in [1, 4096]");
  if (reps < 1 || reps > kMaxPeakReps)
    throw std::invalid_argument("measure_peak: reps must be in [1, " + std::to_string(kMaxPeakReps) + "]");
  if (!(target_ms > 0 && target_ms <= 10000)) throw std::invalid_argument("measure_peak: target_ms must be in (0, 10000]");
  const Loop loop = kEntries[i].loop;
  PeakRun r;
  r.threads = threads;
  r.reps = reps;
  r.iters = size_loop(loop, target_ms * 1e-3);
  r.macs_per_thread = double(r.iters) * kEntries[i].info.instrs_per_round * kEntries[i].info.macs_per_instr;
  std::vector<Clock::time_point> start(threads), end(threads);
  for (int rep = 0; rep < reps; ++rep) {
    // Every thread waits at the gate, so the loops run at the same time (the peak with all
    // cores busy, as a kernel on all threads runs: shared turbo budget, SMT siblings).
    std::atomic<int> ready{0};
    std::atomic<bool> go{false};
    auto body = [&](int t) {
      ready.fetch_add(1);
      while (!go.load(std::memory_order_acquire)) std::this_thread::yield();
      start[t] = Clock::now();
      g_sink.fetch_add(loop(r.iters), std::memory_order_relaxed);
      end[t] = Clock::now();
    };
    std::vector<std::thread> pool;
    pool.reserve(threads);
    for (int t = 0; t < threads; ++t) pool.emplace_back(body, t);
    while (ready.load() < threads) std::this_thread::yield();
    go.store(true, std::memory_order_release);
    for (auto& th : pool) th.join();
    const auto t0 = *std::min_element(start.begin(), start.end());
    const auto t1 = *std::max_element(end.begin(), end.end());
    double slow = 0, fast = 1e30;
    for (int t = 0; t < threads; ++t) {
      const double s = seconds_since(start[t], end[t]);
      slow = std::max(slow, s);
      fast = std::min(fast, s);
    }
    r.wall_s[rep] = seconds_since(t0, t1);
    r.slowest_s[rep] = slow;
    r.fastest_s[rep] = fast;
  }
  return r;
}

}  // namespace cpu
}  // namespace pysparse
