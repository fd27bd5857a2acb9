"""Gradual pruning during fine-tuning: the cubic sparsity schedule of Zhu & Gupta (2017).

    s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (n * dt))^3     for t0 <= t <= t0 + n * dt

("To prune, or not to prune", arXiv:1710.01878): sparsity rises fast while the network has many
redundant weights and slowly near the end, re-masking every dt steps. The user steps the object
in their own training loop (``pysparse.recover`` does when given it as ``prune_schedule``):

    sched = CubicSchedule(model, 0.9, end_step=1000, frequency=50)
    for x, y in loader:
        loss_fn(model(x), y).backward(); opt.step(); opt.zero_grad()
        sched.step()

The masks are pysparse's parametrizations (``pysparse.prune.masks``): the optimizer updates the
stored weight, every read of ``.weight`` sees the mask, so pruned weights cannot regrow between
re-maskings; each re-masking ranks the weights as they compute now, with the pruned ones counted
first, so the mask only ever adds zeros.
"""
from __future__ import annotations

from typing import Iterable, Optional, Sequence, Union

import torch
from torch import nn

from .. import _depgraph, _modules
from .block import blocks, check_block
from .criteria import CHANNEL_CRITERIA, CRITERIA, check_criterion
from .filters import check_per_layer_groups, filters
from .selection import check_amount, check_per_layer
from .unstructured import is_target, prunable_layers, unstructured

KINDS = ("unstructured", "blocks", "filters")


