// Raw-pointer kernels of pysparse::compact_conv2d: a convolution that reads only the kept
// input channels (by index) of an NHWC activation and writes only the kept output channels
// (by index) of a full-width NHWC output. No ATen here (as int8_linear.h: the ISA units are
// compiled with their own -m flags and must not pull in torch headers).
//
// Implicit GEMM: rows = output pixels (n, oh, ow), columns = kept output channels, K runs
// over (kh, kw, kept cin) in that order. The gather is fused into the micro-kernel's A
// operand: each broadcast reads x[pixel row + tap][coff[c]] straight from the activation
// (one extra scalar load per k, shared by all rows of the tile), so there is no gather
// pass and no packed copy of A. The scatter is fused into the epilogue: a chunk's tiles
// write their kept columns to a small scratch, and each full-width output row is then
// written once, from it (AVX2: 8 channels per permute + mask, see conv_expand_tables).
#pragma once
#include <cstdint>
#include <limits>

#include "isa.h"

namespace pysparse {
namespace cpu {

// Packed weight layout (pysparse.ops_conv.pack_compact_conv2d_weight), shared by every path:
//   w[P][KH][KW][Cin][16] float32, P = ceil(Cout / 16), columns >= Cout are zero.
// One k row of a panel is 16 floats = 64 bytes: one zmm, or two ymm.
constexpr int64_t kConvPanel = 16;
// Pixel chunks handed to the kernels start at multiples of this (the row tiles: scalar 4,
// AVX2 3 or 6, AVX-512 12).
constexpr int64_t kConvRowAlign = 12;
constexpr int64_t kConvMaxChunk = 96;  // largest chunk (pixels) the kernels accept

struct CompactConvArgs {
  const float* x;  // input [N][H][W][.] with channel stride 1
  int64_t N, H, W;
  int64_t sN, sH, sW;    // element strides of x
  const int64_t* coff;   // [Cin] kept input channels (in_idx), offsets into a pixel's channels
  const int64_t* koff;   // [KH*KW*Cin] or nullptr: (kh*dh*sH + kw*dw*sW) + coff[c], k = (kh*KW + kw)*Cin + c
  int64_t Cin;           // kept input channels
  int64_t KH, KW, sh, sw, ph, pw, dh, dw;
  int64_t Ho, Wo;
  const float* w;        // packed weight, layout above
  int64_t Cout;          // kept output channels
  const float* bias;     // [P * 16] (zero past Cout) or nullptr
  const int64_t* oidx;   // [Cout] output channel of each kept output (distinct, < ldo)
  const float* residual; // [N*Ho*Wo][ldo] or nullptr: out = residual + conv
  float* out;            // [N*Ho*Wo][ldo]: every element is written
  int64_t ldo;           // out_channels (full width)
  bool relu;             // ReLU on every output channel, after the residual add
  const float* zeros;    // >= 1 + max(coff) zeros: the taps that fall in the padding read these
  int64_t chunk;         // pixels per chunk (multiple of kConvRowAlign, <= kConvMaxChunk): the A/B reuse unit
  // The vector scatter (conv_expand_tables), or all nullptr: the scalar scatter. Per block
  // b of 8 output channels [8b, 8b + 8): xsrc[b] the first kept index it reads, xperm[8b + l]
  // the offset from it of lane l's kept output, xmask[8b + l] -1 where lane l is kept, else 0.
  const int32_t* xsrc = nullptr;
  const int32_t* xperm = nullptr;
  const int32_t* xmask = nullptr;
};

// Row stride (floats) of the per-thread result scratch: every panel's 16 columns, 64-byte
// aligned rows, and 8 floats of slack for the expand's 8-wide read at the last kept index.
inline constexpr int64_t conv_tmp_ld(int64_t Cout) { return round_up(Cout, kConvPanel) + 16; }

// The vector scatter's tables (xsrc [ceil(ldo / 8)], xperm and xmask [8 * ceil(ldo / 8)]),
// from oidx [Cout]: output lane l of block b takes kept output xsrc[b] + xperm[8b + l]. True
// when every block's kept outputs lie within 8 consecutive kept indices (always when oidx
// ascends, as pysparse.compact and CompactConv2d.from_conv write it); false, and the tables
// unusable, otherwise (the scalar scatter then runs).
inline bool conv_expand_tables(const int64_t* oidx, int64_t Cout, int64_t ldo, int32_t* xsrc, int32_t* xperm,
                               int32_t* xmask) {
  const int64_t nb = (ldo + 7) / 8;
  for (int64_t i = 0; i < nb * 8; ++i) xperm[i] = -1;
  for (int64_t j = 0; j < Cout; ++j) xperm[oidx[j]] = int32_t(j);
  for (int64_t b = 0; b < nb; ++b) {
    int32_t lo = std::numeric_limits<int32_t>::max(), hi = -1;
    for (int l = 0; l < 8; ++l) {
      const int32_t j = xperm[b * 8 + l];
      if (j >= 0) lo = j < lo ? j : lo, hi = j > hi ? j : hi;
    }
    if (hi < 0) lo = 0;
    else if (hi - lo >= 8) return false;
    xsrc[b] = lo;
    for (int l = 0; l < 8; ++l) {
      int32_t& j = xperm[b * 8 + l];
      xmask[b * 8 + l] = j >= 0 ? -1 : 0;
      j = j >= 0 ? j - lo : 0;
    }
  }
  return true;
}

// Output pixels [p0, p1) (p = (n * Ho + oh) * Wo + ow), all channels. p0 is a multiple of
// kConvRowAlign. rows: this thread's scratch of chunk * KH * KW pointers (the row address
// of every tile and tap of a chunk); tmp: its scratch of chunk * conv_tmp_ld(Cout) floats,
// 64-byte aligned (a chunk's results before the scatter). Single-threaded; the caller
// splits pixels with at::parallel_for. All three paths do the same fp32 operations in the same order (one fused multiply-add per k,
// k ascending, then + bias, then residual +, then ReLU), so they agree bit for bit.
void compact_conv2d_f32_scalar(const CompactConvArgs& a, int64_t p0, int64_t p1, const float** rows,
                               float* tmp);
#if PYSPARSE_X86
void compact_conv2d_f32_avx2(const CompactConvArgs& a, int64_t p0, int64_t p1, const float** rows,
                             float* tmp);
void compact_conv2d_f32_avx512(const CompactConvArgs& a, int64_t p0, int64_t p1, const float** rows,
                               float* tmp);
#endif

}  // namespace cpu
}  // namespace pysparse
