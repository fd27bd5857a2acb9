"""Making a compressed student trainable, and putting its fast layers back afterwards.

``prepare`` (on recover's private copy of the student) swaps every layer that cannot
train as it is for a trainable stand-in, and ``finish`` swaps the fast layers back:

- int8 layers (Int8Linear, Int8Conv2d, BsrInt8Linear, DenseInt8KeptLinear): float shadows
  with fake quantization (``_qat``), re-quantized into the same kinds at the end;
- CompactConv2d (inference only, no backward): a float stand-in computing the same gather +
  conv + scatter in PyTorch ops (pysparse.reference.compact_conv2d), rebuilt at the end;
- DenseKeptLinear (a block-pruned Linear kept dense because that was faster): its pruned
  blocks masked with a pysparse mask (parametrize) for the run, so they cannot regrow;
- BsrLinear trains as it is (gradients reach the stored blocks; the pattern is fixed);
  SemiStructuredLinear's weight stays frozen (torch's 2:4 tensor has no training path here).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .. import formats, reference
from ..nn import CompactConv2d, DenseKeptLinear, SemiStructuredLinear
from ..prune.masks import apply_mask, get_mask
from ._qat import QUANTIZED, Int8Conv2dShadow, Int8LinearShadow, quantized_from_shadow, shadow_of


class CompactConv2dShadow(nn.Module):
    """A trainable CompactConv2d: the kept weights as a Parameter, the reference's ops."""

    def __init__(self, layer: CompactConv2d) -> None:
        super().__init__()
        self.weight = nn.Parameter(layer.kept_weight().detach().float().clone())
        self.bias = nn.Parameter(layer.bias.detach().float().clone()) if layer.bias is not None else None
        self.register_buffer("in_idx", layer.in_idx.clone())
        self.register_buffer("out_idx", layer.out_idx.clone())
        self.in_channels, self.out_channels = layer.in_channels, layer.out_channels
        self.stride, self.padding, self.dilation, self.relu = layer.stride, layer.padding, layer.dilation, layer.relu

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        return reference.compact_conv2d(x, self.weight, self.bias, self.in_idx, self.out_idx, self.stride,
                                        self.padding, self.dilation, self.out_channels, residual, self.relu)

    @torch.no_grad()
    def rebuild(self) -> CompactConv2d:
        dev = self.weight.device
        return CompactConv2d(self.weight.detach().cpu(), None if self.bias is None else self.bias.detach().cpu(),
                             self.in_idx.cpu(), self.out_idx.cpu(), self.out_channels, in_channels=self.in_channels,
                             stride=self.stride, padding=self.padding, dilation=self.dilation,
                             relu=self.relu).to(dev)


SHADOWS = (Int8LinearShadow, Int8Conv2dShadow, CompactConv2dShadow)


def _stand_in(m: nn.Module) -> Optional[nn.Module]:
    if isinstance(m, QUANTIZED):
        return shadow_of(m)
    if isinstance(m, CompactConv2d):
        return CompactConv2dShadow(m)
    return None


def prepare(model: nn.Module) -> tuple[nn.Module, list[nn.Module], dict[str, int]]:
    """Swap the untrainable layers of ``model`` (in place; recover's copy) for stand-ins.

    Returns (model, the DenseKeptLinear layers masked for the run, {kind: count swapped}).
    A module shared under several names gets one stand-in, shared the same way. A model
    that is itself such a layer is returned as its stand-in."""
    counts: dict[str, int] = {}
    done: dict[int, nn.Module] = {}
    masked: list[nn.Module] = []

    def visit(parent: nn.Module) -> None:
        for name, child in list(parent.named_children()):
            if id(child) in done:
                setattr(parent, name, done[id(child)])
                continue
            new = _stand_in(child)
            if new is not None:
                done[id(child)] = new
                counts[type(child).__name__] = counts.get(type(child).__name__, 0) + 1
                setattr(parent, name, new)
                continue
            if type(child) is DenseKeptLinear and id(child) not in {id(m) for m in masked}:
                _mask_pruned_blocks(child, masked)
            if not isinstance(child, SemiStructuredLinear):
                visit(child)

    top = _stand_in(model)
    if top is not None:
        counts[type(model).__name__] = 1
        return top, masked, counts
    if type(model) is DenseKeptLinear:
        _mask_pruned_blocks(model, masked)
    visit(model)
    return model, masked, counts


def _mask_pruned_blocks(layer: DenseKeptLinear, masked: list[nn.Module]) -> None:
    lin = layer.dense
    if get_mask(lin, "weight") is not None:
        return  # already masked (the user's mask): it holds for the run and stays
    w = lin.weight.detach()
    if not w.requires_grad and not lin.weight.requires_grad:
        lin.weight.requires_grad_(True)
    bn, bk = layer.block
    keep = formats.expand_block_mask(formats.block_mask(w.float().cpu(), bn, bk), *w.shape, bn, bk)
    apply_mask(lin, keep.to(w.device))
    masked.append(layer)


@torch.no_grad()
def finish(model: nn.Module, masked: list[nn.Module]) -> nn.Module:
    """Put the fast layers back (re-quantizing the int8 shadows) and drop the run's masks."""
    from torch.nn.utils import parametrize

    for layer in masked:
        parametrize.remove_parametrizations(layer.dense, "weight", leave_parametrized=True)
    done: dict[int, nn.Module] = {}

    def back(m: nn.Module) -> nn.Module:
        if id(m) not in done:
            done[id(m)] = m.rebuild() if isinstance(m, CompactConv2dShadow) else quantized_from_shadow(m)
        return done[id(m)]

    if isinstance(model, SHADOWS):
        return back(model)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, SHADOWS):
                setattr(parent, name, back(child))
    return model
