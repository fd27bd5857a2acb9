// ATen wrappers of the int8 ops on CPU: check the inputs (and say what is wrong in a
// user's words), quantize activations into a small padded scratch, and split the GEMM
// over threads with at::parallel_for. The kernels behind this are raw-pointer code in
// csrc/cpu/int8_linear_<isa>.cpp.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "../cpu/int8_linear.h"
#include "amx_pack.h"
#include "common.h"

namespace pysparse {
namespace {

using at::Tensor;
using cpu::GemmArgs;
using cpu::Isa;
using cpu::kPackK;
using cpu::kPackN;
using cpu::round_up;

using ops::GemmFn;
// Only the AVX-512 VNNI path multiplies u8 x s8 (VPDPBUSD); AMX and AVX2 use s8 x s8.
bool isa_wants_u8(Isa isa) { return isa == Isa::Avx512; }

// Rows per task: 256 keeps the task's C/F scratch (256 x 64 x 8 B = 128 KB) in L2 and,
// at M = 512 on 2 threads, gives each thread one row block over all columns.
constexpr int64_t kRowsPerTask = 256;

// The AMX GEMM int8_linear / int8_mm run (dispatch.h AmxGemm, PYSPARSE_AMX_GEMM at load): the
// tiles kernel reads tile-packed activations, the rows kernel the row-major scratch.
bool amx_tiles(Isa isa) { return isa == Isa::Amx && cpu::amx_gemm_variant() == cpu::AmxGemm::Tiles; }

GemmFn gemm_fn(Isa isa) {
#if PYSPARSE_X86
  if (isa == Isa::Amx && !amx_tiles(isa)) return cpu::gemm_amx_rows;
#endif
  return ops::int8_gemm_fn(isa);  // (Amx: gemm_amx, the tiles kernel)
}

void run_gemm(const GemmArgs& g, Isa isa) {
  const GemmFn fn = gemm_fn(isa);
  const int64_t mblocks = (g.M + kRowsPerTask - 1) / kRowsPerTask;
  const int64_t nchunks = g.Np / kPackN;
  at::parallel_for(0, mblocks * nchunks, 1, [&](int64_t begin, int64_t end) {
    thread_local std::vector<int32_t> cbuf;
    thread_local std::vector<float> fbuf;
    const size_t need = size_t(round_up(kRowsPerTask, 32) * kPackN);
    if (cbuf.size() < need) {
      cbuf.resize(need);
      fbuf.resize(need);
    }
    for (int64_t t = begin; t < end;) {
      const int64_t mb = t / nchunks, c0 = t % nchunks;
      const int64_t c1 = std::min(nchunks, c0 + (end - t));
      const int64_t m0 = mb * kRowsPerTask, m1 = std::min(g.M, m0 + kRowsPerTask);
      fn(g, m0, m1, c0, c1, cbuf.data(), fbuf.data());
      t += c1 - c0;
    }
  });
}

void check_packed(const Tensor& packed, const Tensor& colsum, int64_t N, int64_t K,
                  const char* op) {
  TORCH_CHECK_VALUE(N >= 0 && K >= 0, op, ": N and K must be >= 0, got N=", N, ", K=", K);
  ops::check_k(K, op);
  TORCH_CHECK_VALUE(packed.scalar_type() == at::kChar && packed.dim() == 2 && packed.is_contiguous(),
                    op, ": packed weight must be a contiguous 2-D int8 tensor from "
                    "pysparse::int8_pack, got ", packed.scalar_type(), " of shape ", packed.sizes());
  TORCH_CHECK_VALUE(colsum.scalar_type() == at::kInt && colsum.dim() == 2 && colsum.is_contiguous(),
                    op, ": colsum must be a contiguous 2-D int32 tensor from pysparse::int8_pack");
  TORCH_CHECK_VALUE(packed.device().is_cpu() && colsum.device().is_cpu(), op,
                    ": packed weight and colsum must be on the CPU");
  const int64_t Np = round_up(N, kPackN);
  const int64_t G = colsum.size(0);
  TORCH_CHECK_VALUE(G >= 1 && colsum.size(1) == Np, op, ": colsum has shape ", colsum.sizes(),
                    ", expected [groups, ", Np, "] for N=", N);
  const int64_t Kp = packed.size(1) / 16, gk = Kp / G;
  TORCH_CHECK_VALUE(packed.size(0) == Np / 16 && packed.size(1) % 16 == 0 && Kp % G == 0 &&
                        gk % kPackK == 0 && gk > 0 &&
                        // per channel (G = 1): K pads to 64; per group: to the group
                        Kp == (G == 1 ? std::max(round_up(K, kPackK), kPackK) : std::max(round_up(K, gk), gk)),
                    op, ": packed weight has shape ", packed.sizes(), " and ", G,
                    " scale group(s), which does not hold N=", N, ", K=", K,
                    " (was it packed for another layer?)");
  ops::check_packed_n(colsum, N, Np, op);
}

std::tuple<Tensor, Tensor> int8_pack(const Tensor& w, int64_t group_size) {
  TORCH_CHECK_VALUE(w.scalar_type() == at::kChar, "int8_pack: w must be int8, got ", w.scalar_type());
  TORCH_CHECK_VALUE(w.dim() == 2, "int8_pack: w must be 2-D [N, K], got shape ", w.sizes());
  TORCH_CHECK_VALUE(group_size == 0 || (group_size > 0 && group_size % kPackK == 0),
                    "int8_pack: group_size must be 0 (per output channel) or a positive multiple of ",
                    kPackK, ", got ", group_size);
  const int64_t N = w.size(0), K = w.size(1);
  ops::check_k(K, "int8_pack");
  const int64_t Np = round_up(N, kPackN);
  const int64_t Kp = group_size ? std::max<int64_t>(round_up(K, group_size), group_size)
                                : std::max<int64_t>(round_up(K, kPackK), kPackK);
  const int64_t G = group_size ? Kp / group_size : 1, gk = Kp / G;
  Tensor wc = w.contiguous();
  // Every byte of both outputs is written below (padding included): no zero fill first.
  Tensor packed = at::empty({Np / 16, Kp * 16}, w.options().device(at::kCPU));
  Tensor colsum = at::empty({G, Np}, w.options().dtype(at::kInt).device(at::kCPU));
  const int8_t* src = wc.data_ptr<int8_t>();
  int8_t* dst = packed.data_ptr<int8_t>();
  int32_t* cs = colsum.data_ptr<int32_t>();
  // One task per 16-column block (the layout's unit, 16 * Kp bytes). For each group of 4 k
  // the 16 rows' 4 contiguous bytes fill one 64-byte line: one 4-byte load per row and
  // sequential stores, where the old loop moved one byte at a time with a division per
  // byte. 4096 x 11008, 1 thread: 740-922 ms before, 100-122 ms now (~400 M params/s; a
  // loaded 2-core machine, so ranges).
  const int64_t K4 = K / 4;  // groups of 4 k wholly inside K
  at::parallel_for(0, Np / 16, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t nb = b0; nb < b1; ++nb) {
      const int64_t n0 = nb * 16, rows = std::clamp<int64_t>(N - n0, 0, 16);
      int8_t* blk = dst + nb * Kp * 16;
      for (int64_t kg = 0; kg < K4; ++kg) {
        int8_t* o = blk + kg * 64;
        for (int64_t j = 0; j < rows; ++j) std::memcpy(o + j * 4, src + (n0 + j) * K + kg * 4, 4);
        if (rows < 16) std::memset(o + rows * 4, 0, (16 - rows) * 4);
      }
      std::memset(blk + K4 * 64, 0, (Kp / 4 - K4) * 64);  // the partial group and K's padding
      for (int64_t j = 0; j < rows; ++j)
        for (int64_t k = K4 * 4; k < K; ++k) blk[K4 * 64 + j * 4 + (k - K4 * 4)] = src[(n0 + j) * K + k];
      for (int64_t j = 0; j < 16; ++j) {
        const int64_t n = n0 + j;
        for (int64_t g = 0; g < G; ++g) {
          if (j >= rows) {
            cs[g * Np + n] = ops::kColsumPad;  // marks N (common.h)
            continue;
          }
          const int8_t* r = src + n * K;
          int32_t sum = 0;
          for (int64_t k = g * gk, ke = std::min(K, (g + 1) * gk); k < ke; ++k) sum += r[k];
          cs[g * Np + n] = sum;
        }
      }
    }
  });
  return {packed, colsum};
}

