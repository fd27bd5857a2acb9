// AMX path (Sapphire Rapids and later): TDPBSSD multiplies a 16 x 64 s8 A tile by a
// 64 x 16 s8 B tile into a 16 x 16 int32 C tile (16 x 16 x 64 = 16384 MACs per instruction, 1024 per cycle on Sapphire Rapids; 16x the
// int8 throughput of AVX-512 VNNI per core). The packed B layout puts 4 k of 16 columns
// in 64 bytes, which is exactly one B-tile row, so a B tile is one contiguous 1 KB load
// (16 columns x 64 k at offset kt * 1024 of the 16-column block).
//
// Two kernels (dispatch.h AmxGemm; PYSPARSE_AMX_GEMM picks one for int8_linear / int8_mm):
//  - gemm_amx ("tiles", issue 12): A tiles from the tile-packed activations
//    (int8_linear.h a_tiles: one contiguous 1 KB per tile, where a row-major tile is 16
//    lines Kp bytes apart, which at Kp = 4096 all fall in one L1 set of a 12-way cache), C
//    kept in tiles across a scale group's whole K (no C reload/store per 512-k block), the
//    loops ordered so one 64-column panel of B is reused by every row block of the task,
//    software prefetch of the tiles a few steps ahead, and a 16-row pass for row tails so
//    M % 32 <= 16 computes 16 rows, not 32.
//  - gemm_amx_rows ("rows", the kernel before issue 12): row-major A padded to 32 rows, C
//    in scratch reloaded and stored per 512-k block, 32-row passes only.
// Issue 12 measured the rows kernel at 0.64-0.69 TOPS single-threaded (int8_mm M = 256,
// N = 2048) against a 2.5 TOPS register-only peak. Nothing in the tiles kernel has been
// timed yet (no AMX machine in reach when it was written): bench/bench_amx.py times both,
// and the VNNI path, on an AMX machine in one run.
#include "amx_tiles.h"
#include "int8_linear_impl.h"

