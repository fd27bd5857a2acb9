"""Pruning: criteria (``criteria``), choosing what to remove (``selection``), masks that cannot
regrow (``masks``, torch.nn.utils.parametrize), and the pruning calls:

- ``unstructured``: single weights of Linear / Conv2d layers (magnitude, Taylor, OBD);
- ``blocks`` (``block_magnitude``: its magnitude case) / ``semi_structured``: blocks or 2:4 groups
  of Linear weights, in the shapes the block-sparse kernels skip;
- ``filters``: whole output channels of Conv2d / Linear layers, coupled channels as groups
  (``pysparse.compact`` then removes them);
- ``sensitivity``: each layer pruned alone at each level, the metric recorded
  (``SensitivityTable``: print, CSV / JSON, plot, ``allocate`` per-layer amounts for a target);
- ``CubicSchedule``: gradual pruning during fine-tuning (Zhu & Gupta 2017);
- ``remove``: drop the masks, keeping the zeros.
"""
from __future__ import annotations

from ..formats import DEFAULT_BLOCK
from . import criteria, masks, selection
from .block import block_magnitude, block_masks, blocks, semi_structured
from .filters import filters
from .masks import apply_mask, get_mask, remove
from .schedule import CubicSchedule
from .sensitivity import SensitivityTable, sensitivity
from .unstructured import unstructured

__all__ = ["unstructured", "blocks", "block_magnitude", "block_masks", "semi_structured", "filters", "sensitivity",
           "SensitivityTable", "CubicSchedule", "remove", "apply_mask", "get_mask", "criteria", "masks", "selection",
           "DEFAULT_BLOCK"]
