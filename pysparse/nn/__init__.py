"""Drop-in layers whose kernels turn compression into speed.

Every layer is built from a small frozen config (``layer.config``; ``from_config`` builds
an empty one, on any device including meta, that its saved state dict loads into).
"""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import nn

from .block_sparse_linear import BlockSparseLinear, clear_timing_cache
from .bsr_linear import BsrInt8Linear, BsrLinear
from .compact_conv2d import CompactConv2d
from .config import BlockSparseConfig, Int8LinearConfig, LayerConfig, config_from_dict
from .dense_kept_linear import DenseInt8KeptLinear, DenseKeptLinear, SemiStructuredLinear
from .int8_linear import Int8Linear
from .int8_conv2d import Int8Conv2d
from .packed_conv2d import PackedConv2d

__all__ = ["Int8Linear", "BlockSparseLinear", "BsrLinear", "BsrInt8Linear", "DenseKeptLinear",
           "DenseInt8KeptLinear", "SemiStructuredLinear", "Int8LinearConfig", "BlockSparseConfig",
           "config_from_dict", "from_config", "clear_timing_cache", "CompactConv2d",
           "Int8Conv2d", "PackedConv2d"]


def from_config(config: Union[LayerConfig, dict], device: Optional[Union[str, torch.device]] = None) -> nn.Module:
    """An empty layer of ``config`` (an Int8LinearConfig, a BlockSparseConfig, or the dict
    ``config.to_dict()`` / a saved ``_extra_state`` holds) on ``device`` (default CPU;
    "meta" allocates nothing), ready for ``load_state_dict``."""
    config = config_from_dict(config)
    if isinstance(config, Int8LinearConfig):
        return Int8Linear.from_config(config, device=device)
    return BlockSparseLinear.from_config(config, device=device)
