// ATen wrapper of pysparse::compact_conv2d on CPU: every input checked (the kernels index
// with in_idx / out_idx and trust the shapes), the channel offsets and the zero row the
// padding taps read, and the pixels split over threads in balanced contiguous ranges.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>
#include <memory>
#include <vector>

#include "../cpu/compact_conv2d.h"
#include "common.h"

namespace pysparse {
namespace {

using at::Tensor;

constexpr const char* kOp = "compact_conv2d";

// idx: a 1-D int32/int64 CPU tensor of n values in [0, limit) -> int64 copy (distinct if asked).
std::vector<int64_t> checked_index(const Tensor& idx, const char* name, int64_t n, int64_t limit,
                                   const char* limit_name, bool distinct) {
  TORCH_CHECK_VALUE(idx.device().is_cpu() && (idx.scalar_type() == at::kInt || idx.scalar_type() == at::kLong) &&
                        idx.dim() == 1,
                    kOp, ": ", name, " must be a 1-D int32 or int64 CPU tensor, got ", idx.scalar_type(), " ",
                    idx.sizes(), " on ", idx.device());
  TORCH_CHECK_VALUE(idx.size(0) == n, kOp, ": ", name, " must hold ", n, " indices (the packed weight's ",
                    name[0] == 'i' ? "kept input channels" : "kept output channels", "), got ", idx.size(0));
  const Tensor l = idx.to(at::kLong).contiguous();
  std::vector<int64_t> v(l.data_ptr<int64_t>(), l.data_ptr<int64_t>() + n);
  std::vector<char> seen(distinct ? size_t(limit) : 0, 0);
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK_VALUE(v[i] >= 0 && v[i] < limit, kOp, ": ", name, "[", i, "]=", v[i], " is outside [0, ", limit,
                      ") (", limit_name, "=", limit, ")");
    if (distinct) {
      TORCH_CHECK_VALUE(!seen[v[i]], kOp, ": ", name, " holds ", v[i], " twice: each output channel is written once");
      seen[v[i]] = 1;
    }
  }
  return v;
}

std::pair<int64_t, int64_t> pair_arg(at::IntArrayRef v, const char* name, int64_t min) {
  TORCH_CHECK_VALUE(v.size() == 2, kOp, ": ", name, " must have 2 values (h, w), got ", v);
  TORCH_CHECK_VALUE(v[0] >= min && v[1] >= min, kOp, ": ", name, " must be >= ", min, ", got ", v);
  return {v[0], v[1]};
}

// x [N, C_in_full, H, W] float32 (any strides; channels_last is read in place, anything
// else is copied to channels_last first); weight packed float32 [P, KH, KW, Cin, 16]
// (pysparse.ops_conv.pack_compact_conv2d_weight). Output float32 [N, out_channels, Ho, Wo],
// channels_last: out[:, out_idx] = conv(x[:, in_idx]) (+ bias), every other channel 0; with
// a residual, out = residual + that; with relu, ReLU on every channel after the add.
Tensor compact_conv2d(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias, const Tensor& in_idx,
                      const Tensor& out_idx, at::IntArrayRef stride, at::IntArrayRef padding,
                      at::IntArrayRef dilation, int64_t out_channels, const std::optional<Tensor>& residual,
                      bool relu) {
  TORCH_CHECK_VALUE(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 4, kOp,
                    ": x must be a 4-D float32 CPU tensor [N, C, H, W], got ", x.scalar_type(), " ", x.sizes(),
                    " on ", x.device());
  TORCH_CHECK_VALUE(weight.device().is_cpu() && weight.scalar_type() == at::kFloat && weight.dim() == 5 &&
                        weight.size(4) == cpu::kConvPanel && weight.is_contiguous(),
                    kOp, ": weight must be the packed layout, a contiguous float32 CPU tensor [ceil(Cout/16), kh, "
                    "kw, Cin_kept, 16] (pysparse.ops_conv.pack_compact_conv2d_weight), got ", weight.scalar_type(),
                    " ", weight.sizes(), weight.is_contiguous() ? "" : " (not contiguous)");
  const auto [sh, sw] = pair_arg(stride, "stride", 1);
  const auto [ph, pw] = pair_arg(padding, "padding", 0);
  const auto [dh, dw] = pair_arg(dilation, "dilation", 1);
  TORCH_CHECK_VALUE(out_channels >= 0, kOp, ": out_channels must be >= 0, got ", out_channels);
  const int64_t KH = weight.size(1), KW = weight.size(2), Cin = weight.size(3);
  const int64_t Cout = out_idx.dim() == 1 ? out_idx.size(0) : -1;
  TORCH_CHECK_VALUE(Cout >= 0 && weight.size(0) == (Cout + cpu::kConvPanel - 1) / cpu::kConvPanel, kOp,
                    ": out_idx (", out_idx.sizes(), ") must list one output channel per kept output; the packed "
                    "weight holds ", weight.size(0), " panels of 16 (", weight.size(0) * 16 - 15, " to ",
                    weight.size(0) * 16, " outputs)");
  TORCH_CHECK_VALUE(KH >= 1 && KW >= 1, kOp, ": the kernel size must be >= 1, got ", KH, "x", KW);
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const std::vector<int64_t> ii = checked_index(in_idx, "in_idx", Cin, C, "x.shape[1]", false);
  const std::vector<int64_t> oi = checked_index(out_idx, "out_idx", Cout, out_channels, "out_channels", true);
  ops::check_bias(bias, Cout, kOp);
  const int64_t eh = dh * (KH - 1) + 1, ew = dw * (KW - 1) + 1;
  TORCH_CHECK_VALUE(H + 2 * ph >= eh && W + 2 * pw >= ew, kOp, ": x (", H, "x", W, ", padding ", ph, ",", pw,
                    ") is smaller than the dilated kernel (", eh, "x", ew, ")");
  const int64_t Ho = (H + 2 * ph - eh) / sh + 1, Wo = (W + 2 * pw - ew) / sw + 1;
  Tensor res;
  if (residual) {
    TORCH_CHECK_VALUE(residual->device().is_cpu() && residual->scalar_type() == at::kFloat &&
                          residual->sizes() == at::IntArrayRef({N, out_channels, Ho, Wo}),
                      kOp, ": residual must be a float32 CPU tensor of the output's shape [", N, ", ", out_channels,
                      ", ", Ho, ", ", Wo, "], got ", residual->scalar_type(), " ", residual->sizes(), " on ",
                      residual->device());
    res = residual->contiguous(at::MemoryFormat::ChannelsLast);
  }
  Tensor out = at::empty({N, out_channels, Ho, Wo}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  const int64_t M = N * Ho * Wo;
  if (M == 0 || out_channels == 0) return out;
  // The kernel reads channels at stride 1; any other layout (NCHW) is copied once.
  Tensor xc = x.stride(1) == 1 || C <= 1 ? x : x.contiguous(at::MemoryFormat::ChannelsLast);
  std::vector<float> zeros(size_t(std::max<int64_t>(C, 1)), 0.f);
  // bias padded to whole panels: the tiles add it in registers, 16 columns at a time
  std::vector<float> biasp;
  if (bias) {
    biasp.assign(size_t(weight.size(0) * cpu::kConvPanel), 0.f);
    std::copy(bias->data_ptr<float>(), bias->data_ptr<float>() + Cout, biasp.begin());
  }
  std::vector<int64_t> koff(size_t(KH * KW * Cin));
  for (int64_t kh = 0; kh < KH; ++kh)
    for (int64_t kw = 0; kw < KW; ++kw)
      for (int64_t c = 0; c < Cin; ++c)
        koff[(kh * KW + kw) * Cin + c] = kh * dh * xc.stride(2) + kw * dw * xc.stride(3) + ii[c];
  cpu::CompactConvArgs a{xc.data_ptr<float>(), N, H, W, xc.stride(0), xc.stride(2), xc.stride(3), ii.data(),
                         koff.data(), Cin,
                         KH, KW, sh, sw, ph, pw, dh, dw, Ho, Wo, weight.data_ptr<float>(), Cout,
                         bias ? biasp.data() : nullptr, oi.data(), res.defined() ? res.data_ptr<float>() : nullptr,
                         out.data_ptr<float>(), out_channels, relu, zeros.data(), 0};
  // the one dispatch policy (csrc/cpu/dispatch.h) picks the unit; off x86 only scalar exists
  const cpu::Kernel k = ops::path(cpu::Op::CompactConv2d);
  auto fn = cpu::compact_conv2d_f32_scalar;
#if PYSPARSE_X86
  if (k == cpu::Kernel::Avx512) fn = cpu::compact_conv2d_f32_avx512;
  else if (k == cpu::Kernel::Avx2) fn = cpu::compact_conv2d_f32_avx2;
#else
  (void)k;
#endif
  // Threads: contiguous pixel ranges of equal size (multiples of the tile), one per thread,
  // unless the whole conv is too small to pay for a second thread (~50k MACs, ~10 us).
  constexpr int64_t A = cpu::kConvRowAlign;
  const int64_t macs = M * KH * KW * Cin * std::max<int64_t>(Cout, 1);
  const int64_t tiles = (M + A - 1) / A;
  const int64_t T = macs < 50000 ? 1 : std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), tiles));
  // Chunk: 96 pixels (8 tiles of 12, 16 or 32 AVX2 tiles of 6 or 3) share each panel pass's weights
  // from L1/L2 and their row addresses; smaller only when a thread has fewer pixels.
  const int64_t per = (tiles + T - 1) / T * A;
  a.chunk = std::min<int64_t>(cpu::kConvMaxChunk, per);
  const int64_t nrows = a.chunk * KH * KW;
  std::vector<const float*> rows(size_t(T * nrows));
  // each thread's chunk results before the scatter (uninitialized: every read is written first)
  const int64_t ntmp = a.chunk * cpu::conv_tmp_ld(Cout);
  std::unique_ptr<float[]> tmpbuf(new float[size_t(T * ntmp + 16)]);
  float* tmp0 = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(tmpbuf.get()) + 63) & ~uintptr_t(63));
  // the vector scatter's tables (8 output channels per permute); null when out_idx does not allow it
  const int64_t nblk = (out_channels + 7) / 8;
  std::vector<int32_t> xsrc(static_cast<size_t>(nblk)), xperm(static_cast<size_t>(nblk * 8)),
      xmask(static_cast<size_t>(nblk * 8));
  if (cpu::conv_expand_tables(oi.data(), Cout, out_channels, xsrc.data(), xperm.data(), xmask.data())) {
    a.xsrc = xsrc.data();
    a.xperm = xperm.data();
    a.xmask = xmask.data();
  }
  at::parallel_for(0, T, 1, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      const int64_t p0 = std::min(M, t * per), p1 = std::min(M, (t + 1) * per);
      if (p0 < p1) fn(a, p0, p1, rows.data() + t * nrows, tmp0 + t * ntmp);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(pysparse, CPU, m) { m.impl("compact_conv2d", &compact_conv2d); }

}  // namespace pysparse
