// AVX2 block-sparse kernels. fp32: as the AVX-512 one with ymm (16 registers: 12
// accumulators). int8: s8 x s8 products widened to s16 and summed in pairs by VPMADDWD
// (exact; see the int8 section below) over the 64 x 64 blocks in the dense packed layout.
#include <immintrin.h>

#include <new>

#include "bsr_linear_impl.h"

namespace pysparse {
namespace cpu {

namespace {
// v0: the block row's first block (g.values + row_ptr[rb] * bk * bn, or a widened copy).
template <int MR, int NB>
inline void f32_rows(const BsrF32Args& g, int64_t m0, int64_t n0, int64_t rb, int64_t jb, const float* v0) {
  __m256 acc[MR][NB];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int j = 0; j < NB; ++j) acc[r][j] = _mm256_setzero_ps();
  const float* x = g.x + m0 * g.ldx;
  for (int32_t b = g.row_ptr[rb]; b < g.row_ptr[rb + 1]; ++b) {
    const int64_t k0 = int64_t(g.col_idx[b]) * g.bk, kn = std::min(g.bk, g.K - k0);
    const float* v = v0 + int64_t(b - g.row_ptr[rb]) * g.bk * g.bn + jb;
    const float* xk = x + k0;
    for (int64_t k = 0; k < kn; ++k, v += g.bn, ++xk) {
      __m256 w[NB];
#pragma GCC unroll 4
      for (int j = 0; j < NB; ++j) w[j] = _mm256_loadu_ps(v + 8 * j);
#pragma GCC unroll 8
      for (int r = 0; r < MR; ++r) {
        const __m256 xv = _mm256_broadcast_ss(xk + r * g.ldx);
#pragma GCC unroll 4
        for (int j = 0; j < NB; ++j) acc[r][j] = _mm256_fmadd_ps(xv, w[j], acc[r][j]);
      }
    }
  }
  alignas(32) float tmp[MR * 64];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int j = 0; j < NB; ++j) _mm256_store_ps(tmp + r * 64 + 8 * j, acc[r][j]);
  // this pass owns 16 of the block row's outputs: bias, ReLU, store them
  const int64_t nn = std::min<int64_t>(8 * NB, g.N - n0);
  for (int r = 0; r < MR; ++r) {
    float* o = g.out + (m0 + r) * g.ldo + n0;
    for (int64_t j = 0; j < nn; ++j) {
      float v = tmp[r * 64 + j];
      if (g.bias) v = v + g.bias[n0 + j];
      if (g.relu) v = v > 0.f ? v : (v == v ? 0.f : v);
      o[j] = v;
    }
  }
}

// bf16 blocks widened in registers: a 32-byte load holds 8 outputs x an input pair; the
// lane shifted left by 16 is the even input's fp32 weight, the lane masked the odd one's.
// 16 outputs per pass x 4 rows = 8 accumulators + 4 weights + 2 x + mask of 16 ymm.
template <int MR>
inline void bf16w_rows(const BsrBf16Args& b, int64_t m0, int64_t n0, int64_t rb, int64_t jb) {
  const BsrF32Args& g = b.f;
  __m256 acc[MR][2];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  const __m256i hi = _mm256_set1_epi32(int32_t(0xFFFF0000u));
  const uint16_t* x = b.x + m0 * b.ldxb;
  for (int32_t blk = g.row_ptr[rb]; blk < g.row_ptr[rb + 1]; ++blk) {
    const int64_t k0 = int64_t(g.col_idx[blk]) * g.bk, kn = std::min(g.bk, g.K - k0), kp = (kn + 1) / 2;
    const uint16_t* v = b.values + int64_t(blk) * g.bk * g.bn + 2 * jb;
    const uint16_t* xk = x + k0;
    for (int64_t p = 0; p < kp; ++p, v += 2 * g.bn, xk += 2) {
      // K odd: the last pair's second weight is padding (row K) and is never read
      const __m256i odd = (kn & 1) && p + 1 == kp ? _mm256_setzero_si256() : hi;
      __m256 we[2], wo[2];
      for (int j = 0; j < 2; ++j) {
        const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(v + 16 * j));
        we[j] = _mm256_castsi256_ps(_mm256_slli_epi32(raw, 16));
        wo[j] = _mm256_castsi256_ps(_mm256_and_si256(raw, odd));
      }
#pragma GCC unroll 8
      for (int r = 0; r < MR; ++r) {
        uint32_t pair;
        std::memcpy(&pair, xk + r * b.ldxb, 4);
        const __m256i xp = _mm256_set1_epi32(int32_t(pair));
        const __m256 xe = _mm256_castsi256_ps(_mm256_slli_epi32(xp, 16));
        const __m256 xo = _mm256_castsi256_ps(_mm256_and_si256(xp, hi));
        for (int j = 0; j < 2; ++j) {  // k ascending, as the fp32 kernel (see the AVX-512 unit)
          acc[r][j] = _mm256_fmadd_ps(xe, we[j], acc[r][j]);
          acc[r][j] = _mm256_fmadd_ps(xo, wo[j], acc[r][j]);
        }
      }
    }
  }
  alignas(32) float tmp[MR * 64];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < 2; ++j) _mm256_store_ps(tmp + r * 64 + 8 * j, acc[r][j]);
  // This pass owns outputs n0 .. n0 + 16: the shared epilogue sees them as a 16-wide
  // block row of a layer shifted left by jb columns.
  BsrF32Args part = g;
  part.bn = 16;
  part.N = g.N - jb;
  part.bias = g.bias ? g.bias + jb : nullptr;
  part.out = g.out + jb;
  detail::bsr_f32_store(part, m0, MR, n0 - jb, tmp, 64);
}

