"""Predicted accuracy cost per layer and format: put that format in that layer alone, evaluate,
put the layer back (as pysparse.prune.sensitivity does for sparsity levels; int8 has no level,
so plan runs its own trials). A precomputed block-granularity SensitivityTable answers the
"bsr:<density>" trials it holds."""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import nn

from .. import _modules
from .._metric import evaluate_metric
from ._formats import parse


def metric(eval_fn: Callable[[nn.Module], Any], model: nn.Module, what: str) -> float:
    """eval_fn(model) as a finite float; errors name ``what`` was being evaluated."""
    return evaluate_metric(eval_fn, model, what)


def from_table(table: Any, layer: str, fmt: str) -> Optional[float]:
    """The loss a SensitivityTable predicts for ``fmt`` in ``layer``, or None when it has no
    answer (not block granularity, layer or level absent, not a bsr format)."""
    fam, density = parse(fmt)
    if table is None or fam != "bsr" or getattr(table, "granularity", None) != "block":
        return None
    if layer not in getattr(table, "layers", ()):
        return None
    level = 1.0 - density
    hit = [lv for lv in table.levels if abs(lv - level) < 1e-6]
    if not hit:
        return None
    m = float(table.metric(layer, hit[0]))
    base = float(table.baseline)
    return (base - m) if getattr(table, "higher_is_better", True) else (m - base)


def check_table(table: Any) -> None:
    need = ("baseline", "levels", "layers", "metric", "granularity")
    missing = [a for a in need if not hasattr(table, a)]
    if missing:
        raise TypeError(f"sensitivity must be a pysparse.prune.SensitivityTable (or None); "
                        f"{type(table).__name__} has no {missing}")


@torch.no_grad()
def trial_losses(model: nn.Module, names: dict[str, list[str]], built: dict[str, dict[str, nn.Module]],
                 eval_fn: Callable[[nn.Module], Any], baseline: float, table: Any = None,
                 ticker: Callable[[], None] = lambda: None) -> dict[str, dict[str, Optional[float]]]:
    """{layer: {format: baseline - metric with that format in that layer alone}}; "dense" is 0.
    names[layer]: every name that layer's module sits under (all are swapped together).
    The model's modules are put back after every trial, also when eval_fn raises: the model
    ends exactly as given."""
    out: dict[str, dict[str, Optional[float]]] = {}
    for layer, fmts in built.items():
        orig = model.get_submodule(layer) if layer else model
        row: dict[str, Optional[float]] = {}
        for fmt, mod in fmts.items():
            if fmt == "dense":
                row[fmt] = 0.0
                continue
            t = from_table(table, layer, fmt)
            if t is not None:
                row[fmt] = t
                ticker()
                continue
            if layer == "":  # the model is the layer: evaluate the replacement itself
                row[fmt] = baseline - metric(eval_fn, mod, f"the model in format {fmt!r}")
            else:
                _modules.replace(model, {n: mod for n in names[layer]})
                try:
                    row[fmt] = baseline - metric(eval_fn, model, f"layer {layer!r} in format {fmt!r}")
                finally:
                    _modules.replace(model, {n: orig for n in names[layer]})
            ticker()
        out[layer] = row
    return out
