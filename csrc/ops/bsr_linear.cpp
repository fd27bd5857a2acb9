// ATen wrappers of the block-sparse ops on CPU: input checks, activation quantization
// (int8), and threads balanced by each block row's work, not by row count: a pruned
// layer's block rows hold very different numbers of nonzero blocks.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <limits>
#include <vector>

#include "../cpu/bsr_linear.h"
#include "amx_pack.h"
#include "common.h"

namespace pysparse {
namespace {

using at::Tensor;
using cpu::Isa;
using cpu::Kernel;

// Kernel (csrc/cpu/dispatch.h) -> function. Off x86-64 only the scalar units exist, and
// the policy never picks anything else there (best_isa() is Scalar).
using BsrF32Fn = void (*)(const cpu::BsrF32Args&, int64_t, int64_t);
using BsrBf16Fn = void (*)(const cpu::BsrBf16Args&, int64_t, int64_t);
using BsrI8Fn = void (*)(const cpu::BsrI8Args&, int64_t, int64_t, int32_t*, float*);
using BsrGradFn = void (*)(const cpu::BsrGradArgs&, int64_t, int64_t);
using TransposeFn = void (*)(const float*, const int32_t*, int64_t, int64_t, int64_t, int64_t, float*);

BsrF32Fn f32_fn(Kernel k) {
#if PYSPARSE_X86
  if (k == Kernel::Avx512) return cpu::bsr_f32_avx512;
  if (k == Kernel::Avx2) return cpu::bsr_f32_avx2;
#endif
  (void)k;
  return cpu::bsr_f32_scalar;
}
BsrBf16Fn bf16_fn(Kernel k) {
#if PYSPARSE_X86
  if (k == Kernel::Avx512Bf16) return cpu::bsr_bf16_avx512bf16;
  if (k == Kernel::Avx512Widen) return cpu::bsr_bf16_avx512;
  if (k == Kernel::Avx2Widen) return cpu::bsr_bf16_avx2;
#endif
  (void)k;
  return cpu::bsr_bf16_scalar;
}
BsrI8Fn i8_fn(Kernel k) {
#if PYSPARSE_X86
  if (k == Kernel::Amx) return cpu::bsr_i8_amx;
  if (k == Kernel::Avx512) return cpu::bsr_i8_avx512;
  if (k == Kernel::Avx2) return cpu::bsr_i8_avx2;
#endif
  (void)k;
  return cpu::bsr_i8_scalar;
}
BsrGradFn grad_fn(Kernel k) {
#if PYSPARSE_X86
  if (k == Kernel::Avx512) return cpu::bsr_grad_values_avx512;
  if (k == Kernel::Avx2) return cpu::bsr_grad_values_avx2;
#endif
  (void)k;
  return cpu::bsr_grad_values_scalar;
}
TransposeFn transpose_fn(Kernel k) {
#if PYSPARSE_X86
  if (k == Kernel::Avx512) return cpu::transpose_blocks_avx512;
#endif
  (void)k;
  return cpu::transpose_blocks_scalar;
}

// Split block rows [0, R) into one contiguous range per thread with equal work, work of a
// row = its nonzero blocks * bk + a fixed epilogue cost (bn).
template <class F>
void parallel_rows(const int32_t* row_ptr, int64_t R, int64_t bk, int64_t bn, F&& f) {
  const int64_t T = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), R));
  const int64_t total = int64_t(row_ptr[R] - row_ptr[0]) * bk + R * bn;
  std::vector<int64_t> cut(T + 1, R);
  cut[0] = 0;
  int64_t acc = 0, t = 1;
  for (int64_t r = 0; r < R && t < T; ++r) {
    acc += int64_t(row_ptr[r + 1] - row_ptr[r]) * bk + bn;
    while (t < T && acc * T >= total * t) cut[t++] = r + 1;
  }
  at::parallel_for(0, T, 1, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i)
      if (cut[i] < cut[i + 1]) f(cut[i], cut[i + 1]);
  });
}

