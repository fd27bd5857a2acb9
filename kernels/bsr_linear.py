"""Triton block-sparse linear layers: the CUDA path of pysparse::bsr_linear and bsr_int8_linear.

The weight W [N, K] is stored in BSR form (see ``dense_to_bsr``): block row r (output
channels r*bn .. r*bn+bn-1) owns blocks ``row_ptr[r] .. row_ptr[r+1]-1``; block j covers
input channels ``col_idx[j]*bk .. +bk-1`` and is stored k-major, ``values[j, k, n] =
W[r*bn + n, col_idx[j]*bk + k]``. That [bk, bn] block is exactly the B operand of
``x_tile @ B`` (K rows, N columns), so it feeds ``tl.dot`` with no transpose. Edge blocks
are zero padded; x has only K columns, so its loads are masked.

int8 blocks are stored the other way, K contiguous: ``values_q[j, n, k] = W[r*bn + n,
col_idx[j]*bk + k]`` ([nnzb, bn, bk], each block as it sits in W; ``dense_to_bsr_int8``).
Hopper's int8 wgmma takes its B operand K-major only (transposed shared-memory layouts
exist for 16-bit types alone), so an n-contiguous int8 block cannot be fed to it by the
asynchronous copy pipeline; a K-major one is (the dense int8 kernel reads W the same way).
The kernel reads either layout through the strides it is given. int8 blocks also need
bk >= 32 on a GPU: an 8-bit ``tl.dot`` needs K >= 32 (one int8 MMA k-step).

One program computes a [BLOCK_M, bn] output tile: it walks the nonzero blocks of its
block row, accumulating ``x[:, cols] @ values[j]`` in fp32 (float weights) or exact int32
(int8 weights), then runs a fused epilogue (dequantization, bias, ReLU, cast).

* ``bsr_linear_triton``: float values (fp32 / fp16 / bf16); x is cast to the values' dtype.
* ``bsr_int8_linear_triton``: int8 x int8 -> int32, then
  ``((float(acc) * w_scale) * x_scale) + bias`` rounded in that order, as the CPU kernels.
* ``bsr_int8_mm_triton``: the raw int32 sums (exactness tests).

Under ``TRITON_INTERPRET=1`` (the CPU tests) the autotuner gets a single small config, as
in kernels/int8_linear.py; that choice is made when this module is imported.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

__all__ = ["bsr_linear_triton", "bsr_int8_linear_triton", "bsr_int8_mm_triton", "dense_to_bsr",
           "dense_to_bsr_int8", "MAX_K", "MIN_BLOCK", "MAX_BLOCK", "MIN_INT8_BK"]

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
FIXED_CONFIG_ENV = "PYSPARSE_TRITON_FIXED_CONFIG"

# int8 x int8 tl.dot needs K >= 32 on GPUs (the 8-bit MMA's k-step); the interpreter
# takes 16, so this is checked for CUDA tensors and the CPU tests use bk >= 32 as well.
MIN_INT8_BK = 32

# When not None, every launch appends (kernel, signature) here: scripts/gpu_check.py
# counts the distinct compiled variants of a run from it.
LAUNCH_LOG: Optional[list] = None


def fixed_config_enabled() -> bool:
    return os.environ.get(FIXED_CONFIG_ENV, "") not in ("", "0")

# The int32 accumulator is exact while K * 128 * 128 <= 2**31 - 1 (all -128 x -128).
MAX_K = (2**31 - 1) // (128 * 128)  # 131071

# Block sides: tl.dot needs every operand dimension >= 16; 128 keeps one fp32 block
# (64 KiB) plus the x tile within shared memory at one pipeline stage.
MIN_BLOCK, MAX_BLOCK = 16, 128

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# Shared memory the pruner lets one config's pipeline use (x tile + weight block per
# stage). A100 allows 163 KiB per block, H100 227 KiB; Triton needs some for itself.
_SMEM_BUDGET = 160 * 1024


def _config(bm: int, warps: int, stages: int) -> triton.Config:
    return triton.Config({"BLOCK_M": bm, "GROUP_M": 8}, num_warps=warps, num_stages=stages)


def gpu_configs() -> list[triton.Config]:
    """The configs tuned on a GPU. The first of each M bucket (see ``_prune``) is the
    fixed config of correctness runs. One config per (BLOCK_M, warps, stages): two
    configs that differ only in a footprint the pruner then cuts to the same stages
    would compile and benchmark the same kernel twice."""
    return [
        # Decode (M <= 16): one 16-row MMA tile, never padded to 64/128 rows. The layer
        # is bound by reading the weight blocks; a 16 x 16..64 tile needs few warps.
        _config(16, 4, 4),
        _config(16, 2, 3),
        # Small batches (M <= 64).
        _config(32, 4, 3),
        _config(64, 4, 3),
        # Prefill: each weight block is reused by 64/128 rows of x.
        _config(64, 4, 4),
        _config(128, 4, 3),
        _config(128, 8, 3),
    ]


def _configs() -> list[triton.Config]:
    if _INTERPRET:
        # One config: the autotuner then skips benchmarking (the interpreter runs every
        # program in numpy). 16 rows make the tests' M = 17 cross a tile edge.
        return [_config(16, 1, 1)]
    return gpu_configs()


def _stage_bytes(cfg: triton.Config, bk: int, bn: int, x_size: int, v_size: int) -> int:
    """Shared memory of one pipeline stage: the x tile [BLOCK_M, bk] and one block [bk, bn]."""
    return cfg.kwargs["BLOCK_M"] * bk * x_size + bk * bn * v_size


def _prune(configs, named_args, **kwargs):
    """Block heights that suit M (tuning 128-row tiles for M = 1 wastes time), with
    pipelines cut to as many stages as fit in shared memory for this block size and dtype
    (fp32 128 x 128 blocks: 64 KiB per block, so one or two stages)."""
    args = {**named_args, **kwargs}
    return _prune_sizes(configs, args, args["x_ptr"].element_size(), args["v_ptr"].element_size())


def _prune_sizes(configs, args, xs: int, vs: int):
    mb, bk, bn = args["M_BUCKET"], args["BK"], args["BN"]
    if mb <= 16:
        keep = [c for c in configs if c.kwargs["BLOCK_M"] == 16]
    elif mb <= 64:
        keep = [c for c in configs if c.kwargs["BLOCK_M"] <= 64]
    else:
        keep = [c for c in configs if c.kwargs["BLOCK_M"] >= 64]
    out = {}
    for c in keep or configs:
        stages = max(1, min(c.num_stages, _SMEM_BUDGET // _stage_bytes(c, bk, bn, xs, vs)))
        if stages != c.num_stages:
            c = _config(c.kwargs["BLOCK_M"], c.num_warps, stages)
        out.setdefault((c.kwargs["BLOCK_M"], c.num_warps, c.num_stages), c)
    return list(out.values())


def fixed_config(M: int, bk: int, bn: int, x_size: int, v_size: int) -> triton.Config:
    """The config a fixed-config launch runs: the first that suits M, stages cut to fit."""
    args = {"M_BUCKET": _m_bucket(M), "BK": bk, "BN": bn}
    return _prune_sizes(_configs(), args, x_size, v_size)[0]


def _m_bucket(M: int) -> int:
    """Autotuning key for M: decode sizes share one bucket, then powers of two."""
    return 16 if M <= 16 else min(triton.next_power_of_2(M), 4096)


@triton.jit
def _f32_to_bf16_rne(y):
    """float32 -> bfloat16, rounded to nearest even (as torch and cvt.rn.bf16.f32 round).

    Spelled out in integer ops because the interpreter's float -> bfloat16 cast truncates.
    A copy of the helper in kernels/int8_linear.py: a @triton.jit helper must be decorated
    in the same (interpreted or compiled) mode as the kernel that calls it.
    NaN stays NaN (0x7fc0; payload bits may differ).
    """
    u = y.to(tl.uint32, bitcast=True)
    r = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    r = tl.where(y != y, 0x7FC0, r)
    return r.to(tl.uint16).to(tl.bfloat16, bitcast=True)


# No block count (NNZB) in the key: it was there once, and every layer of another
# density re-tuned (up to 7 compiles-and-benchmarks per layer in a serving cold start,
# 4x the tunings of the gpu-check timing grid). Blocks per row change how long a program
# runs, not which tile shape suits M and the block.
@triton.autotune(configs=_configs(), key=["M_BUCKET", "N", "K", "BN", "BK"],
                 prune_configs_by={"early_config_prune": _prune})
@triton.jit(do_not_specialize=["M_BUCKET"])
def _bsr_kernel(
    x_ptr, v_ptr, row_ptr_ptr, col_idx_ptr, out_ptr, xs_ptr, ws_ptr, bias_ptr,
    M, N, K, M_BUCKET,
    stride_xm, stride_xk, stride_vj, stride_vk, stride_vn, stride_om, stride_on,
    stride_xs, stride_ws, stride_bias,
    INT8: tl.constexpr, EPILOGUE: tl.constexpr, HAS_BIAS: tl.constexpr, RELU: tl.constexpr,
    UPCAST_BF16: tl.constexpr,
    BN: tl.constexpr, BK: tl.constexpr, BLOCK_M: tl.constexpr, GROUP_M: tl.constexpr,
):
    """out[:, r*BN : r*BN+BN] = epilogue(sum over the blocks j of row r of x[:, cols_j] @ B_j),
    B_j the [BK, BN] block j read through stride_vk / stride_vn (either layout)."""
    # A 1-D grid in grouped order: GROUP_M row tiles walk the block rows together, so
    # each weight block is read from DRAM once per group and x rows stay in L2. (1-D
    # also avoids grid axis 1's 65535 limit for layers with many block rows.)
    # Builtins only (integer ceil-division, not tl.cdiv; tl.full, not tl.zeros): see
    # kernels/int8_linear.py, so the kernel also runs interpreted in a process that
    # imported triton before setting TRITON_INTERPRET.
    pid = tl.program_id(0)
    num_pid_m = (M + BLOCK_M - 1) // BLOCK_M
    num_pid_n = (N + BN - 1) // BN
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    r = (pid % num_pid_in_group) // group_size_m  # block row

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rk = tl.arange(0, BK)
    rb = tl.arange(0, BN)
    rn = r * BN + rb
    # Rows past M wrap onto valid ones (never stored), so x loads need a mask on K only.
    # int64 offsets: x rows and the values array can pass 2**31 elements.
    x_rows = x_ptr + (rm % M).to(tl.int64)[:, None] * stride_xm
    start = tl.load(row_ptr_ptr + r)
    end = tl.load(row_ptr_ptr + r + 1)
    # Pointers advance block by block (64-bit pointer arithmetic, no j * stride product).
    v_ptrs = v_ptr + start.to(tl.int64) * stride_vj + rk[:, None] * stride_vk + rb[None, :] * stride_vn
    c_ptr = col_idx_ptr + start

    if INT8:
        acc = tl.full((BLOCK_M, BN), 0, dtype=tl.int32)
    else:
        acc = tl.full((BLOCK_M, BN), 0.0, dtype=tl.float32)
    for _ in range(0, end - start):
        cols = tl.load(c_ptr) * BK + rk
        # Columns past K (the edge block's padding) load as 0; their weights are 0 too.
        a = tl.load(x_rows + cols[None, :].to(tl.int64) * stride_xk, mask=cols[None, :] < K, other=0)
        b = tl.load(v_ptrs)
        if INT8:
            acc = tl.dot(a, b, acc, out_dtype=tl.int32)
        else:
            if v_ptr.dtype.element_ty == tl.bfloat16:
                if x_ptr.dtype.element_ty != tl.bfloat16:
                    a = _f32_to_bf16_rne(a.to(tl.float32))  # as torch's x.to(bfloat16)
                if UPCAST_BF16:
                    # Interpreter only: its dot multiplies bf16's uint16 storage as integers.
                    # Exact stand-in: bf16 x bf16 products are exact in fp32, and the GPU's
                    # bf16 MMA accumulates in fp32 as well.
                    a = a.to(tl.float32)
                    b = b.to(tl.float32)
            else:
                a = a.to(v_ptr.dtype.element_ty)
            # "ieee": fp32 weights get true fp32 products, not tf32 (10-bit mantissas).
            # For fp16/bf16 operands the tensor cores' products are exact anyway.
            acc = tl.dot(a, b, acc, input_precision="ieee", out_dtype=tl.float32)
        v_ptrs += stride_vj
        c_ptr += 1

    mask_m = rm < M
    mask_n = rn < N
    o_ptrs = out_ptr + rm[:, None].to(tl.int64) * stride_om + rn[None, :] * stride_on
    o_mask = mask_m[:, None] & mask_n[None, :]
    if INT8 and not EPILOGUE:
        tl.store(o_ptrs, acc, mask=o_mask)
    else:
        if INT8:
            # The order of the CPU kernels: (acc * w_scale) * x_scale, then + bias, each
            # rounded to float32 (the launch disables FMA contraction).
            ws = tl.load(ws_ptr + rn * stride_ws, mask=mask_n, other=0.0)
            xs = tl.load(xs_ptr + rm * stride_xs, mask=mask_m, other=0.0)
            y = acc.to(tl.float32) * ws[None, :]
            y = y * xs[:, None]
        else:
            y = acc
        if HAS_BIAS:
            bias = tl.load(bias_ptr + rn * stride_bias, mask=mask_n, other=0.0)
            y = y + bias[None, :]
        if RELU:
            # y > 0 ? y : 0, but NaN stays NaN (as torch.relu and the CPU kernels).
            y = tl.where((y > 0) | (y != y), y, 0.0)
        if out_ptr.dtype.element_ty == tl.bfloat16:
            tl.store(o_ptrs, _f32_to_bf16_rne(y), mask=o_mask)
        else:
            tl.store(o_ptrs, y.to(out_ptr.dtype.element_ty), mask=o_mask)


# ------------------------------------------------------------------------------ checks
def _is_pow2(v: int) -> bool:
    return v > 0 and v & (v - 1) == 0


def _check_tensor(t, name: str, what: str, dtypes: tuple, ndim: int, device=None) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor ({what}), got {type(t).__name__}")
    if t.dtype not in dtypes:
        want = " or ".join(str(d) for d in dtypes)
        raise ValueError(f"{name} must be {want} ({what}), got {t.dtype}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D ({what}), got shape {tuple(t.shape)}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device} but x is on {device}; "
                         "all tensors must be on the same device")


def _check_bsr(x: torch.Tensor, x_name: str, x_dtypes: tuple, values: torch.Tensor, v_name: str,
               v_dtypes: tuple, row_ptr, col_idx, N, K, k_contiguous: bool = False) -> tuple[int, int, int]:
    """Shapes, dtypes and devices of x and the BSR weight; returns (M, bk, bn).

    values is [nnzb, bk, bn] (float blocks) or, with k_contiguous, [nnzb, bn, bk] (int8).

    The contents of row_ptr / col_idx are not checked: on a GPU that costs a device sync
    on every call. They are built once by ``dense_to_bsr`` (or pysparse.formats).
    """
    _check_tensor(x, x_name, "[M, K]", x_dtypes, 2)
    dev = x.device
    form = "[nnzb, bn, bk]" if k_contiguous else "[nnzb, bk, bn]"
    _check_tensor(values, v_name, f"{form} blocks", v_dtypes, 3, dev)
    for v, what in ((N, "N"), (K, "K")):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"{what} must be an int >= 0, got {v!r}")
    if k_contiguous:
        nnzb, bn, bk = values.shape
    else:
        nnzb, bk, bn = values.shape
    if not (_is_pow2(bk) and _is_pow2(bn) and MIN_BLOCK <= min(bk, bn) and max(bk, bn) <= MAX_BLOCK):
        raise ValueError(f"{v_name} must be {form} blocks with bk and bn powers of two in "
                         f"{MIN_BLOCK}..{MAX_BLOCK} (tl.dot needs >= 16), got bk = {bk}, bn = {bn}")
    if k_contiguous and bk < MIN_INT8_BK and dev.type == "cuda":
        raise ValueError(f"{v_name}: int8 blocks need bk >= {MIN_INT8_BK} on a GPU (an 8-bit tl.dot needs "
                         f"K >= {MIN_INT8_BK}, one int8 MMA k-step), got bk = {bk}; use blocks of "
                         f"{MIN_INT8_BK}..{MAX_BLOCK} inputs (pysparse's int8 blocks are 64 x 64)")
    if x.shape[1] != K:
        raise ValueError(f"{x_name} must be [M, K] with K = {K}, got shape {tuple(x.shape)}")
    R = (N + bn - 1) // bn
    _check_tensor(row_ptr, "row_ptr", "[R + 1] block row starts", (torch.int32,), 1, dev)
    if row_ptr.shape[0] != R + 1:
        raise ValueError(f"row_ptr must have shape [ceil(N / bn) + 1] = [{R + 1}], "
                         f"got {tuple(row_ptr.shape)}")
    _check_tensor(col_idx, "col_idx", "[nnzb] block columns", (torch.int32,), 1, dev)
    if col_idx.shape[0] != nnzb:
        raise ValueError(f"col_idx must have shape [nnzb] = [{nnzb}] ({v_name}.shape[0]), "
                         f"got {tuple(col_idx.shape)}")
    return x.shape[0], bk, bn


def _check_vector(t, name: str, length: int, length_name: str, device: torch.device) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a float32 tensor of shape [{length_name}]")
    if t.dtype != torch.float32:
        raise ValueError(f"{name} must be float32, got {t.dtype}")
    if t.dim() != 1 or t.shape[0] != length:
        raise ValueError(f"{name} must have shape [{length_name}] = [{length}], "
                         f"got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but x is on {device}; "
                         "all tensors must be on the same device")


def _check_int8_K(K: int) -> None:
    if K > MAX_K:
        raise ValueError(f"K = {K} is too large: the int32 accumulator is exact only for "
                         f"K <= {MAX_K}")


def _launch(x, values, row_ptr, col_idx, out, xs, ws, bias, M, N, K, *, int8: bool,
            epilogue: bool, has_bias: bool, relu: bool) -> None:
    if x.device.type == "cuda" and x.device.index != torch.cuda.current_device():
        # Triton launches on the current device; the tensors may live on another one.
        with torch.cuda.device(x.device):
            return _launch(x, values, row_ptr, col_idx, out, xs, ws, bias, M, N, K, int8=int8,
                           epilogue=epilogue, has_bias=has_bias, relu=relu)
    if int8:  # K-major [nnzb, bn, bk]
        bn, bk = values.shape[1], values.shape[2]
        stride_vk, stride_vn = values.stride(2), values.stride(1)
    else:  # [nnzb, bk, bn]
        bk, bn = values.shape[1], values.shape[2]
        stride_vk, stride_vn = values.stride(1), values.stride(2)
    R = (N + bn - 1) // bn
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * R,)
    extra = {}
    if int8 and epilogue:
        # No FMA contraction: y * x_scale + bias must round twice, as on the CPU paths.
        # Only here: the float path's epilogue has no multiply, and its fp32 FMA dot
        # wants fused multiply-adds. (The interpreter ignores compile options.)
        extra["enable_fp_fusion"] = False
    const = dict(INT8=int8, EPILOGUE=epilogue, HAS_BIAS=has_bias, RELU=relu, UPCAST_BF16=_INTERPRET, BN=bn, BK=bk)
    args = (x, values, row_ptr, col_idx, out, xs, ws, bias, M, N, K, _m_bucket(M),
            x.stride(0), x.stride(1), values.stride(0), stride_vk, stride_vn,
            out.stride(0), out.stride(1), xs.stride(0), ws.stride(0), bias.stride(0))
    fixed = fixed_config_enabled()
    if LAUNCH_LOG is not None:
        LAUNCH_LOG.append(("bsr", {"M": M, "N": N, "K": K, "x": str(x.dtype), "v": str(values.dtype),
                                   "out": str(out.dtype), "fixed": fixed, **const}))
    if fixed:
        cfg = fixed_config(M, bk, bn, x.element_size(), values.element_size())
        _bsr_kernel.fn[grid](*args, **const, **cfg.all_kwargs(), **extra)
    else:
        _bsr_kernel[grid](*args, **const, **extra)


def _finish(y: torch.Tensor, bias: Optional[torch.Tensor], relu: bool, out: torch.Tensor) -> torch.Tensor:
    """The kernel's epilogue in torch, for calls with nothing to accumulate (no launch)."""
    if bias is not None:
        y = y + bias[None, :]
    if relu:
        y = torch.relu(y)
    return out.copy_(y)


