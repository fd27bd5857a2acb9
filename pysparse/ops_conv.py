"""pysparse::compact_conv2d on the Python side: the weight packing, the fake kernel, the CUDA
kernel's registration and the typed wrapper (the schema is in csrc/ops/registry.cpp, the
CPU kernel in csrc/ops/compact_conv2d.cpp and csrc/cpu/compact_conv2d_*.cpp, the CUDA one
in kernels/compact_conv2d.py, on Triton).

A compacted convolution reads only the kept input channels of a full-width NHWC activation
(by index, inside the kernel) and writes only the kept output channels of a full-width NHWC
output (by index, in the kernel's epilogue), optionally adding into a residual and applying
ReLU, so a pruned layer whose channels cannot be removed physically (a residual sum whose
members were pruned differently) still costs only its kept MACs.

Inference only: the op has no backward (calling backward through it raises).
groups=1 only: grouped and depthwise convolutions are compacted physically (their channels
are sliced away by pysparse.compact) and run through the dense convolution.

One weight layout on every device: the packed [P, kh, kw, Cin_kept, 16] panels are what
the Triton kernel reads too, so a layer (and its state_dict) moves between CPU and CUDA
unchanged. On CUDA the index tensors are trusted when already on the device (checking
them costs a sync per call; CompactConv2d checks its own once, at construction) and
checked when given on the CPU; the fp32 products follow PyTorch's rule for fp32
convolutions (torch.backends.cudnn.conv.fp32_precision / cudnn.allow_tf32, TF32 by
default): the op uses TF32 exactly when F.conv2d may on the same GPU.
"""
from __future__ import annotations

import warnings
from typing import Optional, Sequence

import torch

from . import _C  # noqa: F401  (loads the library: schemas + CPU kernels)
from . import reference
from ._cuda_ops import HAS_TRITON, load_kernel_module

CONV_PANEL = 16  # csrc/cpu/compact_conv2d.h kConvPanel: output channels per weight panel


def conv_out_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    """Output length of a convolution along one dimension (as torch.nn.Conv2d)."""
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def pack_compact_conv2d_weight(weight: torch.Tensor) -> torch.Tensor:
    """Pack a conv weight [Cout_kept, Cin_kept, kh, kw] for pysparse::compact_conv2d.

    Returns float32 [ceil(Cout_kept / 16), kh, kw, Cin_kept, 16], contiguous: panels of 16
    output channels, K ordered (kh, kw, cin) as the kernel walks an NHWC input, output
    channels fastest (one zmm / two ymm per k). Columns past Cout_kept are zero. Done once,
    at layer construction; any device.
    """
    if weight.dim() != 4:
        raise ValueError(f"weight must be [Cout, Cin, kh, kw], got shape {tuple(weight.shape)}")
    co, ci, kh, kw = weight.shape
    P = -(-co // CONV_PANEL)
    w = torch.zeros(P * CONV_PANEL, ci, kh, kw, dtype=torch.float32, device=weight.device)
    w[:co] = weight.detach().float()
    return w.view(P, CONV_PANEL, ci, kh, kw).permute(0, 3, 4, 2, 1).contiguous()


def unpack_compact_conv2d_weight(packed: torch.Tensor, cout: int) -> torch.Tensor:
    """Inverse of pack_compact_conv2d_weight: [P, kh, kw, Cin, 16] -> [cout, Cin, kh, kw]."""
    P, kh, kw, ci, _ = packed.shape
    return packed.permute(0, 4, 3, 1, 2).reshape(P * CONV_PANEL, ci, kh, kw)[:cout]


@torch.library.register_fake("pysparse::compact_conv2d")
def _compact_conv2d_fake(x, weight, bias, in_idx, out_idx, stride, padding, dilation, out_channels: int,
                         residual=None, relu: bool = False):
    torch._check(x.dim() == 4 and x.dtype == torch.float32,
                 lambda: f"compact_conv2d: x must be a 4-D float32 tensor, got {x.dtype} {tuple(x.shape)}")
    torch._check(weight.dim() == 5 and weight.shape[4] == CONV_PANEL,
                 lambda: f"compact_conv2d: weight must be packed [P, kh, kw, Cin, 16], got {tuple(weight.shape)}")
    torch._check(in_idx.dim() == 1 and in_idx.shape[0] == weight.shape[3],
                 lambda: f"compact_conv2d: in_idx must hold {weight.shape[3]} indices")
    torch._check(out_idx.dim() == 1 and weight.shape[0] == (out_idx.shape[0] + CONV_PANEL - 1) // CONV_PANEL,
                 lambda: "compact_conv2d: out_idx must list one output channel per kept output")
    n, _, h, w = x.shape
    ho = conv_out_size(h, weight.shape[1], stride[0], padding[0], dilation[0])
    wo = conv_out_size(w, weight.shape[2], stride[1], padding[1], dilation[1])
    torch._check(ho > 0 and wo > 0, lambda: "compact_conv2d: x is smaller than the dilated kernel")
    if residual is not None:
        torch._check(tuple(residual.shape) == (n, out_channels, ho, wo),
                     lambda: f"compact_conv2d: residual must have the output's shape {(n, out_channels, ho, wo)}")
    return torch.empty((n, out_channels, ho, wo), dtype=x.dtype, device=x.device,
                       memory_format=torch.channels_last)


def _compact_conv2d_setup_context(ctx, inputs, output):
    pass


def _compact_conv2d_backward(ctx, grad):
    raise RuntimeError(
        "pysparse::compact_conv2d is an inference op and has no backward: fine-tune the masked nn.Conv2d "
        "(pysparse.prune), then convert it with CompactConv2d.from_masked")


torch.library.register_autograd("pysparse::compact_conv2d", _compact_conv2d_backward,
                                setup_context=_compact_conv2d_setup_context)


def compact_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], in_idx: torch.Tensor,
                   out_idx: torch.Tensor, stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int],
                   out_channels: int, residual: Optional[torch.Tensor] = None, relu: bool = False) -> torch.Tensor:
    """Compacted convolution (groups=1, float32, inference only).

    x: [N, C_in_full, H, W] float32, best in channels_last memory (read in place; on the CPU
    any other layout is copied to channels_last first, on CUDA read in place). weight: packed by pack_compact_conv2d_weight
    from [Cout_kept, Cin_kept, kh, kw]. in_idx: int32/int64 [Cin_kept], the input channels
    read (in [0, C_in_full)). out_idx: int32/int64 [Cout_kept], distinct output channels in
    [0, out_channels). bias: float32 [Cout_kept] or None.

    Returns float32 [N, out_channels, Ho, Wo] in channels_last: out[:, out_idx] =
    conv(x[:, in_idx]) + bias and every other channel 0; with ``residual`` (that shape),
    out = residual + the scattered conv; with ``relu``, ReLU on every channel after the add
    (as a ResNet block's add + ReLU: untouched channels are relu(residual)).

    On CUDA tensors the Triton kernel runs (compact_conv2d_cuda); in_idx / out_idx may then
    be CPU tensors (checked, then copied) or on x's device (trusted: out-of-range values are
    ignored, a repeated out_idx races).
    """
    return torch.ops.pysparse.compact_conv2d(x, weight, bias, in_idx, out_idx, list(stride), list(padding),
                                             list(dilation), out_channels, residual, relu)


