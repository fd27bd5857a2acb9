"""CUDA kernels of pysparse's int8 ops, on Triton.

Registers, for the "cuda" dispatch key, ``pysparse::int8_pack``, ``int8_unpack``,
``int8_mm`` and ``int8_linear`` (schemas: csrc/ops/registry.cpp). Importing this module
only registers: it never touches a CUDA device, so it imports cleanly on a CPU-only
machine; it registers nothing when Triton is not installed, and imports Triton and the
kernels (kernels/int8_linear.py, packaged as pysparse.kernels) on the first CUDA call.

CUDA weight layout. The Triton kernel reads the int8 weight as [N, K] row-major (B^T,
K contiguous), so ``int8_pack`` on CUDA returns the weight itself, copied:

* group_size == 0: ``packed`` is [N, K];
* group_size > 0:  ``packed`` is [N, Kp], zero padded to Kp = max(round_up(K, g), g), so
  the group size (Kp / groups) can be read back from the shapes, as on the CPU.

``colsum`` is int32 [G, round_up(N, 64)] (the per-group column sums), as on the CPU;
the s8 x s8 Triton kernel does not need it. The CPU layout ([Np / 16, Kp * 16] tiles) is
not the CUDA one: a weight packed on one device must be packed again on the other
(pysparse.nn.Int8Linear does this when it is moved).

Activations are quantized here in PyTorch, with the float operations of the CPU kernels
and pysparse.reference.quantize_per_row, so the CUDA op rounds like the CPU one.
"""
from __future__ import annotations

import importlib.util
import math
import sys
import warnings
from pathlib import Path
from typing import Optional

import torch

from . import _C  # noqa: F401  (the op schemas must exist before kernels register)
from .formats import PACK_K, PACK_N
from .formats import round_up as _round_up

__all__ = ["HAS_TRITON", "REGISTERED", "quantize_rows", "int8_pack_cuda", "int8_unpack_cuda",
           "int8_mm_cuda", "int8_linear_cuda"]

_OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def load_kernel_module(op: str = "int8_linear"):
    """Import the Triton kernel module kernels/<op>.py (first CUDA call only), as
    pysparse.kernels.<op> when the package is installed, else from the source tree."""
    name = f"pysparse.kernels.{op}"
    try:
        return importlib.import_module(name)  # an installed (or editable) pysparse
    except ModuleNotFoundError as e:
        if e.name not in ("pysparse.kernels", name):
            raise
    # In-place build (setup.py build_ext --inplace, `make gpu-check`): kernels/ sits next
    # to pysparse/ and only becomes pysparse.kernels once the package is installed.
    if name in sys.modules:
        return sys.modules[name]
    path = Path(__file__).resolve().parent.parent / "kernels" / f"{op}.py"
    if not path.is_file():
        raise ModuleNotFoundError(f"pysparse.kernels is not installed and {path} does not exist")
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    try:
        spec.loader.exec_module(mod)
    except BaseException:
        del sys.modules[name]
        raise
    return mod


def _triton_kernels():
    """The kernel module, imported on first use: importing pysparse (on a CPU-only machine
    too) then neither pays for importing triton nor fixes triton's TRITON_INTERPRET mode,
    which triton reads once, when it is first imported."""
    global _kernels
    if _kernels is None:
        try:
            _kernels = load_kernel_module("int8_linear")
        except Exception as e:
            raise RuntimeError(f"pysparse: the Triton int8 kernels failed to load "
                               f"({type(e).__name__}: {e})") from e
    return _kernels


# Registration needs only to know that triton is installed; it is imported on first use.
_kernels = None
HAS_TRITON = importlib.util.find_spec("triton") is not None
REGISTERED = False
_warned_grouped = False


