// AVX-512 block-sparse kernels. fp32: MR rows x bn outputs of accumulators stay in zmm
// registers across every nonzero block of a block row (no C traffic per block); per k,
// bn/16 loads of the block's values feed MR * bn/16 FMAs. int8: the VPDPBUSD loop of the
// dense kernel over 64 x 64 blocks stored in the dense packed layout.
#include "bsr_linear_zmm.h"

namespace pysparse {
namespace cpu {

namespace {

// v0: the block row's first block (g.values + row_ptr[rb] * bk * bn, or a widened copy).
template <int MR, int NB>
inline void f32_rows(const BsrF32Args& g, int64_t m0, int64_t rb, const float* v0) {
  __m512 acc[MR][NB];
  zmm::zero(acc);
  const float* x = g.x + m0 * g.ldx;
  for (int32_t b = g.row_ptr[rb]; b < g.row_ptr[rb + 1]; ++b) {
    const int64_t k0 = int64_t(g.col_idx[b]) * g.bk, kn = std::min(g.bk, g.K - k0);
    const float* v = v0 + int64_t(b - g.row_ptr[rb]) * g.bk * g.bn;
    const float* xk = x + k0;
    for (int64_t k = 0; k < kn; ++k, v += g.bn, ++xk) {
      __m512 w[NB];
#pragma GCC unroll 4
      for (int j = 0; j < NB; ++j) w[j] = _mm512_loadu_ps(v + 16 * j);
#pragma GCC unroll 16
      for (int r = 0; r < MR; ++r) {
        const __m512 xv = _mm512_set1_ps(xk[r * g.ldx]);
#pragma GCC unroll 4
        for (int j = 0; j < NB; ++j) acc[r][j] = _mm512_fmadd_ps(xv, w[j], acc[r][j]);
      }
    }
  }
  zmm::store_rows(g, m0, rb, acc);
}

template <int NB, int MR>
void f32_block_row(const BsrF32Args& g, int64_t rb, const float* v0, int64_t m = 0) {
  detail::for_steps<MR>(m, g.M, [&](auto rows, int64_t m0) { f32_rows<rows.value, NB>(g, m0, rb, v0); });
}

// 24 accumulators of the 32 zmm: 6 rows x 4 (bn 64), 12 x 2 (bn 32), 12 x 1 (bn 16).
inline void f32_any_block_row(const BsrF32Args& g, int64_t rb, const float* v0, int64_t m = 0) {
  if (g.bn == 64) f32_block_row<4, 6>(g, rb, v0, m);
  else if (g.bn == 32) f32_block_row<2, 12>(g, rb, v0, m);
  else f32_block_row<1, 12>(g, rb, v0, m);
}
// bf16 blocks widened to fp32 in registers (AVX-512 CPUs without AVX512-BF16): one 64-byte
// load holds 16 outputs x a pair of inputs; shifting each 32-bit lane left by 16 gives the
// even input's fp32 weights, masking off the low half the odd one's. Same for the x pair.
// Registers: MR x NB accumulators + 2 x NB weights + 2 x + 1 mask <= 32 (4 x 4 at bn 64).
// STORE: also write the widened weights, fp32 k-major, to `wide` (the block row's scratch)
// for the fp32 kernel to reuse on the remaining rows.
template <int MR, int NB, bool STORE = false>
inline void bf16w_rows(const BsrBf16Args& b, int64_t m0, int64_t rb, float* wide = nullptr) {
  const BsrF32Args& g = b.f;
  __m512 acc[MR][NB];
  zmm::zero(acc);
  const __m512i hi = _mm512_set1_epi32(int32_t(0xFFFF0000u));
  const uint16_t* x = b.x + m0 * b.ldxb;
  for (int32_t blk = g.row_ptr[rb]; blk < g.row_ptr[rb + 1]; ++blk) {
    const int64_t k0 = int64_t(g.col_idx[blk]) * g.bk, kn = std::min(g.bk, g.K - k0), kp = (kn + 1) / 2;
    const uint16_t* v = b.values + int64_t(blk) * g.bk * g.bn;
    const uint16_t* xk = x + k0;
    float* wd = STORE ? wide + int64_t(blk - g.row_ptr[rb]) * g.bk * g.bn : nullptr;
    for (int64_t p = 0; p < kp; ++p, v += 2 * g.bn, xk += 2) {
      // K odd: the last pair's second weight is padding (row K) and is never read
      const __m512i odd = (kn & 1) && p + 1 == kp ? _mm512_setzero_si512() : hi;
      __m512 we[NB], wo[NB];
#pragma GCC unroll 4
      for (int j = 0; j < NB; ++j) {
        const __m512i raw = _mm512_loadu_si512(v + 32 * j);
        we[j] = _mm512_castsi512_ps(_mm512_slli_epi32(raw, 16));
        wo[j] = _mm512_castsi512_ps(_mm512_and_si512(raw, odd));
        if constexpr (STORE) {
          _mm512_storeu_ps(wd + 2 * p * g.bn + 16 * j, we[j]);
          _mm512_storeu_ps(wd + (2 * p + 1) * g.bn + 16 * j, wo[j]);
        }
      }
#pragma GCC unroll 16
      for (int r = 0; r < MR; ++r) {
        uint32_t pair;
        std::memcpy(&pair, xk + r * b.ldxb, 4);
        const __m512i xp = _mm512_set1_epi32(int32_t(pair));
        const __m512 xe = _mm512_castsi512_ps(_mm512_slli_epi32(xp, 16));
        const __m512 xo = _mm512_castsi512_ps(_mm512_and_si512(xp, hi));
        // k ascending, as the fp32 kernel the widen-once path runs the other rows with: a
        // row's result does not depend on the batch it came in
#pragma GCC unroll 4
        for (int j = 0; j < NB; ++j) {
          acc[r][j] = _mm512_fmadd_ps(xe, we[j], acc[r][j]);
          acc[r][j] = _mm512_fmadd_ps(xo, wo[j], acc[r][j]);
        }
      }
    }
  }
  zmm::store_rows(g, m0, rb, acc);
}

// From kBf16WidenOnceRows rows on, the first MR rows widen in registers and store the fp32
// weights; the rest run the fp32 kernel on them (one pass over memory, overlapped with
// that first row group's FMAs: a separate widening pass first cost 0.18 ms at M = 8,
// density 0.1, where the whole op takes 0.23 ms in fp32).
template <int NB, int MR>
void bf16w_block_row(const BsrBf16Args& b, int64_t rb) {
  if (b.f.x && b.f.M > MR) {
    float* wide = detail::widen_scratch(b, rb);
    bf16w_rows<MR, NB, true>(b, 0, rb, wide);
    f32_any_block_row(b.f, rb, wide, MR);
    return;
  }
  detail::for_steps<MR>(0, b.f.M, [&](auto rows, int64_t m0) { bf16w_rows<rows.value, NB>(b, m0, rb); });
}

// Gradient of the stored blocks: KR rows of one block's k x NB zmm of its outputs stay in
// registers while m runs over the whole batch; per m, NB loads of the output gradient's row
// slice (zero padded past the layer's last column) and KR broadcasts of x feed KR x NB FMAs, the
// forward kernel's shape with the roles of x and the weights swapped.
template <int KR, int NB>
inline void grad_rows(int64_t M, const float* x, int64_t ldx, const float* g, int64_t bn, float* ob) {
  __m512 acc[KR][NB];
  zmm::zero(acc);
  for (int64_t m = 0; m < M; ++m, x += ldx, g += bn) {
    __m512 gv[NB];
#pragma GCC unroll 4
    for (int j = 0; j < NB; ++j) gv[j] = _mm512_load_ps(g + 16 * j);
#pragma GCC unroll 16
    for (int r = 0; r < KR; ++r) {
      const __m512 xv = _mm512_set1_ps(x[r]);
#pragma GCC unroll 4
      for (int j = 0; j < NB; ++j) acc[r][j] = _mm512_fmadd_ps(xv, gv[j], acc[r][j]);
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < KR; ++r)
#pragma GCC unroll 4
    for (int j = 0; j < NB; ++j) _mm512_storeu_ps(ob + r * bn + 16 * j, acc[r][j]);
}

// dst[0, n) = src[0, n), dst[n, width) = 0; width a multiple of 16, dst 64-byte aligned. Inline
// masked moves: a memcpy call per 128-byte row cost 10% of the block gradient at density 0.5.
inline void copy_row(float* dst, const float* src, int64_t n, int64_t width) {
  for (int64_t j = 0; j < width; j += 16) {
    const int64_t v = std::clamp<int64_t>(n - j, 0, 16);
    const __mmask16 mk = __mmask16((uint32_t(1) << v) - 1);
    _mm512_store_ps(dst + j, _mm512_maskz_loadu_ps(mk, src + j));
  }
}

// The block row's output-gradient columns and each block's x columns are first copied into
// contiguous, zero-padded scratch ([M][bn], [M][bk]): read in place, every m stepped to a new
// 16 KB-strided row (a new page) of both, and the kernel ran at 60% of the forward's speed at
// M = 512, density 0.1.
template <int NB, int KR>
void grad_block_row(const BsrGradArgs& a, int64_t rb) {
  thread_local std::vector<float> gbuf, xbuf;
  const int64_t n0 = rb * a.bn, nn = std::min(a.bn, a.N - n0), bkp = (a.bk + 15) / 16 * 16;
  float* gs = detail::aligned_scratch(gbuf, size_t(a.M * a.bn));
  for (int64_t m = 0; m < a.M; ++m)  // zero past nn: padding outputs get gradient 0
    copy_row(gs + m * a.bn, a.g + m * a.ldg + n0, nn, a.bn);
  float* xs = detail::aligned_scratch(xbuf, size_t(a.M * bkp));
  for (int32_t b = a.row_ptr[rb]; b < a.row_ptr[rb + 1]; ++b) {
    const int64_t k0 = int64_t(a.col_idx[b]) * a.bk, kn = std::min(a.bk, a.K - k0);
    float* ob = a.out + int64_t(b) * a.bk * a.bn;
    if (kn < a.bk) std::fill(ob + kn * a.bn, ob + a.bk * a.bn, 0.f);  // padding inputs
    for (int64_t m = 0; m < a.M; ++m) copy_row(xs + m * bkp, a.x + m * a.ldx + k0, kn, bkp);
    detail::for_steps<KR>(0, kn, [&](auto rows, int64_t k) {
      grad_rows<rows.value, NB>(a.M, xs + k, bkp, gs, a.bn, ob + k * a.bn);
    });
  }
}

// Blocks per L1 pass: 8 int8 blocks are 32 KB, which stay in L1 while every row of the
// task streams over them (the dense kernel's K blocking). Without it each 6-row step
// re-read the block row from L2: 6.5x of the ideal 10x at density 0.1, M = 128.
constexpr int32_t kBlocksPerPass = 8;
// Rows per pass: the C scratch of 256 x 64 int32 (64 KB) stays in L2 (bsr_linear.h).
constexpr int64_t kRowsPerPass = kBsrI8RowsPerPass;
static_assert(kRowsPerPass * kPackN <= kBsrI8Scratch, "one pass of C must fit the caller's scratch");

template <int MR>
inline void i8_rows(const BsrI8Args& b, int64_t m0, int32_t blk0, int32_t blk1, int32_t* C, bool accumulate) {
  const GemmArgs& g = b.g;
  __m512i acc[MR][4];
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j)
      acc[r][j] = accumulate ? _mm512_loadu_si512(C + r * kPackN + 16 * j) : _mm512_setzero_si512();
  const int8_t* a = g.a + m0 * g.Kp;
  for (int32_t blk = blk0; blk < blk1; ++blk) {
    const int8_t* v = b.values + int64_t(blk) * kBsrI8Block * kBsrI8Block;
    const int8_t* ak = a + int64_t(b.col_idx[blk]) * kBsrI8Block;
#pragma GCC unroll 2
    for (int kg = 0; kg < 16; ++kg, v += 64, ak += 4) {
      __m512i w[4];
#pragma GCC unroll 4
      for (int j = 0; j < 4; ++j) w[j] = _mm512_loadu_si512(v + j * 1024);
#pragma GCC unroll 16
      for (int r = 0; r < MR; ++r) {
        const __m512i av = _mm512_set1_epi32(*reinterpret_cast<const int32_t*>(ak + r * g.Kp));
#pragma GCC unroll 4
        for (int j = 0; j < 4; ++j) acc[r][j] = _mm512_dpbusd_epi32(acc[r][j], av, w[j]);
      }
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) _mm512_storeu_si512(C + r * kPackN + 16 * j, acc[r][j]);
}

inline void i8_rows_any(const BsrI8Args& b, int64_t m, int64_t rows, int32_t blk0, int32_t blk1, int32_t* C,
                        bool accumulate) {
  switch (rows) {
    case 6: i8_rows<6>(b, m, blk0, blk1, C, accumulate); break;
    case 5: i8_rows<5>(b, m, blk0, blk1, C, accumulate); break;
    case 4: i8_rows<4>(b, m, blk0, blk1, C, accumulate); break;
    case 3: i8_rows<3>(b, m, blk0, blk1, C, accumulate); break;
    case 2: i8_rows<2>(b, m, blk0, blk1, C, accumulate); break;
    default: i8_rows<1>(b, m, blk0, blk1, C, accumulate);
  }
}
}  // namespace

void bsr_i8_avx512(const BsrI8Args& b, int64_t r0, int64_t r1, int32_t* C, float*) {
  for (int64_t rb = r0; rb < r1; ++rb) {
    const int32_t b0 = b.row_ptr[rb], b1 = b.row_ptr[rb + 1];
    for (int64_t mc = 0; mc < b.g.M; mc += kRowsPerPass) {
      const int64_t rows = std::min(kRowsPerPass, b.g.M - mc);
      if (b0 == b1)  // no stored block: the output is the bias
        std::memset(C, 0, sizeof(int32_t) * rows * kPackN);
      for (int32_t bb = b0; bb < b1; bb += kBlocksPerPass) {
        const int32_t be = std::min(b1, bb + kBlocksPerPass);
        for (int64_t m = 0; m < rows; m += 6)
          i8_rows_any(b, mc + m, std::min<int64_t>(6, rows - m), bb, be, C + m * kPackN, bb != b0);
      }
      detail::bsr_i8_store(b, mc, rows, rb, C, /*u8=*/true);
    }
  }
}

void bsr_bf16_avx512(const BsrBf16Args& b, int64_t r0, int64_t r1) {
  for (int64_t rb = r0; rb < r1; ++rb) {
    if (b.f.bn == 64) bf16w_block_row<4, 4>(b, rb);
    else if (b.f.bn == 32) bf16w_block_row<2, 8>(b, rb);
    else bf16w_block_row<1, 12>(b, rb);
  }
}

// 16 k of one output per gather (stride bn): the scalar loop moved one float per cycle and
// cost a fifth of the input gradient at density 0.5.
void transpose_blocks_avx512(const float* src, const int32_t* order, int64_t p0, int64_t p1, int64_t bk,
                             int64_t bn, float* dst) {
  const __m512i idx = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                         _mm512_set1_epi32(int32_t(bn)));
  for (int64_t p = p0; p < p1; ++p) {
    const float* s = src + int64_t(order[p]) * bk * bn;
    float* d = dst + p * bn * bk;
    for (int64_t n = 0; n < bn; ++n)
      for (int64_t k = 0; k < bk; k += 16)
        _mm512_storeu_ps(d + n * bk + k, _mm512_i32gather_ps(idx, s + k * bn + n, 4));
  }
}

void bsr_grad_values_avx512(const BsrGradArgs& a, int64_t r0, int64_t r1) {
  for (int64_t rb = r0; rb < r1; ++rb) {
    if (a.bn == 64) grad_block_row<4, 6>(a, rb);
    else if (a.bn == 32) grad_block_row<2, 12>(a, rb);
    else grad_block_row<1, 12>(a, rb);
  }
}

// Rows per pass over this thread's block rows, when its stored blocks are small. Each block
// row reads its blocks' columns of every row of x: with all of a large M at once, that x
// (M = 512: 8 MB) streams from L3 once per block row; in passes of 64 rows it stays in L2
// and the (small) blocks are re-read instead. Measured at K = N = 4096, M = 512: density
// 0.05 4.08 -> 3.75 ms, 0.1 7.0 -> 6.4 ms (rows 32/48/96/128/256: no better), 0.25 even,
// 0.5 28.4 -> 29.6 ms (33 MB of blocks re-read per pass) — hence the size limit.
constexpr int64_t kF32RowsPerPass = 64;
constexpr int64_t kF32PassMaxBytes = 4 << 20;  // per thread

void bsr_f32_avx512(const BsrF32Args& g, int64_t r0, int64_t r1) {
  const int64_t bytes = int64_t(g.row_ptr[r1] - g.row_ptr[r0]) * g.bk * g.bn * 4;
  const int64_t rows_per_pass = bytes <= kF32PassMaxBytes ? kF32RowsPerPass : std::max<int64_t>(g.M, 1);
  for (int64_t mc = 0; mc < g.M; mc += rows_per_pass) {
    BsrF32Args c = g;
    c.x = g.x + mc * g.ldx;
    c.out = g.out + mc * g.ldo;
    c.M = std::min(rows_per_pass, g.M - mc);
    for (int64_t rb = r0; rb < r1; ++rb) f32_any_block_row(c, rb, g.values + int64_t(g.row_ptr[rb]) * g.bk * g.bn);
  }
}

}  // namespace cpu
}  // namespace pysparse