namespace pysparse {
namespace cpu {

namespace {

static_assert(kCCols == kPackN, "the C tile helpers (amx_tiles.h) store rows of kPackN int32");

// ---- gemm_amx_rows: the previous kernel, unchanged ----

// 32 rows x 32 columns over k in [k0, k1) (multiples of 64). A is zero-padded to a
// multiple of 32 rows, so the tile loads never read past the scratch buffer.
inline void micro32x32(const int8_t* a, int64_t lda, const int8_t* b0, const int8_t* b1,
                       int64_t k0, int64_t k1, int32_t* C, bool accumulate) {
  constexpr int64_t ldc = kPackN * 4;  // bytes per C scratch row
  if (accumulate) {
    _tile_loadd(0, C, ldc);
    _tile_loadd(1, C + 16, ldc);
    _tile_loadd(2, C + 16 * kPackN, ldc);
    _tile_loadd(3, C + 16 * kPackN + 16, ldc);
  } else {
    zero_c();
  }
  for (int64_t k = k0; k < k1; k += 64) {
    _tile_loadd(4, a + k, lda);
    _tile_loadd(5, a + 16 * lda + k, lda);
    _tile_loadd(6, b0 + k * 16, 64);
    _tile_loadd(7, b1 + k * 16, 64);
    _tile_dpbssd(0, 4, 6);
    _tile_dpbssd(1, 4, 7);
    _tile_dpbssd(2, 5, 6);
    _tile_dpbssd(3, 5, 7);
  }
  store_c_2x2(C);
}

// ---- gemm_amx: the issue 12 kernel ----


// Rows 16 mt .. + 32 x the 32 columns of the 16-column blocks b0, b1, over k tiles
// [kt0, kt1), C in tmm0..3 for the whole range (zeroed first), then stored to C [32][64].
// Per 64-k step: 4 tile loads (4 KB) for 4 TDPBSSD, each A tile used twice, each B tile twice.
// pf: prefetch distance in steps (0: none), ktn: the k tiles in K (no prefetch past them).
inline void pass32(const ATiles& A, int64_t mt, const int8_t* b0, const int8_t* b1, int64_t kt0, int64_t kt1,
                   int pf, int64_t ktn, int32_t* C) {
  zero_c();
  for (int64_t kt = kt0; kt < kt1; ++kt) {
    if (pf && kt + pf < ktn) {
      prefetch_a(A, mt, kt + pf);
      prefetch_a(A, mt + 1, kt + pf);
      prefetch_tile(b0 + (kt + pf) * kTileBytes);
      prefetch_tile(b1 + (kt + pf) * kTileBytes);
    }
    _tile_loadd(4, A.at(mt, kt), A.stride);
    _tile_loadd(5, A.at(mt + 1, kt), A.stride);
    _tile_loadd(6, b0 + kt * kTileBytes, 64);
    _tile_loadd(7, b1 + kt * kTileBytes, 64);
    _tile_dpbssd(0, 4, 6);
    _tile_dpbssd(1, 4, 7);
    _tile_dpbssd(2, 5, 6);
    _tile_dpbssd(3, 5, 7);
  }
  store_c_2x2(C);
}

// Rows 16 mt .. + 16 x all 64 columns of the chunk whose first 16-column block is b (blocks
// bstride bytes apart), C in tmm0..3, stored to C [16][64]. For a tail of <= 16 rows: one A
// tile per step instead of two (half the TDPBSSD of a 32-row pass) and every B tile loaded
// once per 16 rows, 5 loads for 4 TDPBSSD; the fourth B tile reuses tmm5 once TDPBSSD 0 has
// read it (8 tiles: 4 C, 1 A, 3 B).
inline void pass16(const ATiles& A, int64_t mt, const int8_t* b, int64_t bstride, int64_t kt0, int64_t kt1, int pf,
                   int64_t ktn, int32_t* C) {
  const int8_t *b0 = b, *b1 = b + bstride, *b2 = b + 2 * bstride, *b3 = b + 3 * bstride;
  zero_c();
  for (int64_t kt = kt0; kt < kt1; ++kt) {
    if (pf && kt + pf < ktn) {
      const int64_t o = (kt + pf) * kTileBytes;
      prefetch_a(A, mt, kt + pf);
      prefetch_tile(b0 + o);
      prefetch_tile(b1 + o);
      prefetch_tile(b2 + o);
      prefetch_tile(b3 + o);
    }
    const int64_t o = kt * kTileBytes;
    _tile_loadd(4, A.at(mt, kt), A.stride);
    _tile_loadd(5, b0 + o, 64);
    _tile_dpbssd(0, 4, 5);
    _tile_loadd(6, b1 + o, 64);
    _tile_dpbssd(1, 4, 6);
    _tile_loadd(7, b2 + o, 64);
    _tile_dpbssd(2, 4, 7);
    _tile_loadd(5, b3 + o, 64);
    _tile_dpbssd(3, 4, 5);
  }
  store_c_1x4(C);
}
}  // namespace

void gemm_amx(const GemmArgs& g, int64_t m0, int64_t m1, int64_t c0, int64_t c1, int32_t* cbuf, float* fbuf) {
  const int64_t rows = m1 - m0;
  if (rows <= 0) return;
  configure_tiles();  // once per call: one configuration serves both passes (amx_tiles.h)
  const ATiles A = a_tiles_of(g);
  const int64_t bstride = g.Kp * 16, ktn = g.Kp / 64, G = g.Kp / g.group, gt = g.group / 64;
  const int pf = prefetch_distance(g.prefetch);
  // Loop order: chunk (a 64-column panel of B, 64 x Kp bytes: 256 KB at K = 4096, 704 KB at
  // K = 11008, inside a 2 MB Sapphire Rapids L2) outside, the task's row blocks (<= 256 rows,
  // csrc/ops/int8_linear.cpp) inside, so the panel comes from memory once per task and from
  // L2 for every further row block while A streams. Within a row block: scale groups, then
  // the two 32-column halves, each over the group's whole K with C in tiles; the epilogue
  // runs per row block while its 32 x 64 C and F (8 KB each) are in L1.
  for (int64_t c = c0; c < c1; ++c) {
    const int64_t n0 = c * kPackN;
    const int8_t* b = g.b + c * 4 * bstride;
    for (int64_t r = 0; r < rows; r += 32) {
      const int64_t h = std::min<int64_t>(32, rows - r), mt = (m0 + r) / kTileRows;  // m0 % 32 == 0
      for (int64_t gi = 0; gi < G; ++gi) {
        const int64_t kt0 = gi * gt, kt1 = kt0 + gt;
        if (h > 16) {
          pass32(A, mt, b, b + bstride, kt0, kt1, pf, ktn, cbuf);
          pass32(A, mt, b + 2 * bstride, b + 3 * bstride, kt0, kt1, pf, ktn, cbuf + 32);
        } else {
          pass16(A, mt, b, bstride, kt0, kt1, pf, ktn, cbuf);
        }
        detail::epilogue_group(g, m0 + r, h, gi, n0, /*u8=*/false, cbuf, fbuf);
      }
      if (g.out_type != OutType::I32) detail::epilogue_store(g, m0 + r, h, n0, fbuf);
    }
  }
  _tile_release();
}

void gemm_amx_rows(const GemmArgs& g, int64_t m0, int64_t m1, int64_t c0, int64_t c1,
                   int32_t* cbuf, float* fbuf) {
  configure_tiles();  // tile state is per thread
  const int64_t bstride = g.Kp * 16;
  auto micro = [&](int64_t m, int64_t /*rows*/, int64_t c, int64_t k0, int64_t k1, int32_t* C,
                   bool accumulate) {
    const int8_t* a = g.a + m * g.Kp;
    const int8_t* b = g.b + c * 4 * bstride;
    micro32x32(a, g.Kp, b, b + bstride, k0, k1, C, accumulate);
    micro32x32(a, g.Kp, b + 2 * bstride, b + 3 * bstride, k0, k1, C + 32, accumulate);
  };
  // mr = 32 with row_pad = 32: the C scratch has room for the padded rows.
  detail::run_tiles(g, m0, m1, c0, c1, /*u8=*/false, /*mr=*/32, cbuf, fbuf, micro);
  _tile_release();
}

}  // namespace cpu
}  // namespace pysparse