// Block row rb's bf16 blocks widened to fp32 k-major into this thread's scratch (as the
// AVX-512 unit: 8 outputs per 32-byte load, shift for the even input, mask for the odd).
inline const float* widen_block_row(const BsrBf16Args& b, int64_t rb) {
  float* const out = detail::widen_scratch(b, rb);
  const int64_t bn = b.f.bn, pairs = int64_t(b.f.row_ptr[rb + 1] - b.f.row_ptr[rb]) * b.f.bk / 2;
  const uint16_t* src = b.values + int64_t(b.f.row_ptr[rb]) * b.f.bk * bn;
  const __m256i hi = _mm256_set1_epi32(int32_t(0xFFFF0000u));
  float* dst = out;
  for (int64_t i = 0; i < pairs; ++i, src += 2 * bn, dst += 2 * bn)
    for (int64_t j = 0; j < bn; j += 8) {
      const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + 2 * j));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + j), _mm256_slli_epi32(raw, 16));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + bn + j), _mm256_and_si256(raw, hi));
    }
  return out;
}

void bf16w_block_row(const BsrBf16Args& b, int64_t rb) {
  for (int64_t jb = 0; jb < b.f.bn; jb += 16) {
    const int64_t n0 = rb * b.f.bn + jb;
    if (n0 >= b.f.N) break;
    int64_t m = 0;
    for (; m + 4 <= b.f.M; m += 4) bf16w_rows<4>(b, m, n0, rb, jb);
    for (; m < b.f.M; ++m) bf16w_rows<1>(b, m, n0, rb, jb);
  }
}

// 16 outputs (2 ymm) per pass x 6 rows = 12 accumulators of the 16 ymm registers.
void f32_block_row(const BsrF32Args& g, int64_t rb, const float* v0) {
  for (int64_t jb = 0; jb < g.bn; jb += 16) {
    const int64_t n0 = rb * g.bn + jb;
    if (n0 >= g.N) break;
    int64_t m = 0;
    for (; m + 6 <= g.M; m += 6) f32_rows<6, 2>(g, m, n0, rb, jb, v0);
    for (; m < g.M; ++m) f32_rows<1, 2>(g, m, n0, rb, jb, v0);
  }
}

// ---------------------------------------------------------------------------------- int8
// The int8 blocks keep the dense kernels' layout, [4 column blocks nb][16 k-groups][16
// columns][4 k]: one 64-byte row holds 16 columns x 4 k, two ymm of 8 columns each, and
// every 32-bit lane of a ymm is one column's 4 weights (w0 w1 w2 w3, low byte first).
// VPMADDWD multiplies s16 pairs and adds each pair into one int32 lane, so the 4 weights
// are split into two s16 pairs per lane: (w0, w2) = (lane << 8) >> 8 and (w1, w3) =
// lane >> 8, arithmetic 16-bit shifts (3 ALU ops per 8 columns x 4 k). The activations
// arrive as the same pairs, (a0, a2) and (a1, a3) broadcast to every lane, so
// madd(w02, a02) + madd(w13, a13) is each column's full 4-k dot product in its own lane:
// no horizontal sums, one accumulator per 8 columns. Exact: |a * w| <= 128 * 128, a pair
// sums to at most 2^15 in an int32 lane; the int32 sums are the scalar kernel's (integer
// addition in any order). VPMADDUBSW (u8 x s8) would take 16-bit pair sums that saturate
// (255 * -128 * 2 < -2^15), as the dense AVX2 kernel notes, so it is not used; the
// activations stay s8 (no +128 shift, no colsum compensation), as the scalar and AMX paths.

