"""CUDA kernels of pysparse's block-sparse ops, on Triton.

Registers, for the "cuda" dispatch key, ``pysparse::bsr_linear`` and
``pysparse::bsr_int8_linear`` (schemas: csrc/ops/registry.cpp). As pysparse._cuda_ops:
importing this module only registers, never touches a CUDA device (so it imports
cleanly on a CPU-only machine), registers nothing when Triton is not installed, and
imports Triton and the kernels (kernels/bsr_linear.py, packaged as pysparse.kernels) on
the first CUDA call.

CUDA weight layouts:

* ``bsr_linear``: values [nnzb, bk, bn], k-major blocks, the same layout as on the CPU;
  float32, bfloat16 or float16 on CUDA (the CPU op takes float32). x is cast to the
  values' dtype before the products; products and sums are float32, then + bias, ReLU,
  one rounding to x's dtype. Blocks the Triton kernel cannot take (sides not powers of
  two in 16..128: tl.dot needs >= 16; the CPU op allows any bk) run a dense PyTorch
  matmul of the reconstructed weight instead, with a warning (once).
* ``bsr_int8_linear``: values int8 [nnzb, 64 n, 64 k], K-major (K contiguous, each block as
  it sits in W: Hopper's int8 wgmma takes B only K-major, so the block loads pipeline),
  NOT the CPU's [nnzb, 4096] VNNI order (pysparse.formats.int8_blocks_to_kmajor converts; BlockSparseLinear does
  it when moved to a GPU). colsum int32 and w_scale float32 are [1, round_up(N, 64)] as
  on the CPU; colsum is not needed by the s8 x s8 kernel. Activations are quantized by
  ``pysparse._cuda_ops.quantize_rows`` (the CPU kernels' float operations) and the
  epilogue ``((float(acc) * w_scale) * x_scale) + bias``, ReLU, is the CPU one, so the
  op equals the CPU op bit for bit.

The contents of row_ptr / col_idx are trusted on CUDA (checking them costs a device
sync per call); the CPU op checks them. They are built once, by pysparse.formats.
"""
from __future__ import annotations

import importlib.util
import math
import warnings
from typing import Optional

import torch

from . import _C  # noqa: F401  (the op schemas must exist before kernels register)
from . import formats
from ._cuda_ops import load_kernel_module, quantize_rows
from .formats import round_up

__all__ = ["HAS_TRITON", "REGISTERED", "bsr_linear_cuda", "bsr_int8_linear_cuda"]

INT8_BLOCK = formats.INT8_BLOCK[0]  # one int8 block is 64 x 64 on every device

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _triton_kernels():
    """The kernel module, imported on first use (importing pysparse neither imports triton
    nor fixes its TRITON_INTERPRET mode)."""
    global _kernels
    if _kernels is None:
        try:
            _kernels = load_kernel_module("bsr_linear")
        except Exception as e:
            raise RuntimeError(f"pysparse: the Triton block-sparse kernels failed to load "
                               f"({type(e).__name__}: {e})") from e
    return _kernels


_kernels = None
HAS_TRITON = importlib.util.find_spec("triton") is not None
REGISTERED = False
_warned_fallback = False


# ------------------------------------------------------------------------------ checks
def _check_x(x, K: int, op: str, dev: torch.device) -> None:
    if not isinstance(x, torch.Tensor) or x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{op}: x must be float32, bfloat16 or float16, got "
                         f"{getattr(x, 'dtype', type(x).__name__)}")
    if x.dim() < 1 or x.shape[-1] != K:
        raise ValueError(f"{op}: x must have last dimension in_features={K}, got shape {tuple(x.shape)}")
    if x.device != dev:
        raise ValueError(f"{op}: x is on {x.device} but the weight blocks are on {dev}")


def _check_bias(bias, N: int, op: str, dev: torch.device) -> None:
    if bias is not None and (bias.dtype != torch.float32 or bias.dim() != 1 or bias.shape[0] != N
                             or bias.device != dev):
        raise ValueError(f"{op}: bias must be a float32 tensor of shape [{N}] on {dev}, got "
                         f"{bias.dtype} {tuple(bias.shape)} on {bias.device}")


def _block_unsupported(bk: int, bn: int, lo: int, hi: int) -> Optional[str]:
    """Why the Triton kernel cannot take (bk, bn) blocks, or None."""
    for side, v in (("bk", bk), ("bn", bn)):
        if v < lo:
            return f"{side} = {v} < {lo} (tl.dot needs every tile side >= {lo})"
        if v > hi:
            return f"{side} = {v} > {hi} (the kernel's shared-memory limit)"
        if v & (v - 1):
            return f"{side} = {v} is not a power of two (Triton tiles are)"
    return None