// Rows of t viewed as [rows, last dim] (from the leading dims: right when the last is 0).
int64_t rows_of(const Tensor& t) {
  int64_t m = 1;
  for (int64_t i = 0; i + 1 < t.dim(); ++i) m *= t.size(i);
  return m;
}

void check_bsr(const Tensor& row_ptr, const Tensor& col_idx, int64_t nnzb, int64_t R, int64_t KB,
               const char* op) {
  TORCH_CHECK_VALUE(row_ptr.scalar_type() == at::kInt && row_ptr.dim() == 1 && row_ptr.is_contiguous() &&
                        row_ptr.size(0) == R + 1 && row_ptr.device().is_cpu(),
                    op, ": row_ptr must be a contiguous int32 CPU tensor of shape [", R + 1, "], got ",
                    row_ptr.scalar_type(), " ", row_ptr.sizes());
  TORCH_CHECK_VALUE(col_idx.scalar_type() == at::kInt && col_idx.dim() == 1 && col_idx.is_contiguous() &&
                        col_idx.size(0) == nnzb && col_idx.device().is_cpu(),
                    op, ": col_idx must be a contiguous int32 CPU tensor of shape [", nnzb, "], got ",
                    col_idx.scalar_type(), " ", col_idx.sizes());
  // The kernels index with these: validate once per call (O(R + nnzb), tiny next to the
  // GEMM) so corrupt metadata is an error, never an out-of-bounds read.
  const int32_t* rp = row_ptr.data_ptr<int32_t>();
  const int32_t* ci = col_idx.data_ptr<int32_t>();
  TORCH_CHECK_VALUE(rp[0] == 0 && rp[R] == nnzb, op, ": row_ptr must start at 0 and end at ", nnzb);
  for (int64_t r = 0; r < R; ++r)
    TORCH_CHECK_VALUE(rp[r] <= rp[r + 1], op, ": row_ptr must be non-decreasing");
  for (int64_t j = 0; j < nnzb; ++j)
    TORCH_CHECK_VALUE(ci[j] >= 0 && ci[j] < KB, op, ": col_idx[", j, "]=", ci[j], " is outside [0, ", KB, ")");
}

// values: float32 [nnzb, bk, bn] (k-major) or bfloat16 [nnzb, bk/2, bn, 2] (input pairs
// interleaved; x is then rounded to bf16 as a bf16 nn.Linear would, products are exact in
// fp32, sums accumulate in fp32).
// The op's rule for non-finite input: a row of x holding a NaN or an Inf gives an all-NaN
// output row, as the dense product (and the reference) gives, whichever blocks were pruned;
// without it a NaN in a column whose blocks are pruned would reach only some outputs, and a
// layer's NaN behaviour would depend on whether timing kept it sparse or dense. One pass over
// x's exponent bits (integer ops: vectorizes, no float reduction order), ~5 us at M = 16,
// K = 4096; the same rule in Python (isfinite + where) cost 0.2 ms there.
template <class Bits, Bits kExp>
void nan_rows(const Bits* x, int64_t ldx, int64_t M, int64_t K, float* out, int64_t N) {
  at::parallel_for(0, M, std::max<int64_t>(1, 65536 / std::max<int64_t>(K, 1)), [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      const Bits* row = x + m * ldx;
      Bits bad = 0;
      for (int64_t k = 0; k < K; ++k) bad |= Bits((row[k] & kExp) == kExp);
      if (bad) std::fill(out + m * N, out + (m + 1) * N, std::numeric_limits<float>::quiet_NaN());
    }
  });
}

