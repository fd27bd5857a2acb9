// The AMX kernels' activations: x quantized per row straight into the tile-packed layout of
// csrc/cpu/int8_linear.h (At[ceil(M/16)][Kp/64][16][64], one contiguous 1 KB per A tile),
// for int8_linear, int8_mm and bsr_int8_linear on the AMX path.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <vector>

#include "common.h"

namespace pysparse {
namespace ops {

// Row tiles per parallel_for grain: at least ~16 K elements of x per task (as quantize_x).
inline int64_t tile_grain(int64_t K) { return std::max<int64_t>(1, 16384 / (cpu::kTileRows * std::max<int64_t>(K, 1))); }

// x2 [M, K] (unit column stride) -> int8 s8 (AMX multiplies s8 x s8: no +128 shift) tiles
// [round_up(M, 16) * Kp] bytes and float32 scales [M]. Each row quantizes with the ISA
// unit's quantizer (the same arithmetic as the row-major path, so the int8 values are
// identical) into a Kp-byte row buffer that stays in L1, then goes out as Kp/64 full
// 64-byte lines, one per tile: the quantizer's row-major stores become aligned whole-line
// stores into the tiles, with no second pass over the activations (the buffer is 4 KB at
// K = 4096). Rows past M are zero.
inline QuantizedX quantize_x_tiles(const Tensor& x2, float static_scale, int64_t Kp, cpu::Isa isa) {
  const int64_t M = x2.size(0), K = x2.size(1);
  Tensor tiles = at::empty({cpu::a_tiles_bytes(M, Kp)}, x2.options().dtype(at::kChar));
  Tensor scale = at::empty({M}, x2.options().dtype(at::kFloat));
  const auto qf = quant_fn(isa);
  const cpu::InType t = in_type(x2.scalar_type());
  const char* xp = static_cast<const char*>(x2.data_ptr());
  const int64_t ldx_bytes = x2.stride(0) * int64_t(x2.element_size());
  int8_t* ap = tiles.data_ptr<int8_t>();
  float* sp = scale.data_ptr<float>();
  const int64_t mt = (M + cpu::kTileRows - 1) / cpu::kTileRows;
  at::parallel_for(0, mt, tile_grain(K), [&](int64_t t0, int64_t t1) {
    thread_local std::vector<int8_t> row;
    if (row.size() < size_t(Kp)) row.resize(size_t(Kp));
    const int64_t m1 = std::min(M, t1 * cpu::kTileRows);
    for (int64_t m = t0 * cpu::kTileRows; m < m1; ++m) {
      qf(xp + m * ldx_bytes, t, 0, K, Kp, 0, 1, static_scale, /*u8=*/false, row.data(), sp + m);
      cpu::pack_a_tiles(row.data(), /*lda=*/0, Kp, Kp, m, m + 1, ap);  // (lda 0: row m is the buffer)
    }
    if (t1 == mt) cpu::zero_tile_padding(M, Kp, ap);
  });
  return {tiles, scale};
}

// int8 a [M, K] (any strides) -> tiles, as above without quantization (int8_mm).
inline Tensor int8_to_tiles(const Tensor& a, int64_t Kp) {
  const int64_t M = a.size(0), K = a.size(1);
  Tensor ac = a.stride(1) == 1 ? a : a.contiguous();
  Tensor tiles = at::empty({cpu::a_tiles_bytes(M, Kp)}, a.options());
  const int8_t* src = ac.data_ptr<int8_t>();
  const int64_t lda = ac.stride(0);
  int8_t* ap = tiles.data_ptr<int8_t>();
  const int64_t mt = (M + cpu::kTileRows - 1) / cpu::kTileRows;
  at::parallel_for(0, mt, tile_grain(K), [&](int64_t t0, int64_t t1) {
    cpu::pack_a_tiles(src, lda, K, Kp, t0 * cpu::kTileRows, std::min(M, t1 * cpu::kTileRows), ap);
    if (t1 == mt) cpu::zero_tile_padding(M, Kp, ap);
  });
  return tiles;
}

}  // namespace ops
}  // namespace pysparse