# ------------------------------------------------------------------------------ CUDA (Triton)
_kernels = None
CUDA_REGISTERED = False


def _triton_kernels():
    """kernels/compact_conv2d.py, imported on the first CUDA call (importing pysparse neither
    imports triton nor fixes its TRITON_INTERPRET mode)."""
    global _kernels
    if _kernels is None:
        try:
            _kernels = load_kernel_module("compact_conv2d")
        except Exception as e:
            raise RuntimeError(f"pysparse: the Triton compact_conv2d kernel failed to load "
                               f"({type(e).__name__}: {e})") from e
    return _kernels


def fp32_conv_precision() -> str:
    """"tf32" or "ieee": what PyTorch lets an fp32 convolution on CUDA use now
    (torch.backends.cudnn.conv.fp32_precision, else the legacy cudnn.allow_tf32)."""
    conv = getattr(torch.backends.cudnn, "conv", None)
    p = getattr(conv, "fp32_precision", None)
    if p in ("tf32", "ieee"):
        return p
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return "tf32" if torch.backends.cudnn.allow_tf32 else "ieee"


def compact_conv2d_cuda(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], in_idx: torch.Tensor,
                        out_idx: torch.Tensor, stride: Sequence[int], padding: Sequence[int],
                        dilation: Sequence[int], out_channels: int, residual: Optional[torch.Tensor] = None,
                        relu: bool = False) -> torch.Tensor:
    """pysparse::compact_conv2d on CUDA: one Triton kernel (kernels/compact_conv2d.py), the
    arguments of ``compact_conv2d``. TF32 products when PyTorch allows them for fp32 convs
    (``fp32_conv_precision()``; set torch.backends.cudnn.conv.fp32_precision = "ieee" for
    true fp32)."""
    if not isinstance(weight, torch.Tensor) or weight.dim() != 5:
        # the kernel also takes a 4-D K-major weight; the op takes the packed panels only (a
        # 4-D tensor here is most likely an unpacked [Cout, Cin, kh, kw] weight)
        raise ValueError("compact_conv2d: weight must be the packed layout, a contiguous float32 tensor "
                         "[ceil(Cout/16), kh, kw, Cin_kept, 16] (pysparse.ops_conv.pack_compact_conv2d_weight), "
                         f"got {getattr(weight, 'dtype', type(weight).__name__)} {tuple(getattr(weight, 'shape', ()))}")
    return _triton_kernels().compact_conv2d_triton(x, weight, bias, in_idx, out_idx, stride, padding, dilation,
                                                   out_channels, residual, relu,
                                                   precision=fp32_conv_precision())