# ------------------------------------------------------------------------------ API
def bsr_linear_triton(x: torch.Tensor, values: torch.Tensor, row_ptr: torch.Tensor,
                      col_idx: torch.Tensor, bias: Optional[torch.Tensor], N: int, K: int,
                      relu: bool = False) -> torch.Tensor:
    """Block-sparse linear layer ``y = relu?(x @ W^T + bias)`` with W in BSR form.

    Args:
        x: [M, K] float32, bfloat16 or float16 (any strides). It is cast to the weight's
            dtype before the products (bf16 rounded to nearest even, as ``x.to``).
        values: [nnzb, bk, bn] blocks, k-major, float32, bfloat16 or float16; bk and bn
            powers of two in 16..128.
        row_ptr: int32 [ceil(N / bn) + 1]; col_idx: int32 [nnzb] (see the module docstring).
        bias: float32 [N] or None.
        N, K: the dense weight's shape.
        relu: apply ReLU after the bias (NaN stays NaN, as torch.relu).

    Returns:
        [M, N] in x.dtype. Products and sums are fp32 (fp32 weights: full fp32 products,
        not tf32), then + bias, ReLU, one rounding to x.dtype.

    Raises:
        ValueError naming the offending argument for wrong dtypes, shapes, block sizes or
        devices. The contents of row_ptr / col_idx are trusted (not checked).
    """
    M, bk, bn = _check_bsr(x, "x", _FLOAT_DTYPES, values, "values", _FLOAT_DTYPES, row_ptr, col_idx, N, K)
    if bias is not None:
        _check_vector(bias, "bias", N, "N", x.device)
    out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M == 0 or N == 0:
        return out
    if values.shape[0] == 0 or K == 0:
        # No block (an all-zero layer) or an empty sum: no launch with zero-size
        # (possibly null) operands; the same epilogue on acc = 0.
        return _finish(torch.zeros((M, N), dtype=torch.float32, device=x.device), bias, relu, out)
    b = values if bias is None else bias  # unused stand-in when HAS_BIAS is False
    _launch(x, values, row_ptr, col_idx, out, b, b, b, M, N, K, int8=False, epilogue=True,
            has_bias=bias is not None, relu=bool(relu))
    return out


