"""Gradient statistics over calibration batches: the one place the gradient criteria get their inputs.

``gradient_stats`` runs the model over ``data`` (an iterable of (inputs, target) batches; inputs a
tensor, a tuple of tensors or a dict of tensors) and returns, per layer, the mean gradient of the
loss with respect to the weight (first-order Taylor) and the empirical Fisher, the mean of squared
per-batch gradients (Optimal Brain Damage's diagonal Hessian estimate). Unstructured, block and
filter pruning all call it, so the criteria see the same numbers whatever unit they remove.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

GRADIENT_CRITERIA = ("taylor", "obd")


def leaf_weight(m: nn.Module) -> torch.Tensor:
    """The tensor an optimizer updates for ``m.weight`` (the original under a mask)."""
    if parametrize.is_parametrized(m, "weight"):
        return m.parametrizations.weight.original
    return m.weight


def check_data(criterion: str, data: Any) -> None:
    """ValueError naming ``data`` when a gradient criterion has none (checked before any work)."""
    if criterion in GRADIENT_CRITERIA and data is None:
        raise ValueError(f"criterion={criterion!r} needs gradients: give data (batches of (inputs, target)) "
                         f"and, unless the loss is cross-entropy, loss_fn")


def call_model(model: nn.Module, x: Any) -> Any:
    """``model`` on one batch's inputs: a tensor, a tuple / list of tensors (positional) or a dict
    (keyword arguments)."""
    if isinstance(x, dict):
        return model(**x)
    if isinstance(x, (tuple, list)):
        return model(*x)
    return model(x)


def gradient_stats(model: nn.Module, layers: dict[str, nn.Module], data: Iterable, loss_fn: Optional[Callable],
                   criterion: str, *, desc: str = "pysparse", progress: bool = True
                   ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(mean dL/dw, empirical Fisher) of each layer's weight over the batches of ``data``.

    The gradient is with respect to the stored weight (the original under a mask), so a masked
    element gets the masked gradient (0). The model runs in eval mode (BatchNorm statistics do not
    move; train/eval flags are restored), frozen weights are scored too (their requires_grad flag
    is restored) and no ``.grad`` is written. loss_fn(output, target) -> scalar tensor, cross-entropy
    by default. A progress bar counts the batches (``progress=False`` hides it).

    Raises TypeError for a batch that is not an (inputs, target) pair or a non-scalar loss, and
    ValueError when ``data`` gives no batch.
    """
    from tqdm.auto import tqdm

    loss_fn = loss_fn or F.cross_entropy
    names = list(layers)
    leaves = [leaf_weight(layers[n]) for n in names]
    gsum = [torch.zeros_like(p, dtype=torch.float32) for p in leaves]
    gsq = [torch.zeros_like(p, dtype=torch.float32) for p in leaves]
    modes = {m: m.training for m in model.modules()}
    frozen = [p for p in leaves if not p.requires_grad]
    batches = 0
    try:
        for p in frozen:
            p.requires_grad_(True)
        model.eval()
        with torch.enable_grad():
            for i, batch in enumerate(tqdm(data, desc=f"{desc} ({criterion})", leave=False, disable=not progress)):
                if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
                    raise TypeError(f"data batch {i} must be an (inputs, target) pair, got {type(batch).__name__}")
                x, y = batch
                loss = loss_fn(call_model(model, x), y)
                if not (isinstance(loss, torch.Tensor) and loss.numel() == 1):
                    raise TypeError(f"loss_fn must return a scalar tensor, got {type(loss).__name__}")
                grads = torch.autograd.grad(loss, leaves, allow_unused=True)
                for j, gr in enumerate(grads):
                    if gr is not None:
                        gsum[j] += gr.float()
                        gsq[j] += gr.float() ** 2
                batches += 1
    finally:
        for p in frozen:
            p.requires_grad_(False)
        for m, t in modes.items():
            m.training = t
    if batches == 0:
        raise ValueError(f"criterion={criterion!r}: data gave no batches")
    return ({n: s / batches for n, s in zip(names, gsum)}, {n: s / batches for n, s in zip(names, gsq)})
