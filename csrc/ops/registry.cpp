// The pysparse op registry: every op's schema, in one place. CPU kernels register in
// csrc/ops/<op>.cpp; fake (meta) kernels and the CUDA/Triton kernels register from
// Python (pysparse/ops.py). The pybind module reports CPU features and holds the CPU
// dispatch policy's switches (csrc/cpu/dispatch.h).
#include <torch/extension.h>
#include <torch/library.h>

#include <stdexcept>
#include <string>

#include "../cpu/cpu_features.h"
#include "../cpu/dispatch.h"
#include "../cpu/peak.h"

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
  // Compacted convolution (groups=1), float32, NHWC: reads input channels in_idx of x, writes
  // output channels out_idx of a full-width [N, out_channels, Ho, Wo] channels_last output
  // (others 0, or residual + conv), ReLU on all channels after the add; weight packed
  // [ceil(Cout/16), kh, kw, Cin_kept, 16] (pysparse/ops_conv.py). Inference only.
  m.def(
      "compact_conv2d(Tensor x, Tensor weight, Tensor? bias, Tensor in_idx, Tensor out_idx, int[2] stride, "
      "int[2] padding, int[2] dilation, int out_channels, Tensor? residual=None, bool relu=False) -> Tensor");
  // Int8 Conv2d, NHWC (csrc/ops/int8_conv2d.cpp): w int8 [Cout, Cin/groups, kh, kw] packed once
  // (per group, int8_pack's layout of the [Cout/groups, kh*kw*Cin/groups] GEMM weight;
  // depthwise: [kh*kw, C]); y channels_last float32 = act(dequant(conv(quant(x), w)) + bias),
  // x_scale=None: one dynamic scale per image; activation 'none' | 'relu' | 'relu6'; out_scale:
  // int8 output requantized with it; an int8 x (quantized with x_scale) skips quantization;
  // residual (float32, the output's shape; not depthwise): added before the activation,
  // y = act(conv + bias + residual).
  m.def("int8_conv2d_pack(Tensor w, int groups=1) -> (Tensor, Tensor)");
  m.def(
      "int8_conv2d(Tensor x, Tensor packed, Tensor colsum, Tensor w_scale, Tensor? bias, Tensor? x_scale, "
      "int[2] kernel_size, int[2] stride, int[2] padding, int[2] dilation, int groups, int in_channels, "
      "int out_channels, str activation='none', float? out_scale=None, Tensor? residual=None) -> Tensor");
}