def bsr_int8_mm_triton(x_q: torch.Tensor, values_q: torch.Tensor, row_ptr: torch.Tensor,
                       col_idx: torch.Tensor, N: int, K: int) -> torch.Tensor:
    """Exact block-sparse int8 GEMM: int8 ``x_q`` [M, K] times the BSR int8 weight
    (``values_q`` int8 [nnzb, bn, bk], K contiguous: ``dense_to_bsr_int8``) transposed ->
    int32 [M, N]. bk >= 32 on a GPU.

    The sums are exact for K <= MAX_K (131071).
    """
    M, bk, bn = _check_bsr(x_q, "x_q", (torch.int8,), values_q, "values_q", (torch.int8,), row_ptr,
                           col_idx, N, K, k_contiguous=True)
    _check_int8_K(K)
    out = torch.empty((M, N), dtype=torch.int32, device=x_q.device)
    if M == 0 or N == 0:
        return out
    if values_q.shape[0] == 0 or K == 0:
        return out.zero_()
    dummy = out.view(-1)  # the epilogue pointers are unused (EPILOGUE=False)
    _launch(x_q, values_q, row_ptr, col_idx, out, dummy, dummy, dummy, M, N, K, int8=True,
            epilogue=False, has_bias=False, relu=False)
    return out


