"""Pruning: criteria (``criteria``), choosing what to remove (``selection``), masks that cannot
regrow (``masks``, torch.nn.utils.parametrize), and the pruning calls:

- ``block_magnitude`` / ``semi_structured``: blocks or 2:4 groups of Linear weights, in the
  shapes the block-sparse kernels skip;
- ``filters``: whole output channels of Conv2d / Linear layers, coupled channels as groups
  (``pysparse.compact`` then removes them);
- ``remove``: drop the masks, keeping the zeros.
"""
from __future__ import annotations

from ..formats import DEFAULT_BLOCK
from . import criteria, masks, selection
from .block import block_magnitude, block_masks, semi_structured
from .filters import filters
from .masks import apply_mask, get_mask, remove

__all__ = ["block_magnitude", "block_masks", "semi_structured", "filters", "remove", "apply_mask", "get_mask",
           "criteria", "masks", "selection", "DEFAULT_BLOCK"]
