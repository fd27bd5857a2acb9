"""Pruning masks held with torch.nn.utils.parametrize.

A mask is a parametrization of the parameter (``weight = original * mask``), so every read of
``module.weight`` sees it: a forward, a parent that reads the weight itself (nn.MultiheadAttention
reads ``out_proj.weight`` and never calls ``out_proj``), torch.export and torch.compile. The
optimizer updates ``original``; the weight it computes with stays zero where masked, whatever
the step, momentum or weight decay did (a forward pre-hook that re-zeroed the weight missed
MultiheadAttention's out_proj: 7168 pruned weights regrew after 2 SGD steps).

Masks only tighten: masking an already masked parameter ANDs the two masks.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from torch.nn.utils import parametrize


class Mask(nn.Module):
    """The parametrization ``w -> w * mask`` (mask a buffer of w's shape, 0/1 in w's dtype)."""

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w * self.mask.to(w.dtype)


def get_mask(module: nn.Module, name: str = "weight") -> Optional[torch.Tensor]:
    """The bool mask held on ``module.<name>``, or None when it is not masked."""
    if not parametrize.is_parametrized(module, name):
        return None
    for p in module.parametrizations[name]:
        if isinstance(p, Mask):
            return p.mask.bool()
    return None


@torch.no_grad()
def apply_mask(module: nn.Module, mask: torch.Tensor, name: str = "weight") -> torch.Tensor:
    """Mask ``module.<name>`` with ``mask`` (bool or 0/1, broadcastable to its shape); ANDed with
    a mask it already holds. The zeros are also written into the stored parameter, so removing
    the mask later (``remove``) keeps them. Returns the bool mask now in force."""
    p = getattr(module, name)
    m = torch.as_tensor(mask, device=p.device).bool().expand_as(p).clone()
    old = get_mask(module, name)
    if old is not None:
        for pm in module.parametrizations[name]:
            if isinstance(pm, Mask):
                pm.mask.copy_((pm.mask.bool() & m).to(pm.mask.dtype))
                m = pm.mask.bool()
                break
        module.parametrizations[name].original.mul_(m.to(p.dtype))
        return m
    p.mul_(m.to(p.dtype))
    parametrize.register_parametrization(module, name, Mask(m.to(p.dtype)), unsafe=False)
    return m


def masked(module: nn.Module) -> dict[str, list[str]]:
    """{submodule name: [masked parameter names]} for every mask pysparse holds in ``module``."""
    out = {}
    for n, m in module.named_modules():
        if parametrize.is_parametrized(m):
            names = [p for p in m.parametrizations if any(isinstance(x, Mask) for x in m.parametrizations[p])]
            if names:
                out[n] = names
    return out


def remove(module: nn.Module) -> None:
    """Drop every pysparse mask in ``module`` (the zeros stay in the weights)."""
    for _, m in list(module.named_modules()):
        if not parametrize.is_parametrized(m):
            continue
        for pname in list(m.parametrizations):
            plist = m.parametrizations[pname]
            if all(isinstance(x, Mask) for x in plist):
                parametrize.remove_parametrizations(m, pname, leave_parametrized=True)


def apply_masks(layers: dict[str, nn.Module], masks: dict[str, torch.Tensor], name: str = "weight"
                ) -> dict[str, torch.Tensor]:
    """``apply_mask`` for each layer; a layer that holds no mask and would keep every weight is
    left unparametrized (pruning at 0 changes nothing). Returns {layer: mask in force}."""
    out = {}
    for n, m in masks.items():
        if get_mask(layers[n], name) is None and bool(m.all()):
            out[n] = m.bool()
        else:
            out[n] = apply_mask(layers[n], m, name)
    return out