// The activations of one row pass as those s16 pairs, once per k-block the thread's blocks
// use (expanded on first use, so a thread whose blocks touch few block columns widens only
// those): for pass row r and k-block c, 32 int32 at (c * rows + r) * 32, [0, 16) the k-groups'
// (a0, a2), [16, 32) their (a1, a3). Widening a broadcast inside the micro-kernel instead
// costs 3 ALU ops per row per k-group against its 8 (4 VPMADDWD + 4 adds), for every block
// row and column block; here 6 shifts per row per 16 k-groups, once per pass, and each pair
// is one VPBROADCASTD load.
constexpr int64_t kI8PairInts = 2 * kBsrI8Block / 4;  // int32 per row per k-block

// A thread's scratch with internal linkage: a std::vector<int32_t> compiled here would be
// emitted with -mavx2 code under a name the linker may share with other units (see
// int8_linear_impl.h), and run on CPUs without AVX2.
struct I8Scratch {
  void* p = nullptr;
  size_t bytes = 0;
  I8Scratch() = default;
  I8Scratch(const I8Scratch&) = delete;
  I8Scratch& operator=(const I8Scratch&) = delete;
  ~I8Scratch() { ::operator delete(p, std::align_val_t(64)); }
  void* get(size_t want) {
    if (want > bytes) {
      ::operator delete(p, std::align_val_t(64));
      p = nullptr;  // (if the new throws, nothing dangles)
      p = ::operator new(want, std::align_val_t(64));
      bytes = want;
    }
    return p;
  }
};

// 64 s8 activations (one row of one k-block) -> 32 int32 of s16 pairs, the layout above.
inline void widen_pairs(const int8_t* a, int32_t* d) {
  for (int h = 0; h < 2; ++h) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + 32 * h));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(d + 8 * h), _mm256_srai_epi16(_mm256_slli_epi16(v, 8), 8));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(d + 16 + 8 * h), _mm256_srai_epi16(v, 8));
  }
}

// Blocks per L1 pass: the micro-kernel reads one column block (1 KB) of each; 8 blocks'
// 8 KB of weights plus the MR rows' 4 KB of pairs stay in L1 (32 KB here) while every row
// step of the pass streams over them, and the C scratch is read and written once per 8.
constexpr int32_t kI8BlocksPerPass = 8;
// Rows per pass: the C scratch of 256 x 64 int32 (64 KB), as the VNNI kernel's.
constexpr int64_t kI8RowsPerPass = kBsrI8RowsPerPass;
static_assert(kI8RowsPerPass * kPackN <= kBsrI8Scratch, "one pass of C must fit the caller's scratch");

// MR rows x 16 columns (column block nb) over blocks [blk0, blk1). Registers: MR x 2
// accumulators + 4 widened weights (2 ymm x 2 pairs) + the 2 broadcast pairs + 2 products
// = 16 ymm at MR = 4. 8 columns per pass (2 weights) would fit 6 rows but load each row's
// pairs for half the VPMADDWDs; 32 columns leave room for 1 row.
template <int MR>
inline void i8_rows(const BsrI8Args& b, const int32_t* pairs, int64_t rows, int64_t m, int64_t nb, int32_t blk0,
                    int32_t blk1, int32_t* C, bool accumulate) {
  __m256i acc[MR][2];
#pragma GCC unroll 4
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < 2; ++j)
      acc[r][j] = accumulate ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(C + r * kPackN + 8 * j))
                             : _mm256_setzero_si256();
  for (int32_t blk = blk0; blk < blk1; ++blk) {
    const int8_t* v = b.values + int64_t(blk) * kBsrI8Block * kBsrI8Block + nb * 16 * kBsrI8Block;
    const int32_t* ak = pairs + (int64_t(b.col_idx[blk]) * rows + m) * kI8PairInts;
#pragma GCC unroll 2
    for (int kg = 0; kg < 16; ++kg, v += 64) {
      __m256i w02[2], w13[2];
      for (int j = 0; j < 2; ++j) {
        const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(v + 32 * j));
        w02[j] = _mm256_srai_epi16(_mm256_slli_epi16(raw, 8), 8);
        w13[j] = _mm256_srai_epi16(raw, 8);
      }
#pragma GCC unroll 4
      for (int r = 0; r < MR; ++r) {
        const __m256i a02 = _mm256_set1_epi32(ak[r * kI8PairInts + kg]);
        const __m256i a13 = _mm256_set1_epi32(ak[r * kI8PairInts + 16 + kg]);
        for (int j = 0; j < 2; ++j)
          acc[r][j] = _mm256_add_epi32(
              acc[r][j], _mm256_add_epi32(_mm256_madd_epi16(w02[j], a02), _mm256_madd_epi16(w13[j], a13)));
      }
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < 2; ++j) _mm256_storeu_si256(reinterpret_cast<__m256i*>(C + r * kPackN + 8 * j), acc[r][j]);
}
}  // namespace