# ------------------------------------------------------------------------------ fallback
def _dense_weight(values: torch.Tensor, row_ptr: torch.Tensor, col_idx: torch.Tensor, N: int, K: int) -> torch.Tensor:
    """The dense weight [N, K] in values' dtype, built on values' device without a host
    sync (pysparse.formats.bsr_to_dense)."""
    return formats.bsr_to_dense(values, row_ptr, col_idx, N, K)


def _bsr_linear_dense(x2, values, row_ptr, col_idx, bias, N: int, K: int, relu: bool) -> torch.Tensor:
    """bsr_linear in PyTorch with the Triton kernel's rounding: x cast to the values'
    dtype, float32 products and sums (fp32 matmul: true fp32 unless the user enabled
    TF32), + bias, ReLU (NaN stays NaN), one cast to x's dtype. One difference: a NaN or
    Inf in x reaches every output of its row here (it meets the pruned zeros too), while
    the block kernels spread it only through the stored blocks."""
    w = _dense_weight(values, row_ptr, col_idx, N, K).float()
    y = x2.to(values.dtype).float() @ w.T
    if bias is not None:
        y = y + bias
    if relu:
        y = torch.relu(y)
    return y.to(x2.dtype)


# ------------------------------------------------------------------------------ the ops
def bsr_linear_cuda(x: torch.Tensor, values: torch.Tensor, row_ptr: torch.Tensor, col_idx: torch.Tensor,
                    bias: Optional[torch.Tensor], N: int, K: int, relu: bool = False) -> torch.Tensor:
    """pysparse::bsr_linear on CUDA: ``relu?(x @ W^T + bias)`` with W in BSR form; a row of x
    holding a NaN or an Inf gives an all-NaN output row (as the dense product does).

    x [..., K] float32/bfloat16/float16; values [nnzb, bk, bn] k-major float32/bfloat16/
    float16 blocks; row_ptr int32 [ceil(N / bn) + 1]; col_idx int32 [nnzb]; bias float32
    [N] or None. Returns [..., N] in x's dtype. Blocks with sides outside the Triton
    kernel's powers of two in 16..128 run a dense PyTorch matmul (warned once).
    """
    global _warned_fallback
    op = "bsr_linear"
    if not isinstance(values, torch.Tensor) or values.dim() != 3 or values.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{op}: values must be float32, bfloat16 or float16 blocks [nnzb, bk, bn], got "
                         f"{getattr(values, 'dtype', type(values).__name__)} "
                         f"{tuple(getattr(values, 'shape', ()))}")
    dev = values.device
    _check_x(x, K, op, dev)
    _check_bias(bias, N, op, dev)
    K8 = _triton_kernels()
    x2 = x.reshape(math.prod(x.shape[:-1]), K)  # not (-1, K): K may be 0
    _, bk, bn = values.shape
    why = _block_unsupported(bk, bn, K8.MIN_BLOCK, K8.MAX_BLOCK)
    if why is None:
        y = K8.bsr_linear_triton(x2, values, row_ptr, col_idx, bias, N, K, bool(relu))
    else:
        if N < 0 or K < 0:
            raise ValueError(f"{op}: N and K must be >= 0, got N={N}, K={K}")
        R = -(-N // bn)
        for t, name, shape in ((row_ptr, "row_ptr", (R + 1,)), (col_idx, "col_idx", (values.shape[0],))):
            if t.dtype != torch.int32 or tuple(t.shape) != shape or t.device != dev:
                raise ValueError(f"{op}: {name} must be an int32 tensor of shape {list(shape)} on {dev}, "
                                 f"got {t.dtype} {tuple(t.shape)} on {t.device}")
        if not _warned_fallback:
            _warned_fallback = True
            warnings.warn(f"pysparse: bsr_linear blocks (bn, bk) = ({bn}, {bk}) do not fit the Triton "
                          f"kernel on CUDA: {why}; running a dense PyTorch matmul of the reconstructed "
                          "weight instead (slower; use blocks with sides 16..128, powers of two)",
                          RuntimeWarning, stacklevel=2)
        y = _bsr_linear_dense(x2, values, row_ptr, col_idx, bias, N, K, bool(relu))
    # the op's rule, as on the CPU (csrc/ops/bsr_linear.cpp): a row of x holding a NaN or an Inf
    # gives an all-NaN output row, whichever blocks are stored (a row's float64 sum is NaN
    # exactly then; 0 * it is NaN there, 0 elsewhere)
    y = y + x2.sum(-1, keepdim=True, dtype=torch.float64).mul_(0).to(y.dtype)
    return y.reshape(*x.shape[:-1], N)


def _static_scale(x_scale: Optional[torch.Tensor], op: str, dev: torch.device) -> Optional[torch.Tensor]:
    """Check a static activation scale and put it on dev (as _cuda_ops.int8_linear_cuda)."""
    if x_scale is None:
        return None
    if not isinstance(x_scale, torch.Tensor) or x_scale.numel() != 1 or x_scale.dtype != torch.float32:
        raise ValueError(f"{op}: x_scale must be a one-element float32 tensor (a static per-tensor "
                         f"activation scale), got {getattr(x_scale, 'dtype', None)} "
                         f"{tuple(getattr(x_scale, 'shape', ()))}")
    if x_scale.device.type == "cpu" and dev.type != "cpu":
        # A host scalar: checked here for free (on the device a check costs a sync per
        # call) and put on the device by a fill, not a blocking copy.
        s = float(x_scale.reshape(()))
        if not (s > 0 and s != float("inf")):
            raise ValueError(f"{op}: x_scale must be finite and > 0, got {s}")
        return torch.full((1,), s, dtype=torch.float32, device=dev)
    if x_scale.device != dev:
        raise ValueError(f"{op}: x_scale is on {x_scale.device} but x is on {dev}")
    return x_scale


def bsr_int8_linear_cuda(x: torch.Tensor, values: torch.Tensor, row_ptr: torch.Tensor, col_idx: torch.Tensor,
                         colsum: torch.Tensor, w_scale: torch.Tensor, bias: Optional[torch.Tensor],
                         x_scale: Optional[torch.Tensor], N: int, K: int, relu: bool = False) -> torch.Tensor:
    """pysparse::bsr_int8_linear on CUDA: quantize x (PyTorch), block-sparse int8 GEMM and
    epilogue (Triton).

    x [..., K] float32/bfloat16/float16; values int8 [nnzb, 64 n, 64 k] K-major; colsum int32
    and w_scale float32 [1, round_up(N, 64)]; bias float32 [N] or None; x_scale None
    (dynamic per row) or a one-element float32 tensor. Returns [..., N] in x's dtype.
    """
    op = "bsr_int8_linear"
    B = INT8_BLOCK
    if not isinstance(values, torch.Tensor) or values.dtype != torch.int8:
        raise ValueError(f"{op}: values must be int8 blocks, got {getattr(values, 'dtype', type(values).__name__)}")
    if values.dim() != 3 or tuple(values.shape[1:]) != (B, B):
        hint = (" (that is the CPU layout: convert it with pysparse.formats.int8_blocks_to_kmajor; "
                "BlockSparseLinear does this when moved to a GPU)") if values.dim() == 2 else ""
        raise ValueError(f"{op}: on CUDA values must be K-major int8 blocks [nnzb, {B} n, {B} k], got shape "
                         f"{tuple(values.shape)}{hint}")
    dev = values.device
    _check_x(x, K, op, dev)
    _check_bias(bias, N, op, dev)
    if N < 0 or K < 0:
        raise ValueError(f"{op}: N and K must be >= 0, got N={N}, K={K}")
    Np = round_up(N, B)
    for t, name, dt in ((colsum, "colsum", torch.int32), (w_scale, "w_scale", torch.float32)):
        if (not isinstance(t, torch.Tensor) or t.dtype != dt or tuple(t.shape) != (1, Np) or t.device != dev):
            raise ValueError(f"{op}: {name} must be a {str(dt).split('.')[-1]} tensor of shape [1, {Np}] on "
                             f"{dev}, got {getattr(t, 'dtype', None)} {tuple(getattr(t, 'shape', ()))} on "
                             f"{getattr(t, 'device', None)}")
    x_scale = _static_scale(x_scale, op, dev)
    out_shape = (*x.shape[:-1], N)
    if N == 0 or math.prod(x.shape[:-1]) == 0:
        return x.new_empty(out_shape)
    if K == 0:  # empty reduction: relu?(bias), as the CPU op; a fresh tensor, never bias itself
        out = x.new_empty(out_shape)
        if bias is None:
            return out.zero_()
        return out.copy_((torch.relu(bias) if relu else bias).expand(out_shape))
    q, xs = quantize_rows(x.reshape(-1, K), x_scale)
    y = _triton_kernels().bsr_int8_linear_triton(q, xs, values, row_ptr, col_idx, w_scale[0, :N], bias, N, K,
                                                 bool(relu), x.dtype)
    return y.reshape(out_shape)


# ------------------------------------------------------------------------------ registration
def _register() -> None:
    """Register the kernels above for the CUDA dispatch key, once."""
    global REGISTERED
    if REGISTERED or not HAS_TRITON:
        return
    for name, fn in (("bsr_linear", bsr_linear_cuda), ("bsr_int8_linear", bsr_int8_linear_cuda)):
        torch.library.register_kernel(f"pysparse::{name}", "cuda", fn)
    REGISTERED = True


_register()
