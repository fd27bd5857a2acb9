"""Importance criteria, one implementation each, shared by every pruning granularity.

A criterion scores each weight element with an *additive* importance; a pruning function
then sums the scores over the unit it removes (a block, an output channel, a channel group)
and removes the lowest. Keeping the element score additive is what lets one implementation
serve blocks, filters and coupled channel groups alike.

- ``l1``: |w|                       (magnitude; the sum over a unit is its L1 norm)
- ``l2``: w^2                       (the sum is the squared L2 norm: the same ranking as L2)
- ``taylor``: w * dL/dw             (first-order Taylor estimate of the loss change when the
                                     unit is removed; the unit's score is |sum|, Molchanov et al.;
                                     dL/dw averaged over calibration batches; a single element's
                                     score is |w * dL/dw|)
- ``obd``: 0.5 * h_ii * w^2         (Optimal Brain Damage saliency, h_ii the diagonal of the
                                     empirical Fisher: the mean of squared per-batch gradients)

The gradients come from ``pysparse.prune._calib.gradient_stats`` (one pass over calibration
batches, shared by unstructured, block and filter pruning). ``"magnitude"`` is ``l1`` for elements
and filters, and the block RMS for blocks (``block_magnitude``'s ranking).

``unit_scores`` turns element scores into one score per unit (``importance``: one per element);
``block_scores`` is the block case (RMS: the per-block mean of w^2 under a square root, so edge
blocks compete fairly).
"""
from __future__ import annotations

from typing import Optional

import torch

from ..formats import _blocks

CRITERIA = ("l1", "l2", "taylor", "obd")
# What unstructured and block pruning accept ("magnitude" names the default of each).
PRUNE_CRITERIA = ("magnitude",) + CRITERIA
# Criteria whose unit score is |sum of signed element scores| rather than the plain sum.
_SIGNED = {"taylor"}


def element_scores(criterion: str, w: torch.Tensor, grad: Optional[torch.Tensor] = None,
                   fisher: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per-element importance of ``w`` (float32, same shape) under ``criterion``.

    grad: dL/dw averaged over calibration batches (``taylor``; a sum ranks the same); fisher: the mean of squared
    per-batch gradients (``obd``). Raises ValueError for an unknown criterion or a missing input.
    """
    w = w.detach().float()
    if criterion == "l1":
        return w.abs()
    if criterion == "l2":
        return w * w
    if criterion == "taylor":
        if grad is None:
            raise ValueError("criterion='taylor' needs gradients: give data (and loss_fn)")
        return w * grad.detach().float()
    if criterion == "obd":
        if fisher is None:
            raise ValueError("criterion='obd' needs the empirical Fisher: give data (and loss_fn)")
        return 0.5 * fisher.detach().float() * w * w
    raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")


def importance(criterion: str, w: torch.Tensor, grad: Optional[torch.Tensor] = None,
               fisher: Optional[torch.Tensor] = None) -> torch.Tensor:
    """One importance per element (the element is the unit): the element score, |.| for taylor."""
    e = element_scores(criterion, w, grad, fisher)
    return e.abs() if criterion in _SIGNED else e


def check_criterion(criterion: str, choices: tuple[str, ...]) -> str:
    """``criterion`` with "magnitude" resolved to "l1"; ValueError naming the choices otherwise."""
    if not isinstance(criterion, str) or criterion not in choices:
        raise ValueError(f"criterion must be one of {choices}, got {criterion!r}")
    return "l1" if criterion == "magnitude" else criterion


def unit_scores(criterion: str, scores: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """One score per slice along ``dim`` (an output channel: dim 0): the element scores summed over
    every other dimension (then |.| for the signed Taylor criterion)."""
    dims = [d for d in range(scores.dim()) if d != dim % max(scores.dim(), 1)]
    s = scores.sum(dims) if dims else scores
    return s.abs() if criterion in _SIGNED else s


def block_scores(w: torch.Tensor, bn: int, bk: int, criterion: str = "l2",
                 grad: Optional[torch.Tensor] = None, fisher: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Score of each (bn x bk) block of ``w`` [N, K]: [R, KB]. For ``l2`` the block RMS
    (sqrt of the mean of w^2 over the block's real elements), else the criterion's sum per block
    divided by the block's real element count (edge blocks are smaller)."""
    e = element_scores(criterion, w, grad, fisher)
    s = _blocks(e, bn, bk).sum((-1, -2))
    if criterion in _SIGNED:
        s = s.abs()
    count = _blocks(torch.ones_like(e), bn, bk).sum((-1, -2)).clamp(min=1)
    s = s / count
    return s.sqrt() if criterion == "l2" else s


# Channel (filter) pruning adds one criterion that scores a channel by the BatchNorm after it
# rather than by the producer's weights: network slimming (Liu et al. 2017), |gamma|.
CHANNEL_CRITERIA = CRITERIA + ("bn_scale",)


def bn_scale(bn: torch.nn.Module) -> torch.Tensor:
    """|gamma| of a BatchNorm, one score per channel (float32); a BatchNorm without an affine
    weight scales every channel by 1."""
    w = getattr(bn, "weight", None)
    if w is None:
        return torch.ones(bn.num_features)
    return w.detach().float().abs()
