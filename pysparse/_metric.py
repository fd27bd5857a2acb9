"""The one check of a user's ``eval_fn(model) -> metric`` that sensitivity sweeps, ``plan`` and
``compress`` share: a finite float back, or an error that names eval_fn and what was being
evaluated (the trial, the step), so a failure deep in a sweep says where it happened."""
from __future__ import annotations

import math
import numbers
from typing import Any, Callable

import torch
from torch import nn


def evaluate_metric(eval_fn: Callable[[nn.Module], Any], model: nn.Module, where: str, *,
                    eval_mode: bool = False) -> float:
    """``eval_fn(model)`` as a finite float.

    Args:
        eval_fn: the user's metric (higher is better); a one-element tensor counts as a number.
        model: what it evaluates.
        where: what is being evaluated, for the messages (e.g. ``"layer 'fc' at sparsity 0.5"``).
        eval_mode: put the model in eval mode for the call and restore its train/eval flags after.

    Raises:
        RuntimeError: eval_fn raised (chained to its exception).
        TypeError: it returned something that is not a real number (bool included).
        ValueError: it returned NaN or an infinity.
    """
    modes = [(m, m.training) for m in model.modules()] if eval_mode else []
    if eval_mode:
        model.eval()
    try:
        v = eval_fn(model)
    except Exception as e:
        raise RuntimeError(f"eval_fn raised {type(e).__name__} ({where}): {e}") from e
    finally:
        for m, training in modes:
            m.training = training
    if isinstance(v, torch.Tensor) and v.numel() == 1:
        v = v.item()
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise TypeError(f"eval_fn must return a number, got {type(v).__name__} {v!r} ({where}); "
                        "it returns the metric, higher is better")
    v = float(v)
    if not math.isfinite(v):
        raise ValueError(f"eval_fn returned {v} ({where}); it must return a finite number")
    return v
