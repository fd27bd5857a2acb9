"""How each op moves channels: one handler per kind of node, and the walk that builds the graph."""
from __future__ import annotations

import math
import operator
from typing import Optional

import torch
import torch.nn.functional as F
from torch import fx, nn

from ._graph import ChannelGraph
from ._trace import _as_tuple, _run_shapes, trace
from ._types import ChannelGraphError, NodeInfo, _Layout, _Seg, _where

# -------- the op tables

_KEEP_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Mish, nn.Hardswish, nn.Tanh,
                 nn.Dropout, nn.Dropout2d, nn.Dropout1d, nn.AlphaDropout, nn.Identity, nn.MaxPool2d, nn.AvgPool2d,
                 nn.MaxPool1d, nn.AvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.AdaptiveAvgPool1d,
                 nn.AdaptiveMaxPool1d, nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d)
_NONZERO_MODULES = (nn.Sigmoid, nn.Hardsigmoid, nn.Softplus)
# f(0) == 0 for these, so a channel that is zero stays zero
_KEEP_FUNCS = {F.relu, torch.relu, F.relu6, F.leaky_relu, F.elu, F.gelu, F.silu, F.mish, F.hardswish, torch.tanh,
               F.dropout, F.dropout2d, F.dropout1d, F.alpha_dropout, F.max_pool2d, F.avg_pool2d, F.max_pool1d,
               F.avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d, F.adaptive_avg_pool1d,
               F.adaptive_max_pool1d, F.interpolate, torch.clone, torch.nn.functional.relu_}
_NONZERO_FUNCS = {torch.sigmoid, F.sigmoid, F.hardsigmoid, torch.exp, F.softplus}
_KEEP_METHODS = {"relu", "relu_", "tanh", "contiguous", "clone", "detach", "float", "to", "type_as",
                 "requires_grad_"}
_NONZERO_METHODS = {"sigmoid", "exp"}
_ADD = {operator.add, torch.add, operator.sub, torch.sub, operator.iadd, operator.isub}
_ADD_METHODS = {"add", "add_", "sub", "sub_"}
_MUL = {operator.mul, torch.mul, operator.imul}
_MUL_METHODS = {"mul", "mul_"}
_DIV = {operator.truediv, torch.div, torch.true_divide, operator.itruediv}
_DIV_METHODS = {"div", "div_"}
_REDUCE_FUNCS = {torch.mean: "mean", torch.sum: "sum", torch.amax: "amax", torch.amin: "amin"}
_REDUCE_METHODS = {"mean", "sum", "amax", "amin"}
_META_METHODS = {"size", "dim", "numel"}  # read metadata, return no tensor
_META_ATTRS = {"shape", "device", "dtype", "ndim", "is_cuda"}


def _layout_of(g: ChannelGraph, a) -> Optional[_Layout]:
    if isinstance(a, fx.Node) and a in g.info:
        lay = g.info[a].layout
        return lay if isinstance(lay, _Layout) else None
    return None


def _has_channels(g: ChannelGraph, args) -> bool:
    found = []
    fx.node.map_arg(args, lambda n: found.append(n) if g.info.get(n) is not None and g.info[n].layout is not None else None)
    return bool(found)


def _unsupported(node: fx.Node, why: str = "") -> ChannelGraphError:
    return ChannelGraphError(
        f"cannot follow channels through {_where(node)}: {why or 'not a supported channel operation'}. "
        f"Channel pruning and compaction support Conv2d, ConvTranspose2d, Linear, BatchNorm, element-wise "
        f"activations, pooling, dropout, flatten, residual sums, torch.cat and split/chunk (the list is in "
        f"pysparse._depgraph's docstring); replace that operation or leave this model uncompacted")


def _fixed_only(g: ChannelGraph, lay: _Layout) -> bool:
    return all(not g.spaces[s.space].producer for s in lay.segs)


def _input_layout(g: ChannelGraph, node: fx.Node, x, want_cdim: int) -> _Layout:
    """The layout a conv/Linear reads, its channels along ``want_cdim`` of its input."""
    lay = _layout_of(g, x)
    shape = x.meta.get("pysparse_shape") if isinstance(x, fx.Node) else None
    if shape is None or not isinstance(shape[0], int):
        raise _unsupported(node, "its input is not a single tensor")
    want = want_cdim % len(shape)
    if lay is not None and lay.cdim == want:
        return lay
    if lay is None or _fixed_only(g, lay):
        # the model input (or a constant): its channels are fixed anyway, read it along any dim
        return _Layout((_Seg(g.new_space(shape[want], "model input", producer=False), 0, shape[want]),), want, len(shape))
    raise _unsupported(node, f"it reads dim {want} of a tensor whose channels are on dim {lay.cdim}")


