"""Sensitivity analysis: prune each layer alone at each level, record the metric, put it back.

``sensitivity(model, eval_fn)`` measures how much a metric moves when one layer is pruned (the
others dense), for every layer and level: the table ``SensitivityTable.allocate`` turns into
per-layer amounts for a global target (prune the layers that do not care, spare those that do).
Trials multiply the stored weights by the trial's mask in place and copy every parameter and
buffer back afterwards, so the model ends bitwise as given, also when eval_fn raises.
"""
from __future__ import annotations

from typing import Callable, Iterable, Optional, Sequence, Union

import torch
from torch import nn
from torch.nn.utils import parametrize

from .. import _depgraph, _modules
from .._metric import evaluate_metric as _evaluate
from ._calib import check_data, gradient_stats, leaf_weight
from ._table import SensitivityTable
from .block import block_masks, check_block
from .criteria import CHANNEL_CRITERIA, PRUNE_CRITERIA, check_criterion
from .filters import _PRODUCERS, _choose, channel_masks, scored_layers
from .selection import check_amount
from .unstructured import element_masks, is_target, prunable_layers

DEFAULT_LEVELS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
GRANULARITIES = ("unstructured", "block", "filter")


def _check_levels(levels) -> tuple[float, ...]:
    try:
        vals = [check_amount(v, "levels") for v in levels]
    except TypeError:
        raise TypeError(f"levels must be a sequence of numbers in (0, 1), got {levels!r}") from None
    if not vals or any(v <= 0 for v in vals):
        raise ValueError(f"levels must be a non-empty sequence of numbers in (0, 1), got {levels!r}")
    return tuple(sorted(set(vals)))


class _Snapshot:
    """Every parameter and buffer of a model (values, requires_grad, .grad) and its train/eval
    flags, copied back bitwise by ``restore``."""

    def __init__(self, model: nn.Module) -> None:
        tensors = dict(model.named_parameters(remove_duplicate=True))
        tensors.update(dict(model.named_buffers(remove_duplicate=True)))
        self.saved = [(t, t.detach().clone(), t.requires_grad, None if t.grad is None else t.grad.clone())
                      for t in tensors.values() if t is not None]
        self.modes = [(m, m.training) for m in model.modules()]

    @torch.no_grad()
    def restore(self) -> None:
        for t, v, rg, g in self.saved:
            t.copy_(v)
            if isinstance(t, nn.Parameter):
                t.requires_grad_(rg)
                t.grad = None if g is None else g.clone()
        for m, mode in self.modes:
            m.training = mode


def _stored(m: nn.Module, name: str) -> torch.Tensor:
    """The tensor holding ``m.<name>`` (the original under a mask)."""
    if parametrize.is_parametrized(m, name):
        return getattr(m.parametrizations, name).original
    return getattr(m, name)


