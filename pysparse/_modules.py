"""Walking a model: which layers a conversion or pruning call targets, and replacing them.

Every conversion (quantize_int8, sparsify, compact) and every pruning function goes
through here, so they agree on three things:

- the target predicate: ``isinstance(m, nn.Linear)`` (as torchao's default filter), so a
  subclass such as MultiheadAttention's ``out_proj`` (NonDynamicallyQuantizableLinear) is a
  target for pruning;
- which targets can be *replaced* by another module: not a Linear whose parent reads its
  ``.weight`` itself instead of calling it (nn.MultiheadAttention never calls
  ``out_proj.forward``), so a replacement there would be silently ignored; masks (which any
  read of ``.weight`` sees) still work there;
- skip patterns: a layer is skipped by its exact name, a glob (``"*.head"``) or a prefix
  ending in ``"."`` (``"encoder."``).
"""
from __future__ import annotations

import fnmatch
from typing import Callable, Iterable, Optional, Union

from torch import nn

# Modules that read a child Linear's parameters directly in their forward (never calling
# the child): replacing that child would change nothing the parent computes.
_READS_CHILD_WEIGHTS: tuple[type, ...] = (nn.MultiheadAttention,)

SkipArg = Union[str, Iterable[str], None]


def normalize_skip(skip: SkipArg) -> tuple[str, ...]:
    """``skip`` as a tuple of patterns; a single string is one pattern.

    Raises TypeError when a pattern is not a string.
    """
    if skip is None:
        return ()
    if isinstance(skip, str):
        return (skip,)
    out = tuple(skip)
    bad = [p for p in out if not isinstance(p, str)]
    if bad:
        raise TypeError(f"skip must hold layer names or patterns (str), got {bad!r}")
    return out


def is_skipped(name: str, skip: Iterable[str]) -> bool:
    """True if ``name`` matches one of ``skip``: exact, glob, or a prefix ending in '.'."""
    return any(name == p or fnmatch.fnmatch(name, p) or (p.endswith(".") and name.startswith(p))
               for p in skip)


def check_names_exist(model: nn.Module, names: Iterable[str], arg: str) -> None:
    """Raise ValueError naming ``arg`` when a plain name (no glob, no trailing '.') in
    ``names`` matches no module of ``model``: a typo must not silently do nothing."""
    all_names = {n for n, _ in model.named_modules(remove_duplicate=False)}
    missing = [p for p in names
               if not any(c in p for c in "*?[") and not p.endswith(".") and p not in all_names]
    if missing:
        raise ValueError(f"{arg}: no layer named {missing} in the model (names look like "
                         f"{sorted(n for n in all_names if n)[:5]})")


def is_linear(m: nn.Module) -> bool:
    """The one target predicate for Linear conversions and pruning."""
    return isinstance(m, nn.Linear)


def replaceable_names(model: nn.Module) -> set[str]:
    """Names of modules a conversion may swap for another module (see the module doc)."""
    fixed = set()
    for pname, parent in model.named_modules(remove_duplicate=False):
        if isinstance(parent, _READS_CHILD_WEIGHTS):
            for cname, _ in parent.named_children():
                fixed.add(f"{pname}.{cname}" if pname else cname)
    return {n for n, _ in model.named_modules(remove_duplicate=False)} - fixed


def targets(model: nn.Module, skip: Iterable[str] = (), *, predicate: Callable[[nn.Module], bool] = is_linear,
            replaceable: bool = False) -> dict[str, nn.Module]:
    """Every place (name) a target module sits, in model order, a module used twice under each of
    its names. ``replaceable=True`` keeps only those a conversion may swap out."""
    keep: Optional[set[str]] = replaceable_names(model) if replaceable else None
    return {n: m for n, m in model.named_modules(remove_duplicate=False)
            if predicate(m) and not is_skipped(n, skip) and (keep is None or n in keep)}


def not_replaceable(model: nn.Module, skip: Iterable[str] = (), *,
                    predicate: Callable[[nn.Module], bool] = is_linear) -> list[str]:
    """Targets that a conversion leaves alone because their parent reads their weights."""
    keep = replaceable_names(model)
    return [n for n in targets(model, skip, predicate=predicate) if n not in keep]


def replace(model: nn.Module, new: dict[str, nn.Module]) -> nn.Module:
    """Put ``new[name]`` where ``name`` sits. Returns the model, or the replacement itself
    when the name is "" (the model is the target). Cannot fail for names from ``targets``,
    so conversions build every replacement first and call this last: an error while
    building leaves the model as it was."""
    if "" in new:
        return new[""]
    for name, mod in new.items():
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, mod)
    return model


def convert_once(layers: dict[str, nn.Module], build: Callable[[str, nn.Module], nn.Module]) -> dict[str, nn.Module]:
    """``build`` each distinct module once (a module shared under several names gets one
    replacement, shared the same way); returns {name: replacement}."""
    done: dict[int, nn.Module] = {}
    out = {}
    for name, mod in layers.items():
        if id(mod) not in done:
            done[id(mod)] = build(name, mod)
        out[name] = done[id(mod)]
    return out
