"""The formats of BlockSparseLinear that keep the weight whole: where timing found the
dense kernel faster (DenseKeptLinear, DenseInt8KeptLinear) and torch's 2:4
semi-structured sparse weight (SemiStructuredLinear, GPU kernels)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .block_sparse_linear import BlockSparseLinear, float_dtype, is_2_4
from .config import BlockSparseConfig
from .int8_linear import Int8Linear

_FLOAT = (torch.float32, torch.bfloat16, torch.float16)


class DenseKeptLinear(BlockSparseLinear, format="dense"):
    """BlockSparseLinear kept dense: ``dense``, an nn.Linear in config.dtype (its bias in
    the same dtype, as nn.Linear needs), computing with the pruned zeros.

    As with float blocks: on the CPU casts like .half() keep the weight as it is (the
    sparse choice would keep its blocks, so the output never depends on the choice); on a
    GPU a cast of the module casts the weight and config.dtype follows.
    """

    def __init__(self, config: BlockSparseConfig, *, device: Optional[torch.device] = None) -> None:
        super().__init__(config)
        self.dense = nn.Linear(config.in_features, config.out_features, config.bias, device=device,
                               dtype=float_dtype(config.dtype))
        with torch.no_grad():  # an empty layer is zeros (what the config describes), not nn.Linear's random init
            if self.dense.weight.device.type != "meta":
                self.dense.weight.zero_()
                if self.dense.bias is not None:
                    self.dense.bias.zero_()

    @classmethod
    def _empty(cls, config: BlockSparseConfig, device: torch.device) -> "DenseKeptLinear":
        return cls(config, device=device)

    @classmethod
    def _from_weight(cls, config, w, bias, device) -> "DenseKeptLinear":
        m = cls(config)
        with torch.no_grad():
            m.dense.weight.copy_(w)
            if bias is not None:
                m.dense.bias.copy_(bias)
        return m.to(device)

    def dense_weight(self) -> torch.Tensor:
        return self.dense.weight.detach().float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        wdt = self.dense.weight.dtype
        # a half layer kept dense takes any float x, as the sparse one does
        y = self.dense(x.to(wdt)).to(x.dtype) if x.dtype != wdt else self.dense(x)
        if self.activation == "relu":
            y = torch.relu(y)
        return self._nan_rows(x, y)

    def _apply(self, fn, recurse: bool = True):
        was = self.dense.weight.device
        keep = {n: p.data for n, p in self.dense.named_parameters(recurse=False)} if was.type == "cpu" else {}
        super()._apply(fn, recurse)
        dev = self.dense.weight.device
        if dev.type == "cpu":
            for n, t in keep.items():
                getattr(self.dense, n).data = t
        dt = self.dense.weight.dtype
        if dt in _FLOAT and str(dt).split(".")[-1] != self._config.dtype:
            import dataclasses

            self._config = dataclasses.replace(self._config, dtype=str(dt).split(".")[-1])
        return self

    def _prepare_load(self, state_dict: dict, prefix: str, has_config: bool) -> list[str]:
        errs: list[str] = []
        cfg = self._config
        dtypes = (float_dtype(cfg.dtype),) if has_config else _FLOAT  # old files: cast as torch does
        self._check_float(state_dict, prefix + "dense.weight", (cfg.out_features, cfg.in_features), errs,
                          dtypes=dtypes)
        if cfg.bias:
            self._check_float(state_dict, prefix + "dense.bias", (cfg.out_features,), errs, dtypes=dtypes)
        return errs


class DenseInt8KeptLinear(BlockSparseLinear, format="dense-int8"):
    """BlockSparseLinear with int8 weights kept dense: ``dense``, an Int8Linear (dynamic
    per-row activations, one scale per output channel), which checks its own state."""

    def __init__(self, config: BlockSparseConfig, dense: Optional[Int8Linear] = None, *,
                 device: Optional[torch.device] = None) -> None:
        super().__init__(config)
        self.dense = dense if dense is not None else Int8Linear(config.in_features, config.out_features,
                                                                config.bias, device=device)

    @classmethod
    def _empty(cls, config: BlockSparseConfig, device: torch.device) -> "DenseInt8KeptLinear":
        return cls(config, device=device)

    @classmethod
    def _from_weight(cls, config, w, bias, device) -> "DenseInt8KeptLinear":
        lin = nn.Linear(config.in_features, config.out_features, bias is not None)
        with torch.no_grad():
            lin.weight.copy_(w)
            if bias is not None:
                lin.bias.copy_(bias)
        return cls(config, Int8Linear.from_float(lin)).to(device)

    def dense_weight(self) -> torch.Tensor:
        return self.dense.dequantized_weight()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # per-row quantization already makes a row holding NaN or Inf a NaN row
        y = self.dense(x)
        return torch.relu(y) if self.activation == "relu" else y


class SemiStructuredLinear(DenseKeptLinear, format="2:4"):
    """BlockSparseLinear in torch's 2:4 semi-structured format (sm80+ GPU kernels;
    config.dtype bfloat16 or float16). On a GPU ``dense.weight`` is a
    SparseSemiStructuredTensor; elsewhere (an empty layer built on the CPU or meta, or
    the layer moved off the GPU) it is the plain 2:4-sparse weight, computed densely.
    The state dict holds the plain weight; loading checks its 2:4 pattern."""

    def __init__(self, config: BlockSparseConfig, *, device: Optional[torch.device] = None) -> None:
        super().__init__(config, device=device)
        self._compress()
        # the child nn.Linear loads after this module's own load: compress after it
        self.register_load_state_dict_post_hook(lambda mod, keys: mod._compress())

    @property
    def density(self) -> float:
        """Half the weights are stored (2 of every 4)."""
        return 0.5

    def _is_compressed(self) -> bool:
        # a Parameter wrapping a SparseSemiStructuredTensor detaches to that subclass
        return type(self.dense.weight.detach()) is not torch.Tensor

    def _compress(self) -> None:
        if self.dense.weight.is_cuda and not self._is_compressed():
            from torch.sparse import to_sparse_semi_structured

            self.dense.weight = nn.Parameter(to_sparse_semi_structured(self.dense.weight.detach()),
                                             requires_grad=False)

    def _decompress(self) -> None:
        if self._is_compressed():
            self.dense.weight = nn.Parameter(self.dense.weight.detach().to_dense(), requires_grad=False)

    @classmethod
    def _from_weight(cls, config, w, bias, device) -> "SemiStructuredLinear":
        if not is_2_4(w):
            raise ValueError("the 2:4 format needs a weight with at most 2 nonzeros in every 4 consecutive inputs")
        m = super()._from_weight(config, w, bias, torch.device("cpu"))
        return m.to(device)

    def dense_weight(self) -> torch.Tensor:
        w = self.dense.weight.detach()
        return (w.to_dense() if self._is_compressed() else w).float()

    def _apply(self, fn, recurse: bool = True):
        # the compressed tensor does not move or cast: move the plain weight, compress again
        self._decompress()
        super()._apply(fn, recurse)
        self._compress()
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self._is_compressed():
            destination[prefix + "dense.weight"] = self.dense.weight.detach().to_dense()

    def _prepare_load(self, state_dict: dict, prefix: str, has_config: bool) -> list[str]:
        errs = super()._prepare_load(state_dict, prefix, has_config)
        w = state_dict.get(prefix + "dense.weight")
        if not errs and isinstance(w, torch.Tensor) and w.device.type != "meta" and not is_2_4(w):
            errs.append(f"{prefix}dense.weight: not 2:4 sparse (more than 2 nonzeros in some 4 consecutive inputs)")
        if not errs:
            self._decompress()  # the child copies into a plain tensor; compressed again after
        return errs