Tensor bsr_linear(const Tensor& x, const Tensor& values, const Tensor& row_ptr, const Tensor& col_idx,
                  const std::optional<Tensor>& bias, int64_t N, int64_t K, bool relu) {
  const bool bf16 = values.scalar_type() == at::kBFloat16;
  TORCH_CHECK_VALUE(values.device().is_cpu() && values.is_contiguous() &&
                        (bf16 ? values.dim() == 4 && values.size(3) == 2
                              : values.scalar_type() == at::kFloat && values.dim() == 3),
                    "bsr_linear: values must be a contiguous CPU tensor, float32 [nnzb, bk, bn] "
                    "(pysparse.formats.pack_bsr_f32) or bfloat16 [nnzb, bk/2, bn, 2] (pack_bsr_bf16), got ",
                    values.scalar_type(), " ", values.sizes(), " on ", values.device(),
                    values.is_contiguous() ? "" : " (not contiguous)");
  const int64_t nnzb = values.size(0), bk = bf16 ? 2 * values.size(1) : values.size(1), bn = values.size(2);
  TORCH_CHECK_VALUE(bn == 16 || bn == 32 || bn == 64, "bsr_linear: block bn must be 16, 32 or 64, got ", bn);
  TORCH_CHECK_VALUE(bk >= 1, "bsr_linear: block bk must be >= 1");
  TORCH_CHECK_VALUE(N >= 0 && K >= 0, "bsr_linear: N, K must be >= 0");
  const int64_t R = (N + bn - 1) / bn, KB = (K + bk - 1) / bk;
  check_bsr(row_ptr, col_idx, nnzb, R, KB, "bsr_linear");
  ops::check_x(x, K, "bsr_linear");
  ops::check_bias(bias, N, "bsr_linear");
  const auto dt = x.scalar_type();
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = N;
  int64_t M = 1;
  for (int64_t i = 0; i + 1 < x.dim(); ++i) M *= x.size(i);
  Tensor out = at::empty(shape, x.options().dtype(at::kFloat));
  if (out.numel() == 0) return dt == at::kFloat ? out : out.to(dt);
  const Kernel kern = ops::path(cpu::Op::BsrLinear, {bf16, bk, M});
  if (!bf16) {
    Tensor x2 = x.reshape({M, K}).to(at::kFloat);
    if (x2.stride(1) != 1 && K > 0) x2 = x2.contiguous();
    cpu::BsrF32Args g{x2.data_ptr<float>(), M, N, K, K ? x2.stride(0) : 0, bn, bk,
                      row_ptr.data_ptr<int32_t>(), col_idx.data_ptr<int32_t>(), values.data_ptr<float>(),
                      bias ? bias->data_ptr<float>() : nullptr, relu, out.data_ptr<float>(), N};
    const BsrF32Fn fn = f32_fn(kern);
    parallel_rows(g.row_ptr, R, bk, bn, [&](int64_t r0, int64_t r1) { fn(g, r0, r1); });
    nan_rows<uint32_t, 0x7f800000u>(reinterpret_cast<const uint32_t*>(g.x), g.ldx, M, K, out.data_ptr<float>(), N);
  } else {
    // AMX-BF16 for 32- and 64-deep blocks (one or two 32-k tiles); the policy decides
    const bool amx = kern == Kernel::Amx;
    // The kernels read x in pairs of columns: with K odd, column K must exist and be 0. AMX
    // loads 32 rows x 32 columns per tile pair: zero rows to a multiple of 32, zero columns
    // to whole blocks.
    Tensor xb = x.reshape({M, K}).to(at::kBFloat16);
    // (contiguous: with nothing to pad, constant_pad_nd keeps a transposed x's strides)
    if (amx) xb = at::constant_pad_nd(xb, {0, KB * bk - K, 0, cpu::round_up(M, 32) - M}).contiguous();
    else if (K % 2) xb = at::constant_pad_nd(xb, {0, 1});
    else if (xb.stride(1) != 1 && K > 0) xb = xb.contiguous();
    // The widening paths run the fp32 kernel from kBf16WidenOnceRows rows on: x rounded to
    // bf16 (the op's semantics), then held as fp32.
    Tensor xf;
    if ((kern == Kernel::Avx512Widen || kern == Kernel::Avx2Widen) && M >= cpu::kBf16WidenOnceRows)
      xf = xb.to(at::kFloat).contiguous();
    cpu::BsrBf16Args g{{xf.defined() ? xf.data_ptr<float>() : nullptr, M, N, K, xf.defined() ? xf.stride(0) : 0,
                        bn, bk, row_ptr.data_ptr<int32_t>(), col_idx.data_ptr<int32_t>(), nullptr,
                        bias ? bias->data_ptr<float>() : nullptr, relu, out.data_ptr<float>(), N},
                       reinterpret_cast<const uint16_t*>(xb.data_ptr()), K ? xb.stride(0) : 0,
                       reinterpret_cast<const uint16_t*>(values.data_ptr())};
#if PYSPARSE_X86
    if (amx)
      parallel_rows(g.f.row_ptr, R, bk, bn, [&](int64_t r0, int64_t r1) {
        thread_local std::vector<float> cbuf(cpu::kBsrBf16AmxScratch);
        cpu::bsr_bf16_amx(g, r0, r1, cbuf.data());
      });
    else
#endif
    {
      const BsrBf16Fn fn = bf16_fn(kern);
      parallel_rows(g.f.row_ptr, R, bk, bn, [&](int64_t r0, int64_t r1) { fn(g, r0, r1); });
    }
    nan_rows<uint16_t, uint16_t(0x7f80)>(g.x, g.ldxb, M, K, out.data_ptr<float>(), N);
  }
  return dt == at::kFloat ? out : out.to(dt);
}

