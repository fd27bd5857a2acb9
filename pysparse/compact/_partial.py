"""CompactConv2d where a channel set cannot be removed: the members of one residual sum whose
channels were zeroed differently (a user's own masks).

The sum keeps the union U of its members' live channels (``_keep``), so a member conv whose
own nonzero output channels S are fewer than U would compute |U| - |S| rows of zeros. Here each
such conv (groups=1, float32, called once) becomes a ``pysparse.nn.CompactConv2d`` that computes
only S and writes zeros in the rest of U: exact, since those channels are exactly zero anyway.
Where the graph is exactly ``conv -> add(other) [-> relu]`` the add and the ReLU go into the
kernel's epilogue (its ``residual`` / ``relu``), which also saves one pass over the sum.
"""
from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.utils import parametrize

from .._depgraph import ChannelGraph
from ..nn.compact_conv2d import CompactConv2d
from ..ops_conv import CONV_PANEL
from ._fold import _set_module
from ._keep import Zeros, layout_index

_ADD_FUNCS = {operator.add, operator.iadd, torch.add}
_ADD_METHODS = {"add", "add_"}
_RELU_FUNCS = {F.relu, torch.relu, torch.relu_, F.relu_}
_RELU_METHODS = {"relu", "relu_"}


def _pays(live: int, union: int) -> bool:
    # The kernel computes (and stores) whole panels of CONV_PANEL=16 output channels: it pays
    # only when S's panels hold fewer rows than U (8 live of 12: one padded panel of 16 > 12).
    return 0 < live and -(-live // CONV_PANEL) * CONV_PANEL < union


def _plain_conv(mod: nn.Module) -> bool:
    # an nn.Conv2d, or one with parametrizations (a class torch derives from nn.Conv2d); not a
    # subclass with a forward of its own
    cls = type(mod)
    return cls is nn.Conv2d or (parametrize.is_parametrized(mod) and cls.__bases__ == (nn.Conv2d,))


def _eligible(g: ChannelGraph, node: fx.Node, mod: nn.Module) -> bool:
    if not _plain_conv(mod) or mod.groups != 1 or mod.padding_mode != "zeros":
        return False  # grouped and depthwise convs stay sliced dense convs
    if isinstance(mod.padding, str) and mod.padding == "same" and any(
            d * (k - 1) % 2 for d, k in zip(mod.dilation, mod.kernel_size)):
        return False
    if len(g.calls.get(node.target, ())) != 1 or mod.weight.dtype != torch.float32:
        return False
    # a member of a coupled sum or product: its group has another producer
    info = g.info.get(node)
    for s in info.layout.segs:
        if any(gi >= 0 and len(g.groups[gi].producers) > 1 for gi, *_ in g.pieces(s.space, s.start, s.length)):
            return True
    return False


def live_outputs(g: ChannelGraph, z: Zeros, keep: dict[int, torch.Tensor]) -> dict[fx.Node, tuple]:
    """Before any change: for each candidate conv node, (positions among its kept outputs of
    those not exactly zero after the conv, the same after the BatchNorm that alone reads it,
    that BatchNorm node or None, how many outputs it keeps). Which of the two sets applies is
    known after folding."""
    out = {}
    for node in g.gm.graph.nodes:
        if node.op != "call_module" or not _eligible(g, node, g.modules[node.target]):
            continue
        info = g.info[node]
        ko = layout_index(g, info.layout, keep, features=False)
        zc = z.get(node)
        bn = next(iter(node.users)) if len(node.users) == 1 else None
        if not (bn is not None and bn.op == "call_module"
                and isinstance(g.modules[bn.target], nn.modules.batchnorm._BatchNorm)):
            bn = None
        zb = z.get(bn) if bn is not None else None
        out[node] = ((~zc[ko]).nonzero().flatten() if isinstance(zc, torch.Tensor) else None,
                     (~zb[ko]).nonzero().flatten() if isinstance(zb, torch.Tensor) else None, bn, len(ko))
    return out


def _mutates(node: fx.Node, modules: dict) -> bool:
    """Whether ``node`` may write into one of its inputs (conservative)."""
    t = node.target
    if node.op == "call_method":
        return t.endswith("_")
    if node.op == "call_function":
        return t in (operator.iadd, operator.isub, operator.imul, operator.itruediv) or bool(
            node.kwargs.get("inplace")) or getattr(t, "__name__", "").endswith("_")
    if node.op == "call_module":
        return bool(getattr(modules.get(t), "inplace", False))
    return False


def _is_add(node: fx.Node) -> bool:
    if node.kwargs or len(node.args) != 2:
        return False
    return (node.op == "call_function" and node.target in _ADD_FUNCS) or (
        node.op == "call_method" and node.target in _ADD_METHODS)


def _is_relu(node: fx.Node, x: fx.Node, modules: dict) -> bool:
    if not node.args or node.args[0] is not x or len(node.args) > 1 + (node.op == "call_function"):
        return False
    if len(node.args) == 2 and not isinstance(node.args[1], bool):
        return False
    if set(node.kwargs) - {"inplace"}:
        return False
    if node.op == "call_module":
        return type(modules.get(node.target)) is nn.ReLU
    return (node.op == "call_function" and node.target in _RELU_FUNCS) or (
        node.op == "call_method" and node.target in _RELU_METHODS)


def _fuse(gm: fx.GraphModule, conv: fx.Node, modules: dict, order: dict) -> bool:
    """conv -> [Identity ->] add(other) [-> relu]  =>  conv(x, residual=other, relu)."""
    graph = gm.graph
    skipped, cur = [], conv
    while len(cur.users) == 1:
        nxt = next(iter(cur.users))
        if nxt.op == "call_module" and type(modules.get(nxt.target)) is nn.Identity and len(nxt.args) == 1:
            skipped.append(nxt)
            cur = nxt
            continue
        break
    if len(cur.users) != 1:
        return False
    add = next(iter(cur.users))
    if not _is_add(add) or add.args[0] is add.args[1]:
        return False
    other = add.args[1] if add.args[0] is cur else add.args[0]
    if not isinstance(other, fx.Node):
        return False
    shapes = {tuple(n.meta.get("pysparse_shape") or ()) for n in (conv, other, add)}
    if len(shapes) != 1 or len(next(iter(shapes))) != 4:
        return False  # a broadcast add is not the residual the kernel adds
    # an in-place add writes into its first operand: fusing would leave ``other`` unchanged
    # for its later readers
    if _mutates(add, modules) and add.args[0] is other and any(order[u] > order[add] for u in other.users):
        return False
    # the conv now runs where the add was: nothing in between may write into its input
    x = conv.args[0]
    if any(order[conv] < order[u] < order[add] and _mutates(u, modules) for u in x.users if u is not conv):
        return False
    relu = None
    if len(add.users) == 1:
        r = next(iter(add.users))
        if _is_relu(r, add, modules):
            relu = r
    mod = modules[conv.target]
    mod.relu = relu is not None
    with graph.inserting_before(add):
        fused = graph.call_module(conv.target, (x, other))
    fused.meta = dict(conv.meta)
    last = relu if relu is not None else add
    last.replace_all_uses_with(fused)
    for n in [last] + ([add] if relu is not None else []) + skipped[::-1] + [conv]:
        graph.erase_node(n)
    return True


def use_compact_conv2d(gm: fx.GraphModule, live: dict[fx.Node, tuple]) -> int:
    """Replace the convs of ``live`` whose nonzero channels are fewer than their kept ones
    (where it pays) by CompactConv2d, fusing the residual add (+ ReLU) where the graph is
    exactly that. Runs after folding. Returns how many convs were replaced."""
    modules = dict(gm.named_modules())
    nodes = set(gm.graph.nodes)
    replaced = []
    for node, (s_conv, s_bn, bn, union) in live.items():
        if node not in nodes:
            continue
        mod = modules[node.target]
        folded = bn is not None and bn not in nodes  # the conv now computes conv-then-BN
        s = s_bn if folded else s_conv
        if s is None or type(mod) is not nn.Conv2d or mod.out_channels != union or not _pays(len(s), union):
            continue
        if not torch.isfinite(mod.weight.detach()).all():
            continue  # CompactConv2d refuses NaN/Inf weights; keep the dense conv
        out_mask = torch.zeros(union, dtype=torch.bool)
        out_mask[s] = True
        in_mask = torch.ones(mod.in_channels, dtype=torch.bool)
        cc = CompactConv2d.from_masked(mod, in_mask, out_mask).to(mod.weight.device)
        _set_module(gm, node.target, cc)
        modules[node.target] = cc
        replaced.append(node)
    for node in replaced:
        _fuse(gm, node, modules, {n: i for i, n in enumerate(gm.graph.nodes)})
    gm.graph.lint()
    gm.recompile()
    if replaced:
        gm.delete_all_unused_submodules()  # a ReLU module only a fused add used
        # no backward through CompactConv2d: the model is for inference, and frozen it runs
        # (and exports) without torch.no_grad()
        gm.requires_grad_(False)
    return len(replaced)


def use_residual_fusion(gm: fx.GraphModule) -> int:
    """Each plain float32 Conv2d (groups=1, zero padding given as numbers, finite weights,
    called once) whose output, through Identity modules only, is one operand of an add of its
    own shape becomes a CompactConv2d over all its channels with the add (and a ReLU right
    after it) in the kernel's epilogue: the sum is written once instead of the conv's output,
    the add's and the ReLU's (ResNet-50-shaped, 50% compacted, 2 threads: 120 -> 111 ms at
    batch 8, 22.3 -> 21.2 ms at batch 1). A conv whose add cannot be fused stays as it was.
    Returns how many were fused; with any, the model's parameters are frozen (CompactConv2d
    has no backward)."""
    modules = dict(gm.named_modules())
    calls: dict[str, int] = {}
    for n in gm.graph.nodes:
        if n.op == "call_module":
            calls[n.target] = calls.get(n.target, 0) + 1
    fused = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or calls.get(node.target) != 1:
            continue
        mod = modules.get(node.target)
        if (type(mod) is not nn.Conv2d or mod.groups != 1 or mod.padding_mode != "zeros"
                or isinstance(mod.padding, str) or mod.weight.dtype != torch.float32
                or not torch.isfinite(mod.weight.detach()).all()):
            continue
        ones = lambda c: torch.ones(c, dtype=torch.bool)  # noqa: E731
        cc = CompactConv2d.from_masked(mod, ones(mod.in_channels), ones(mod.out_channels)).to(mod.weight.device)
        _set_module(gm, node.target, cc)
        modules[node.target] = cc
        if _fuse(gm, node, modules, {n: i for i, n in enumerate(gm.graph.nodes)}):
            fused += 1
        else:
            _set_module(gm, node.target, mod)
            modules[node.target] = mod
    if fused:
        gm.graph.lint()
        gm.recompile()
        gm.delete_all_unused_submodules()
        gm.requires_grad_(False)
    return fused
