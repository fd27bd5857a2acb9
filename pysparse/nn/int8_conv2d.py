"""Int8Conv2d: an nn.Conv2d with int8 weights and int8 activations (CPU, channels_last).

Converting a model (what pysparse.quantize_int8 does for each Conv2d):
  1. calibrate: run calibration_data through the float model with a forward pre-hook on the
     conv recording max |input|; x_scale = amax / 127 (None: dynamic, one scale per image);
  2. fold: pass the BatchNorm2d that directly follows the conv as ``bn`` and the ReLU /
     ReLU6 after it as ``activation`` (then replace those two modules by nn.Identity);
  3. ``Int8Conv2d.from_float(conv, x_scale=..., activation=..., bn=...)``.
  Optionally chain int8: give a layer ``out_scale`` = the next Int8Conv2d's x_scale when it
  feeds only that layer; it then returns int8 and the next layer skips quantizing.
"""
from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch import nn

from .. import ops_int8conv as opc

_Pair = Union[int, tuple[int, int]]
_ACTS = (None, "relu", "relu6")


def _pair(v: _Pair, name: str, lo: int) -> tuple[int, int]:
    t = (v, v) if isinstance(v, int) else tuple(v)
    if len(t) != 2 or not all(isinstance(i, int) and i >= lo for i in t):
        raise ValueError(f"{name} must be an int or a pair of ints >= {lo}, got {v!r}")
    return t