// grad_x [M, K] float32 = grad [M, N] @ W: the forward kernel on W^T. W^T's block rows are
// W's block columns (a counting sort of col_idx) and its blocks are W's transposed, [bn][bk]
// k-major for W^T, written once per call into a scratch (in parallel; one pass over the
// stored values: in Python, gather + transpose + copy cost 1.7 ms of a 3.1 ms grad_x at
// density 0.1, M = 128). W^T's blocks are bk wide: the kernel's widths 16/32/64; any other
// bk adds each block's product to grad_x with addmm (correct, not fast).
Tensor bsr_linear_grad_x(const Tensor& grad, const Tensor& values, const Tensor& row_ptr, const Tensor& col_idx,
                         int64_t N, int64_t K) {
  const bool bf16 = values.scalar_type() == at::kBFloat16;
  TORCH_CHECK_VALUE(values.device().is_cpu() && values.is_contiguous() &&
                        (bf16 ? values.dim() == 4 && values.size(3) == 2
                              : values.scalar_type() == at::kFloat && values.dim() == 3),
                    "bsr_linear_grad_x: values must be float32 [nnzb, bk, bn] or bfloat16 [nnzb, bk/2, bn, 2] on "
                    "the CPU, got ", values.scalar_type(), " ", values.sizes());
  const int64_t nnzb = values.size(0), bk = bf16 ? 2 * values.size(1) : values.size(1), bn = values.size(2);
  TORCH_CHECK_VALUE(bn == 16 || bn == 32 || bn == 64, "bsr_linear_grad_x: block bn must be 16, 32 or 64, got ", bn);
  TORCH_CHECK_VALUE(bk >= 1 && N >= 0 && K >= 0, "bsr_linear_grad_x: bk >= 1, N >= 0, K >= 0 required");
  const int64_t R = (N + bn - 1) / bn, KB = (K + bk - 1) / bk;
  check_bsr(row_ptr, col_idx, nnzb, R, KB, "bsr_linear_grad_x");
  TORCH_CHECK_VALUE(grad.device().is_cpu() && grad.dim() >= 1 && grad.size(-1) == N,
                    "bsr_linear_grad_x: grad must be a CPU tensor [..., ", N, "], got ", grad.sizes());
  const int64_t M = rows_of(grad);
  Tensor g2 = grad.reshape({M, N}).to(at::kFloat);
  if (g2.stride(1) != 1 && N > 0) g2 = g2.contiguous();
  if (M == 0 || nnzb == 0) return at::zeros({M, K}, grad.options().dtype(at::kFloat));
  // the blocks as fp32 [nnzb][bk][bn] k-major (bf16: widened, exact)
  Tensor v = bf16 ? values.view({nnzb, bk / 2, bn, 2}).transpose(2, 3).reshape({nnzb, bk, bn}).to(at::kFloat)
                  : values;
  const int32_t* rp = row_ptr.data_ptr<int32_t>();
  const int32_t* ci = col_idx.data_ptr<int32_t>();
  const Kernel kern = ops::path(cpu::Op::BsrLinearGradX, {bf16, bk, M});
  if (kern == Kernel::Aten) {
    Tensor out = at::zeros({M, K}, grad.options().dtype(at::kFloat));
    for (int64_t r = 0; r < R; ++r)
      for (int32_t j = rp[r]; j < rp[r + 1]; ++j) {
        const int64_t n0 = r * bn, k0 = int64_t(ci[j]) * bk, nn = std::min(bn, N - n0), kn = std::min(bk, K - k0);
        out.narrow(1, k0, kn).addmm_(g2.narrow(1, n0, nn), v[j].narrow(0, 0, kn).narrow(1, 0, nn).t());
      }
    return out;
  }
  std::vector<int32_t> rp_t(KB + 1, 0), ci_t(nnzb), order(nnzb);
  for (int64_t j = 0; j < nnzb; ++j) ++rp_t[ci[j] + 1];
  for (int64_t c = 0; c < KB; ++c) rp_t[c + 1] += rp_t[c];
  std::vector<int32_t> next(rp_t.begin(), rp_t.end() - 1);
  for (int64_t r = 0; r < R; ++r)
    for (int32_t j = rp[r]; j < rp[r + 1]; ++j) {
      const int32_t pos = next[ci[j]]++;
      order[pos] = j;
      ci_t[pos] = int32_t(r);
    }
  Tensor vt = at::empty({nnzb, bn, bk}, v.options());
  const float* vs = v.data_ptr<float>();
  float* vd = vt.data_ptr<float>();
  const TransposeFn tr = transpose_fn(kern);
  at::parallel_for(0, nnzb, 16, [&](int64_t p0, int64_t p1) { tr(vs, order.data(), p0, p1, bk, bn, vd); });
  Tensor out = at::empty({M, K}, grad.options().dtype(at::kFloat));  // the kernel writes every output
  cpu::BsrF32Args g{g2.data_ptr<float>(), M, K, N, g2.stride(0), /*bn=*/bk, /*bk=*/bn, rp_t.data(), ci_t.data(), vd,
                    nullptr, false, out.data_ptr<float>(), K};
  const BsrF32Fn fn = f32_fn(kern);
  parallel_rows(rp_t.data(), KB, bn, bk, [&](int64_t r0, int64_t r1) { fn(g, r0, r1); });
  return out;
}