def _register_cuda() -> None:
    """Register compact_conv2d_cuda for the CUDA dispatch key, once (nothing without Triton;
    never touches a device, so a CPU-only machine imports this module cleanly)."""
    global CUDA_REGISTERED
    if CUDA_REGISTERED or not HAS_TRITON:
        return
    torch.library.register_kernel("pysparse::compact_conv2d", "cuda", compact_conv2d_cuda)
    CUDA_REGISTERED = True


_register_cuda()


# ------------------------------------------------------------------------------ timing entry
def compact_conv2d_case(n: int, in_channels: int, out_channels: int, hw: int, kernel_size: int = 3, *,
                        keep_in: float = 0.5, keep_out: float = 0.5, stride: int = 1, residual: bool = False,
                        relu: bool = False, device: str = "cuda", seed: int = 0) -> dict:
    """A random compacted convolution and its peers, built on ``device``, for timing
    (scripts/gpu_check.py; issue 8 (c): >= 0.8x a dense conv of the kept size, >= 1.5x
    gather + conv + scatter in torch ops).

    x [n, in_channels, hw, hw] channels_last; round(keep_in * in_channels) input and
    round(keep_out * out_channels) output channels kept at random; padding kernel_size // 2.
    Returns a dict of zero-argument callables -- "pysparse" (the op: Triton on CUDA, C++ on
    the CPU), "pysparse_kmajor" (CUDA only: the kernel on a K-major weight),
    "dense_kept" (F.conv2d on the pre-gathered kept input, channels_last: cuDNN on CUDA),
    "gather_conv_scatter" (pysparse.reference.compact_conv2d) -- and "check" (max |error| of
    the op over max |float64 reference|), "macs" (the kept multiply-adds), "args" (the op's
    arguments, for ops_conv.compact_conv2d(*args)), "precision" (the fp32 product precision
    the CUDA op uses now).
    """
    g = torch.Generator().manual_seed(seed)
    ci, co = max(0, round(keep_in * in_channels)), max(0, round(keep_out * out_channels))
    x = torch.randn(n, in_channels, hw, hw, generator=g).to(device).contiguous(memory_format=torch.channels_last)
    ii = torch.randperm(in_channels, generator=g)[:ci].sort().values
    oi = torch.randperm(out_channels, generator=g)[:co].sort().values
    w = (torch.randn(co, ci, kernel_size, kernel_size, generator=g) / max(1, ci * kernel_size**2) ** 0.5)
    b = torch.randn(co, generator=g)
    pad = kernel_size // 2
    ho = conv_out_size(hw, kernel_size, stride, pad, 1)
    res = (torch.randn(n, out_channels, ho, ho, generator=g).to(device).contiguous(memory_format=torch.channels_last)
           if residual else None)
    w, b, iid, oid = w.to(device), b.to(device), ii.to(device), oi.to(device)
    wp = pack_compact_conv2d_weight(w)
    st, pd, dl = [stride] * 2, [pad] * 2, [1, 1]
    args = (x, wp, b, iid, oid, st, pd, dl, out_channels, res, relu)
    x_kept = x.index_select(1, iid).contiguous(memory_format=torch.channels_last)
    case = {
        "pysparse": lambda: compact_conv2d(*args),
        "dense_kept": lambda: torch.nn.functional.conv2d(x_kept, w, b, st, pd, dl),
        "gather_conv_scatter": lambda: reference.compact_conv2d(x, w, b, iid, oid, st, pd, dl, out_channels, res,
                                                                relu),
        "macs": n * ho * ho * co * ci * kernel_size**2,
        "args": args,
        "precision": fp32_conv_precision(),
    }
    if torch.device(device).type == "cuda":
        K = _triton_kernels()
        wk = K.kmajor_weight(wp, co)
        case["pysparse_kmajor"] = lambda: K.compact_conv2d_triton(x, wk, *args[2:], precision=fp32_conv_precision())

    def check() -> float:
        ref = reference.compact_conv2d(x.double(), w.double(), b.double(), iid, oid, st, pd, dl, out_channels,
                                       None if res is None else res.double(), relu)
        return float((compact_conv2d(*args).double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30))

    case["check"] = check
    return case
