"""The block-sparse storage formats of BlockSparseLinear: float blocks (BsrLinear) and
int8 blocks (BsrInt8Linear)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .. import formats
from .block_sparse_linear import BlockSparseLinear, float_dtype
from .config import BlockSparseConfig

_FLOAT = (torch.float32, torch.bfloat16, torch.float16)


def _grid_layout(cfg: BlockSparseConfig, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A valid layout of ``cfg.nnz_blocks`` blocks (the first ones, row-major) for an empty
    layer: it runs (giving the bias) until a state dict brings the real one."""
    R, KB = cfg.block_rows, cfg.block_cols
    mask = (torch.arange(R * KB) < cfg.nnz_blocks).reshape(R, KB)
    lay = formats._layout(mask, cfg.out_features, cfg.in_features, *cfg.block)
    return lay.row_ptr.to(device), lay.col_idx.to(device)


def _meta(*ts: Optional[torch.Tensor]) -> bool:
    return any(t is not None and t.device.type == "meta" for t in ts)


class _BsrBase(BlockSparseLinear):
    """What both block formats add: row_ptr / col_idx and their checks on load."""

    def _register_layout(self, row_ptr: torch.Tensor, col_idx: torch.Tensor) -> None:
        self.register_buffer("row_ptr", row_ptr)
        self.register_buffer("col_idx", col_idx)

    def _check_layout(self, state_dict: dict, prefix: str, has_config: bool, errs: list[str]) -> Optional[int]:
        """Check row_ptr / col_idx in ``state_dict``; return their block count (None: absent
        or wrong, reason in errs)."""
        cfg = self._config
        rp, ci = state_dict.get(prefix + "row_ptr"), state_dict.get(prefix + "col_idx")
        if rp is None or ci is None:
            return None
        if has_config and isinstance(ci, torch.Tensor) and tuple(ci.shape) != (cfg.nnz_blocks,):
            errs.append(f"{prefix}col_idx: expected {cfg.nnz_blocks} stored blocks (the config's nnz_blocks), got "
                        f"shape {list(ci.shape)}")
            return None
        if _meta(rp, ci):
            return ci.numel()
        try:
            formats.check_bsr_layout(rp, ci, cfg.out_features, cfg.in_features, *cfg.block, prefix=prefix)
        except ValueError as e:
            errs.append(str(e))
            return None
        return ci.numel()

    def _adopt_block_count(self, nnzb: int, has_config: bool) -> None:
        # A file from before configs holds as many blocks as its weight had: adopt them.
        if not has_config and nnzb != self._config.nnz_blocks:
            self._config = _replace(self._config, nnz_blocks=nnzb)


def _replace(cfg: BlockSparseConfig, **kw) -> BlockSparseConfig:
    import dataclasses

    return dataclasses.replace(cfg, **kw)