def bsr_int8_linear_triton(x_q: torch.Tensor, x_scale: torch.Tensor, values_q: torch.Tensor,
                           row_ptr: torch.Tensor, col_idx: torch.Tensor, w_scale: torch.Tensor,
                           bias: Optional[torch.Tensor], N: int, K: int, relu: bool = False,
                           out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Block-sparse quantized linear layer on int8 operands, dequantization fused in.

    Args:
        x_q: int8 [M, K] activations.
        x_scale: float32 [M], one scale per row (a stride-0 expand of one scale is fine).
        values_q: int8 [nnzb, bn, bk] weight blocks, K contiguous (``dense_to_bsr_int8``;
            bk, bn powers of two in 16..128, bk >= 32 on a GPU).
        row_ptr, col_idx: the BSR structure (int32 [ceil(N / bn) + 1], int32 [nnzb]).
        w_scale: float32 [N], one scale per output channel.
        bias: float32 [N] or None.
        N, K: the dense weight's shape (K <= MAX_K).
        relu: ReLU after the bias (NaN stays NaN).
        out_dtype: torch.float32, torch.bfloat16 or torch.float16.

    Returns:
        ``relu?(((float32(acc) * w_scale) * x_scale[:, None]) + bias)`` as ``out_dtype``
        [M, N], each float operation rounded to float32 in that order (as the CPU kernels);
        ``acc`` is the exact int32 sum of the int8 products.
    """
    M, bk, bn = _check_bsr(x_q, "x_q", (torch.int8,), values_q, "values_q", (torch.int8,), row_ptr,
                           col_idx, N, K, k_contiguous=True)
    _check_int8_K(K)
    dev = x_q.device
    _check_vector(x_scale, "x_scale", M, "M", dev)
    _check_vector(w_scale, "w_scale", N, "N", dev)
    if bias is not None:
        _check_vector(bias, "bias", N, "N", dev)
    if out_dtype not in _FLOAT_DTYPES:
        raise ValueError(f"out_dtype must be torch.float32, torch.bfloat16 or torch.float16, "
                         f"got {out_dtype}")
    out = torch.empty((M, N), dtype=out_dtype, device=dev)
    if M == 0 or N == 0:
        return out
    if values_q.shape[0] == 0 or K == 0:
        # acc = 0: the same float operations (a NaN row scale still makes a NaN row).
        y = (torch.zeros((M, N), dtype=torch.float32, device=dev) * w_scale[None, :]) * x_scale[:, None]
        return _finish(y, bias, relu, out)
    _launch(x_q, values_q, row_ptr, col_idx, out, x_scale, w_scale, w_scale if bias is None else bias,
            M, N, K, int8=True, epilogue=True, has_bias=bias is not None, relu=bool(relu))
    return out


# ------------------------------------------------------------------------------ conversion
def dense_to_bsr(w: torch.Tensor, bn: int, bk: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Dense W [N, K] -> BSR ``(values [nnzb, bk, bn], row_ptr int32 [R + 1], col_idx int32 [nnzb])``.

    Keeps exactly the (bn x bk) blocks that hold a nonzero (NaN counts as nonzero), in
    row-major block order; edge blocks are zero padded. ``values`` keeps w's dtype and
    device, and is stored k-major: ``values[j, k, n] = W[r*bn + n, col_idx[j]*bk + k]``.
    Pure torch, any device (on a GPU the block count costs one sync). Any bn, bk >= 1
    (the Triton kernels need powers of two in 16..128).
    """
    if not isinstance(w, torch.Tensor) or w.dim() != 2:
        raise ValueError(f"w must be a 2-D tensor [N, K], got "
                         f"{tuple(w.shape) if isinstance(w, torch.Tensor) else type(w).__name__}")
    for v, name in ((bn, "bn"), (bk, "bk")):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an int >= 1, got {v!r}")
    N, K = w.shape
    R, KB = (N + bn - 1) // bn, (K + bk - 1) // bk
    wp = w.new_zeros((R * bn, KB * bk))
    wp[:N, :K] = w
    blocks = wp.reshape(R, bn, KB, bk).permute(0, 2, 3, 1)  # [R, KB, bk, bn]: k-major blocks
    mask = blocks.ne(0).flatten(2).any(-1)  # [R, KB]
    values = blocks[mask].contiguous()  # boolean indexing walks the mask row-major, as nonzero()
    row_ptr = torch.zeros(R + 1, dtype=torch.int32, device=w.device)
    row_ptr[1:] = torch.cumsum(mask.sum(1), 0)
    col_idx = mask.nonzero()[:, 1].to(torch.int32).contiguous()
    return values, row_ptr, col_idx


def dense_to_bsr_int8(w: torch.Tensor, bn: int, bk: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """int8 W [N, K] -> BSR ``(values [nnzb, bn, bk] K contiguous, row_ptr, col_idx)``: the
    layout of the int8 kernels (``values[j, n, k] = W[r*bn + n, col_idx[j]*bk + k]``)."""
    values, row_ptr, col_idx = dense_to_bsr(w, bn, bk)
    return values.transpose(1, 2).contiguous(), row_ptr, col_idx
