// Raw-pointer int8 GEMM kernels for pysparse::int8_linear / pysparse::int8_mm.
// Nothing here includes ATen: the ISA translation units are compiled with their own
// flags (-mavx2, -mavx512vnni, -mamx-int8) and must not pull in torch headers.
#pragma once
#include <cstdint>
#include <cstring>

#include "isa.h"  // Isa, round_up

namespace pysparse {
namespace cpu {

// Packed weight layout shared by every path (so a model packed once runs on any ISA):
//   Bp[nb][kg][16][4]  int8, nb = Np/16, kg = Kp/4
// One 16-column block for one group of 4 k is 64 bytes: one zmm for VPDPBUSD, and
// exactly one row of an AMX B tile (16 rows = 64 k), so AMX loads a tile with stride 64.
// Np is N rounded up to 64 (the AVX-512 micro-kernel's 4 zmm of columns, two AMX tile
// pairs); Kp is K rounded up to 64 (one AMX tile of K). Padding is zero.
constexpr int64_t kPackN = 64;
constexpr int64_t kPackK = 64;

enum class OutType : int { F32 = 0, BF16 = 1, F16 = 2, I32 = 3 };
enum class InType : int { F32 = 0, BF16 = 1, F16 = 2 };

struct GemmArgs {
  // Activations, already quantized into a zero-padded scratch [Mp][Kp]. For the
  // AVX-512 VNNI path they are stored as u8 (s8 + 128); colsum undoes the shift.
  const int8_t* a;
  int64_t M, Mp, N, Np, Kp;
  const int8_t* b;         // packed weights, layout above
  const int32_t* colsum;   // [G][Np] sums of each group's column (VNNI compensation)
  const float* a_scale;    // [M] per-row activation scale (nullptr for I32 output)
  const float* w_scale;    // [G][Np] per-column (per-group) weight scale
  int64_t group;           // K per scale group (multiple of 64; == Kp for per-channel)
  const float* bias;       // [N] or nullptr
  void* out;               // [M][ldo] of OutType
  int64_t ldo;
  OutType out_type;
  // gemm_amx / bsr_i8_amx only: the activations in the tile-packed layout below (then `a` is
  // not read), or nullptr: they load A tiles from the row-major `a` (16 rows Kp bytes apart).
  const int8_t* a_tiles = nullptr;
  // gemm_amx / bsr_i8_amx only: how far ahead they prefetch (dispatch.h amx_prefetch; < 0:
  // the kernels' default, 0: no software prefetch).
  int prefetch = -1;
  // gemm_avx2 only (the others ignore both). K: the valid reduction length (0: Kp); the
  // kernel stops at round_up(K, 4), the rest of Kp being zero padding in A and B.
  // a_min: a lower bound of A's values (s8 view), from act_min_avx2: >= 0 or >= -127 let
  // it multiply with VPMADDUBSW exactly (see int8_linear_avx2.cpp); -128: no bound known.
  int64_t K = 0;
  int a_min = -128;
};

// Tile-packed activations for the AMX kernels: At[Mt][Kp/64][16][64] int8, Mt = ceil(M/16).
// Each 16-row x 64-k A tile is one contiguous, 64-byte aligned 1 KB (one TILELOADD of
// stride 64: 16 consecutive cache lines, where a row-major A tile is 16 lines Kp bytes
// apart); a row tile's k tiles follow one another, so a pass over K reads one sequential
// stream. Rows past M are zero. (In an anonymous namespace: see int8_linear_impl.h.)
constexpr int64_t kTileRows = 16;
constexpr int64_t kTileBytes = 1024;
namespace {
constexpr int64_t a_tiles_bytes(int64_t M, int64_t Kp) { return round_up(M, kTileRows) * Kp; }
// byte offset of element (m, k)
constexpr int64_t a_tile_offset(int64_t m, int64_t k, int64_t Kp) {
  return ((m / kTileRows) * (Kp / 64) + k / 64) * kTileBytes + (m % kTileRows) * 64 + k % 64;
}
// Rows [m0, m1) of a row-major int8 [.][lda] (K valid columns) into the tile-packed `at`,
// zero past K up to Kp. Rows past M are the caller's to zero (zero_tile_padding).
inline void pack_a_tiles(const int8_t* a, int64_t lda, int64_t K, int64_t Kp, int64_t m0, int64_t m1,
                         int8_t* at) {
  for (int64_t m = m0; m < m1; ++m) {
    const int8_t* r = a + m * lda;
    for (int64_t k = 0; k < Kp; k += 64) {
      int8_t* d = at + a_tile_offset(m, k, Kp);
      const int64_t n = K - k >= 64 ? 64 : K > k ? K - k : 0;
      std::memcpy(d, r + k, size_t(n));
      std::memset(d + n, 0, size_t(64 - n));
    }
  }
}
// Zero rows [M, round_up(M, 16)) of the last row tile.
inline void zero_tile_padding(int64_t M, int64_t Kp, int8_t* at) {
  if (M % kTileRows == 0) return;
  for (int64_t k = 0; k < Kp; k += 64) {
    std::memset(at + a_tile_offset(M, k, Kp), 0, size_t((kTileRows - M % kTileRows) * 64));
  }
}
}  // namespace

// Compute rows [m0, m1) and 64-column chunks [c0, c1) of the output. Each call is
// single-threaded; the caller splits work with at::parallel_for and hands each thread
// scratch cbuf/fbuf of round_up(m1 - m0, 32) x 64 elements. m0 is a multiple of 32 and
// `a` has Mp = round_up(M, 32) rows (AMX reads whole 16-row tiles).
void gemm_scalar(const GemmArgs& g, int64_t m0, int64_t m1, int64_t c0, int64_t c1,
                int32_t* cbuf, float* fbuf);
#if PYSPARSE_X86  // declared only where they are built: a use off x86 fails to compile
void gemm_avx2(const GemmArgs& g, int64_t m0, int64_t m1, int64_t c0, int64_t c1,
              int32_t* cbuf, float* fbuf);
void gemm_avx512(const GemmArgs& g, int64_t m0, int64_t m1, int64_t c0, int64_t c1,
                int32_t* cbuf, float* fbuf);
// AMX, restructured for issue 12 (int8_linear_amx.cpp): A from g.a_tiles where set (else
// row-major g.a, as int8_conv2d hands it), C kept in tiles across each scale group's K, a
// 16-row pass for row tails; `a` needs round_up(M, 16) rows. The previous kernel,
// gemm_amx_rows (row-major A, 32-row passes, C reloaded per 512-k block), stays for comparison
// (PYSPARSE_AMX_GEMM=rows). Both: cbuf/fbuf as above.
void gemm_amx(const GemmArgs& g, int64_t m0, int64_t m1, int64_t c0, int64_t c1,
             int32_t* cbuf, float* fbuf);
void gemm_amx_rows(const GemmArgs& g, int64_t m0, int64_t m1, int64_t c0, int64_t c1,
                   int32_t* cbuf, float* fbuf);
#endif

// Per-row dynamic (scale_in <= 0) or static (scale_in > 0) symmetric quantization of
// rows [m0, m1) of x [M][K] (row stride ldx) into a [.][Kp] (zero padded). u8 stores
// q + 128 (VNNI). A row holding NaN or Inf gets scale NaN, so its output row is NaN.
void quantize_rows_scalar(const void* x, InType t, int64_t ldx, int64_t K, int64_t Kp,
                          int64_t m0, int64_t m1, float scale_in, bool u8, int8_t* a,
                          float* scale_out);
#if PYSPARSE_X86
void quantize_rows_avx2(const void* x, InType t, int64_t ldx, int64_t K, int64_t Kp,
                        int64_t m0, int64_t m1, float scale_in, bool u8, int8_t* a,
                        float* scale_out);
void quantize_rows_avx512(const void* x, InType t, int64_t ldx, int64_t K, int64_t Kp,
                          int64_t m0, int64_t m1, float scale_in, bool u8, int8_t* a,
                          float* scale_out);
// The smallest of n int8 values (127 for n == 0): GemmArgs.a_min for gemm_avx2.
int act_min_avx2(const int8_t* a, int64_t n);
#endif

}  // namespace cpu
}  // namespace pysparse
