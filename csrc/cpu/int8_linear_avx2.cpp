// AVX2 path (Haswell and later, AMD Zen). Every mode sums the exact int32 products, so the
// outputs equal the scalar path's bit for bit; the mode is chosen by what A can hold
// (GemmArgs.a_min, one scan of the quantized activations per call):
// - A >= 0 (the input of a conv after a ReLU): VPMADDUBSW(a as u8, w) then VPMADDWD by ones.
//   A pair a0*w0 + a1*w1 is at most 127 * 128 * 2 = 32512 in magnitude, so the saturating
//   s16 multiply-add never saturates (that is why 8-bit u8 activations cannot take this path:
//   255 * -128 * 2 overflows, and fbgemm/torch.ao quantize activations to 7 bits for it).
// - A >= -127 (dynamic quantization: |q| <= 127): VPMADDUBSW(|w|, sign(a, w)), |w| <= 128,
//   |sign(a, w)| <= 127: the same bound. VPSIGNB costs one more uop per product vector.
// - otherwise (a static scale clamped a value to -128): s8 widened to s16 and VPMADDWD.
// Register-only loops on this development machine's Zen 3 core (tests of the instruction
// mixes, one core): VPMADDUBSW + VPMADDWD + VPADDD 98 G MAC/s, with VPSIGNB 81, VPMADDWD +
// VPADDD 82 (16 MACs an instruction instead of 32), fp32 VFMADD231PS 50.
#include <immintrin.h>

#include "int8_linear_impl.h"

namespace pysparse {
namespace cpu {

void quantize_rows_avx2(const void* x, InType t, int64_t ldx, int64_t K, int64_t Kp,
                        int64_t m0, int64_t m1, float scale_in, bool u8, int8_t* a,
                        float* scale_out) {
  detail::quantize_rows(x, t, ldx, K, Kp, m0, m1, scale_in, u8, a, scale_out);
}

int act_min_avx2(const int8_t* a, int64_t n) {
  __m256i m = _mm256_set1_epi8(127);
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) m = _mm256_min_epi8(m, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + i)));
  alignas(32) int8_t t[32];
  _mm256_store_si256(reinterpret_cast<__m256i*>(t), m);
  int r = 127;
  for (int j = 0; j < 32; ++j) r = std::min<int>(r, t[j]);
  for (; i < n; ++i) r = std::min<int>(r, a[i]);
  return r;
}

namespace {
// rows x 16 columns, MR rows at once: MR x 4 accumulators + 4 B registers + A. (s16 path)
template <int MR>
inline void micro16(const int8_t* a, int64_t lda, const int8_t* b, int64_t k0, int64_t k1,
                    int32_t* C, bool accumulate) {
  __m256i acc[MR][4];
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < 4; ++j) acc[r][j] = _mm256_setzero_si256();
  for (int64_t k = k0; k < k1; k += 4) {
    const int8_t* bk = b + k * 16;
    __m256i bw[4];
    for (int j = 0; j < 4; ++j)  // 4 columns x 4 k widened to 16 x s16
      bw[j] = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bk + 16 * j)));
    for (int r = 0; r < MR; ++r) {
      int32_t a4;
      std::memcpy(&a4, a + r * lda + k, 4);
      // (a0 a1 a2 a3) as s16, repeated: each VPMADDWD lane pair = one column's 4 products
      __m256i aw = _mm256_cvtepi8_epi16(_mm_set1_epi32(a4));
      for (int j = 0; j < 4; ++j) acc[r][j] = _mm256_add_epi32(acc[r][j], _mm256_madd_epi16(aw, bw[j]));
    }
  }
  for (int r = 0; r < MR; ++r) {
    alignas(32) int32_t t[32];
    for (int j = 0; j < 4; ++j) _mm256_store_si256(reinterpret_cast<__m256i*>(t + 8 * j), acc[r][j]);
    for (int col = 0; col < 16; ++col) {
      int32_t v = t[2 * col] + t[2 * col + 1];
      C[r * kPackN + col] = accumulate ? C[r * kPackN + col] + v : v;
    }
  }
}

