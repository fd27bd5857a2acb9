"""Int8Linear: a drop-in nn.Linear with int8 weights and int8 activations."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .. import ops
from ..reference import quantize_weight

_ACTIVATIONS = ("dynamic", "static")


class Int8Linear(nn.Module):
    """y = x @ W^T + b with W int8 (symmetric, per output channel or per group along K)
    and x quantized to int8 per row at run time ("dynamic") or with a calibrated
    per-tensor scale ("static"). The weight is packed once, here, into the kernels'
    layout; forward only quantizes x and calls ``torch.ops.pysparse.int8_linear``, whose
    epilogue fuses dequantization, bias and the cast back to x's dtype.

    Inputs: x [..., in_features] float32, bfloat16 or float16 on the layer's device.
    Output: [..., out_features] in x's dtype.

    The state dict holds the plain int8 weight [N, K] and scales (not the packed layout),
    so a saved model loads on any CPU path or on a GPU.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, group_size: int = 0,
                 activations: str = "dynamic", device: Optional[torch.device] = None) -> None:
        super().__init__()
        if activations not in _ACTIVATIONS:
            raise ValueError(f"activations must be one of {_ACTIVATIONS}, got {activations!r}")
        if group_size < 0 or group_size % ops.PACK_K:
            raise ValueError(f"group_size must be 0 (per output channel) or a positive multiple of "
                             f"{ops.PACK_K}, got {group_size}")
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.group_size, self.activations = int(group_size), activations
        device = torch.device(device or "cpu")
        G = ops.packed_k(self.in_features, group_size) // group_size if group_size else 1
        w = torch.zeros(self.out_features, self.in_features, dtype=torch.int8, device=device)
        packed, colsum = ops.int8_pack(w, self.group_size)
        self.register_buffer("packed", packed)
        self.register_buffer("colsum", colsum)
        self.register_buffer("w_scale", torch.ones(G, colsum.shape[1], device=device))
        self.register_buffer("bias", torch.zeros(self.out_features, device=device) if bias else None)
        self.register_buffer("x_scale", torch.ones(1, device=device) if activations == "static" else None)
        self.register_buffer("smooth", None)  # 1 / SmoothQuant factors [in_features], or None

    @classmethod
    def from_float(cls, linear: nn.Linear, *, group_size: int = 0, activations: str = "dynamic",
                   x_scale: Optional[float] = None, smooth: Optional[torch.Tensor] = None) -> "Int8Linear":
        """Quantize an nn.Linear (weights now; activations per call or with ``x_scale``).

        group_size: 0 for one scale per output channel, or a multiple of 64 for one per
        group along K. activations="static" needs ``x_scale`` (the calibrated scale of
        the layer's input, amax / 127). smooth: SmoothQuant factors s [in_features]; the
        weight is stored as W * s and the input divided by s in forward.
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        if activations == "static" and (x_scale is None or not (x_scale > 0) or x_scale == float("inf")):
            raise ValueError(f"activations='static' needs a finite x_scale > 0, got {x_scale}")
        w = linear.weight.detach()
        if not torch.isfinite(w).all():
            raise ValueError("linear.weight holds NaN or Inf; cannot quantize it")
        dev = w.device
        mod = cls(linear.in_features, linear.out_features, linear.bias is not None, group_size=group_size,
                  activations=activations, device=dev)
        w = w.float()
        if smooth is not None:
            smooth = smooth.detach().float().to(dev)
            if smooth.shape != (linear.in_features,) or not bool((smooth > 0).all()):
                raise ValueError(f"smooth must be positive of shape [{linear.in_features}]")
            w = w * smooth
            mod.smooth = 1.0 / smooth
        mod._set_weight(w)
        if linear.bias is not None:
            mod.bias.copy_(linear.bias.detach().float())
        if activations == "static":
            mod.x_scale.fill_(float(x_scale))
        return mod

    def _set_weight(self, w: torch.Tensor) -> None:
        q, scale = quantize_weight(w, self.group_size)
        self._set_quantized(q, scale)

    def _set_quantized(self, q: torch.Tensor, scale: torch.Tensor) -> None:
        packed, colsum = ops.int8_pack(q.to(self.packed.device), self.group_size)
        self.packed, self.colsum = packed, colsum
        ws = torch.ones(colsum.shape, device=packed.device)
        ws[:, : self.out_features] = scale.T.float()
        self.w_scale = ws

    def weight_int8(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The int8 weight [N, K] and its scales [N, G], unpacked from the kernel layout."""
        q = torch.ops.pysparse.int8_unpack(self.packed, self.colsum, self.out_features, self.in_features)
        return q, self.w_scale[:, : self.out_features].T.contiguous()

    def dequantized_weight(self) -> torch.Tensor:
        """The weight the layer computes with, as float32 [N, K] (SmoothQuant undone)."""
        q, s = self.weight_int8()
        g = self.group_size or max(self.in_features, 1)
        w = q.float() * s.repeat_interleave(g, dim=1)[:, : self.in_features]
        return w * (1.0 / self.smooth) if self.smooth is not None else w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"Int8Linear: input must be a tensor, got {type(x).__name__}")
        if self.smooth is not None:
            # SmoothQuant: the weight holds W * s, so the input is divided by s here
            # (one extra elementwise pass; folding 1/s into the previous layer removes it).
            x = (x * self.smooth).to(x.dtype)
        return torch.ops.pysparse.int8_linear(x, self.packed, self.colsum, self.w_scale, self.bias,
                                              self.x_scale, self.out_features, self.in_features)

    # The packed layout is per device: moving the layer re-packs (the int8 values and
    # scales are untouched), and scales and bias stay float32 under .half()/.bfloat16().
    def _apply(self, fn, recurse: bool = True):
        q, _ = self.weight_int8()
        # float32 state is kept bit for bit: snapshot it, let fn move the module (it may
        # also cast floats, e.g. .half()), then put the snapshot on the new device.
        keep = {n: getattr(self, n) for n in ("w_scale", "bias", "x_scale", "smooth") if getattr(self, n) is not None}
        super()._apply(fn, recurse)
        dev = self.colsum.device  # int32: moved by fn, never cast
        self.packed, self.colsum = ops.int8_pack(q.to(dev), self.group_size)
        for name, t in keep.items():
            setattr(self, name, t.to(dev))
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        q, s = self.weight_int8()
        destination[prefix + "weight_int8"] = q
        destination[prefix + "weight_scale"] = s
        for name in ("bias", "x_scale", "smooth"):
            t = getattr(self, name)
            if t is not None:
                destination[prefix + name] = t if keep_vars else t.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # x_scale (static activations) and smooth (SmoothQuant) come with the saved layer:
        # adopt them, so loading into a plain Int8Linear(K, N) restores the same layer.
        dev = self.packed.device
        if prefix + "x_scale" in state_dict and self.x_scale is None:
            self.x_scale = torch.ones(1, device=dev)
            self.activations = "static"
        if prefix + "smooth" in state_dict and self.smooth is None:
            self.smooth = torch.ones(self.in_features, device=dev)
        if prefix + "bias" in state_dict and self.bias is None:
            unexpected_keys.append(prefix + "bias")  # a layer built with bias=False
        names = ["weight_int8", "weight_scale"] + [n for n in ("bias", "x_scale", "smooth")
                                                   if getattr(self, n) is not None]
        for n in names:
            if prefix + n not in state_dict:
                missing_keys.append(prefix + n)
        if any(prefix + n not in state_dict for n in names):
            return
        q, s = state_dict[prefix + "weight_int8"], state_dict[prefix + "weight_scale"]
        G = self.w_scale.shape[0]
        if q.dtype != torch.int8 or tuple(q.shape) != (self.out_features, self.in_features) \
                or tuple(s.shape) != (self.out_features, G):
            error_msgs.append(f"{prefix}weight_int8/weight_scale: expected int8 [{self.out_features}, "
                              f"{self.in_features}] and [{self.out_features}, {G}], got {q.dtype} "
                              f"{tuple(q.shape)} and {tuple(s.shape)}")
            return
        self._set_quantized(q, s.to(self.packed.device))
        for n in names[2:]:
            getattr(self, n).copy_(state_dict[prefix + n])

    def extra_repr(self) -> str:
        kernel = ops.kernel_for(self.packed.device)
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, group_size={self.group_size}, "
                f"activations={self.activations}{', smoothquant' if self.smooth is not None else ''}, "
                f"kernel={kernel}")
