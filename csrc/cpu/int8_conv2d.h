// Raw-pointer pieces of pysparse::int8_conv2d (NHWC, int8 weights and activations).
// Like int8_linear.h this includes no ATen: the ISA units (int8_conv2d_<isa>.cpp) are
// compiled with their own -m flags.
//
// groups == 1 and grouped convolutions run as implicit GEMMs on the int8_linear
// micro-kernels (gemm_<isa>): the caller gathers kh x kw patches of the quantized input
// into an A scratch (gather_patches below) and the packed weight is int8_pack's layout of
// the [Cout, kh*kw*Cin] GEMM weight, k ordered (ki, kj, c) so that a patch row is kh*kw
// runs of Cin contiguous bytes of the NHWC input. Depthwise convolutions (groups == Cin
// == Cout) have their own kernel (depthwise_<isa>): a patch of one channel is kh*kw
// values, far too short for a GEMM.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace pysparse {
namespace cpu {

// The activation fused after bias. NaN stays NaN (v < 0 is false for NaN), as torch.relu
// and torch.clamp give.
enum class Act : int { None = 0, Relu = 1, Relu6 = 2 };

// Convolution geometry; input NHWC [N][H][W][C], output NHWC [N][Ho][Wo][Cout].
struct ConvGeom {
  int64_t N, H, W, C, Ho, Wo, kh, kw, sh, sw, ph, pw, dh, dw;
};

// The inline helpers below have internal linkage (anonymous namespace): this header is
// included by units built with different -m flags, and a shared inline symbol could be
// emitted with AVX2 code and picked by the linker for the scalar path.
namespace {

inline float apply_act(float v, Act act) {
  if (act == Act::None) return v;
  v = v < 0.f ? 0.f : v;
  return (act == Act::Relu6 && v > 6.f) ? 6.f : v;
}

// Requantization of an output for the next int8 layer, in the input quantization's
// rounding: round-half-even(clamp(v * inv, -128, 127)), NaN -> 0.
inline int8_t requant(float v, float inv) {
  float t = v * inv;
  if (!(t == t)) t = 0.f;
  return static_cast<int8_t>(static_cast<int>(std::nearbyint(std::min(127.f, std::max(-128.f, t)))));
}

// Gather the patches of output pixels [p0, p0 + rows) (p = (n * Ho + oh) * Wo + ow) for
// input channels [c0, c0 + cg) into a [rows][lda] (lda >= kh*kw*cg; columns past
// kh*kw*cg are filled with `fill`, the quantized zero: 0, or 0x80 in the u8 view).
// Taps outside the image get `fill` too (zero padding). Each output pixel's scale is
// its image's scale, or NaN when any input pixel it reads held NaN/Inf (pix_bad), so
// the output pixel is NaN, as a float convolution would make it. pix_bad == nullptr: no
// input pixel is bad (the caller checked), and the per-tap checks are skipped (49 byte
// loads an output pixel for 7x7).

inline void gather_patches(const ConvGeom& g, const int8_t* qx, const uint8_t* pix_bad,
                           const float* img_scale, int64_t p0, int64_t rows, int64_t c0,
                           int64_t cg, int64_t lda, int8_t fill, int8_t* a, float* a_scale) {
  const int64_t kc = g.kh * g.kw * cg;
  // With dilation 1 and one group, the kw taps of a kernel row are one contiguous run of
  // kw * C input bytes: one memcpy instead of kw (3x fewer calls for 3x3).
  const bool row_run = g.dw == 1 && cg == g.C;
  // A run of at most 32 bytes (the 7x7 stem's 7 x 3 channels) is copied as a fixed 32 bytes
  // where the input and the row have room (the bytes past the run are overwritten by the next
  // run or the padding fill below): a constant-size copy is two 16-byte moves, where the call
  // to memcpy for 21 bytes measured most of the stem's gather.
  const int64_t run_bytes = g.kw * cg, in_bytes = g.N * g.H * g.W * g.C;
  const bool short_run = row_run && run_bytes <= 32;
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t p = p0 + r;
    const int64_t n = p / (g.Ho * g.Wo), rem = p % (g.Ho * g.Wo);
    const int64_t oh = rem / g.Wo, ow = rem % g.Wo;
    int8_t* dst = a + r * lda;
    bool bad = false;
    const int64_t iw0 = ow * g.sw - g.pw;
    for (int64_t ki = 0; ki < g.kh; ++ki) {
      const int64_t ih = oh * g.sh - g.ph + ki * g.dh;
      int8_t* drow = dst + ki * g.kw * cg;
      if (ih < 0 || ih >= g.H) {
        std::memset(drow, fill, size_t(g.kw * cg));
        continue;
      }
      const int64_t pix_row = (n * g.H + ih) * g.W;
      if (row_run && iw0 >= 0 && iw0 + g.kw <= g.W) {
        const int64_t src = (pix_row + iw0) * g.C;
        if (short_run && src + 32 <= in_bytes && ki * run_bytes + 32 <= lda)
          std::memcpy(drow, qx + src, 32);
        else
          std::memcpy(drow, qx + src, size_t(run_bytes));
        if (pix_bad)
          for (int64_t kj = 0; kj < g.kw; ++kj) bad |= pix_bad[pix_row + iw0 + kj] != 0;
        continue;
      }
      for (int64_t kj = 0; kj < g.kw; ++kj) {
        const int64_t iw = iw0 + kj * g.dw;
        if (iw < 0 || iw >= g.W) {
          std::memset(drow + kj * cg, fill, size_t(cg));
        } else {
          std::memcpy(drow + kj * cg, qx + (pix_row + iw) * g.C + c0, size_t(cg));
          bad |= pix_bad && pix_bad[pix_row + iw] != 0;
        }
      }
    }
    if (lda > kc) std::memset(dst + kc, fill, size_t(lda - kc));
    a_scale[r] = bad ? std::nanf("") : img_scale[n];
  }
}

}  // namespace

