// Shared pieces of the block-sparse kernels (internal linkage; see int8_linear_impl.h).
#pragma once
#include <type_traits>
#include <vector>

#include "bsr_linear.h"
#include "int8_linear_impl.h"

namespace pysparse {
namespace cpu {
namespace {
namespace detail {

// ReLU that keeps NaN (as torch.relu does): NaN < 0 is false. Branch-free, so the
// epilogue loops below vectorize (a scalar epilogue cost as much as the whole int8
// block-sparse GEMM at density 0.1: 64 outputs x M per block row).
inline float relu_keep_nan(float v) { return v < 0.f ? 0.f : v; }

template <int R, class F>
inline void step_tail(int64_t left, int64_t i, F& f) {
  if constexpr (R > 0) {
    if (left == R) return f(std::integral_constant<int, R>{}, i);
    step_tail<R - 1>(left, i, f);
  }
}

// Calls f(std::integral_constant<int, R>{}, i) over [i, n) in steps of MAX, the leftover as
// one step of its own height: the micro-kernels are templates on their row count, and with
// single leftover rows a block row's values would stream once per row (M = 16 at 6 rows:
// 6 + 6 + 4, not 6 + 6 + 1 + 1 + 1 + 1).
template <int MAX, class F>
inline void for_steps(int64_t i, int64_t n, F&& f) {
  for (; i + MAX <= n; i += MAX) f(std::integral_constant<int, MAX>{}, i);
  if (i < n) step_tail<MAX - 1>(n - i, i, f);
}

// Epilogue of one block row for rows [m0, m0 + rows): bias, ReLU, store.
inline void bsr_f32_store(const BsrF32Args& g, int64_t m0, int64_t rows, int64_t n0, const float* acc,
                          int64_t ld) {
  const int64_t nn = std::min(g.bn, g.N - n0);
  float zero[64] = {};
  const float* bias = g.bias ? g.bias + n0 : zero;
  for (int64_t r = 0; r < rows; ++r) {
    float* o = g.out + (m0 + r) * g.ldo + n0;
    const float* a = acc + r * ld;
    if (g.relu)
      for (int64_t j = 0; j < nn; ++j) o[j] = relu_keep_nan(a[j] + bias[j]);
    else
      for (int64_t j = 0; j < nn; ++j) o[j] = a[j] + bias[j];
  }
}

// At least n floats of v, 64-byte aligned as the tensors' storage: vector storage is only
// 16-byte aligned, and every zmm load of it then straddles two cache lines.
inline float* aligned_scratch(std::vector<float>& v, size_t n) {
  if (v.size() < n + 16) v.resize(n + 16);
  const uintptr_t p = reinterpret_cast<uintptr_t>(v.data());
  return reinterpret_cast<float*>((p + 63) & ~uintptr_t(63));
}

// This thread's scratch for block row rb's blocks widened to fp32 k-major ([bk][bn], what
// the fp32 kernels read); the ISA units fill it (widen_block_row), with vector shifts.
inline float* widen_scratch(const BsrBf16Args& b, int64_t rb) {
  thread_local std::vector<float> scratch;
  return aligned_scratch(scratch, size_t(b.f.row_ptr[rb + 1] - b.f.row_ptr[rb]) * b.f.bk * b.f.bn);
}

// Portable gradient of the stored blocks (the scalar and AVX2 units compile it with their
// flags; the inner loop over bn contiguous outputs vectorizes). KR rows of a block's k
// accumulate over all M at once, so each g row slice is read once per KR rows of k.
inline void bsr_grad_values_generic(const BsrGradArgs& a, int64_t r0, int64_t r1) {
  constexpr int64_t KR = 8;
  float acc[KR][64];
  for (int64_t rb = r0; rb < r1; ++rb) {
    const int64_t n0 = rb * a.bn, nn = std::min(a.bn, a.N - n0);
    for (int32_t b = a.row_ptr[rb]; b < a.row_ptr[rb + 1]; ++b) {
      const int64_t k0 = int64_t(a.col_idx[b]) * a.bk, kn = std::min(a.bk, a.K - k0);
      float* ob = a.out + int64_t(b) * a.bk * a.bn;
      std::fill(ob, ob + a.bk * a.bn, 0.f);
      for (int64_t kc = 0; kc < kn; kc += KR) {
        const int64_t kr = std::min(KR, kn - kc);
        for (int64_t r = 0; r < kr; ++r)
          for (int64_t n = 0; n < 64; ++n) acc[r][n] = 0.f;
        for (int64_t m = 0; m < a.M; ++m) {
          const float* gm = a.g + m * a.ldg + n0;
          const float* xm = a.x + m * a.ldx + k0 + kc;
          for (int64_t r = 0; r < kr; ++r) {
            const float xv = xm[r];
            for (int64_t n = 0; n < nn; ++n) acc[r][n] += xv * gm[n];
          }
        }
        for (int64_t r = 0; r < kr; ++r)
          for (int64_t n = 0; n < nn; ++n) ob[(kc + r) * a.bn + n] = acc[r][n];
      }
    }
  }
}

template <bool U8, bool RELU>
inline void i8_dequant(const int32_t* c, const int32_t* cs, const float* ws, float sa, const float* bias,
                       float* f) {
  for (int64_t j = 0; j < kPackN; ++j) {
    const int32_t acc = U8 ? int32_t(uint32_t(c[j]) - 128u * uint32_t(cs[j])) : c[j];
    float v = static_cast<float>(acc) * ws[j];
    v = v * sa;
    v = v + bias[j];
    f[j] = RELU ? relu_keep_nan(v) : v;
  }
}

// int8: C[rows][64] int32 for block row rb -> dequantize, bias, ReLU, store (as run_tiles).
inline void bsr_i8_store(const BsrI8Args& b, int64_t m0, int64_t rows, int64_t rb, const int32_t* C,
                         bool u8) {
  const GemmArgs& g = b.g;
  const int64_t n0 = rb * kPackN, nn = std::min(kPackN, g.N - n0);
  const int32_t* cs = g.colsum + n0;
  const float* ws = g.w_scale + n0;
  // Padded columns (n >= N) read zero bias; their results are never stored.
  alignas(64) float bias[kPackN] = {};
  if (g.bias) std::memcpy(bias, g.bias + n0, sizeof(float) * nn);
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t m = m0 + r;
    alignas(64) float f[kPackN];
    const int32_t* c = C + r * kPackN;
    if (u8) {
      if (b.relu) i8_dequant<true, true>(c, cs, ws, g.a_scale[m], bias, f);
      else i8_dequant<true, false>(c, cs, ws, g.a_scale[m], bias, f);
    } else {
      if (b.relu) i8_dequant<false, true>(c, cs, ws, g.a_scale[m], bias, f);
      else i8_dequant<false, false>(c, cs, ws, g.a_scale[m], bias, f);
    }
    switch (g.out_type) {
      case OutType::F32: std::memcpy(static_cast<float*>(g.out) + m * g.ldo + n0, f, nn * 4); break;
      case OutType::BF16: {
        uint16_t* o = static_cast<uint16_t*>(g.out) + m * g.ldo + n0;
        for (int64_t j = 0; j < nn; ++j) o[j] = f32_to_bf16(f[j]);
        break;
      }
      default: {
        uint16_t* o = static_cast<uint16_t*>(g.out) + m * g.ldo + n0;
        for (int64_t j = 0; j < nn; ++j) o[j] = f32_to_f16(f[j]);
      }
    }
  }
}

}  // namespace detail
}  // namespace
}  // namespace cpu
}  // namespace pysparse
