"""pysparse.plan: per-layer formats measured on this machine, chosen under an accuracy budget.

``plan(model, example_inputs, eval_fn=..., budget=0.01)`` times every Linear / Conv2d layer in
each format pysparse has for it (dense, int8, block-sparse at several densities, 2:4 on CUDA)
on the layer's real input, predicts each format's metric loss from single-layer trials, and
picks per layer the fastest set of formats whose summed loss fits the budget. The Plan prints
as a table, saves as JSON, ``apply(model)`` builds the planned copy and ``measure()`` times it
against the dense model, measured beside predicted.
"""
from __future__ import annotations

from ._formats import FAMILIES
from ._planner import plan
from ._result import LayerPlan, Plan

__all__ = ["plan", "Plan", "LayerPlan", "FAMILIES"]
