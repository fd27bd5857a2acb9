"""Packed weight formats, built once at conversion time.

BSR (block compressed sparse row) over W [N, K]: block row r holds output channels
r*bn .. r*bn+bn; its nonzero blocks are values[row_ptr[r]:row_ptr[r+1]], block j covering
input channels col_idx[j]*bk .. +bk. Edge blocks are zero padded.
- fp32: values [nnzb, bk, bn], k-major inside a block (one k = bn contiguous outputs,
  what the CPU kernel's vector loads want).
- bf16 (CPU): values [nnzb, bk/2, bn, 2]: for each pair of inputs the bn outputs' two
  weights side by side (VDPBF16PS's operand order, also an AMX bf16 B tile row); bk even.
  On a GPU bf16/fp16 blocks are k-major [nnzb, bk, bn] like fp32 (bf16_pairs_to_kmajor).
- int8: 64 x 64 blocks, each in the dense int8 kernels' layout (csrc/cpu/int8_linear.h):
  values [nnzb, 4096], with per-output-channel scales and column sums.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .reference import quantize_weight

# fp32 CPU kernel block: 64 outputs (4 zmm of accumulators per row) x 32 inputs. Swept
# (16|32|64) x (16|32|64) at K = N = 4096, density 0.1 (bench/bench_bsr_linear.py):
# bn = 64 keeps 24 accumulators in registers; bk = 32 amortizes the per-block setup.
DEFAULT_BLOCK = (64, 32)
PACK_N = 64  # csrc/cpu/int8_linear.h kPackN: N padded to the AVX-512 / AMX column chunk
PACK_K = 64  # kPackK: K padded to one AMX tile of K
INT8_BLOCK = (64, 64)  # csrc/cpu/bsr_linear.h kBsrI8Block: one 64-column VNNI chunk x one AMX K tile
# colsum's padding columns hold this (no real column sum can): the ops check N against it.
COLSUM_PAD = torch.iinfo(torch.int32).min


@dataclass
class BsrLayout:
    """Block structure of a weight: which (block row, block column) blocks are stored."""
    N: int
    K: int
    bn: int
    bk: int
    row_ptr: torch.Tensor  # int32 [R + 1]
    col_idx: torch.Tensor  # int32 [nnzb]

    @property
    def density(self) -> float:
        R, KB = -(-self.N // self.bn), -(-self.K // self.bk)
        return self.col_idx.numel() / max(R * KB, 1)


def _blocks(w: torch.Tensor, bn: int, bk: int) -> torch.Tensor:
    """W [N, K] -> zero-padded blocks [R, KB, bn, bk]."""
    N, K = w.shape
    R, KB = -(-N // bn), -(-K // bk)
    wp = torch.nn.functional.pad(w, (0, KB * bk - K, 0, R * bn - N))
    return wp.reshape(R, bn, KB, bk).permute(0, 2, 1, 3)


def block_mask(w: torch.Tensor, bn: int, bk: int) -> torch.Tensor:
    """Bool [R, KB]: which blocks of W hold any nonzero."""
    return _blocks(w, bn, bk).ne(0).flatten(2).any(-1)


def expand_block_mask(mask: torch.Tensor, N: int, K: int, bn: int, bk: int) -> torch.Tensor:
    """Block mask [R, KB] -> element mask [N, K] (each block's value over its bn x bk elements)."""
    R, KB = mask.shape
    return mask[:, None, :, None].expand(-1, bn, -1, bk).reshape(R * bn, KB * bk)[:N, :K]


def _layout(mask: torch.Tensor, N: int, K: int, bn: int, bk: int) -> BsrLayout:
    counts = mask.sum(1)
    row_ptr = torch.zeros(mask.shape[0] + 1, dtype=torch.int32)
    row_ptr[1:] = torch.cumsum(counts, 0).to(torch.int32)
    col_idx = mask.nonzero()[:, 1].to(torch.int32).contiguous()
    return BsrLayout(N, K, bn, bk, row_ptr, col_idx)


def pack_bsr_f32(w: torch.Tensor, bn: int, bk: int) -> tuple[torch.Tensor, BsrLayout]:
    """W [N, K] (zeros where pruned) -> (values float32 [nnzb, bk, bn], layout)."""
    w = w.detach().float().cpu()
    N, K = w.shape
    blocks = _blocks(w, bn, bk)
    mask = blocks.ne(0).flatten(2).any(-1)
    values = blocks[mask].transpose(1, 2).contiguous()  # [nnzb, bk, bn]
    return values, _layout(mask, N, K, bn, bk)


def pack_bsr_bf16(w: torch.Tensor, bn: int, bk: int) -> tuple[torch.Tensor, BsrLayout]:
    """W [N, K] (zeros where pruned) -> (values bfloat16 [nnzb, bk/2, bn, 2], layout).

    The block structure is that of the float weight (a block whose values all round to
    zero in bf16 is still stored). bk must be even.
    """
    if bk % 2:
        raise ValueError(f"bf16 blocks pair the inputs: bk must be even, got bk={bk}")
    values, layout = pack_bsr_f32(w, bn, bk)
    return kmajor_to_bf16_pairs(values), layout


def kmajor_to_bf16_pairs(values: torch.Tensor) -> torch.Tensor:
    """k-major blocks [nnzb, bk, bn] (any float dtype) -> the CPU bf16 layout [nnzb, bk/2, bn, 2]."""
    nnzb, bk, bn = values.shape
    return values.to(torch.bfloat16).reshape(nnzb, bk // 2, 2, bn).transpose(2, 3).contiguous()


def bf16_pairs_to_kmajor(values: torch.Tensor) -> torch.Tensor:
    """Inverse of kmajor_to_bf16_pairs: [nnzb, bk/2, bn, 2] -> [nnzb, bk, bn] (same dtype)."""
    nnzb, kp, bn, _ = values.shape
    return values.transpose(2, 3).reshape(nnzb, 2 * kp, bn).contiguous()


def bsr_f32_to_dense(values: torch.Tensor, layout: BsrLayout) -> torch.Tensor:
    """Inverse of pack_bsr_f32 (and of pack_bsr_bf16, in bf16): the dense weight [N, K]
    (differentiable in values)."""
    if values.dim() == 4:
        values = bf16_pairs_to_kmajor(values)
    R, KB = -(-layout.N // layout.bn), -(-layout.K // layout.bk)
    rp = layout.row_ptr.to(values.device).long()  # index on the values' device (a GPU too)
    rows = torch.repeat_interleave(torch.arange(R, device=values.device), rp[1:] - rp[:-1])
    dense = values.new_zeros(R * KB, layout.bn, layout.bk)
    dense = dense.index_put((rows * KB + layout.col_idx.to(values.device).long(),), values.transpose(1, 2))
    dense = dense.reshape(R, KB, layout.bn, layout.bk).permute(0, 2, 1, 3).reshape(R * layout.bn, KB * layout.bk)
    return dense[: layout.N, : layout.K]


@dataclass
class BsrInt8:
    values: torch.Tensor   # int8 [nnzb, 4096]
    layout: BsrLayout
    colsum: torch.Tensor   # int32 [1, Np]
    w_scale: torch.Tensor  # float32 [1, Np]
    q: torch.Tensor        # int8 [N, K], the quantized weight (for references and state dicts)


def pack_bsr_int8(w: torch.Tensor, q: Optional[torch.Tensor] = None,
                  scale: Optional[torch.Tensor] = None) -> BsrInt8:
    """W [N, K] (zeros where pruned) -> int8 BSR with per-output-channel scales.

    The block structure is taken from W's zeros; q/scale, if given, are the already
    quantized weight (a block whose values all quantize to 0 is still stored, so the
    structure is that of the float weight).
    """
    w = w.detach().float().cpu()
    N, K = w.shape
    bn, bk = INT8_BLOCK
    if q is None:
        q, scale = quantize_weight(w)
    elif scale is None:
        raise ValueError("pack_bsr_int8: scale [N, 1] is required when q is given")
    mask = block_mask(w, bn, bk)
    # Keep only the stored blocks of q: the column sums (VNNI compensation) and the
    # reference must see exactly what the kernel multiplies.
    em = expand_block_mask(mask, N, K, bn, bk)
    q = (q.cpu() * em).to(torch.int8)
    layout = _layout(mask, N, K, bn, bk)
    qb = _blocks(q, bn, bk)[mask]  # [nnzb, 64 n, 64 k]
    # [n][k] -> [4 column blocks][16 k-groups][16 columns][4 k]
    values = qb.reshape(-1, 4, 16, 16, 4).permute(0, 1, 3, 2, 4).reshape(-1, bn * bk).contiguous()
    Np = -(-N // bn) * bn
    colsum = torch.full((1, Np), COLSUM_PAD, dtype=torch.int32)  # padding marks N (csrc/ops/common.h)
    colsum[0, :N] = q.sum(1, dtype=torch.int32)
    w_scale = torch.ones(1, Np)
    w_scale[0, :N] = scale[:, 0]
    return BsrInt8(values, layout, colsum, w_scale, q)


def int8_blocks_to_kmajor(values: torch.Tensor) -> torch.Tensor:
    """int8 BSR values from the CPU layout [nnzb, 4096] to k-major [nnzb, 64 k, 64 n]
    (what the Triton kernel's tl.dot tiles load). Exact inverse of int8_blocks_to_cpu."""
    # [j][nb][kg][n16][i] -> [j][kg][i][nb][n16]
    return values.reshape(-1, 4, 16, 16, 4).permute(0, 2, 4, 1, 3).reshape(-1, 64, 64).contiguous()


def int8_blocks_to_cpu(values: torch.Tensor) -> torch.Tensor:
    """Inverse of int8_blocks_to_kmajor: [nnzb, 64, 64] -> the CPU layout [nnzb, 4096]."""
    return values.reshape(-1, 16, 4, 4, 16).permute(0, 3, 1, 4, 2).reshape(-1, 4096).contiguous()
