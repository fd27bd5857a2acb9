"""Block and 2:4 pruning of Linear weights, in the shapes the sparse kernels skip (any criterion)."""
from __future__ import annotations

from typing import Callable, Iterable, Optional, Union

import torch
from torch import nn

from .. import _modules
from ..formats import DEFAULT_BLOCK, block_mask, expand_block_mask
from ._calib import check_data, gradient_stats
from .criteria import PRUNE_CRITERIA, block_scores, check_criterion
from .masks import apply_mask, apply_masks
from .selection import check_amount, check_per_layer, check_scope, keep_top, keep_top_global
from .unstructured import prunable_layers


def check_block(block: Optional[tuple[int, int]]) -> tuple[int, int]:
    """``block`` as (bn, bk) positive ints (None: DEFAULT_BLOCK); ValueError naming it otherwise."""
    if block is None:
        return DEFAULT_BLOCK
    try:
        bn, bk = block
        ok = all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in (bn, bk))
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"block must be (bn, bk), two positive ints, got {block!r}")
    return int(bn), int(bk)


@torch.no_grad()
def block_masks(layers: dict[str, nn.Linear], sparsity: float, block: tuple[int, int],
                scope: str = "layer", *, criterion: str = "magnitude", stats: Optional[tuple] = None,
                per_layer: Optional[dict[str, float]] = None) -> dict[str, torch.Tensor]:
    """Element masks [N, K] (bool, True = kept) removing the least important ``block`` blocks of
    each layer's weight (as it computes now, masks included), per layer or ranked globally (layers
    in ``per_layer`` by their own amount). criterion "magnitude" / "l2": block RMS; "l1": mean |w|;
    "taylor" / "obd" from ``stats`` = (grad, fisher) of gradient_stats. Blocks already all zero
    count as removed first (pruning only tightens). Changes nothing: ``blocks`` applies them;
    ``sparsify`` uses them on copies."""
    bn, bk = block
    crit = "l2" if criterion == "magnitude" else criterion
    grad, fisher = stats if stats is not None else (None, None)
    per_layer = per_layer or {}
    scores, alive = {}, {}
    for name, lin in layers.items():
        w = lin.weight.detach()
        alive[name] = block_mask((w != 0).float(), bn, bk)
        s = block_scores(w, bn, bk, crit, grad[name] if grad else None, fisher[name] if fisher else None)
        scores[name] = s.masked_fill(~alive[name].to(s.device), float("-inf"))
    free = [n for n in layers if n not in per_layer]
    keep = {n: keep_top(scores[n], per_layer[n]) for n in per_layer}
    if scope == "global":
        keep.update(keep_top_global({n: scores[n] for n in free}, sparsity))
    else:
        keep.update({n: keep_top(scores[n], sparsity) for n in free})
    out = {}
    for name, lin in layers.items():
        N, K = lin.weight.shape
        dev = lin.weight.device
        out[name] = expand_block_mask(keep[name], N, K, bn, bk).to(dev) & \
            expand_block_mask(alive[name], N, K, bn, bk).to(dev)
    return out


def _linear_targets(module: nn.Module, skip: Iterable[str]) -> dict[str, nn.Linear]:
    return prunable_layers(module, skip, _modules.is_linear)


def blocks(model: nn.Module, sparsity: float, block: Optional[tuple[int, int]] = None, *,
           criterion: str = "magnitude", data: Optional[Iterable] = None, loss_fn: Optional[Callable] = None,
           scope: str = "layer", skip: Union[str, Iterable[str]] = (), per_layer: Optional[dict[str, float]] = None,
           progress: bool = True) -> dict[str, torch.Tensor]:
    """Zero the least important (bn x bk) blocks of every nn.Linear weight in ``model``, masks kept.

    sparsity: fraction of blocks to zero, in [0, 1). block: (bn, bk), default the fp32 CPU
    kernel's (64, 32). criterion: "magnitude" (= "l2": block RMS, so edge blocks compete fairly),
    "l1" (mean |w| per block), "taylor" (|sum w * dL/dw| per block, per element), "obd" (mean of
    0.5 * h_ii * w^2 per block, h_ii the empirical Fisher); taylor / obd need ``data`` ((inputs,
    target) batches) and optionally loss_fn (cross-entropy by default). scope="layer" prunes each
    layer to that sparsity; "global" ranks the blocks of all layers together. per_layer: {layer
    name: fraction} for those layers. skip: layer names, globs or prefixes ending in "." to leave
    alone. Blocks already pruned stay pruned, so calling again with a higher sparsity prunes
    gradually during fine-tuning.

    The masks are parametrizations (pysparse.prune.masks): every read of ``.weight`` sees them,
    nn.MultiheadAttention's out_proj included, and optimizer steps cannot regrow pruned blocks.
    ``pysparse.prune.remove`` drops them (zeros stay). Returns {layer name: bool mask [N, K]}.
    All arguments are checked (and the data scored) before any layer changes.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    sparsity = check_amount(sparsity, "sparsity")
    check_criterion(criterion, PRUNE_CRITERIA)
    check_data(criterion, data)
    scope = check_scope(scope)
    blk = check_block(block)
    layers = _linear_targets(model, skip)
    if per_layer:
        _modules.check_names_exist(model, [n for n in per_layer if isinstance(n, str)], "per_layer")
    per_layer = check_per_layer(per_layer, layers, "Linear layers")
    if not layers:
        raise ValueError("module has no nn.Linear layer to prune (or all are skipped)")
    stats = None
    if criterion in ("taylor", "obd"):
        stats = gradient_stats(model, layers, data, loss_fn, criterion, desc="pysparse blocks", progress=progress)
    masks = block_masks(layers, sparsity, blk, scope, criterion=criterion, stats=stats, per_layer=per_layer)
    return apply_masks(layers, masks)


def block_magnitude(module: nn.Module, sparsity: float, block: Optional[tuple[int, int]] = None,
                    scope: str = "layer", skip: Iterable[str] = ()) -> dict[str, torch.Tensor]:
    """``blocks(module, sparsity, block, criterion="magnitude", scope=scope, skip=skip)``: zero the
    lowest-RMS (bn x bk) blocks of every nn.Linear weight (the name from before ``blocks``)."""
    return blocks(module, sparsity, block, criterion="magnitude", scope=scope, skip=skip)


@torch.no_grad()
def semi_structured(module: nn.Module, skip: Iterable[str] = ()) -> dict[str, torch.Tensor]:
    """2:4 magnitude pruning: in every group of 4 consecutive inputs of each output keep the 2
    largest |w| (the pattern of GPU sparse tensor cores; 50% sparsity). Layers whose in_features
    is not a multiple of 4 are left alone. Masks are kept as with block_magnitude.
    Returns {layer name: bool mask [N, K]}."""
    layers = _linear_targets(module, skip)
    todo = {}
    for name, lin in layers.items():
        N, K = lin.weight.shape
        if K % 4:
            continue
        w = lin.weight.detach().float().abs().reshape(N, K // 4, 4)
        top = w.topk(2, dim=-1).indices
        todo[name] = torch.zeros_like(w, dtype=torch.bool).scatter_(-1, top, True).reshape(N, K)
    return {n: apply_mask(layers[n], m) for n, m in todo.items()}
