"""BlockSparseLinear: an nn.Linear whose pruned (all-zero) weight blocks are skipped."""
from __future__ import annotations

import time
from typing import Optional

import torch
from torch import nn

from .. import formats, ops
from ..formats import DEFAULT_BLOCK
from .int8_linear import Int8Linear

FORMATS = ("bsr", "bsr-int8", "dense", "dense-int8", "2:4")
_HALF = (torch.float16, torch.bfloat16)


def _median_ms(fn, x, reps: int = 5) -> float:
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    fn(x)
    sync()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn(x)
        sync()
        ts.append(time.perf_counter() - t0)
    ts.sort()
    return ts[len(ts) // 2] * 1e3


def is_2_4(w: torch.Tensor) -> bool:
    """True if every group of 4 consecutive inputs of each output holds at most 2 nonzeros."""
    return w.shape[1] % 4 == 0 and bool((w.reshape(w.shape[0], -1, 4).ne(0).sum(-1) <= 2).all())


class BlockSparseLinear(nn.Module):
    """y = x @ W^T + b (optionally ReLU) with W stored as nonzero blocks only.

    Build with ``from_dense(linear)`` from a weight whose pruned blocks are zero (see
    ``pysparse.prune.block_magnitude``). The format is chosen once, at conversion: with
    ``dispatch="auto"`` the sparse kernel and the dense one are timed on this machine for
    the layer's shape, and the faster is kept, so conversion never makes a layer slower.
    The choice (and the timings) show in ``repr`` and in ``pysparse.plan_report``.

    Float blocks ("bsr": fp32, or bf16) are trainable with the pattern fixed (gradients
    flow to the stored blocks, the bias and the input); int8 blocks ("bsr-int8") are
    inference only.
    Input x [..., in_features] float32/bfloat16/float16; output in x's dtype.
    """

    def __init__(self, in_features: int, out_features: int, fmt: str, block: tuple[int, int],
                 activation: Optional[str] = None) -> None:
        super().__init__()
        if fmt not in FORMATS:
            raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
        if activation not in (None, "relu"):
            raise ValueError(f"activation must be None or 'relu', got {activation!r}")
        self.in_features, self.out_features = in_features, out_features
        self.format, self.block, self.activation = fmt, tuple(block), activation
        self.density = 1.0
        self.timings: dict[str, float] = {}
        self.dense: Optional[nn.Module] = None

    @classmethod
    def from_dense(cls, linear: nn.Linear, block: Optional[tuple[int, int]] = None,
                   dtype: Optional[torch.dtype] = None, *, activation: Optional[str] = None,
                   dispatch: str = "auto", probe_m: tuple[int, ...] = (1, 128)) -> "BlockSparseLinear":
        """Convert an nn.Linear whose weight already holds zero blocks.

        block: (bn, bk) for float blocks; None picks the CPU kernel's block (64, 32).
        int8 always uses 64 x 64 blocks (one VNNI column chunk x one AMX K tile).
        dtype: None/torch.float32 for fp32 blocks, torch.bfloat16 for bf16 blocks (x is
        rounded to bf16, products are exact and sums fp32, as a bf16 nn.Linear; bk must
        be even), torch.int8 for int8 blocks (weights per output channel, activations
        quantized per row at run time); on a GPU also torch.float16 (the Triton kernel).
        dispatch: "auto" (time sparse vs dense at M in ``probe_m`` on the layer's device,
        keep the faster; on a GPU with a 2:4-sparse weight and a half dtype, torch's 2:4
        semi-structured kernel competes too), "sparse" or "dense" to force one.
        The result lives on ``linear``'s device.
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        device = linear.weight.device
        if dtype not in (None, torch.float32, torch.int8, *_HALF):
            raise ValueError(f"dtype must be None, torch.float32, torch.int8, torch.float16 or torch.bfloat16, "
                             f"got {dtype}")
        if dtype == torch.float16 and device.type != "cuda":
            raise ValueError("dtype=torch.float16 blocks run on the GPU kernel: move the layer to a GPU first, "
                             "or use torch.float32 / torch.bfloat16 / torch.int8 on the CPU")
        if dispatch not in ("auto", "sparse", "dense"):
            raise ValueError(f"dispatch must be 'auto', 'sparse' or 'dense', got {dispatch!r}")
        w = linear.weight.detach().float().cpu()
        if not torch.isfinite(w).all():
            raise ValueError("linear.weight holds NaN or Inf")
        int8 = dtype == torch.int8
        if int8:
            if block is not None and tuple(block) != formats.INT8_BLOCK:
                raise ValueError(f"int8 blocks are {formats.INT8_BLOCK}, got block={block}")
            block = formats.INT8_BLOCK
        block = tuple(block or DEFAULT_BLOCK)
        if not int8 and (len(block) != 2 or block[0] not in (16, 32, 64) or block[1] < 1):
            raise ValueError(f"block must be (bn, bk) with bn in 16, 32, 64 and bk >= 1, got {block}")
        N, K = w.shape
        bias = None if linear.bias is None else linear.bias.detach().float().cpu()
        half = dtype in _HALF
        if half and device.type == "cpu" and block[1] % 2:
            raise ValueError(f"bfloat16 blocks pair the inputs on the CPU: block bk must be even, got block={block}")
        sparse = cls(K, N, "bsr-int8" if int8 else "bsr", block, activation)
        sparse._build_sparse(w, bias)
        if half:  # half blocks: k-major for the Triton kernel, input pairs for the CPU; bias stays fp32
            v = sparse.values.data.to(dtype)
            sparse.values.data = formats.kmajor_to_bf16_pairs(v) if device.type == "cpu" else v
        sparse = sparse.to(device)
        if dispatch == "sparse":
            return sparse
        dense = cls(K, N, "dense-int8" if int8 else "dense", block, activation)
        dense.density = sparse.density
        dense._build_dense(w, bias)
        if half:
            dense.dense.to(dtype)
        dense = dense.to(device)
        if dispatch == "dense":
            return dense
        candidates = {"sparse": sparse, "dense": dense}
        timings: dict = {"probe_m": list(probe_m)}
        if half and device.type == "cuda" and is_2_4(w):
            try:
                candidates["semi_structured"] = cls._semi_structured(w, bias, dtype, device, activation, block)
            except Exception as e:  # the GPU, torch build or shape does not support it: say why
                timings["semi_structured_skipped"] = f"{type(e).__name__}: {e}"
        x_dtype = dtype if half else torch.float32
        with torch.no_grad():
            for name, mod in candidates.items():
                timings[f"{name}_ms"] = sum(_median_ms(mod, torch.randn(m, K, device=device, dtype=x_dtype))
                                            for m in probe_m)
        best = min(candidates, key=lambda n: timings[f"{n}_ms"])
        keep = candidates[best]
        keep.timings = timings
        return keep

    @classmethod
    def _semi_structured(cls, w: torch.Tensor, bias: Optional[torch.Tensor], dtype: torch.dtype,
                         device: torch.device, activation: Optional[str], block) -> "BlockSparseLinear":
        """The 2:4 format: torch's semi-structured sparse kernels (sm80+ GPUs)."""
        from torch.sparse import to_sparse_semi_structured

        mod = cls(w.shape[1], w.shape[0], "2:4", block, activation)
        mod.density = 0.5
        lin = nn.Linear(w.shape[1], w.shape[0], bias is not None).to(device=device, dtype=dtype)
        with torch.no_grad():
            lin.weight.copy_(w)
            if bias is not None:
                lin.bias.copy_(bias)
        lin.weight = nn.Parameter(to_sparse_semi_structured(lin.weight.detach()), requires_grad=False)
        mod.dense = lin
        return mod

    def _build_sparse(self, w: torch.Tensor, bias: Optional[torch.Tensor]) -> None:
        if self.format == "bsr":
            values, layout = formats.pack_bsr_f32(w, *self.block)
            self.values = nn.Parameter(values)
        else:
            p = formats.pack_bsr_int8(w)
            layout = p.layout
            self.register_buffer("values", p.values)
            self.register_buffer("colsum", p.colsum)
            self.register_buffer("w_scale", p.w_scale)
        self.register_buffer("row_ptr", layout.row_ptr)
        self.register_buffer("col_idx", layout.col_idx)
        self.density = layout.density
        self.bias = nn.Parameter(bias) if (bias is not None and self.format == "bsr") else None
        if bias is not None and self.format != "bsr":
            self.register_buffer("bias_f32", bias)

    def _build_dense(self, w: torch.Tensor, bias: Optional[torch.Tensor]) -> None:
        lin = nn.Linear(self.in_features, self.out_features, bias is not None)
        with torch.no_grad():
            lin.weight.copy_(w)
            if bias is not None:
                lin.bias.copy_(bias)
        self.dense = Int8Linear.from_float(lin) if self.format == "dense-int8" else lin

    def dense_weight(self) -> torch.Tensor:
        """The weight this layer computes with, as a dense float32 [N, K]."""
        if self.dense is not None:
            if isinstance(self.dense, Int8Linear):
                return self.dense.dequantized_weight()
            w = self.dense.weight.detach()
            if type(w) is not torch.Tensor:  # the 2:4 format's SparseSemiStructuredTensor
                w = w.to_dense()
            return w.float()
        if self.format == "bsr":
            return ops._bsr_dense_weight(self.values.detach(), self.row_ptr, self.col_idx, self.out_features,
                                         self.in_features).float()
        dense = torch.zeros(self.out_features, self.in_features)
        R = self.row_ptr.numel() - 1
        rows = torch.repeat_interleave(torch.arange(R), (self.row_ptr[1:] - self.row_ptr[:-1]).long().cpu())
        v = self.values.detach().cpu()
        # [n][k] blocks from either layout: k-major [nnzb, 64, 64] on a GPU, VNNI order on the CPU
        blk = (v.transpose(1, 2) if v.dim() == 3 else
               v.reshape(-1, 4, 16, 16, 4).permute(0, 1, 3, 2, 4).reshape(-1, 64, 64)).float()
        cols = self.col_idx.cpu()
        for j in range(blk.shape[0]):
            n0, k0 = int(rows[j]) * 64, int(cols[j]) * 64
            n1, k1 = min(n0 + 64, self.out_features), min(k0 + 64, self.in_features)
            dense[n0:n1, k0:k1] = blk[j, : n1 - n0, : k1 - k0]
        return (dense * self.w_scale[0, : self.out_features, None].cpu()).to(self.values.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        relu = self.activation == "relu"
        if self.dense is not None:
            if isinstance(self.dense, nn.Linear) and self.dense.weight.dtype != x.dtype:
                # a half layer kept dense (dtype=bf16/fp16) takes any float x, as the sparse one
                y = self.dense(x.to(self.dense.weight.dtype)).to(x.dtype)
            else:
                y = self.dense(x)
            return torch.relu(y) if relu else y
        N, K = self.out_features, self.in_features
        if self.format == "bsr":
            return torch.ops.pysparse.bsr_linear(x, self.values, self.row_ptr, self.col_idx, self.bias, N, K, relu)
        return torch.ops.pysparse.bsr_int8_linear(x, self.values, self.row_ptr, self.col_idx, self.colsum,
                                                  self.w_scale, getattr(self, "bias_f32", None), None, N, K, relu)

    def _apply(self, fn, recurse: bool = True):
        # Block values live in the layout of their device's kernel: int8 in the CPU kernels'
        # VNNI order on the CPU and k-major on a GPU; bf16 as input pairs on the CPU and
        # k-major on a GPU. Moving the layer re-lays them out once, here.
        was_cuda = self.dense is None and self.values.is_cuda
        # float32 state the kernels need is kept bit for bit through casts like .half():
        # the bias and scales always, the blocks on the CPU (whose kernels take fp32 and
        # bf16 blocks only; the GPU kernel also takes half blocks, so there .half() casts them).
        keep = {n: getattr(self, n).data for n in ("bias", "bias_f32", "w_scale")
                if getattr(self, n, None) is not None}
        if self.format == "bsr" and self.dense is None and not was_cuda:
            keep["values"] = self.values.data
        super()._apply(fn, recurse)
        for name, t in keep.items():
            cur = getattr(self, name)
            target = cur.device
            if name == "values" and target.type == "cuda":
                continue  # moved to a GPU: the cast (if any) is wanted there
            if isinstance(cur, nn.Parameter):
                cur.data = t.to(target)
            else:
                setattr(self, name, t.to(target))
        if self.dense is not None:
            return self
        now_cuda = self.values.is_cuda
        if self.format == "bsr-int8":
            if now_cuda and not was_cuda:
                self.values = formats.int8_blocks_to_kmajor(self.values)
            elif was_cuda and not now_cuda:
                self.values = formats.int8_blocks_to_cpu(self.values)
            for name in ("w_scale", "bias_f32"):
                if getattr(self, name, None) is not None:
                    setattr(self, name, getattr(self, name).float())
        elif self.format == "bsr":
            self.values.data = self._values_for(self.values.data, now_cuda)
            if self.values.grad is not None:  # an accumulated gradient follows the layout
                self.values.grad = self._values_for(self.values.grad, now_cuda).to(self.values.dtype)
        return self

    def _values_for(self, v: torch.Tensor, cuda: bool) -> torch.Tensor:
        """Float blocks (either layout, any float dtype) in the layout of the CPU (cuda=False)
        or GPU kernel: k-major [nnzb, bk, bn] everywhere but bf16 on the CPU (input pairs)."""
        if v.dim() == 4:
            v = formats.bf16_pairs_to_kmajor(v)
        if cuda:
            return v
        if v.dtype == torch.bfloat16 and self.block[1] % 2 == 0:
            return formats.kmajor_to_bf16_pairs(v)
        # float16 (or odd-bk bf16) blocks have no CPU kernel: widen them to fp32, exactly
        return v.float()

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        # Saved files hold one layout per format, whatever the device: int8 blocks in the CPU
        # kernels' order, float blocks k-major [nnzb, bk, bn] (in their dtype).
        if self.dense is not None:
            return
        if self.format == "bsr-int8" and self.values.is_cuda:
            destination[prefix + "values"] = formats.int8_blocks_to_cpu(self.values.detach())
        elif self.format == "bsr" and self.values.dim() == 4:
            destination[prefix + "values"] = formats.bf16_pairs_to_kmajor(self.values.detach())

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # The number of stored blocks is data: take the saved tensors' shapes as they are.
        for name in ("values", "row_ptr", "col_idx"):
            key = prefix + name
            if key in state_dict and hasattr(self, name) and getattr(self, name) is not None:
                cur = getattr(self, name)
                new = state_dict[key].to(cur.device)
                if name == "values" and self.format == "bsr-int8" and cur.is_cuda:
                    new = formats.int8_blocks_to_kmajor(new)
                elif name == "values" and self.format == "bsr":  # the layout of this device's kernel
                    new = self._values_for(new.to(cur.dtype), cur.is_cuda)
                if isinstance(cur, nn.Parameter):
                    cur.data = new.clone()  # the same Parameter: an optimizer keeps tracking it
                else:
                    setattr(self, name, new.clone())
                state_dict[key] = new  # what the copy below checks and copies: the converted tensor
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if self.format == "bsr-int8" and self.dense is None:  # files from before the padding mark
            self.colsum[:, self.out_features:] = formats.COLSUM_PAD
        if self.dense is None and hasattr(self, "col_idx"):
            R, KB = self.row_ptr.numel() - 1, -(-self.in_features // self.block[1])
            self.density = self.col_idx.numel() / max(R * KB, 1)

    def extra_repr(self) -> str:
        t = ""
        if self.timings:
            t = f", measured sparse={self.timings['sparse_ms']:.3f}ms dense={self.timings['dense_ms']:.3f}ms"
        dt = f", dtype={self.values.dtype}" if self.format == "bsr" and self.dense is None else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, format={self.format}{dt}, "
                f"block={self.block}, density={self.density:.3f}, activation={self.activation}{t}")
