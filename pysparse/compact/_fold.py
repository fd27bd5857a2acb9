"""Inference treatment of a compacted graph: BatchNorm folded into the layer before it, and
channels_last (NHWC: the layout oneDNN's CPU convolutions are fastest in)."""
from __future__ import annotations

from collections import Counter

import torch
from torch import fx, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval


def _set_module(gm: fx.GraphModule, name: str, mod: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(gm.get_submodule(parent) if parent else gm, leaf, mod)


def fold_batchnorm(gm: fx.GraphModule) -> int:
    """Fold each eval-mode BatchNorm into the Conv2d / ConvTranspose2d / Linear before it, where
    that layer's output goes to the BatchNorm alone and neither module is called elsewhere
    (a folded layer computes conv-then-BN, so another reader of the conv output would see
    the wrong values). Returns how many were folded."""
    modules = dict(gm.named_modules())
    uses = Counter(n.target for n in gm.graph.nodes if n.op == "call_module")
    folded = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not isinstance(modules[node.target], nn.modules.batchnorm._BatchNorm):
            continue
        bn = modules[node.target]
        prev = node.args[0] if node.args else None
        if (not isinstance(prev, fx.Node) or prev.op != "call_module" or len(prev.users) != 1
                or uses[prev.target] != 1 or uses[node.target] != 1 or len(node.args) != 1 or node.kwargs
                or bn.running_mean is None or bn.training):
            continue
        layer = modules[prev.target]
        if type(layer) is nn.Conv2d:
            fused = fuse_conv_bn_eval(layer, bn)
        elif type(layer) is nn.ConvTranspose2d:
            fused = fuse_conv_bn_eval(layer, bn, transpose=True)
        elif type(layer) is nn.Linear and isinstance(bn, nn.BatchNorm1d) and len(
                prev.meta.get("pysparse_shape") or ()) == 2:
            fused = fuse_linear_bn_eval(layer, bn)
        else:
            continue
        _set_module(gm, prev.target, fused)
        modules[prev.target] = fused
        node.replace_all_uses_with(prev)
        gm.graph.erase_node(node)
        folded += 1
    gm.graph.lint()
    gm.recompile()
    gm.delete_all_unused_submodules()
    return folded


def to_channels_last(gm: fx.GraphModule) -> None:
    """4-D weights to channels_last, and each 4-D input converted on entry (a no-op for an
    input already in NHWC), so every conv runs NHWC."""
    gm.to(memory_format=torch.channels_last)
    for node in list(gm.graph.nodes):
        shape = node.meta.get("pysparse_shape")
        if node.op == "placeholder" and isinstance(shape, tuple) and len(shape) == 4 and isinstance(shape[0], int):
            with gm.graph.inserting_after(node):
                cl = gm.graph.call_method("contiguous", (node,), {"memory_format": torch.channels_last})
            node.replace_all_uses_with(cl, delete_user_cb=lambda u: u is not cl)
    gm.graph.lint()
    gm.recompile()


def use_packed_conv2d(gm: fx.GraphModule) -> int:
    """Every plain nn.Conv2d (exactly that type) becomes a PackedConv2d sharing its parameters
    (its weight reordered once for oneDNN instead of per call; the same results). Returns how many."""
    from ..nn import PackedConv2d

    n = 0
    for name, mod in list(gm.named_modules()):
        if type(mod) is nn.Conv2d:
            _set_module(gm, name, PackedConv2d.from_conv(mod))
            n += 1
    return n