class BsrLinear(_BsrBase, format="bsr"):
    """BlockSparseLinear with float blocks (config.dtype float32 / bfloat16 / float16).

    values: a Parameter in its device's kernel layout: k-major [nnzb, bk, bn] everywhere
    but bf16 on the CPU ([nnzb, bk/2, bn, 2] input pairs); float16 blocks (and bf16 with
    an odd bk) have no CPU kernel and sit there widened to float32, exactly. The state
    dict holds k-major blocks in config.dtype, whatever the device. bias: float32
    Parameter [N] (or None). Trainable with the pattern fixed.
    """

    def __init__(self, config: BlockSparseConfig, values: Optional[torch.Tensor] = None,
                 row_ptr: Optional[torch.Tensor] = None, col_idx: Optional[torch.Tensor] = None,
                 bias: Optional[torch.Tensor] = None, *, device: Optional[torch.device] = None) -> None:
        """values: k-major blocks [nnzb, bk, bn] (any float dtype, rounded to config.dtype);
        None builds an empty layer of the config (zeros) on ``device``."""
        super().__init__(config)
        device = torch.device(device or (values.device if values is not None else "cpu"))
        bn, bk = config.block
        if values is None:
            values = torch.zeros(config.nnz_blocks, bk, bn, dtype=self.logical_dtype, device=device)
            row_ptr, col_idx = _grid_layout(config, device)
            bias = torch.zeros(config.out_features, device=device) if config.bias else None
        values = values.to(device=device, dtype=self.logical_dtype)
        self.values = nn.Parameter(self._values_for(values, device.type == "cuda"))
        self._register_layout(row_ptr.to(device), col_idx.to(device))
        self.bias = nn.Parameter(bias.float().to(device)) if bias is not None else None

    @property
    def logical_dtype(self) -> torch.dtype:
        """The blocks' dtype as configured (what the state dict holds)."""
        return float_dtype(self._config.dtype)

    @classmethod
    def _empty(cls, config: BlockSparseConfig, device: torch.device) -> "BsrLinear":
        return cls(config, device=device)

    @classmethod
    def _from_weight(cls, config, w, bias, device) -> "BsrLinear":
        values, lay = formats.pack_bsr_f32(w, *config.block)
        return cls(config, values, lay.row_ptr, lay.col_idx, bias, device=torch.device("cpu")).to(device)

    def _layout_ok(self, v: torch.Tensor, cuda: bool) -> bool:
        if cuda:
            return v.dim() == 3 and v.dtype == self.logical_dtype
        if self.logical_dtype == torch.bfloat16 and self.block[1] % 2 == 0:
            return v.dim() == 4 and v.dtype == torch.bfloat16
        return v.dim() == 3 and v.dtype == torch.float32

    def _values_for(self, v: torch.Tensor, cuda: bool) -> torch.Tensor:
        """Blocks (either layout, any float dtype) in the layout of the CPU (cuda=False) or
        GPU kernel; unchanged if already there."""
        if self._layout_ok(v, cuda):
            return v
        if v.dim() == 4:
            v = formats.bf16_pairs_to_kmajor(v)
        if cuda:
            return v.to(self.logical_dtype)
        if self.logical_dtype == torch.bfloat16 and self.block[1] % 2 == 0:
            return formats.kmajor_to_bf16_pairs(v)
        # float16 (or odd-bk bf16) blocks have no CPU kernel: widen them to fp32, exactly
        return v.to(self.logical_dtype).float()

    def dense_weight(self) -> torch.Tensor:
        v = self.values.detach()
        if v.dim() == 4:
            v = formats.bf16_pairs_to_kmajor(v)
        return formats.bsr_to_dense(v, self.row_ptr, self.col_idx, self.out_features, self.in_features).float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.pysparse.bsr_linear(x, self.values, self.row_ptr, self.col_idx, self.bias,
                                          self.out_features, self.in_features, self.activation == "relu")
        # the op applies the NaN-row rule itself (csrc/ops/bsr_linear.cpp; _cuda_bsr on GPUs)
        return y

    def _apply(self, fn, recurse: bool = True):
        # Blocks live in the layout of their device's kernel; moving between the CPU and a
        # GPU re-lays them out once, here. On the CPU, whose kernels take fp32 and bf16
        # blocks only, casts like .half() keep the blocks (and always the fp32 bias) bit
        # for bit; on a GPU (whose kernel takes half blocks too) a cast of the module casts
        # the blocks, and config.dtype follows.
        was = self.values.device
        before = self.values.dtype
        keep = {"bias": self.bias.data} if self.bias is not None else {}
        if was.type != "cuda":
            keep["values"] = self.values.data
        super()._apply(fn, recurse)
        dev = self.values.device
        for name, t in keep.items():
            if name == "values" and dev.type == "cuda":
                continue  # moved to a GPU: a cast (if any) is wanted there
            cur = getattr(self, name)
            if not _meta(t, cur.data):
                cur.data = t.to(dev)
        v = self.values.data
        if dev.type == "cuda" and v.dtype != before and v.dtype in _FLOAT:
            self._config = _replace(self._config, dtype=str(v.dtype).split(".")[-1])
        cuda = dev.type == "cuda"
        if not self._layout_ok(v, cuda):
            self.values.data = self._values_for(v, cuda)
            if self.values.grad is not None:  # an accumulated gradient follows the layout
                self.values.grad = self._values_for(self.values.grad, cuda).to(self.values.dtype)
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        # Saved files hold one layout whatever the device: k-major [nnzb, bk, bn] blocks
        # in config.dtype (a widened fp16 block narrows back exactly).
        v = self.values
        if not self._layout_ok(v, True):
            v = v.detach()
            if v.dim() == 4:
                v = formats.bf16_pairs_to_kmajor(v)
            destination[prefix + "values"] = v.to(self.logical_dtype)

    def _prepare_load(self, state_dict: dict, prefix: str, has_config: bool) -> list[str]:
        errs: list[str] = []
        cfg = self._config
        nnzb = self._check_layout(state_dict, prefix, has_config, errs)
        bn, bk = cfg.block
        key = prefix + "values"
        # a file from before configs may hold another float dtype: it is rounded / widened
        dtypes = (self.logical_dtype,) if has_config else _FLOAT
        v = None
        if nnzb is not None:
            v = self._check_float(state_dict, key, (nnzb, bk, bn), errs, dtypes=dtypes)
        if cfg.bias:
            self._check_float(state_dict, prefix + "bias", (cfg.out_features,), errs)
        if errs or v is None:
            return errs
        # checked: now adopt the block count and put the blocks in this device's layout
        self._adopt_block_count(nnzb, has_config)
        new = self._values_for(v.to(self.values.device, self.logical_dtype), self.values.is_cuda)
        self.values.data = new.clone()  # the same Parameter: an optimizer keeps tracking it
        state_dict[key] = new
        for name in ("row_ptr", "col_idx"):
            t = state_dict[prefix + name].to(getattr(self, name).device)
            setattr(self, name, t.clone())
            state_dict[prefix + name] = t
        return errs


