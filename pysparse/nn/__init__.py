"""Drop-in layers whose kernels turn compression into speed."""
from .block_sparse_linear import BlockSparseLinear
from .int8_linear import Int8Linear
from .int8_conv2d import Int8Conv2d

__all__ = ["Int8Linear", "BlockSparseLinear", "Int8Conv2d"]
