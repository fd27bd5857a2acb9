"""Model conversion: quantize_int8 swaps a model's nn.Linear layers for Int8Linear and its
nn.Conv2d layers for Int8Conv2d (a BatchNorm and a ReLU/ReLU6 right after a conv are fused into
it where the traced graph shows the conv feeds only them)."""
from __future__ import annotations

from typing import Any, Iterable, Optional

import torch
from torch import nn

from . import _modules
from .formats import PACK_K
from .nn import CompactConv2d, Int8Conv2d, Int8Linear

_ACT_KIND = {nn.ReLU: "relu", nn.ReLU6: "relu6"}


def int8_conv_pays(conv: Optional[nn.Module] = None) -> bool:
    """Whether an int8 convolution is expected to beat the fp32 one on this CPU now.

    The path the dispatch policy gives int8_conv2d must have a fast int8 GEMM: AVX2 (VPMADDUBSW
    on the non-negative or >= -127 activations, measured 1.2x-2.4x oneDNN's fp32 conv on
    ResNet-50 shapes at one thread), AVX-512 VNNI or AMX. Given ``conv``, a depthwise one (groups
    == in == out channels) does not: its kernel widens to s16 (VPMULLW) on every path, measured
    0.43x-0.96x of fp32 (MobileNetV2 shapes, AVX2)."""
    from . import ops

    if ops.kernel_for("cpu", "int8_conv2d") not in ("cpu-avx2", "cpu-avx512", "cpu-amx"):
        return False
    if isinstance(conv, nn.Conv2d) and conv.groups > 1 and conv.groups == conv.in_channels == conv.out_channels:
        return False
    return True


def _is_target(m: nn.Module) -> bool:
    return isinstance(m, (nn.Linear, nn.Conv2d)) or _fused_conv(m)


def _fused_conv(m: nn.Module) -> bool:
    """A CompactConv2d over all its channels: what pysparse.compact(fuse_residual=True) makes of a
    conv feeding a residual add (called with the shortcut as its second argument). It converts to
    an Int8Conv2d that takes the same call: y = act(conv(x) + bias + residual)."""
    if not isinstance(m, CompactConv2d) or m.in_channels is None:
        return False
    full = lambda idx, n: idx.numel() == n and bool((idx.cpu() == torch.arange(n)).all())  # noqa: E731
    return full(m.in_idx, m.in_channels) and full(m.out_idx, m.out_channels)


def _as_conv2d(m: CompactConv2d) -> nn.Conv2d:
    conv = nn.Conv2d(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation,
                     bias=m.bias is not None)
    with torch.no_grad():
        conv.weight.copy_(m.kept_weight())
        if m.bias is not None:
            conv.bias.copy_(m.bias[:m.out_channels])
    return conv.eval()


def _conv_fusions(model: nn.Module, convs: dict[str, nn.Conv2d]) -> dict[str, tuple[Optional[str], Optional[str]]]:
    """{conv name: (BatchNorm2d name or None, ReLU/ReLU6 module name or None)} that can be fused
    into the int8 conv: read from the torch.fx graph, each fused module called exactly once in
    the whole graph and fed by the conv (or its BatchNorm) alone. A model that does not trace
    gets no fusion (each conv converts alone; correct, only slower)."""
    from torch import fx

    try:
        gm = model if isinstance(model, fx.GraphModule) else fx.symbolic_trace(model)
    except Exception:
        return {}
    calls: dict[str, int] = {}
    for n in gm.graph.nodes:
        if n.op == "call_module":
            calls[n.target] = calls.get(n.target, 0) + 1
    mods = dict(gm.named_modules())

    def only_user(node):
        users = list(node.users)
        return users[0] if len(users) == 1 else None

    out: dict[str, tuple[Optional[str], Optional[str]]] = {}
    for n in gm.graph.nodes:
        if n.op != "call_module" or n.target not in convs or calls.get(n.target) != 1:
            continue
        bn = act = None
        cur = n
        nxt = only_user(cur)
        if nxt is not None and nxt.op == "call_module" and isinstance(mods.get(nxt.target), nn.BatchNorm2d) \
                and calls.get(nxt.target) == 1:
            bn, cur = nxt.target, nxt
            nxt = only_user(cur)
        if nxt is not None and nxt.op == "call_module" and type(mods.get(nxt.target)) in _ACT_KIND \
                and calls.get(nxt.target) == 1:
            act = nxt.target
        if bn or act:
            out[n.target] = (bn, act)
    return out


