// Shared, ISA-agnostic pieces of the int8 GEMM: the cache-blocked driver, the epilogue
// and activation quantization. Each ISA translation unit includes this and compiles it
// with its own flags; every unit is built with -ffp-contract=off so the float epilogue
// rounds identically on all paths (the layers' outputs agree bit for bit across paths).
//
// Everything here has internal linkage (anonymous namespace) and no torch/c10 or
// std::vector is used: an inline function shared between translation units built with
// different -m flags could be emitted with AVX-512 code and picked by the linker for
// the scalar path, which would crash an older CPU.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstring>

#include "int8_linear.h"

namespace pysparse {
namespace cpu {
namespace {
namespace detail {

inline uint32_t f32_bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
inline float f32_from_bits(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }

inline float bf16_to_f32(uint16_t h) { return f32_from_bits(uint32_t(h) << 16); }
// Round to nearest even, NaN -> 0x7fc0: the same bits as torch's float -> bfloat16.
inline uint16_t f32_to_bf16(float f) {
  uint32_t u = f32_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}
// IEEE half <-> float, the branch-free routines torch itself uses (c10/util/Half.h).
inline float f16_to_f32(uint16_t h) {
  const uint32_t w = uint32_t(h) << 16, sign = w & 0x80000000u, two_w = w + w;
  const float normalized = f32_from_bits((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
  const float denormalized = f32_from_bits((two_w >> 17) | (126u << 23)) - 0.5f;
  return f32_from_bits(sign | (two_w < (1u << 27) ? f32_bits(denormalized) : f32_bits(normalized)));
}
inline uint16_t f32_to_f16(float f) {
  float base = (std::fabs(f) * 0x1.0p+112f) * 0x1.0p-110f;
  const uint32_t w = f32_bits(f), shl1_w = w + w, sign = w & 0x80000000u;
  uint32_t bias = shl1_w & 0xFF000000u;
  if (bias < 0x71000000u) bias = 0x71000000u;
  base = f32_from_bits((bias >> 1) + 0x07800000u) + base;
  const uint32_t bits = f32_bits(base);
  const uint32_t nonsign = ((bits >> 13) & 0x00007C00u) + (bits & 0x00000FFFu);
  return uint16_t((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
}
struct Bf16 { uint16_t v; operator float() const { return bf16_to_f32(v); } };
struct F16 { uint16_t v; operator float() const { return f16_to_f32(v); } };

// K block of 512: a 64-column x 512-k slice of packed B is 32 KB and stays in L1 while
// every row of the task streams over it; C/F scratch for the task's rows stays in L2.
constexpr int64_t kKC = 512;

template <typename T>
void quantize_row_t(const T* x, int64_t K, int64_t Kp, float scale_in, bool u8, int8_t* a,
                    float* scale_out) {
  float amax = 0.f;
  bool finite = true;
  for (int64_t k = 0; k < K; ++k) {
    float v = static_cast<float>(x[k]);
    finite &= std::isfinite(v);
    amax = std::max(amax, std::fabs(v));
  }
  float scale, inv;
  if (scale_in > 0.f) {
    scale = scale_in;
    inv = 1.0f / scale_in;
  } else {
    // Mirrors pysparse.reference.quantize_per_row: scale = amax / 127, x * (127 / amax).
    scale = amax > 0.f ? amax / 127.0f : 1.0f;
    inv = amax > 0.f ? 127.0f / amax : 1.0f;
  }
  if (!finite) scale = std::nanf("");
  *scale_out = scale;
  const int8_t shift = u8 ? int8_t(-128) : int8_t(0);  // u8 = s8 ^ 0x80 = s8 + 128
  for (int64_t k = 0; k < K; ++k) {
    // NaN (a NaN input, or 0 * inf when amax is subnormal and 127 / amax overflows)
    // quantizes to 0 as in the reference; then clamp and round (the bounds are integers,
    // so clamping first does not change the result).
    float v = static_cast<float>(x[k]) * inv;
    if (!(v == v)) v = 0.f;
    float q = std::nearbyint(std::min(127.f, std::max(-128.f, v)));
    a[k] = static_cast<int8_t>(static_cast<int>(q)) ^ shift;
  }
  for (int64_t k = K; k < Kp; ++k) a[k] = shift;  // padding quantizes to 0
}

inline void quantize_rows(const void* x, InType t, int64_t ldx, int64_t K, int64_t Kp,
                          int64_t m0, int64_t m1, float scale_in, bool u8, int8_t* a,
                          float* scale_out) {
  for (int64_t m = m0; m < m1; ++m) {
    int8_t* am = a + m * Kp;
    switch (t) {
      case InType::F32:
        quantize_row_t(static_cast<const float*>(x) + m * ldx, K, Kp, scale_in, u8, am,
                       scale_out + m);
        break;
      case InType::BF16:
        quantize_row_t(static_cast<const Bf16*>(x) + m * ldx, K, Kp, scale_in, u8,
                       am, scale_out + m);
        break;
      default:
        quantize_row_t(static_cast<const F16*>(x) + m * ldx, K, Kp, scale_in, u8, am,
                       scale_out + m);
    }
  }
}

inline float cvt_out(float v, float*) { return v; }
inline uint16_t cvt_out(float v, Bf16*) { return f32_to_bf16(v); }
inline uint16_t cvt_out(float v, F16*) { return f32_to_f16(v); }

template <typename T, typename O>
inline void store_row(O* o, const float* f, float sa, const float* bias, int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    float v = f[j] * sa;
    if (bias) v = v + bias[j];
    o[j] = cvt_out(v, static_cast<T*>(nullptr));
  }
}

// Epilogue, part 1: scale group gi's int32 sums C[rows][64] of rows m.. (64 columns from
// n0): with I32 output (G == 1) stored exactly into out; else dequantized by the columns'
// weight scales into F[rows][64] (group 0 sets F, later groups add). Shared by every path,
// so the float rounding is the same everywhere.
inline void epilogue_group(const GemmArgs& g, int64_t m, int64_t rows, int64_t gi, int64_t n0, bool u8,
                           const int32_t* C, float* F) {
  const int32_t* cs = g.colsum + gi * g.Np + n0;
  if (g.out_type == OutType::I32) {  // raw GEMM (G == 1): exact int32
    const int64_t nn = std::min(kPackN, g.N - n0);
    for (int64_t r = 0; r < rows; ++r) {
      int32_t* o = static_cast<int32_t*>(g.out) + (m + r) * g.ldo + n0;
      for (int64_t j = 0; j < nn; ++j)
        o[j] = u8 ? int32_t(uint32_t(C[r * kPackN + j]) - 128u * uint32_t(cs[j])) : C[r * kPackN + j];
    }
    return;
  }
  const float* ws = g.w_scale + gi * g.Np + n0;
  // Columns up to N only: epilogue_store reads no more, and gemm_avx2 leaves C's padding
  // columns unwritten.
  const int64_t nn = std::min(kPackN, g.N - n0);
  for (int64_t r = 0; r < rows; ++r) {
    const int32_t* cr = C + r * kPackN;
    float* fr = F + r * kPackN;
    for (int64_t j = 0; j < nn; ++j) {
      // Wrap-around arithmetic: the true sum fits in int32 (|K| * 128 * 128 < 2^31).
      int32_t acc = u8 ? int32_t(uint32_t(cr[j]) - 128u * uint32_t(cs[j])) : cr[j];
      float v = static_cast<float>(acc) * ws[j];
      fr[j] = gi == 0 ? v : fr[j] + v;
    }
  }
}

// Epilogue, part 2 (float outputs): F[rows][64] of rows m.. x the row's activation scale,
// + bias, converted to the output type, into out's columns n0.. (up to N).
inline void epilogue_store(const GemmArgs& g, int64_t m0, int64_t rows, int64_t n0, const float* F) {
  const int64_t nn = std::min(kPackN, g.N - n0);
  const float* bias = g.bias ? g.bias + n0 : nullptr;
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t m = m0 + r;
    const float* fr = F + r * kPackN;
    switch (g.out_type) {
      case OutType::F32:
        store_row<float>(static_cast<float*>(g.out) + m * g.ldo + n0, fr, g.a_scale[m], bias, nn);
        break;
      case OutType::BF16:
        store_row<Bf16>(static_cast<uint16_t*>(g.out) + m * g.ldo + n0, fr, g.a_scale[m], bias, nn);
        break;
      default:
        store_row<F16>(static_cast<uint16_t*>(g.out) + m * g.ldo + n0, fr, g.a_scale[m], bias, nn);
    }
  }
}

// micro(m, rows, chunk, k0, k1, C, ldc, accumulate): C[rows][64] (+)= A[m.., k0:k1] B[k0:k1, chunk]
// mr: rows the micro-kernel handles per call (it may compute more on zero-padded rows).
// C and F are the caller's scratch: [round_up(m1 - m0, 32)][64] each.
template <class Micro>
void run_tiles(const GemmArgs& g, int64_t m0, int64_t m1, int64_t c0, int64_t c1, bool u8,
               int64_t mr, int32_t* C, float* F, Micro&& micro) {
  const int64_t rows = m1 - m0;
  if (rows <= 0) return;
  const int64_t G = g.Kp / g.group;
  for (int64_t c = c0; c < c1; ++c) {
    const int64_t n0 = c * kPackN;
    for (int64_t gi = 0; gi < G; ++gi) {
      const int64_t gs = gi * g.group, ge = gs + g.group;
      for (int64_t k = gs; k < ge; k += kKC) {
        const int64_t ke = std::min(k + kKC, ge);
        for (int64_t r = 0; r < rows; r += mr)
          micro(m0 + r, std::min(mr, rows - r), c, k, ke, C + r * kPackN, k != gs);
      }
      epilogue_group(g, m0, rows, gi, n0, u8, C, F);
    }
    if (g.out_type != OutType::I32) epilogue_store(g, m0, rows, n0, F);
  }
}

}  // namespace detail
}  // namespace
}  // namespace cpu
}  // namespace pysparse
