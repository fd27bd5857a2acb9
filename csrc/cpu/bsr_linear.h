// Raw-pointer block-sparse (BSR) linear kernels: y = x @ W^T (+ bias, ReLU) where W [N, K]
// is stored as blocks of bn output channels x bk input channels, only the nonzero ones.
// No ATen here (see int8_linear.h for why the ISA units stay free of torch headers).
#pragma once
#include <cstdint>

#include "int8_linear.h"

namespace pysparse {
namespace cpu {

// fp32 BSR: block row r (outputs r*bn .. r*bn+bn) owns blocks row_ptr[r] .. row_ptr[r+1];
// block j covers inputs col_idx[j]*bk .. +bk and stores values[j][k][n] (k-major, so one
// k gives bn contiguous outputs: one to four zmm loads).
struct BsrF32Args {
  const float* x;  // [M][ldx], K valid columns
  int64_t M, N, K, ldx;
  int64_t bn, bk;  // bn in {16, 32, 64}
  const int32_t* row_ptr;
  const int32_t* col_idx;
  const float* values;  // [nnzb][bk][bn]
  const float* bias;    // [N] or nullptr
  bool relu;
  float* out;  // [M][ldo]
  int64_t ldo;
};
// Block rows [r0, r1), all M rows. Single-threaded.
void bsr_f32_scalar(const BsrF32Args& g, int64_t r0, int64_t r1);
#if PYSPARSE_X86
void bsr_f32_avx2(const BsrF32Args& g, int64_t r0, int64_t r1);
void bsr_f32_avx512(const BsrF32Args& g, int64_t r0, int64_t r1);
#endif

// bf16 BSR: values [nnzb][bk/2][bn][2] bf16 (bk even): for each pair of inputs k, k+1 the
// bn outputs' two weights sit side by side, the operand order of VDPBF16PS (one 32-bit lane
// = one output's pair) and of an AMX bf16 B tile row. x comes as bf16 too ([M][ldx], ldx
// even, column K zero when K is odd), so products are exact in fp32 and only the sums
// round. The accumulators, bias, ReLU and output are fp32 (f.values is unused).
struct BsrBf16Args {
  BsrF32Args f;            // f.x: x as fp32 (the bf16 values widened) or nullptr, see below
  const uint16_t* x;       // bf16 [M][ldxb] (any ldxb: pairs are read with memcpy)
  int64_t ldxb;
  const uint16_t* values;  // bf16 [nnzb][bk/2][bn][2]
};
// From this many rows on, the widening paths run most rows with the fp32 kernel on weights
// widened once per block row (f.x must then be set; the AVX-512 unit widens in the first
// row group's registers, so it starts past one row group, 4 to 12 rows; the AVX2 unit
// widens in a separate pass): widening in registers costs 2 ALU ops per 16 weights per
// row group on the FMA ports (1.3x slower than fp32 at M = 128, density 0.1), once per
// block row it is noise. Below it the bf16 blocks stream from memory at half the fp32
// bytes (M = 1: 2x faster than fp32).
constexpr int64_t kBf16WidenOnceRows = 8;
void bsr_bf16_scalar(const BsrBf16Args& g, int64_t r0, int64_t r1);
#if PYSPARSE_X86
void bsr_bf16_avx2(const BsrBf16Args& g, int64_t r0, int64_t r1);
void bsr_bf16_avx512(const BsrBf16Args& g, int64_t r0, int64_t r1);      // widens bf16 to fp32
void bsr_bf16_avx512bf16(const BsrBf16Args& g, int64_t r0, int64_t r1);  // VDPBF16PS
// AMX-BF16 (TDPBF16PS), bk 32 or 64: x row-major, padded with zero rows to a multiple of 32
// and zero columns to whole blocks (ldxb >= KB * bk); C: [32][64] fp32 scratch. It multiplies
// whole blocks, so the blocks' padding (k >= K) must be zero, as pack_bsr_bf16 makes it.
void bsr_bf16_amx(const BsrBf16Args& g, int64_t r0, int64_t r1, float* C);
#endif
// bsr_bf16_amx's C scratch, in floats: 32 rows (two 16-row tiles) x 64 columns.
constexpr int64_t kBsrBf16AmxScratch = 32 * kPackN;
// VDPBF16PS's MAC rate over fp32 FMA's on this core, measured in registers (about 1 ms;
// call only where AVX512-BF16 exists). It differs by CPU: 0.5 on the development machine
// (one VDPBF16PS per 2 cycles, 2 FMAs per cycle), so the choice is measured, not assumed.
#if PYSPARSE_X86
double bf16_dot_speedup();
#endif

// Gradient of the stored fp32 blocks (training with a fixed pattern): for block j of block
// row r, out[j][k][n] = sum_m x[m][k0 + k] * g[m][r*bn + n], k-major like the values;
// rows k >= K and columns n >= N (the blocks' padding) get 0.
struct BsrGradArgs {
  const float* x;  // [M][ldx]
  const float* g;  // [M][ldg], the output gradient
  int64_t M, N, K, ldx, ldg;
  int64_t bn, bk;  // bn in {16, 32, 64}
  const int32_t* row_ptr;
  const int32_t* col_idx;
  float* out;  // [nnzb][bk][bn]
};
// Block rows [r0, r1). Single-threaded.
void bsr_grad_values_scalar(const BsrGradArgs& a, int64_t r0, int64_t r1);
#if PYSPARSE_X86
void bsr_grad_values_avx2(const BsrGradArgs& a, int64_t r0, int64_t r1);
void bsr_grad_values_avx512(const BsrGradArgs& a, int64_t r0, int64_t r1);
#endif

// Transpose blocks [bk][bn] -> [bn][bk] (fp32): dst block p = src block order[p], for p in
// [p0, p1). bk in {16, 32, 64} (W^T's kernel widths, for the input gradient).
void transpose_blocks_scalar(const float* src, const int32_t* order, int64_t p0, int64_t p1, int64_t bk,
                             int64_t bn, float* dst);
#if PYSPARSE_X86
void transpose_blocks_avx512(const float* src, const int32_t* order, int64_t p0, int64_t p1, int64_t bk,
                             int64_t bn, float* dst);
#endif

// int8 BSR: blocks of 64 outputs x 64 inputs, each stored in the dense int8 kernels'
// layout ([4 column blocks][16 k-groups][16 columns][4 k] = 4096 bytes), so the same
// VPDPBUSD inner loop runs over a block. Activations come quantized (GemmArgs.a, padded
// to Kp = round_up(K, 64)); colsum is the column sum over the stored blocks only.
constexpr int64_t kBsrI8Block = 64;
struct BsrI8Args {
  GemmArgs g;  // a, M, Mp, N, Np, Kp, colsum [1][Np], a_scale, w_scale [1][Np], bias, out
  const int32_t* row_ptr;
  const int32_t* col_idx;
  const int8_t* values;  // [nnzb][4096]
  bool relu;
};
// Rows of x per pass of the VNNI kernel: its C scratch of 256 x 64 int32 (64 KB) stays in L2.
constexpr int64_t kBsrI8RowsPerPass = 256;
// The C scratch (int32) every int8 block-sparse kernel is handed: the VNNI kernel's pass
// (kBsrI8RowsPerPass x 64), which also holds the AMX kernel's 32 x 64 and the scalar
// kernel's one row; each kernel's unit static_asserts its own need against it.
constexpr int64_t kBsrI8Scratch = kBsrI8RowsPerPass * kPackN;
static_assert(kBsrI8Scratch >= 32 * kPackN, "bsr_i8_amx stores two 16-row tiles of 64 columns");
void bsr_i8_scalar(const BsrI8Args& g, int64_t r0, int64_t r1, int32_t* cbuf, float* fbuf);
#if PYSPARSE_X86
void bsr_i8_avx2(const BsrI8Args& g, int64_t r0, int64_t r1, int32_t* cbuf, float* fbuf);  // s8, VPMADDWD
void bsr_i8_avx512(const BsrI8Args& g, int64_t r0, int64_t r1, int32_t* cbuf, float* fbuf);
#endif
// AMX: activations s8 (no +128 shift), a padded to round_up(M, 32) zero rows; cbuf >= 32 x 64.
// cbuf holds kBsrI8Scratch int32 for every kernel.
#if PYSPARSE_X86
void bsr_i8_amx(const BsrI8Args& g, int64_t r0, int64_t r1, int32_t* cbuf, float* fbuf);
#endif

}  // namespace cpu
}  // namespace pysparse