Tensor int8_unpack(const Tensor& packed, const Tensor& colsum, int64_t N, int64_t K) {
  check_packed(packed, colsum, N, K, "int8_unpack");
  const int64_t Kp = packed.size(1) / 16;
  Tensor w = at::empty({N, K}, packed.options());
  const int8_t* src = packed.data_ptr<int8_t>();
  int8_t* dst = w.data_ptr<int8_t>();
  // The inverse of int8_pack's copy, per 16-column block: each 64-byte line of the block
  // gives 16 rows their 4 contiguous bytes (a loop per row re-read the block 16 times).
  const int64_t K4 = K / 4;
  at::parallel_for(0, (N + 15) / 16, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t nb = b0; nb < b1; ++nb) {
      const int64_t n0 = nb * 16, rows = std::min<int64_t>(N - n0, 16);
      const int8_t* blk = src + nb * Kp * 16;
      for (int64_t kg = 0; kg < K4; ++kg)
        for (int64_t j = 0; j < rows; ++j) std::memcpy(dst + (n0 + j) * K + kg * 4, blk + kg * 64 + j * 4, 4);
      for (int64_t j = 0; j < rows; ++j)
        for (int64_t k = K4 * 4; k < K; ++k) dst[(n0 + j) * K + k] = blk[K4 * 64 + j * 4 + (k - K4 * 4)];
    }
  });
  return w;
}