class BsrInt8Linear(_BsrBase, format="bsr-int8"):
    """BlockSparseLinear with 64 x 64 int8 blocks, per-output-channel weight scales and x
    quantized per row at run time (inference only).

    Buffers: values int8 in its device's layout ([nnzb, 4096] VNNI order on the CPU,
    k-major [nnzb, 64, 64] on a GPU; saved in the CPU order), colsum int32 [1, Np]
    (checked against the blocks on load), w_scale float32 [1, Np] (finite), bias_f32
    float32 [N] or None; Np = round_up(N, 64).
    """

    def __init__(self, config: BlockSparseConfig, packed: Optional[formats.BsrInt8] = None,
                 bias: Optional[torch.Tensor] = None, *, device: Optional[torch.device] = None) -> None:
        """packed: from formats.pack_bsr_int8 (CPU layout); None builds an empty layer."""
        super().__init__(config)
        device = torch.device(device or "cpu")
        N = config.out_features
        Np = formats.round_up(N, formats.INT8_BLOCK[0])
        if packed is None:
            values = torch.zeros(config.nnz_blocks, 4096, dtype=torch.int8, device=device)
            row_ptr, col_idx = _grid_layout(config, device)
            colsum = torch.full((1, Np), formats.COLSUM_PAD, dtype=torch.int32, device=device)
            colsum[:, :N] = 0
            w_scale = torch.ones(1, Np, device=device)
            bias = torch.zeros(N, device=device) if config.bias else None
        else:
            values, row_ptr, col_idx = packed.values, packed.layout.row_ptr, packed.layout.col_idx
            colsum, w_scale = packed.colsum, packed.w_scale
        if device.type == "cuda":
            values = formats.int8_blocks_to_kmajor(values.to(device))
        self.register_buffer("values", values.to(device))
        self.register_buffer("colsum", colsum.to(device))
        self.register_buffer("w_scale", w_scale.float().to(device))
        self._register_layout(row_ptr.to(device), col_idx.to(device))
        self.register_buffer("bias_f32", bias.float().to(device) if bias is not None else None)

    @classmethod
    def _empty(cls, config: BlockSparseConfig, device: torch.device) -> "BsrInt8Linear":
        return cls(config, device=device)

    @classmethod
    def _from_weight(cls, config, w, bias, device) -> "BsrInt8Linear":
        return cls(config, formats.pack_bsr_int8(w), bias, device=torch.device("cpu")).to(device)

    def dense_weight(self) -> torch.Tensor:
        q = formats.int8_bsr_to_dense(self.values, self.row_ptr, self.col_idx, self.out_features, self.in_features)
        return q.float() * self.w_scale[0, : self.out_features, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # No NaN-row pass: quantizing x per row already gives a row with a NaN or Inf a NaN
        # scale, so a NaN output row (see BlockSparseLinear).
        return torch.ops.pysparse.bsr_int8_linear(x, self.values, self.row_ptr, self.col_idx, self.colsum,
                                                  self.w_scale, self.bias_f32, None, self.out_features,
                                                  self.in_features, self.activation == "relu")

    def _apply(self, fn, recurse: bool = True):
        # int8 blocks are in the CPU kernels' VNNI order on the CPU and k-major on a GPU:
        # re-laid out only when the device type changes. Scales and bias stay float32 bit
        # for bit through casts like .half().
        was = self.values.device
        keep = {n: getattr(self, n) for n in ("w_scale", "bias_f32") if getattr(self, n) is not None}
        super()._apply(fn, recurse)
        dev = self.values.device
        for name, t in keep.items():
            if not _meta(t, getattr(self, name)):
                setattr(self, name, t.to(dev))
        if dev.type == "cuda" and was.type != "cuda":
            self.values = formats.int8_blocks_to_kmajor(self.values)
        elif was.type == "cuda" and dev.type != "cuda":
            self.values = formats.int8_blocks_to_cpu(self.values)
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.values.is_cuda:  # files hold the CPU order, whatever the device
            destination[prefix + "values"] = formats.int8_blocks_to_cpu(self.values.detach())

    def _prepare_load(self, state_dict: dict, prefix: str, has_config: bool) -> list[str]:
        errs: list[str] = []
        cfg = self._config
        N = cfg.out_features
        Np = formats.round_up(N, formats.INT8_BLOCK[0])
        nnzb = self._check_layout(state_dict, prefix, has_config, errs)
        v = cs = None
        if nnzb is not None:
            v = self._check_float(state_dict, prefix + "values", (nnzb, 4096), errs, dtypes=(torch.int8,))
        cs = self._check_float(state_dict, prefix + "colsum", (1, Np), errs, dtypes=(torch.int32,))
        self._check_float(state_dict, prefix + "w_scale", (1, Np), errs)
        if cfg.bias:
            self._check_float(state_dict, prefix + "bias_f32", (N,), errs)
        if errs or v is None:
            return errs
        if cs is not None and not _meta(v, cs):
            # colsum is derived data the kernels trust (the VNNI compensation): it must be
            # the blocks' sums, or every output of the channel is off.
            want = formats.int8_bsr_colsum(v.cpu(), state_dict[prefix + "row_ptr"].cpu(), N)
            if not torch.equal(cs[0, :N].cpu(), want):
                bad = int((cs[0, :N].cpu() != want).nonzero()[0, 0])
                errs.append(f"{prefix}colsum: does not match the int8 blocks in {prefix}values (output channel "
                            f"{bad}: {int(cs[0, bad])}, the blocks sum to {int(want[bad])})")
                return errs
        self._adopt_block_count(nnzb, has_config)
        new = v.to(self.values.device)
        if self.values.is_cuda:
            new = formats.int8_blocks_to_kmajor(new)
        self.values = new.clone()
        state_dict[prefix + "values"] = new
        for name in ("row_ptr", "col_idx"):
            t = state_dict[prefix + name].to(getattr(self, name).device)
            setattr(self, name, t.clone())
            state_dict[prefix + name] = t
        return errs

    def _after_load(self) -> None:
        # files from before the padding mark hold zeros there
        if self.colsum.device.type != "meta":
            self.colsum[:, self.out_features:] = formats.COLSUM_PAD