namespace {
namespace py = pybind11;
using namespace pysparse::cpu;

// Runs a policy call, turning std::invalid_argument (a bad name or environment value)
// into Python's ValueError.
template <class F>
auto value_errors(F&& f) {
  try {
    return f();
  } catch (const std::invalid_argument& e) {
    throw py::value_error(e.what());
  }
}

py::dict cpu_features_dict() {
  const CpuFeatures& f = cpu_features();
  py::dict d;
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
  const Policy p = value_errors(policy_now);
  d["bf16_dot"] = bf16_dot_enabled(p);
  d["bf16_dot_speedup"] = bf16_dot_speedup_measured();
  // how the bf16 kernel family was chosen: forced (set_cpu_bf16 / PYSPARSE_CPU_BF16),
  // measured (bf16_dot_speedup at load), or unavailable (no AVX512-BF16 at the selected ISA:
  // always the widening kernels)
  d["bf16_dot_choice"] = bf16_choice_forced(p) ? "forced"
                         : (f.avx512_bf16 && selected_isa(p) >= Isa::Avx512) ? "measured"
                                                                               : "unavailable";
  // The AMX shape rule and knobs, fixed at load (csrc/cpu/dispatch.h): below amx_min_rows rows
  // of x int8_linear / int8_mm run the VNNI kernel on an AMX machine, below amx_bsr_min_rows
  // bsr_int8_linear does; kernel_for(op, M=...) says which path a given M takes.
  d["amx_min_rows"] = amx_min_rows(Op::Int8Linear);
  d["amx_bsr_min_rows"] = amx_min_rows(Op::BsrInt8Linear);
  d["amx_gemm"] = amx_gemm_name(amx_gemm_variant());
  d["amx_prefetch"] = amx_prefetch();  // -1: the kernels' default
  return d;
}

std::string selected_isa_name() { return isa_name(selected_isa(value_errors(policy_now))); }

// best_isa: a test hook; None asks for this CPU, a name evaluates the rule as if it were this
// CPU's best ISA (only the ISA level: the bf16 features stay this CPU's), so the AMX shape rule
// is testable on a machine without AMX. Never used to run anything.
std::string kernel_path_name(const std::string& op, bool bf16, int64_t bk, int64_t M, const py::object& best) {
  Op o;
  if (!parse_op(op.c_str(), &o))
    throw py::value_error("kernel_path: op must be one of int8_linear, int8_mm, bsr_linear, bsr_linear_grad_x, "
                          "bsr_linear_grad_values, bsr_int8_linear; got '" + op + "'");
  const Policy p = value_errors(policy_now);
  if (best.is_none()) return kernel_name(kernel_path(o, OpShape{bf16, bk, M}, p));
  const std::string b = py::str(best);
  const Isa isa = Isa(value_errors([&] { return parse_isa(b.c_str(), "kernel_path: best_isa"); }));
  return kernel_name(kernel_path_for(o, OpShape{bf16, bk, M}, p, isa));
}

py::object cap_name(int cap) { return cap < 0 ? py::object(py::none()) : py::object(py::str(isa_name(Isa(cap)))); }

// name: "amx" / "avx512" / "avx2" / "scalar" caps the path, None removes the cap.
py::object set_cpu_isa(const py::object& name) {
  int cap = -1;
  if (!name.is_none()) {
    if (!py::isinstance<py::str>(name))
      throw py::type_error("set_cpu_isa: name must be a str or None, got " +
                           std::string(py::str(py::type::handle_of(name).attr("__name__"))));
    const std::string s = name.cast<std::string>();
    cap = value_errors([&] { return parse_isa(s.c_str(), "set_cpu_isa: name"); });
  }
  return cap_name(value_errors([&] { return set_isa_cap(cap); }));
}

py::object cpu_isa_cap() { return cap_name(value_errors(policy_now).isa_cap); }

py::object bf16_mode_obj(int mode) { return mode < 0 ? py::object(py::none()) : py::object(py::bool_(mode == 1)); }

// mode: True (VDPBF16PS where the CPU has it), False (widen to fp32), None (measured).
py::object set_cpu_bf16(const py::object& mode) {
  int m = -1;
  if (!mode.is_none()) {
    if (!py::isinstance<py::bool_>(mode))
      throw py::type_error("set_cpu_bf16: mode must be True, False or None, got " + std::string(py::repr(mode)));
    m = mode.cast<bool>() ? 1 : 0;
  }
  return bf16_mode_obj(value_errors([&] { return set_bf16_mode(m); }));
}

py::object cpu_bf16_mode() { return bf16_mode_obj(value_errors(policy_now).bf16); }
}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // The environment is read here, once, when pysparse loads: a bad PYSPARSE_CPU_ISA or
  // PYSPARSE_CPU_BF16 fails the import with a ValueError naming the variable.
  value_errors([] {
    init_policy();
    return 0;
  });
  m.def("cpu_features", &cpu_features_dict, "CPU features found by CPUID/XGETBV/arch_prctl, and the bf16 choice");
  m.def("selected_isa", &selected_isa_name, "ISA path the int8 kernels use now (best_isa capped by set_cpu_isa)");
  m.def("kernel_path", &kernel_path_name, py::arg("op"), py::arg("bf16") = false, py::arg("bk") = 0,
        py::arg("M") = -1, py::arg("best_isa") = py::none(),
        "The CPU kernel the dispatch policy picks for op with these call facts (best_isa: test hook)");
  m.def("set_cpu_isa", &set_cpu_isa, py::arg("name"), "Cap the CPU path; returns the previous cap");
  m.def("cpu_isa_cap", &cpu_isa_cap, "The current cap (None: none)");
  m.def("set_cpu_bf16", &set_cpu_bf16, py::arg("mode"), "Force (True/False) or measure (None) the bf16 choice");
  m.def("cpu_bf16_mode", &cpu_bf16_mode, "The current bf16 mode (None: measured)");
  // Register-only instruction peaks (csrc/cpu/peak.h), for the benchmark harness
  // (pysparse/bench/peak.py): hardware figures, not ops, so no schema.
  m.def(
      "peak_instructions",
      [] {
        py::list out;
        for (int i = 0; i < kNumPeakInstrs; ++i) {
          const PeakInstr& p = peak_instr(i);
          py::dict d;
          d["name"] = p.name;
          d["instruction"] = p.instruction;
          d["kind"] = p.kind;
          d["macs_per_instruction"] = p.macs_per_instr;
          d["available"] = peak_available(i);
          out.append(d);
        }
        return out;
      },
      "The register-only peak loops: name, instruction, kind (int8/bf16/fp32), MACs per instruction, "
      "whether this CPU (and OS) runs it");
  m.def(
      "measure_peak",
      [](const std::string& name, int threads, double target_ms, int reps) {
        int idx = -1;
        for (int i = 0; i < kNumPeakInstrs; ++i)
          if (name == peak_instr(i).name) idx = i;
        if (idx < 0) throw py::value_error("measure_peak: no peak loop named '" + name + "'");
        const PeakRun r = value_errors([&] {
          py::gil_scoped_release nogil;  // seconds of loops on other threads
          return measure_peak(idx, threads, target_ms, reps);
        });
        py::dict d;
        d["name"] = name;
        d["threads"] = r.threads;
        d["iters"] = r.iters;
        d["macs_per_thread"] = r.macs_per_thread;
        py::list wall, slow, fast;
        for (int k = 0; k < r.reps; ++k) {
          wall.append(r.wall_s[k]);
          slow.append(r.slowest_s[k]);
          fast.append(r.fastest_s[k]);
        }
        d["wall_s"] = wall;
        d["slowest_thread_s"] = slow;
        d["fastest_thread_s"] = fast;
        return d;
      },
      py::arg("name"), py::arg("threads"), py::arg("target_ms") = 30.0, py::arg("reps") = 3,
      "Run one peak loop on `threads` threads at once, each about target_ms, reps times; the times");
}