Tensor int8_mm(const Tensor& a, const Tensor& packed, const Tensor& colsum, int64_t N, int64_t K) {
  check_packed(packed, colsum, N, K, "int8_mm");
  TORCH_CHECK_VALUE(a.device().is_cpu(), "int8_mm: a must be on the CPU, got ", a.device());
  TORCH_CHECK_VALUE(a.scalar_type() == at::kChar, "int8_mm: a must be int8, got ", a.scalar_type());
  TORCH_CHECK_VALUE(a.dim() == 2 && a.size(1) == K, "int8_mm: a must be [M, ", K, "], got shape ",
                    a.sizes());
  TORCH_CHECK_VALUE(colsum.size(0) == 1,
                    "int8_mm: the weight must be packed per output channel (group_size=0)");
  const int64_t M = a.size(0), Kp = packed.size(1) / 16, Np = packed.size(0) * 16;
  Tensor out = at::empty({M, N}, a.options().dtype(at::kInt));
  if (M == 0 || N == 0) return out;
  const Isa isa = cpu::kernel_isa(ops::path(cpu::Op::Int8Mm, {false, 0, M}));
  const bool u8 = isa_wants_u8(isa), tiles = amx_tiles(isa);
  Tensor ap;
  if (tiles) {
    ap = ops::int8_to_tiles(a, Kp);  // [round_up(M, 16) / 16][Kp / 64] tiles of 16 x 64
  } else {
    ap = at::zeros({round_up(M, 32), Kp}, a.options());
    if (K > 0) ap.narrow(0, 0, M).narrow(1, 0, K).copy_(a);
    if (u8) ap.bitwise_xor_(-128);  // u8 view: s8 + 128
  }
  GemmArgs g{tiles ? nullptr : ap.data_ptr<int8_t>(), M, tiles ? round_up(M, 16) : round_up(M, 32), N, Np, Kp,
             packed.data_ptr<int8_t>(), colsum.data_ptr<int32_t>(), nullptr, nullptr, Kp, nullptr,
             out.data_ptr<int32_t>(), N, cpu::OutType::I32, tiles ? ap.data_ptr<int8_t>() : nullptr,
             cpu::amx_prefetch(), K};
  g.a_min = ops::act_min(isa, ap.data_ptr<int8_t>(), ap.numel());
  run_gemm(g, isa);
  return out;
}