// Gradient of bsr_linear's stored blocks, in values' layout and dtype: grad [..., N] (the
// output gradient), x [..., K] as the forward took it.
Tensor bsr_linear_grad_values(const Tensor& grad, const Tensor& x, const Tensor& values, const Tensor& row_ptr,
                              const Tensor& col_idx, int64_t N, int64_t K) {
  const bool bf16 = values.scalar_type() == at::kBFloat16;
  TORCH_CHECK_VALUE(values.device().is_cpu() && (bf16 ? values.dim() == 4 && values.size(3) == 2
                                                      : values.scalar_type() == at::kFloat && values.dim() == 3),
                    "bsr_linear_grad_values: values must be float32 [nnzb, bk, bn] or bfloat16 [nnzb, bk/2, bn, 2] "
                    "on the CPU, got ", values.scalar_type(), " ", values.sizes());
  const int64_t nnzb = values.size(0), bk = bf16 ? 2 * values.size(1) : values.size(1), bn = values.size(2);
  TORCH_CHECK_VALUE(bn == 16 || bn == 32 || bn == 64, "bsr_linear_grad_values: block bn must be 16, 32 or 64, got ",
                    bn);
  TORCH_CHECK_VALUE(bk >= 1 && N >= 0 && K >= 0, "bsr_linear_grad_values: bk >= 1, N >= 0, K >= 0 required, got bk=",
                    bk, ", N=", N, ", K=", K);
  const int64_t R = (N + bn - 1) / bn, KB = (K + bk - 1) / bk;
  check_bsr(row_ptr, col_idx, nnzb, R, KB, "bsr_linear_grad_values");
  ops::check_x(x, K, "bsr_linear_grad_values");
  const int64_t M = rows_of(x);
  TORCH_CHECK_VALUE(grad.device().is_cpu() && grad.dim() >= 1 && grad.size(-1) == N && rows_of(grad) == M,
                    "bsr_linear_grad_values: grad must be a CPU tensor [..., ", N, "] with x's rows, got ",
                    grad.sizes(), " for x ", x.sizes());
  // the kernels write every element of every stored block (padding included); with no rows
  // the gradient is 0
  Tensor out = M > 0 ? at::empty({nnzb, bk, bn}, values.options().dtype(at::kFloat))
                     : at::zeros({nnzb, bk, bn}, values.options().dtype(at::kFloat));
  if (nnzb > 0 && M > 0) {
    Tensor x2 = x.reshape({M, K});
    x2 = bf16 ? x2.to(at::kBFloat16).to(at::kFloat) : x2.to(at::kFloat);  // what the forward multiplied
    if (x2.stride(1) != 1) x2 = x2.contiguous();
    Tensor g2 = grad.reshape({M, N}).to(at::kFloat);
    if (g2.stride(1) != 1) g2 = g2.contiguous();
    cpu::BsrGradArgs a{x2.data_ptr<float>(), g2.data_ptr<float>(), M, N, K, x2.stride(0), g2.stride(0), bn, bk,
                       row_ptr.data_ptr<int32_t>(), col_idx.data_ptr<int32_t>(), out.data_ptr<float>()};
    const BsrGradFn fn = grad_fn(ops::path(cpu::Op::BsrLinearGradValues, {bf16, bk, M}));
    parallel_rows(a.row_ptr, R, bk, bn, [&](int64_t r0, int64_t r1) { fn(a, r0, r1); });
  }
  if (!bf16) return out;
  // k-major [nnzb, bk, bn] -> input pairs [nnzb, bk/2, bn, 2], rounded to bf16 like the values
  return out.view({nnzb, bk / 2, 2, bn}).transpose(2, 3).contiguous().to(at::kBFloat16);
}

