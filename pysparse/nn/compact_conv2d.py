"""CompactConv2d: a convolution that reads only the kept input channels and writes only the
kept output channels of full-width NHWC tensors (the gather and scatter fused into the kernel)."""
from __future__ import annotations

import warnings
from typing import Optional, Sequence, Union

import torch
from torch import nn

from .. import ops_conv, reference

_IntPair = Union[int, Sequence[int]]


def _pair(v: _IntPair, name: str) -> tuple[int, int]:
    t = (v, v) if isinstance(v, int) else tuple(int(i) for i in v)
    if len(t) != 2:
        raise ValueError(f"{name} must be an int or a pair of ints, got {v!r}")
    return t


def _index(idx: Union[torch.Tensor, Sequence[int]], name: str, n: int, limit: Optional[int],
           limit_name: str) -> torch.Tensor:
    """idx as int64 [n]: integers, distinct, in [0, limit) when limit is known."""
    t = torch.as_tensor(idx)
    if t.dtype.is_floating_point or t.dtype == torch.bool or t.dtype.is_complex:
        raise TypeError(f"{name} must hold integer channel indices, got dtype {t.dtype} "
                        "(a boolean mask goes to CompactConv2d.from_masked)")
    t = t.detach().to(device="cpu", dtype=torch.int64).reshape(-1) if t.dim() <= 1 else t
    if t.dim() != 1 or t.numel() != n:
        raise ValueError(f"{name} must be 1-D with {n} indices (one per kept channel of the conv), "
                         f"got shape {tuple(t.shape)}")
    if n and int(t.min()) < 0:
        raise ValueError(f"{name} holds {int(t.min())}: channel indices must be >= 0")
    if n and limit is not None and int(t.max()) >= limit:
        raise ValueError(f"{name} holds {int(t.max())}, outside [0, {limit}) ({limit_name}={limit})")
    if t.unique().numel() != n:
        raise ValueError(f"{name} holds a channel twice: the kept channels must be distinct")
    return t.contiguous()


