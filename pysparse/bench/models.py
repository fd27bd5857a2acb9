"""Models for ``pysparse bench model``: four built-in ones, written with plain torch.nn, and
user models by import path ("package.module:factory").

The built-ins have the layer shapes of the models they are named after (no torchvision):
their widths follow the input shape, so a tiny input gives a tiny model for tests.
"""
from __future__ import annotations

import importlib
import os
import sys
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn


class BenchError(Exception):
    """A bad argument found after parsing (a model that will not import or run): the CLI
    prints its message on one line and exits with status 2."""


class MLP(nn.Module):
    """Transformer-style MLP blocks: d -> 4d -> d with GELU and a residual, ``depth`` times."""

    def __init__(self, d: int, depth: int = 4) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
                                    for _ in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.blocks:
            x = x + blk(x)
        return x


class Block(nn.Module):
    """A pre-norm transformer encoder block. Its own q/k/v/out nn.Linear layers, not
    nn.MultiheadAttention, whose packed in_proj is no nn.Linear and so is never converted."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.n1, self.n2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.up, self.down = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, d = x.shape
        h = self.n1(x)
        q, k, v = (p(h).view(B, T, self.heads, -1).transpose(1, 2) for p in (self.q, self.k, self.v))
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, T, d)
        x = x + self.o(a)
        return x + self.down(F.gelu(self.up(self.n2(x))))


def transformer(d: int, depth: int = 4) -> nn.Module:
    """``depth`` encoder blocks of width d (heads of 64, or one head below d=64)."""
    return nn.Sequential(*(Block(d, max(1, d // 64)) for _ in range(depth)))


def _conv_bn(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, act: type = nn.ReLU) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(cout), act(inplace=True) if act else nn.Identity())


class Bottleneck(nn.Module):
    """ResNet-50's bottleneck: 1x1 reduce, 3x3 (strided), 1x1 expand (x4), projection shortcut."""

    def __init__(self, cin: int, width: int, stride: int) -> None:
        super().__init__()
        cout = 4 * width
        self.body = nn.Sequential(_conv_bn(cin, width, 1), _conv_bn(width, width, 3, stride),
                                  _conv_bn(width, cout, 1, act=None))
        self.short = _conv_bn(cin, cout, 1, stride, act=None) if stride != 1 or cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.body(x) + self.short(x))


def resnet50(channels: int, classes: int = 1000) -> nn.Module:
    """ResNet-50's layer shapes: stem, stages of 3/4/6/3 bottlenecks, global pool, fc 2048 -> classes."""
    layers: list[nn.Module] = [_conv_bn(channels, 64, 7, 2), nn.MaxPool2d(3, 2, 1)]
    cin = 64
    for i, (n, width) in enumerate(zip((3, 4, 6, 3), (64, 128, 256, 512))):
        for j in range(n):
            layers.append(Bottleneck(cin, width, 2 if j == 0 and i > 0 else 1))
            cin = 4 * width
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, classes))


class InvertedResidual(nn.Module):
    """MobileNetV2's block: 1x1 expand (x t), 3x3 depthwise, 1x1 linear project."""

    def __init__(self, cin: int, cout: int, stride: int, t: int) -> None:
        super().__init__()
        hid = cin * t
        self.res = stride == 1 and cin == cout
        self.body = nn.Sequential(*([_conv_bn(cin, hid, 1, act=nn.ReLU6)] if t != 1 else []),
                                  _conv_bn(hid, hid, 3, stride, groups=hid, act=nn.ReLU6),
                                  _conv_bn(hid, cout, 1, act=None))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x) if self.res else self.body(x)


def mobilenetv2(channels: int, classes: int = 1000) -> nn.Module:
    """MobileNetV2's layer shapes (width 1.0): the (t, c, n, s) table of the paper."""
    layers: list[nn.Module] = [_conv_bn(channels, 32, 3, 2, act=nn.ReLU6)]
    cin = 32
    for t, c, n, s in ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                       (6, 160, 3, 2), (6, 320, 1, 1)):
        for j in range(n):
            layers.append(InvertedResidual(cin, c, s if j == 0 else 1, t))
            cin = c
    return nn.Sequential(*layers, _conv_bn(cin, 1280, 1, act=nn.ReLU6), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Dropout(0.2), nn.Linear(1280, classes))


@dataclass(frozen=True)
class Builtin:
    """A built-in model: how to build it from the input shape, its default input shape, and
    the number of input dimensions it takes."""

    build: Callable[[tuple[int, ...]], nn.Module]
    default_shape: tuple[int, ...]
    ndim: int
    shape_help: str


BUILTINS: dict[str, Builtin] = {
    "mlp": Builtin(lambda s: MLP(s[-1]), (8, 1024), 2, "BATCH,FEATURES"),
    "transformer": Builtin(lambda s: transformer(s[-1]), (1, 128, 512), 3, "BATCH,SEQ,WIDTH"),
    "resnet50": Builtin(lambda s: resnet50(s[1]), (1, 3, 224, 224), 4, "BATCH,CHANNELS,H,W"),
    "mobilenetv2": Builtin(lambda s: mobilenetv2(s[1]), (1, 3, 224, 224), 4, "BATCH,CHANNELS,H,W"),
}


def parse_shape(text: str) -> tuple[int, ...]:
    """"8,512" -> (8, 512): positive integers separated by commas (or x). ValueError otherwise."""
    parts = [p.strip() for p in text.replace("x", ",").split(",")]
    try:
        dims = tuple(int(p) for p in parts)
    except ValueError:
        raise ValueError(f"expected comma-separated positive integers like 8,512, got {text!r}") from None
    if not dims or any(d <= 0 for d in dims):
        raise ValueError(f"expected comma-separated positive integers like 8,512, got {text!r}")
    return dims


def build_builtin(name: str, shape: tuple[int, ...] | None) -> tuple[nn.Module, tuple[int, ...]]:
    """The built-in model ``name`` for inputs of ``shape`` (its default when None)."""
    spec = BUILTINS[name]
    shape = shape or spec.default_shape
    if len(shape) != spec.ndim:
        raise BenchError(f"--builtin {name} takes --input-shape {spec.shape_help} ({spec.ndim} numbers), "
                         f"got {','.join(map(str, shape))}")
    return spec.build(shape).eval(), shape


def load_model(path: str) -> nn.Module:
    """Import "package.module:factory" and call factory() for the model; the current
    directory is importable, as under ``python -m``. BenchError says what went wrong."""
    mod_name, sep, attr = path.partition(":")
    if not sep or not mod_name or not attr:
        raise BenchError(f"--model takes module:factory (e.g. mypkg.models:make_model), got {path!r}")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        obj = importlib.import_module(mod_name)
    except Exception as e:
        raise BenchError(f"--model {path}: cannot import {mod_name!r} ({type(e).__name__}: {e})") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise BenchError(f"--model {path}: {mod_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    try:
        model = obj() if callable(obj) and not isinstance(obj, nn.Module) else obj
    except Exception as e:
        raise BenchError(f"--model {path}: {attr}() raised {type(e).__name__}: {e}") from None
    if not isinstance(model, nn.Module):
        raise BenchError(f"--model {path}: {attr}() returned {type(model).__name__}, not an nn.Module")
    return model.eval()
