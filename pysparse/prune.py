"""Pruning criteria. ``block_magnitude`` zeroes whole blocks of Linear weights by norm,
in the block shape the block-sparse kernels skip, and keeps the masks so the pattern
survives fine-tuning (and can be tightened gradually)."""
from __future__ import annotations

from typing import Iterable, Optional

import torch
from torch import nn

from .formats import _blocks

# fp32 CPU kernel block: 64 outputs (4 zmm of accumulators per row) x 32 inputs. Swept
# (16|32|64) x (16|32|64) at K = N = 4096, density 0.1 (bench/bench_bsr_linear.py):
# bn = 64 keeps 24 accumulators in registers; bk = 32 amortizes the per-block setup.
DEFAULT_BLOCK = (64, 32)


def _targets(module: nn.Module, skip: Iterable[str]) -> dict[str, nn.Linear]:
    from .quantize import _skipped

    return {n: m for n, m in module.named_modules() if isinstance(m, nn.Linear) and not _skipped(n, skip)}


def _install_mask(lin: nn.Linear, mask: torch.Tensor) -> None:
    """Keep ``mask`` on the layer (ANDed with any mask it has: pruning only tightens),
    zero the weight there, and re-apply it before every forward."""
    mask = mask.to(dtype=lin.weight.dtype, device=lin.weight.device)
    if hasattr(lin, "weight_mask"):
        lin.weight_mask.copy_(mask * lin.weight_mask)
    else:
        lin.register_buffer("weight_mask", mask)
        lin._pysparse_mask_hook = lin.register_forward_pre_hook(_apply_mask_hook)
    lin.weight.mul_(lin.weight_mask)


def _apply_mask_hook(mod: nn.Linear, args):
    # Re-zero pruned blocks before each forward: an optimizer step may have moved them.
    with torch.no_grad():
        mod.weight.mul_(mod.weight_mask)


@torch.no_grad()
def block_magnitude(module: nn.Module, sparsity: float, block: Optional[tuple[int, int]] = None,
                    scope: str = "layer", skip: Iterable[str] = ()) -> dict[str, torch.Tensor]:
    """Zero the lowest-norm (bn x bk) blocks of every nn.Linear weight in ``module``.

    sparsity: fraction of blocks to zero, in [0, 1). scope="layer" prunes each layer to
    that sparsity; "global" ranks the blocks of all layers together (norms divided by
    the block size, so edge blocks compete fairly). Blocks already pruned stay pruned,
    so calling again with a higher sparsity prunes gradually during fine-tuning.
    Each pruned layer keeps a ``weight_mask`` buffer and a forward pre-hook that
    re-applies it. Returns {layer name: element mask [N, K]}.
    """
    if not 0.0 <= float(sparsity) < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    if scope not in ("layer", "global"):
        raise ValueError(f"scope must be 'layer' or 'global', got {scope!r}")
    bn, bk = block or DEFAULT_BLOCK
    if bn < 1 or bk < 1:
        raise ValueError(f"block must be two positive ints, got {block}")
    layers = _targets(module, skip)
    if not layers:
        raise ValueError("module has no nn.Linear layer to prune")
    scores = {}
    for name, lin in layers.items():
        w = lin.weight.detach().float()
        if hasattr(lin, "weight_mask"):
            w = w * lin.weight_mask
        b = _blocks(w, bn, bk)
        ones = _blocks(torch.ones_like(w), bn, bk).sum((-1, -2))
        scores[name] = b.pow(2).sum((-1, -2)).sqrt() / ones.sqrt()  # RMS per block
    if scope == "global":
        allv = torch.cat([s.flatten() for s in scores.values()])
        k = int(round(sparsity * allv.numel()))
        thresh = allv.kthvalue(k).values if k > 0 else allv.new_tensor(-1.0)
        keep = {n: s > thresh for n, s in scores.items()}
        _fix_ties(keep, scores, thresh, allv.numel() - k)
    else:
        keep = {}
        for n, s in scores.items():
            k = int(round(sparsity * s.numel()))
            order = s.flatten().argsort(stable=True)
            m = torch.ones(s.numel(), dtype=torch.bool)
            m[order[:k]] = False
            keep[n] = m.reshape(s.shape)
    masks = {}
    for name, lin in layers.items():
        N, K = lin.weight.shape
        km = keep[name]
        em = km[:, None, :, None].expand(-1, bn, -1, bk).reshape(km.shape[0] * bn, km.shape[1] * bk)[:N, :K]
        _install_mask(lin, em)
        lin._pysparse_block = (bn, bk)
        masks[name] = lin.weight_mask.bool()
    return masks


@torch.no_grad()
def semi_structured(module: nn.Module, skip: Iterable[str] = ()) -> dict[str, torch.Tensor]:
    """2:4 magnitude pruning: in every group of 4 consecutive inputs of each output keep
    the 2 largest |w| (the pattern of GPU sparse tensor cores; 50% sparsity). Layers whose
    in_features is not a multiple of 4 are left alone. Masks are kept and re-applied
    before each forward, as with block_magnitude. Returns {layer name: element mask}."""
    masks = {}
    for name, lin in _targets(module, skip).items():
        N, K = lin.weight.shape
        if K % 4:
            continue
        w = lin.weight.detach().float().abs().reshape(N, K // 4, 4)
        top = w.topk(2, dim=-1).indices
        _install_mask(lin, torch.zeros_like(w).scatter_(-1, top, 1.0).reshape(N, K))
        masks[name] = lin.weight_mask.bool()
    return masks


def _fix_ties(keep, scores, thresh, n_keep):
    # Equal scores at the threshold: keep just enough of them (first come) for the count.
    have = sum(int(k.sum()) for k in keep.values())
    for n, s in scores.items():
        if have >= n_keep:
            break
        tie = (s == thresh) & ~keep[n]
        idx = tie.flatten().nonzero().flatten()[: n_keep - have]
        flat = keep[n].flatten()
        flat[idx] = True
        keep[n] = flat.reshape(s.shape)
        have += idx.numel()


def remove(module: nn.Module) -> None:
    """Drop the masks and hooks ``block_magnitude`` added (the zeros stay in the weights)."""
    for m in module.modules():
        if hasattr(m, "_pysparse_mask_hook"):
            m._pysparse_mask_hook.remove()
            del m._pysparse_mask_hook
            del m.weight_mask
