"""One forward of the example inputs with hooks: each planned layer's real input and how many
times the forward calls it."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .. import _modules
from ._formats import kind_of


def call(model: nn.Module, inputs: Any) -> Any:
    """model(inputs): a tensor, a tuple/list of positional tensors, or a dict of keyword ones."""
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


@dataclass
class Site:
    """A layer module and every name it sits under (a module shared by two names is one site)."""

    name: str
    module: nn.Module
    kind: str
    aliases: list[str] = field(default_factory=list)
    calls: int = 0
    input: torch.Tensor = None  # the first call's input

    @property
    def names(self) -> list[str]:
        return [self.name] + self.aliases


def _is_target(m: nn.Module) -> bool:
    return kind_of(m) is not None


@torch.no_grad()
def capture(model: nn.Module, example_inputs: Any) -> tuple[list[Site], list[str]]:
    """The replaceable Linear / Conv2d layers the example forward reaches, in model order, each
    with its first input; and notes on the layers left out (never called, not replaceable)."""
    notes = []
    fixed = _modules.not_replaceable(model, predicate=_is_target)
    if fixed:
        notes.append(f"left dense (their parent reads their weights directly): {fixed}")
    sites: dict[int, Site] = {}
    for n, m in _modules.targets(model, predicate=_is_target, replaceable=True).items():
        if id(m) in sites:
            sites[id(m)].aliases.append(n)
        else:
            sites[id(m)] = Site(n, m, kind_of(m))

    def hook(site: Site):
        def f(mod, args, kwargs):
            site.calls += 1
            if site.input is None:
                x = args[0] if args else next(iter(kwargs.values()), None)
                if isinstance(x, torch.Tensor):
                    site.input = x.detach().clone()
        return f

    handles = [s.module.register_forward_pre_hook(hook(s), with_kwargs=True) for s in sites.values()]
    try:
        call(model, example_inputs)
    finally:
        for h in handles:
            h.remove()
    out = [s for s in sites.values() if s.calls > 0 and s.input is not None]
    missed = [s.name for s in sites.values() if s.calls == 0]
    if missed:
        notes.append(f"left dense (example_inputs never reach them): {missed}")
    return out, notes