Tensor bsr_int8_linear(const Tensor& x, const Tensor& values, const Tensor& row_ptr, const Tensor& col_idx,
                       const Tensor& colsum, const Tensor& w_scale, const std::optional<Tensor>& bias,
                       const std::optional<Tensor>& x_scale, int64_t N, int64_t K, bool relu) {
  constexpr int64_t B = cpu::kBsrI8Block;
  TORCH_CHECK_VALUE(values.scalar_type() == at::kChar && values.dim() == 2 && values.size(1) == B * B &&
                        values.is_contiguous() && values.device().is_cpu(),
                    "bsr_int8_linear: values must be a contiguous int8 CPU tensor [nnzb, 4096], got ",
                    values.scalar_type(), " ", values.sizes());
  TORCH_CHECK_VALUE(N >= 0 && K >= 0, "bsr_int8_linear: N, K must be >= 0");
  ops::check_k(K, "bsr_int8_linear");
  const int64_t nnzb = values.size(0), R = (N + B - 1) / B, KB = (K + B - 1) / B;
  const int64_t Np = R * B, Kp = std::max<int64_t>(KB, 1) * B;
  check_bsr(row_ptr, col_idx, nnzb, R, KB, "bsr_int8_linear");
  for (const auto& [t, name] : {std::pair{&colsum, "colsum"}, std::pair{&w_scale, "w_scale"}})
    TORCH_CHECK_VALUE(t->dim() == 2 && t->size(0) == 1 && t->size(1) == Np && t->is_contiguous() &&
                          t->scalar_type() == (t == &colsum ? at::kInt : at::kFloat),
                      "bsr_int8_linear: ", name, " must be a contiguous [1, ", Np, "] ",
                      t == &colsum ? "int32" : "float32", " tensor, got ", t->scalar_type(), " ", t->sizes());
  ops::check_packed_n(colsum, N, Np, "bsr_int8_linear");
  ops::check_x(x, K, "bsr_int8_linear");
  ops::check_bias(bias, N, "bsr_int8_linear");
  const auto dt = x.scalar_type();
  const float static_scale = ops::static_x_scale(x_scale, "bsr_int8_linear");
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = N;
  Tensor out = at::empty(shape, x.options());
  if (out.numel() == 0) return out;
  if (K == 0) {
    if (bias) out.copy_(relu ? bias->relu().expand(shape) : bias->expand(shape)); else out.zero_();
    return out;
  }
  const int64_t M = x.numel() / K;
  Tensor x2 = x.reshape({M, K});
  if (x2.stride(1) != 1) x2 = x2.contiguous();
  const cpu::Policy pol = ops::policy();
  const Kernel kern = ops::path(cpu::Op::BsrInt8Linear, {false, B, M}, pol);
  const bool amx = kern == Kernel::Amx, vnni = kern == Kernel::Avx512;
  // the quantization runs on the selected ISA's unit; the AVX2 and scalar kernels take s8
  const Isa isa = amx || vnni ? cpu::kernel_isa(kern) : std::min(cpu::selected_isa(pol), Isa::Avx2);
  // AMX reads x tile-packed (one contiguous 1 KB per 16 x 64 A tile, zero rows up to a
  // multiple of 16; csrc/ops/amx_pack.h); VNNI stores x row-major as u8
  const ops::QuantizedX q =
      amx ? ops::quantize_x_tiles(x2, static_scale, Kp, isa) : ops::quantize_x(x2, static_scale, M, Kp, isa, vnni);
  int8_t* app = q.a.data_ptr<int8_t>();
  float* asp = q.scale.data_ptr<float>();
  const cpu::OutType ot = ops::out_type(dt);
  cpu::BsrI8Args b{{amx ? nullptr : app, M, amx ? cpu::round_up(M, 16) : M, N, Np, Kp, nullptr,
                    colsum.data_ptr<int32_t>(), asp, w_scale.data_ptr<float>(), Kp,
                    bias ? bias->data_ptr<float>() : nullptr, out.data_ptr(), N, ot, amx ? app : nullptr,
                    cpu::amx_prefetch()},
                   row_ptr.data_ptr<int32_t>(), col_idx.data_ptr<int32_t>(), values.data_ptr<int8_t>(), relu};
  const BsrI8Fn fn = i8_fn(kern);
  parallel_rows(b.row_ptr, R, B, B, [&](int64_t r0, int64_t r1) {
    // C scratch: the one size every int8 block-sparse kernel asserts it fits (bsr_linear.h)
    thread_local std::vector<int32_t> cbuf(cpu::kBsrI8Scratch);
    fn(b, r0, r1, cbuf.data(), nullptr);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(pysparse, CPU, m) {
  m.impl("bsr_linear", &bsr_linear);
  m.impl("bsr_int8_linear", &bsr_int8_linear);
  m.impl("bsr_linear_grad_values", &bsr_linear_grad_values);
  m.impl("bsr_linear_grad_x", &bsr_linear_grad_x);
}

}  // namespace pysparse
