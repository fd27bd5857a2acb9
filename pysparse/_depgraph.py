"""The channel dependency graph: which channels of which layers must be pruned together.

``channel_groups(model, example_inputs)`` traces the model with torch.fx, runs it once on
``example_inputs`` for the shapes, and follows every tensor's channel dimension through the
graph. Each group is a set of coupled channels: the layers whose output channels they are
(producers), the layers that read them (consumers), and the BatchNorms in between. Removing
channel ``c`` of a group means removing row ``c`` of every producer, entry ``c`` of every
BatchNorm and input ``c`` of every consumer, all at once.

What couples channels:
- a residual sum (``+``, ``torch.add``, ``-``) or an element-wise product of two channel
  tensors: every member shares one channel set (an SE block's ``x * scale`` too). The members
  may be concatenations or split pieces: channel i of one is channel i of the other, so a
  layer added to ``cat([a, b])`` has its first rows in a's group and the rest in b's, and a
  layer's two halves added together make one group of half the size;
- a depthwise conv (``groups == in_channels == out_channels``): its input and output channel
  ``c`` are one channel, so it is both a producer and a consumer of its input's group;
- a module called more than once: every call site shares its channels.

What the graph follows (anything else that touches a channel tensor is an error naming the
node and the layer, never an IndexError later):
- producers: Conv2d (grouped and depthwise too), ConvTranspose2d (groups=1), Linear;
- pass-through: BatchNorm1d/2d, activations (ReLU, ReLU6, Hardtanh, LeakyReLU, ELU, GELU,
  SiLU, Mish, Hardswish, Tanh, Sigmoid, Hardsigmoid; modules, functions and methods), pooling
  (max, avg, adaptive), Upsample/interpolate, dropout, Identity, contiguous/clone, indexing
  that keeps the channel dim whole, mean/sum/amax/amin over non-channel dims, transposes
  that leave the channel dim in place;
- flatten and flattening view/reshape: each channel then owns ``H*W`` consecutive features of
  the next Linear (``ChannelSlice.spatial``);
- torch.cat along channels (each input keeps its own group, at an offset), split/chunk along
  channels (each piece is a range of its input's groups);
- multiplication or division by a number, adding a number.

Grouped convolutions (1 < groups, not depthwise) split their input and output channels
into ``groups`` contiguous blocks, and the compacted conv must stay a grouped conv with
equal blocks, so a group that feeds or comes from one carries ``divisions``: it may only be
pruned by the same number of channels in each of its ``divisions`` equal contiguous
blocks. A depthwise conv with a channel multiplier (``out_channels = m * in_channels``,
``m > 1``) fixes its input's channels (each input channel owns m outputs).

The model's input channels are never a group; the model's output channels, and channels
that broadcast over a channel dim of size 1, are groups with ``prunable=False`` and a
``reason``.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import fx, nn

__all__ = ["ChannelGroup", "ChannelSlice", "ChannelGraphError", "NotTraceableError", "channel_groups"]


class ChannelGraphError(ValueError):
    """The model has an operation whose channels the dependency graph cannot follow, or the
    example inputs do not fit the model."""


class NotTraceableError(ChannelGraphError):
    """torch.fx could not trace the model."""


@dataclass(frozen=True)
class ChannelSlice:
    """Where a run of a group's channels sits in one layer.

    module: the layer's qualified name (as in ``model.named_modules()``).
    role: "out" (output channels: conv weight rows / Linear rows and the bias), "in" (input
      channels of a conv, input features of a Linear), or "bn" (BatchNorm entries).
    start: the layer's first channel (for "in" of a Linear: its first input feature).
    group_start: the group's channel that sits at ``start``; the slice covers ``length``
      channels from there, in order.
    spatial: "in" only: features per channel (``H*W`` when a map was flattened into a Linear;
      channel ``group_start + i`` owns features ``start + i*spatial ... + spatial - 1``).
    """

    module: str
    role: str
    start: int
    group_start: int
    length: int
    spatial: int = 1


@dataclass
class ChannelGroup:
    """A set of ``channels`` coupled channels (see the module docstring).

    producers: layers whose output channels these are (a depthwise conv is also a consumer).
    consumers: layers whose input channels/features read them.
    bns: BatchNorm layers normalizing them (possibly together with other groups' channels,
      after a torch.cat: see ``slices`` for the offsets).
    slices: exactly where each channel sits in each of those layers.
    prunable: False for the model's output channels and a few other cases; ``reason`` says why.
    divisions: prune the same number of channels in each of this many equal contiguous
      blocks (grouped convolutions); 1 when unconstrained.
    """

    channels: int
    producers: list[str]
    consumers: list[str]
    bns: list[str]
    slices: list[ChannelSlice]
    prunable: bool
    reason: str = ""
    divisions: int = 1


# ---------------------------------------------------------------------------------------------
# internal representation: a tensor's channel dim is a list of segments of "spaces"; a space is
# the output channels of one producer (or the model input). Coupled spaces are merged (union-find)
# with the identity index map, so a group's channel c is channel c of each of its spaces.

@dataclass(frozen=True)
class _Seg:
    space: int
    start: int
    length: int
    spatial: int = 1


@dataclass(frozen=True)
class _Layout:
    segs: tuple[_Seg, ...]
    cdim: int  # the channel dim of the tensor (non-negative)
    ndim: int

    @property
    def channels(self) -> int:
        return sum(s.length for s in self.segs)

    @property
    def features(self) -> int:
        return sum(s.length * s.spatial for s in self.segs)


@dataclass
class _Space:
    size: int
    producer: bool = False  # a layer's output channels (else the model input)


@dataclass
class NodeInfo:
    """What the graph knows of one fx node. ``op`` is the rule by which a channel that is
    exactly zero on the inputs is zero on the output (used by compaction):
    "input" never zero; "opaque" no channels; "module" a producer or BatchNorm (see module);
    "keep" zero where the input is; "nonzero" never zero; "and" / "or" zero where all / any
    channel inputs are; "cat" / "split" / "item" along channels."""

    op: str
    layout: Any = None  # _Layout, a tuple of _Layout (split), or None
    inputs: tuple = ()  # the fx nodes whose channels this op reads (in order)
    module: str = ""
    extra: dict = field(default_factory=dict)


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


def _what(node: fx.Node) -> str:
    if node.op == "call_module":
        return f"module {node.target!r}"
    if node.op == "call_method":
        return f"method .{node.target}()"
    if node.op == "call_function":
        return f"function {getattr(node.target, '__module__', '') or ''}.{getattr(node.target, '__name__', node.target)}"
    return node.op


def _where(node: fx.Node) -> str:
    scope = node.meta.get("pysparse_scope", "")
    layer = node.target if node.op == "call_module" else (scope or "<the model's own forward>")
    return f"node '{node.name}' ({_what(node)}) in layer '{layer}'"


class _Tracer(fx.Tracer):
    """fx.Tracer that stamps every node with the module whose forward created it (errors name
    the layer) and remembers the innermost module being traced when tracing fails."""

    def __init__(self):
        super().__init__()
        self._stack: list[str] = [""]
        self.failed_in: Optional[tuple[str, str]] = None

    def call_module(self, m, forward, args, kwargs):
        name = self.path_of_module(m)
        self._stack.append(name)
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:
                self.failed_in = (name, type(m).__name__)
            raise
        finally:
            self._stack.pop()

    def create_node(self, *args, **kwargs):
        node = super().create_node(*args, **kwargs)
        node.meta["pysparse_scope"] = self._stack[-1]
        return node


def trace(model: nn.Module) -> fx.GraphModule:
    """Trace ``model`` with torch.fx; a failure names the module that did not trace."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    tracer = _Tracer()
    try:
        graph = tracer.trace(model)
    except Exception as e:
        name, cls = tracer.failed_in or ("", type(model).__name__)
        where = f"module '{name}' ({cls})" if name else f"the model's own forward ({cls})"
        raise NotTraceableError(
            f"torch.fx could not trace the model: {where} failed: {type(e).__name__}: {e}. "
            f"Channel pruning and compaction need a traceable model: rewrite that forward without Python "
            f"control flow on tensor values or shapes (use torch.where, or decide it in __init__), and "
            f"without calls fx cannot record (see the torch.fx 'Limitations of Symbolic Tracing' docs)."
        ) from e
    return fx.GraphModule(tracer.root, graph, type(model).__name__)


