"""Quantization-aware training through float shadows.

pysparse's int8 layers (Int8Linear, Int8Conv2d, BsrInt8Linear, DenseInt8KeptLinear) hold
int8 weights and scales, which gradients cannot move. ``to_shadows`` replaces each by a
float shadow: a float weight initialised from the dequantized int8 weight, whose forward
fake-quantizes the weight (symmetric, per output channel or per group along K, as the layer
quantizes it) and the input (per row / per image at run time for dynamic layers, the kept
calibrated scale for static ones) with straight-through rounding (d round(v) / dv taken as
1, zero outside the clamp range, as torch.ao's FakeQuantize). ``requantize`` builds the
same layer kinds back from the trained shadows: same config, same format, the same block
pattern for block-sparse int8 (its pruned blocks stay pruned: the shadow multiplies by the
block mask, so they get no gradient). The zeros of an Int8Linear's or Int8Conv2d's int8
weight stay zero too: a model pruned and then quantized keeps its sparsity (a weight that
merely rounded to 0, |w| < amax / 254, stays 0 as well: a negligible loss).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .. import formats
from ..nn import BsrInt8Linear, DenseInt8KeptLinear, Int8Conv2d, Int8Linear
from ..nn.int8_conv2d import quantize_conv_weight
from ..reference import quantize_weight

QUANTIZED = (Int8Linear, Int8Conv2d, BsrInt8Linear, DenseInt8KeptLinear)


def _ste_round(v: torch.Tensor) -> torch.Tensor:
    return v + (torch.round(v) - v).detach()


def fake_quant(v: torch.Tensor, scale: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """round(clamp(v / scale)) * scale with the straight-through gradient (scale carries none)."""
    scale = scale.detach()
    return torch.clamp(_ste_round(v / scale), lo, hi) * scale


def _amax_scale(amax: torch.Tensor) -> torch.Tensor:
    return torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))


def fake_quant_weight(w: torch.Tensor, group_size: int = 0) -> torch.Tensor:
    """w [N, K] or [N, ...] fake-quantized as reference.quantize_weight / quantize_conv_weight
    do: amax / 127 per output channel (or per group of group_size along K), +-127."""
    N = w.shape[0]
    flat = w.reshape(N, -1)
    K = flat.shape[1]
    g = group_size or max(K, 1)
    G = max(-(-K // g), 1)
    wp = F.pad(flat, (0, G * g - K)).reshape(N, G, g)
    scale = _amax_scale(wp.detach().abs().amax(dim=-1, keepdim=True))
    return fake_quant(wp, scale, -127, 127).reshape(N, G * g)[:, :K].reshape(w.shape)


def fake_quant_rows(x: torch.Tensor, x_scale: Optional[torch.Tensor]) -> torch.Tensor:
    """x [..., K] fake-quantized as the int8 linears quantize it: per row (amax / 127) when
    x_scale is None, else with the one static scale; [-128, 127]."""
    if x_scale is None:
        scale = _amax_scale(x.detach().abs().amax(dim=-1, keepdim=True))
    else:
        scale = x_scale.reshape(())
    return fake_quant(x, scale, -128, 127)


class Int8LinearShadow(nn.Module):
    """The float shadow of an Int8Linear, BsrInt8Linear or DenseInt8KeptLinear (``source``
    names the kind; requantize builds it back)."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.source_type = type(layer)
        self.source_config = layer.config
        inner = layer.dense if isinstance(layer, DenseInt8KeptLinear) else layer
        self.inner_config = inner.config if isinstance(inner, Int8Linear) else None
        mask = None
        relu = False
        if isinstance(layer, Int8Linear):
            q, s = layer.weight_int8()
            g = layer.group_size or max(layer.in_features, 1)
            # the stored weight (SmoothQuant: W * s; the input is divided by s in forward)
            w = q.float() * s.repeat_interleave(g, dim=1)[:, : layer.in_features]
            bias, x_scale, smooth, group = layer.bias, layer.x_scale, layer.smooth, layer.group_size
            mask = q != 0  # a pruned-then-quantized weight keeps its zeros (see the module doc)
        elif isinstance(layer, DenseInt8KeptLinear):
            d = layer.dense
            q, s = d.weight_int8()
            g = d.group_size or max(d.in_features, 1)
            w = q.float() * s.repeat_interleave(g, dim=1)[:, : d.in_features]
            bias, x_scale, smooth, group = d.bias, d.x_scale, d.smooth, d.group_size
            # the pruned blocks of the weight it was made from stay pruned
            bn, bk = layer.config.block
            mask = formats.expand_block_mask(formats.block_mask(w.cpu(), bn, bk), *w.shape, bn, bk).to(w.device)
            relu = layer.activation == "relu"
        else:  # BsrInt8Linear
            w = layer.dense_weight()
            bias, x_scale, smooth, group = layer.bias_f32, None, None, 0
            mask = _bsr_mask(layer).to(w.device)
            relu = layer.activation == "relu"
        self.in_features, self.out_features = w.shape[1], w.shape[0]
        self.group_size, self.relu = group, relu
        self.weight = nn.Parameter(w.detach().float().clone())
        self.bias = nn.Parameter(bias.detach().float().clone()) if bias is not None else None
        self.register_buffer("x_scale", None if x_scale is None else x_scale.detach().float().clone())
        self.register_buffer("smooth", None if smooth is None else smooth.detach().float().clone())
        self.register_buffer("mask", None if mask is None else mask.float())

    def effective_weight(self) -> torch.Tensor:
        return self.weight * self.mask if self.mask is not None else self.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dt = x.dtype
        x = x.float()
        if self.smooth is not None:
            x = x * self.smooth
        y = F.linear(fake_quant_rows(x, self.x_scale), fake_quant_weight(self.effective_weight(), self.group_size),
                     self.bias)
        return (torch.relu(y) if self.relu else y).to(dt)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, shadow of {self.source_type.__name__}"


