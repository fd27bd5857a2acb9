"""pysparse's op registry on the Python side.

Schemas live in csrc/ops/registry.cpp (the `pysparse` torch.library namespace) and the
CPU kernels register from C++. Here: the fake (meta) kernels that let
torch.compile(fullgraph=True) and torch.export trace through the ops, and the CUDA
kernels (Triton), which register only when CUDA and Triton are present.

Callers use ``torch.ops.pysparse.<op>``; the thin functions below only add type hints.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from . import _C  # noqa: F401  (loads the library: schemas + CPU kernels)
from . import _cuda_ops  # noqa: F401  (Triton kernels for CUDA tensors; registers only)
from . import _cuda_bsr  # noqa: F401

PACK_N = 64  # csrc/cpu/int8_linear.h kPackN: N padded to the AVX-512 / AMX column chunk
PACK_K = 64  # kPackK: K padded to one AMX tile of K


def _round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m


def packed_k(K: int, group_size: int) -> int:
    """K after padding: to the scale group (if any), else to PACK_K; at least one group."""
    g = group_size or PACK_K
    return max(_round_up(K, g), g)


def _same_device(op: str, **tensors: torch.Tensor) -> None:
    # Under FakeTensorMode the devices are the real ones; under plain meta dispatch (a
    # meta input against CPU weights) this is the only place a mismatch can be caught.
    devs = {n: t.device for n, t in tensors.items()}
    first = next(iter(devs.values()))
    torch._check(all(d == first for d in devs.values()),
                 lambda: f"{op}: all tensors must be on one device, got {devs}")


@torch.library.register_fake("pysparse::int8_pack")
def _int8_pack_fake(w: torch.Tensor, group_size: int = 0):
    N, K = w.shape
    Np, Kp = _round_up(N, PACK_N), packed_k(K, group_size)
    G = Kp // group_size if group_size else 1
    if w.device.type == "cuda":  # the Triton kernel reads [N, K] (per group: [N, Kp]) as is
        shape = (N, Kp if group_size else K)
    else:  # the CPU tile layout (csrc/cpu/int8_linear.h)
        shape = (Np // 16, Kp * 16)
    return w.new_empty(shape, dtype=torch.int8), w.new_empty((G, Np), dtype=torch.int32)


@torch.library.register_fake("pysparse::int8_unpack")
def _int8_unpack_fake(packed, colsum, N: int, K: int):
    return packed.new_empty((N, K), dtype=torch.int8)


@torch.library.register_fake("pysparse::int8_mm")
def _int8_mm_fake(a, packed, colsum, N: int, K: int):
    _same_device("int8_mm", a=a, packed=packed)
    torch._check(a.dtype == torch.int8, lambda: f"int8_mm: a must be int8, got {a.dtype}")
    torch._check(a.dim() == 2 and a.shape[1] == K, lambda: f"int8_mm: a must be [M, {K}]")
    return a.new_empty((a.shape[0], N), dtype=torch.int32)


@torch.library.register_fake("pysparse::int8_linear")
def _int8_linear_fake(x, packed, colsum, w_scale, bias, x_scale, N: int, K: int):
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


def kernel_for(device: torch.device) -> str:
    """Which kernel pysparse's int8 ops use on ``device`` now (honours PYSPARSE_CPU_ISA)."""
    if device.type == "cpu":
        return f"cpu-{_C.selected_isa()}"
    if device.type == "cuda":
        return "triton"
    return "none"


# ------------------------------------------------------------------ block-sparse
@torch.library.register_fake("pysparse::bsr_linear")
def _bsr_linear_fake(x, values, row_ptr, col_idx, bias, N: int, K: int, relu: bool = False):
    _same_device("bsr_linear", x=x, values=values)
    torch._check(x.dim() >= 1 and x.shape[-1] == K, lambda: f"bsr_linear: x must have last dimension {K}")
    return x.new_empty((*x.shape[:-1], N))


@torch.library.register_fake("pysparse::bsr_int8_linear")
def _bsr_int8_linear_fake(x, values, row_ptr, col_idx, colsum, w_scale, bias, x_scale, N: int, K: int,
                          relu: bool = False):
    _same_device("bsr_int8_linear", x=x, values=values)
    torch._check(x.dim() >= 1 and x.shape[-1] == K, lambda: f"bsr_int8_linear: x must have last dimension {K}")
    return x.new_empty((*x.shape[:-1], N))


def _bsr_block(values: torch.Tensor) -> tuple[int, int]:
    """(bn, bk) of float blocks: k-major [nnzb, bk, bn] or bf16 input pairs [nnzb, bk/2, bn, 2]."""
    return (values.shape[2], values.shape[1] * 2) if values.dim() == 4 else (values.shape[2], values.shape[1])


def _bsr_dense_weight(values, row_ptr, col_idx, N: int, K: int) -> torch.Tensor:
    from .formats import BsrLayout, bsr_f32_to_dense

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
    return g2.reshape(-1, N).float() @ _bsr_dense_weight(_bsr_kmajor_f32(values.detach()), row_ptr, col_idx, N, K)


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
    torch._check(g2.shape[-1] == N, lambda: f"bsr_linear_grad_x: grad must be [..., {N}]")
    return g2.new_empty((g2.numel() // max(N, 1), K), dtype=torch.float32)


@torch.library.register_fake("pysparse::bsr_linear_grad_values")
def _bsr_grad_values_fake(g2, x2, values, row_ptr, col_idx, N: int, K: int):
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
    """
    return torch.ops.pysparse.bsr_linear(x, values, row_ptr, col_idx, bias, N, K, relu)


def bsr_int8_linear(x: torch.Tensor, values: torch.Tensor, row_ptr: torch.Tensor, col_idx: torch.Tensor,
                    colsum: torch.Tensor, w_scale: torch.Tensor, bias: Optional[torch.Tensor],
                    x_scale: Optional[torch.Tensor], N: int, K: int, relu: bool = False) -> torch.Tensor:
    """Block-sparse int8 linear (64x64 int8 blocks, per-channel scales, dynamic or static x)."""
    return torch.ops.pysparse.bsr_int8_linear(x, values, row_ptr, col_idx, colsum, w_scale, bias, x_scale, N, K,
                                              relu)
from . import ops_int8conv  # noqa: E402,F401  (int8 Conv2d: fakes + wrappers)