def _as_tuple(example_inputs) -> tuple:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in example_inputs):
        return tuple(example_inputs)
    raise TypeError("example_inputs must be a tensor or a tuple of tensors (the model's positional inputs), "
                    f"got {type(example_inputs).__name__}")


class _ShapeProp(fx.Interpreter):
    """Run the graph once, recording each node's output shape(s) in node.meta."""

    def run_node(self, n):
        try:
            out = super().run_node(n)
        except Exception as e:
            raise ChannelGraphError(
                f"example_inputs do not fit the model: running it on input shapes {self._shapes} failed at "
                f"{_where(n)}: {type(e).__name__}: {e}") from e
        n.meta["pysparse_shape"] = _shape_of(out)
        return out

    def run(self, *args):
        self._shapes = [tuple(a.shape) for a in args]
        return super().run(*args)


def _shape_of(v):
    if isinstance(v, torch.Tensor):
        return tuple(v.shape)
    if isinstance(v, (tuple, list)) and v and all(isinstance(t, torch.Tensor) for t in v):
        return tuple(tuple(t.shape) for t in v)
    return None


def _run_shapes(gm: fx.GraphModule, model: nn.Module, inputs: tuple) -> None:
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    required = [n for n in placeholders if not n.args and not n.target.startswith("*")]
    varargs = any(n.target.startswith("*") for n in placeholders)
    if not varargs and not len(required) <= len(inputs) <= len(placeholders):
        names = ", ".join(n.target for n in placeholders)
        raise ChannelGraphError(f"example_inputs has {len(inputs)} tensors but the model's forward takes "
                                f"{len(required)} to {len(placeholders)} inputs ({names})")
    # eval + no_grad: a forward in train mode would update the user's BatchNorm statistics
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            _ShapeProp(gm).run(*inputs)
    finally:
        for m, t in modes.items():
            m.training = t


