// The AMX tile configuration both AMX units use (included only by units built with
// -mamx-tile; internal linkage, see int8_linear_impl.h).
#pragma once
#include <immintrin.h>

#include <cstdint>

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

// tmm0..3: C (2 x 2 tiles of 16 x 16 int32 or fp32), tmm4..5: A (16 rows x 64 bytes),
// tmm6..7: B (16 rows x 64 bytes). Tile state is per thread: call on the thread that runs.
inline void configure_tiles() {
  TileConfig cfg{};
  cfg.palette_id = 1;
  for (int t = 0; t < 8; ++t) {
    cfg.rows[t] = 16;
    cfg.colsb[t] = 64;
  }
  _tile_loadconfig(&cfg);
}

}  // namespace
}  // namespace cpu
}  // namespace pysparse
