// Raw-pointer int8 GEMM kernels for pysparse::int8_linear / pysparse::int8_mm.
// Nothing here includes ATen: the ISA translation units are compiled with their own
// flags (-mavx2, -mavx512vnni, -mamx-int8) and must not pull in torch headers.
#pragma once
#include <cstdint>

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

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

enum class OutType : int { F32 = 0, BF16 = 1, F16 = 2, I32 = 3 };
enum class InType : int { F32 = 0, BF16 = 1, F16 = 2 };

// The ISA paths, in increasing order; PYSPARSE_CPU_ISA caps the choice.
enum class Isa : int { Scalar = 0, Avx2 = 1, Avx512 = 2, Amx = 3 };

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
};

// Compute rows [m0, m1) and 64-column chunks [c0, c1) of the output. Each call is
// single-threaded; the caller splits work with at::parallel_for and hands each thread
// scratch cbuf/fbuf of round_up(m1 - m0, 32) x 64 elements. m0 is a multiple of 32 and
// `a` has Mp = round_up(M, 32) rows (AMX reads whole 16-row tiles).
void gemm_scalar(const GemmArgs& g, int64_t m0, int64_t m1, int64_t c0, int64_t c1,
                int32_t* cbuf, float* fbuf);
void gemm_avx2(const GemmArgs& g, int64_t m0, int64_t m1, int64_t c0, int64_t c1,
              int32_t* cbuf, float* fbuf);
void gemm_avx512(const GemmArgs& g, int64_t m0, int64_t m1, int64_t c0, int64_t c1,
                int32_t* cbuf, float* fbuf);
void gemm_amx(const GemmArgs& g, int64_t m0, int64_t m1, int64_t c0, int64_t c1,
             int32_t* cbuf, float* fbuf);

// Per-row dynamic (scale_in <= 0) or static (scale_in > 0) symmetric quantization of
// rows [m0, m1) of x [M][K] (row stride ldx) into a [.][Kp] (zero padded). u8 stores
// q + 128 (VNNI). A row holding NaN or Inf gets scale NaN, so its output row is NaN.
void quantize_rows_scalar(const void* x, InType t, int64_t ldx, int64_t K, int64_t Kp,
                          int64_t m0, int64_t m1, float scale_in, bool u8, int8_t* a,
                          float* scale_out);
void quantize_rows_avx2(const void* x, InType t, int64_t ldx, int64_t K, int64_t Kp,
                        int64_t m0, int64_t m1, float scale_in, bool u8, int8_t* a,
                        float* scale_out);
void quantize_rows_avx512(const void* x, InType t, int64_t ldx, int64_t K, int64_t Kp,
                          int64_t m0, int64_t m1, float scale_in, bool u8, int8_t* a,
                          float* scale_out);

// CPU feature detection (cpuid + xgetbv + the AMX permission request).
struct CpuFeatures {
  bool avx2 = false, fma = false, f16c = false;
  bool avx512f = false, avx512bw = false, avx512vl = false, avx512_vnni = false,
       avx512_bf16 = false;
  bool amx_tile = false, amx_int8 = false, amx_bf16 = false;
  bool amx_os_permission = false;  // arch_prctl(ARCH_REQ_XCOMP_PERM) granted
};
const CpuFeatures& cpu_features();
Isa best_isa();        // best path this CPU (and OS) supports
Isa selected_isa();    // best_isa() capped by PYSPARSE_CPU_ISA (read on every call)
// Whether the bf16 kernels use VDPBF16PS: the CPU has AVX512-BF16, the selected path is
// AVX-512 or above, and either PYSPARSE_CPU_BF16=1 or (unset) VDPBF16PS measured at least
// 1.25x the MAC rate of fp32 FMA here (bf16_dot_speedup, once per process). "0" forces the
// widen-to-fp32 kernels. The variable is read on every call, so tests cover both paths.
bool bf16_dot_enabled();
double bf16_dot_speedup_cached();  // bf16_dot_speedup() measured once; 0 without AVX512-BF16
const char* isa_name(Isa isa);

}  // namespace cpu
}  // namespace pysparse
