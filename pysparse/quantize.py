"""Model conversion: quantize_int8 swaps a model's nn.Linear layers for Int8Linear."""
from __future__ import annotations

from typing import Any, Iterable, Optional

import torch
from torch import nn

from . import _modules
from .formats import PACK_K
from .nn import Int8Linear


@torch.no_grad()
def _calibrate(model: nn.Module, layers: dict[str, nn.Linear], data: Iterable[Any]) -> dict[str, torch.Tensor]:
    """Run the calibration batches; return each layer's per-input-channel max |x|."""
    from tqdm.auto import tqdm

    amax: dict[str, torch.Tensor] = {}

    def hook(name):
        def f(mod, args, kwargs):
            x = (args[0] if args else kwargs["input"]).detach().float().reshape(-1, mod.in_features)
            if not torch.isfinite(x).all():
                raise ValueError(f"calibration_data: the input of layer {name!r} holds NaN or Inf")
            cur = x.abs().amax(dim=0) if x.shape[0] else torch.zeros(mod.in_features, device=x.device)
            amax[name] = cur if name not in amax else torch.maximum(amax[name], cur)
        return f

    # One hook per module (a module used under two names sees both inputs).
    first = {}
    for n, m in layers.items():
        first.setdefault(id(m), n)
    handles = [m.register_forward_pre_hook(hook(n), with_kwargs=True) for n, m in layers.items() if first[id(m)] == n]
    try:
        total = len(data) if hasattr(data, "__len__") else None
        n = 0
        for batch in tqdm(data, total=total, desc="pysparse calibration", unit="batch"):
            if isinstance(batch, (tuple, list)):
                model(*batch)
            elif isinstance(batch, dict):
                model(**batch)
            else:
                model(batch)
            n += 1
        if n == 0:
            raise ValueError("calibration_data is empty: give at least one batch")
    finally:
        for h in handles:
            h.remove()
    for n, m in layers.items():  # the other names of a shared module share its statistics
        if first[id(m)] in amax:
            amax[n] = amax[first[id(m)]]
    missing = [n for n in layers if n not in amax]
    if missing:
        raise ValueError(f"calibration_data never reached layer(s) {missing}; skip them or change the data")
    return amax


def quantize_int8(model: nn.Module, *, activations: str = "dynamic", calibration_data: Optional[Iterable[Any]] = None,
                  smoothquant_alpha: Optional[float] = None, skip: Iterable[str] = (),
                  group_size: int = 0) -> nn.Module:
    """Convert ``model``'s nn.Linear layers to Int8Linear, in place; returns the model.

    activations: "dynamic" (each row of each input quantized at run time) or "static"
    (one scale per layer from ``calibration_data``, an iterable of model inputs: tensors,
    tuples of positional args, or dicts of keyword args).
    smoothquant_alpha: migrate activation outliers into the weights (SmoothQuant,
    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)); needs calibration_data; 0.5 is typical.
    skip: layer names (exact, glob pattern, or a prefix ending in ".") to leave in float.
    group_size: 0 for per-output-channel weight scales, or a multiple of 64 along K.

    A bare nn.Linear is returned converted (it cannot be replaced in place).
    """
    # Every argument is checked, and every layer converted, before the model changes: on any
    # error the model is as it was.
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if activations not in ("dynamic", "static"):
        raise ValueError(f"activations must be 'dynamic' or 'static', got {activations!r}")
    if smoothquant_alpha is not None and not (0.0 <= float(smoothquant_alpha) <= 1.0):
        raise ValueError(f"smoothquant_alpha must be in [0, 1], got {smoothquant_alpha}")
    needs_data = activations == "static" or smoothquant_alpha is not None
    if needs_data and calibration_data is None:
        raise ValueError("calibration_data is required for activations='static' or smoothquant_alpha")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 0 or group_size % PACK_K:
        raise ValueError(f"group_size must be 0 (per output channel) or a positive multiple of {PACK_K}, "
                         f"got {group_size!r}")
    skip = _modules.normalize_skip(skip)
    _modules.check_names_exist(model, skip, "skip")
    layers = _modules.targets(model, skip, replaceable=True)
    if not layers:
        raise ValueError("model has no nn.Linear layer to quantize (or all are skipped)")
    amax = _calibrate(model, layers, calibration_data) if needs_data else {}

    def build(name: str, lin: nn.Linear) -> Int8Linear:
        smooth = None
        x_scale = None
        if smoothquant_alpha is not None:
            a = float(smoothquant_alpha)
            wmax = lin.weight.detach().float().abs().amax(dim=0).clamp(min=1e-5)
            xmax = amax[name].clamp(min=1e-5)
            smooth = (xmax.pow(a) / wmax.pow(1 - a)).clamp(min=1e-5)
        if activations == "static":
            xm = amax[name] / smooth if smooth is not None else amax[name]
            top = float(xm.max()) if xm.numel() else 0.0
            x_scale = top / 127.0 if top > 0 else 1.0
        return Int8Linear.from_float(lin, group_size=group_size, activations=activations, x_scale=x_scale,
                                     smooth=smooth)

    # a module used under several names converts once; a bare nn.Linear is returned converted
    return _modules.replace(model, _modules.convert_once(layers, build))
