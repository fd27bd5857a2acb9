// Register-only peak loops of AMX (peak.h): TDPBSSD (the int8 GEMM and block-sparse int8
// kernels) and TDPBF16PS (bf16 blocks), on the tile configuration those kernels use
// (amx_tiles.h): four C tiles as independent chains, A and B tiles loaded once, before the
// loop, so nothing inside it touches memory. The caller must hold the OS permission for the
// tile state (cpu_features().amx_os_permission); tile state is per thread, configured here.
#include <cstring>

#include "amx_tiles.h"
#include "peak.h"

namespace pysparse {
namespace cpu {

namespace {
// Sum of the four C tiles' 16 x 16 elements (int32, or fp32 rounded), then tiles released.
template <bool FP32>
int64_t sum_c_tiles() {
  alignas(64) uint8_t c[16 * 64];
  int64_t s = 0;
  auto add = [&] {
    for (int e = 0; e < 256; ++e) {
      if constexpr (FP32) {
        float v;
        std::memcpy(&v, c + 4 * e, 4);
        s += int64_t(v);
      } else {
        int32_t v;
        std::memcpy(&v, c + 4 * e, 4);
        s += v;
      }
    }
  };
  _tile_stored(0, c, 64);
  add();
  _tile_stored(1, c, 64);
  add();
  _tile_stored(2, c, 64);
  add();
  _tile_stored(3, c, 64);
  add();
  _tile_release();
  return s;
}

// A tiles hold `a` in every byte (or 16-bit pair), B tiles `b`; C tiles zero.
void load_operands(const void* a, const void* b) {
  configure_tiles();
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  _tile_loadd(4, a, 64);
  _tile_loadd(5, a, 64);
  _tile_loadd(6, b, 64);
  _tile_loadd(7, b, 64);
}
}  // namespace

// Each C element gains 64 x 1 x 2 = 128 per TDPBSSD: the checksum is 4 x 256 x 128 x iters
// (int32 elements wrap past 16.7 M rounds, far beyond a 50 ms loop).
int64_t peak_loop_tdpbssd_amx(int64_t iters) {
  alignas(64) int8_t a[16 * 64], b[16 * 64];
  std::memset(a, 1, sizeof a);
  std::memset(b, 2, sizeof b);
  load_operands(a, b);
  for (int64_t i = 0; i < iters; ++i) {
    _tile_dpbssd(0, 4, 6);
    _tile_dpbssd(1, 4, 7);
    _tile_dpbssd(2, 5, 6);
    _tile_dpbssd(3, 5, 7);
  }
  return sum_c_tiles<false>();
}

// bf16 1.0 everywhere: each C element gains 32 per TDPBF16PS (exact below 2^24).
int64_t peak_loop_tdpbf16ps_amx(int64_t iters) {
  alignas(64) uint16_t a[16 * 32];
  for (uint16_t& v : a) v = 0x3F80;
  load_operands(a, a);
  for (int64_t i = 0; i < iters; ++i) {
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    _tile_dpbf16ps(2, 5, 6);
    _tile_dpbf16ps(3, 5, 7);
  }
  return sum_c_tiles<true>();
}

}  // namespace cpu
}  // namespace pysparse
