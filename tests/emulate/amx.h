// A software model of the AMX tile instructions csrc/cpu/int8_linear_amx.cpp uses, so its
// logic (tile shapes, strides, which tile multiplies which) runs on CPUs without AMX. Force-
// included (-include) before that unit: after <immintrin.h> defines the real intrinsics,
// the macros below replace them. Semantics per the Intel SDM (LDTILECFG, TILELOADD,
// TILESTORED, TILEZERO, TDPBSSD, TDPBF16PS, TILERELEASE); only what the kernel uses is modelled.
#pragma once
#include <immintrin.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>

namespace amx_emu {

struct Tile {
  int rows = 0, colsb = 0;
  alignas(64) uint8_t data[16][64];
};
inline thread_local Tile tiles[8];
inline thread_local bool configured = false;

[[noreturn]] inline void fail(const char* what) {
  std::fprintf(stderr, "amx emulation: %s\n", what);
  std::abort();
}

// LDTILECFG faults (#GP) unless start_row and the reserved bytes are 0, every tile is either
// unconfigured (rows = colsb = 0) or fully configured, colsb is a multiple of 4 (the element
// size of C) and within 16 rows x 64 bytes, and tiles 8..15 are unconfigured: checked here,
// so a kernel that would fault on hardware fails under the model too.
inline void loadconfig(const void* cfg) {
  const uint8_t* c = static_cast<const uint8_t*>(cfg);
  if (c[0] != 1) fail("palette_id must be 1");
  for (int i = 1; i < 16; ++i)
    if (c[i]) fail("start_row and the reserved bytes must be 0");
  for (int t = 0; t < 16; ++t) {
    uint16_t colsb;
    std::memcpy(&colsb, c + 16 + 2 * t, 2);
    const int rows = c[48 + t];
    if ((rows == 0) != (colsb == 0)) fail("a tile with rows but no columns, or columns but no rows");
    if (t >= 8 && rows) fail("tiles 8..15 do not exist in palette 1");
    if (rows > 16 || colsb > 64 || colsb % 4) fail("tile larger than 16 rows x 64 bytes, or colsb not 4-aligned");
    if (t < 8) tiles[t].rows = rows, tiles[t].colsb = colsb;
  }
  configured = true;
}
inline Tile& tile(int t) {
  if (!configured) fail("tile used before LDTILECFG");
  if (t < 0 || t > 7) fail("no such tile");
  if (tiles[t].rows == 0) fail("tile used but not configured");
  return tiles[t];
}
// TILELOADD zeroes the rest of the tile (bytes past colsb, rows past rows).
inline void loadd(int t, const void* base, long stride) {
  Tile& x = tile(t);
  std::memset(x.data, 0, sizeof(Tile::data));
  for (int r = 0; r < x.rows; ++r) std::memcpy(x.data[r], static_cast<const uint8_t*>(base) + r * stride, x.colsb);
}
inline void stored(int t, void* base, long stride) {
  Tile& x = tile(t);
  for (int r = 0; r < x.rows; ++r) std::memcpy(static_cast<uint8_t*>(base) + r * stride, x.data[r], x.colsb);
}
inline void zero(int t) { std::memset(tile(t).data, 0, sizeof(Tile::data)); }
// C[m][n] += sum_k sum_i A[m][4k + i] * B[k][4n + i], all signed bytes, int32 C.
inline void distinct(int c, int a, int b) {
  if (c == a || c == b || a == b) fail("the three operands of a tile multiply must be different tiles (#UD)");
}
inline void dpbssd(int c, int a, int b) {
  distinct(c, a, b);
  Tile &C = tile(c), &A = tile(a), &B = tile(b);
  if (A.colsb / 4 != B.rows || C.rows != A.rows || C.colsb != B.colsb) fail("TDPBSSD shapes do not match");
  for (int m = 0; m < C.rows; ++m)
    for (int n = 0; n < C.colsb / 4; ++n) {
      uint32_t acc;  // wraps, as the hardware does
      std::memcpy(&acc, C.data[m] + 4 * n, 4);
      for (int k = 0; k < B.rows; ++k)
        for (int i = 0; i < 4; ++i)
          acc += uint32_t(int32_t(int8_t(A.data[m][4 * k + i])) * int32_t(int8_t(B.data[k][4 * n + i])));
      std::memcpy(C.data[m] + 4 * n, &acc, 4);
    }
}
// C[m][n] (fp32) += sum_k A[m][2k] * B[k][2n] + A[m][2k+1] * B[k][2n+1], bf16 pairs; each
// product is exact in fp32, added in that order (the SDM's pseudocode for TDPBF16PS). Not
// modelled: the instruction's own rounding mode (RNE, denormals flushed, MXCSR ignored); the
// bf16 check compares within a tolerance and uses normal values.
inline float bf16(const uint8_t* p) {
  uint32_t u = uint32_t(p[0] | (p[1] << 8)) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline void dpbf16ps(int c, int a, int b) {
  distinct(c, a, b);
  Tile &C = tile(c), &A = tile(a), &B = tile(b);
  if (A.colsb / 4 != B.rows || C.rows != A.rows || C.colsb != B.colsb) fail("TDPBF16PS shapes do not match");
  for (int m = 0; m < C.rows; ++m)
    for (int n = 0; n < C.colsb / 4; ++n) {
      float acc;
      std::memcpy(&acc, C.data[m] + 4 * n, 4);
      for (int k = 0; k < B.rows; ++k) {
        acc += bf16(A.data[m] + 4 * k) * bf16(B.data[k] + 4 * n);
        acc += bf16(A.data[m] + 4 * k + 2) * bf16(B.data[k] + 4 * n + 2);
      }
      std::memcpy(C.data[m] + 4 * n, &acc, 4);
    }
}
inline void release() {
  configured = false;
  for (Tile& t : tiles) t.rows = t.colsb = 0;
}

}  // namespace amx_emu

#undef _tile_loadd
#undef _tile_stored
#undef _tile_zero
#undef _tile_dpbssd
#undef _tile_dpbf16ps
#define _tile_loadconfig(cfg) amx_emu::loadconfig(cfg)
#define _tile_release() amx_emu::release()
#define _tile_loadd(t, base, stride) amx_emu::loadd(t, base, stride)
#define _tile_stored(t, base, stride) amx_emu::stored(t, base, stride)
#define _tile_zero(t) amx_emu::zero(t)
#define _tile_dpbssd(c, a, b) amx_emu::dpbssd(c, a, b)
#define _tile_dpbf16ps(c, a, b) amx_emu::dpbf16ps(c, a, b)
