// AMX block-sparse kernels. int8: each stored 64 x 64 block is four AMX B tiles as it lies
// (the packed layout's [4 column blocks][16 k-groups][16 columns][4 k]: one column block is
// 16 rows of 64 bytes, a contiguous 1 KB B tile), so TDPBSSD runs over the stored blocks with
// no repacking. bf16: a block's [bk/2][bn][2] input pairs are B tiles too (16 pair rows =
// 32 k of 16 outputs, stride 4 bn bytes) for TDPBF16PS. Per pass: 32 rows x 32 outputs in
// four C tiles, as the dense AMX kernel.
//
// The int8 kernel after issue 12 (which measured it 4x slower than VNNI at M = 1, density
// 0.1, and only 1.0x-2.2x faster at density 0.1 than at 0.25, for 2.5x fewer blocks): where
// the fixed cost was and what replaced it, none of it timed yet (no AMX machine in reach;
// bench/bench_amx.py measures it):
//  - A: 16 rows Kp bytes apart per tile (16 lines in one L1 set at Kp = 4096), loaded twice
//    per block (once per 32-column half), padded to 32 rows: at M = 1, 31 zero rows and 8
//    TDPBSSD per block. Now tile-packed (one contiguous 1 KB per tile, csrc/ops/amx_pack.h),
//    padded to 16 rows, and rows <= 16 (M <= 16, or a 1..16-row tail) take one 16 x 64 pass:
//    1 A + 4 B tiles, 4 TDPBSSD per block, every byte of the block loaded once.
//  - the weights stream from memory once per call at small M (26 KB per block row at
//    K = 4096, density 0.1) through tile loads the core cannot run far ahead of: blocks are
//    now prefetched a few ahead (amx_tiles.h), the only stream a small-M call has.
//  - tile configuration: once per thread per call (parallel_rows hands each thread one
//    range), as before; an empty block row skips the tiles (its output is the bias).
//  - the epilogue (bsr_i8_store) runs per 32 (or 16) rows on C still in L1, as before.
#include "amx_tiles.h"
#include "bsr_linear_impl.h"

namespace pysparse {
namespace cpu {

namespace {

static_assert(kCCols == kPackN, "the C tile helpers (amx_tiles.h) store rows of kPackN int32");

// Rows 16 mt .. + 32 x outputs 32h .. 32h + 32 of block row rb, over all its stored blocks,
// into C [32][64] int32 (columns 32h ..). pf: blocks ahead to prefetch (0: none), below `end`.
inline void rows32_half(const BsrI8Args& b, const ATiles& A, int64_t mt, int64_t rb, int h, int pf, int32_t end,
                        int32_t* C) {
  constexpr int64_t kBlk = kBsrI8Block * kBsrI8Block;
  zero_c();
  for (int32_t blk = b.row_ptr[rb]; blk < b.row_ptr[rb + 1]; ++blk) {
    if (pf && blk + pf < end) {
      // half 0 fetches the whole block (half 1 reads its other 2 KB soon after), half 1 its own
      const int8_t* vn = b.values + int64_t(blk + pf) * kBlk;
      for (int t = 2 * h; t < 4; ++t) prefetch_tile(vn + t * kTileBytes);
      prefetch_a(A, mt, b.col_idx[blk + pf]);
      prefetch_a(A, mt + 1, b.col_idx[blk + pf]);
    }
    const int64_t kt = b.col_idx[blk];  // a block is 64 k: one k tile
    const int8_t* v = b.values + int64_t(blk) * kBlk + 2 * h * kTileBytes;
    _tile_loadd(4, A.at(mt, kt), A.stride);
    _tile_loadd(5, A.at(mt + 1, kt), A.stride);
    _tile_loadd(6, v, 64);
    _tile_loadd(7, v + kTileBytes, 64);
    _tile_dpbssd(0, 4, 6);
    _tile_dpbssd(1, 4, 7);
    _tile_dpbssd(2, 5, 6);
    _tile_dpbssd(3, 5, 7);
  }
  store_c_2x2(C + 32 * h);
}

// Rows 16 mt .. + 16 x all 64 outputs of block row rb into C [16][64]: one A tile and the
// block's four B tiles per block, each loaded once (tmm5 takes the fourth B tile once
// TDPBSSD 0 has read it: 4 C + 1 A + 3 B = 8 tiles).
inline void rows16(const BsrI8Args& b, const ATiles& A, int64_t mt, int64_t rb, int pf, int32_t end, int32_t* C) {
  constexpr int64_t kBlk = kBsrI8Block * kBsrI8Block;
  zero_c();
  for (int32_t blk = b.row_ptr[rb]; blk < b.row_ptr[rb + 1]; ++blk) {
    if (pf && blk + pf < end) {
      const int8_t* vn = b.values + int64_t(blk + pf) * kBlk;
      for (int t = 0; t < 4; ++t) prefetch_tile(vn + t * kTileBytes);
      prefetch_a(A, mt, b.col_idx[blk + pf]);
    }
    const int8_t* v = b.values + int64_t(blk) * kBlk;
    _tile_loadd(4, A.at(mt, b.col_idx[blk]), A.stride);
    _tile_loadd(5, v, 64);
    _tile_dpbssd(0, 4, 5);
    _tile_loadd(6, v + kTileBytes, 64);
    _tile_dpbssd(1, 4, 6);
    _tile_loadd(7, v + 2 * kTileBytes, 64);
    _tile_dpbssd(2, 4, 7);
    _tile_loadd(5, v + 3 * kTileBytes, 64);
    _tile_dpbssd(3, 4, 5);
  }
  store_c_1x4(C);
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

// s8 x s8 (activations quantized without the VNNI +128 shift); C: [32][64] scratch. A from
// b.g.a_tiles (tile-packed) or row-major b.g.a, either with round_up(M, 16) rows (zero past M).
static_assert(32 * kPackN <= kBsrI8Scratch, "C (two 16-row tiles x 64 columns) must fit the caller's scratch");
void bsr_i8_amx(const BsrI8Args& b, int64_t r0, int64_t r1, int32_t* C, float*) {
  if (r0 >= r1) return;
  const ATiles A = a_tiles_of(b.g);
  const int pf = prefetch_distance(b.g.prefetch);
  const int32_t end = b.row_ptr[r1];  // this range's last block: no prefetch past it
  bool configured = false;
  for (int64_t rb = r0; rb < r1; ++rb) {
    const bool empty = b.row_ptr[rb] == b.row_ptr[rb + 1];
    for (int64_t m = 0; m < b.g.M; m += 32) {
      const int64_t h = std::min<int64_t>(32, b.g.M - m);
      if (empty) {  // no blocks: the output is the bias (ReLU'd), no tiles needed
        std::memset(C, 0, sizeof(int32_t) * size_t(h * kPackN));
      } else {
        if (!configured) configure_tiles();  // once per call on this thread (amx_tiles.h)
        configured = true;
        if (h > 16) {
          rows32_half(b, A, m / kTileRows, rb, 0, pf, end, C);
          rows32_half(b, A, m / kTileRows, rb, 1, pf, end, C);
        } else {
          rows16(b, A, m / kTileRows, rb, pf, end, C);
        }
      }
      detail::bsr_i8_store(b, m, h, rb, C, /*u8=*/false);
    }
  }
  if (configured) _tile_release();
}

}  // namespace cpu
}  // namespace pysparse
