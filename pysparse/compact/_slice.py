"""Physical slicing: the new weights of every layer (planned before anything changes) and the
graph rewrites that keep split sizes and reshapes right after channels are gone."""
from __future__ import annotations

import torch
from torch import nn

from .._depgraph import ChannelGraph
from ._keep import _is_depthwise, layout_index


def _grouped_in(w: torch.Tensor, ko: torch.Tensor, ki: torch.Tensor, groups: int, in_c: int) -> torch.Tensor:
    """Rows ``ko`` of a grouped conv weight [out, in/groups, kh, kw], each reading only the kept
    input channels ``ki`` of its own group (the same number in every group)."""
    out_c = w.shape[0]
    ig, og = in_c // groups, out_c // groups
    local = [ki[(ki >= j * ig) & (ki < (j + 1) * ig)] - j * ig for j in range(groups)]
    if len({len(l) for l in local}) != 1:
        raise AssertionError("pysparse internal: unequal channels kept per conv group")
    local = torch.stack(local)  # [groups, kept per group]
    rows = w[ko]
    idx = local[ko // og].to(w.device)  # [out', kept per group]
    return torch.gather(rows, 1, idx[:, :, None, None].expand(-1, -1, *rows.shape[2:]))


def plan(g: ChannelGraph, keep: dict[int, torch.Tensor]) -> dict[str, dict]:
    """For each layer that loses channels: its new tensors and sizes (nothing is changed yet)."""
    out: dict[str, dict] = {}
    for name, calls in g.calls.items():
        mod = g.modules[name]
        info = g.info[calls[0]]
        new: dict = {}
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            k = layout_index(g, info.layout, keep, features=False)
            if len(k) == mod.num_features:
                continue
            for t in ("weight", "bias", "running_mean", "running_var"):
                v = getattr(mod, t)
                if v is not None:
                    new[t] = v.detach()[k]
            new["num_features"] = len(k)
        elif isinstance(mod, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            lin = isinstance(mod, nn.Linear)
            ki = layout_index(g, info.extra["in_layout"], keep, features=lin)
            ko = layout_index(g, info.layout, keep, features=False)
            in_c = mod.in_features if lin else mod.in_channels
            out_c = mod.out_features if lin else mod.out_channels
            if len(ki) == in_c and len(ko) == out_c:
                continue
            w = mod.weight.detach()  # the effective (masked) weight
            if isinstance(mod, nn.ConvTranspose2d):
                new["weight"] = w[ki][:, ko]
            elif lin or mod.groups == 1:
                new["weight"] = w[ko][:, ki]
            elif _is_depthwise(mod):
                if not torch.equal(ki, ko):
                    raise AssertionError(f"pysparse internal: depthwise conv {name!r} keeps different in/out channels")
                new["weight"] = w[ko]
                new["groups"] = len(ko)
            else:
                new["weight"] = _grouped_in(w, ko, ki, mod.groups, in_c)
            if mod.bias is not None:
                new["bias"] = mod.bias.detach()[ko]
            new["in"], new["out"] = len(ki), len(ko)
        else:
            continue
        out[name] = new
    return out


def apply(g: ChannelGraph, planned: dict[str, dict]) -> None:
    """Write the planned tensors into the (parametrization-free) layers."""
    for name, new in planned.items():
        mod = g.modules[name]
        for t in ("weight", "bias"):
            if t in new:
                old = getattr(mod, t)
                setattr(mod, t, nn.Parameter(new[t].clone().contiguous(), requires_grad=old.requires_grad))
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            for t in ("running_mean", "running_var"):
                if t in new:
                    setattr(mod, t, new[t].clone())
            mod.num_features = new["num_features"]
        elif isinstance(mod, nn.Linear):
            mod.in_features, mod.out_features = new["in"], new["out"]
        else:
            mod.in_channels, mod.out_channels = new["in"], new["out"]
            mod.groups = new.get("groups", mod.groups)


def rewrite(g: ChannelGraph, keep: dict[int, torch.Tensor]) -> None:
    """Split sizes and reshapes written for the old channel counts, rewritten for the new."""
    graph = g.gm.graph
    for node in list(graph.nodes):
        info = g.info.get(node)
        if info is None:
            continue
        if info.op == "split" and info.extra.get("along"):
            sizes = [len(layout_index(g, p, keep, features=True)) for p in info.layout]
            with graph.inserting_before(node):
                new = graph.call_function(torch.split, (info.inputs[0], sizes), {"dim": info.extra["dim"]})
            new.meta = dict(node.meta)
            node.replace_all_uses_with(new)
            graph.erase_node(node)
        elif info.extra.get("view") == "flatten":
            with graph.inserting_before(node):
                new = graph.call_function(torch.flatten, (info.inputs[0], info.layout.cdim))
            new.meta = dict(node.meta)
            node.replace_all_uses_with(new)
            graph.erase_node(node)
        elif info.extra.get("view") == "channels":
            # the channel dim's size, if written as a number, is the new one
            n = len(layout_index(g, info.layout, keep, features=True))
            c = info.layout.cdim
            if node.op == "call_method":
                rest = node.args[1:]
                if len(rest) == 1 and isinstance(rest[0], (tuple, list)):
                    shape = list(rest[0])
                    if isinstance(shape[c], int):
                        shape[c] = n
                    node.args = (node.args[0], type(rest[0])(shape))
                else:
                    shape = list(rest)
                    if isinstance(shape[c], int):
                        shape[c] = n
                    node.args = (node.args[0], *shape)
            else:  # torch.reshape(x, shape)
                shape = list(node.args[1])
                if isinstance(shape[c], int):
                    shape[c] = n
                node.args = (node.args[0], tuple(shape))
    graph.lint()
    g.gm.recompile()