def sensitivity(model: nn.Module, eval_fn: Callable[[nn.Module], float], *, levels: Sequence[float] = DEFAULT_LEVELS,
                granularity: str = "unstructured", criterion: str = "magnitude", data: Optional[Iterable] = None,
                loss_fn: Optional[Callable] = None, layers: Optional[Iterable[str]] = None,
                max_layers: Optional[int] = None, block: Optional[tuple[int, int]] = None,
                example_inputs: Union[torch.Tensor, Sequence[torch.Tensor], None] = None,
                higher_is_better: bool = True, progress: bool = True) -> SensitivityTable:
    """Prune each layer of ``model`` alone at each of ``levels`` and record ``eval_fn(model)``.

    eval_fn(model) -> float: the metric (accuracy: higher_is_better=True; a loss: False).
    granularity: "unstructured" (weight elements of Linear / Conv2d layers, as
      ``prune.unstructured``), "block" (``block`` blocks of Linear weights, as ``prune.blocks``)
      or "filter" (output channels, as ``prune.filters`` with per_layer for that one layer: the
      layer's whole group of coupled channels; needs ``example_inputs``). A filter group is
      measured once, under its first producer's name, unless ``layers`` names others.
    criterion: as the pruning call of that granularity takes it; taylor / obd score the model as
      given once, over ``data`` (with loss_fn), before the trials.
    layers: names of the layers to measure (default: every one); max_layers: at most this many
      (the first in model order). progress: a progress bar over the trials.

    Between trials every parameter and buffer is copied back; at the end the model is bitwise as
    given (values, masks, requires_grad, .grad, train/eval flags), also when eval_fn raises.
    Errors name the argument: eval_fn raising (RuntimeError) or returning a non-number / NaN,
    an unknown layer name, bad levels, a missing example_inputs or data.
    """
    from tqdm.auto import tqdm

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not callable(eval_fn):
        raise TypeError(f"eval_fn must be a callable eval_fn(model) -> float, got {type(eval_fn).__name__}")
    levels = _check_levels(levels)
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    choices = ("magnitude",) + CHANNEL_CRITERIA if granularity == "filter" else PRUNE_CRITERIA
    crit = check_criterion(criterion, choices)
    if granularity == "block":
        crit = criterion  # block_masks reads "magnitude" as the block RMS (blocks' default)
    check_data(crit, data)
    if max_layers is not None and (isinstance(max_layers, bool) or not isinstance(max_layers, int)
                                   or max_layers < 1):
        raise ValueError(f"max_layers must be a positive int or None, got {max_layers!r}")
    blk = check_block(block) if granularity == "block" else None
    if granularity == "filter" and example_inputs is None:
        raise ValueError("granularity='filter' needs example_inputs (what the model's forward takes) to trace "
                         "the coupled channels")

    mods = dict(model.named_modules())
    groups = None
    if granularity == "filter":
        groups = _depgraph.channel_groups(model, example_inputs)
        owner = {p: g for g in groups if g.prunable and (crit != "bn_scale" or g.bns)
                 for p in g.producers if isinstance(mods[p], _PRODUCERS)}
        candidates = list(dict.fromkeys(g.producers[0] for g in owner.values()))
        allowed = set(owner)
    else:
        cand = prunable_layers(model, (), _modules.is_linear if granularity == "block" else is_target)
        candidates, allowed = list(cand), set(cand)
    if layers is not None:
        layers = [layers] if isinstance(layers, str) else list(layers)
        _modules.check_names_exist(model, layers, "layers")
        bad = [n for n in layers if n not in allowed]
        if bad:
            what = {"unstructured": "Linear / Conv2d layers", "block": "Linear layers",
                    "filter": "producers of prunable channel groups"}[granularity]
            raise ValueError(f"layers: {bad} are not {what} (choices look like {sorted(allowed)[:5]})")
        names = list(dict.fromkeys(layers))
    else:
        names = candidates
    if max_layers is not None:
        names = names[:max_layers]
    if not names:
        raise ValueError(f"model has no layer to measure at granularity={granularity!r}")

    if granularity == "filter":
        params = {n: sum(mods[p].weight.numel() for p in owner[n].producers) for n in names}
    else:
        params = {n: mods[n].weight.numel() for n in names}

    snap = _Snapshot(model)
    results: dict[str, list[float]] = {n: [] for n in names}
    try:
        stats = None
        if crit in ("taylor", "obd"):
            scored = (scored_layers(groups, mods, crit, ()) if granularity == "filter"
                      else {n: mods[n] for n in names})
            stats = gradient_stats(model, scored, data, loss_fn, crit, desc="pysparse sensitivity",
                                   progress=progress)
        baseline = _evaluate(eval_fn, model, "the model as given")
        snap.restore()
        bar = tqdm(total=len(names) * len(levels), desc=f"pysparse sensitivity ({granularity})", leave=False,
                   disable=not progress)
        try:
            for n in names:
                for lv in levels:
                    _prune_alone(model, mods, n, lv, granularity, crit, stats, blk, groups)
                    results[n].append(_evaluate(eval_fn, model, f"layer {n!r} at sparsity {lv:g}"))
                    snap.restore()
                    bar.update(1)
        finally:
            bar.close()
    finally:
        snap.restore()
    return SensitivityTable(baseline=baseline, levels=levels, layers=names, params=params, granularity=granularity,
                            higher_is_better=bool(higher_is_better), results=results, criterion=criterion)


@torch.no_grad()
def _prune_alone(model, mods, name, level, granularity, crit, stats, blk, groups) -> None:
    """Zero, in the stored tensors, what pruning ``name`` alone to ``level`` removes."""
    if granularity == "filter":
        keep, _ = _choose(groups, mods, 0.0, crit, {name: level}, None, (), stats, only={name})
        for (mname, pname), k in channel_masks(mods, keep).items():
            t = _stored(mods[mname], pname)
            t.mul_(k.to(t.dtype))
        return
    one = {name: mods[name]}
    sub = None if stats is None else ({name: stats[0][name]}, {name: stats[1][name]})
    if granularity == "block":
        mask = block_masks(one, level, blk, criterion=crit, stats=sub)[name]
    else:
        mask = element_masks(one, level, crit, stats=sub)[name]
    t = leaf_weight(mods[name])
    t.mul_(mask.to(t.dtype))
