"""pysparse's op registry on the Python side.

Schemas live in csrc/ops/registry.cpp (the `pysparse` torch.library namespace) and the
CPU kernels register from C++. Here: the fake (meta) kernels that let
torch.compile(fullgraph=True) and torch.export trace through the ops, and the CUDA
kernels (Triton), which register only when CUDA and Triton are present.

Callers use ``torch.ops.pysparse.<op>``; the thin functions below only add type hints.

The CPU dispatch policy (which kernel each op runs) is one function in C++
(csrc/cpu/dispatch.h); ``kernel_for`` asks it, and ``set_cpu_isa`` / ``set_cpu_bf16``
(with the context managers ``cpu_isa`` / ``cpu_bf16``) change its switches at run time.
The environment (PYSPARSE_CPU_ISA, PYSPARSE_CPU_BF16) is read once, when pysparse loads.
"""
from __future__ import annotations

import contextlib
import math
from typing import Iterator, Optional, Union

import torch
from torch._subclasses.fake_tensor import FakeTensor

from . import _C  # noqa: F401  (loads the library: schemas + CPU kernels)
from . import _cuda_ops  # noqa: F401  (Triton kernels for CUDA tensors; registers only)
from . import _cuda_bsr  # noqa: F401
from .formats import PACK_K, PACK_N, BsrLayout, bsr_f32_to_dense, int8_blocks_kn
from .formats import round_up as _round_up


def packed_k(K: int, group_size: int) -> int:
    """K after padding: to the scale group (if any), else to PACK_K; at least one group."""
    g = group_size or PACK_K
    return max(_round_up(K, g), g)


def _no_meta_beside_real(op: str, **tensors: Optional[torch.Tensor]) -> None:
    """Refuse a call that reached a fake kernel only because one tensor is on the meta device.

    The dispatcher picks the Meta kernel when any argument is a meta tensor, so a meta bias
    beside CPU weights would get the fake's uninitialised output. Under FakeTensorMode
    (torch.compile, torch.export) and for all-meta calls the fake is what is wanted.
    RuntimeError, as torch's own "Expected all tensors to be on the same device".
    """
    ts = {n: t for n, t in tensors.items() if isinstance(t, torch.Tensor)}
    if any(isinstance(t, FakeTensor) for t in ts.values()):
        return
    meta = [n for n, t in ts.items() if t.device.type == "meta"]
    real = [(n, t.device) for n, t in ts.items() if t.device.type != "meta"]
    if meta and real:
        raise RuntimeError(f"{op}: {', '.join(meta)} {'is' if len(meta) == 1 else 'are'} on the meta device (no data) "
                         f"while {real[0][0]} is on {real[0][1]}; all tensors must be on one device "
                         f"(move {meta[0]} to {real[0][1]}, or everything to meta for shape-only runs)")


def _same_device(op: str, **tensors: torch.Tensor) -> None:
    # Under FakeTensorMode the devices are the real ones; under plain meta dispatch (a
    # meta input against CPU weights) this is the only place a mismatch can be caught.
    devs = {n: t.device for n, t in tensors.items()}
    first = next(iter(devs.values()))
    torch._check(all(d == first for d in devs.values()),
                 lambda: f"{op}: all tensors must be on one device, got {devs}")


