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
  On a GPU int8 blocks are K-major [nnzb, 64 n, 64 k], K contiguous (each block as it sits
  in W; int8_blocks_to_kmajor): Hopper's int8 wgmma takes B only K-major, so the Triton
  kernel's block loads pipeline straight into it. ("k-major" of the float blocks above
  means k outermost, n contiguous; for int8 on the GPU "K-major" is the MMA operand's
  sense, K contiguous, as the dense int8 weight [N, K] is.)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .reference import quantize_weight

PACK_N = 64  # csrc/cpu/int8_linear.h kPackN: N padded to the AVX-512 / AMX column chunk
PACK_K = 64  # kPackK: K padded to one AMX tile of K
INT8_BLOCK = (64, 64)  # csrc/cpu/bsr_linear.h kBsrI8Block: one 64-column VNNI chunk x one AMX K tile
# fp32 CPU kernel block: 64 outputs (4 zmm of accumulators per row) x 32 inputs. Swept
# (16|32|64) x (16|32|64) at K = N = 4096, density 0.1 (bench/bench_bsr_linear.py):
# bn = 64 keeps 24 accumulators in registers; bk = 32 amortizes the per-block setup.
DEFAULT_BLOCK = (64, 32)
# colsum's padding columns hold this (no real column sum can): the ops check N against it.
COLSUM_PAD = torch.iinfo(torch.int32).min


def round_up(x: int, m: int) -> int:
    """x rounded up to a multiple of m (m > 0)."""
    return (x + m - 1) // m * m


_round_up = round_up  # the name ops.py / _cuda_ops.py used


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
    """Block mask [R, KB] (R = ceil(N / bn), KB = ceil(K / bk)) -> element mask [N, K]
    (same dtype and device): element (n, k) takes block (n // bn, k // bk)'s value."""
    R, KB = mask.shape
    return mask[:, None, :, None].expand(-1, bn, -1, bk).reshape(R * bn, KB * bk)[:N, :K]


def dense_to_bsr(w: torch.Tensor, bn: int, bk: int,
                 mask: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, BsrLayout]:
    """W [N, K] -> (stored blocks [nnzb, bn, bk] in W's dtype, n-major as in W, layout).

    mask: the bool block mask [R, KB] to store; None stores the blocks of W holding any
    nonzero. Blocks are in row-major (block row, block column) order, edges zero padded.
    """
    N, K = w.shape
    blocks = _blocks(w, bn, bk)
    if mask is None:
        mask = blocks.ne(0).flatten(2).any(-1)
    return blocks[mask], _layout(mask, N, K, bn, bk)


