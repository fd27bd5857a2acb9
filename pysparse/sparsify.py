"""Model conversion: sparsify prunes (where needed) and converts Linear layers to
BlockSparseLinear; plan_report shows what the dispatcher chose and why."""
from __future__ import annotations

from typing import Iterable, Optional

import torch
from torch import nn

from . import prune
from .formats import INT8_BLOCK, block_mask
from .nn.block_sparse_linear import BlockSparseLinear
from .quantize import _linears, _replace


def sparsify(model: nn.Module, sparsity: float, block: Optional[tuple[int, int]] = None,
             dtype: Optional[torch.dtype] = None, skip: Iterable[str] = (), *, dispatch: str = "auto") -> nn.Module:
    """Prune ``model``'s nn.Linear layers to ``sparsity`` (fraction of zero blocks) where
    they are not already that sparse, and convert them to BlockSparseLinear, in place.

    block: the pruning and kernel block (None: the kernel's choice; int8 uses 64 x 64).
    dtype: None/torch.float32, torch.bfloat16 or torch.int8 block values (see
    BlockSparseLinear.from_dense; torch.float16 on a GPU). skip: names/globs/prefixes to
    leave alone. dispatch: "auto" keeps dense where the sparse kernel is not faster.
    Returns the model (a bare nn.Linear is returned converted).
    """
    if isinstance(skip, str):
        skip = (skip,)
    skip = tuple(skip)
    if dtype == torch.int8 and block is not None and tuple(block) != INT8_BLOCK:
        raise ValueError(f"int8 blocks are {INT8_BLOCK}, got block={block}")
    blk = INT8_BLOCK if dtype == torch.int8 else tuple(block or prune.DEFAULT_BLOCK)
    layers = _linears(model, skip)
    if not layers:
        raise ValueError("model has no nn.Linear layer to sparsify (or all are skipped)")
    done: dict[int, BlockSparseLinear] = {}  # a module used under several names converts once
    converted = {}
    for name, lin in layers.items():
        if id(lin) not in done:
            mask = block_mask(lin.weight.detach(), *blk)
            if 1.0 - mask.float().mean().item() < sparsity - 1e-6:
                prune.block_magnitude(lin, sparsity, block=blk)
            prune.remove(lin)
            done[id(lin)] = BlockSparseLinear.from_dense(lin, block=blk, dtype=dtype, dispatch=dispatch)
        converted[name] = done[id(lin)]
    if "" in converted:
        return converted[""]
    _replace(model, converted)
    return model


def plan_report(model: nn.Module) -> str:
    """A table of every BlockSparseLinear: shape, density, chosen format and the timings
    behind the choice."""
    rows = [("layer", "shape (N x K)", "density", "format", "sparse ms", "dense ms", "2:4 ms")]
    for n, m in model.named_modules():
        if isinstance(m, BlockSparseLinear):
            t = m.timings
            rows.append((n or "<model>", f"{m.out_features} x {m.in_features}", f"{m.density:.3f}", m.format,
                         f"{t['sparse_ms']:.3f}" if t else "-", f"{t['dense_ms']:.3f}" if t else "-",
                         f"{t['semi_structured_ms']:.3f}" if "semi_structured_ms" in t else "-"))
    w = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w[i]) for i, c in enumerate(r)) for r in rows)