@torch.no_grad()
def _calibrate(model: nn.Module, layers: dict[str, nn.Module], data: Iterable[Any]) -> dict[str, torch.Tensor]:
    """Run the calibration batches; return each layer's max |x|: per input channel for a Linear,
    one value for a convolution (its activation scale is per tensor)."""
    from tqdm.auto import tqdm

    amax: dict[str, torch.Tensor] = {}

    def hook(name):
        def f(mod, args, kwargs):
            x = (args[0] if args else kwargs["input"]).detach().float()
            if not torch.isfinite(x).all():
                raise ValueError(f"calibration_data: the input of layer {name!r} holds NaN or Inf")
            if isinstance(mod, nn.Linear):
                x = x.reshape(-1, mod.in_features)
                cur = x.abs().amax(dim=0) if x.shape[0] else torch.zeros(mod.in_features, device=x.device)
            else:
                cur = x.abs().amax().reshape(1) if x.numel() else torch.zeros(1, device=x.device)
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
                  group_size: int = 0, convs: Optional[bool] = None) -> nn.Module:
    """Convert ``model``'s nn.Linear layers to Int8Linear and its nn.Conv2d layers to Int8Conv2d,
    in place; returns the model.

    activations: "dynamic" (each row of each input quantized at run time) or "static"
    (one scale per layer from ``calibration_data``, an iterable of model inputs: tensors,
    tuples of positional args, or dicts of keyword args).
    smoothquant_alpha: migrate activation outliers into the weights (SmoothQuant,
    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)); needs calibration_data; 0.5 is typical.
    skip: layer names (exact, glob pattern, or a prefix ending in ".") to leave in float.
    group_size: 0 for per-output-channel weight scales, or a multiple of 64 along K (Linear).
    convs: also convert nn.Conv2d (grouped and depthwise too) to Int8Conv2d: weights per output
    channel, the input per tensor (static: calibrated; dynamic: one scale per image at run
    time); a BatchNorm2d and a ReLU/ReLU6 module that only the conv feeds are folded into it
    (they become nn.Identity). None (default): the convolutions where it pays on this CPU
    (int8_conv_pays: every non-depthwise conv where the int8 conv kernel is AVX2, AVX-512 VNNI or
    AMX; depthwise convs stay fp32, their int8 kernel measured slower than oneDNN's); True: every
    conv; False: none. SmoothQuant applies to Linear layers only.

    Every argument is checked and every layer converted before the model changes: on any error
    the model is as it was. A bare nn.Linear / nn.Conv2d is returned converted.
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
    if convs is not None and not isinstance(convs, bool):
        raise TypeError(f"convs must be None, True or False, got {convs!r}")
    if convs is None:
        pick = lambda m: _modules.is_linear(m) or (  # noqa: E731
            (isinstance(m, nn.Conv2d) or _fused_conv(m)) and int8_conv_pays(m))
    else:
        pick = _is_target if convs else _modules.is_linear
    layers = _modules.targets(model, skip, predicate=pick, replaceable=True)
    if not layers:
        raise ValueError("model has no nn.Linear or nn.Conv2d layer to quantize (or all are skipped)")
    conv_layers = {n: m for n, m in layers.items() if isinstance(m, nn.Conv2d)}
    fusions = _conv_fusions(model, conv_layers) if conv_layers else {}
    amax = _calibrate(model, layers, calibration_data) if needs_data else {}

    def conv_x_scale(name: str) -> Optional[float]:  # per tensor; None: dynamic
        if activations != "static":
            return None
        top = float(amax[name].max())
        return top / 127.0 if top > 0 else 1.0

    def build(name: str, mod: nn.Module) -> nn.Module:
        if _fused_conv(mod):  # its ReLU (after the residual) stays after it
            return Int8Conv2d.from_float(_as_conv2d(mod), x_scale=conv_x_scale(name),
                                         activation="relu" if mod.relu else None)
        if isinstance(mod, nn.Conv2d):
            bn_name, act_name = fusions.get(name, (None, None))
            x_scale = conv_x_scale(name)
            return Int8Conv2d.from_float(mod, x_scale=x_scale, bn=model.get_submodule(bn_name) if bn_name else None,
                                         activation=_ACT_KIND[type(model.get_submodule(act_name))] if act_name
                                         else None)
        lin = mod
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

    new = _modules.convert_once(layers, build)
    for bn_name, act_name in fusions.values():  # fused into the conv before them
        for n in (bn_name, act_name):
            if n:
                new[n] = nn.Identity()
    # a module used under several names converts once; a bare layer is returned converted
    return _modules.replace(model, new)