def bsr_to_dense(values: torch.Tensor, row_ptr: torch.Tensor, col_idx: torch.Tensor, N: int, K: int) -> torch.Tensor:
    """k-major blocks values [nnzb, bk, bn] (any dtype) -> the dense weight [N, K] in
    values' dtype, on values' device, differentiable in values. No host sync (the
    repeat_interleave is told its size), so it serves the CUDA fallback too."""
    nnzb, bk, bn = values.shape
    R, KB = -(-N // bn), -(-K // bk)
    dev = values.device
    rp = row_ptr.to(dev).long()
    rows = torch.repeat_interleave(torch.arange(R, device=dev), rp[1:] - rp[:-1], output_size=nnzb)
    dense = values.new_zeros(R * KB, bn, bk)
    dense = dense.index_put((rows * KB + col_idx.to(dev).long(),), values.transpose(1, 2))
    return dense.reshape(R, KB, bn, bk).permute(0, 2, 1, 3).reshape(R * bn, KB * bk)[:N, :K]


def check_bsr_layout(row_ptr: torch.Tensor, col_idx: torch.Tensor, N: int, K: int, bn: int, bk: int,
                     prefix: str = "") -> None:
    """Raise ValueError (naming ``prefix + 'row_ptr'`` / ``'col_idx'``) unless the index
    arrays are a BSR layout of an [N, K] weight in (bn, bk) blocks: int32, row_ptr
    [ceil(N / bn) + 1] from 0, non-decreasing, ending at col_idx's length; col_idx within
    the ceil(K / bk) block columns and strictly increasing inside each block row."""
    R, KB = -(-N // bn), -(-K // bk)
    for name, t in (("row_ptr", row_ptr), ("col_idx", col_idx)):
        if not isinstance(t, torch.Tensor) or t.dtype != torch.int32 or t.dim() != 1:
            raise ValueError(f"{prefix}{name}: expected a 1-d int32 tensor, got "
                             f"{getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}")
    if row_ptr.numel() != R + 1:
        raise ValueError(f"{prefix}row_ptr: expected {R + 1} entries ({R} block rows of {bn} for "
                         f"out_features={N}), got {row_ptr.numel()}")
    rp, ci = row_ptr.cpu().long(), col_idx.cpu().long()
    nnzb = ci.numel()
    if rp[0] != 0 or rp[-1] != nnzb or bool((rp[1:] < rp[:-1]).any()):
        raise ValueError(f"{prefix}row_ptr: expected non-decreasing offsets from 0 to {nnzb} (the number of "
                         f"stored blocks in col_idx), got {rp.tolist() if rp.numel() <= 16 else 'other values'}")
    if nnzb and (int(ci.min()) < 0 or int(ci.max()) >= KB):
        raise ValueError(f"{prefix}col_idx: expected block columns in [0, {KB}) (in_features={K} in blocks of "
                         f"{bk}), got values in [{int(ci.min())}, {int(ci.max())}]")
    if nnzb > 1:
        rows = torch.repeat_interleave(torch.arange(R), rp[1:] - rp[:-1])
        same_row = rows[1:] == rows[:-1]
        if bool((same_row & (ci[1:] <= ci[:-1])).any()):
            raise ValueError(f"{prefix}col_idx: expected strictly increasing block columns within each block row")


def _layout(mask: torch.Tensor, N: int, K: int, bn: int, bk: int) -> BsrLayout:
    counts = mask.sum(1)
    row_ptr = torch.zeros(mask.shape[0] + 1, dtype=torch.int32)
    row_ptr[1:] = torch.cumsum(counts, 0).to(torch.int32)
    col_idx = mask.nonzero()[:, 1].to(torch.int32).contiguous()
    return BsrLayout(N, K, bn, bk, row_ptr, col_idx)


def pack_bsr_f32(w: torch.Tensor, bn: int, bk: int) -> tuple[torch.Tensor, BsrLayout]:
    """W [N, K] (zeros where pruned) -> (values float32 [nnzb, bk, bn], layout)."""
    blocks, layout = dense_to_bsr(w.detach().float().cpu(), bn, bk)
    return blocks.transpose(1, 2).contiguous(), layout  # k-major [nnzb, bk, bn]


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
    return bsr_to_dense(values, layout.row_ptr, layout.col_idx, layout.N, layout.K)


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
    q = (q.cpu() * expand_block_mask(mask, N, K, bn, bk)).to(torch.int8)
    qb, layout = dense_to_bsr(q, bn, bk, mask)  # [nnzb, 64 n, 64 k]
    # [n][k] -> [4 column blocks][16 k-groups][16 columns][4 k]
    values = qb.reshape(-1, 4, 16, 16, 4).permute(0, 1, 3, 2, 4).reshape(-1, bn * bk).contiguous()
    Np = -(-N // bn) * bn
    colsum = torch.full((1, Np), COLSUM_PAD, dtype=torch.int32)  # padding marks N (csrc/ops/common.h)
    colsum[0, :N] = q.sum(1, dtype=torch.int32)
    w_scale = torch.ones(1, Np)
    w_scale[0, :N] = scale[:, 0]
    return BsrInt8(values, layout, colsum, w_scale, q)


def int8_blocks_to_kmajor(values: torch.Tensor) -> torch.Tensor:
    """int8 BSR values from the CPU layout [nnzb, 4096] to the GPU layout, K-major
    [nnzb, 64 n, 64 k] (K contiguous: ``values[j, n, k] = W[r*64 + n, col_idx[j]*64 + k]``,
    what the Triton kernel's int8 tl.dot wants). Exact inverse of int8_blocks_to_cpu."""
    # [j][nb][kg][n16][i] -> [j][nb][n16][kg][i] = [j][n][k]
    return values.reshape(-1, 4, 16, 16, 4).permute(0, 1, 3, 2, 4).reshape(-1, 64, 64).contiguous()


def int8_blocks_to_cpu(values: torch.Tensor) -> torch.Tensor:
    """Inverse of int8_blocks_to_kmajor: [nnzb, 64 n, 64 k] -> the CPU layout [nnzb, 4096]."""
    # [j][nb][n16][kg][i] -> [j][nb][kg][n16][i]
    return values.reshape(-1, 4, 16, 16, 4).permute(0, 1, 3, 2, 4).reshape(-1, 4096).contiguous()


def int8_blocks_kn(values: torch.Tensor) -> torch.Tensor:
    """int8 BSR values in either layout (CPU [nnzb, 4096] or GPU [nnzb, 64 n, 64 k]) as
    [nnzb, 64 k, 64 n] blocks (the float blocks' order, for bsr_to_dense); a view where it
    can be."""
    nk = values.reshape(-1, *INT8_BLOCK) if values.dim() == 3 else int8_blocks_to_kmajor(values)
    return nk.transpose(1, 2)


def int8_bsr_to_dense(values: torch.Tensor, row_ptr: torch.Tensor, col_idx: torch.Tensor, N: int,
                      K: int) -> torch.Tensor:
    """int8 BSR values (the CPU layout [nnzb, 4096] or the GPU's K-major [nnzb, 64, 64]) ->
    the int8 weight [N, K] they hold (zeros where no block is stored)."""
    return bsr_to_dense(int8_blocks_kn(values), row_ptr, col_idx, N, K)


def int8_bsr_colsum(values: torch.Tensor, row_ptr: torch.Tensor, N: int) -> torch.Tensor:
    """The per-output-channel sums [N] (int32) of the int8 weight held by int8 BSR values
    in the CPU layout [nnzb, 4096]: what ``colsum[0, :N]`` must hold."""
    bn, bk = INT8_BLOCK
    R = -(-N // bn)
    per_block = int8_blocks_to_kmajor(values).sum(2, dtype=torch.int32)  # [nnzb, 64 n]
    rp = row_ptr.to(values.device).long()
    rows = torch.repeat_interleave(torch.arange(R, device=values.device), rp[1:] - rp[:-1],
                                   output_size=values.shape[0])
    out = torch.zeros(R, bn, dtype=torch.int32, device=values.device).index_add_(0, rows, per_block)
    return out.reshape(-1)[:N]
