"""The contenders: pysparse's layers and the alternatives a user has, each called as its
library's users call it. Conversion happens in ``prepare`` (untimed); ``call`` is the work.

Every peer PERFORMANCE.md (the project's guide to measuring) lists for linear layers is here;
a contender whose library or op is missing says why through ``available()`` and is skipped,
never failed.
"""
from __future__ import annotations

import contextlib
import logging
import warnings
from typing import Any, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn

import pysparse
from pysparse.nn import Int8Linear

from .registry import Case, Contender, KernelOp

ISA_ORDER = ("scalar", "avx2", "avx512", "amx")  # pysparse's CPU paths, lowest first

# Relative-error thresholds against a float64 reference, on N(0, 1) activations and
# N(0, 1/K) weights: fp32 accumulation error is ~1e-6 at K=4096; bf16 rounds inputs to 8
# mantissa bits (~0.4% per element, ~0.3% after summation); int8 with per-row activation and
# per-channel weight scales lands near 1-2%, so 5% flags a wrong kernel, not rounding.
TOL_FP32, TOL_BF16, TOL_INT8 = 1e-3, 2e-2, 5e-2


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence the deprecation notices of torch.ao.quantization, torchao's log lines about CUDA
    libraries it cannot load on a CPU machine and ONNX Runtime's quantizer warnings: noise in a
    benchmark's output."""
    # "" (root): onnxruntime.quantization logs one warning per conv bias on the root logger
    loggers = [logging.getLogger(n) for n in ("torchao", "torch.utils._pytree", "")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)


def make_linear(w: torch.Tensor, b: Optional[torch.Tensor]) -> nn.Linear:
    """An nn.Linear holding ``w`` [N, K] and ``b`` [N] (no grad: benchmarks run inference)."""
    lin = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device=w.device)
    with torch.no_grad():
        lin.weight.copy_(w)
        if b is not None:
            lin.bias.copy_(b)
    return lin.requires_grad_(False)


def _clone_all(state: tuple) -> tuple:
    return tuple(t.clone() if isinstance(t, torch.Tensor) else t for t in state)


def _int8_bytes(c: Case) -> int:
    return c.N * c.K + 8 * c.N  # int8 weight + float32 scale and bias per output


def _quantize_rows_int8(x: torch.Tensor) -> torch.Tensor:
    s = x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-8) / 127.0
    return (x / s).round().clamp(-127, 127).to(torch.int8)


def cpu_isas() -> list[str]:
    """pysparse's CPU paths this machine can run, best first (forced via set_cpu_isa; see timing.env_set)."""
    best = pysparse.cpu_info()["best_isa"]
    return list(reversed(ISA_ORDER[: ISA_ORDER.index(best) + 1]))


# int8_linear's MACs: M x N x K (the logical shape; the kernels also multiply the zero padding
# of N and K to multiples of 64, not counted)
INT8_LINEAR_OP = KernelOp("int8_linear", "int8", macs=lambda m, c: c.M * c.N * c.K)


def pysparse_int8(isa: str) -> Contender:
    """pysparse's Int8Linear (dynamic per-row int8 activations) on one CPU ISA path."""
    return Contender(
        name=f"pysparse-{isa}", role="ours",
        prepare=lambda w, b: Int8Linear.from_float(make_linear(w, b)),
        call=lambda m, x: m(x), weight_bytes=_int8_bytes, env={"PYSPARSE_CPU_ISA": isa},
        state_key="pysparse-int8", tolerance=TOL_INT8, kernel_op=INT8_LINEAR_OP)