// Static quantization of rows [m0, m1) of x (K floats a row, row stride ldx) into
// a + m * lda (columns K..lda get the quantized zero), with the rounding of quantize_rows:
// q = round-half-even(clamp(x * (1 / scale), -128, 127)), NaN -> 0; u8 stores q ^ 0x80.
// bad[m] = 1 where row m holds NaN or Inf. (Ours, not quantize_rows_*: that one is
// scalar code, 2 ns an element here, the whole cost of a 1x1 conv's float round trip.)
void quantize_pixels_scalar(const float* x, int64_t ldx, int64_t K, int64_t lda, int64_t m0, int64_t m1,
                            float scale, bool u8, int8_t* a, uint8_t* bad);
void quantize_pixels_avx2(const float* x, int64_t ldx, int64_t K, int64_t lda, int64_t m0, int64_t m1,
                          float scale, bool u8, int8_t* a, uint8_t* bad);
// The largest finite |x[i]| over n values (0 when there is none): the dynamic scale.
float amax_finite_scalar(const float* x, int64_t n);
float amax_finite_avx2(const float* x, int64_t n);

// o[r * ldo + j] = requant(apply_act(f[r * ldf + j]), inv) for r < rows, j in [j0, j1): the
// int8 output of a GEMM block. Here, not in the ATen unit: that one is built without
// SSE4.1, where nearbyint is a libm call (measured 8 ms of a 24 ms 1x1 conv at batch 8).
void act_requant_rows_scalar(const float* f, int64_t ldf, int64_t rows, int64_t j0, int64_t j1, Act act,
                             float inv, int8_t* o, int64_t ldo);
void act_requant_rows_avx2(const float* f, int64_t ldf, int64_t rows, int64_t j0, int64_t j1, Act act,
                           float inv, int8_t* o, int64_t ldo);

// Depthwise: output channel c reads only input channel c. Weight wt [kh*kw][C] (tap
// major, so a tap's weights for all channels are contiguous like the NHWC input).
struct DwArgs {
  ConvGeom geom;
  const int8_t* x;         // quantized input NHWC, s8
  const uint8_t* pix_bad;  // [N*H*W]: 1 where the input pixel held NaN/Inf
  const float* img_scale;  // [N] activation scale of each image
  const int8_t* w;         // [kh*kw][C]
  const float* w_scale;    // [C]
  const float* bias;       // [C] or nullptr
  float* out;              // NHWC [N][Ho][Wo][C] float32, or nullptr when qout is set
  Act act;
  int8_t* qout = nullptr;  // int8 output (requant(v, qinv)) instead of out
  float qinv = 0.f;
};

// Output rows [r0, r1) (r = n * Ho + oh), every ow and channel; acc: scratch of
// depthwise_scratch(geom) int32 (C sums, Wo pixel scales, the widened weights).
// Epilogue in int8_linear's order: ((float(acc) * w_scale) * x_scale) + bias, then act.
static inline int64_t depthwise_scratch(const ConvGeom& g) { return g.C + g.Wo + 8 * g.kh * g.kw; }
void depthwise_scalar(const DwArgs& a, int64_t r0, int64_t r1, int32_t* acc);
void depthwise_avx2(const DwArgs& a, int64_t r0, int64_t r1, int32_t* acc);

}  // namespace cpu
}  // namespace pysparse
