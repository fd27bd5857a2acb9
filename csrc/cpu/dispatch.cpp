// The CPU dispatch policy (dispatch.h): the user's choices held in one atomic word, read
// from the environment once, and the one function that maps (op, call facts, choices) to
// a kernel.
#include "dispatch.h"

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>

#include "cpu_features.h"
#if PYSPARSE_X86
#include "bsr_linear.h"  // bf16_dot_speedup (the AVX512-BF16 unit)
#endif

namespace pysparse {
namespace cpu {

namespace {

// A policy in one word, so a reader sees both fields from the same moment:
// bits 0-3 isa_cap + 1, bits 4-7 bf16 + 1.
uint32_t encode(const Policy& p) { return uint32_t(p.isa_cap + 1) | (uint32_t(p.bf16 + 1) << 4); }
Policy decode(uint32_t w) { return Policy{int(w & 0xF) - 1, int((w >> 4) & 0xF) - 1}; }

std::atomic<uint32_t> g_policy{encode(Policy{})};
std::atomic<double> g_bf16_speedup{0.0};

// The AMX knobs (dispatch.h): written once by Init, before any reader gets past init_policy()
// (a function-local static's initialization happens-before every return from it).
int64_t g_amx_min_rows = kAmxMinRowsDense;
int64_t g_amx_bsr_min_rows = kAmxMinRowsBsr;
AmxGemm g_amx_gemm = AmxGemm::Tiles;
int g_amx_prefetch = -1;  // -1: the kernels' default (kAmxPrefetchDefault)

// A whole number in [0, max] from the environment variable `name`, or `dflt` when unset or
// empty; anything else throws std::invalid_argument naming the variable and the value.
int64_t env_count(const char* name, int64_t dflt, int64_t max, const char* what) {
  const char* v = std::getenv(name);
  if (!v || !*v) return dflt;
  int64_t n = 0;
  bool ok = true;
  for (const char* c = v; *c; ++c) {
    if (*c < '0' || *c > '9' || n > max) {
      ok = false;
      break;
    }
    n = n * 10 + (*c - '0');
  }
  if (!ok || n > max)
    throw std::invalid_argument(std::string(name) + " (read when pysparse loads)='" + v + "' is not " + what +
                                " from 0 to " + std::to_string(max));
  return n;
}

struct Init {
  Init() {
    Policy p;
    // (every variable is read before any is stored: a bad one leaves the defaults in place)
    const int64_t min_rows = env_count("PYSPARSE_AMX_MIN_ROWS", kAmxMinRowsDense, int64_t(1) << 30, "a row count");
    const int64_t bsr_min_rows =
        env_count("PYSPARSE_AMX_BSR_MIN_ROWS", kAmxMinRowsBsr, int64_t(1) << 30, "a row count");
    const int prefetch = int(env_count("PYSPARSE_AMX_PREFETCH", -1, 64, "a prefetch distance"));
    AmxGemm gemm = AmxGemm::Tiles;
    const char* gv = std::getenv("PYSPARSE_AMX_GEMM");
    if (gv && *gv) {
      if (!std::strcmp(gv, "tiles")) gemm = AmxGemm::Tiles;
      else if (!std::strcmp(gv, "rows")) gemm = AmxGemm::Rows;
      else
        throw std::invalid_argument(std::string("PYSPARSE_AMX_GEMM (read when pysparse loads)='") + gv +
                                    "' is not one of tiles, rows");
    }
    const char* isa = std::getenv("PYSPARSE_CPU_ISA");
    if (isa && *isa) p.isa_cap = parse_isa(isa, "PYSPARSE_CPU_ISA (read when pysparse loads)");
    const char* bf16 = std::getenv("PYSPARSE_CPU_BF16");
    if (bf16 && *bf16) {
      if (std::strcmp(bf16, "0") && std::strcmp(bf16, "1"))
        throw std::invalid_argument(std::string("PYSPARSE_CPU_BF16 (read when pysparse loads)='") + bf16 +
                                    "' is not 0 or 1");
      p.bf16 = bf16[0] - '0';
    }
#if PYSPARSE_X86
    // About 1 ms, once per process, here and never inside a forward: the choice it makes
    // changes a bf16 layer's rounding, so it is fixed before the first call (and
    // PYSPARSE_CPU_BF16=0|1 / set_cpu_bf16 fix it across processes).
    if (cpu_features().avx512_bf16) g_bf16_speedup.store(bf16_dot_speedup());
#endif
    g_amx_min_rows = min_rows;
    g_amx_bsr_min_rows = bsr_min_rows;
    g_amx_prefetch = prefetch;
    g_amx_gemm = gemm;
    g_policy.store(encode(p));
  }
};

}  // namespace

void init_policy() {
  // A throw leaves the static uninitialized: the next call tries again (and throws again).
  static const Init once;
  (void)once;
}

Policy policy_now() {
  init_policy();
  return decode(g_policy.load(std::memory_order_acquire));
}

namespace {
// Change one field of the policy word atomically (other fields as another setter left them);
// returns the policy before the change.
template <class F>
Policy update_policy(F&& change) {
  init_policy();
  uint32_t w = g_policy.load();
  Policy p;
  do {
    p = decode(w);
    Policy q = p;
    change(q);
    if (g_policy.compare_exchange_weak(w, encode(q))) break;
  } while (true);
  return p;
}
}  // namespace

int set_isa_cap(int cap) {
  if (cap < -1 || cap >= kNumIsas) throw std::invalid_argument("set_isa_cap: cap out of range");
  return update_policy([cap](Policy& q) { q.isa_cap = cap; }).isa_cap;
}

int set_bf16_mode(int mode) {
  if (mode < -1 || mode > 1) throw std::invalid_argument("set_bf16_mode: mode must be -1, 0 or 1");
  return update_policy([mode](Policy& q) { q.bf16 = mode; }).bf16;
}

int parse_isa(const char* s, const char* what) {
  for (int i = 0; i < kNumIsas; ++i)
    if (!std::strcmp(s, isa_name(Isa(i)))) return i;
  throw std::invalid_argument(std::string(what) + "='" + s + "' is not one of amx, avx512, avx2, scalar");
}

Isa capped_isa(const Policy& p, Isa best) {
  return p.isa_cap >= 0 && p.isa_cap < int(best) ? Isa(p.isa_cap) : best;
}

Isa selected_isa(const Policy& p) { return capped_isa(p, best_isa()); }

int64_t amx_min_rows(Op op) {
  init_policy();
  switch (op) {
    case Op::Int8Linear:
    case Op::Int8Mm: return g_amx_min_rows;
    case Op::BsrInt8Linear: return g_amx_bsr_min_rows;
    default: return 0;
  }
}

AmxGemm amx_gemm_variant() {
  init_policy();
  return g_amx_gemm;
}

int amx_prefetch() {
  init_policy();
  return g_amx_prefetch;
}

const char* amx_gemm_name(AmxGemm v) { return v == AmxGemm::Rows ? "rows" : "tiles"; }

double bf16_dot_speedup_measured() {
  init_policy();
  return g_bf16_speedup.load();
}

bool bf16_choice_forced(const Policy& p) { return p.bf16 >= 0; }

bool bf16_dot_enabled(const Policy& p) {
  if (!cpu_features().avx512_bf16 || selected_isa(p) < Isa::Avx512) return false;
  if (p.bf16 < 0) return bf16_dot_speedup_measured() >= kBf16DotMinSpeedup;
  return p.bf16 == 1;
}

Kernel kernel_path(Op op, const OpShape& s, const Policy& p) { return kernel_path_for(op, s, p, best_isa()); }

Kernel kernel_path_for(Op op, const OpShape& s, const Policy& p, Isa best) {
  Isa isa = capped_isa(p, best);
  // The fp32 block-sparse kernels top out at AVX-512 (no AMX fp32 tiles).
  const Kernel f32 = isa >= Isa::Avx512 ? Kernel::Avx512 : isa == Isa::Avx2 ? Kernel::Avx2 : Kernel::Scalar;
  switch (op) {
    case Op::Int8Linear:
    case Op::Int8Mm:
      // below the AMX threshold the VNNI kernel is faster (dispatch.h, issue 12); M unknown: AMX
      if (isa == Isa::Amx && s.M >= 0 && s.M < amx_min_rows(op)) isa = Isa::Avx512;
      return Kernel(int(isa));  // Kernel::Scalar .. Kernel::Amx share Isa's values
    case Op::BsrInt8Linear:
      if (isa == Isa::Amx && s.M >= 0 && s.M < amx_min_rows(op)) isa = Isa::Avx512;  // as above
      // int8 blocks: AMX, the VNNI kernel, the AVX2 one (VPMADDWD), the scalar one
      return Kernel(int(isa));  // Kernel::Scalar .. Kernel::Amx share Isa's values
    case Op::BsrLinear:
      if (!s.bf16) return f32;
      // bf16 blocks: AMX-BF16 for blocks 32 or 64 deep (one or two 32-k tiles) unless bf16
      // is forced to widening (0); else VDPBF16PS where chosen; else widen to fp32.
      if (isa == Isa::Amx && cpu_features().amx_bf16 && (s.bk == 32 || s.bk == 64) && p.bf16 != 0)
        return Kernel::Amx;
      if (bf16_dot_enabled(p)) return Kernel::Avx512Bf16;
      return isa >= Isa::Avx512 ? Kernel::Avx512Widen : isa == Isa::Avx2 ? Kernel::Avx2Widen : Kernel::ScalarWiden;
    case Op::BsrLinearGradX:
      // the forward's fp32 kernel on W^T, whose blocks are bk wide: widths 16/32/64 only
      if (s.bk > 0 && s.bk != 16 && s.bk != 32 && s.bk != 64) return Kernel::Aten;
      return f32;
    case Op::BsrLinearGradValues:
      return f32;
    case Op::Int8Conv2d:
      // the int8 GEMM micro-kernels of int8_linear (implicit GEMM), so the same ISA units
      return Kernel(int(isa));
    case Op::CompactConv2d:
      return f32;  // fp32 FMA micro-kernels: scalar, AVX2 (6 px x 16 ch), AVX-512 (12 px x 32 ch)
  }
  return Kernel::Scalar;
}

Isa kernel_isa(Kernel k) {
  switch (k) {
    case Kernel::Amx: return Isa::Amx;
    case Kernel::Avx512:
    case Kernel::Avx512Bf16:
    case Kernel::Avx512Widen: return Isa::Avx512;
    case Kernel::Avx2:
    case Kernel::Avx2Widen: return Isa::Avx2;
    default: return Isa::Scalar;
  }
}

const char* kernel_name(Kernel k) {
  switch (k) {
    case Kernel::Scalar: return "cpu-scalar";
    case Kernel::Avx2: return "cpu-avx2";
    case Kernel::Avx512: return "cpu-avx512";
    case Kernel::Amx: return "cpu-amx";
    case Kernel::Avx512Bf16: return "cpu-avx512bf16";
    case Kernel::ScalarWiden: return "cpu-scalar-widen";
    case Kernel::Avx2Widen: return "cpu-avx2-widen";
    case Kernel::Avx512Widen: return "cpu-avx512-widen";
    case Kernel::Aten: return "cpu-aten";
  }
  return "?";
}

namespace {
constexpr const char* kOpNames[] = {"int8_linear", "int8_mm", "bsr_linear", "bsr_linear_grad_x",
                                    "bsr_linear_grad_values", "bsr_int8_linear", "compact_conv2d",
                                    "int8_conv2d"};
}

const char* op_name(Op op) { return kOpNames[int(op)]; }

bool parse_op(const char* s, Op* op) {
  for (int i = 0; i < int(sizeof(kOpNames) / sizeof(kOpNames[0])); ++i)
    if (!std::strcmp(s, kOpNames[i])) {
      *op = Op(i);
      return true;
    }
  return false;
}

}  // namespace cpu
}  // namespace pysparse