def dense(name: str = "fp32", dtype: torch.dtype = torch.float32, device: str = "cpu",
          role: str = "peer") -> Contender:
    """F.linear with weights and activations in ``dtype`` (fp32: MKL; bf16: oneDNN, AMX
    where present; on CUDA, cuBLAS)."""
    def prepare(w: torch.Tensor, b: Optional[torch.Tensor]) -> tuple:
        return (w.to(device, dtype), None if b is None else b.to(device, dtype))

    return Contender(
        name=name, role=role, prepare=prepare, call=lambda s, x: F.linear(x, s[0], s[1]),
        input=lambda x: x.to(device, dtype), weight_bytes=lambda c: c.N * c.K * dtype.itemsize,
        copy=_clone_all, tolerance=TOL_FP32 if dtype == torch.float32 else TOL_BF16, device=device)


def quantize_dynamic() -> Contender:
    """torch.ao.quantization.quantize_dynamic on an nn.Linear (FBGEMM / oneDNN; deprecated,
    still the fastest at small M)."""
    def prepare(w: torch.Tensor, b: Optional[torch.Tensor]) -> nn.Module:
        with quiet():
            return torch.ao.quantization.quantize_dynamic(nn.Sequential(make_linear(w, b)), {nn.Linear},
                                                          dtype=torch.qint8)

    return Contender(name="quantize_dynamic", role="peer", prepare=prepare, call=lambda m, x: m(x),
                     weight_bytes=_int8_bytes, tolerance=TOL_INT8,
                     available=lambda: None if torch.backends.quantized.engine != "none"
                     else "torch has no quantized engine here")


def _ort_missing() -> Optional[str]:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        from onnxruntime.quantization import quantize_dynamic as _  # noqa: F401
    except Exception as e:
        return f"onnxruntime / onnx not importable: {type(e).__name__}: {e}".splitlines()[0]
    return None