# ------------------------------------------------------------------------------ checks
def _check_weight(packed, colsum, N: int, K: int, op: str) -> tuple[torch.Tensor, int, int]:
    """Validate a CUDA-packed weight; returns (w [N, K] view, groups G, K per group)."""
    if N < 0 or K < 0:
        raise ValueError(f"{op}: N and K must be >= 0, got N={N}, K={K}")
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.int8 or packed.dim() != 2:
        raise ValueError(f"{op}: packed weight must be a 2-D int8 tensor from pysparse::int8_pack, "
                         f"got {getattr(packed, 'dtype', type(packed).__name__)} of shape "
                         f"{tuple(getattr(packed, 'shape', ()))}")
    if not isinstance(colsum, torch.Tensor) or colsum.dtype != torch.int32 or colsum.dim() != 2:
        raise ValueError(f"{op}: colsum must be a 2-D int32 tensor from pysparse::int8_pack")
    if colsum.device != packed.device:
        raise ValueError(f"{op}: colsum is on {colsum.device} but the packed weight is on "
                         f"{packed.device}")
    Np, G = _round_up(N, PACK_N), colsum.shape[0]
    if G < 1 or colsum.shape[1] != Np:
        raise ValueError(f"{op}: colsum has shape {tuple(colsum.shape)}, expected [groups, {Np}] "
                         f"for N={N}")
    rows, Kw = packed.shape
    gk = Kw // G
    per_channel = G == 1 and Kw == K
    grouped = Kw % G == 0 and gk > 0 and gk % PACK_K == 0 and Kw == max(_round_up(K, gk), gk)
    if rows != N or not (per_channel or grouped):
        raise ValueError(
            f"{op}: packed weight has shape {tuple(packed.shape)} and {G} scale group(s), which "
            f"does not hold N={N}, K={K} in the CUDA layout ([N, K], or [N, Kp] padded to the "
            "group size). Was it packed for another layer, or on the CPU (whose tile layout "
            "differs: pack the int8 weight again on the CUDA device)?")
    return packed[:, :K], G, (K if per_channel else gk)


