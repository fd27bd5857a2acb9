"""Drop-in layers whose kernels turn compression into speed."""
from .block_sparse_linear import BlockSparseLinear
from .compact_conv2d import CompactConv2d
from .int8_linear import Int8Linear

__all__ = ["Int8Linear", "BlockSparseLinear", "CompactConv2d"]