def _int(v, arg: str, lo: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ValueError(f"{arg} must be an int >= {lo}, got {v!r}")
    return v


class CubicSchedule:
    """Prune ``model`` gradually from ``initial_sparsity`` at ``begin_step`` to ``final_sparsity``
    at ``end_step`` along Zhu & Gupta's cubic, re-masking every ``frequency`` steps.

    kind: "unstructured" (``prune.unstructured``: Linear / Conv2d weight elements), "blocks"
      (``prune.blocks``: ``block`` blocks of Linear weights) or "filters" (``prune.filters``:
      output channels, needs ``example_inputs``). criterion: magnitude / l1 / l2 (filters also
      bn_scale); the gradient criteria need calibration data a schedule does not take.
    per_layer: {layer name: final sparsity} for those layers, each along its own cubic (from
      min(initial_sparsity, its final)); skip: names or patterns to leave alone.

    ``sparsity_at(step)`` is the target at a step (0 before begin_step); ``step()`` advances one
    optimizer step, re-masks when one is due (begin_step, every ``frequency`` steps after it, and
    end_step) and returns the sparsity in force; ``done`` is True from end_step on. Constructing
    checks every argument (names, example_inputs) and masks nothing.
    """

    def __init__(self, model: nn.Module, final_sparsity: float, *, end_step: int, begin_step: int = 0,
                 initial_sparsity: float = 0.0, frequency: int = 1, kind: str = "unstructured",
                 criterion: str = "magnitude", block: Optional[tuple[int, int]] = None,
                 skip: Union[str, Iterable[str]] = (), per_layer: Optional[dict[str, float]] = None,
                 example_inputs: Union[torch.Tensor, Sequence[torch.Tensor], None] = None) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.final_sparsity = check_amount(final_sparsity, "final_sparsity")
        self.initial_sparsity = check_amount(initial_sparsity, "initial_sparsity")
        if self.initial_sparsity > self.final_sparsity:
            raise ValueError(f"initial_sparsity ({initial_sparsity}) must not exceed final_sparsity "
                             f"({final_sparsity})")
        self.begin_step = _int(begin_step, "begin_step", 0)
        self.end_step = _int(end_step, "end_step", self.begin_step + 1)
        self.frequency = _int(frequency, "frequency", 1)
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        choices = ("magnitude",) + tuple(c for c in (CHANNEL_CRITERIA if kind == "filters" else CRITERIA)
                                         if c not in ("taylor", "obd"))
        if criterion in ("taylor", "obd"):
            raise ValueError(f"criterion={criterion!r} needs calibration data, which CubicSchedule does not take; "
                             f"criterion must be one of {choices}")
        check_criterion(criterion, choices)
        self.kind, self.criterion = kind, criterion
        self.block = check_block(block) if kind == "blocks" else block
        self.skip = _modules.normalize_skip(skip)
        if kind == "filters":
            if example_inputs is None:
                raise ValueError("kind='filters' needs example_inputs (what the model's forward takes)")
            _modules.check_names_exist(model, self.skip, "skip")
            per_layer = _check_filter_per_layer(model, per_layer, example_inputs)
        else:
            layers = prunable_layers(model, self.skip, _modules.is_linear if kind == "blocks" else is_target)
            if not layers:
                raise ValueError(f"model has no layer for kind={kind!r} to prune (or all are skipped)")
            if per_layer:
                _modules.check_names_exist(model, [n for n in per_layer if isinstance(n, str)], "per_layer")
            per_layer = check_per_layer(per_layer, layers, "layers")
        self.per_layer = per_layer
        self.example_inputs = example_inputs
        self.model = model
        self.step_count = 0
        self.sparsity = 0.0  # the target of the masks in force
        self._last: Optional[int] = None  # the step of the last re-masking

    @staticmethod
    def _cubic(t: float, t0: int, t1: int, s_i: float, s_f: float) -> float:
        if t < t0:
            return 0.0
        if t >= t1:
            return s_f
        return s_f + (s_i - s_f) * (1.0 - (t - t0) / (t1 - t0)) ** 3

    def sparsity_at(self, step: int) -> float:
        """The target sparsity at optimizer step ``step``: 0 before begin_step, initial_sparsity at
        it, the cubic between, final_sparsity from end_step on."""
        return self._cubic(step, self.begin_step, self.end_step, self.initial_sparsity, self.final_sparsity)

    def layer_sparsity_at(self, step: int) -> dict[str, float]:
        """The per_layer layers' targets at ``step`` (each along its own cubic)."""
        return {n: self._cubic(step, self.begin_step, self.end_step, min(self.initial_sparsity, f), f)
                for n, f in self.per_layer.items()}

    @property
    def done(self) -> bool:
        """True once end_step is reached (the final masks are in force)."""
        return self.step_count >= self.end_step

    def _due(self, t: int) -> bool:
        if t < self.begin_step or (self._last is not None and self._last >= self.end_step):
            return False
        return t >= self.end_step or (t - self.begin_step) % self.frequency == 0

    def step(self) -> float:
        """Advance one optimizer step; re-mask if due. Returns the sparsity now in force."""
        self.step_count += 1
        t = self.step_count
        if self._due(t):
            self._mask(min(t, self.end_step))
            self._last = t
        return self.sparsity

    def _mask(self, t: int) -> None:
        s, per = self.sparsity_at(t), self.layer_sparsity_at(t)
        if s == 0.0 and not any(per.values()):
            return
        if self.kind == "unstructured":
            unstructured(self.model, s, criterion=self.criterion, skip=self.skip, per_layer=per, progress=False)
        elif self.kind == "blocks":
            blocks(self.model, s, self.block, criterion=self.criterion, skip=self.skip, per_layer=per,
                   progress=False)
        else:
            filters(self.model, s, criterion="l1" if self.criterion == "magnitude" else self.criterion,
                    example_inputs=self.example_inputs, per_layer=per, skip=self.skip)
        self.sparsity = s

    def __repr__(self) -> str:
        return (f"CubicSchedule({self.kind}, {self.initial_sparsity:g} -> {self.final_sparsity:g}, steps "
                f"{self.begin_step}..{self.end_step} every {self.frequency}, at step {self.step_count}: "
                f"{self.sparsity:g})")


def _check_filter_per_layer(model: nn.Module, per_layer, example_inputs) -> dict[str, float]:
    if per_layer is None:
        per_layer = {}
    if not isinstance(per_layer, dict):
        raise TypeError(f"per_layer must be a dict {{layer name: fraction}}, got {type(per_layer).__name__}")
    out = {n: check_amount(f, f"per_layer[{n!r}]") for n, f in per_layer.items()}
    _modules.check_names_exist(model, [n for n in out if isinstance(n, str)], "per_layer")
    groups = _depgraph.channel_groups(model, example_inputs)
    check_per_layer_groups(groups, dict(model.named_modules()), out)
    return out
