"""One call that chains compression steps and measures each: ``pysparse.compress(model, recipe, ...)``.

A recipe is a list of steps (``Prune``, ``Compact``, ``Recover``, ``Quantize``, ``Sparsify``; or
their dicts, or a JSON/YAML file): for instance ``[{"step": "prune", "kind": "filters", "amount":
"sensitivity:0.5"}, {"step": "compact"}, {"step": "recover", "epochs": 3}, {"step": "quantize",
"activations": "static"}]``. ``compress`` returns the compressed model and a ``CompressReport``
(metric, size, MACs, latency after each step; the speedup over the original measured in the same
run) that prints as a table and saves as JSON. ``pysparse compress`` runs a recipe file from the
command line (``pysparse.compress.cli``).
"""
from __future__ import annotations

from .recipe import Compact, Prune, Quantize, Recover, Sparsify, Step, load_recipe
from .report import CompressReport, StepRecord
from .run import compress

__all__ = ["compress", "load_recipe", "CompressReport", "StepRecord", "Prune", "Compact", "Recover", "Quantize",
           "Sparsify", "Step"]
