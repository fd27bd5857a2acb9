"""Block and 2:4 pruning of Linear weights, in the shapes the sparse kernels skip."""
from __future__ import annotations

from typing import Iterable, Optional

import torch
from torch import nn

from .. import _modules
from ..formats import DEFAULT_BLOCK, block_mask, expand_block_mask
from .criteria import block_scores
from .masks import apply_mask
from .selection import check_amount, keep_top, keep_top_global


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
                scope: str = "layer") -> dict[str, torch.Tensor]:
    """Element masks [N, K] (bool, True = kept) removing the lowest-RMS ``block`` blocks of each
    layer's weight (as it computes now, masks included), per layer or ranked globally. Changes
    nothing: ``block_magnitude`` applies them; ``sparsify`` uses them on copies."""
    bn, bk = block
    scores = {}
    for name, lin in layers.items():
        scores[name] = block_scores(lin.weight.detach(), bn, bk, "l2")
    if scope == "global":
        keep = keep_top_global(scores, sparsity)
    else:
        keep = {n: keep_top(s, sparsity) for n, s in scores.items()}
    out = {}
    for name, lin in layers.items():
        N, K = lin.weight.shape
        # a block that is already all zero stays pruned (pruning only tightens)
        cur = lin.weight.detach() != 0
        out[name] = expand_block_mask(keep[name], N, K, bn, bk).to(cur.device) & \
            expand_block_mask(block_mask(cur.float(), bn, bk), N, K, bn, bk).to(cur.device)
    return out


def _linear_targets(module: nn.Module, skip: Iterable[str]) -> dict[str, nn.Linear]:
    skip = _modules.normalize_skip(skip)
    _modules.check_names_exist(module, skip, "skip")
    layers = _modules.targets(module, skip)
    # a module used under several names is pruned once
    seen, out = set(), {}
    for n, m in layers.items():
        if id(m) not in seen:
            seen.add(id(m))
            out[n] = m
    return out


@torch.no_grad()
def block_magnitude(module: nn.Module, sparsity: float, block: Optional[tuple[int, int]] = None,
                    scope: str = "layer", skip: Iterable[str] = ()) -> dict[str, torch.Tensor]:
    """Zero the lowest-norm (bn x bk) blocks of every nn.Linear weight in ``module``, masks kept.

    sparsity: fraction of blocks to zero, in [0, 1). block: (bn, bk), default the fp32 CPU
    kernel's (64, 32). scope="layer" prunes each layer to that sparsity; "global" ranks the
    blocks of all layers together (block RMS, so edge blocks compete fairly). Blocks already
    pruned stay pruned, so calling again with a higher sparsity prunes gradually during
    fine-tuning. skip: layer names, globs or prefixes ending in "." to leave alone.

    The masks are parametrizations (pysparse.prune.masks): every read of ``.weight`` sees them,
    nn.MultiheadAttention's out_proj included, and optimizer steps cannot regrow pruned blocks.
    ``pysparse.prune.remove`` drops them (zeros stay). Returns {layer name: bool mask [N, K]}.
    All arguments are checked before any layer changes.
    """
    sparsity = check_amount(sparsity, "sparsity")
    if scope not in ("layer", "global"):
        raise ValueError(f"scope must be 'layer' or 'global', got {scope!r}")
    blk = check_block(block)
    layers = _linear_targets(module, skip)
    if not layers:
        raise ValueError("module has no nn.Linear layer to prune (or all are skipped)")
    masks = block_masks(layers, sparsity, blk, scope)
    return {n: apply_mask(layers[n], m) for n, m in masks.items()}


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
