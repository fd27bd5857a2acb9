"""Feature matching: forward hooks on named layers of the student and the teacher, and a
learned projection where their widths differ (a compacted student has fewer channels)."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Iterable, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

FeaturesArg = Union[None, Mapping, Iterable[str]]


def normalize_features(features: FeaturesArg, student: nn.Module, teacher: nn.Module) -> list[tuple[str, str, float]]:
    """[(student layer, teacher layer, weight)] from features={student: teacher} (a value may
    be (teacher layer, weight)), or a list of names common to both; every name checked."""
    if features is None:
        return []
    pairs: list[tuple[str, str, float]] = []
    if isinstance(features, Mapping):
        for s, t in features.items():
            w = 1.0
            if isinstance(t, (tuple, list)):
                if len(t) != 2:
                    raise ValueError(f"features[{s!r}] must be a teacher layer name or (name, weight), got {t!r}")
                t, w = t
            pairs.append((s, t, float(w)))
    elif isinstance(features, str):
        pairs.append((features, features, 1.0))
    else:
        pairs = [(n, n, 1.0) for n in features]
    s_names = dict(student.named_modules())
    t_names = dict(teacher.named_modules())
    for s, t, w in pairs:
        if not isinstance(s, str) or not isinstance(t, str):
            raise TypeError(f"features: layer names must be strings, got {s!r} -> {t!r}")
        if s not in s_names:
            raise ValueError(f"features: the student has no layer {s!r} (names look like "
                             f"{sorted(n for n in s_names if n)[:6]})")
        if t not in t_names:
            raise ValueError(f"features: the teacher has no layer {t!r} (names look like "
                             f"{sorted(n for n in t_names if n)[:6]})")
        if not w >= 0:
            raise ValueError(f"features: the weight of {s!r} must be >= 0, got {w}")
    return pairs


class Tap:
    """Forward hooks recording the outputs of named layers (the first tensor of a tuple)."""

    def __init__(self, model: nn.Module, names: Iterable[str], detach: bool) -> None:
        self.values: dict[str, torch.Tensor] = {}
        self._handles = []
        mods = dict(model.named_modules())
        for n in dict.fromkeys(names):
            self._handles.append(mods[n].register_forward_hook(self._hook(n, detach)))

    def _hook(self, name: str, detach: bool):
        def f(mod, args, out):
            t = out
            if isinstance(t, (tuple, list)) and t:
                t = t[0]
            if isinstance(t, Mapping):
                t = next((v for v in t.values() if isinstance(v, torch.Tensor)), None)
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"features: layer {name!r} returned a {type(out).__name__}, not a tensor")
            self.values[name] = t.detach() if detach else t
        return f

    def take(self) -> dict[str, torch.Tensor]:
        v, self.values = self.values, {}
        return v

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def width_dim(t: torch.Tensor) -> int:
    """The feature (channel) dimension: 1 for a conv map [N, C, H, W], else the last."""
    return 1 if t.dim() == 4 else t.dim() - 1


def make_projection(s: torch.Tensor, t: torch.Tensor, pair: tuple[str, str]) -> Optional[nn.Module]:
    """None when the shapes match; a 1x1 conv (conv maps) or a Linear mapping the student's
    width to the teacher's when only the width differs; ValueError otherwise."""
    if s.shape == t.shape:
        return None
    d = width_dim(s)
    other_s = [n for i, n in enumerate(s.shape) if i != d]
    other_t = [n for i, n in enumerate(t.shape) if i != d]
    if s.dim() != t.dim() or other_s != other_t:
        raise ValueError(f"features: student layer {pair[0]!r} gives shape {list(s.shape)}, teacher layer "
                         f"{pair[1]!r} gives {list(t.shape)}: only the width (dim {d}) may differ")
    cs, ct = s.shape[d], t.shape[d]
    if s.dim() == 4:
        proj = nn.Conv2d(cs, ct, 1, bias=False)
    else:
        proj = nn.Linear(cs, ct, bias=False)
    return proj.to(device=s.device, dtype=torch.float32)


def feature_loss(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """MSE between the student's feature (already projected to the teacher's width) and the teacher's."""
    return F.mse_loss(s.float(), t.float().to(s.device))