def onnxruntime_int8() -> Contender:
    """ONNX Runtime's dynamic int8 quantization of a Linear (onnxruntime.quantization.quantize_dynamic:
    per-tensor int8 weights, DynamicQuantizeLinear + MatMulInteger, MLAS kernels), intra-op threads
    = torch's, spinning off (a spinning pool steals the cores from the next contender in an
    interleaved run). The time includes the numpy hand-off a user of its Python API pays."""
    def prepare(w: torch.Tensor, b: Optional[torch.Tensor]) -> Any:
        import os
        import tempfile

        import numpy as np
        import onnx
        import onnxruntime as ort
        from onnx import TensorProto, helper, numpy_helper
        from onnxruntime.quantization import QuantType, quantize_dynamic

        N, K = w.shape
        nodes = [helper.make_node("MatMul", ["x", "wt"], ["y" if b is None else "mm"])]
        inits = [numpy_helper.from_array(w.t().contiguous().numpy().astype(np.float32), "wt")]
        if b is not None:
            nodes.append(helper.make_node("Add", ["mm", "b"], ["y"]))
            inits.append(numpy_helper.from_array(b.numpy().astype(np.float32), "b"))
        graph = helper.make_graph(nodes, "linear", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", K])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["M", N])], inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        with tempfile.TemporaryDirectory() as d, quiet():
            src, dst = os.path.join(d, "f.onnx"), os.path.join(d, "q.onnx")
            onnx.save(model, src)
            # per-tensor weights (ORT's default): with per_channel=True on a MatMul the output was 15-40%
            # off the float64 reference on this AVX2 machine (1.5% per-tensor), measured at 16x256x512
            quantize_dynamic(src, dst, weight_type=QuantType.QInt8, per_channel=False)
            so = ort.SessionOptions()
            so.intra_op_num_threads = torch.get_num_threads()
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
            so.log_severity_level = 3
            sess = ort.InferenceSession(dst, so, providers=["CPUExecutionProvider"])
        return sess, w, b

    def call(state: Any, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(state[0].run(None, {"x": x.numpy()})[0])

    # a session cannot be deep-copied: the weight-rotation copies (M <= 16) are fresh sessions
    return Contender(name="onnxruntime-int8", role="peer", prepare=prepare, call=call, weight_bytes=_int8_bytes,
                     tolerance=TOL_INT8, available=_ort_missing, copy=lambda st: prepare(st[1], st[2]))


def _torchao_missing() -> Optional[str]:
    try:
        with quiet():
            from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_  # noqa: F401
    except Exception as e:  # ImportError, or a torchao built against another torch
        return f"torchao unavailable ({type(e).__name__}: {e})"
    return None


def torchao_int8(device: str = "cpu") -> Contender:
    """torchao quantize_(m, Int8DynamicActivationInt8WeightConfig()), eager."""
    def prepare(w: torch.Tensor, b: Optional[torch.Tensor]) -> nn.Module:
        with quiet():
            from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_
            m = nn.Sequential(make_linear(w.to(device), None if b is None else b.to(device)))
            quantize_(m, Int8DynamicActivationInt8WeightConfig())
        return m

    return Contender(name="torchao-int8", role="peer", prepare=prepare, call=lambda m, x: m(x),
                     input=lambda x: x.to(device), weight_bytes=_int8_bytes, available=_torchao_missing,
                     tolerance=TOL_INT8, device=device)


def int_mm(device: str = "cpu") -> Contender:
    """torch._int_mm: the bare s8 x s8 -> s32 GEMM on pre-quantized inputs, no scales: a bound
    on what an int8 layer's GEMM can cost, not a layer. It needs M > 16."""
    return Contender(
        name="torch._int_mm", role="bound",
        # w.t(): a [K, N] view of the [N, K] weight, the layout torchao passes (a contiguous
        # [K, N] copy measured 4.5x slower here at M=128).
        prepare=lambda w, b: _quantize_rows_int8(w).to(device),
        call=lambda wq, xq: torch._int_mm(xq, wq.t()), input=lambda x: _quantize_rows_int8(x).to(device),
        weight_bytes=lambda c: c.N * c.K, applies=lambda c: c.M > 16, copy=torch.Tensor.clone, device=device)


def _pysparse_cuda_missing() -> Optional[str]:
    if not torch._C._dispatch_has_kernel_for_dispatch_key("pysparse::int8_linear", "CUDA"):
        return "pysparse has no CUDA kernel for int8_linear registered (needs Triton)"
    return None


def pysparse_int8_cuda() -> Contender:
    """pysparse's Int8Linear on the GPU (its Triton kernel)."""
    return Contender(name="pysparse-triton", role="ours",
                     prepare=lambda w, b: Int8Linear.from_float(make_linear(w, b)).cuda(),
                     call=lambda m, x: m(x), input=lambda x: x.cuda(), weight_bytes=_int8_bytes,
                     available=_pysparse_cuda_missing, tolerance=TOL_INT8, device="cuda")


# ---- sparse ----------------------------------------------------------------------------

BSR_BLOCK = 32    # torch BSR's block, as in W.to_sparse_bsr((32, 32))
PRUNE_BLOCK = 64  # the sparse grid prunes 64 x 64 tiles: a whole number of blocks in every format
                  # timed (torch 32 x 32, pysparse fp32 64 x 32, pysparse int8 64 x 64), so all
                  # contenders store exactly the same nonzeros at exactly the stated density


def torch_sparse(layout: str) -> Contender:
    """F.linear with a torch sparse weight: layout "bsr" (blocks of 32 x 32) or "csr"."""
    def prepare(w: torch.Tensor, b: Optional[torch.Tensor]) -> tuple:
        with quiet():  # "sparse BSR/CSR support is in beta" on every conversion
            ws = w.to_sparse_bsr((BSR_BLOCK, BSR_BLOCK)) if layout == "bsr" else w.to_sparse_csr()
        return ws, b

    # Bytes: the kept values (density x 4NK) plus int64 column indices, one per block (BSR)
    # or per element (CSR).
    per_value = 4 + (8 / BSR_BLOCK ** 2 if layout == "bsr" else 8)
    return Contender(
        name=f"torch-{layout}", role="peer", prepare=prepare, call=lambda s, x: F.linear(x, s[0], s[1]),
        weight_bytes=lambda c: int(c.density * c.N * c.K * per_value), copy=_clone_all,
        applies=lambda c: layout != "bsr" or (c.N % BSR_BLOCK == 0 and c.K % BSR_BLOCK == 0),
        tolerance=TOL_FP32)


def _pysparse_bsr_missing(op: str) -> Optional[str]:
    if not hasattr(torch.ops.pysparse, op):
        return f"torch.ops.pysparse has no {op} op in this build"
    if not hasattr(pysparse.nn, "BlockSparseLinear"):
        return "pysparse.nn has no BlockSparseLinear"
    return None


def pysparse_bsr(dtype: Optional[torch.dtype] = None) -> Contender:
    """pysparse's BlockSparseLinear with fp32 blocks (dtype None; its default 64 x 32), bf16
    blocks (64 x 32; x rounded to bf16) or int8 blocks (64 x 64, dynamic per-row int8
    activations). dispatch="sparse": the sparse kernel itself, not the dense layer that
    "auto" keeps where sparsity does not pay."""
    def prepare(w: torch.Tensor, b: Optional[torch.Tensor]) -> Any:
        return pysparse.nn.BlockSparseLinear.from_dense(make_linear(w, b), dtype=dtype, dispatch="sparse")

    int8 = dtype == torch.int8
    op = "bsr_int8_linear" if int8 else "bsr_linear"
    suffix = {torch.int8: "-int8", torch.bfloat16: "-bf16"}.get(dtype, "")
    nbytes = {torch.int8: 1, torch.bfloat16: 2}.get(dtype, 4)
    tol = {torch.int8: TOL_INT8, torch.bfloat16: TOL_BF16}.get(dtype, TOL_FP32)
    # MACs of the stored blocks only (edge blocks counted whole): M x nnz_blocks x bn x bk
    kop = KernelOp(op, {torch.int8: "int8", torch.bfloat16: "bf16"}.get(dtype, "fp32"),
                   macs=lambda m, c: c.M * m.config.nnz_blocks * m.block[0] * m.block[1],
                   facts=lambda m: {} if int8 else {"dtype": dtype or torch.float32, "block": m.block})
    return Contender(name="pysparse-bsr" + suffix, role="ours", prepare=prepare,
                     call=lambda m, x: m(x), weight_bytes=lambda c: int(c.density * c.N * c.K * nbytes),
                     available=lambda: _pysparse_bsr_missing(op), tolerance=tol, kernel_op=kop)


def _train_step(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """One fine-tuning step's compute: forward, then backward to the input, weights and bias."""
    with torch.enable_grad():  # the runner times under no_grad
        m.zero_grad(set_to_none=True)
        x.grad = None
        y = m(x)
        y.backward(torch.ones_like(y))
    return y.detach()


def train_step(name: str, sparse: bool) -> Contender:
    """Forward + backward of a layer with trainable fp32 weights: pysparse's BlockSparseLinear
    (fixed pattern, gradients to the stored blocks only) or the dense nn.Linear of the same
    pruned weight (what fine-tuning a masked model costs without a sparse format)."""
    def prepare(w: torch.Tensor, b: Optional[torch.Tensor]) -> nn.Module:
        lin = make_linear(w, b)
        return pysparse.nn.BlockSparseLinear.from_dense(lin, dispatch="sparse") if sparse else lin

    return Contender(name=name, role="ours" if sparse else "peer", prepare=prepare, call=_train_step,
                     input=lambda x: x.clone().requires_grad_(True),
                     weight_bytes=lambda c: int((c.density if sparse else 1.0) * c.N * c.K * 4),
                     available=(lambda: _pysparse_bsr_missing("bsr_linear_grad_values")) if sparse else (lambda: None),
                     tolerance=TOL_FP32)
