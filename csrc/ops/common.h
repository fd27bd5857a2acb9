// Pieces every CPU op wrapper shares: input checks worded for users, the ISA choice, and
// the per-row activation quantization into a padded scratch.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <optional>

#include "../cpu/dispatch.h"
#include "../cpu/int8_linear.h"

namespace pysparse {
namespace ops {

using at::Tensor;

// The kernel this call runs (csrc/cpu/dispatch.h: the one policy, one snapshot per call).
inline cpu::Policy policy() {
  try {
    return cpu::policy_now();
  } catch (const std::exception& e) {  // a bad PYSPARSE_CPU_ISA / PYSPARSE_CPU_BF16 value
    TORCH_CHECK_VALUE(false, e.what());
  }
}
inline cpu::Kernel path(cpu::Op op, const cpu::OpShape& s, const cpu::Policy& p) { return cpu::kernel_path(op, s, p); }
inline cpu::Kernel path(cpu::Op op, const cpu::OpShape& s = {}) { return path(op, s, policy()); }

// The int8 GEMM micro-kernel of an ISA unit (int8_linear, int8_mm and int8_conv2d share them);
// off x86 only the scalar unit is built, and the policy selects nothing else.
using GemmFn = void (*)(const cpu::GemmArgs&, int64_t, int64_t, int64_t, int64_t, int32_t*, float*);
inline GemmFn int8_gemm_fn(cpu::Isa isa) {
#if PYSPARSE_X86
  switch (isa) {
    case cpu::Isa::Amx: return cpu::gemm_amx;
    case cpu::Isa::Avx512: return cpu::gemm_avx512;
    case cpu::Isa::Avx2: return cpu::gemm_avx2;
    default: break;
  }
#endif
  (void)isa;
  return cpu::gemm_scalar;
}

// GemmArgs.a_min for gemm_avx2 (the other kernels ignore it, -128 = no bound): the smallest
// of the n quantized activation bytes, in one pass (a 56x56x128 conv input, 401 KB, takes
// ~15 us against the conv's ~0.4 ms). With A >= 0 or >= -127 gemm_avx2 multiplies with
// VPMADDUBSW, 1.3x-2.3x its VPMADDWD form (int8_linear_avx2.cpp).
inline int act_min(cpu::Isa isa, const int8_t* a, int64_t n) {
#if PYSPARSE_X86
  if (isa == cpu::Isa::Avx2 && n > 0)
    return at::parallel_reduce(
        int64_t(0), n, int64_t(1) << 18, 127,
        [&](int64_t b, int64_t e, int m) { return std::min(m, cpu::act_min_avx2(a + b, e - b)); },
        [](int x, int y) { return std::min(x, y); });
#endif
  (void)isa, (void)a, (void)n;
  return -128;
}

// x: CPU, float32/bfloat16/float16, last dimension K.
inline void check_x(const Tensor& x, int64_t K, const char* op) {
  TORCH_CHECK_VALUE(x.device().is_cpu(), op, ": x must be on the CPU (the weight is), got ", x.device());
  const auto dt = x.scalar_type();
  TORCH_CHECK_VALUE(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf, op,
                    ": x must be float32, bfloat16 or float16, got ", dt);
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.size(-1) == K, op, ": x must have last dimension in_features=", K,
                    ", got shape ", x.sizes());
}

inline void check_bias(const std::optional<Tensor>& bias, int64_t N, const char* op) {
  if (!bias) return;
  TORCH_CHECK_VALUE(bias->scalar_type() == at::kFloat && bias->dim() == 1 && bias->size(0) == N &&
                        bias->device().is_cpu() && bias->is_contiguous(),
                    op, ": bias must be a contiguous float32 CPU tensor of shape [", N, "], got ",
                    bias->scalar_type(), " ", bias->sizes(), " on ", bias->device(),
                    bias->is_contiguous() ? "" : " (not contiguous)");
}

// The static per-tensor activation scale, or 0 for dynamic per-row quantization.
inline float static_x_scale(const std::optional<Tensor>& x_scale, const char* op) {
  if (!x_scale) return 0.f;
  TORCH_CHECK_VALUE(x_scale->numel() == 1 && x_scale->scalar_type() == at::kFloat, op,
                    ": x_scale must be a one-element float32 tensor (a static per-tensor activation "
                    "scale), got ", x_scale->scalar_type(), " ", x_scale->sizes());
  const float s = x_scale->item<float>();
  TORCH_CHECK_VALUE(std::isfinite(s) && s > 0.f, op, ": x_scale must be finite and > 0, got ", s);
  return s;
}

// int32 accumulation is exact while K * 128 * 128 < 2^31 (every product -128 x -128).
constexpr int64_t kMaxK = ((int64_t(1) << 31) - 1) / (128 * 128);  // 131071
inline void check_k(int64_t K, const char* op) {
  TORCH_CHECK_VALUE(K <= kMaxK, op, ": K=", K, " is too large for exact int32 accumulation (K <= ", kMaxK,
                    "); split the layer along K");
}

// colsum's padding columns (n >= N, up to Np) hold this, a value no real column sum can
// take (|sum| <= 128 * K <= 2^24): the packed layout rounds N up to 64, so without it a
// weight packed for N = 70 would run silently as N = 100 (the extra outputs = bias).
constexpr int32_t kColsumPad = INT32_MIN;

// N must be the number of output channels the weight was packed with (colsum [G, Np]).
inline void check_packed_n(const Tensor& colsum, int64_t N, int64_t Np, const char* op) {
  const int32_t* cs = colsum.data_ptr<int32_t>();  // group 0
  const bool ok = (N == 0 || cs[N - 1] != kColsumPad) && (N == Np || cs[N] == kColsumPad);
  if (ok) return;
  int64_t held = 0;
  while (held < Np && cs[held] != kColsumPad) ++held;
  TORCH_CHECK_VALUE(false, op, ": N=", N, " does not match the packed weight, which holds ", held,
                    " output channels (was it packed for another layer?)");
}

inline cpu::InType in_type(at::ScalarType dt) {
  return dt == at::kFloat ? cpu::InType::F32 : dt == at::kBFloat16 ? cpu::InType::BF16 : cpu::InType::F16;
}
inline cpu::OutType out_type(at::ScalarType dt) {
  return dt == at::kFloat ? cpu::OutType::F32 : dt == at::kBFloat16 ? cpu::OutType::BF16 : cpu::OutType::F16;
}

inline auto quant_fn(cpu::Isa isa) {
#if PYSPARSE_X86
  switch (isa) {
    case cpu::Isa::Amx:
    case cpu::Isa::Avx512: return cpu::quantize_rows_avx512;
    case cpu::Isa::Avx2: return cpu::quantize_rows_avx2;
    default: break;
  }
#endif
  (void)isa;
  return cpu::quantize_rows_scalar;
}

struct QuantizedX {
  Tensor a;      // int8 [Mp, Kp]: rows past M and columns past K quantize to 0
  Tensor scale;  // float32 [M]
};

// Quantize each row of x2 [M, K] (unit column stride) into a zero-padded [Mp, Kp]
// scratch; u8 stores q + 128 for the VNNI kernels.
inline QuantizedX quantize_x(const Tensor& x2, float static_scale, int64_t Mp, int64_t Kp, cpu::Isa isa, bool u8) {
  const int64_t M = x2.size(0), K = x2.size(1);
  Tensor ap = at::empty({Mp, Kp}, x2.options().dtype(at::kChar));
  if (Mp > M) ap.narrow(0, M, Mp - M).fill_(u8 ? -128 : 0);
  Tensor scale = at::empty({M}, x2.options().dtype(at::kFloat));
  const auto qf = quant_fn(isa);
  const cpu::InType t = in_type(x2.scalar_type());
  const void* xp = x2.data_ptr();
  const int64_t ldx = x2.stride(0);
  int8_t* app = ap.data_ptr<int8_t>();
  float* sp = scale.data_ptr<float>();
  at::parallel_for(0, M, std::max<int64_t>(1, 16384 / std::max<int64_t>(K, 1)), [&](int64_t m0, int64_t m1) {
    qf(xp, t, ldx, K, Kp, m0, m1, static_scale, u8, app, sp);
  });
  return {ap, scale};
}

}  // namespace ops
}  // namespace pysparse
