"""BlockSparseLinear: an nn.Linear whose pruned (all-zero) weight blocks are skipped.

The shared base: what every storage format has in common (features, block, activation,
density, the timings behind the choice, the config and its checks on load) and
``from_dense``, which picks the format. One subclass per format stores the weight:
bsr_linear.py (BsrLinear: float blocks; BsrInt8Linear: int8 blocks) and
dense_kept_linear.py (DenseKeptLinear, DenseInt8KeptLinear, SemiStructuredLinear).
"""
from __future__ import annotations

import threading
import time
from typing import Any, Callable, Optional, Union

import torch
from torch import nn

from .. import formats, ops
from .config import FLOAT_DTYPES, FORMATS, BlockSparseConfig, ConfigState, config_from_dict, drop_key

__all__ = ["BlockSparseLinear", "FORMATS", "clear_timing_cache", "is_2_4", "dtype_name", "float_dtype"]
_HALF = (torch.float16, torch.bfloat16)
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16",
                torch.int8: "int8"}
DISPATCH = ("auto", "sparse", "dense")
# Float bn: the CPU kernels' column widths (one, two or four 16-lane vectors of outputs).
FLOAT_BN = (16, 32, 64)
# Timing cache buckets: densities within 1/20 of each other time alike (the sparse kernel's
# work is linear in density; at 5% steps the dense/sparse ratio moves a few percent).
DENSITY_BUCKETS = 20


def dtype_name(dtype: Optional[torch.dtype]) -> str:
    """The config's name of a block dtype (None means float32)."""
    return _DTYPE_NAMES[torch.float32 if dtype is None else dtype]


def _median_ms(fn: Callable[[torch.Tensor], Any], x: torch.Tensor, reps: int = 5) -> float:
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


# ------------------------------------------------------------------------------ timing cache
# dispatch="auto" times the candidates once per (shape, block, density bucket, dtype,
# device, kernel path, threads, probe_m, 2:4-eligible) in this process: a model repeats a
# handful of layer shapes, so later layers of a shape reuse the first one's choice.
_TIMING_CACHE: dict[tuple, tuple[str, dict]] = {}
_TIMING_LOCK = threading.Lock()


def clear_timing_cache() -> None:
    """Forget every format choice ``BlockSparseLinear.from_dense(dispatch="auto")`` timed
    in this process (the next conversion of each shape times again)."""
    with _TIMING_LOCK:
        _TIMING_CACHE.clear()


def _timing_key(cfg: BlockSparseConfig, device: torch.device, probe_m: tuple[int, ...], two_four: bool) -> tuple:
    dev = str(device)
    if device.type == "cuda":
        dev += ":" + torch.cuda.get_device_name(device)
    bucket = round(cfg.density * DENSITY_BUCKETS)
    return (cfg.out_features, cfg.in_features, cfg.block, bucket, cfg.dtype, dev, ops.kernel_for(device),
            torch.get_num_threads(), tuple(probe_m), two_four)