Tensor int8_linear(const Tensor& x, const Tensor& packed, const Tensor& colsum,
                   const Tensor& w_scale, const std::optional<Tensor>& bias,
                   const std::optional<Tensor>& x_scale, int64_t N, int64_t K) {
  check_packed(packed, colsum, N, K, "int8_linear");
  ops::check_x(x, K, "int8_linear");
  const auto dt = x.scalar_type();
  const int64_t G = colsum.size(0), Np = packed.size(0) * 16, Kp = packed.size(1) / 16;
  TORCH_CHECK_VALUE(w_scale.scalar_type() == at::kFloat && w_scale.is_contiguous() &&
                        w_scale.dim() == 2 && w_scale.size(0) == G && w_scale.size(1) == Np,
                    "int8_linear: w_scale must be a contiguous float32 tensor of shape [", G, ", ",
                    Np, "], got ", w_scale.scalar_type(), " ", w_scale.sizes());
  ops::check_bias(bias, N, "int8_linear");
  const float static_scale = ops::static_x_scale(x_scale, "int8_linear");
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = N;
  Tensor out = at::empty(out_shape, x.options());
  const int64_t M = x.numel() / std::max<int64_t>(K, 1);
  if (out.numel() == 0) return out;
  if (K == 0) {  // empty reduction: y = bias
    if (bias) out.copy_(bias->expand(out_shape)); else out.zero_();
    return out;
  }
  Tensor x2 = x.reshape({M, K});
  if (x2.stride(1) != 1) x2 = x2.contiguous();
  const Isa isa = cpu::kernel_isa(ops::path(cpu::Op::Int8Linear, {false, 0, M}));
  const bool u8 = isa_wants_u8(isa), tiles = amx_tiles(isa);
  // The AMX tiles kernel: x quantizes straight into tile-packed rows (amx_pack.h), padded to
  // 16 rows. Otherwise row-major [round_up(M, 32)][Kp]: rows past M are zero, as the rows
  // kernel reads whole 32-row passes.
  const int64_t Mp = tiles ? round_up(M, 16) : round_up(M, 32);
  const ops::QuantizedX q = tiles ? ops::quantize_x_tiles(x2, static_scale, Kp, isa)
                                  : ops::quantize_x(x2, static_scale, Mp, Kp, isa, u8);
  int8_t* app = q.a.data_ptr<int8_t>();
  float* asp = q.scale.data_ptr<float>();
  const cpu::OutType ot = ops::out_type(dt);
  GemmArgs g{tiles ? nullptr : app, M, Mp, N, Np, Kp, packed.data_ptr<int8_t>(), colsum.data_ptr<int32_t>(),
             asp, w_scale.data_ptr<float>(), Kp / G,
             bias ? bias->data_ptr<float>() : nullptr, out.data_ptr(), N, ot, tiles ? app : nullptr,
             cpu::amx_prefetch(), K};
  g.a_min = ops::act_min(isa, app, q.a.numel());
  run_gemm(g, isa);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(pysparse, CPU, m) {
  m.impl("int8_pack", &int8_pack);
  m.impl("int8_unpack", &int8_unpack);
  m.impl("int8_mm", &int8_mm);
  m.impl("int8_linear", &int8_linear);
}

}  // namespace pysparse
