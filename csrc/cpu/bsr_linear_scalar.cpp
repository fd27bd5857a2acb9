// Portable block-sparse kernels: the reference path every ISA is checked against.
#include "bsr_linear_impl.h"

namespace pysparse {
namespace cpu {

void bsr_f32_scalar(const BsrF32Args& g, int64_t r0, int64_t r1) {
  float acc[64];
  for (int64_t rb = r0; rb < r1; ++rb) {
    const int64_t n0 = rb * g.bn;
    for (int64_t m = 0; m < g.M; ++m) {
      const float* x = g.x + m * g.ldx;
      for (int64_t j = 0; j < g.bn; ++j) acc[j] = 0.f;
      for (int32_t b = g.row_ptr[rb]; b < g.row_ptr[rb + 1]; ++b) {
        const int64_t k0 = int64_t(g.col_idx[b]) * g.bk, kn = std::min(g.bk, g.K - k0);
        const float* v = g.values + int64_t(b) * g.bk * g.bn;
        for (int64_t k = 0; k < kn; ++k)
          for (int64_t j = 0; j < g.bn; ++j) acc[j] += x[k0 + k] * v[k * g.bn + j];
      }
      detail::bsr_f32_store(g, m, 1, n0, acc, g.bn);
    }
  }
}

void bsr_bf16_scalar(const BsrBf16Args& b, int64_t r0, int64_t r1) {
  const BsrF32Args& g = b.f;
  float acc[64];
  for (int64_t rb = r0; rb < r1; ++rb) {
    const int64_t n0 = rb * g.bn;
    for (int64_t m = 0; m < g.M; ++m) {
      const uint16_t* x = b.x + m * b.ldxb;
      for (int64_t j = 0; j < g.bn; ++j) acc[j] = 0.f;
      for (int32_t blk = g.row_ptr[rb]; blk < g.row_ptr[rb + 1]; ++blk) {
        const int64_t k0 = int64_t(g.col_idx[blk]) * g.bk, kn = std::min(g.bk, g.K - k0);
        const uint16_t* v = b.values + int64_t(blk) * g.bk * g.bn;
        for (int64_t k = 0; k < kn; ++k) {  // k ascending; row K (padding) is never read
          const float xv = detail::bf16_to_f32(x[k0 + k]);
          const uint16_t* vk = v + (k / 2) * g.bn * 2 + (k % 2);
          for (int64_t j = 0; j < g.bn; ++j) acc[j] += xv * detail::bf16_to_f32(vk[2 * j]);
        }
      }
      detail::bsr_f32_store(g, m, 1, n0, acc, g.bn);
    }
  }
}

void bsr_i8_scalar(const BsrI8Args& b, int64_t r0, int64_t r1, int32_t* C, float*) {
  const GemmArgs& g = b.g;
  for (int64_t rb = r0; rb < r1; ++rb)
    for (int64_t m = 0; m < g.M; ++m) {
      const int8_t* a = g.a + m * g.Kp;
      for (int64_t j = 0; j < kPackN; ++j) C[j] = 0;
      for (int32_t blk = b.row_ptr[rb]; blk < b.row_ptr[rb + 1]; ++blk) {
        const int64_t k0 = int64_t(b.col_idx[blk]) * kBsrI8Block;
        const int8_t* v = b.values + int64_t(blk) * kBsrI8Block * kBsrI8Block;
        for (int64_t nb = 0; nb < 4; ++nb)
          for (int64_t kg = 0; kg < 16; ++kg)
            for (int64_t j = 0; j < 16; ++j)
              for (int64_t i = 0; i < 4; ++i)
                C[nb * 16 + j] += int32_t(a[k0 + kg * 4 + i]) * int32_t(v[nb * 1024 + kg * 64 + j * 4 + i]);
      }
      detail::bsr_i8_store(b, m, 1, rb, C, /*u8=*/false);
    }
}

void bsr_grad_values_scalar(const BsrGradArgs& a, int64_t r0, int64_t r1) {
  detail::bsr_grad_values_generic(a, r0, r1);
}

void transpose_blocks_scalar(const float* src, const int32_t* order, int64_t p0, int64_t p1, int64_t bk,
                             int64_t bn, float* dst) {
  for (int64_t p = p0; p < p1; ++p) {
    const float* s = src + int64_t(order[p]) * bk * bn;
    float* d = dst + p * bn * bk;
    for (int64_t n = 0; n < bn; ++n)
      for (int64_t k = 0; k < bk; ++k) d[n * bk + k] = s[k * bn + n];
  }
}

}  // namespace cpu
}  // namespace pysparse
