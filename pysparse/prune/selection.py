"""Choosing which units to remove from their scores: per layer, or ranked across layers."""
from __future__ import annotations

import math
from typing import Iterable, Optional

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


def check_scope(scope: str) -> str:
    """``scope`` as given when it is "layer" or "global"; ValueError naming it otherwise."""
    if scope not in ("layer", "global"):
        raise ValueError(f"scope must be 'layer' or 'global', got {scope!r}")
    return scope


def check_per_layer(per_layer: Optional[dict], layers: Iterable[str], what: str) -> dict[str, float]:
    """``per_layer`` ({layer name: amount}) checked against the names a call prunes: a dict of
    exact names of ``layers`` with amounts in [0, 1). ``what`` says which layers those are (for the
    message). Returns {} for None."""
    if per_layer is None:
        return {}
    if not isinstance(per_layer, dict):
        raise TypeError(f"per_layer must be a dict {{layer name: fraction}}, got {type(per_layer).__name__}")
    out = {n: check_amount(f, f"per_layer[{n!r}]") for n, f in per_layer.items()}
    names = set(layers)
    bad = [n for n in out if n not in names]
    if bad:
        raise ValueError(f"per_layer: {bad} are not {what} this call prunes (skipped, or not such a layer)")
    return out