// 4 rows x 16 columns with VPMADDUBSW (kSigned: the VPSIGNB form). A k group of the packed
// block is 64 bytes, columns 0-7 then 8-15, each column's 4 k adjacent: one VPMADDUBSW of a
// broadcast (a0 a1 a2 a3) against 32 of them leaves each column's two pair sums in adjacent
// s16 lanes, and VPMADDWD by ones adds them into that column's int32 lane: no reduction after
// the loop. The loop is written in assembly: GCC kept one or two of the 8 accumulators on the
// stack (a store-to-load chain each step): 70 G MAC/s against 95 in the asm form (3136 x 32 x
// 288, one core; the register-only peak of the mix is 98). Fixed registers: ymm8-9 B (|B| in
// the signed form), ymm10 the broadcast A, ymm12-13 the products; the 8 accumulators and the
// ones vector are operands (GCC picks their registers; none may be named in the text). All 4
// rows are computed (the callers' A has rows up to a multiple of 32); `rows` are stored.
#define PYSPARSE_ROW(A, T0, T1, S0, S1) \
  "vpbroadcastd " A ", %%ymm10\n\t" T0 T1 \
  "vpmaddwd %[ones], %%ymm12, %%ymm12\n\t" \
  "vpmaddwd %[ones], %%ymm13, %%ymm13\n\t" \
  "vpaddd %%ymm12, " S0 ", " S0 "\n\t" \
  "vpaddd %%ymm13, " S1 ", " S1 "\n\t"
// unsigned A: products of the broadcast A (u8) and B (s8)
#define PYSPARSE_U(A, S0, S1) \
  PYSPARSE_ROW(A, "vpmaddubsw %%ymm8, %%ymm10, %%ymm12\n\t", "vpmaddubsw %%ymm9, %%ymm10, %%ymm13\n\t", S0, S1)
// signed A: |B| (u8) times A with B's sign (s8; B read again from L1 for VPSIGNB)
#define PYSPARSE_S(A, S0, S1) \
  PYSPARSE_ROW(A, "vpsignb (%[b]), %%ymm10, %%ymm12\n\tvpmaddubsw %%ymm12, %%ymm8, %%ymm12\n\t", \
               "vpsignb 32(%[b]), %%ymm10, %%ymm13\n\tvpmaddubsw %%ymm13, %%ymm9, %%ymm13\n\t", S0, S1)
#define PYSPARSE_ROWS(M)                                       \
  M("(%[a0])", "%[c0]", "%[c1]") M("(%[a0],%[lda])", "%[c2]", "%[c3]") \
  M("(%[a0],%[lda],2)", "%[c4]", "%[c5]") M("(%[a1],%[lda],2)", "%[c6]", "%[c7]")

