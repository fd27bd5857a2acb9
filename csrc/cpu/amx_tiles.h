// The AMX tile configuration and helpers both AMX units use (included only by units built
// with -mamx-tile; internal linkage, see int8_linear_impl.h).
#pragma once
#include <immintrin.h>

#include <cstdint>

#include "int8_linear.h"

namespace pysparse {
namespace cpu {
namespace {

// LDTILECFG's 64-byte operand (palette 1): reserved bytes and tiles 8..15 stay zero.
struct alignas(64) TileConfig {
  uint8_t palette_id;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

// Every tile 16 rows x 64 bytes, the one configuration every AMX kernel here uses, so a
// kernel configures once per call on its thread and never between passes (LDTILECFG
// zeroes all tiles and is serializing). The 32-row passes use tmm0..3 as C (2 x 2 tiles of
// 16 x 16 int32 or fp32), tmm4..5 as A (16 rows x 64 bytes), tmm6..7 as B; the 16-row
// passes tmm0..3 as C (16 rows x 64 columns), tmm4 as A, tmm5..7 as B. Tile state is per
// thread: call on the thread that runs.
inline void configure_tiles() {
  TileConfig cfg{};
  cfg.palette_id = 1;
  for (int t = 0; t < 8; ++t) {
    cfg.rows[t] = 16;
    cfg.colsb[t] = 64;
  }
  _tile_loadconfig(&cfg);
}

// Software prefetch distance when GemmArgs.prefetch < 0 (dispatch.h PYSPARSE_AMX_PREFETCH):
// 4 steps ahead. Dense kernel: one 64-k step of a 32-row pass reads 4 KB (two A and two B
// tiles) and issues 4 TDPBSSD (~64 cycles at 16 cycles each, the published throughput), so 4
// steps is ~250 cycles, about one DRAM latency, and 16 KB in flight, a third of a 48 KB L1.
// Block-sparse kernel: a block's 2 KB of B per half (4 KB in a 16-row pass) for 4 TDPBSSD,
// the same arithmetic. NOT MEASURED (no AMX machine in reach when this was written):
// bench/bench_amx.py times PYSPARSE_AMX_PREFETCH=0 against the default on an AMX machine.
constexpr int kAmxPrefetchDefault = 4;
inline int prefetch_distance(int p) { return p < 0 ? kAmxPrefetchDefault : p; }

// One contiguous 1 KB tile (16 cache lines) towards L1.
inline void prefetch_tile(const void* p) {
  const char* c = static_cast<const char*>(p);
  for (int i = 0; i < 1024; i += 64) _mm_prefetch(c + i, _MM_HINT_T0);
}

// Where A tile (row tile mt, k tile kt) lies: tile-packed (GemmArgs.a_tiles: 1 KB contiguous,
// stride 64) or row-major (GemmArgs.a: 16 rows `stride` = Kp bytes apart).
struct ATiles {
  const int8_t* base;
  int64_t mt_step, kt_step, stride;
  const int8_t* at(int64_t mt, int64_t kt) const { return base + mt * mt_step + kt * kt_step; }
};

inline ATiles a_tiles_of(const GemmArgs& g) {
  if (g.a_tiles) return {g.a_tiles, (g.Kp / 64) * kTileBytes, kTileBytes, 64};
  return {g.a, kTileRows * g.Kp, 64, g.Kp};
}

inline void prefetch_a(const ATiles& A, int64_t mt, int64_t kt) {
  const char* p = reinterpret_cast<const char*>(A.at(mt, kt));
  for (int r = 0; r < 16; ++r) _mm_prefetch(p + r * A.stride, _MM_HINT_T0);  // (stride 64: one 1 KB run)
}

// The C tiles tmm0..3 around a k loop: zeroed, then stored into a [.][kCCols] int32 scratch
// (kCCols == kPackN, checked where both are known) either as 2 x 2 tiles (32 rows x 32
// columns: tmm0 | tmm1 over tmm2 | tmm3) or as 1 x 4 (16 rows x 64 columns).
constexpr int64_t kCCols = 64;
inline void zero_c() {
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
}
inline void store_c_2x2(int32_t* C) {
  constexpr int64_t ld = kCCols * 4;
  _tile_stored(0, C, ld);
  _tile_stored(1, C + 16, ld);
  _tile_stored(2, C + 16 * kCCols, ld);
  _tile_stored(3, C + 16 * kCCols + 16, ld);
}
inline void store_c_1x4(int32_t* C) {
  constexpr int64_t ld = kCCols * 4;
  _tile_stored(0, C, ld);
  _tile_stored(1, C + 16, ld);
  _tile_stored(2, C + 32, ld);
  _tile_stored(3, C + 48, ld);
}

}  // namespace
}  // namespace cpu
}  // namespace pysparse