# ------------------------------------------------------------------------------ the base
class BlockSparseLinear(ConfigState, nn.Module):
    """y = x @ W^T + b (optionally ReLU) with W stored as nonzero blocks only.

    Build with ``from_dense(linear)`` from a weight whose pruned blocks are zero (see
    ``pysparse.prune.block_magnitude``). The format is chosen once, at conversion: with
    ``dispatch="auto"`` the sparse kernel and the dense one are timed on this machine for
    the layer's shape (once per shape and density in a process), and the faster is kept,
    so conversion never makes a layer slower. The choice is part of ``config`` (saved in
    the state dict, never re-timed on load); the timings show in ``repr`` and in
    ``pysparse.plan_report``. Each format is its own subclass; ``format`` names it.

    Float blocks ("bsr": fp32, or bf16) are trainable with the pattern fixed (gradients
    flow to the stored blocks, the bias and the input); int8 blocks ("bsr-int8") are
    inference only.
    Input x [..., in_features] float32/bfloat16/float16; output in x's dtype.

    Non-finite input: a NaN or Inf anywhere in a row of x makes that whole output row NaN,
    in every format, so the result never depends on which format timing chose (the int8
    formats' per-row quantization gives this by itself; the float formats enforce it, one
    elementwise pass over x and y). For finite x the formats agree to rounding.
    """

    _by_format: dict[str, type] = {}
    format: str = ""

    def __init_subclass__(cls, format: Optional[str] = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if format is not None:
            cls.format = format
            BlockSparseLinear._by_format[format] = cls

    def __init__(self, config: BlockSparseConfig) -> None:
        super().__init__()
        if type(self) is BlockSparseLinear or self.format != config.format:
            raise TypeError(f"build a BlockSparseLinear with BlockSparseLinear.from_config(config) or from_dense; "
                            f"{type(self).__name__} cannot hold format {config.format!r}")
        self._config = config
        self.timings: dict[str, Any] = {}

    # -------------------------------------------------------------- what all formats share
    @property
    def in_features(self) -> int:
        """K, the input width."""
        return self._config.in_features

    @property
    def out_features(self) -> int:
        """N, the output width."""
        return self._config.out_features

    @property
    def block(self) -> tuple[int, int]:
        """(bn, bk), the block the weight was pruned in."""
        return self._config.block

    @property
    def activation(self) -> Optional[str]:
        """None or "relu" (fused into the kernel's epilogue)."""
        return self._config.activation

    @property
    def density(self) -> float:
        """Stored (bn x bk) blocks over all blocks of the weight."""
        return self._config.density

    def _nan_rows(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The float formats' last step: every row of x holding a NaN or Inf gives a NaN
        output row (the class's documented rule, whatever the format)."""
        # A row's float64 sum is NaN exactly when the row holds a NaN or an Inf (float32/bf16
        # values cannot overflow it), and 0 * that sum is then NaN, else 0. Measured at K = 4096
        # (2 threads): 14 / 29 / 75 us at M = 1 / 16 / 128, against 49 / 221 / 1414 us for
        # isfinite().all() + where. (The sparse op applies the same rule itself, in C++ on
        # the CPU; this serves the dense-kept formats.) Out of place: autograd may have saved y.
        return y + x.sum(-1, keepdim=True, dtype=torch.float64).mul_(0).to(y.dtype)

    def dense_weight(self) -> torch.Tensor:
        """The weight this layer computes with, as a dense float32 [N, K]."""
        raise NotImplementedError  # every format overrides it

    # -------------------------------------------------------------- building
    @classmethod
    def from_config(cls, config: Union[BlockSparseConfig, dict],
                    device: Optional[Union[str, torch.device]] = None) -> "BlockSparseLinear":
        """An empty layer of ``config`` (zero weights of the config's shapes) on ``device``
        (default CPU; meta allocates nothing), ready for ``load_state_dict``. Returns the
        subclass of ``config.format``. ``config`` may also be its ``to_dict()``."""
        config = config_from_dict(config)
        if not isinstance(config, BlockSparseConfig):
            raise TypeError(f"config must be a BlockSparseConfig, got {type(config).__name__}")
        sub = BlockSparseLinear._by_format[config.format]
        if cls is not BlockSparseLinear and not issubclass(sub, cls):
            raise TypeError(f"{cls.__name__}.from_config: config.format={config.format!r} is a {sub.__name__}")
        return sub._empty(config, torch.device(device or "cpu"))

    @classmethod
    def _empty(cls, config: BlockSparseConfig, device: torch.device) -> "BlockSparseLinear":
        raise NotImplementedError  # every format overrides it

    @classmethod
    def _from_weight(cls, config: BlockSparseConfig, w: torch.Tensor, bias: Optional[torch.Tensor],
                     device: torch.device) -> "BlockSparseLinear":
        """The layer of ``config`` holding ``w`` [N, K] (float32, CPU, zeros where pruned)."""
        raise NotImplementedError  # every format overrides it

    @staticmethod
    def check_args(in_features: int, out_features: int, block: Optional[tuple[int, int]] = None,
                   dtype: Optional[torch.dtype] = None, device: Union[str, torch.device] = "cpu",
                   dispatch: str = "auto", *, activation: Optional[str] = None,
                   probe_m: tuple[int, ...] = (1, 128)) -> tuple[int, int]:
        """Check ``from_dense``'s arguments for a layer of this shape without building it;
        return the block it would use ((64, 64) for int8, DEFAULT_BLOCK (64, 32) for None).

        Raises ValueError naming the argument and what was expected: in/out_features not
        ints >= 0; dtype not None/float32/bfloat16/int8 (float16: GPU only); block not two
        ints (bn, bk) with bn in 16, 32, 64 and bk >= 1, or not (64, 64) for int8; bf16 on
        the CPU with an odd bk; dispatch not auto/sparse/dense; activation not None/relu;
        probe_m not a non-empty tuple of ints >= 1.
        """
        for name, v in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be an int >= 0, got {v!r}")
        device = torch.device(device)
        if dtype not in (None, torch.float32, torch.int8, *_HALF):
            raise ValueError(f"dtype must be None, torch.float32, torch.int8, torch.float16 or torch.bfloat16, "
                             f"got {dtype}")
        if dtype == torch.float16 and device.type != "cuda":
            raise ValueError("dtype=torch.float16 blocks run on the GPU kernel: move the layer to a GPU first, "
                             "or use torch.float32 / torch.bfloat16 / torch.int8 on the CPU")
        if dispatch not in DISPATCH:
            raise ValueError(f"dispatch must be 'auto', 'sparse' or 'dense', got {dispatch!r}")
        if activation not in (None, "relu"):
            raise ValueError(f"activation must be None or 'relu', got {activation!r}")
        if not (isinstance(probe_m, (tuple, list)) and probe_m
                and all(isinstance(m, int) and not isinstance(m, bool) and m >= 1 for m in probe_m)):
            raise ValueError(f"probe_m must be a non-empty tuple of ints >= 1 (the batch sizes timed), got {probe_m!r}")
        if block is not None:
            if not (isinstance(block, (tuple, list)) and len(block) == 2
                    and all(isinstance(b, int) and not isinstance(b, bool) for b in block)):
                raise ValueError(f"block must be a pair of ints (bn, bk), got {block!r}")
            block = (int(block[0]), int(block[1]))
        if dtype == torch.int8:
            if block is not None and block != formats.INT8_BLOCK:
                raise ValueError(f"int8 blocks are {formats.INT8_BLOCK}, got block={block}")
            return formats.INT8_BLOCK
        block = block or formats.DEFAULT_BLOCK
        if block[0] not in FLOAT_BN or block[1] < 1:
            raise ValueError(f"block must be (bn, bk) with bn in 16, 32, 64 and bk >= 1, got block={block}")
        if dtype == torch.bfloat16 and device.type == "cpu" and block[1] % 2:
            raise ValueError(f"bfloat16 blocks pair the inputs on the CPU: block bk must be even, got block={block}")
        return block

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
        keep the faster, once per (shape, density bucket, dtype, device and kernel path,
        probe_m) in this process, see ``clear_timing_cache``; on a GPU with a 2:4-sparse
        weight and a half dtype, torch's 2:4 semi-structured kernel competes too),
        "sparse" or "dense" to force one.
        Every argument is checked (``check_args``) before anything is built. Returns the
        subclass of the chosen format, on ``linear``'s device.
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        device = linear.weight.device
        block = cls.check_args(linear.in_features, linear.out_features, block, dtype, device, dispatch,
                               activation=activation, probe_m=probe_m)
        w = linear.weight.detach().float().cpu()
        if not torch.isfinite(w).all():
            raise ValueError("linear.weight holds NaN or Inf")
        bias = None if linear.bias is None else linear.bias.detach().float().cpu()
        sparse_fmt, dense_fmt = ("bsr-int8", "dense-int8") if dtype == torch.int8 else ("bsr", "dense")
        nnzb = int(formats.block_mask(w, *block).sum())
        base = BlockSparseConfig(sparse_fmt, w.shape[1], w.shape[0], block, dtype_name(dtype), bias is not None,
                                 activation, nnzb)

        def build(fmt: str) -> BlockSparseLinear:
            cfg = BlockSparseConfig(fmt, *_fields_after_format(base))
            return BlockSparseLinear._by_format[fmt]._from_weight(cfg, w, bias, device)

        if dispatch != "auto":
            return build(sparse_fmt if dispatch == "sparse" else dense_fmt)
        half = dtype in _HALF
        two_four = half and device.type == "cuda" and is_2_4(w)
        key = _timing_key(base, device, probe_m, two_four)
        with _TIMING_LOCK:
            hit = _TIMING_CACHE.get(key)
        if hit is not None:
            keep = build(hit[0])
            keep.timings = {**hit[1], "cached": True}
            return keep
        candidates: dict[str, tuple[str, BlockSparseLinear]] = {
            "sparse": (sparse_fmt, build(sparse_fmt)), "dense": (dense_fmt, build(dense_fmt))}
        timings: dict[str, Any] = {"probe_m": list(probe_m)}
        if two_four:
            try:
                candidates["semi_structured"] = ("2:4", build("2:4"))
            except Exception as e:  # the GPU, torch build or shape does not support it: say why
                timings["semi_structured_skipped"] = f"{type(e).__name__}: {e}"
        x_dtype = dtype if half else torch.float32
        with torch.no_grad():
            for name, (_, mod) in candidates.items():
                timings[f"{name}_ms"] = sum(_median_ms(mod, torch.randn(m, w.shape[1], device=device, dtype=x_dtype))
                                            for m in probe_m)
        best = min(candidates, key=lambda n: timings[f"{n}_ms"])
        with _TIMING_LOCK:
            _TIMING_CACHE[key] = (candidates[best][0], dict(timings))
        keep = candidates[best][1]
        keep.timings = timings
        return keep

    # -------------------------------------------------------------- state dicts
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # The config must match (the tensors' shapes follow from it); a file from before
        # configs (no _extra_state) is adopted as such files always were: its block count
        # becomes this layer's. Then every tensor is checked before anything changes.
        has_config = self._check_extra_state(state_dict, prefix, missing_keys, error_msgs)
        errs = [] if has_config is None else self._prepare_load(state_dict, prefix, has_config)
        if has_config is None or errs:
            error_msgs.extend(errs)
            self._shield_children(state_dict, prefix)
            return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if not has_config:
            drop_key(missing_keys, prefix + "_extra_state")
        self._after_load()

    def _shield_children(self, state_dict: dict, prefix: str) -> None:
        # torch loads the children after this call, from this dict: on an error, give them
        # their own state back, so a failed load leaves the whole layer as it was.
        own = {prefix + k: v for k, v in self.state_dict(keep_vars=True).items()}
        for k in [k for k in state_dict if k.startswith(prefix) and "." in k[len(prefix):]]:
            if k in own:
                state_dict[k] = own[k]
            else:
                del state_dict[k]

    def _prepare_load(self, state_dict: dict, prefix: str, has_config: bool) -> list[str]:
        """Check the tensors this layer would load (errors naming the key) and put them, in
        ``state_dict``, in this device's layout; nothing of the layer changes here."""
        return []

    def _after_load(self) -> None:
        """Anything derived from the loaded tensors."""

    def _check_float(self, state_dict: dict, key: str, shape: tuple, errs: list[str], *,
                     dtypes: tuple = (torch.float32,), finite: bool = True) -> Optional[torch.Tensor]:
        """state_dict[key] if it is a tensor of ``shape`` and one of ``dtypes`` (finite if
        asked), else None with the reason appended to ``errs`` (None too if it is absent:
        torch reports missing keys)."""
        t = state_dict.get(key)
        if t is None:
            return None
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != tuple(shape) or t.dtype not in dtypes:
            want = " or ".join(str(d) for d in dtypes)
            errs.append(f"{key}: expected {want} of shape {list(shape)}, got {getattr(t, 'dtype', type(t).__name__)} "
                        f"{list(getattr(t, 'shape', ()))}")
            return None
        if finite and t.device.type != "meta" and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            errs.append(f"{key}: holds NaN or Inf")
            return None
        return t

    def extra_repr(self) -> str:
        t = ""
        if self.timings and "sparse_ms" in self.timings:
            t = f", measured sparse={self.timings['sparse_ms']:.3f}ms dense={self.timings['dense_ms']:.3f}ms"
            if self.timings.get("cached"):
                t += " (cached)"
        return (f"in_features={self.in_features}, out_features={self.out_features}, format={self.format}, "
                f"dtype={self._config.dtype}, block={self.block}, density={self.density:.3f}, "
                f"activation={self.activation}{t}")


def _fields_after_format(cfg: BlockSparseConfig) -> tuple:
    return (cfg.in_features, cfg.out_features, cfg.block, cfg.dtype, cfg.bias, cfg.activation, cfg.nnz_blocks)


def float_dtype(name: str) -> torch.dtype:
    """torch dtype of a config's float dtype name."""
    if name not in FLOAT_DTYPES:
        raise ValueError(f"expected one of {FLOAT_DTYPES}, got {name!r}")
    return getattr(torch, name)

