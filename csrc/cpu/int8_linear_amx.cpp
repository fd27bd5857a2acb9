// AMX path (Sapphire Rapids and later): TDPBSSD multiplies a 16 x 64 s8 A tile by a
// 64 x 16 s8 B tile into a 16 x 16 int32 C tile (1024 MACs per instruction; 16x the
// int8 throughput of AVX-512 VNNI per core). The packed B layout puts 4 k of 16 columns
// in 64 bytes, which is exactly one B-tile row, so a B tile is one strided load.
#include "amx_tiles.h"
#include "int8_linear_impl.h"

namespace pysparse {
namespace cpu {

namespace {

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
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
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
  _tile_stored(0, C, ldc);
  _tile_stored(1, C + 16, ldc);
  _tile_stored(2, C + 16 * kPackN, ldc);
  _tile_stored(3, C + 16 * kPackN + 16, ldc);
}
}  // namespace

void gemm_amx(const GemmArgs& g, int64_t m0, int64_t m1, int64_t c0, int64_t c1,
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
