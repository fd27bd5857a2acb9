"""Which channels are exactly zero, and so which channels of each group compaction may remove.

A channel of a group can be removed when its value is exactly zero wherever it leaves the
group: at the input of every consumer (a conv or Linear reading it). Between the producers
and those exits the channel only flows channel-wise (BatchNorm, activations, pooling, sums,
concatenations), so if it is zero at every exit, deleting it everywhere changes no output.
``channel_zeros`` propagates "exactly zero" through the graph with each op's rule (a conv
output channel is zero when its bias is and each weight row is zero or reads a zero input;
a BatchNorm's when its shift is zero and its scale is or its input is; ReLU keeps zeros,
Sigmoid does not; a sum is zero where all terms are, a product where any factor is).
"""
from __future__ import annotations

import torch
from torch import fx, nn

from .._depgraph import ChannelGraph, _Layout

Zeros = dict  # fx.Node -> bool tensor over the node's channels, a tuple of them (split), or None


def _is_depthwise(mod: nn.Module) -> bool:
    return isinstance(mod, nn.Conv2d) and mod.groups > 1 and mod.groups == mod.in_channels == mod.out_channels


def _features(lay: _Layout, z: torch.Tensor) -> torch.Tensor:
    """A per-channel vector expanded to the per-feature one (a flattened map: H*W per channel)."""
    parts, off = [], 0
    for s in lay.segs:
        parts.append(z[off:off + s.length].repeat_interleave(s.spatial))
        off += s.length
    return torch.cat(parts) if parts else z


