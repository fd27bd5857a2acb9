"""Int8Linear: a drop-in nn.Linear with int8 weights and int8 activations."""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from torch import nn

from .. import ops
from ..reference import quantize_weight
from .config import ConfigState, Int8LinearConfig, config_from_dict, drop_key


class Int8Linear(ConfigState, nn.Module):
    """y = x @ W^T + b with W int8 (symmetric, per output channel or per group along K)
    and x quantized to int8 per row at run time ("dynamic") or with a calibrated
    per-tensor scale ("static"). The weight is packed once, here, into the kernels'
    layout; forward only quantizes x and calls ``torch.ops.pysparse.int8_linear``, whose
    epilogue fuses dequantization, bias and the cast back to x's dtype.

    Inputs: x [..., in_features] float32, bfloat16 or float16 on the layer's device.
    Output: [..., out_features] in x's dtype.

    The state dict holds the plain int8 weight [N, K] and scales (not the packed layout),
    so a saved model loads on any CPU path or on a GPU, and the layer's config
    (``layer.config``, an Int8LinearConfig) as ``_extra_state``; ``from_config`` builds an
    empty layer of a config (meta device too) that such a state dict loads into. Loading
    checks what it loads (dtypes, shapes, finite scales) and names the key at fault.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, group_size: int = 0,
                 activations: str = "dynamic", smoothquant: bool = False,
                 device: Optional[torch.device] = None) -> None:
        super().__init__()
        cfg = Int8LinearConfig(int(in_features), int(out_features), bool(bias), int(group_size), activations,
                               bool(smoothquant))
        self._config = cfg
        self.in_features, self.out_features = cfg.in_features, cfg.out_features
        self.group_size, self.activations = cfg.group_size, cfg.activations
        device = torch.device(device or "cpu")
        G = ops.packed_k(self.in_features, self.group_size) // self.group_size if self.group_size else 1
        w = torch.zeros(self.out_features, self.in_features, dtype=torch.int8, device=device)
        packed, colsum = ops.int8_pack(w, self.group_size)
        # The packed layout is per device, so it is not what is saved: the state dict holds
        # weight_int8 [N, K] and weight_scale [N, G] (see _save_to_state_dict).
        self.register_buffer("packed", packed, persistent=False)
        self.register_buffer("colsum", colsum, persistent=False)
        self.register_buffer("w_scale", torch.ones(G, colsum.shape[1], device=device), persistent=False)
        self.register_buffer("bias", torch.zeros(self.out_features, device=device) if cfg.bias else None)
        self.register_buffer("x_scale", torch.ones(1, device=device) if activations == "static" else None)
        # 1 / SmoothQuant factors [in_features], or None
        self.register_buffer("smooth", torch.ones(self.in_features, device=device) if cfg.smoothquant else None)

    @classmethod
    def from_config(cls, config: Int8LinearConfig, device: Optional[torch.device] = None) -> "Int8Linear":
        """An empty layer (zero weights, unit scales) of ``config`` on ``device`` (meta
        too), ready for ``load_state_dict``. ``config`` may also be its ``to_dict()``."""
        config = config_from_dict(config)
        if not isinstance(config, Int8LinearConfig):
            raise TypeError(f"config must be an Int8LinearConfig, got {type(config).__name__}")
        return cls(config.in_features, config.out_features, config.bias, group_size=config.group_size,
                   activations=config.activations, smoothquant=config.smoothquant, device=device)

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
        if smooth is not None:
            smooth = smooth.detach().float().to(dev)
            if smooth.shape != (linear.in_features,) or not bool((smooth > 0).all()) \
                    or not bool(torch.isfinite(smooth).all()):
                raise ValueError(f"smooth must be finite and positive of shape [{linear.in_features}]")
        mod = cls(linear.in_features, linear.out_features, linear.bias is not None, group_size=group_size,
                  activations=activations, smoothquant=smooth is not None, device=dev)
        w = w.float()
        if smooth is not None:
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
        # the buffer holds 1/s (forward multiplies x by it), and the stored weight is W * s
        return w * self.smooth if self.smooth is not None else w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"Int8Linear: input must be a tensor, got {type(x).__name__}")
        if self.smooth is not None:
            # SmoothQuant: the weight holds W * s, so the input is divided by s here
            # (one extra elementwise pass; folding 1/s into the previous layer removes it).
            x = (x * self.smooth).to(x.dtype)
        return torch.ops.pysparse.int8_linear(x, self.packed, self.colsum, self.w_scale, self.bias,
                                              self.x_scale, self.out_features, self.in_features)

    # The packed layout is per device type: moving the layer between the CPU and a GPU
    # re-packs (the int8 values and scales are untouched); anything else (.to() the same
    # device, .float(), .half(), another GPU) leaves the packed weight as it is. Scales and
    # bias stay float32 under .half()/.bfloat16().
    def _apply(self, fn, recurse: bool = True):
        old = self.packed.device
        # float32 state is kept bit for bit: snapshot it, let fn move the module (it may
        # also cast floats, e.g. .half()), then put the snapshot on the new device.
        keep = {n: getattr(self, n) for n in ("w_scale", "bias", "x_scale", "smooth") if getattr(self, n) is not None}
        q = None
        if old.type != "meta":  # unpacking is cheap next to a move; skip it where nothing moves
            probe = fn(torch.empty(0, dtype=torch.int32, device=old))
            if probe.device.type != old.type:
                q, _ = self.weight_int8()
        super()._apply(fn, recurse)
        dev = self.colsum.device  # int32: moved by fn, never cast
        if dev.type != old.type:
            if q is None:  # from meta (e.g. to_empty): there are no values to keep, only the shapes
                q = torch.zeros(self.out_features, self.in_features, dtype=torch.int8)
            self.packed, self.colsum = ops.int8_pack(q.to(dev), self.group_size)
        for name, t in keep.items():
            if getattr(self, name).device.type == "meta" or t.device.type == "meta":
                continue  # to or from meta: fn's tensor (empty) is all there is
            setattr(self, name, t.to(dev))
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        # super saves the persistent buffers (bias, x_scale, smooth, any a user or subclass
        # added) and the config (_extra_state); the weight is saved unpacked, in no
        # device's layout.
        super()._save_to_state_dict(destination, prefix, keep_vars)
        q, s = self.weight_int8()
        destination[prefix + "weight_int8"] = q
        destination[prefix + "weight_scale"] = s

    def _validate(self, state_dict: dict, prefix: str) -> list[str]:
        """What is wrong with the tensors this layer would load (errors naming the key)."""
        errs = []
        G = self.w_scale.shape[0]
        N, K = self.out_features, self.in_features
        want = {"weight_int8": (torch.int8, (N, K)), "weight_scale": (torch.float32, (N, G))}
        if self.bias is not None:
            want["bias"] = (torch.float32, (N,))
        if self.x_scale is not None:
            want["x_scale"] = (torch.float32, (1,))
        if self.smooth is not None:
            want["smooth"] = (torch.float32, (K,))
        for n, (dt, shape) in want.items():
            t = state_dict.get(prefix + n)
            if t is None:
                continue  # reported as missing by torch
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape or t.dtype != dt:
                errs.append(f"{prefix}{n}: expected {dt} of shape {list(shape)}, got "
                            f"{getattr(t, 'dtype', type(t).__name__)} {list(getattr(t, 'shape', ()))}")
            elif t.device.type != "meta" and n not in ("weight_int8", "bias") and not bool(torch.isfinite(t).all()):
                errs.append(f"{prefix}{n}: holds NaN or Inf (every scale must be finite)")
            elif t.device.type != "meta" and n in ("x_scale", "smooth") and not bool((t > 0).all()):
                errs.append(f"{prefix}{n}: must be > 0")
        return errs

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        has_config = self._check_extra_state(state_dict, prefix, missing_keys, error_msgs)
        if has_config is None:
            return
        if not has_config:
            # A file from before configs: x_scale (static activations) and smooth
            # (SmoothQuant) come with the saved layer; adopt them, so loading into a plain
            # Int8Linear(K, N) restores the same layer, as such files always did.
            dev = self.packed.device
            if prefix + "x_scale" in state_dict and self.x_scale is None:
                self.x_scale = torch.ones(1, device=dev)
                self.activations = "static"
            if prefix + "smooth" in state_dict and self.smooth is None:
                self.smooth = torch.ones(self.in_features, device=dev)
            self._config = dataclasses.replace(self._config, activations=self.activations,
                                               smoothquant=self.smooth is not None)
        errs = self._validate(state_dict, prefix)
        if errs:  # load nothing: the layer stays as it was
            error_msgs.extend(errs)
            return
        n_errors = len(error_msgs)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if len(error_msgs) > n_errors:
            return  # torch refused a tensor: leave the weight as it was
        if not has_config:
            drop_key(missing_keys, prefix + "_extra_state")
        for n in ("weight_int8", "weight_scale"):
            drop_key(unexpected_keys, prefix + n)
            if prefix + n not in state_dict:
                missing_keys.append(prefix + n)
        if prefix + "weight_int8" in state_dict and prefix + "weight_scale" in state_dict:
            q, s = state_dict[prefix + "weight_int8"], state_dict[prefix + "weight_scale"]
            if self.packed.device.type != "meta":  # loading into meta tensors is a no-op in torch too
                self._set_quantized(q, s.to(self.packed.device))

    def extra_repr(self) -> str:
        kernel = ops.kernel_for(self.packed.device)
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, group_size={self.group_size}, "
                f"activations={self.activations}{', smoothquant' if self.smooth is not None else ''}, "
                f"kernel={kernel}")
