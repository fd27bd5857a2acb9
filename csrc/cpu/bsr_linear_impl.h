// Shared pieces of the block-sparse kernels (internal linkage; see int8_linear_impl.h).
#pragma once
#include "bsr_linear.h"
#include "int8_linear_impl.h"

namespace pysparse {
namespace cpu {
namespace {
namespace detail {

// Epilogue of one block row for rows [m0, m0 + rows): bias, ReLU, store.
inline void bsr_f32_store(const BsrF32Args& g, int64_t m0, int64_t rows, int64_t n0, const float* acc,
                          int64_t ld) {
  const int64_t nn = std::min(g.bn, g.N - n0);
  for (int64_t r = 0; r < rows; ++r) {
    float* o = g.out + (m0 + r) * g.ldo + n0;
    for (int64_t j = 0; j < nn; ++j) {
      float v = acc[r * ld + j];
      if (g.bias) v = v + g.bias[n0 + j];
      if (g.relu) v = v > 0.f ? v : (v == v ? 0.f : v);  // NaN stays NaN, as torch.relu
      o[j] = v;
    }
  }
}

// int8: C[rows][64] int32 for block row rb -> dequantize, bias, ReLU, store (as run_tiles).
inline void bsr_i8_store(const BsrI8Args& b, int64_t m0, int64_t rows, int64_t rb, const int32_t* C,
                         bool u8) {
  const GemmArgs& g = b.g;
  const int64_t n0 = rb * kPackN, nn = std::min(kPackN, g.N - n0);
  const int32_t* cs = g.colsum + n0;
  const float* ws = g.w_scale + n0;
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t m = m0 + r;
    float f[kPackN];
    for (int64_t j = 0; j < nn; ++j) {
      int32_t acc = u8 ? int32_t(uint32_t(C[r * kPackN + j]) - 128u * uint32_t(cs[j])) : C[r * kPackN + j];
      float v = static_cast<float>(acc) * ws[j];
      v = v * g.a_scale[m];
      if (g.bias) v = v + g.bias[n0 + j];
      if (b.relu) v = v > 0.f ? v : (v == v ? 0.f : v);
      f[j] = v;
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