class Int8Conv2dShadow(nn.Module):
    """The float shadow of an Int8Conv2d (BatchNorm already folded, activation fused)."""

    def __init__(self, layer: Int8Conv2d) -> None:
        super().__init__()
        self.in_channels, self.out_channels, self.groups = layer.in_channels, layer.out_channels, layer.groups
        self.kernel_size, self.stride = layer.kernel_size, layer.stride
        self.padding, self.dilation, self.activation = layer.padding, layer.dilation, layer.activation
        self.weight = nn.Parameter(layer.dequantized_weight().detach().clone())
        self.register_buffer("mask", (layer.weight_int8 != 0).float())  # zeros stay (see the module doc)
        self.bias = nn.Parameter(layer.bias.detach().float().clone()) if layer.bias is not None else None
        self.register_buffer("x_scale", None if layer.x_scale is None else layer.x_scale.detach().float().clone())
        self.register_buffer("out_scale", None if layer.out_scale is None else layer.out_scale.detach().float().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        unbatched = x.dim() == 3
        if unbatched:
            x = x.unsqueeze(0)
        if self.x_scale is None:  # one scale per image
            scale = _amax_scale(x.detach().abs().flatten(1).amax(dim=1)).view(-1, 1, 1, 1)
        else:
            scale = self.x_scale.reshape(())
        y = F.conv2d(fake_quant(x, scale, -128, 127), fake_quant_weight(self.weight * self.mask), self.bias,
                     self.stride, self.padding, self.dilation, self.groups)
        if self.activation == "relu":
            y = torch.relu(y)
        elif self.activation == "relu6":
            y = torch.clamp(y, 0.0, 6.0)
        if self.out_scale is not None:  # an int8 output, dequantized (the next shadow takes floats)
            y = fake_quant(y, self.out_scale.reshape(()), -128, 127)
        return y.squeeze(0) if unbatched else y

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, shadow of Int8Conv2d"


def _bsr_mask(layer: BsrInt8Linear) -> torch.Tensor:
    """The element mask [N, K] of the layer's stored 64 x 64 blocks."""
    bn, bk = layer.block
    N, K = layer.out_features, layer.in_features
    R, KB = -(-N // bn), -(-K // bk)
    rp, ci = layer.row_ptr.cpu().long(), layer.col_idx.cpu().long()
    rows = torch.repeat_interleave(torch.arange(R), rp[1:] - rp[:-1])
    blocks = torch.zeros(R, KB, dtype=torch.bool)
    blocks[rows, ci] = True
    return formats.expand_block_mask(blocks, N, K, bn, bk)


def shadow_of(layer: nn.Module) -> Optional[nn.Module]:
    """The float shadow of a pysparse int8 layer, or None for any other module."""
    if isinstance(layer, Int8Conv2d):
        return Int8Conv2dShadow(layer)
    if isinstance(layer, (Int8Linear, BsrInt8Linear, DenseInt8KeptLinear)):
        return Int8LinearShadow(layer)
    return None


def _rebuild_int8_linear(config, w: torch.Tensor, sh: Int8LinearShadow) -> Int8Linear:
    new = Int8Linear.from_config(config, device=w.device)
    q, s = quantize_weight(w, config.group_size)
    state = new.state_dict()
    state["weight_int8"], state["weight_scale"] = q, s
    if sh.bias is not None:
        state["bias"] = sh.bias.detach().float()
    if sh.x_scale is not None:
        state["x_scale"] = sh.x_scale
    if sh.smooth is not None:
        state["smooth"] = sh.smooth
    new.load_state_dict(state)
    return new


@torch.no_grad()
def quantized_from_shadow(sh: nn.Module) -> nn.Module:
    """The int8 layer of the shadow's kind and config, quantized from its trained weight."""
    if isinstance(sh, Int8Conv2dShadow):
        new = Int8Conv2d(sh.in_channels, sh.out_channels, sh.kernel_size, sh.stride, sh.padding, sh.dilation,
                         sh.groups, sh.bias is not None, dynamic=sh.x_scale is None, activation=sh.activation,
                         int8_output=sh.out_scale is not None)
        q, s = quantize_conv_weight((sh.weight * sh.mask).detach().cpu())
        state = new.state_dict()
        state["weight_int8"], state["weight_scale"] = q, s
        for name in ("bias", "x_scale", "out_scale"):
            t = getattr(sh, name)
            if t is not None:
                state[name] = t.detach().float().cpu()
        new.load_state_dict(state)
        return new.to(sh.weight.device)
    w = sh.effective_weight().detach().float()
    if sh.source_type is Int8Linear:
        return _rebuild_int8_linear(sh.source_config, w, sh)
    if sh.source_type is DenseInt8KeptLinear:
        return DenseInt8KeptLinear(sh.source_config, _rebuild_int8_linear(sh.inner_config, w, sh))
    # BsrInt8Linear: the stored blocks are those of the mask (even a block trained to all
    # zeros stays stored), so the layout and nnz_blocks are the config's
    q, s = quantize_weight(w.cpu())
    packed = formats.pack_bsr_int8(sh.mask.cpu(), q, s)
    bias = sh.bias.detach().float().cpu() if sh.bias is not None else None
    return BsrInt8Linear(sh.source_config, packed, bias, device=torch.device("cpu")).to(w.device)
