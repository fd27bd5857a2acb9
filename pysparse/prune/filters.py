"""Filter (output channel) pruning of Conv2d, ConvTranspose2d and Linear layers, as coupled groups.

``filters(model, amount, example_inputs=...)`` finds the groups of coupled channels
(``pysparse._depgraph.channel_groups``: a residual stage, a depthwise conv with the layer before
it, the channels a concat carries), scores each group's channels by the importance summed over
its producers, and masks the lowest ``amount`` of each group: the producers' weight rows and
biases AND the weights and biases of every BatchNorm on those channels, so a pruned channel is
exactly zero and ``pysparse.compact`` removes it exactly. Masks are parametrizations
(``pysparse.prune.masks``): they survive optimizer steps, and pruning again only tightens them.
"""
from __future__ import annotations

import math
from typing import Callable, Iterable, Optional, Sequence, Union

import torch
from torch import nn

from .. import _depgraph, _modules
from ._calib import check_data, gradient_stats
from .criteria import CHANNEL_CRITERIA, bn_scale, element_scores, unit_scores
from .masks import apply_mask
from .selection import check_amount

_PRODUCERS = (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)


def _check(model, amount, criterion, data, per_layer, round_to, skip):
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    amount = check_amount(amount, "amount")
    if criterion not in CHANNEL_CRITERIA:
        raise ValueError(f"criterion must be one of {CHANNEL_CRITERIA}, got {criterion!r}")
    check_data(criterion, data)
    if round_to is not None and (isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1):
        raise ValueError(f"round_to must be a positive int or None, got {round_to!r}")
    skip = _modules.normalize_skip(skip)
    _modules.check_names_exist(model, skip, "skip")
    if per_layer is None:
        per_layer = {}
    if not isinstance(per_layer, dict):
        raise TypeError(f"per_layer must be a dict {{layer name: fraction}}, got {type(per_layer).__name__}")
    per_layer = {n: check_amount(f, f"per_layer[{n!r}]") for n, f in per_layer.items()}
    _modules.check_names_exist(model, [n for n in per_layer if isinstance(n, str)], "per_layer")
    bad = [n for n in per_layer if not isinstance(n, str) or any(c in n for c in "*?[") or n.endswith(".")]
    if bad:
        raise ValueError(f"per_layer: keys must be exact layer names, got {bad}")
    return amount, skip, per_layer


def _kept_count(n: int, divisions: int, fraction: float, round_to: Optional[int]) -> int:
    """Channels a group of ``n`` keeps: n - round(fraction * n), rounded *up* to a multiple of
    lcm(divisions, round_to) (equal blocks for grouped convs; never prune more than asked),
    at least one unit, at most n."""
    unit = math.lcm(divisions, round_to or 1)
    keep = n - int(round(fraction * n))
    keep = max(unit, math.ceil(keep / unit) * unit)
    return min(n, keep)


@torch.no_grad()
def filters(model: nn.Module, amount: float, *, criterion: str = "l1",
            example_inputs: Union[torch.Tensor, Sequence[torch.Tensor]], data: Optional[Iterable] = None,
            loss_fn: Optional[Callable] = None, per_layer: Optional[dict[str, float]] = None,
            round_to: Optional[int] = None, skip: Union[str, Iterable[str]] = ()) -> dict[str, torch.Tensor]:
    """Mask the least important ``amount`` of the output channels of every group of coupled
    channels of ``model``'s Conv2d / ConvTranspose2d / Linear layers.

    amount: fraction of each prunable group's channels to mask, in [0, 1).
    criterion: how a channel is scored, summed over the group's producers:
      "l1" / "l2": the L1 norm / squared L2 norm of the producer's weight row;
      "bn_scale": |gamma| of the BatchNorms on the channel (network slimming; groups without a
        BatchNorm are left alone);
      "taylor": |sum w * dL/dw| per row (first order), dL/dw summed over ``data``;
      "obd": sum of 0.5 * h_ii * w^2 per row (Optimal Brain Damage), h_ii the empirical Fisher
        (mean of squared per-batch gradients) over ``data``.
    example_inputs: a tensor or tuple of tensors the model's forward takes (traced with torch.fx).
    data: for "taylor"/"obd": an iterable of (inputs, target) batches (a few are enough), with a
      progress bar; loss_fn(output, target) -> scalar, cross-entropy by default.
    per_layer: {producer layer name: fraction} overriding ``amount`` for that layer's group (a
      group whose producers have several entries takes the largest).
    round_to: keep each group's surviving channel count at a multiple of this (kernels like
      8 or 16); rounding keeps channels rather than pruning more than asked.
    skip: layer names, globs or prefixes ending in "." whose groups (where they are a producer)
      are left alone.

    Coupled channels are pruned as one set: a residual stage's members, a depthwise conv and the
    layer before it, a group feeding a grouped conv (the same count in each conv group; see
    ``ChannelGroup.divisions``). The model's output channels are never pruned; every group keeps
    at least one channel (per conv group). The masks zero each pruned channel's producer rows and
    biases and its BatchNorm weights and biases, so the channel's output is exactly 0 and
    ``pysparse.compact`` removes it. Returns {producer name: bool mask of its output channels,
    True = kept}, for the groups pruned.

    Everything is checked (arguments, names in skip / per_layer, example_inputs, the data loop)
    before the first mask is applied: on any error the model is as it was.
    """
    amount, skip, per_layer = _check(model, amount, criterion, data, per_layer, round_to, skip)
    groups = _depgraph.channel_groups(model, example_inputs)
    mods = dict(model.named_modules())
    check_per_layer_groups(groups, mods, per_layer)
    stats = None
    if criterion in ("taylor", "obd"):
        stats = gradient_stats(model, scored_layers(groups, mods, criterion, skip), data, loss_fn, criterion,
                               desc="pysparse filters")
    keep_masks, result = _choose(groups, mods, amount, criterion, per_layer, round_to, skip, stats)
    # apply: producer rows + biases, BatchNorm weights + biases
    for (name, pname), k in channel_masks(mods, keep_masks).items():
        apply_mask(mods[name], k, pname)
    return result