def _slice_layout(lay: _Layout, lo: int, hi: int, node: fx.Node) -> _Layout:
    """Features lo..hi of a layout (split along channels)."""
    out, off = [], 0
    for s in lay.segs:
        n = s.length * s.spatial
        a, b = max(lo, off), min(hi, off + n)
        if a < b:
            if (a - off) % s.spatial or (b - off) % s.spatial:
                raise _unsupported(node, "it splits a flattened channel's features apart")
            out.append(_Seg(s.space, s.start + (a - off) // s.spatial, (b - a) // s.spatial, s.spatial))
        off += n
    return _Layout(tuple(out), lay.cdim, lay.ndim)


def _arg(node: fx.Node, i: int, name: str, default=None):
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def _module_node(g: ChannelGraph, node: fx.Node) -> NodeInfo:
    name = node.target
    mod = g.modules[name]
    x = node.args[0] if node.args else None
    lay = _layout_of(g, x)
    g.calls.setdefault(name, []).append(node)
    first = len(g.calls[name]) == 1
    shape = node.meta.get("pysparse_shape")
    if isinstance(mod, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
        if len(node.args) != 1 or node.kwargs:
            raise _unsupported(node, "called with more than one input")
        xs = x.meta.get("pysparse_shape") if isinstance(x, fx.Node) else None
        if not isinstance(mod, nn.Linear) and isinstance(xs, tuple) and len(xs) != 4:
            # torch runs a conv on an unbatched [C, H, W] image, but then dim 1 is not the channels
            raise ChannelGraphError(f"example_inputs do not fit the model: {_where(node)} reads a {len(xs)}-D tensor "
                                    f"{xs}; channel pruning and compaction need batched inputs [N, C, H, W] "
                                    f"(add the batch dim: x[None])")
        lin = isinstance(mod, nn.Linear)
        inp = _input_layout(g, node, x, -1 if lin else 1)
        if not first:
            g.couple(g._mod_in[name], inp, node)
            return NodeInfo("module", g._mod_out[name], (x,), name, {"in_layout": inp})
        out_c = mod.out_features if lin else mod.out_channels
        in_c = mod.in_features if lin else mod.in_channels
        groups = 1 if lin else mod.groups
        if isinstance(mod, nn.ConvTranspose2d) and groups != 1:
            raise _unsupported(node, "ConvTranspose2d with groups > 1")
        cdim = len(shape) - 1 if lin else 1
        if inp.features != in_c:  # the bookkeeping and the real shapes must agree
            raise _unsupported(node, f"the graph tracked {inp.features} input channels, the layer has {in_c}")
        g._mod_in[name] = inp
        if groups > 1 and groups == in_c == out_c:
            # depthwise: output channel c is input channel c (filtered): one channel
            out = _Layout(tuple(_Seg(s.space, s.start, s.length) for s in inp.segs), cdim, len(shape))
            g.member(name, "in", inp)
            g.member(name, "out", out)
            g._mod_out[name] = out
            return NodeInfo("module", out, (x,), name, {"in_layout": inp, "depthwise": True})
        g.member(name, "in", inp)
        if groups > 1:
            whole = len(inp.segs) == 1 and inp.segs[0].start == 0 and inp.segs[0].length == g.space_size(inp.segs[0].space)
            if groups == in_c:
                g.fix(inp, f"feeds depthwise conv '{name}' with a channel multiplier of {out_c // in_c}")
            elif whole:
                g.divide(inp.segs[0].space, groups)
            else:
                g.fix(inp, f"feeds grouped conv '{name}' through a concat or split")
        space = g.new_space(out_c, divisions=groups)
        out = _Layout((_Seg(space, 0, out_c),), cdim, len(shape))
        g.member(name, "out", out)
        g._mod_out[name] = out
        return NodeInfo("module", out, (x,), name, {"in_layout": inp})
    if isinstance(mod, nn.modules.batchnorm._BatchNorm):
        if lay is None or lay.cdim != 1:
            raise _unsupported(node, "BatchNorm over a tensor whose channels are not on dim 1")
        if first:
            g._mod_in[name] = lay
            g.member(name, "bn", lay)
        else:
            g.couple(g._mod_in[name], lay, node)
        return NodeInfo("module", lay, (x,), name)
    if isinstance(mod, nn.Flatten):
        return _flatten(g, node, x, mod.start_dim, mod.end_dim)
    if isinstance(mod, nn.Hardtanh):  # ReLU6 is a Hardtanh(0, 6)
        return _unary(g, node, x, "keep" if mod.min_val <= 0 <= mod.max_val else "nonzero")
    if isinstance(mod, _KEEP_MODULES):
        return _unary(g, node, x, "keep")
    if isinstance(mod, _NONZERO_MODULES):
        return _unary(g, node, x, "nonzero")
    if _has_channels(g, (node.args, node.kwargs)):
        raise _unsupported(node, f"{type(mod).__name__} is not a module the graph can follow")
    return NodeInfo("opaque")


def _unary(g: ChannelGraph, node: fx.Node, x, op: str) -> NodeInfo:
    lay = _layout_of(g, x)
    if _has_channels(g, (node.args[1:], node.kwargs)):
        raise _unsupported(node, "a second channel tensor as an argument")
    if lay is None:
        return NodeInfo("opaque")
    shape = node.meta.get("pysparse_shape")
    if shape is None or len(shape) != lay.ndim:
        raise _unsupported(node, "it changes the number of dims")
    return NodeInfo(op, lay, (x,))


def _flatten(g: ChannelGraph, node: fx.Node, x, start: int, end: int) -> NodeInfo:
    lay = _layout_of(g, x)
    if lay is None:
        return NodeInfo("opaque")
    shape = x.meta["pysparse_shape"]
    s, e = start % len(shape), end % len(shape)
    if lay.cdim < s:
        return NodeInfo("keep", _Layout(lay.segs, lay.cdim, len(shape) - (e - s)), (x,))
    if lay.cdim > e:
        return NodeInfo("keep", _Layout(lay.segs, lay.cdim - (e - s), len(shape) - (e - s)), (x,))
    if math.prod(shape[s:lay.cdim]) != 1:
        raise _unsupported(node, "it flattens dims before the channel dim into the channels")
    mult = math.prod(shape[lay.cdim + 1:e + 1])
    segs = tuple(_Seg(q.space, q.start, q.length, q.spatial * mult) for q in lay.segs)
    return NodeInfo("keep", _Layout(segs, s, len(shape) - (e - s)), (x,))


def _view(g: ChannelGraph, node: fx.Node, x) -> NodeInfo:
    lay = _layout_of(g, x)
    if lay is None:
        return NodeInfo("opaque")
    ins, outs = tuple(x.meta["pysparse_shape"]), tuple(node.meta["pysparse_shape"])
    c = lay.cdim
    if outs[:c + 1] == ins[:c + 1]:
        return NodeInfo("keep", _Layout(lay.segs, c, len(outs)), (x,), extra={"view": "channels"})
    if len(outs) == c + 1 and outs[:c] == ins[:c] and outs[c] == math.prod(ins[c:]):
        info = _flatten(g, node, x, c, -1)
        info.extra["view"] = "flatten"
        return info
    raise _unsupported(node, f"a view/reshape from {ins} to {outs} that moves channels (only flattening the "
                             f"dims from the channel dim on, or keeping the channel dim, is supported)")


def _reduce(g: ChannelGraph, node: fx.Node, x) -> NodeInfo:
    lay = _layout_of(g, x)
    if lay is None:
        return NodeInfo("opaque")
    dims = _arg(node, 1, "dim")
    keep = bool(_arg(node, 2, "keepdim", False))
    if dims is None:
        raise _unsupported(node, "it reduces over the channel dim")
    dims = [dims] if isinstance(dims, int) else list(dims)
    dims = [d % lay.ndim for d in dims]
    if lay.cdim in dims or any(d < lay.cdim for d in dims):
        raise _unsupported(node, "it reduces over the channel dim (or the dims before it)")
    if any(q.spatial != 1 for q in lay.segs):
        raise _unsupported(node, "it reduces a flattened map")
    return NodeInfo("keep", _Layout(lay.segs, lay.cdim, lay.ndim - (0 if keep else len(dims))), (x,))


def _elementwise(g: ChannelGraph, node: fx.Node, kind: str) -> NodeInfo:
    """add/sub/mul/div: couples the channel tensors that span the channel dim."""
    shape = node.meta.get("pysparse_shape")
    operands = [a for a in node.args[:2]] + [v for k, v in node.kwargs.items() if k == "other"]
    if shape is None or not isinstance(shape[0], int):
        if _has_channels(g, operands):
            raise _unsupported(node, "it does not return one tensor")
        return NodeInfo("opaque")
    full, bcast, number = [], [], False
    cdim = None
    for a in operands:
        lay = _layout_of(g, a)
        if lay is not None:
            cd = lay.cdim + len(shape) - lay.ndim
            if cd < 0:
                raise _unsupported(node, "channel dims do not line up")
            if cdim is None:
                cdim = cd
            elif cd != cdim:
                raise _unsupported(node, "it combines tensors whose channels are on different dims")
    if cdim is None:
        return NodeInfo("opaque")
    for a in operands:
        lay = _layout_of(g, a)
        ashape = a.meta.get("pysparse_shape") if isinstance(a, fx.Node) else None
        if not isinstance(a, fx.Node):
            number = True
            continue
        k = cdim - (len(shape) - len(ashape or ()))
        spans = ashape is not None and k >= 0 and ashape[k] == shape[cdim] and shape[cdim] != 1
        if lay is None:
            if spans:
                raise _unsupported(node, "a per-channel constant tensor (its channels cannot be tracked)")
            number = True
        elif spans or shape[cdim] == 1:
            full.append((a, lay))
        else:
            g.fix(lay, f"broadcast over the channels at node '{node.name}'")
            bcast.append(a)
    if not full:
        return NodeInfo("nonzero", None)
    for _, lay in full[1:]:
        g.couple(full[0][1], lay, node)
    lay0 = full[0][1]
    out = _Layout(lay0.segs, cdim, len(shape))
    ins = tuple(a for a, _ in full)
    if kind == "add":
        op = "nonzero" if (number or bcast) else "and"
    elif kind == "mul":
        op = "or"  # zero wherever any factor is zero (a number factor keeps zeros)
    else:
        # x / number keeps zeros; anything divided by a channel tensor may be 0/0
        op = "keep" if (len(full) == 1 and not bcast and full[0][0] is node.args[0]) else "nonzero"
    return NodeInfo(op, out, ins)


def _cat(g: ChannelGraph, node: fx.Node) -> NodeInfo:
    tensors = _arg(node, 0, "tensors")
    dim = _arg(node, 1, "dim", 0)
    lays = [_layout_of(g, t) for t in tensors]
    if all(l is None for l in lays):
        return NodeInfo("opaque")
    if any(l is None for l in lays):
        raise _unsupported(node, "it concatenates a tensor whose channels cannot be tracked")
    if len({(l.cdim, l.ndim) for l in lays}) != 1:
        raise _unsupported(node, "it concatenates tensors whose channels are on different dims")
    d = dim % lays[0].ndim
    if d == lays[0].cdim:
        segs = tuple(s for l in lays for s in l.segs)
        return NodeInfo("cat", _Layout(segs, d, lays[0].ndim), tuple(tensors))
    for l in lays[1:]:
        g.couple(lays[0], l, node)
    return NodeInfo("and", lays[0], tuple(tensors))


def _split(g: ChannelGraph, node: fx.Node, x) -> NodeInfo:
    lay = _layout_of(g, x)
    if lay is None:
        return NodeInfo("opaque")
    shapes = node.meta.get("pysparse_shape")
    dim = _arg(node, 2, "dim", 0) % lay.ndim
    if dim != lay.cdim:
        return NodeInfo("split", tuple(lay for _ in shapes), (x,), extra={"dim": dim, "along": False})
    pieces, off = [], 0
    for sh in shapes:
        pieces.append(_slice_layout(lay, off, off + sh[dim], node))
        off += sh[dim]
    return NodeInfo("split", tuple(pieces), (x,), extra={"dim": dim, "along": True})


def _getitem(g: ChannelGraph, node: fx.Node) -> NodeInfo:
    src, idx = node.args
    if isinstance(src, fx.Node) and src in g.info and isinstance(g.info[src].layout, tuple):
        if not isinstance(idx, int):
            raise _unsupported(node, "it slices the pieces of a split")
        return NodeInfo("item", g.info[src].layout[idx], (src,), extra={"index": idx})
    lay = _layout_of(g, src)
    if lay is None:
        if _has_channels(g, node.args):
            raise _unsupported(node, "indexing with a channel tensor")
        return NodeInfo("opaque")
    idx = idx if isinstance(idx, tuple) else (idx,)
    for i in range(lay.cdim + 1):
        if i >= len(idx):
            break
        if not (isinstance(idx[i], slice) and idx[i] == slice(None)):
            raise _unsupported(node, "indexing that does not keep the channel dim (and the dims before it) whole")
    if _has_channels(g, idx):
        raise _unsupported(node, "indexing with a channel tensor")
    shape = node.meta.get("pysparse_shape")
    return NodeInfo("keep", _Layout(lay.segs, lay.cdim, len(shape)), (src,))


def _permute(g: ChannelGraph, node: fx.Node, x) -> NodeInfo:
    lay = _layout_of(g, x)
    if lay is None:
        return NodeInfo("opaque")
    if node.target in ("transpose", torch.transpose):
        a, b = (_arg(node, 1, "dim0") % lay.ndim, _arg(node, 2, "dim1") % lay.ndim)
        moved = lay.cdim in (a, b) and a != b
    else:
        dims = node.args[1:] if node.op == "call_method" else (_arg(node, 1, "dims"),)
        dims = list(dims[0]) if len(dims) == 1 and isinstance(dims[0], (tuple, list)) else list(dims)
        moved = dims[lay.cdim] % lay.ndim != lay.cdim
    if moved:
        raise _unsupported(node, "a permute/transpose across the channel dim")
    return NodeInfo("keep", lay, (x,))


def _function_or_method(g: ChannelGraph, node: fx.Node) -> NodeInfo:
    t = node.target
    meth = node.op == "call_method"
    x = node.args[0] if node.args else None
    if (meth and t in _KEEP_METHODS) or (not meth and t in _KEEP_FUNCS):
        return _unary(g, node, x, "keep")
    if (not meth and t is F.hardtanh):
        lo, hi = _arg(node, 1, "min_val", -1.0), _arg(node, 2, "max_val", 1.0)
        return _unary(g, node, x, "keep" if lo <= 0 <= hi else "nonzero")
    if (meth and t in _NONZERO_METHODS) or (not meth and t in _NONZERO_FUNCS):
        return _unary(g, node, x, "nonzero")
    if (meth and t in _ADD_METHODS) or (not meth and t in _ADD):
        return _elementwise(g, node, "add")
    if (meth and t in _MUL_METHODS) or (not meth and t in _MUL):
        return _elementwise(g, node, "mul")
    if (meth and t in _DIV_METHODS) or (not meth and t in _DIV):
        return _elementwise(g, node, "div")
    if not meth and t in (torch.cat, torch.concat):
        return _cat(g, node)
    if t in ("split", "chunk", torch.split, torch.chunk):
        return _split(g, node, x)
    if not meth and t is operator.getitem:
        return _getitem(g, node)
    if t in ("flatten", torch.flatten):
        return _flatten(g, node, x, _arg(node, 1, "start_dim", 0), _arg(node, 2, "end_dim", -1))
    if t in ("view", "reshape", torch.reshape):
        return _view(g, node, x)
    if (meth and t in _REDUCE_METHODS) or (not meth and t in _REDUCE_FUNCS):
        return _reduce(g, node, x)
    if t in ("permute", "transpose", torch.permute, torch.transpose):
        return _permute(g, node, x)
    if (meth and t in _META_METHODS) or (not meth and t is getattr and node.args[1] in _META_ATTRS):
        return NodeInfo("opaque")
    if _has_channels(g, (node.args, node.kwargs)):
        raise _unsupported(node)
    return NodeInfo("opaque")


def build_graph(model: nn.Module, example_inputs) -> ChannelGraph:
    """Trace ``model``, run it once on ``example_inputs`` (eval mode, no grad; its train/eval
    flags are restored) and build the channel graph. Nothing of the model changes."""
    inputs = _as_tuple(example_inputs)
    gm = trace(model)
    _run_shapes(gm, model, inputs)
    g = ChannelGraph(gm)
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            shape = node.meta.get("pysparse_shape")
            if shape is not None and len(shape) >= 2 and isinstance(shape[0], int):
                s = g.new_space(shape[1], "model input", producer=False)
                g.info[node] = NodeInfo("input", _Layout((_Seg(s, 0, shape[1]),), 1, len(shape)))
            else:
                g.info[node] = NodeInfo("opaque")
        elif node.op == "get_attr":
            g.info[node] = NodeInfo("opaque")
        elif node.op == "call_module":
            g.info[node] = _module_node(g, node)
        elif node.op in ("call_function", "call_method"):
            g.info[node] = _function_or_method(g, node)
        elif node.op == "output":
            def _fix(n):
                lay = g.info.get(n)
                if lay is not None and lay.layout is not None:
                    for l in (lay.layout if isinstance(lay.layout, tuple) else (lay.layout,)):
                        g.fix(l, "the model's output")
            fx.node.map_arg(node.args, _fix)
            g.info[node] = NodeInfo("opaque")
    g.finish()
    return g
