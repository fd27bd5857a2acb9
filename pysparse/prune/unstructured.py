"""Unstructured (element-wise) pruning of Linear and Conv2d weights, by magnitude, Taylor or OBD."""
from __future__ import annotations

from typing import Callable, Iterable, Optional, Union

import torch
from torch import nn

from .. import _modules
from ._calib import check_data, gradient_stats
from .criteria import PRUNE_CRITERIA, check_criterion, importance
from .masks import apply_masks, get_mask
from .selection import check_amount, check_per_layer, check_scope, keep_top, keep_top_global

_TARGETS = (nn.Linear, nn.Conv2d)


def is_target(m: nn.Module) -> bool:
    """What unstructured pruning masks: the weights of nn.Linear and nn.Conv2d layers."""
    return isinstance(m, _TARGETS)


def prunable_layers(model: nn.Module, skip: Iterable[str] = (), predicate: Callable = is_target
                    ) -> dict[str, nn.Module]:
    """{name: module} of the targets of ``model`` in model order, skip patterns applied (names in
    ``skip`` must exist), a module used under several names once (its first name)."""
    skip = _modules.normalize_skip(skip)
    _modules.check_names_exist(model, skip, "skip")
    seen, out = set(), {}
    for n, m in _modules.targets(model, skip, predicate=predicate).items():
        if id(m) not in seen:
            seen.add(id(m))
            out[n] = m
    return out


@torch.no_grad()
def element_masks(layers: dict[str, nn.Module], sparsity: float, criterion: str, *, scope: str = "layer",
                  per_layer: Optional[dict[str, float]] = None, stats: Optional[tuple] = None
                  ) -> dict[str, torch.Tensor]:
    """Bool masks (True = kept) of each layer's weight shape removing the least important elements
    (changes nothing). Elements already masked count as removed first, so the result only adds
    zeros to the masks in force. scope="global" ranks all layers not in ``per_layer`` together;
    layers in ``per_layer`` get their own amount. ``stats``: (grad, fisher) for taylor / obd."""
    per_layer = per_layer or {}
    grad, fisher = stats if stats is not None else (None, None)
    scores, current = {}, {}
    for name, m in layers.items():
        s = importance(criterion, m.weight, grad[name] if grad else None, fisher[name] if fisher else None)
        cur = get_mask(m)
        if cur is not None:
            s = s.masked_fill(~cur, float("-inf"))
        scores[name], current[name] = s, cur
    free = [n for n in layers if n not in per_layer]
    keep = {n: keep_top(scores[n], per_layer[n]) for n in per_layer}
    if scope == "global":
        keep.update(keep_top_global({n: scores[n] for n in free}, sparsity))
    else:
        keep.update({n: keep_top(scores[n], sparsity) for n in free})
    out = {}
    for n in layers:
        k = keep[n]
        out[n] = k if current[n] is None else k & current[n]
    return out


def unstructured(model: nn.Module, sparsity: float, *, criterion: str = "magnitude", data: Optional[Iterable] = None,
                 loss_fn: Optional[Callable] = None, scope: str = "layer", skip: Union[str, Iterable[str]] = (),
                 per_layer: Optional[dict[str, float]] = None, progress: bool = True) -> dict[str, torch.Tensor]:
    """Mask the least important ``sparsity`` of the weight elements of every nn.Linear and nn.Conv2d
    of ``model`` (masks held as parametrizations: optimizer steps cannot regrow them).

    sparsity: fraction of each layer's weights to zero (scope="layer") or of all the layers'
      weights together (scope="global": one ranking across layers), in [0, 1).
    criterion: "magnitude" (= "l1", |w|), "l2" (w^2: the same ranking), "taylor" (|w * dL/dw|,
      dL/dw averaged over ``data``), "obd" (Optimal Brain Damage, 0.5 * h_ii * w^2, h_ii the
      empirical Fisher: the mean of squared per-batch gradients over ``data``).
    data: for taylor / obd: an iterable of (inputs, target) batches (inputs a tensor, a tuple of
      tensors or a dict of tensors); loss_fn(output, target) -> scalar, cross-entropy by default.
    skip: layer names, globs or prefixes ending in "." to leave alone.
    per_layer: {layer name: fraction} for those layers (exact names of the targets); the others get
      ``sparsity`` (with scope="global", ranked together).
    progress: a progress bar over the calibration batches.

    Weights already masked count as pruned first: pruning again at a higher sparsity only adds
    zeros (gradual pruning). A layer left whole (amount 0) gets no parametrization. Returns
    {layer name: bool mask of its weight, True = kept}.
    Everything is checked and scored before the first mask is applied: on any error (a bad
    argument, an unknown layer name, empty data, a failing loss) the model is as it was.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    sparsity = check_amount(sparsity, "sparsity")
    criterion = check_criterion(criterion, PRUNE_CRITERIA)
    check_data(criterion, data)
    scope = check_scope(scope)
    layers = prunable_layers(model, skip)
    if per_layer:
        _modules.check_names_exist(model, [n for n in per_layer if isinstance(n, str)], "per_layer")
    per_layer = check_per_layer(per_layer, layers, "Linear / Conv2d layers")
    if not layers:
        raise ValueError("model has no nn.Linear or nn.Conv2d layer to prune (or all are skipped)")
    stats = None
    if criterion in ("taylor", "obd"):
        stats = gradient_stats(model, layers, data, loss_fn, criterion, desc="pysparse unstructured",
                               progress=progress)
    masks = element_masks(layers, sparsity, criterion, scope=scope, per_layer=per_layer, stats=stats)
    return apply_masks(layers, masks)