def _module_zero(mod: nn.Module, iz: torch.Tensor, in_lay: _Layout) -> torch.Tensor:
    # the zero vectors live on the CPU (small); the weights may be anywhere
    if isinstance(mod, nn.modules.batchnorm._BatchNorm):
        n = mod.num_features
        w = mod.weight.detach().float().cpu() if mod.weight is not None else torch.ones(n)
        b = mod.bias.detach().float().cpu() if mod.bias is not None else torch.zeros(n)
        rm = mod.running_mean.float().cpu() if mod.running_mean is not None else torch.zeros(n)
        rv = mod.running_var.float().cpu() if mod.running_var is not None else torch.ones(n)
        shift = b - rm * w / torch.sqrt(rv + mod.eps)  # the output where the input is 0
        return (shift == 0) & ((w == 0) | iz)
    w = mod.weight.detach()  # through .weight: a parametrize mask is applied
    bz = (mod.bias.detach() == 0).cpu() if mod.bias is not None else torch.ones(w.shape[0 if not isinstance(
        mod, nn.ConvTranspose2d) else 1], dtype=torch.bool)
    if isinstance(mod, nn.Linear):
        nz = (w != 0).cpu()
        izf = _features(in_lay, iz)[None, :]
    elif isinstance(mod, nn.ConvTranspose2d):  # groups == 1 (the graph rejects others)
        nz = w.flatten(2).ne(0).any(2).T.cpu()
        izf = iz[None, :]
    else:
        g = mod.groups
        nz = w.flatten(2).ne(0).any(2).cpu()  # [out, in/groups]
        izf = iz.view(g, -1).repeat_interleave(w.shape[0] // g, 0)
    # out channel o is zero when no nonzero weight of it reads a nonzero input, and its bias is 0
    return ~(nz & ~izf).any(1) & bz


def channel_zeros(g: ChannelGraph) -> Zeros:
    """For every node with channels: which channels are exactly zero for every input."""
    z: Zeros = {}

    def zin(n, size: int) -> torch.Tensor:
        v = z.get(n)
        # no vector (a constant), or the input read along another dim (the model input): never zero
        ok = isinstance(v, torch.Tensor) and v.numel() == size
        return v if ok else torch.zeros(size, dtype=torch.bool)

    for node in g.gm.graph.nodes:
        info = g.info.get(node)
        lay = info.layout if info is not None else None
        if lay is None:
            z[node] = None
            continue
        op = info.op
        if op == "split":
            src = zin(info.inputs[0], g.info[info.inputs[0]].layout.channels)
            if info.extra["along"]:
                sizes = [p.channels for p in lay]
                z[node] = tuple(src.split(sizes))
            else:
                z[node] = tuple(src for _ in lay)
            continue
        n = lay.channels
        if op in ("input", "nonzero"):
            z[node] = torch.zeros(n, dtype=torch.bool)
        elif op == "keep":
            z[node] = zin(info.inputs[0], n)
        elif op == "item":
            v = z.get(info.inputs[0])
            z[node] = v[info.extra["index"]] if v is not None else torch.zeros(n, dtype=torch.bool)
        elif op == "and":
            z[node] = torch.stack([zin(a, n) for a in info.inputs]).all(0)
        elif op == "or":
            z[node] = torch.stack([zin(a, n) for a in info.inputs]).any(0)
        elif op == "cat":
            z[node] = torch.cat([zin(a, g.info[a].layout.channels) for a in info.inputs])
        elif op == "module":
            mod = g.modules[info.module]
            in_lay = info.extra.get("in_layout", lay)
            z[node] = _module_zero(mod, zin(info.inputs[0], in_lay.channels), in_lay)
        else:
            raise AssertionError(f"pysparse internal: no zero rule for op {op!r} at node {node.name}")
    return z


def keep_sets(g: ChannelGraph, z: Zeros) -> dict[int, torch.Tensor]:
    """For each group (index into g.groups): the sorted channels compaction keeps.

    Live = nonzero at some exit (a consumer's input), or in a group that is not prunable.
    A group with ``divisions`` keeps the same number in each block (extra zero channels are
    kept, which is still exact), and every block keeps at least one channel.
    """
    live = {i: torch.zeros(grp.channels, dtype=torch.bool) for i, grp in enumerate(g.groups)}
    for node, info in g.info.items():
        if info.op != "module" or "in_layout" not in info.extra or _is_depthwise(g.modules[info.module]):
            continue  # BatchNorms and depthwise convs are inside their group, not exits
        x = info.inputs[0]
        in_lay = info.extra["in_layout"]
        zx = z.get(x)
        if not isinstance(zx, torch.Tensor) or zx.numel() != in_lay.channels:
            zx = torch.zeros(in_lay.channels, dtype=torch.bool)
        off, reads, fixed = 0, [], False
        for s in in_lay.segs:
            for gi, gs, n, o in g.pieces(s.space, s.start, s.length):
                if gi >= 0:
                    live[gi][gs:gs + n] |= ~zx[off + o:off + o + n]
                    reads.append((gi, gs, n))
                else:
                    fixed = True  # it reads the model input too: it keeps inputs whatever happens
            off += s.length
        if reads and not fixed and not any(live[gi][gs:gs + n].any() for gi, gs, n in reads):
            # every input of this layer is zero (e.g. a split piece of pruned channels): keep one
            # zero channel, a conv or Linear with no input at all is not a valid layer
            gi, gs, _ = reads[0]
            live[gi][gs] = True
    keep = {}
    for i, grp in enumerate(g.groups):
        lv = live[i]
        if not grp.prunable:
            lv[:] = True
        blocks = lv.view(grp.divisions, -1)
        removable = (~blocks).sum(1)
        r = min(int(removable.min()), blocks.shape[1] - 1)
        for b in range(grp.divisions):
            extra = int(removable[b]) - r  # zero channels this block keeps to match the others
            if extra:
                blocks[b, (~blocks[b]).nonzero().flatten()[:extra]] = True
        keep[i] = lv.nonzero().flatten()
    return keep


def layout_index(g: ChannelGraph, lay: _Layout, keep: dict[int, torch.Tensor], features: bool) -> torch.Tensor:
    """The kept positions along a tensor's channel dim (its features, for a Linear's input)."""
    idx, off = [], 0
    for s in lay.segs:
        sp = s.spatial if features else 1
        for gi, gs, n, o in g.pieces(s.space, s.start, s.length):
            if gi < 0:
                sel = torch.arange(n)
            else:
                k = keep[gi]
                sel = k[(k >= gs) & (k < gs + n)] - gs
            idx.append(off + ((o + sel)[:, None] * sp + torch.arange(sp)).flatten())
        off += s.length * sp
    return torch.cat(idx) if idx else torch.zeros(0, dtype=torch.long)