# ------------------------------------------------------------------------------ quantization
def quantize_rows(x2: torch.Tensor, x_scale: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 quantization of each row of ``x2`` [M, K] (K > 0) -> (q int8, scale f32 [M]).

    Dynamic (x_scale None): scale = amax / 127, q = round(clamp(x * (127 / amax), -128, 127));
    a zero row gets scale 1. Static: q = round(clamp(x * (1 / s), -128, 127)), scale s.
    A row holding NaN or Inf gets scale NaN, so its output row is NaN (its q values are
    then irrelevant and not cleaned up: that would cost another pass over x).

    The same float operations as the CPU kernels (csrc/cpu/int8_linear_impl.h). Divisions
    are tensor / tensor on purpose: ``amax / 127.0`` runs on CUDA as amax * (1 / 127) and
    ``127.0 / amax`` as reciprocal(amax) * 127, each rounding twice.
    """
    xf = x2.float()
    # amax is NaN for a row with a NaN and Inf for one with an Inf: one reduction serves
    # as the finiteness check too.
    amax = xf.abs().amax(dim=1)
    finite = torch.isfinite(amax)
    if x_scale is None:
        pos = amax > 0
        c127 = torch.full_like(amax, 127.0)
        scale = torch.where(pos, torch.div(amax, c127), 1.0)
        inv = torch.where(pos, torch.div(c127, amax), 1.0)
    else:
        s = x_scale.reshape(1)
        scale = s.expand(amax.shape[0])
        inv = torch.div(torch.ones_like(s), s)
    q = torch.round(torch.clamp(xf * inv[:, None], -128, 127)).to(torch.int8)
    scale = torch.where(finite, scale, float("nan"))
    return q, scale


# ------------------------------------------------------------------------------ the ops
def int8_pack_cuda(w: torch.Tensor, group_size: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """pysparse::int8_pack on CUDA: (a copy of w [N, K], or [N, Kp] zero padded per group;
    int32 column sums per group [G, round_up(N, 64)])."""
    if not isinstance(w, torch.Tensor) or w.dtype != torch.int8:
        raise ValueError(f"int8_pack: w must be int8, got {getattr(w, 'dtype', type(w).__name__)}")
    if w.dim() != 2:
        raise ValueError(f"int8_pack: w must be 2-D [N, K], got shape {tuple(w.shape)}")
    if group_size < 0 or group_size % PACK_K:
        raise ValueError(f"int8_pack: group_size must be 0 (per output channel) or a positive "
                         f"multiple of {PACK_K}, got {group_size}")
    N, K = w.shape
    Np = _round_up(N, PACK_N)
    if group_size == 0:
        # A copy, never w itself: an op's output must not alias its input.
        packed = w.clone(memory_format=torch.contiguous_format)
        G, gk, Kp = 1, K, K
    else:
        Kp = max(_round_up(K, group_size), group_size)
        G, gk = Kp // group_size, group_size
        packed = torch.zeros((N, Kp), dtype=torch.int8, device=w.device)
        packed[:, :K] = w
    # padding columns marked as on the CPU (csrc/ops/common.h kColsumPad), so colsum is the same
    colsum = torch.full((G, Np), torch.iinfo(torch.int32).min, dtype=torch.int32, device=w.device)
    if N and Kp:
        colsum[:, :N] = packed.view(N, G, gk).sum(dim=2, dtype=torch.int32).T
    return packed, colsum


def int8_unpack_cuda(packed: torch.Tensor, colsum: torch.Tensor, N: int, K: int) -> torch.Tensor:
    """pysparse::int8_unpack on CUDA: the int8 weight [N, K] (a copy)."""
    w, _, _ = _check_weight(packed, colsum, N, K, "int8_unpack")
    return w.clone(memory_format=torch.contiguous_format)


def int8_mm_cuda(a: torch.Tensor, packed: torch.Tensor, colsum: torch.Tensor, N: int, K: int) -> torch.Tensor:
    """pysparse::int8_mm on CUDA: a [M, K] int8 @ w^T -> int32 [M, N], exact."""
    w, G, _ = _check_weight(packed, colsum, N, K, "int8_mm")
    if not isinstance(a, torch.Tensor) or a.dtype != torch.int8:
        raise ValueError(f"int8_mm: a must be int8, got {getattr(a, 'dtype', type(a).__name__)}")
    if a.dim() != 2 or a.shape[1] != K:
        raise ValueError(f"int8_mm: a must be [M, {K}], got shape {tuple(a.shape)}")
    if a.device != packed.device:
        raise ValueError(f"int8_mm: a is on {a.device} but the packed weight is on {packed.device}")
    if G != 1:
        raise ValueError("int8_mm: the weight must be packed per output channel (group_size=0)")
    return _triton_kernels().int8_mm_triton(a, w)


def _grouped_linear_torch(q, xs, w, w_scale, bias, G: int, gk: int, N: int, K: int) -> torch.Tensor:
    """Grouped-scale int8 linear in PyTorch, float32 [M, N], in the CPU kernels' order:
    f = sum over groups (in order) of float(acc_g) * w_scale[g]; y = f * x_scale + bias.
    """
    f = None
    for g in range(G):
        k0, k1 = g * gk, min((g + 1) * gk, K)
        # float64 GEMM of int8 values is exact (|sum| < 2**31 << 2**53) and runs on CUDA,
        # where int64 matmul does not; .float() then rounds as int32 -> float32 does.
        acc = (q[:, k0:k1].double() @ w[:, k0:k1].double().T).float()
        v = acc * w_scale[g, :N]
        f = v if f is None else f + v
    y = f * xs[:, None]
    return y + bias if bias is not None else y


def int8_linear_cuda(x: torch.Tensor, packed: torch.Tensor, colsum: torch.Tensor, w_scale: torch.Tensor,
                     bias: Optional[torch.Tensor], x_scale: Optional[torch.Tensor], N: int, K: int) -> torch.Tensor:
    """pysparse::int8_linear on CUDA: quantize x (PyTorch), int8 GEMM + epilogue (Triton).

    x [..., K] float32/bfloat16/float16; w_scale float32 [G, round_up(N, 64)]; bias
    float32 [N] or None; x_scale None (dynamic per row) or a one-element float32 tensor
    (static). Returns [..., N] in x's dtype. Grouped weights (G > 1) run in PyTorch.
    """
    global _warned_grouped
    w, G, gk = _check_weight(packed, colsum, N, K, "int8_linear")
    if not isinstance(x, torch.Tensor) or x.dtype not in _OUT_DTYPES:
        raise ValueError(f"int8_linear: x must be float32, bfloat16 or float16, got "
                         f"{getattr(x, 'dtype', type(x).__name__)}")
    if x.dim() < 1 or x.shape[-1] != K:
        raise ValueError(f"int8_linear: x must have last dimension in_features={K}, got shape "
                         f"{tuple(x.shape)}")
    dev = packed.device
    if x.device != dev:
        raise ValueError(f"int8_linear: x is on {x.device} but the packed weight is on {dev}")
    Np = _round_up(N, PACK_N)
    if (not isinstance(w_scale, torch.Tensor) or w_scale.dtype != torch.float32 or w_scale.dim() != 2
            or tuple(w_scale.shape) != (G, Np) or w_scale.device != dev):
        raise ValueError(f"int8_linear: w_scale must be a float32 tensor of shape [{G}, {Np}] on {dev}, "
                         f"got {getattr(w_scale, 'dtype', None)} {tuple(getattr(w_scale, 'shape', ()))} "
                         f"on {getattr(w_scale, 'device', None)}")
    if bias is not None and (bias.dtype != torch.float32 or bias.dim() != 1 or bias.shape[0] != N
                             or bias.device != dev):
        raise ValueError(f"int8_linear: bias must be a float32 tensor of shape [{N}] on {dev}, got "
                         f"{bias.dtype} {tuple(bias.shape)} on {bias.device}")
    if x_scale is not None:
        if x_scale.numel() != 1 or x_scale.dtype != torch.float32:
            raise ValueError("int8_linear: x_scale must be a one-element float32 tensor (a static "
                             f"per-tensor activation scale), got {x_scale.dtype} {tuple(x_scale.shape)}")
        if x_scale.device.type == "cpu" and dev.type != "cpu":
            # A host scalar: checked (free here; on the device it would cost a host sync
            # per call, so a bad device scale gives Inf/NaN outputs instead of an error)
            # and put on the device by a fill, not a blocking copy.
            s = float(x_scale.reshape(()))
            if not (s > 0 and s != float("inf")):
                raise ValueError(f"int8_linear: x_scale must be finite and > 0, got {s}")
            x_scale = torch.full((1,), s, dtype=torch.float32, device=dev)
        elif x_scale.device != dev:
            raise ValueError(f"int8_linear: x_scale is on {x_scale.device} but x is on {dev}")
    out_shape = (*x.shape[:-1], N)
    if N == 0 or math.prod(x.shape[:-1]) == 0:
        return x.new_empty(out_shape)
    if K == 0:  # empty reduction: y = bias (as the CPU op); a fresh tensor, never bias itself
        out = x.new_empty(out_shape)
        return out.copy_(bias.expand(out_shape)) if bias is not None else out.zero_()
    x2 = x.reshape(-1, K)
    q, xs = quantize_rows(x2, x_scale)
    if G == 1:
        y = _triton_kernels().int8_linear_triton(q, xs, w, w_scale[0, :N], bias, x.dtype)
    else:
        if not _warned_grouped:
            _warned_grouped = True
            warnings.warn("pysparse: the Triton int8_linear kernel is per-channel only; weights "
                          f"with per-group scales (here {G} groups) run a slower PyTorch path on CUDA",
                          RuntimeWarning, stacklevel=2)
        y = _grouped_linear_torch(q, xs, w, w_scale, bias, G, gk, N, K).to(x.dtype)
    return y.reshape(out_shape)


# ------------------------------------------------------------------------------ registration
def _register() -> None:
    """Register the kernels above for the CUDA dispatch key, once."""
    global REGISTERED
    if REGISTERED or not HAS_TRITON:
        return
    for name, fn in (("int8_pack", int8_pack_cuda), ("int8_unpack", int8_unpack_cuda),
                     ("int8_mm", int8_mm_cuda), ("int8_linear", int8_linear_cuda)):
        torch.library.register_kernel(f"pysparse::{name}", "cuda", fn)
    REGISTERED = True


_register()
