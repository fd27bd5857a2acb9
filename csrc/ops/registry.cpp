// The pysparse op registry: every op's schema, in one place. CPU kernels register in
// csrc/ops/<op>.cpp; fake (meta) kernels and the CUDA/Triton kernels register from
// Python (pysparse/ops.py). The pybind module only reports CPU features.
#include <torch/extension.h>
#include <torch/library.h>

#include "../cpu/int8_linear.h"

TORCH_LIBRARY(pysparse, m) {
  // Pack int8 weights w [N, K] once into the kernels' tile layout; returns (packed, colsum).
  m.def("int8_pack(Tensor w, int group_size=0) -> (Tensor, Tensor)");
  m.def("int8_unpack(Tensor packed, Tensor colsum, int N, int K) -> Tensor");
  // Raw int8 GEMM a [M, K] x w^T -> int32 [M, N], exact.
  m.def("int8_mm(Tensor a, Tensor packed, Tensor colsum, int N, int K) -> Tensor");
  // y = dequant(quant(x) @ w^T) * scales + bias in x's dtype; x_scale=None: dynamic per row.
  m.def(
      "int8_linear(Tensor x, Tensor packed, Tensor colsum, Tensor w_scale, Tensor? bias, "
      "Tensor? x_scale, int N, int K) -> Tensor");
  // Block-sparse (BSR) linear: y = x @ W^T + bias (ReLU fused); values float32 [nnzb, bk, bn]
  // or bfloat16 [nnzb, bk/2, bn, 2] on the CPU (float32/float16/bfloat16 [nnzb, bk, bn] on CUDA).
  m.def(
      "bsr_linear(Tensor x, Tensor values, Tensor row_ptr, Tensor col_idx, Tensor? bias, int N, int K, "
      "bool relu=False) -> Tensor");
  // bsr_linear's backward pieces (fixed pattern): grad_x = grad @ W through the kernel on
  // W^T (float32 [M, K]); the gradient of each stored block, in values' layout and dtype.
  m.def("bsr_linear_grad_x(Tensor grad, Tensor values, Tensor row_ptr, Tensor col_idx, int N, int K) -> Tensor");
  m.def(
      "bsr_linear_grad_values(Tensor grad, Tensor x, Tensor values, Tensor row_ptr, Tensor col_idx, int N, "
      "int K) -> Tensor");
  // Block-sparse int8: 64x64 blocks in the int8 packed layout [nnzb, 4096], per-channel scales.
  m.def(
      "bsr_int8_linear(Tensor x, Tensor values, Tensor row_ptr, Tensor col_idx, Tensor colsum, "
      "Tensor w_scale, Tensor? bias, Tensor? x_scale, int N, int K, bool relu=False) -> Tensor");
  // Int8 Conv2d, NHWC (csrc/ops/int8_conv2d.cpp): w int8 [Cout, Cin/groups, kh, kw] packed once
  // (per group, int8_pack's layout of the [Cout/groups, kh*kw*Cin/groups] GEMM weight;
  // depthwise: [kh*kw, C]); y channels_last float32 = act(dequant(conv(quant(x), w)) + bias),
  // x_scale=None: one dynamic scale per image; activation 'none' | 'relu' | 'relu6'; out_scale:
  // int8 output requantized with it; an int8 x (quantized with x_scale) skips quantization.
  m.def("int8_conv2d_pack(Tensor w, int groups=1) -> (Tensor, Tensor)");
  m.def(
      "int8_conv2d(Tensor x, Tensor packed, Tensor colsum, Tensor w_scale, Tensor? bias, Tensor? x_scale, "
      "int[2] kernel_size, int[2] stride, int[2] padding, int[2] dilation, int groups, int in_channels, "
      "int out_channels, str activation='none', float? out_scale=None) -> Tensor");
}

namespace {
pybind11::dict cpu_features_dict() {
  using namespace pysparse::cpu;
  const CpuFeatures& f = cpu_features();
  pybind11::dict d;
  d["avx2"] = f.avx2;
  d["fma"] = f.fma;
  d["f16c"] = f.f16c;
  d["avx512f"] = f.avx512f;
  d["avx512bw"] = f.avx512bw;
  d["avx512vl"] = f.avx512vl;
  d["avx512_vnni"] = f.avx512_vnni;
  d["avx512_bf16"] = f.avx512_bf16;
  d["amx_tile"] = f.amx_tile;
  d["amx_int8"] = f.amx_int8;
  d["amx_bf16"] = f.amx_bf16;
  d["amx_os_permission"] = f.amx_os_permission;
  d["best_isa"] = isa_name(best_isa());
  try {
    d["bf16_dot"] = bf16_dot_enabled();
    d["bf16_dot_speedup"] = bf16_dot_speedup_cached();
  } catch (const std::exception& e) {
    throw pybind11::value_error(e.what());
  }
  return d;
}
std::string selected_isa_name() {
  try {
    return pysparse::cpu::isa_name(pysparse::cpu::selected_isa());
  } catch (const std::exception& e) {
    throw pybind11::value_error(e.what());
  }
}
}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("cpu_features", &cpu_features_dict, "CPU features found by CPUID/XGETBV/arch_prctl");
  m.def("selected_isa", &selected_isa_name, "ISA path the int8 kernels use now");
}
