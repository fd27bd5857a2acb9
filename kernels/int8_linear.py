"""Triton int8 GEMM with a fused dequantization epilogue: the CUDA path of pysparse::int8_linear.

``int8_linear_triton`` computes ``y = ((float(x_q @ w_q^T) * w_scale) * x_scale) + bias`` in
one kernel; ``int8_mm_triton`` is the same kernel without the epilogue (exact int32 out).

The weight is read as ``w_q`` [N, K] row-major, i.e. as B^T: each B tile [BLOCK_K, BLOCK_N]
is contiguous along K, the "K-major" operand layout that Hopper's int8 wgmma requires, so
the weight needs no transposed copy.

Under ``TRITON_INTERPRET=1`` (the CPU tests) the autotuner gets a single small config:
the interpreter runs every program in numpy, so tuning would only cost time. That choice
is made when this module is imported, as Triton itself decides interpretation when the
kernel is decorated.

``PYSPARSE_TRITON_FIXED_CONFIG=1`` (read at each launch) skips autotuning: each launch runs
the first config of its M bucket (``fixed_config``) straight through the jitted kernel.
Correctness checks use it (scripts/gpu_check.py): one compile per M bucket, no benchmarks.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

__all__ = ["int8_linear_triton", "int8_mm_triton", "MAX_K"]

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
FIXED_CONFIG_ENV = "PYSPARSE_TRITON_FIXED_CONFIG"

# When not None, every launch appends (kernel, signature) here (scripts/gpu_check.py
# counts a run's compiled variants from it).
LAUNCH_LOG: Optional[list] = None


def fixed_config_enabled() -> bool:
    return os.environ.get(FIXED_CONFIG_ENV, "") not in ("", "0")

# The int32 accumulator is exact while K * 128 * 128 <= 2**31 - 1 (all -128 x -128).
MAX_K = (2**31 - 1) // (128 * 128)  # 131071

_OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _config(bm: int, bn: int, bk: int, warps: int, stages: int) -> triton.Config:
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8},
                         num_warps=warps, num_stages=stages)


def _configs() -> list[triton.Config]:
    if _INTERPRET:
        # One config: the autotuner then skips benchmarking. Small M/N blocks make the
        # tests' odd shapes cross block edges; BLOCK_K 64 keeps the loop short.
        return [_config(16, 32, 64, 4, 1)]
    return gpu_configs()


def gpu_configs() -> list[triton.Config]:
    """The configs tuned on a GPU; the first of each M bucket (``_prune``) is the fixed
    config of correctness runs."""
    return [
        # Decode (M <= 16): one 16-row MMA tile. The GEMM is bound by reading the weight,
        # so narrow N blocks (and long K blocks) give enough CTAs to fill all SMs.
        _config(16, 32, 256, 4, 4),
        _config(16, 64, 256, 4, 4),
        _config(16, 128, 128, 4, 4),
        # Small batches.
        _config(32, 64, 128, 4, 4),
        _config(64, 64, 128, 4, 4),
        _config(64, 128, 128, 4, 4),
        # Prefill: wgmma-sized tiles (int8 tiles are half the bytes of bf16 ones, so
        # BLOCK_K 128 with 3-4 stages still fits shared memory).
        _config(128, 128, 128, 8, 3),
        _config(128, 256, 128, 8, 3),
        _config(128, 128, 64, 4, 4),
    ]


def _prune(configs, named_args, **kwargs):
    """Try only block heights that suit M: tuning 128-row tiles for M = 1 wastes time."""
    mb = named_args["M_BUCKET"]
    if mb <= 16:
        keep = [c for c in configs if c.kwargs["BLOCK_M"] == 16]
    elif mb <= 64:
        keep = [c for c in configs if c.kwargs["BLOCK_M"] <= 64]
    else:
        keep = [c for c in configs if c.kwargs["BLOCK_M"] >= 64]
    return keep or configs


def fixed_config(M: int) -> triton.Config:
    """The config a fixed-config launch runs: the first that suits M's bucket."""
    return _prune(_configs(), {"M_BUCKET": _m_bucket(M)})[0]


def _m_bucket(M: int) -> int:
    """Autotuning key for M: decode sizes share one bucket, then powers of two."""
    return 16 if M <= 16 else min(triton.next_power_of_2(M), 4096)


@triton.jit
def _f32_to_bf16_rne(y):
    """float32 -> bfloat16, rounded to nearest even (as torch and cvt.rn.bf16.f32 round).

    Spelled out in integer ops because the interpreter's float -> bfloat16 cast truncates,
    and the CPU tests compare bfloat16 outputs bit for bit; on the GPU it is the same
    rounding as the hardware conversion. NaN stays NaN (0x7fc0; payload bits may differ).
    """
    u = y.to(tl.uint32, bitcast=True)
    r = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    r = tl.where(y != y, 0x7FC0, r)
    return r.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.autotune(configs=_configs(), key=["M_BUCKET", "N", "K"],
                 prune_configs_by={"early_config_prune": _prune})
