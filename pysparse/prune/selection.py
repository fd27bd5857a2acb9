"""Choosing which units to remove from their scores: per layer, or ranked across layers."""
from __future__ import annotations

import math

import torch


def check_amount(amount: float, arg: str = "sparsity") -> float:
    """``amount`` as a float in [0, 1); ValueError naming ``arg`` otherwise (NaN included)."""
    try:
        a = float(amount)
    except (TypeError, ValueError):
        raise TypeError(f"{arg} must be a number in [0, 1), got {amount!r}") from None
    if isinstance(amount, bool) or math.isnan(a) or not 0.0 <= a < 1.0:
        raise ValueError(f"{arg} must be in [0, 1), got {amount!r}")
    return a


def keep_top(scores: torch.Tensor, amount: float) -> torch.Tensor:
    """Bool mask of ``scores``' shape keeping all but the round(amount * n) lowest (ties broken by
    position, so the count is exact)."""
    n = scores.numel()
    k = int(round(amount * n))
    keep = torch.ones(n, dtype=torch.bool, device=scores.device)
    if k:
        keep[scores.flatten().argsort(stable=True)[:k]] = False
    return keep.reshape(scores.shape)


def keep_top_global(scores: dict[str, torch.Tensor], amount: float) -> dict[str, torch.Tensor]:
    """``keep_top`` over all layers' scores ranked together (one threshold for all)."""
    names = list(scores)
    flat = torch.cat([scores[n].flatten().float().cpu() for n in names]) if names else torch.zeros(0)
    keep = keep_top(flat, amount)
    out, i = {}, 0
    for n in names:
        c = scores[n].numel()
        out[n] = keep[i:i + c].reshape(scores[n].shape).to(scores[n].device)
        i += c
    return out
