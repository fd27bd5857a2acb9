// AMX block-sparse kernels. int8: each stored 64 x 64 block is four AMX B tiles as it lies
// (the packed layout's [4 column blocks][16 k-groups][16 columns][4 k]: one column block is
// 16 rows of 64 bytes, a B tile at stride 64), so TDPBSSD runs over the stored blocks with
// no repacking. bf16: a block's [bk/2][bn][2] input pairs are B tiles too (16 pair rows =
// 32 k of 16 outputs, stride 4 bn bytes) for TDPBF16PS. Per pass: 32 rows x 32 outputs in
// four C tiles, as the dense AMX kernel.
#include "amx_tiles.h"
#include "bsr_linear_impl.h"

namespace pysparse {
namespace cpu {

namespace {

// Rows m .. m + 32 x outputs 32h .. 32h + 32 of block row rb, over all its stored blocks,
// into C [32][64] int32 (columns 32h ..). `a` holds round_up(M, 32) rows (zero past M).
inline void rows32_half(const BsrI8Args& b, int64_t m, int64_t rb, int h, int32_t* C) {
  constexpr int64_t ldc = kPackN * 4;  // bytes per C row
  const int64_t Kp = b.g.Kp;
  const int8_t* a = b.g.a + m * Kp;
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  for (int32_t blk = b.row_ptr[rb]; blk < b.row_ptr[rb + 1]; ++blk) {
    const int64_t k0 = int64_t(b.col_idx[blk]) * kBsrI8Block;
    const int8_t* v = b.values + int64_t(blk) * kBsrI8Block * kBsrI8Block + 2 * h * 1024;
    _tile_loadd(4, a + k0, Kp);
    _tile_loadd(5, a + 16 * Kp + k0, Kp);
    _tile_loadd(6, v, 64);
    _tile_loadd(7, v + 1024, 64);
    _tile_dpbssd(0, 4, 6);
    _tile_dpbssd(1, 4, 7);
    _tile_dpbssd(2, 5, 6);
    _tile_dpbssd(3, 5, 7);
  }
  int32_t* c = C + 32 * h;
  _tile_stored(0, c, ldc);
  _tile_stored(1, c + 16, ldc);
  _tile_stored(2, c + 16 * kPackN, ldc);
  _tile_stored(3, c + 16 * kPackN + 16, ldc);
}

// bf16: rows m .. m + 32 x outputs 16 j0 .. 16 (j0 + nj) (nj 1 or 2) of block row rb into
// C [32][64] fp32. x: bf16 [>= m + 32 rows][ldxb], zero past M and past K up to whole blocks.
inline void bf16_rows32(const BsrBf16Args& b, int64_t m, int64_t rb, int j0, int nj, float* C) {
  constexpr int64_t ldc = kPackN * 4;
  const BsrF32Args& g = b.f;
  const int64_t ldx = b.ldxb * 2, ldv = g.bn * 4;  // bytes per x row, per pair row of a block
  const uint16_t* x = b.x + m * b.ldxb;
  _tile_zero(0);
  _tile_zero(2);
  if (nj == 2) {
    _tile_zero(1);
    _tile_zero(3);
  }
  for (int32_t blk = g.row_ptr[rb]; blk < g.row_ptr[rb + 1]; ++blk) {
    const int64_t k0 = int64_t(g.col_idx[blk]) * g.bk;
    const uint16_t* v = b.values + int64_t(blk) * g.bk * g.bn + 32 * j0;  // bf16 [pairs][bn][2]
    for (int64_t kk = 0; kk < g.bk; kk += 32, v += 16 * 2 * g.bn) {  // 32 k = 16 pair rows a tile
      _tile_loadd(4, x + k0 + kk, ldx);
      _tile_loadd(5, x + 16 * b.ldxb + k0 + kk, ldx);
      _tile_loadd(6, v, ldv);
      _tile_dpbf16ps(0, 4, 6);
      _tile_dpbf16ps(2, 5, 6);
      if (nj == 2) {
        _tile_loadd(7, v + 32, ldv);
        _tile_dpbf16ps(1, 4, 7);
        _tile_dpbf16ps(3, 5, 7);
      }
    }
  }
  float* c = C + 16 * j0;
  _tile_stored(0, c, ldc);
  _tile_stored(2, c + 16 * kPackN, ldc);
  if (nj == 2) {
    _tile_stored(1, c + 16, ldc);
    _tile_stored(3, c + 16 * kPackN + 16, ldc);
  }
}
}  // namespace

void bsr_bf16_amx(const BsrBf16Args& b, int64_t r0, int64_t r1, float* C) {
  configure_tiles();
  const int nj_all = int(b.f.bn / 16);
  for (int64_t rb = r0; rb < r1; ++rb)
    for (int64_t m = 0; m < b.f.M; m += 32) {
      for (int j0 = 0; j0 < nj_all; j0 += 2) bf16_rows32(b, m, rb, j0, std::min(2, nj_all - j0), C);
      detail::bsr_f32_store(b.f, m, std::min<int64_t>(32, b.f.M - m), rb * b.f.bn, C, kPackN);
    }
  _tile_release();
}

// s8 x s8 (activations quantized without the VNNI +128 shift); C: [32][64] scratch.
static_assert(32 * kPackN <= kBsrI8Scratch, "C (two 16-row tiles x 64 columns) must fit the caller's scratch");
void bsr_i8_amx(const BsrI8Args& b, int64_t r0, int64_t r1, int32_t* C, float*) {
  configure_tiles();  // tile state is per thread
  for (int64_t rb = r0; rb < r1; ++rb)
    for (int64_t m = 0; m < b.g.M; m += 32) {
      rows32_half(b, m, rb, 0, C);
      rows32_half(b, m, rb, 1, C);
      detail::bsr_i8_store(b, m, std::min<int64_t>(32, b.g.M - m), rb, C, /*u8=*/false);
    }
  _tile_release();
}

}  // namespace cpu
}  // namespace pysparse