@triton.jit(do_not_specialize=["M_BUCKET"])
def _int8_gemm_kernel(
    a_ptr, b_ptr, c_ptr, xs_ptr, ws_ptr, bias_ptr,
    M, N, K, M_BUCKET,
    stride_am, stride_ak, stride_bn, stride_bk, stride_cm, stride_cn,
    stride_xs, stride_ws, stride_bias,
    EPILOGUE: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """C[M, N] = A[M, K] @ B[N, K]^T in int32, then (if EPILOGUE) the dequantization."""
    # Grouped program order: GROUP_M row blocks share each weight column block while it
    # is still in L2.
    pid = tl.program_id(0)
    # Builtins only (integer ceil-division, not tl.cdiv; tl.full, not tl.zeros): the
    # @triton.jit helpers of triton.language are interpreted or compiled depending on
    # TRITON_INTERPRET when triton was first imported, and with builtins the kernel also
    # runs interpreted in a process that imported triton before setting it.
    num_pid_m = (M + BLOCK_M - 1) // BLOCK_M
    num_pid_n = (N + BLOCK_N - 1) // BLOCK_N
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    # Rows / columns past the edge wrap onto valid ones, so the loads need a mask on K
    # only (the extra results are never stored). int64 row offsets: a weight such as a
    # 256k x 8k LM head has more than 2**31 elements.
    ram = (rm % M).to(tl.int64)
    rbn = (rn % N).to(tl.int64)
    a_ptrs = a_ptr + ram[:, None] * stride_am + rk[None, :] * stride_ak
    b_ptrs = b_ptr + rbn[None, :] * stride_bn + rk[:, None] * stride_bk

    acc = tl.full((BLOCK_M, BLOCK_N), 0, dtype=tl.int32)
    for k in range(0, (K + BLOCK_K - 1) // BLOCK_K):
        k_left = K - k * BLOCK_K
        # Zero padding past K adds nothing to the integer sum.
        a = tl.load(a_ptrs, mask=rk[None, :] < k_left, other=0)
        b = tl.load(b_ptrs, mask=rk[:, None] < k_left, other=0)
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    mask_m = rm < M
    mask_n = rn < N
    c_ptrs = c_ptr + rm[:, None].to(tl.int64) * stride_cm + rn[None, :] * stride_cn
    c_mask = mask_m[:, None] & mask_n[None, :]
    if EPILOGUE:
        ws = tl.load(ws_ptr + rn * stride_ws, mask=mask_n, other=0.0)
        xs = tl.load(xs_ptr + rm * stride_xs, mask=mask_m, other=0.0)
        # The order of the CPU kernels and pysparse.reference: (acc * w_scale) * x_scale,
        # then + bias, each rounded to float32 (the launch disables FMA contraction), so
        # the CUDA and CPU ops round alike.
        y = acc.to(tl.float32) * ws[None, :]
        y = y * xs[:, None]
        if HAS_BIAS:
            bias = tl.load(bias_ptr + rn * stride_bias, mask=mask_n, other=0.0)
            y = y + bias[None, :]
        if c_ptr.dtype.element_ty == tl.bfloat16:
            tl.store(c_ptrs, _f32_to_bf16_rne(y), mask=c_mask)
        else:
            tl.store(c_ptrs, y.to(c_ptr.dtype.element_ty), mask=c_mask)
    else:
        tl.store(c_ptrs, acc, mask=c_mask)


# ------------------------------------------------------------------------------ checks
def _check_int8_2d(t, name: str, what: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor ({what}), got {type(t).__name__}")
    if t.dtype != torch.int8:
        raise ValueError(f"{name} must be int8 ({what}), got {t.dtype}")
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D ({what}), got shape {tuple(t.shape)}")


def _check_operands(a: torch.Tensor, a_name: str, w_q: torch.Tensor) -> tuple[int, int, int]:
    _check_int8_2d(a, a_name, "[M, K]")
    _check_int8_2d(w_q, "w_q", "[N, K]")
    M, K = a.shape
    N = w_q.shape[0]
    if w_q.shape[1] != K:
        raise ValueError(f"w_q must be [N, K] with K = {a_name}.shape[1] = {K}, "
                         f"got shape {tuple(w_q.shape)}")
    if w_q.device != a.device:
        raise ValueError(f"w_q is on {w_q.device} but {a_name} is on {a.device}; "
                         "both must be on the same device")
    if K > MAX_K:
        raise ValueError(f"K = {K} is too large: the int32 accumulator is exact only for "
                         f"K <= {MAX_K}")
    return M, N, K


def _check_vector(t, name: str, length: int, length_name: str, device: torch.device) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a float32 tensor of shape [{length_name}]")
    if t.dtype != torch.float32:
        raise ValueError(f"{name} must be float32, got {t.dtype}")
    if t.dim() != 1 or t.shape[0] != length:
        raise ValueError(f"{name} must have shape [{length_name}] = [{length}], "
                         f"got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but x_q is on {device}; "
                         "all tensors must be on the same device")


def _launch(a, w_q, out, xs, ws, bias, M, N, K, epilogue: bool, has_bias: bool) -> None:
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)
    if a.device.type == "cuda" and a.device.index != torch.cuda.current_device():
        # Triton launches on the current device; the tensors may live on another one.
        with torch.cuda.device(a.device):
            return _launch(a, w_q, out, xs, ws, bias, M, N, K, epilogue, has_bias)
    args = (a, w_q, out, xs, ws, bias, M, N, K, _m_bucket(M),
            a.stride(0), a.stride(1), w_q.stride(0), w_q.stride(1), out.stride(0), out.stride(1),
            xs.stride(0), ws.stride(0), bias.stride(0))
    const = dict(EPILOGUE=epilogue, HAS_BIAS=has_bias)
    fixed = fixed_config_enabled()
    if LAUNCH_LOG is not None:
        LAUNCH_LOG.append(("int8_gemm", {"M": M, "N": N, "K": K, "out": str(out.dtype), "fixed": fixed, **const}))
    # No FMA contraction: y*x_scale + bias must round twice, as on the CPU paths.
    # (The interpreter ignores compile options.)
    if fixed:
        _int8_gemm_kernel.fn[grid](*args, **const, **fixed_config(M).all_kwargs(), enable_fp_fusion=False)
    else:
        _int8_gemm_kernel[grid](*args, **const, enable_fp_fusion=False)


# ------------------------------------------------------------------------------ API
def int8_mm_triton(a: torch.Tensor, w_q: torch.Tensor) -> torch.Tensor:
    """Exact int8 GEMM: ``a`` int8 [M, K] times ``w_q`` int8 [N, K] transposed -> int32 [M, N].

    Any strides are accepted (row-major, K contiguous, is the fast case). The result is
    exact for K <= MAX_K (131071): the sums are accumulated in int32.
    """
    M, N, K = _check_operands(a, "a", w_q)
    out = torch.empty((M, N), dtype=torch.int32, device=a.device)
    if M == 0 or N == 0:
        return out
    if K == 0:  # an empty sum; no launch with zero-size (possibly null) operands
        return out.zero_()
    # The epilogue pointers are unused (EPILOGUE=False); any tensor on the device will do.
    dummy = out.view(-1)
    _launch(a, w_q, out, dummy, dummy, dummy, M, N, K, epilogue=False, has_bias=False)
    return out


def int8_linear_triton(x_q: torch.Tensor, x_scale: torch.Tensor, w_q: torch.Tensor,
                       w_scale: torch.Tensor, bias: Optional[torch.Tensor],
                       out_dtype: torch.dtype) -> torch.Tensor:
    """Quantized linear layer on int8 operands with the dequantization fused in.

    Args:
        x_q: int8 [M, K] activations (row-major is the fast case).
        x_scale: float32 [M], one scale per row of ``x_q`` (a stride-0 expand of one
            static scale is fine).
        w_q: int8 [N, K] weights, read as B^T.
        w_scale: float32 [N], one scale per output channel.
        bias: float32 [N] or None.
        out_dtype: torch.float32, torch.bfloat16 or torch.float16.

    Returns:
        ``((float32(x_q @ w_q^T) * w_scale) * x_scale[:, None]) + bias`` as ``out_dtype``
        [M, N], each float operation rounded to float32 in that order; the int8 products
        are summed exactly in int32 (K <= MAX_K).
    """
    M, N, K = _check_operands(x_q, "x_q", w_q)
    dev = x_q.device
    _check_vector(x_scale, "x_scale", M, "M", dev)
    _check_vector(w_scale, "w_scale", N, "N", dev)
    if bias is not None:
        _check_vector(bias, "bias", N, "N", dev)
    if out_dtype not in _OUT_DTYPES:
        raise ValueError(f"out_dtype must be torch.float32, torch.bfloat16 or torch.float16, "
                         f"got {out_dtype}")
    out = torch.empty((M, N), dtype=out_dtype, device=dev)
    if M == 0 or N == 0:
        return out
    if K == 0:
        # Empty sum: the same float operations on acc = 0 (a NaN row scale stays NaN).
        y = (torch.zeros((M, N), dtype=torch.float32, device=dev) * w_scale[None, :]) * x_scale[:, None]
        if bias is not None:
            y = y + bias[None, :]
        return out.copy_(y)
    # Without bias the bias pointer is unused (HAS_BIAS=False); w_scale stands in for it.
    _launch(x_q, w_q, out, x_scale, w_scale, w_scale if bias is None else bias, M, N, K,
            epilogue=True, has_bias=bias is not None)
    return out
