// ATen wrappers of pysparse::int8_conv2d_pack / int8_conv2d on the CPU.
//
// The input is quantized once to int8 NHWC (one static per-tensor scale, or one dynamic
// scale per image). groups == 1 and grouped convolutions are implicit GEMMs on the
// int8_linear micro-kernels: per block of output pixels the kh x kw patches are gathered
// (a memcpy per tap) into an A scratch and gemm_<isa> runs over it with the fused
// epilogue (per-pixel activation scale x per-channel weight scale, bias); the activation
// (ReLU / ReLU6) and, with out_scale, the requantization to int8 for the next int8 layer
// are applied in the same pass over the block's output while it is in cache, so the
// shared GEMM kernels stay exactly as int8_linear uses them. An int8 x (the previous
// layer's requantized output) skips the input quantization. A 1x1,
// stride-1, unpadded convolution is a plain GEMM over pixels: no gather. Depthwise
// convolutions have their own kernel (csrc/cpu/int8_conv2d_<isa>.cpp).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "../cpu/int8_conv2d.h"
#include "../cpu/int8_linear.h"
#include "common.h"

namespace pysparse {
namespace {

using at::Tensor;
using cpu::Act;
using cpu::ConvGeom;
using cpu::GemmArgs;
using cpu::Isa;
using cpu::kPackK;
using cpu::kPackN;
using cpu::round_up;

using ops::GemmFn;

// The AVX2 unit's kernel where the path has AVX2, else the scalar twin; off x86 always scalar.
#if PYSPARSE_X86
#define PYSPARSE_PICK(use_avx2, avx2_fn, scalar_fn) ((use_avx2) ? avx2_fn : scalar_fn)
#else
#define PYSPARSE_PICK(use_avx2, avx2_fn, scalar_fn) (scalar_fn)
#endif

// Output pixels per GEMM block: 128. The block's A scratch is 128 x Kp bytes (72 KB for
// 3x3x64, 576 KB for 3x3x512), and 128 rows amortize each 64-column B slice over 64 row
// pairs of the AVX2 micro-kernel. Swept 32/64/128/256 on the ResNet-50 shapes of
// bench/bench_int8_conv2d.py (one thread, CPU time): all within the +-15% noise here.
constexpr int64_t kPixBlock = 128;

bool is_depthwise(int64_t cin, int64_t cout, int64_t groups) {
  return groups > 1 && groups == cin && groups == cout;
}

Act parse_act(c10::string_view s) {
  if (s == "none") return Act::None;
  if (s == "relu") return Act::Relu;
  if (s == "relu6") return Act::Relu6;
  TORCH_CHECK_VALUE(false, "int8_conv2d: activation must be 'none', 'relu' or 'relu6', got '",
                    std::string(s), "'");
}

void check_pair(at::IntArrayRef v, const char* name, int64_t lo) {
  TORCH_CHECK_VALUE(v.size() == 2 && v[0] >= lo && v[1] >= lo, "int8_conv2d: ", name,
                    " must be two integers >= ", lo, ", got ", v);
}

std::tuple<Tensor, Tensor> int8_conv2d_pack(const Tensor& w, int64_t groups) {
  TORCH_CHECK_VALUE(w.scalar_type() == at::kChar, "int8_conv2d_pack: w must be int8, got ", w.scalar_type());
  TORCH_CHECK_VALUE(w.dim() == 4, "int8_conv2d_pack: w must be 4-D [out_channels, in_channels / groups, kh, kw], "
                    "got shape ", w.sizes());
  TORCH_CHECK_VALUE(w.device().is_cpu(), "int8_conv2d_pack: w must be on the CPU, got ", w.device());
  const int64_t cout = w.size(0), cg = w.size(1), kh = w.size(2), kw = w.size(3);
  TORCH_CHECK_VALUE(groups >= 1 && cout % groups == 0, "int8_conv2d_pack: groups must be >= 1 and divide "
                    "out_channels=", cout, ", got groups=", groups);
  TORCH_CHECK_VALUE(cout > 0 && cg > 0 && kh > 0 && kw > 0, "int8_conv2d_pack: w must have no empty "
                    "dimension, got shape ", w.sizes());
  ops::check_k(kh * kw * cg, "int8_conv2d_pack");
  if (is_depthwise(cg * groups, cout, groups)) {
    // [C, 1, kh, kw] -> tap-major [kh*kw, C]: a tap's weights for all channels are
    // contiguous, like one NHWC input pixel.
    Tensor packed = w.reshape({cout, kh * kw}).t().contiguous();
    Tensor colsum = w.reshape({1, cout, kh * kw}).to(at::kInt).sum(-1, false, at::kInt);
    return {packed, colsum};
  }
  static auto pack = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("pysparse::int8_pack", "")
                         .typed<std::tuple<Tensor, Tensor>(const Tensor&, int64_t)>();
  const int64_t og = cout / groups;
  std::vector<Tensor> ps, cs;
  for (int64_t g = 0; g < groups; ++g) {
    // GEMM weight [og, kh*kw*cg], k ordered (ki, kj, c) as the NHWC patch gather lays it out.
    Tensor wg = w.narrow(0, g * og, og).permute({0, 2, 3, 1}).reshape({og, kh * kw * cg});
    auto [p, c] = pack.call(wg, 0);
    ps.push_back(p);
    cs.push_back(c);
  }
  return {at::cat(ps, 0), at::cat(cs, 1)};
}

struct Problem {
  ConvGeom geom;
  int64_t cout, groups, cg, og, K, Kp, Np;
  bool depthwise;
};

Problem check_conv(const Tensor& x, const Tensor& packed, const Tensor& colsum, const Tensor& w_scale,
                   const std::optional<Tensor>& bias, at::IntArrayRef ks, at::IntArrayRef stride,
                   at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, int64_t cin,
                   int64_t cout) {
  const char* op = "int8_conv2d";
  TORCH_CHECK_VALUE(x.device().is_cpu(), op, ": x must be on the CPU (the weight is), got ", x.device());
  TORCH_CHECK_VALUE(x.scalar_type() == at::kFloat || x.scalar_type() == at::kChar, op,
                    ": x must be float32 (or int8 already quantized with x_scale), got ", x.scalar_type());
  TORCH_CHECK_VALUE(x.dim() == 4, op, ": x must be 4-D [N, C, H, W] (any memory format), got shape ", x.sizes());
  TORCH_CHECK_VALUE(x.size(1) == cin, op, ": x must have in_channels=", cin, " channels (dim 1), got shape ",
                    x.sizes());
  check_pair(ks, "kernel_size", 1);
  check_pair(stride, "stride", 1);
  check_pair(padding, "padding", 0);
  check_pair(dilation, "dilation", 1);
  TORCH_CHECK_VALUE(cin > 0 && cout > 0, op, ": in_channels and out_channels must be > 0, got ", cin, " and ",
                    cout);
  TORCH_CHECK_VALUE(groups >= 1 && cin % groups == 0 && cout % groups == 0, op,
                    ": groups must be >= 1 and divide in_channels=", cin, " and out_channels=", cout,
                    ", got groups=", groups);
  Problem p;
  const int64_t H = x.size(2), W = x.size(3);
  const int64_t eh = dilation[0] * (ks[0] - 1) + 1, ew = dilation[1] * (ks[1] - 1) + 1;
  TORCH_CHECK_VALUE(H + 2 * padding[0] >= eh && W + 2 * padding[1] >= ew, op, ": the padded input (",
                    H + 2 * padding[0], " x ", W + 2 * padding[1], ") is smaller than the dilated kernel (",
                    eh, " x ", ew, ")");
  p.geom = ConvGeom{x.size(0), H, W, cin, (H + 2 * padding[0] - eh) / stride[0] + 1,
                    (W + 2 * padding[1] - ew) / stride[1] + 1, ks[0], ks[1], stride[0], stride[1],
                    padding[0], padding[1], dilation[0], dilation[1]};
  p.cout = cout;
  p.groups = groups;
  p.cg = cin / groups;
  p.og = cout / groups;
  p.K = ks[0] * ks[1] * p.cg;
  ops::check_k(p.K, op);
  p.depthwise = is_depthwise(cin, cout, groups);
  TORCH_CHECK_VALUE(packed.scalar_type() == at::kChar && packed.dim() == 2 && packed.is_contiguous() &&
                        packed.device().is_cpu(),
                    op, ": packed weight must be a contiguous 2-D int8 CPU tensor from "
                    "pysparse::int8_conv2d_pack, got ", packed.scalar_type(), " of shape ", packed.sizes());
  TORCH_CHECK_VALUE(colsum.scalar_type() == at::kInt && colsum.dim() == 2 && colsum.is_contiguous() &&
                        colsum.device().is_cpu(),
                    op, ": colsum must be a contiguous 2-D int32 CPU tensor from pysparse::int8_conv2d_pack");
  if (p.depthwise) {
    p.Kp = p.Np = 0;
    TORCH_CHECK_VALUE(packed.size(0) == ks[0] * ks[1] && packed.size(1) == cout && colsum.size(0) == 1 &&
                          colsum.size(1) == cout,
                      op, ": packed weight has shape ", packed.sizes(), ", expected [", ks[0] * ks[1], ", ",
                      cout, "] for a depthwise ", ks[0], "x", ks[1], " convolution of ", cout,
                      " channels (was it packed for another layer?)");
  } else {
    p.Kp = std::max(round_up(p.K, kPackK), kPackK);
    p.Np = round_up(p.og, kPackN);
    TORCH_CHECK_VALUE(packed.size(0) == groups * p.Np / 16 && packed.size(1) == p.Kp * 16 &&
                          colsum.size(0) == 1 && colsum.size(1) == groups * p.Np,
                      op, ": packed weight has shape ", packed.sizes(), " and colsum ", colsum.sizes(),
                      ", which do not hold ", groups, " group(s) of ", p.og, " output channels x ", p.K,
                      " inputs (kh*kw*in_channels/groups; was it packed for another layer?)");
    for (int64_t g = 0; g < groups; ++g)
      ops::check_packed_n(colsum.narrow(1, g * p.Np, p.Np), p.og, p.Np, op);
  }
  TORCH_CHECK_VALUE(w_scale.scalar_type() == at::kFloat && w_scale.is_contiguous() && w_scale.device().is_cpu() &&
                        w_scale.sizes() == colsum.sizes(),
                    op, ": w_scale must be a contiguous float32 CPU tensor of colsum's shape ", colsum.sizes(),
                    ", got ", w_scale.scalar_type(), " ", w_scale.sizes());
  ops::check_bias(bias, cout, op);
  return p;
}

Tensor int8_conv2d(const Tensor& x, const Tensor& packed, const Tensor& colsum, const Tensor& w_scale,
                   const std::optional<Tensor>& bias, const std::optional<Tensor>& x_scale,
                   at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
                   at::IntArrayRef dilation, int64_t groups, int64_t in_channels, int64_t out_channels,
                   c10::string_view activation, std::optional<double> out_scale,
                   const std::optional<Tensor>& residual) {
  const Act act = parse_act(activation);
  const Problem p = check_conv(x, packed, colsum, w_scale, bias, kernel_size, stride, padding, dilation,
                               groups, in_channels, out_channels);
  const float static_scale = ops::static_x_scale(x_scale, "int8_conv2d");
  const bool int8_in = x.scalar_type() == at::kChar;
  TORCH_CHECK_VALUE(!int8_in || static_scale > 0.f, "int8_conv2d: an int8 x needs x_scale, the scale it was "
                    "quantized with");
  const bool int8_out = out_scale.has_value();
  const float qinv = int8_out ? 1.0f / float(*out_scale) : 0.f;
  TORCH_CHECK_VALUE(!int8_out || (std::isfinite(float(*out_scale)) && float(*out_scale) > 0.f && std::isfinite(qinv)),
                    "int8_conv2d: out_scale must be a finite float > 0 (and its reciprocal finite), got ",
                    out_scale.value_or(0.0));
  const ConvGeom& g = p.geom;
  Tensor res;  // the residual, NHWC (no copy when it already is)
  if (residual) {
    TORCH_CHECK_VALUE(!p.depthwise, "int8_conv2d: residual is for groups == 1 and grouped convolutions, not "
                      "depthwise ones (add it after the layer)");
    TORCH_CHECK_VALUE(residual->scalar_type() == at::kFloat && residual->device().is_cpu(),
                      "int8_conv2d: residual must be a float32 CPU tensor, got ", residual->scalar_type(), " on ",
                      residual->device());
    TORCH_CHECK_VALUE(residual->sizes() == at::IntArrayRef({g.N, p.cout, g.Ho, g.Wo}),
                      "int8_conv2d: residual must have the output's shape [", g.N, ", ", p.cout, ", ", g.Ho, ", ",
                      g.Wo, "], got ", residual->sizes());
    res = residual->contiguous(at::MemoryFormat::ChannelsLast);
  }
  const float* rp = res.defined() ? res.data_ptr<float>() : nullptr;
  Tensor out = at::empty({g.N, p.cout, g.Ho, g.Wo}, x.options()
                                                       .dtype(int8_out ? at::kChar : at::kFloat)
                                                       .memory_format(at::MemoryFormat::ChannelsLast));
  if (out.numel() == 0) return out;
  const Tensor xc = x.contiguous(at::MemoryFormat::ChannelsLast);  // no copy when already NHWC
  const float* xp = int8_in ? nullptr : xc.data_ptr<float>();
  const int64_t HW = g.H * g.W, Pin = g.N * HW, P = g.N * g.Ho * g.Wo, C = g.C;

  // the one dispatch policy (csrc/cpu/dispatch.h) picks the ISA unit, as for int8_linear
  const Isa isa = cpu::kernel_isa(ops::path(cpu::Op::Int8Conv2d));
  // Only the AVX-512 VNNI kernel multiplies u8 x s8 (VPDPBUSD): it gets s8 + 128.
  const bool u8 = !p.depthwise && isa == Isa::Avx512;
  const int8_t fill = u8 ? int8_t(-128) : int8_t(0);  // the quantized zero

  // One scale per image: the static one, or amax / 127 over the image's finite values.
  const bool avx2 = isa != Isa::Scalar;  // every path above scalar has AVX2
  std::vector<float> img_scale(size_t(g.N), static_scale);
  if (static_scale == 0.f) {  // (x is float32 here)
    const auto amax_fn = PYSPARSE_PICK(avx2, cpu::amax_finite_avx2, cpu::amax_finite_scalar);
    at::parallel_for(0, g.N, 1, [&](int64_t n0, int64_t n1) {
      for (int64_t n = n0; n < n1; ++n) {
        const float s = amax_fn(xp + n * HW * C, HW * C) / 127.0f;
        img_scale[size_t(n)] = s > 0.f ? s : 1.0f;  // all zero (or amax/127 underflows): 1
      }
    });
  }

  // The 1x1 stride-1 unpadded convolution reads the quantized input as the GEMM's A:
  // rows quantize straight into [round_up(P, 32)][Kp] (zero padded), no gather.
  const bool direct = !p.depthwise && groups == 1 && g.kh == 1 && g.kw == 1 && g.sh == 1 && g.sw == 1 &&
                      g.ph == 0 && g.pw == 0;
  const int64_t ldq = direct ? p.Kp : C;
  const int64_t qrows = direct ? round_up(Pin, 32) : Pin;
  Tensor qx = at::empty({qrows, ldq}, x.options().dtype(at::kChar));
  Tensor pscale = at::empty({Pin}, x.options().dtype(at::kFloat));
  std::vector<uint8_t> pix_bad(static_cast<size_t>(Pin));
  int8_t* qp = qx.data_ptr<int8_t>();
  float* psp = pscale.data_ptr<float>();
  if (qrows > Pin) std::memset(qp + Pin * ldq, fill, size_t((qrows - Pin) * ldq));
  if (int8_in) {  // already quantized: copy into the padded layout (u8 view: ^ 0x80)
    const int8_t* xq = xc.data_ptr<int8_t>();
    std::fill(psp, psp + Pin, static_scale);
    at::parallel_for(0, Pin, std::max<int64_t>(1, 65536 / C), [&](int64_t m0, int64_t m1) {
      for (int64_t m = m0; m < m1; ++m) {
        int8_t* d = qp + m * ldq;
        std::memcpy(d, xq + m * C, size_t(C));
        if (u8)
          for (int64_t k = 0; k < C; ++k) d[k] = int8_t(d[k] ^ 0x80);
        if (ldq > C) std::memset(d + C, fill, size_t(ldq - C));
      }
    });
  } else {
    const auto qf = PYSPARSE_PICK(avx2, cpu::quantize_pixels_avx2, cpu::quantize_pixels_scalar);
    const float nan = std::nanf("");
    at::parallel_for(0, Pin, std::max<int64_t>(1, 16384 / C), [&](int64_t m0, int64_t m1) {
      for (int64_t m = m0; m < m1;) {  // split at image boundaries: the scale is per image
        const int64_t n = m / HW, e = std::min(m1, (n + 1) * HW);
        const float sn = img_scale[size_t(n)];
        uint8_t any_bad = 1;
        if (C < 32 && ldq == C) {
          // Few channels (the RGB stem): the block's pixels as one row, vectorized, when every
          // value is finite; else again pixel by pixel for the per-pixel NaN flags. (A pixel of
          // 3 floats is all scalar tail: 50176 of them took ~0.5 ms of the 7x7 stem here.)
          qf(xp + m * C, 0, (e - m) * C, (e - m) * C, 0, 1, sn, u8, qp + m * C, &any_bad);
          if (!any_bad) std::fill(pix_bad.begin() + m, pix_bad.begin() + e, uint8_t(0));
        }
        if (any_bad) qf(xp, C, C, ldq, m, e, sn, u8, qp, pix_bad.data());
        for (int64_t i = m; i < e; ++i) psp[i] = pix_bad[size_t(i)] ? nan : sn;
        m = e;
      }
    });
  }
  float* op = int8_out ? nullptr : out.data_ptr<float>();
  int8_t* oq = int8_out ? out.data_ptr<int8_t>() : nullptr;
  // The gathered patches hold these bytes and the zero fill: their minimum serves them too.
  const int a_min = p.depthwise ? -128 : ops::act_min(isa, qp, qrows * ldq);
  // No NaN/Inf pixel anywhere (the usual case): the gather skips its per-tap checks.
  const bool any_bad = std::any_of(pix_bad.begin(), pix_bad.end(), [](uint8_t b) { return b != 0; });

  if (p.depthwise) {
    cpu::DwArgs a{g, qp, pix_bad.data(), img_scale.data(), packed.data_ptr<int8_t>(),
                  w_scale.data_ptr<float>(), bias ? bias->data_ptr<float>() : nullptr, op, act, oq, qinv};
    const auto fn = PYSPARSE_PICK(isa >= Isa::Avx2, cpu::depthwise_avx2, cpu::depthwise_scalar);
    at::parallel_for(0, g.N * g.Ho, 1, [&](int64_t r0, int64_t r1) {
      thread_local std::vector<int32_t> acc;
      if (acc.size() < size_t(cpu::depthwise_scratch(g))) acc.resize(size_t(cpu::depthwise_scratch(g)));
      fn(a, r0, r1, acc.data());
    });
    return out;
  }

  const GemmFn fn = ops::int8_gemm_fn(isa);
  const auto requant_fn = PYSPARSE_PICK(avx2, cpu::act_requant_rows_avx2, cpu::act_requant_rows_scalar);
  const int64_t nblocks = (P + kPixBlock - 1) / kPixBlock, nchunks = p.Np / kPackN;
  // Few pixel blocks (batch 1 at 7x7 is one block): split the 64-column chunks too, so
  // every thread has work (2 tasks per thread); each split gathers the block again,
  // which costs rows*K bytes of copies against rows*K*og MACs.
  const int64_t base = nblocks * groups, want = 2 * int64_t(at::get_num_threads());
  int64_t nsplit = base >= want ? 1 : std::min(nchunks, (want + base - 1) / base);
  const int64_t cps = (nchunks + nsplit - 1) / nsplit;
  nsplit = (nchunks + cps - 1) / cps;
  const int8_t* pk = packed.data_ptr<int8_t>();
  const int32_t* csp = colsum.data_ptr<int32_t>();
  const float* wsp = w_scale.data_ptr<float>();
  const float* bp = bias ? bias->data_ptr<float>() : nullptr;
  at::parallel_for(0, base * nsplit, 1, [&](int64_t begin, int64_t end) {
    // Per-thread scratch kept across calls (a 576 KB A block allocated per call would be
    // mmap'ed and page-faulted every time).
    thread_local std::vector<int8_t> abuf;
    thread_local std::vector<float> sbuf, fbuf, obuf;
    thread_local std::vector<int32_t> cbuf;
    if (!direct && abuf.size() < size_t(kPixBlock * p.Kp)) abuf.resize(size_t(kPixBlock * p.Kp));
    // int8 output: the float block lands here, then requantizes into out
    if (int8_out && obuf.size() < size_t(kPixBlock * p.og)) obuf.resize(size_t(kPixBlock * p.og));
    if (cbuf.size() < size_t(kPixBlock * kPackN)) {
      sbuf.resize(size_t(kPixBlock));
      cbuf.resize(size_t(kPixBlock * kPackN));
      fbuf.resize(size_t(kPixBlock * kPackN));
    }
    int64_t gathered = -1;
    for (int64_t t = begin; t < end; ++t) {
      const int64_t s = t % nsplit, bg = t / nsplit, gi = bg % groups, pb = bg / groups;
      const int64_t p0 = pb * kPixBlock, rows = std::min(kPixBlock, P - p0);
      const int8_t* a = qp + p0 * ldq;
      const float* as = psp + p0;
      if (!direct) {
        if (gathered != bg)
          cpu::gather_patches(g, qp, any_bad ? pix_bad.data() : nullptr, img_scale.data(), p0, rows, gi * p.cg, p.cg, p.Kp, fill,
                              abuf.data(), sbuf.data());
        gathered = bg;
        a = abuf.data();
        as = sbuf.data();
      }
      GemmArgs ga{};
      ga.a = a;
      ga.M = rows;
      ga.Mp = round_up(rows, 32);
      ga.N = p.og;
      ga.Np = p.Np;
      ga.Kp = p.Kp;
      ga.b = pk + gi * (p.Np / 16) * (p.Kp * 16);
      ga.colsum = csp + gi * p.Np;
      ga.a_scale = as;
      ga.w_scale = wsp + gi * p.Np;
      ga.group = p.Kp;
      ga.bias = bp ? bp + gi * p.og : nullptr;
      ga.out = int8_out ? obuf.data() : op + p0 * p.cout + gi * p.og;
      ga.ldo = int8_out ? p.og : p.cout;
      ga.out_type = cpu::OutType::F32;
      ga.K = p.K;
      ga.a_min = a_min;
      const int64_t c0 = s * cps, c1 = std::min(nchunks, c0 + cps);
      fn(ga, 0, rows, c0, c1, cbuf.data(), fbuf.data());
      // Residual, activation (and requantization) in the same pass, while the block is in
      // cache: y = act(conv + bias + residual). (A ResNet-50 at batch 8 spent a fifth of its
      // int8 time in the separate float add and ReLU, each a fresh 12.8 MB tensor at 56x56.)
      const int64_t j0 = c0 * kPackN, j1 = std::min(c1 * kPackN, p.og);
      if (rp) {
        for (int64_t r = 0; r < rows; ++r) {
          float* o = int8_out ? obuf.data() + r * p.og : op + (p0 + r) * p.cout + gi * p.og;
          const float* rr = rp + (p0 + r) * p.cout + gi * p.og;
          if (int8_out)
            for (int64_t j = j0; j < j1; ++j) o[j] = o[j] + rr[j];
          else
            for (int64_t j = j0; j < j1; ++j) o[j] = cpu::apply_act(o[j] + rr[j], act);
        }
      }
      if (int8_out) {
        requant_fn(obuf.data(), p.og, rows, j0, j1, act, qinv, oq + p0 * p.cout + gi * p.og, p.cout);
      } else if (act != Act::None && !rp) {
        for (int64_t r = 0; r < rows; ++r) {
          float* o = op + (p0 + r) * p.cout + gi * p.og;
          for (int64_t j = j0; j < j1; ++j) o[j] = cpu::apply_act(o[j], act);
        }
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(pysparse, CPU, m) {
  m.impl("int8_conv2d_pack", &int8_conv2d_pack);
  m.impl("int8_conv2d", &int8_conv2d);
}

}  // namespace pysparse
