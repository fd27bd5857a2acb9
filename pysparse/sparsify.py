"""Model conversion: sparsify prunes (where needed) and converts Linear layers to
BlockSparseLinear; plan_report shows what the dispatcher chose and why."""
from __future__ import annotations

from typing import Iterable, Optional

import torch
from torch import nn

from . import _modules, ops
from .formats import block_mask
from .nn.block_sparse_linear import BlockSparseLinear
from .prune import block_masks
from .prune.block import check_block
from .prune.selection import check_amount


def sparsify(model: nn.Module, sparsity: float, block: Optional[tuple[int, int]] = None,
             dtype: Optional[torch.dtype] = None, skip: Iterable[str] = (), *, dispatch: str = "auto") -> nn.Module:
    """Prune ``model``'s nn.Linear layers to ``sparsity`` (fraction of zero blocks) where
    they are not already that sparse, and convert them to BlockSparseLinear, in place.

    sparsity: in [0, 1). block: the pruning and kernel block (None: the kernel's choice;
    int8 uses 64 x 64). dtype: None/torch.float32, torch.bfloat16 or torch.int8 block values
    (see BlockSparseLinear.from_dense; torch.float16 on a GPU). skip: names/globs/prefixes to
    leave alone. dispatch: "auto" keeps dense where the sparse kernel is not faster.
    Linear layers whose parent reads their weight directly (nn.MultiheadAttention's out_proj)
    cannot be replaced and are left as they are (``pysparse.prune.block_magnitude`` masks them).

    Every argument is checked and every layer converted before the model changes; the original
    Linear layers are never pruned in place, so on any error the model is exactly as it was.
    Returns the model (a bare nn.Linear is returned converted).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    sparsity = check_amount(sparsity, "sparsity")
    if block is not None:
        check_block(block)
    skip = _modules.normalize_skip(skip)
    _modules.check_names_exist(model, skip, "skip")
    layers = _modules.targets(model, skip, replaceable=True)
    if not layers:
        raise ValueError("model has no nn.Linear layer to sparsify (or all are skipped)")
    # every layer's arguments are checked before any is pruned or converted
    blocks = {name: BlockSparseLinear.check_args(lin.in_features, lin.out_features, block, dtype, lin.weight.device,
                                                 dispatch) for name, lin in layers.items()}

    def build(name: str, lin: nn.Linear) -> BlockSparseLinear:
        blk = blocks[name]
        w = lin.weight.detach()
        if 1.0 - block_mask(w, *blk).float().mean().item() < sparsity - 1e-6:
            w = w * block_masks({name: lin}, sparsity, blk)[name].to(w.dtype)
        # a pruned copy: the user's layer is untouched until every layer has converted
        pruned = nn.Linear(lin.in_features, lin.out_features, lin.bias is not None, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            pruned.weight.copy_(w)
            if lin.bias is not None:
                pruned.bias.copy_(lin.bias.detach())
        return BlockSparseLinear.from_dense(pruned, block=blk, dtype=dtype, dispatch=dispatch)

    return _modules.replace(model, _modules.convert_once(layers, build))


def _kernel_of(m: BlockSparseLinear) -> str:
    """The kernel the dispatch policy runs for this layer now (what cpu_info reports)."""
    t = next(iter(m.state_dict().values()), None)
    dev = t.device if isinstance(t, torch.Tensor) else torch.device("cpu")
    if m.format == "bsr":
        dt = torch.bfloat16 if m.config.dtype == "bfloat16" else torch.float32
        return ops.kernel_for(dev, "bsr_linear", dtype=dt, block=m.block)
    if m.format in ("bsr-int8", "dense-int8"):
        # the int8 kernel can depend on M (rows of x): on AMX machines small M takes the VNNI kernel
        op = "bsr_int8_linear" if m.format == "bsr-int8" else "int8_linear"
        small, large = ops.kernel_for(dev, op, M=1), ops.kernel_for(dev, op, M=1 << 20)
        if small == large:
            return small
        feats = ops._C.cpu_features()
        rows = feats.get("amx_bsr_min_rows" if op == "bsr_int8_linear" else "amx_min_rows")
        return f"{small} below M={rows}, {large} from it"
    return "aten 2:4" if m.format == "2:4" else "aten F.linear"


def plan_report(model: nn.Module) -> str:
    """A table of every BlockSparseLinear: shape, density, chosen format, the kernel it runs now
    (for int8 formats, by rows of x where that matters: "cpu-avx512 below M=64, cpu-amx from it")
    and the timings behind the choice."""
    rows = [("layer", "shape (N x K)", "density", "format", "kernel", "sparse ms", "dense ms", "2:4 ms")]
    for n, m in model.named_modules():
        if isinstance(m, BlockSparseLinear):
            t = m.timings
            rows.append((n or "<model>", f"{m.out_features} x {m.in_features}", f"{m.density:.3f}", m.format,
                         _kernel_of(m),
                         f"{t['sparse_ms']:.3f}" if "sparse_ms" in t else "-",
                         f"{t['dense_ms']:.3f}" if "dense_ms" in t else "-",
                         f"{t['semi_structured_ms']:.3f}" if "semi_structured_ms" in t else "-"))
    w = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w[i]) for i, c in enumerate(r)) for r in rows)