void bsr_bf16_avx2(const BsrBf16Args& b, int64_t r0, int64_t r1) {
  for (int64_t rb = r0; rb < r1; ++rb) {
    if (b.f.x) f32_block_row(b.f, rb, widen_block_row(b, rb));
    else bf16w_block_row(b, rb);
  }
}

void bsr_f32_avx2(const BsrF32Args& g, int64_t r0, int64_t r1) {
  for (int64_t rb = r0; rb < r1; ++rb) f32_block_row(g, rb, g.values + int64_t(g.row_ptr[rb]) * g.bk * g.bn);
}

void bsr_grad_values_avx2(const BsrGradArgs& a, int64_t r0, int64_t r1) {
  detail::bsr_grad_values_generic(a, r0, r1);
}


// The rows run in passes of kI8RowsPerPass, outermost, so each pass's activations are widened
// once for all of the thread's block rows; per block row, the stored blocks in groups of
// kI8BlocksPerPass, each column block of 16 outputs in steps of 4 rows (the tail as one step
// of its own height), then the shared epilogue (bsr_i8_store, s8: no shift to undo), as the
// scalar kernel, so every output dtype rounds the same.
void bsr_i8_avx2(const BsrI8Args& b, int64_t r0, int64_t r1, int32_t* C, float*) {
  const GemmArgs& g = b.g;
  const int64_t KB = g.Kp / kBsrI8Block;
  thread_local I8Scratch pair_buf, done_buf;
  for (int64_t mc = 0; mc < g.M; mc += kI8RowsPerPass) {
    const int64_t rows = std::min(kI8RowsPerPass, g.M - mc);
    int32_t* pairs = static_cast<int32_t*>(pair_buf.get(sizeof(int32_t) * size_t(KB * rows * kI8PairInts)));
    uint8_t* done = static_cast<uint8_t*>(done_buf.get(size_t(KB)));
    std::memset(done, 0, size_t(KB));
    for (int64_t rb = r0; rb < r1; ++rb) {
      const int32_t b0 = b.row_ptr[rb], b1 = b.row_ptr[rb + 1];
      if (b0 == b1)  // no stored block: the output is the bias
        std::memset(C, 0, sizeof(int32_t) * rows * kPackN);
      // column blocks holding a real output (the last block row of an N not a multiple of
      // 64 skips its padding's); the epilogue never stores the others
      const int64_t nbs = (std::min(kPackN, g.N - rb * kPackN) + 15) / 16;
      for (int32_t bb = b0; bb < b1; bb += kI8BlocksPerPass) {
        const int32_t be = std::min(b1, bb + kI8BlocksPerPass);
        for (int32_t blk = bb; blk < be; ++blk) {
          const int64_t c = b.col_idx[blk];
          if (done[c]) continue;
          done[c] = 1;
          for (int64_t r = 0; r < rows; ++r)
            widen_pairs(g.a + (mc + r) * g.Kp + c * kBsrI8Block, pairs + (c * rows + r) * kI8PairInts);
        }
        for (int64_t nb = 0; nb < nbs; ++nb)
          detail::for_steps<4>(0, rows, [&](auto mr, int64_t m) {
            i8_rows<mr.value>(b, pairs, rows, m, nb, bb, be, C + m * kPackN + nb * 16, bb != b0);
          });
      }
      detail::bsr_i8_store(b, mc, rows, rb, C, /*u8=*/false);
    }
  }
}

}  // namespace cpu
}  // namespace pysparse