class CompactConv2d(nn.Module):
    """A Conv2d over kept channels of full-width activations (groups=1, float32, inference only).

    forward(x [N, in_channels, H, W], residual=None) -> [N, out_channels, Ho, Wo], channels_last:
    the conv reads input channels ``in_idx`` of x (by index, in the kernel: no gather pass) and
    writes output channels ``out_idx`` (in the kernel's epilogue: no scatter pass); every other
    output channel is 0, or with ``residual`` (the output's shape) out = residual + conv, and
    with ``relu`` ReLU on every channel after the add (a ResNet block's add + ReLU; untouched
    channels are then relu(residual)). Give x in channels_last memory: other layouts are
    copied first (on the CPU). CPU tensors run the C++ kernels, CUDA tensors the Triton kernel
    (move the layer with ``.cuda()``: the packed weight is the same on both; TF32 products
    where PyTorch allows them for fp32 convolutions, as cuDNN). Built with ``from_conv`` or
    ``from_masked``; the weight is packed once.

    Grouped and depthwise convolutions are not handled here: compact them physically (slice
    their channels) and run the dense convolution. No backward: fine-tune the masked
    nn.Conv2d, then convert.
    """

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor], in_idx: torch.Tensor,
                 out_idx: torch.Tensor, out_channels: int, *, in_channels: Optional[int] = None,
                 stride: _IntPair = 1, padding: _IntPair = 0, dilation: _IntPair = 1, relu: bool = False) -> None:
        """weight: the kept weights [Cout_kept, Cin_kept, kh, kw]; bias [Cout_kept] or None;
        in_idx / out_idx: the channels of the full-width input / output they belong to;
        in_channels: the full input width (None: x may have any width above max(in_idx))."""
        super().__init__()
        if not isinstance(weight, torch.Tensor) or weight.dim() != 4:
            raise ValueError(f"weight must be a 4-D tensor [Cout_kept, Cin_kept, kh, kw], got "
                             f"{getattr(weight, 'shape', type(weight).__name__)}")
        if not torch.isfinite(weight).all():
            raise ValueError("weight holds NaN or Inf")
        co, ci, kh, kw = weight.shape
        if not isinstance(out_channels, int) or out_channels < co:
            raise ValueError(f"out_channels must be an int >= the kept outputs ({co}), got {out_channels!r}")
        if in_channels is not None and (not isinstance(in_channels, int) or in_channels < ci):
            raise ValueError(f"in_channels must be None or an int >= the kept inputs ({ci}), got {in_channels!r}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = (kh, kw)
        self.stride, self.padding, self.dilation = _pair(stride, "stride"), _pair(padding, "padding"), \
            _pair(dilation, "dilation")
        if min(self.stride) < 1 or min(self.dilation) < 1 or min(self.padding) < 0:
            raise ValueError(f"stride and dilation must be >= 1 and padding >= 0, got stride={self.stride}, "
                             f"padding={self.padding}, dilation={self.dilation}")
        self.relu = bool(relu)
        self.register_buffer("in_idx", _index(in_idx, "in_idx", ci, in_channels, "in_channels"))
        self.register_buffer("out_idx", _index(out_idx, "out_idx", co, out_channels, "out_channels"))
        self.register_buffer("weight", ops_conv.pack_compact_conv2d_weight(weight.detach().float().cpu()))
        if bias is not None:
            if bias.shape != (co,):
                raise ValueError(f"bias must have shape [{co}], got {tuple(bias.shape)}")
            bias = bias.detach().float().cpu().contiguous()
        self.register_buffer("bias", bias)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, in_idx: Union[torch.Tensor, Sequence[int]],
                  out_idx: Union[torch.Tensor, Sequence[int]], out_channels: int, relu: bool = False, *,
                  in_channels: Optional[int] = None) -> "CompactConv2d":
        """From an nn.Conv2d that already holds only the kept weights [Cout_kept, Cin_kept, kh, kw].

        in_idx [Cin_kept]: which channels of the full-width input feed conv's inputs;
        out_idx [Cout_kept]: which channels of the ``out_channels``-wide output its outputs
        fill; in_channels: the full input width, checked on every call when given.
        """
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"conv must be an nn.Conv2d, got {type(conv).__name__}")
        if conv.groups != 1:
            raise ValueError(f"conv has groups={conv.groups}: CompactConv2d handles groups=1; compact grouped and "
                             "depthwise convolutions physically and run them dense")
        if conv.padding_mode != "zeros":
            raise ValueError(f"conv has padding_mode={conv.padding_mode!r}: only 'zeros' is supported")
        padding = conv.padding
        if isinstance(padding, str):  # 'valid' or 'same' (stride 1)
            if padding == "valid":
                padding = (0, 0)
            else:
                tot = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size)]
                if any(t % 2 for t in tot):
                    raise ValueError("conv has padding='same' with an even dilated kernel (asymmetric padding): "
                                     "not supported")
                padding = tuple(t // 2 for t in tot)
        return cls(conv.weight, conv.bias, in_idx, out_idx, out_channels, in_channels=in_channels,
                   stride=conv.stride, padding=padding, dilation=conv.dilation, relu=relu)

    @classmethod
    def from_masked(cls, conv_full: nn.Conv2d, in_mask: torch.Tensor, out_mask: torch.Tensor,
                    relu: bool = False) -> "CompactConv2d":
        """From a full-width nn.Conv2d and boolean masks of its kept input / output channels.

        Equals conv_full (then ReLU if relu) when its weights outside the kept channels and
        the bias of dropped outputs are zero (a filter-pruned conv); otherwise it computes the
        conv restricted to the kept channels, dropped outputs 0.
        """
        if not isinstance(conv_full, nn.Conv2d):
            raise TypeError(f"conv_full must be an nn.Conv2d, got {type(conv_full).__name__}")
        for m, name, n in ((in_mask, "in_mask", conv_full.in_channels), (out_mask, "out_mask", conv_full.out_channels)):
            if not isinstance(m, torch.Tensor) or m.dtype != torch.bool or m.shape != (n,):
                raise ValueError(f"{name} must be a bool tensor of shape [{n}], got "
                                 f"{getattr(m, 'dtype', type(m).__name__)} {tuple(getattr(m, 'shape', ()))}")
        if conv_full.groups != 1:
            raise ValueError(f"conv_full has groups={conv_full.groups}: CompactConv2d handles groups=1; compact "
                             "grouped and depthwise convolutions physically and run them dense")
        ii, oi = in_mask.nonzero().flatten(), out_mask.nonzero().flatten()
        kept = nn.Conv2d(len(ii), len(oi), conv_full.kernel_size, conv_full.stride, conv_full.padding,
                         conv_full.dilation, bias=conv_full.bias is not None, padding_mode=conv_full.padding_mode)
        with torch.no_grad():
            kept.weight.copy_(conv_full.weight.detach()[oi][:, ii])
            if conv_full.bias is not None:
                kept.bias.copy_(conv_full.bias.detach()[oi])
        return cls.from_conv(kept, ii, oi, conv_full.out_channels, relu, in_channels=conv_full.in_channels)

    def kept_weight(self) -> torch.Tensor:
        """The kept weights [Cout_kept, Cin_kept, kh, kw] (unpacked)."""
        return ops_conv.unpack_compact_conv2d_weight(self.weight, self.out_idx.numel())

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x [N, in_channels, H, W] float32 -> [N, out_channels, Ho, Wo] float32, channels_last."""
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise ValueError(f"x must be a 4-D tensor [N, C, H, W], got {getattr(x, 'shape', type(x).__name__)}")
        if x.dtype != torch.float32:
            raise TypeError(f"x must be float32 (CompactConv2d runs an fp32 kernel), got {x.dtype}")
        c = x.shape[1]
        if self.in_channels is not None and c != self.in_channels:
            raise ValueError(f"x has {c} channels, expected in_channels={self.in_channels}")
        # (in_channels None: the op checks in_idx against x's width, naming both)
        if residual is not None:
            if not isinstance(residual, torch.Tensor) or residual.dtype != torch.float32:
                raise TypeError(f"residual must be a float32 tensor, got {getattr(residual, 'dtype', residual)}")
            want = (x.shape[0], self.out_channels, *self._out_hw(x))
            if tuple(residual.shape) != want:
                raise ValueError(f"residual must have the output's shape {want}, got {tuple(residual.shape)}")
        if torch.is_grad_enabled() and (x.requires_grad or (residual is not None and residual.requires_grad)):
            raise RuntimeError("CompactConv2d is inference only (no backward): run it under torch.no_grad() / "
                               "torch.inference_mode(), or fine-tune the masked nn.Conv2d before converting")
        args = (self.bias, self.in_idx, self.out_idx, self.stride, self.padding, self.dilation, self.out_channels)
        # CPU: the C++ kernels; CUDA: the Triton kernel (both through the op). Elsewhere (or
        # CUDA without Triton) the reference runs, and says so.
        if x.device.type != "cpu" and not (x.device.type == "cuda" and ops_conv.CUDA_REGISTERED):
            warnings.warn(f"CompactConv2d: no kernel for {x.device.type} tensors"
                          f"{' (Triton is not installed)' if x.device.type == 'cuda' else ''}; running the "
                          "PyTorch reference (gather + conv + scatter)", stacklevel=2)
            return reference.compact_conv2d(x, self.kept_weight().to(x.device), *args, residual, self.relu)
        return ops_conv.compact_conv2d(x, self.weight, *args, residual, self.relu)

    def _out_hw(self, x: torch.Tensor) -> tuple[int, int]:
        return tuple(ops_conv.conv_out_size(x.shape[2 + i], self.kernel_size[i], self.stride[i], self.padding[i],
                                            self.dilation[i]) for i in range(2))

    def extra_repr(self) -> str:
        return (f"in={self.in_idx.numel()}/{self.in_channels if self.in_channels is not None else '?'}, "
                f"out={self.out_idx.numel()}/{self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, "
                f"bias={self.bias is not None}, relu={self.relu}")