def _todo(groups, mods, criterion, skip) -> list:
    todo = [g for g in groups if g.prunable and not any(_modules.is_skipped(p, skip) for p in g.producers)]
    if criterion == "bn_scale":
        todo = [g for g in todo if g.bns]
    return todo


def scored_layers(groups, mods, criterion, skip) -> dict[str, nn.Module]:
    """The producers whose weights score the channels of the groups ``filters`` prunes."""
    return {sl.module: mods[sl.module] for g in _todo(groups, mods, criterion, skip)
            for sl in g.slices if sl.role == "out"}


def check_per_layer_groups(groups, mods, per_layer) -> None:
    """ValueError naming ``per_layer`` for a name that is no prunable producer of the channel graph."""
    owner = {p: g for g in groups for p in g.producers}
    for n in per_layer:
        if n not in owner or not isinstance(mods[n], _PRODUCERS):
            raise ValueError(f"per_layer: {n!r} is not a Conv2d, ConvTranspose2d or Linear layer of the model's "
                             f"channel graph")
        if not owner[n].prunable:
            raise ValueError(f"per_layer: the channels of {n!r} cannot be pruned ({owner[n].reason})")


def _choose(groups, mods, amount, criterion, per_layer, round_to, skip, stats, only=None):
    """Which channels to keep (nothing changes): ({(module, role): bool over its channels},
    {producer: bool over its output channels}). ``stats``: (grad, fisher) from gradient_stats for
    the gradient criteria. ``only``: score and prune only the groups holding these producers."""
    todo = _todo(groups, mods, criterion, skip)
    if only is not None:
        todo = [g for g in todo if any(p in only for p in g.producers)]
    layers = {sl.module: mods[sl.module] for g in todo for sl in g.slices if sl.role == "out"}
    grad, fisher = stats if stats is not None else (None, None)

    # score and choose (nothing changes yet)
    row_scores: dict[str, torch.Tensor] = {}
    for name, m in layers.items():
        if criterion != "bn_scale":
            e = element_scores(criterion, m.weight, grad[name] if grad else None, fisher[name] if fisher else None)
            row_scores[name] = unit_scores(criterion, e, dim=1 if isinstance(m, nn.ConvTranspose2d) else 0)
    keep_masks: dict[tuple[str, str], torch.Tensor] = {}  # (module, role) -> bool over its channels
    result = {}
    for g in todo:
        score = torch.zeros(g.channels)
        for sl in g.slices:
            if (sl.role == "out" and criterion != "bn_scale") or (sl.role == "bn" and criterion == "bn_scale"):
                s = row_scores[sl.module] if sl.role == "out" else bn_scale(mods[sl.module])
                score[sl.group_start:sl.group_start + sl.length] += s[sl.start:sl.start + sl.length].cpu()
        fracs = [per_layer[p] for p in g.producers if p in per_layer]
        frac = max(fracs) if fracs else amount
        d = g.divisions
        keep_per_block = _kept_count(g.channels, d, frac, round_to) // d
        block = g.channels // d
        keep = torch.zeros(g.channels, dtype=torch.bool)
        for b in range(d):
            order = score[b * block:(b + 1) * block].argsort(descending=True, stable=True)
            keep[b * block + order[:keep_per_block]] = True
        if keep.all():
            continue
        for sl in g.slices:
            if sl.role == "in":
                continue
            m = mods[sl.module]
            n = (m.num_features if sl.role == "bn" else
                 m.out_channels if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)) else m.out_features)
            cur = keep_masks.setdefault((sl.module, sl.role), torch.ones(n, dtype=torch.bool))
            cur[sl.start:sl.start + sl.length] &= keep[sl.group_start:sl.group_start + sl.length]
    for (name, role), k in keep_masks.items():
        if role == "out" and not k.all():
            result[name] = k
    return keep_masks, result


def channel_masks(mods: dict[str, nn.Module], keep_masks: dict) -> dict[tuple[str, str], torch.Tensor]:
    """{(module, parameter): mask broadcastable to the parameter} for the channel keep masks:
    producer rows and biases, BatchNorm weights and biases."""
    out = {}
    for (name, role), k in keep_masks.items():
        m = mods[name]
        if k.all():
            continue
        for pname in ("weight", "bias"):
            p = getattr(m, pname, None)
            if p is None:
                continue
            shape = [1] * p.dim()
            dim = 1 if (isinstance(m, nn.ConvTranspose2d) and pname == "weight") else 0
            shape[dim] = -1
            out[(name, pname)] = k.to(p.device).view(shape)
    return out