def quantize_conv_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: w [Cout, Cin/g, kh, kw] -> (q int8 same shape, scale float32 [Cout]).

    scale = amax / 127 (1 for an all-zero channel), q = round(w / scale) clamped to +-127.
    """
    w = w.detach().float()
    amax = w.abs().reshape(w.shape[0], -1).amax(dim=1)
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    q = torch.round(w / scale.view(-1, 1, 1, 1)).clamp(-127, 127).to(torch.int8)
    return q, scale


class Int8Conv2d(nn.Module):
    """y = act(conv2d(x, W) + b) with W int8 (symmetric, one scale per output channel)
    and x quantized to int8 with a calibrated per-tensor scale (static, ``x_scale``) or
    one scale per image at run time (dynamic). The weight is packed once, here; forward
    calls ``torch.ops.pysparse.int8_conv2d`` (implicit GEMM on the int8 GEMM kernels,
    depthwise by its own kernel), whose epilogue fuses dequantization, bias and the
    activation (None, 'relu' or 'relu6').

    Input: float32 [N, in_channels, H, W] (or unbatched [in_channels, H, W]) in any memory
    format; NHWC (channels_last) is read without a copy. Output: float32, channels_last.
    CPU only. padding_mode 'zeros' only.

    Int8 between layers: a layer built with ``out_scale`` returns int8 (channels_last),
    round(clamp(y / out_scale)), and a static layer accepts such an int8 input when its
    x_scale is that out_scale - consecutive int8 layers then skip the float round trip.
    (The int8 tensor carries no scale: whoever chains the layers keeps the two equal.)

    The state dict holds the plain int8 weight [out, in/groups, kh, kw] (``weight_int8``),
    ``weight_scale`` [out], ``bias`` and ``x_scale`` [1] (static layers) - never the packed
    layout - and loads into a layer built with the same arguments.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: _Pair, stride: _Pair = 1,
                 padding: _Pair = 0, dilation: _Pair = 1, groups: int = 1, bias: bool = True, *,
                 dynamic: bool = False, activation: Optional[str] = None, int8_output: bool = False) -> None:
        super().__init__()
        if activation not in _ACTS:
            raise ValueError(f"activation must be None, 'relu' or 'relu6', got {activation!r}")
        for name, v in (("in_channels", in_channels), ("out_channels", out_channels), ("groups", groups)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"groups={groups} must divide in_channels={in_channels} and "
                             f"out_channels={out_channels}")
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size = _pair(kernel_size, "kernel_size", 1)
        self.stride = _pair(stride, "stride", 1)
        self.padding = _pair(padding, "padding", 0)
        self.dilation = _pair(dilation, "dilation", 1)
        self.activation = activation
        kh, kw = self.kernel_size
        self.register_buffer("weight_int8", torch.zeros(out_channels, in_channels // groups, kh, kw,
                                                        dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out_channels))
        self.register_buffer("bias", torch.zeros(out_channels) if bias else None)
        self.register_buffer("x_scale", None if dynamic else torch.ones(1))
        self.register_buffer("out_scale", torch.ones(1) if int8_output else None)
        # The kernels' layout, rebuilt from weight_int8 / weight_scale (never saved).
        self.register_buffer("packed", None, persistent=False)
        self.register_buffer("colsum", None, persistent=False)
        self.register_buffer("w_scale", None, persistent=False)
        self._repack()

    @classmethod
    def from_float(cls, conv: nn.Conv2d, *, x_scale: Optional[float], activation: Optional[str] = None,
                   bn: Optional[nn.BatchNorm2d] = None, out_scale: Optional[float] = None) -> "Int8Conv2d":
        """Quantize ``conv`` (BatchNorm ``bn`` after it folded in first, if given).

        x_scale: the calibrated scale of the conv's input (amax / 127 over calibration
        data), or None for one dynamic scale per image. activation: None, 'relu' or
        'relu6', fused after bias (the ReLU that follows the conv / BN in the model).
        out_scale: return int8 requantized with this scale (the next int8 layer's x_scale,
        calibrated on this layer's output after the activation) instead of float32.
        """
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"conv must be an nn.Conv2d, got {type(conv).__name__}")
        if conv.padding_mode != "zeros":
            raise ValueError(f"conv.padding_mode={conv.padding_mode!r} is not supported (only 'zeros')")
        if x_scale is not None and (isinstance(x_scale, bool) or not isinstance(x_scale, (int, float))
                                    or not math.isfinite(x_scale) or x_scale <= 0):
            raise ValueError(f"x_scale must be a finite float > 0 (or None for dynamic), got {x_scale!r}")
        if out_scale is not None and (isinstance(out_scale, bool) or not isinstance(out_scale, (int, float))
                                      or not math.isfinite(out_scale) or out_scale <= 0):
            raise ValueError(f"out_scale must be a finite float > 0 (or None for float output), got {out_scale!r}")
        padding = conv.padding
        if isinstance(padding, str):  # 'valid' / 'same' (stride 1): symmetric amounts only
            if padding == "valid":
                padding = (0, 0)
            else:
                tot = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size)]
                if any(t % 2 for t in tot):
                    raise ValueError(f"conv.padding='same' with kernel_size={conv.kernel_size} and dilation="
                                     f"{conv.dilation} pads asymmetrically; not supported")
                padding = (tot[0] // 2, tot[1] // 2)
        w = conv.weight.detach().float()
        if not torch.isfinite(w).all():
            raise ValueError("conv.weight holds NaN or Inf; cannot quantize it")
        b = conv.bias.detach().float() if conv.bias is not None else None
        if bn is not None:
            if not isinstance(bn, nn.BatchNorm2d):
                raise TypeError(f"bn must be an nn.BatchNorm2d, got {type(bn).__name__}")
            if bn.num_features != conv.out_channels:
                raise ValueError(f"bn.num_features={bn.num_features} != conv.out_channels={conv.out_channels}")
            if bn.running_mean is None or bn.running_var is None:
                raise ValueError("bn has no running statistics (track_running_stats=False); cannot fold it")
            inv = (bn.running_var.detach().float() + bn.eps).rsqrt()
            gamma = bn.weight.detach().float() if bn.weight is not None else torch.ones_like(inv)
            beta = bn.bias.detach().float() if bn.bias is not None else torch.zeros_like(inv)
            f = gamma * inv
            w = w * f.view(-1, 1, 1, 1)
            b = (b if b is not None else torch.zeros_like(f)) - bn.running_mean.detach().float()
            b = b * f + beta
            if not (torch.isfinite(w).all() and torch.isfinite(b).all()):
                raise ValueError("folding bn into conv gave NaN or Inf weights (check bn's statistics)")
        mod = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, padding, conv.dilation,
                  conv.groups, b is not None, dynamic=x_scale is None, activation=activation,
                  int8_output=out_scale is not None)
        q, s = quantize_conv_weight(w.cpu())
        mod.weight_int8.copy_(q)
        mod.weight_scale.copy_(s)
        if b is not None:
            mod.bias.copy_(b)
        if x_scale is not None:
            mod.x_scale.fill_(float(x_scale))
        if out_scale is not None:
            mod.out_scale.fill_(float(out_scale))
        mod._repack()
        return mod

    def _repack(self) -> None:
        kh, kw = self.kernel_size
        # out_scale as a Python float for the schema's `float? out_scale`, read here (at
        # conversion and load) rather than per call: .item() in forward would break fullgraph
        self._out_scale_f = float(self.out_scale) if self.out_scale is not None else None
        self.packed, self.colsum = opc.int8_conv2d_pack(self.weight_int8, self.groups)
        self.w_scale = opc.w_scale_packed(self.weight_scale, self.out_channels, self.in_channels // self.groups,
                                          kh, kw, self.groups)

    def dequantized_weight(self) -> torch.Tensor:
        """The weight the layer computes with, float32 [out, in/groups, kh, kw]."""
        return self.weight_int8.float() * self.weight_scale.view(-1, 1, 1, 1)

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x float32 [N, in, H, W] (or int8 quantized with x_scale) -> act(conv(x) + bias [+ residual]).

        residual: float32 of the output's shape, added before the activation (pysparse.quantize_int8
        passes a residual block's shortcut here when pysparse.compact(fuse_residual=True) fused it).
        """
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"Int8Conv2d: x must be a tensor, got {type(x).__name__}")
        if x.dtype != torch.float32 and not (x.dtype == torch.int8 and self.x_scale is not None):
            raise ValueError(f"Int8Conv2d: x must be float32 (or int8 for a static layer: quantized with its "
                             f"x_scale), got {x.dtype}")
        unbatched = x.dim() == 3
        if unbatched:
            x = x.unsqueeze(0)
            residual = residual.unsqueeze(0) if isinstance(residual, torch.Tensor) else residual
        if residual is not None and (not isinstance(residual, torch.Tensor) or residual.dtype != torch.float32):
            raise TypeError(f"Int8Conv2d: residual must be a float32 tensor, got "
                            f"{getattr(residual, 'dtype', type(residual).__name__)}")
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"Int8Conv2d: x must be [N, {self.in_channels}, H, W] or [{self.in_channels}, H, W], "
                             f"got shape {tuple(x.shape)}")
        # NHWC once here (a no-op when it already is): the kernel reads channels_last.
        x = x.contiguous(memory_format=torch.channels_last)
        y = torch.ops.pysparse.int8_conv2d(x, self.packed, self.colsum, self.w_scale, self.bias, self.x_scale,
                                           list(self.kernel_size), list(self.stride), list(self.padding),
                                           list(self.dilation), self.groups, self.in_channels,
                                           self.out_channels, self.activation or "none",
                                           self._out_scale_f, residual)
        return y.squeeze(0) if unbatched else y

    # Scales and bias stay float32 bit for bit under .half() / .bfloat16() / .double() (the
    # kernel reads float32; a cast would round the scales): snapshot them, let fn move the
    # module, then put the snapshot on the new device.
    def _apply(self, fn, recurse: bool = True):
        keep = {n: getattr(self, n) for n in ("weight_scale", "bias", "x_scale", "out_scale", "w_scale")
                if getattr(self, n) is not None}
        super()._apply(fn, recurse)
        dev = self.weight_int8.device
        for name, t in keep.items():
            setattr(self, name, t.to(dev))
        return self

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        q = state_dict.get(prefix + "weight_int8")
        if q is not None and q.dtype != torch.int8:
            error_msgs.append(f"{prefix}weight_int8: expected int8, got {q.dtype}")
            return
        s = state_dict.get(prefix + "weight_scale")
        if s is not None and not bool(torch.isfinite(s).all() and (s > 0).all()):
            error_msgs.append(f"{prefix}weight_scale: must be finite and > 0")
            return
        for name in ("x_scale", "out_scale"):
            t = state_dict.get(prefix + name)
            if t is not None and not bool(torch.isfinite(t).all() and (t > 0).all()):
                error_msgs.append(f"{prefix}{name}: must be finite and > 0, got {t.tolist()}")
                return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        self._repack()

    def extra_repr(self) -> str:
        s = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
             f"padding={self.padding}")
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        s += f", bias={self.bias is not None}, x_scale={'dynamic' if self.x_scale is None else 'static'}"
        if self.activation:
            s += f", activation={self.activation}"
        if self.out_scale is not None:
            s += ", int8_output"
        return s