template <bool kSigned>
inline void micro4x16(const int8_t* a, int64_t lda, const int8_t* b, int64_t k0, int64_t k1, int64_t rows,
                      int32_t* C, bool accumulate) {
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i c0 = _mm256_setzero_si256(), c1 = c0, c2 = c0, c3 = c0, c4 = c0, c5 = c0, c6 = c0, c7 = c0;
  const int8_t* a0 = a + k0;
  const int8_t* a1 = a + lda + k0;  // rows 0 and 1; rows 2 and 3 are 2 * lda further
  const int8_t* bk = b + k0 * 16;
  int64_t steps = (k1 - k0) / 4;
// One k group a step: B's two halves into ymm8-9 (LOADB), the 4 rows (ROW), the pointers on.
#define PYSPARSE_LOOP(LOADB, ROW)                                                                   \
  asm volatile("1:\n\t" LOADB PYSPARSE_ROWS(ROW)                                                   \
               "add $4, %[a0]\n\tadd $4, %[a1]\n\tadd $64, %[b]\n\tdec %[n]\n\tjnz 1b\n\t"           \
               : [c0] "+x"(c0), [c1] "+x"(c1), [c2] "+x"(c2), [c3] "+x"(c3), [c4] "+x"(c4), [c5] "+x"(c5), \
                 [c6] "+x"(c6), [c7] "+x"(c7), [a0] "+r"(a0), [a1] "+r"(a1), [b] "+r"(bk), [n] "+r"(steps) \
               : [lda] "r"(lda), [ones] "x"(ones)                                                    \
               : "xmm8", "xmm9", "xmm10", "xmm12", "xmm13", "cc", "memory")
  if (steps > 0) {
    if (kSigned)
      PYSPARSE_LOOP("vpabsb (%[b]), %%ymm8\n\tvpabsb 32(%[b]), %%ymm9\n\t", PYSPARSE_S);
    else
      PYSPARSE_LOOP("vmovdqu (%[b]), %%ymm8\n\tvmovdqu 32(%[b]), %%ymm9\n\t", PYSPARSE_U);
  }
#undef PYSPARSE_LOOP
  const __m256i acc[8] = {c0, c1, c2, c3, c4, c5, c6, c7};
  for (int64_t r = 0; r < rows; ++r) {
    for (int h = 0; h < 2; ++h) {
      __m256i* c = reinterpret_cast<__m256i*>(C + r * kPackN + 8 * h);
      _mm256_storeu_si256(c, accumulate ? _mm256_add_epi32(_mm256_loadu_si256(c), acc[2 * r + h]) : acc[2 * r + h]);
    }
  }
}
#undef PYSPARSE_ROWS
#undef PYSPARSE_S
#undef PYSPARSE_U
#undef PYSPARSE_ROW
}  // namespace

void gemm_avx2(const GemmArgs& g, int64_t m0, int64_t m1, int64_t c0, int64_t c1,
                 int32_t* cbuf, float* fbuf) {
  const int64_t bstride = g.Kp * 16;
  // Stop at the valid K (rounded to the 4-k groups): past it A and B are zero padding
  // (a 32-channel 1x1 conv has Kp = 64, half of it padding).
  const int64_t kv = g.K > 0 ? std::min(g.Kp, round_up(g.K, 4)) : g.Kp;
  const int mode = g.a_min >= 0 ? 0 : g.a_min >= -127 ? 1 : 2;
  auto micro = [&](int64_t m, int64_t rows, int64_t c, int64_t k0, int64_t k1, int32_t* C,
                   bool accumulate) {
    const int8_t* a = g.a + m * g.Kp;
    k1 = std::min(k1, kv);
    // Only the 16-column blocks holding real columns (N = 32 pads a 64-column chunk by
    // half): the epilogue reads C up to N only.
    const int64_t nbs = (std::min(kPackN, g.N - c * kPackN) + 15) / 16;
    for (int64_t nb = 0; nb < nbs; ++nb) {
      const int8_t* b = g.b + (c * 4 + nb) * bstride;
      int32_t* Cb = C + nb * 16;
      if (mode == 0) {
        micro4x16<false>(a, g.Kp, b, k0, k1, rows, Cb, accumulate);
      } else if (mode == 1) {
        micro4x16<true>(a, g.Kp, b, k0, k1, rows, Cb, accumulate);
      } else {
        for (int64_t r = 0; r < rows; r += 2) {
          if (rows - r >= 2)
            micro16<2>(a + r * g.Kp, g.Kp, b, k0, k1, Cb + r * kPackN, accumulate);
          else
            micro16<1>(a + r * g.Kp, g.Kp, b, k0, k1, Cb + r * kPackN, accumulate);
        }
      }
    }
  };
  detail::run_tiles(g, m0, m1, c0, c1, /*u8=*/false, /*mr=*/4, cbuf, fbuf, micro);
}

}  // namespace cpu
}  // namespace pysparse