@torch.library.register_fake("pysparse::int8_pack")
def _int8_pack_fake(w: torch.Tensor, group_size: int = 0):
    N, K = w.shape  # one tensor: no meta-beside-real case
    Np, Kp = _round_up(N, PACK_N), packed_k(K, group_size)
    G = Kp // group_size if group_size else 1
    if w.device.type == "cuda":  # the Triton kernel reads [N, K] (per group: [N, Kp]) as is
        shape = (N, Kp if group_size else K)
    else:  # the CPU tile layout (csrc/cpu/int8_linear.h)
        shape = (Np // 16, Kp * 16)
    return w.new_empty(shape, dtype=torch.int8), w.new_empty((G, Np), dtype=torch.int32)


@torch.library.register_fake("pysparse::int8_unpack")
def _int8_unpack_fake(packed, colsum, N: int, K: int):
    _no_meta_beside_real("int8_unpack", packed=packed, colsum=colsum)
    return packed.new_empty((N, K), dtype=torch.int8)


@torch.library.register_fake("pysparse::int8_mm")
def _int8_mm_fake(a, packed, colsum, N: int, K: int):
    _no_meta_beside_real("int8_mm", a=a, packed=packed, colsum=colsum)
    _same_device("int8_mm", a=a, packed=packed)
    torch._check(a.dtype == torch.int8, lambda: f"int8_mm: a must be int8, got {a.dtype}")
    torch._check(a.dim() == 2 and a.shape[1] == K, lambda: f"int8_mm: a must be [M, {K}]")
    return a.new_empty((a.shape[0], N), dtype=torch.int32)


@torch.library.register_fake("pysparse::int8_linear")
def _int8_linear_fake(x, packed, colsum, w_scale, bias, x_scale, N: int, K: int):
    _no_meta_beside_real("int8_linear", x=x, packed=packed, colsum=colsum, w_scale=w_scale, bias=bias,
                         x_scale=x_scale)
    _same_device("int8_linear", x=x, packed=packed, w_scale=w_scale)
    torch._check(x.dtype in (torch.float32, torch.bfloat16, torch.float16),
                 lambda: f"int8_linear: x must be float32, bfloat16 or float16, got {x.dtype}")
    torch._check(x.dim() >= 1 and x.shape[-1] == K,
                 lambda: f"int8_linear: x must have last dimension in_features={K}")
    return x.new_empty((*x.shape[:-1], N))


def int8_pack(w: torch.Tensor, group_size: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Pack int8 weights ``w`` [N, K] into the kernels' layout: returns (packed, colsum).

    group_size=0 packs for one scale per output channel; a positive multiple of 64 packs
    for one scale per group of that many K. K and N are padded inside (zeros).
    """
    return torch.ops.pysparse.int8_pack(w, group_size)


def int8_mm(a: torch.Tensor, packed: torch.Tensor, colsum: torch.Tensor, N: int, K: int) -> torch.Tensor:
    """Exact int8 GEMM: a [M, K] int8 times the packed weight's transpose -> int32 [M, N]."""
    return torch.ops.pysparse.int8_mm(a, packed, colsum, N, K)


def int8_linear(x: torch.Tensor, packed: torch.Tensor, colsum: torch.Tensor, w_scale: torch.Tensor,
                bias: Optional[torch.Tensor], x_scale: Optional[torch.Tensor], N: int, K: int) -> torch.Tensor:
    """Quantized linear: int8(x) @ int8(w)^T, dequantized, plus bias, in x's dtype.

    x [..., K] float32/bfloat16/float16; w_scale float32 [groups, round_up(N, 64)];
    x_scale None quantizes each row of x dynamically, else a one-element static scale.
    """
    return torch.ops.pysparse.int8_linear(x, packed, colsum, w_scale, bias, x_scale, N, K)


def int8_dequantized_weight(packed: torch.Tensor, colsum: torch.Tensor, w_scale: torch.Tensor, N: int,
                            K: int) -> torch.Tensor:
    """The weight int8_linear multiplies by, as float32 [N, K]: int8_unpack * w_scale.

    w_scale [G, round_up(N, 64)] (G scale groups along K; the group size follows from the
    packed K: CPU layout [Np/16, Kp*16], CUDA [N, Kp] when grouped).
    """
    q = torch.ops.pysparse.int8_unpack(packed, colsum, N, K)
    G = w_scale.shape[0]
    Kp = packed.shape[1] if packed.device.type == "cuda" else packed.shape[1] // 16
    gk = max(Kp // G, 1) if G > 1 else max(K, 1)
    s = w_scale[:, :N].T.float().repeat_interleave(gk, dim=1)[:, :K]
    return q.float() * s


def _rows(shape: torch.Size) -> int:
    return math.prod(shape[:-1])  # not numel // last: layers with N = 0 or K = 0 have rows too


def _int8_linear_setup_context(ctx, inputs, output):
    x, packed, colsum, w_scale, bias, x_scale, N, K = inputs
    ctx.save_for_backward(packed, colsum, w_scale)
    ctx.N, ctx.K, ctx.x_shape, ctx.x_dtype, ctx.has_bias = N, K, x.shape, x.dtype, bias is not None


# Gradients of the int8 linears: to x by the straight-through estimator through the
# activation quantization (d round(x / s) * s / dx taken as 1, as QAT does), so
# grad_x = grad_y @ W with W the dequantized int8 weight the forward multiplied; to the
# bias exactly. The int8 weight and its scales are frozen (no gradient): fine-tune a float
# copy and re-quantize to train them.
def _int8_linear_backward(ctx, grad):
    packed, colsum, w_scale = ctx.saved_tensors
    g2 = grad.reshape(_rows(ctx.x_shape), ctx.N).float()
    gx = gb = None
    if ctx.needs_input_grad[0]:
        w = int8_dequantized_weight(packed, colsum, w_scale, ctx.N, ctx.K)
        gx = (g2 @ w).to(ctx.x_dtype).reshape(ctx.x_shape)
    if ctx.has_bias and ctx.needs_input_grad[4]:
        gb = g2.sum(0)
    return gx, None, None, None, gb, None, None, None


torch.library.register_autograd("pysparse::int8_linear", _int8_linear_backward,
                                setup_context=_int8_linear_setup_context)


_CPU_ISAS = ("amx", "avx512", "avx2", "scalar")


def kernel_for(device: Union[torch.device, str], op: str = "int8_linear", *, dtype: Optional[torch.dtype] = None,
               block: Optional[tuple[int, int]] = None, M: Optional[int] = None) -> str:
    """Which kernel ``op`` runs on ``device`` now, for a call with these facts.

    On the CPU this asks the dispatch policy the ops themselves use (csrc/cpu/dispatch.h),
    so the answer is what runs: e.g. "cpu-avx512", "cpu-amx", "cpu-avx512bf16",
    "cpu-avx2-widen" (bf16 blocks widened to fp32), "cpu-aten". It follows set_cpu_isa /
    set_cpu_bf16 (and the environment read at import).

    op: int8_linear (default), int8_mm, bsr_linear, bsr_linear_grad_x, bsr_linear_grad_values,
    bsr_int8_linear. dtype: the blocks' dtype for the bsr_linear ops (float32 or bfloat16).
    block: (bn, bk) of float blocks (AMX-BF16 takes bk 32 or 64; grad_x's kernel bk 16/32/64).
    M: rows of x. Facts left None give the choice for a typical call. On CUDA: "triton";
    on other devices "none". Raises ValueError for an unknown op or dtype.
    """
    device = torch.device(device)
    if dtype not in (None, torch.float32, torch.bfloat16):
        raise ValueError(f"kernel_for: dtype must be None, torch.float32 or torch.bfloat16 (the float blocks of "
                         f"the bsr_linear ops), got {dtype}")
    if block is not None and (len(block) != 2 or int(block[1]) < 1):
        raise ValueError(f"kernel_for: block must be (bn, bk) with bk >= 1, got {block!r}")
    # asked on every device: it validates op
    cpu = _C.kernel_path(op, bf16=dtype == torch.bfloat16, bk=int(block[1]) if block else 0,
                         M=-1 if M is None else int(M))
    if device.type == "cpu":
        return cpu
    if device.type == "cuda":
        return "triton"
    return "none"


def set_cpu_isa(name: Optional[str]) -> Optional[str]:
    """Cap the CPU kernels' ISA path at ``name`` ("amx", "avx512", "avx2", "scalar"), or remove
    the cap (None); returns the previous cap. A cap above what the CPU has runs the best it
    has. Takes effect for the next call in every thread (one atomic switch: a call already
    running keeps its path). The environment's PYSPARSE_CPU_ISA sets the cap at import.
    Raises ValueError naming ``name`` for anything else.
    """
    return _C.set_cpu_isa(name)


@contextlib.contextmanager
def cpu_isa(name: Optional[str]) -> Iterator[None]:
    """``with pysparse.cpu_isa("avx2"):`` run the block with the CPU path capped, then restore."""
    prev = set_cpu_isa(name)
    try:
        yield
    finally:
        set_cpu_isa(prev)


def set_cpu_bf16(mode: Optional[bool]) -> Optional[bool]:
    """How bf16 blocks multiply on the CPU: True VDPBF16PS (where the CPU has AVX512-BF16),
    False widen to fp32 (also keeps AMX-BF16 off), None the choice measured at import
    (bf16_dot_speedup >= 1.25). Returns the previous mode. The two round differently, so a
    forced mode (or PYSPARSE_CPU_BF16=0|1 in the environment) makes bf16 outputs the same
    across processes and machines with AVX512-BF16. Raises TypeError for anything else.
    """
    return _C.set_cpu_bf16(mode)


@contextlib.contextmanager
def cpu_bf16(mode: Optional[bool]) -> Iterator[None]:
    """``with pysparse.cpu_bf16(False):`` run the block with the bf16 mode set, then restore."""
    prev = set_cpu_bf16(mode)
    try:
        yield
    finally:
        set_cpu_bf16(prev)


# ------------------------------------------------------------------ block-sparse
@torch.library.register_fake("pysparse::bsr_linear")
def _bsr_linear_fake(x, values, row_ptr, col_idx, bias, N: int, K: int, relu: bool = False):
    _no_meta_beside_real("bsr_linear", x=x, values=values, row_ptr=row_ptr, col_idx=col_idx, bias=bias)
    _same_device("bsr_linear", x=x, values=values)
    torch._check(x.dim() >= 1 and x.shape[-1] == K, lambda: f"bsr_linear: x must have last dimension {K}")
    return x.new_empty((*x.shape[:-1], N))


@torch.library.register_fake("pysparse::bsr_int8_linear")
def _bsr_int8_linear_fake(x, values, row_ptr, col_idx, colsum, w_scale, bias, x_scale, N: int, K: int,
                          relu: bool = False):
    _no_meta_beside_real("bsr_int8_linear", x=x, values=values, row_ptr=row_ptr, col_idx=col_idx, colsum=colsum,
                         w_scale=w_scale, bias=bias, x_scale=x_scale)
    _same_device("bsr_int8_linear", x=x, values=values)
    torch._check(x.dim() >= 1 and x.shape[-1] == K, lambda: f"bsr_int8_linear: x must have last dimension {K}")
    return x.new_empty((*x.shape[:-1], N))


def bsr_int8_dequantized_weight(values: torch.Tensor, row_ptr: torch.Tensor, col_idx: torch.Tensor,
                                w_scale: torch.Tensor, N: int, K: int) -> torch.Tensor:
    """The weight bsr_int8_linear multiplies by, as float32 [N, K] (zeros where no block).

    values: int8 blocks in the CPU layout [nnzb, 4096] or K-major [nnzb, 64 n, 64 k] (CUDA);
    w_scale [1, round_up(N, 64)].
    """
    vk = int8_blocks_kn(values)
    bn, bk = 64, 64  # formats.INT8_BLOCK
    w = bsr_f32_to_dense(vk.float(), BsrLayout(N, K, bn, bk, row_ptr, col_idx))
    return w * w_scale[0, :N, None].float()


def _bsr_int8_setup_context(ctx, inputs, output):
    x, values, row_ptr, col_idx, colsum, w_scale, bias, x_scale, N, K, relu = inputs
    ctx.save_for_backward(values, row_ptr, col_idx, w_scale, output if relu else None)
    ctx.N, ctx.K, ctx.relu, ctx.x_shape, ctx.x_dtype = N, K, relu, x.shape, x.dtype
    ctx.has_bias = bias is not None


def _bsr_int8_backward(ctx, grad):
    # as _int8_linear_backward: straight-through to x, exact to the bias, the blocks frozen
    values, row_ptr, col_idx, w_scale, out = ctx.saved_tensors
    if ctx.relu:
        grad = grad * (out > 0).to(grad.dtype)
    g2 = grad.reshape(_rows(ctx.x_shape), ctx.N).float()
    gx = gb = None
    if ctx.needs_input_grad[0]:
        w = bsr_int8_dequantized_weight(values, row_ptr, col_idx, w_scale, ctx.N, ctx.K)
        gx = (g2 @ w).to(ctx.x_dtype).reshape(ctx.x_shape)
    if ctx.has_bias and ctx.needs_input_grad[6]:
        gb = g2.sum(0)
    return gx, None, None, None, None, None, gb, None, None, None, None


torch.library.register_autograd("pysparse::bsr_int8_linear", _bsr_int8_backward,
                                setup_context=_bsr_int8_setup_context)


def _bsr_block(values: torch.Tensor) -> tuple[int, int]:
    """(bn, bk) of float blocks: k-major [nnzb, bk, bn] or bf16 input pairs [nnzb, bk/2, bn, 2]."""
    return (values.shape[2], values.shape[1] * 2) if values.dim() == 4 else (values.shape[2], values.shape[1])


def _bsr_dense_weight(values, row_ptr, col_idx, N: int, K: int) -> torch.Tensor:
    return bsr_f32_to_dense(values, BsrLayout(N, K, *_bsr_block(values), row_ptr, col_idx))


def _bsr_setup_context(ctx, inputs, output):
    x, values, row_ptr, col_idx, bias, N, K, relu = inputs
    ctx.save_for_backward(x, values, row_ptr, col_idx, output if relu else None)
    ctx.N, ctx.K, ctx.relu, ctx.has_bias = N, K, relu, bias is not None


def _bsr_kmajor_f32(values: torch.Tensor) -> torch.Tensor:
    """Float blocks as fp32 k-major [nnzb, bk, bn] (from either layout)."""
    if values.dim() == 4:
        from .formats import bf16_pairs_to_kmajor
        values = bf16_pairs_to_kmajor(values)
    return values.float()


# The CPU kernels of both backward ops register from C++ (csrc/ops/bsr_linear.cpp: grad_x
# through the forward kernel on W^T, grad of the blocks one register-tiled pass per block);
# these composites serve the other devices (CUDA), with dense and per-block-row PyTorch ops.
@torch.library.impl("pysparse::bsr_linear_grad_x", "CompositeExplicitAutograd")
def _bsr_grad_x(g2: torch.Tensor, values: torch.Tensor, row_ptr: torch.Tensor, col_idx: torch.Tensor,
                N: int, K: int) -> torch.Tensor:
    """grad_x [M, K] float32 = grad_y [M, N] @ W (the dense product of the stored blocks)."""
    M = math.prod(g2.shape[:-1])  # not reshape(-1, N): with N = 0 that has no answer
    return g2.reshape(M, N).float() @ _bsr_dense_weight(_bsr_kmajor_f32(values.detach()), row_ptr, col_idx, N, K)


@torch.library.impl("pysparse::bsr_linear_grad_values", "CompositeExplicitAutograd")
def _bsr_grad_values(g2: torch.Tensor, x2: torch.Tensor, values: torch.Tensor, row_ptr: torch.Tensor,
                     col_idx: torch.Tensor, N: int, K: int) -> torch.Tensor:
    """Gradient of each stored block (values' layout and dtype): x[:, its inputs]^T @ grad_y[:, its outputs].

    g2 [M, N], x2 [M, K] (for bf16 blocks, x as the forward used it: rounded to bf16).
    One GEMM per block row over just its stored blocks' inputs (gathered), so the work is
    density x the dense grad_W's, and memory stays at one block row's gather.
    """
    bn, bk = _bsr_block(values)
    g2, x2 = g2.float(), x2.float()
    M = x2.shape[0]
    R, KB = -(-N // bn), -(-K // bk)
    xv = torch.nn.functional.pad(x2, (0, KB * bk - K)).view(M, KB, bk)
    gp = torch.nn.functional.pad(g2, (0, R * bn - N))
    gv = torch.zeros(col_idx.numel(), bk, bn, dtype=torch.float32, device=x2.device)
    rp = row_ptr.tolist()
    ci = col_idx.long()
    for r in range(R):
        b0, b1 = rp[r], rp[r + 1]
        if b0 < b1:
            xs = xv[:, ci[b0:b1]].reshape(M, (b1 - b0) * bk)
            torch.mm(xs.T, gp[:, r * bn:(r + 1) * bn], out=gv[b0:b1].view((b1 - b0) * bk, bn))
    if values.dim() == 4:
        from .formats import kmajor_to_bf16_pairs
        gv = kmajor_to_bf16_pairs(gv)
    return gv.to(values.dtype)


@torch.library.register_fake("pysparse::bsr_linear_grad_x")
def _bsr_grad_x_fake(g2, values, row_ptr, col_idx, N: int, K: int):
    _no_meta_beside_real("bsr_linear_grad_x", grad=g2, values=values, row_ptr=row_ptr, col_idx=col_idx)
    torch._check(g2.dim() >= 1 and g2.shape[-1] == N, lambda: f"bsr_linear_grad_x: grad must be [..., {N}]")
    # the kernel's [M, K], M = the rows of grad (from its leading dims: right for N = 0 too)
    return g2.new_empty((math.prod(g2.shape[:-1]), K), dtype=torch.float32)


@torch.library.register_fake("pysparse::bsr_linear_grad_values")
def _bsr_grad_values_fake(g2, x2, values, row_ptr, col_idx, N: int, K: int):
    _no_meta_beside_real("bsr_linear_grad_values", grad=g2, x=x2, values=values, row_ptr=row_ptr, col_idx=col_idx)
    return torch.empty_like(values)


def _bsr_backward(ctx, grad):
    # Gradients for fine-tuning with a fixed pattern: only stored blocks get gradients, and
    # the work skips the zero blocks as the forward does (grad_x through the block-sparse
    # kernel on W^T, grad of the blocks one GEMM per block row).
    x, values, row_ptr, col_idx, out = ctx.saved_tensors
    if ctx.relu:
        grad = grad * (out > 0).to(grad.dtype)
    M = math.prod(x.shape[:-1])  # not -1: a layer with N = 0 or K = 0 has empty rows
    g2 = grad.reshape(M, ctx.N).float()
    gx = gv = gb = None
    if ctx.needs_input_grad[0]:
        gx = torch.ops.pysparse.bsr_linear_grad_x(g2, values, row_ptr, col_idx, ctx.N, ctx.K)
        gx = gx.to(x.dtype).reshape(x.shape)
    if ctx.needs_input_grad[1]:
        x2 = x.reshape(M, ctx.K)
        if values.dtype == torch.bfloat16:  # the forward multiplied x rounded to bf16
            x2 = x2.to(torch.bfloat16)
        gv = torch.ops.pysparse.bsr_linear_grad_values(g2, x2, values, row_ptr, col_idx, ctx.N, ctx.K)
    if ctx.has_bias and ctx.needs_input_grad[4]:
        gb = g2.sum(0)
    return gx, gv, None, None, gb, None, None, None


torch.library.register_autograd("pysparse::bsr_linear", _bsr_backward, setup_context=_bsr_setup_context)


def bsr_linear(x: torch.Tensor, values: torch.Tensor, row_ptr: torch.Tensor, col_idx: torch.Tensor,
               bias: Optional[torch.Tensor], N: int, K: int, relu: bool = False) -> torch.Tensor:
    """Block-sparse linear: x [..., K] -> [..., N] in x's dtype.

    values: float32 [nnzb, bk, bn] (formats.pack_bsr_f32) or, on the CPU, bfloat16
    [nnzb, bk/2, bn, 2] (formats.pack_bsr_bf16; x is then rounded to bf16); on CUDA
    float32/float16/bfloat16 [nnzb, bk, bn]. Differentiable in x, values and bias.
    A row of x holding a NaN or an Inf gives an all-NaN output row
    (as the dense product would), whichever blocks are stored.
    """
    return torch.ops.pysparse.bsr_linear(x, values, row_ptr, col_idx, bias, N, K, relu)


def bsr_int8_linear(x: torch.Tensor, values: torch.Tensor, row_ptr: torch.Tensor, col_idx: torch.Tensor,
                    colsum: torch.Tensor, w_scale: torch.Tensor, bias: Optional[torch.Tensor],
                    x_scale: Optional[torch.Tensor], N: int, K: int, relu: bool = False) -> torch.Tensor:
    """Block-sparse int8 linear (64x64 int8 blocks, per-channel scales, dynamic or static x)."""
    return torch.ops.pysparse.bsr_int8_linear(x, values, row_ptr, col_idx, colsum, w_scale, bias, x_scale, N, K,
                                              relu)
from . import ops_int8conv  # noqa: E402,F401  (int8 Conv2d: fakes + wrappers)
