"""The int8 convolution ops on the Python side: fake (meta) kernels for
torch.compile(fullgraph=True) / torch.export, and thin typed wrappers.

Schemas: csrc/ops/registry.cpp; CPU kernels: csrc/ops/int8_conv2d.cpp (implicit GEMM on
the int8_linear micro-kernels; depthwise: csrc/cpu/int8_conv2d_<isa>.cpp). Imported by
pysparse/ops.py, which has loaded the compiled library by then.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from . import _C  # noqa: F401  (the schemas must be loaded before the fakes register)

PACK_N = 64  # csrc/cpu/int8_linear.h kPackN: each group's out channels pad to 64 columns
PACK_K = 64  # kPackK: each group's GEMM K (kh*kw*Cin/groups) pads to 64

ACTIVATIONS = ("none", "relu", "relu6")


def _round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m


def is_depthwise(in_channels: int, out_channels: int, groups: int) -> bool:
    """Whether the op runs its depthwise kernel (groups == in == out > 1) rather than GEMMs."""
    return groups > 1 and groups == in_channels == out_channels


def packed_shapes(out_channels: int, in_per_group: int, kh: int, kw: int,
                  groups: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """(packed, colsum) shapes of int8_conv2d_pack for a weight [out, in/groups, kh, kw].
    w_scale has colsum's shape."""
    if is_depthwise(in_per_group * groups, out_channels, groups):
        return (kh * kw, out_channels), (1, out_channels)
    og = out_channels // groups
    Np, Kp = _round_up(og, PACK_N), max(_round_up(kh * kw * in_per_group, PACK_K), PACK_K)
    return (groups * Np // 16, Kp * 16), (1, groups * Np)


def conv_out_size(size: int, k: int, s: int, p: int, d: int) -> int:
    """Output length along one spatial dimension (as torch.nn.Conv2d)."""
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


@torch.library.register_fake("pysparse::int8_conv2d_pack")
def _int8_conv2d_pack_fake(w: torch.Tensor, groups: int = 1):
    torch._check(w.dim() == 4, lambda: f"int8_conv2d_pack: w must be 4-D, got {tuple(w.shape)}")
    cout, cg, kh, kw = w.shape
    ps, cs = packed_shapes(cout, cg, kh, kw, groups)
    return w.new_empty(ps, dtype=torch.int8), w.new_empty(cs, dtype=torch.int32)


@torch.library.register_fake("pysparse::int8_conv2d")
def _int8_conv2d_fake(x, packed, colsum, w_scale, bias, x_scale, kernel_size, stride, padding, dilation,
                      groups: int, in_channels: int, out_channels: int, activation: str = "none",
                      out_scale: Optional[float] = None, residual: Optional[torch.Tensor] = None):
    devs = {t.device for t in (x, packed, colsum, w_scale)}
    torch._check(len(devs) == 1, lambda: f"int8_conv2d: all tensors must be on one device, got {devs}")
    torch._check(x.dtype in (torch.float32, torch.int8),
                 lambda: f"int8_conv2d: x must be float32 (or int8 quantized with x_scale), got {x.dtype}")
    torch._check(x.dim() == 4 and x.shape[1] == in_channels,
                 lambda: f"int8_conv2d: x must be [N, {in_channels}, H, W], got {tuple(x.shape)}")
    torch._check(activation in ACTIVATIONS, lambda: f"int8_conv2d: activation must be one of {ACTIVATIONS}")
    ho = conv_out_size(x.shape[2], kernel_size[0], stride[0], padding[0], dilation[0])
    wo = conv_out_size(x.shape[3], kernel_size[1], stride[1], padding[1], dilation[1])
    dt = torch.int8 if out_scale is not None else torch.float32
    if residual is not None:
        torch._check(residual.dtype == torch.float32, lambda: f"int8_conv2d: residual must be float32, got {residual.dtype}")
        torch._check(tuple(residual.shape) == (x.shape[0], out_channels, ho, wo),
                     lambda: f"int8_conv2d: residual must have the output's shape, got {tuple(residual.shape)}")
    return x.new_empty((x.shape[0], out_channels, ho, wo), dtype=dt).contiguous(memory_format=torch.channels_last)


def int8_conv2d_pack(w: torch.Tensor, groups: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Pack an int8 conv weight ``w`` [out, in/groups, kh, kw] once: returns (packed, colsum).

    Per group: int8_pack's tile layout of the [out/groups, kh*kw*in/groups] GEMM weight,
    k ordered (kh, kw, in) like an NHWC patch; depthwise (groups == in == out): [kh*kw, C].
    """
    return torch.ops.pysparse.int8_conv2d_pack(w, groups)


def int8_conv2d(x: torch.Tensor, packed: torch.Tensor, colsum: torch.Tensor, w_scale: torch.Tensor,
                bias: Optional[torch.Tensor], x_scale: Optional[torch.Tensor], kernel_size: Sequence[int],
                stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int], groups: int,
                in_channels: int, out_channels: int, activation: str = "none",
                out_scale: Optional[float] = None, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Int8 Conv2d: act(dequant(conv(int8(x), w)) + bias [+ residual]), float32, channels_last.

    x: float32 [N, in_channels, H, W] in any memory format (NHWC is read without a copy),
    or int8 already quantized with the static x_scale (a previous layer's int8 output).
    out_scale: return int8 round(clamp(y / out_scale)) instead of float32 (no float round
    trip between consecutive int8 layers; the next layer's x_scale is this out_scale).
    x_scale: one-element float32 static activation scale, or None for one dynamic scale
    per image (amax / 127 over its finite values). w_scale: float32, colsum's shape,
    the per-output-channel weight scales (padding columns 1). An output pixel whose
    window reads a NaN/Inf input pixel is NaN in every channel. residual: float32 of the
    output's shape (not for depthwise convs), added before the activation (a ResNet block's
    conv -> add -> ReLU in one pass).
    """
    return torch.ops.pysparse.int8_conv2d(x, packed, colsum, w_scale, bias, x_scale, list(kernel_size),
                                          list(stride), list(padding), list(dilation), groups, in_channels,
                                          out_channels, activation, out_scale, residual)


def w_scale_packed(scale: torch.Tensor, out_channels: int, in_per_group: int, kh: int, kw: int,
                   groups: int) -> torch.Tensor:
    """The per-output-channel scales [out] laid out as int8_conv2d wants (colsum's shape)."""
    _, cs = packed_shapes(out_channels, in_per_group, kh, kw, groups)
    ws = torch.ones(cs, dtype=torch.float32, device=scale.device)
    if is_depthwise(in_per_group * groups, out_channels, groups):
        ws[0] = scale.float()
        return ws
    og, Np = out_channels // groups, cs[1] // groups
    ws.view(groups, Np)[:, :og] = scale.float().view(groups, og)
    return ws