def _lcm(a: int, b: int) -> int:
    return a * b // math.gcd(a, b)


class ChannelGraph:
    """The traced model with every node's channel layout and the coupled channels.

    Built by ``build_graph``; ``groups`` lists the public ChannelGroups, ``info[node]`` each
    node's NodeInfo, ``pieces(seg)`` where a layout segment's channels sit in the groups.

    Coupling is resolved at the end (``finish``): each coupling says "channels oa.. of space A
    are channels ob.. of space B". The spaces are cut into atoms at every coupling boundary,
    the cuts carried across couplings until they agree, and coupled atoms merged (union-find):
    a group is a class of equal-length atoms, its channel c is channel c of each atom. So a
    concatenation added to one layer's output couples that layer's first rows with the first
    concatenated layer and its last rows with the second.
    """

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.modules = dict(gm.named_modules())
        self.spaces: list[_Space] = []
        self.info: dict[fx.Node, NodeInfo] = {}
        self.calls: dict[str, list[fx.Node]] = {}  # module name -> its call nodes
        self._members: list[tuple[str, str, int, int, int, int, int]] = []  # (module, role, start, space, sstart, n, spatial)
        self._mod_out: dict[str, _Layout] = {}
        self._mod_in: dict[str, _Layout] = {}
        self._couplings: list[tuple[int, int, int, int, int]] = []  # (space a, start a, space b, start b, n)
        self._fixes: list[tuple[int, int, int, str]] = []  # (space, start, n, reason)
        self._divides: list[tuple[int, int]] = []  # (space, divisions)
        self.groups: list[ChannelGroup] = []
        self._atoms: dict[int, list[int]] = {}  # space -> sorted cut points (0 ... size)
        self._atom_group: dict[tuple[int, int], int] = {}  # (space, atom start) -> group index or -1

    # ---- spaces and coupling (recorded; resolved in finish)
    def new_space(self, size: int, fixed: str = "", divisions: int = 1, producer: bool = True) -> int:
        self.spaces.append(_Space(size, producer))
        sid = len(self.spaces) - 1
        if fixed:
            self._fixes.append((sid, 0, size, fixed))
        if divisions > 1:
            self._divides.append((sid, divisions))
        return sid

    def fix(self, layout: _Layout, reason: str) -> None:
        for s in layout.segs:
            self._fixes.append((s.space, s.start, s.length, reason))

    def divide(self, space: int, d: int) -> None:
        self._divides.append((space, d))

    def space_size(self, s: int) -> int:
        return self.spaces[s].size

    def couple(self, a: _Layout, b: _Layout, node: fx.Node) -> None:
        """Channel i of a is channel i of b (a residual sum, a product, a shared module)."""
        if a.channels != b.channels or a.features != b.features:
            raise ChannelGraphError(f"{_where(node)} combines tensors with {a.channels} and {b.channels} channels")
        ia, ib = list(a.segs), list(b.segs)
        pa = pb = 0  # channels of the current segment already matched
        while ia and ib:
            sa, sb = ia[0], ib[0]
            n = min(sa.length - pa, sb.length - pb)
            oa, ob = sa.start + pa, sb.start + pb
            if sa.spatial != sb.spatial:
                raise ChannelGraphError(
                    f"{_where(node)} couples channels of {self._space_name(sa.space)} flattened {sa.spatial} features "
                    f"each with channels of {self._space_name(sb.space)} flattened {sb.spatial} each (not supported)")
            if (sa.space, oa) != (sb.space, ob):
                self._couplings.append((sa.space, oa, sb.space, ob, n))
            pa += n
            pb += n
            if pa == sa.length:
                ia.pop(0)
                pa = 0
            if pb == sb.length:
                ib.pop(0)
                pb = 0

    def _space_name(self, s: int) -> str:
        for (mod, role, _, space, *_rest) in self._members:
            if role == "out" and space == s:
                return f"'{mod}'"
        return "the model input"

    # ---- memberships
    def member(self, module: str, role: str, layout: _Layout) -> None:
        off = 0
        for s in layout.segs:
            self._members.append((module, role, off, s.space, s.start, s.length, s.spatial))
            off += s.length * (s.spatial if role == "in" else 1)

    def pieces(self, space: int, start: int, length: int) -> list[tuple[int, int, int, int]]:
        """Where channels start .. start+length-1 of a space sit: [(group index or -1 for the model
        input, first group channel, count, offset in the range)]."""
        out = []
        cuts = self._atoms[space]
        for lo, hi in zip(cuts[:-1], cuts[1:]):
            a, b = max(lo, start), min(hi, start + length)
            if a < b:
                out.append((self._atom_group[(space, lo)], a - lo, b - a, a - start))
        return out

    def module_layouts(self, name: str) -> tuple[Optional[_Layout], Optional[_Layout]]:
        """(input layout, output layout) of a module's (first) call."""
        return self._mod_in.get(name), self._mod_out.get(name)

    def _refine(self) -> None:
        """Cut the spaces into atoms so that every coupling pairs whole atoms of equal length."""
        cuts = [{0, sp.size} for sp in self.spaces]
        for a, oa, b, ob, n in self._couplings:
            cuts[a] |= {oa, oa + n}
            cuts[b] |= {ob, ob + n}
        changed = True
        while changed:  # carry each cut across every coupling it falls inside (finite: cuts <= sizes)
            changed = False
            for a, oa, b, ob, n in self._couplings:
                for (x, ox, y, oy) in ((a, oa, b, ob), (b, ob, a, oa)):
                    new = {oy + c - ox for c in cuts[x] if ox < c < ox + n} - cuts[y]
                    if new:
                        cuts[y] |= new
                        changed = True
        self._atoms = {i: sorted(c) for i, c in enumerate(cuts)}

    def finish(self) -> None:
        self._refine()
        ids: dict[tuple[int, int], int] = {}  # (space, atom start) -> atom id
        for s, c in self._atoms.items():
            for lo in c[:-1]:
                ids[(s, lo)] = len(ids)
        parent = list(range(len(ids)))

        def find(i: int) -> int:
            while parent[i] != i:
                parent[i] = parent[parent[i]]
                i = parent[i]
            return i

        def atoms_in(s: int, start: int, n: int) -> list[int]:
            c = self._atoms[s]
            return [ids[(s, lo)] for lo in c[:-1] if start <= lo < start + n]

        for a, oa, b, ob, n in self._couplings:
            for i, j in zip(atoms_in(a, oa, n), atoms_in(b, ob, n)):
                ri, rj = find(i), find(j)
                parent[max(ri, rj)] = min(ri, rj)
        key = {v: k for k, v in ids.items()}  # atom id -> (space, start)
        length = {i: self._atoms[s][self._atoms[s].index(lo) + 1] - lo for i, (s, lo) in key.items()}
        fixed: dict[int, str] = {}
        divisions: dict[int, int] = {}
        producer: dict[int, bool] = {}
        for i, (s, lo) in key.items():
            r = find(i)
            producer[r] = producer.get(r, False) or self.spaces[s].producer
        for s, start, n, reason in self._fixes:
            for lo in self._atoms[s][:-1]:
                hi = self._atoms[s][self._atoms[s].index(lo) + 1]
                if lo < start + n and hi > start:
                    fixed.setdefault(find(ids[(s, lo)]), reason)
        for s, d in self._divides:
            whole = [find(i) for i in atoms_in(s, 0, self.spaces[s].size)]
            if len(whole) == 1:
                divisions[whole[0]] = _lcm(divisions.get(whole[0], 1), d)
            else:  # equal counts per conv group across several groups: not expressible, leave them
                for r in whole:
                    fixed.setdefault(r, "feeds or comes from a grouped conv and is coupled in parts")
        roots = sorted({find(i) for i in key if producer[find(i)]})
        index = {r: gi for gi, r in enumerate(roots)}
        for i, (s, lo) in key.items():
            self._atom_group[(s, lo)] = index.get(find(i), -1)
        members: dict[int, list] = {r: [] for r in roots}
        for (mod, role, start, s, sstart, n, spatial) in self._members:
            for gi, gstart, cnt, off in self.pieces(s, sstart, n):
                if gi >= 0:
                    mstart = start + off * (spatial if role == "in" else 1)
                    members[roots[gi]].append(ChannelSlice(mod, role, mstart, gstart, cnt, spatial))
        for r in roots:
            slices, prod, cons, bns = [], [], [], []
            for sl in members[r]:
                if sl not in slices:
                    slices.append(sl)
                lst = {"out": prod, "in": cons, "bn": bns}[sl.role]
                if sl.module not in lst:
                    lst.append(sl.module)
            size, div = length[r], divisions.get(r, 1)
            reason = fixed.get(r, "") or ("a single channel" if size < 2 else "")
            if not reason and div == size:
                reason = f"{div} divisions of one channel (a grouped conv with one channel per group)"
            self.groups.append(ChannelGroup(size, prod, cons, bns, slices, not reason, reason, div))


# ---------------------------------------------------------------------------------------------
# building the graph

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


def channel_groups(model: nn.Module, example_inputs: Union[torch.Tensor, Sequence[torch.Tensor]]) -> list[ChannelGroup]:
    """The groups of coupled channels of ``model`` (see this module's docstring).

    model: any nn.Module that torch.fx can trace; it is not changed (it is run once on
      ``example_inputs`` in eval mode without gradients, and its train/eval flags restored).
    example_inputs: a tensor or tuple of tensors the model's forward takes (a batch of one is
      enough); the shapes fix the flatten sizes.
    Returns one ChannelGroup per set of coupled channels, in graph order; the model's input
    channels are not a group.
    Raises NotTraceableError naming the module that did not trace, ChannelGraphError for an
    operation the graph cannot follow (naming the node and the layer) or example_inputs that do
    not fit the model, TypeError for inputs that are not tensors.
    """
    return build_graph(model, example_inputs).groups
