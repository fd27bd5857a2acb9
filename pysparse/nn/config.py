"""Layer configs: the small, frozen description a pysparse layer is built from.

A layer's state dict is a function of its config alone (same keys, shapes and dtypes),
so a saved model is rebuilt empty from its configs (on any device, meta included) and
loaded, without re-running the choices (timing, pruning) that made it. Each layer keeps
its config in its state dict as ``<prefix>_extra_state``: a plain dict of python types
(str, int, bool, None, lists), which ``torch.load(weights_only=True)`` accepts and a
safetensors manifest can hold as JSON.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, Optional, Union

from ..formats import DEFAULT_BLOCK, INT8_BLOCK, PACK_K

CONFIG_VERSION = 1

ACTIVATIONS = ("dynamic", "static")
FORMATS = ("bsr", "bsr-int8", "dense", "dense-int8", "2:4")
FLOAT_DTYPES = ("float32", "bfloat16", "float16")
_INT8_FORMATS = ("bsr-int8", "dense-int8")


def _check_features(cls: str, in_features: Any, out_features: Any) -> None:
    for name, v in (("in_features", in_features), ("out_features", out_features)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"{cls}: {name} must be an int >= 0, got {v!r}")


@dataclass(frozen=True)
class Int8LinearConfig:
    """What an Int8Linear is: shapes, bias, weight grouping and activation scheme.

    group_size: 0 (one weight scale per output channel) or a positive multiple of 64.
    activations: "dynamic" (x quantized per row at run time) or "static" (one
    calibrated per-tensor x_scale, saved). smoothquant: the layer divides x by
    SmoothQuant factors (a saved ``smooth`` buffer [in_features]).
    """
    kind: ClassVar[str] = "Int8Linear"
    in_features: int
    out_features: int
    bias: bool = True
    group_size: int = 0
    activations: str = "dynamic"
    smoothquant: bool = False

    def __post_init__(self) -> None:
        _check_features("Int8LinearConfig", self.in_features, self.out_features)
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) \
                or self.group_size < 0 or self.group_size % PACK_K:
            raise ValueError(f"Int8LinearConfig: group_size must be 0 (per output channel) or a positive multiple "
                             f"of {PACK_K}, got {self.group_size!r}")
        if self.activations not in ACTIVATIONS:
            raise ValueError(f"Int8LinearConfig: activations must be one of {ACTIVATIONS}, got {self.activations!r}")
        for name in ("bias", "smoothquant"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"Int8LinearConfig: {name} must be a bool, got {getattr(self, name)!r}")

    def to_dict(self) -> dict:
        """The config as plain python types, with its kind and version (what state dicts hold)."""
        return {"kind": self.kind, "version": CONFIG_VERSION, **dataclasses.asdict(self)}


@dataclass(frozen=True)
class BlockSparseConfig:
    """What a BlockSparseLinear is: its storage format and everything the shapes of its
    state dict depend on.

    format: "bsr" (float blocks), "bsr-int8" (64 x 64 int8 blocks), "dense" (float
    weight kept dense: the dispatcher found it faster), "dense-int8" (an Int8Linear
    kept dense), "2:4" (torch's semi-structured sparse weight; GPU kernels).
    block: (bn, bk), the pruning block (int8: always (64, 64)). dtype: "float32",
    "bfloat16", "float16" (the blocks' or kept weight's dtype) or "int8".
    nnz_blocks: how many (bn x bk) blocks of the weight are stored (for the dense
    formats: how many of the source weight were nonzero), so density and the shapes of
    values / col_idx follow from the config.
    activation: None or "relu" (fused).
    """
    kind: ClassVar[str] = "BlockSparseLinear"
    format: str
    in_features: int
    out_features: int
    block: tuple = DEFAULT_BLOCK
    dtype: str = "float32"
    bias: bool = True
    activation: Optional[str] = None
    nnz_blocks: int = 0

    def __post_init__(self) -> None:
        _check_features("BlockSparseConfig", self.in_features, self.out_features)
        if self.format not in FORMATS:
            raise ValueError(f"BlockSparseConfig: format must be one of {FORMATS}, got {self.format!r}")
        block = tuple(self.block) if isinstance(self.block, (tuple, list)) else self.block
        if not (isinstance(block, tuple) and len(block) == 2 and all(
                isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in block)):
            raise ValueError(f"BlockSparseConfig: block must be two ints >= 1 (bn, bk), got {self.block!r}")
        object.__setattr__(self, "block", block)  # lists (from a saved dict) become the tuple
        int8 = self.format in _INT8_FORMATS
        if int8 and (self.dtype != "int8" or block != INT8_BLOCK):
            raise ValueError(f"BlockSparseConfig: format {self.format!r} needs dtype 'int8' and block {INT8_BLOCK}, "
                             f"got dtype={self.dtype!r}, block={block}")
        if not int8 and self.dtype not in FLOAT_DTYPES:
            raise ValueError(f"BlockSparseConfig: format {self.format!r} needs dtype one of {FLOAT_DTYPES}, "
                             f"got {self.dtype!r}")
        if self.format == "2:4" and self.dtype == "float32":
            raise ValueError("BlockSparseConfig: format '2:4' needs dtype 'bfloat16' or 'float16', got 'float32'")
        if self.activation not in (None, "relu"):
            raise ValueError(f"BlockSparseConfig: activation must be None or 'relu', got {self.activation!r}")
        if not isinstance(self.bias, bool):
            raise ValueError(f"BlockSparseConfig: bias must be a bool, got {self.bias!r}")
        n = self.nnz_blocks
        if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= self.grid_blocks:
            raise ValueError(f"BlockSparseConfig: nnz_blocks must be an int in [0, {self.grid_blocks}] (the "
                             f"{self.block_rows} x {self.block_cols} block grid), got {n!r}")

    @property
    def block_rows(self) -> int:
        """R = ceil(out_features / bn)."""
        return -(-self.out_features // self.block[0])

    @property
    def block_cols(self) -> int:
        """KB = ceil(in_features / bk)."""
        return -(-self.in_features // self.block[1])

    @property
    def grid_blocks(self) -> int:
        """R * KB, the blocks of the full weight."""
        return self.block_rows * self.block_cols

    @property
    def density(self) -> float:
        """Stored blocks over all blocks (1.0 for an empty grid)."""
        return self.nnz_blocks / self.grid_blocks if self.grid_blocks else 1.0

    def to_dict(self) -> dict:
        """The config as plain python types, with its kind and version (what state dicts hold)."""
        d = dataclasses.asdict(self)
        d["block"] = list(self.block)
        return {"kind": self.kind, "version": CONFIG_VERSION, **d}


LayerConfig = Union[Int8LinearConfig, BlockSparseConfig]
_KINDS = {c.kind: c for c in (Int8LinearConfig, BlockSparseConfig)}


def config_from_dict(d: dict) -> LayerConfig:
    """Rebuild a config from ``config.to_dict()`` (a layer's saved ``_extra_state``).

    Raises ValueError naming what is wrong: not a dict, an unknown kind, a newer version
    than this pysparse knows, or fields the config does not have.
    """
    if isinstance(d, (Int8LinearConfig, BlockSparseConfig)):
        return d
    if not isinstance(d, dict):
        raise ValueError(f"a layer config must be a dict from config.to_dict(), got {type(d).__name__}")
    d = dict(d)
    kind, version = d.pop("kind", None), d.pop("version", None)
    if kind not in _KINDS:
        raise ValueError(f"config kind must be one of {sorted(_KINDS)}, got {kind!r}")
    if not isinstance(version, int) or not 1 <= version <= CONFIG_VERSION:
        raise ValueError(f"config version must be an int in [1, {CONFIG_VERSION}] (this pysparse), got {version!r}")
    cls = _KINDS[kind]
    names = {f.name for f in dataclasses.fields(cls)}
    if set(d) - names:
        raise ValueError(f"{kind} config has unknown fields {sorted(set(d) - names)}")
    return cls(**d)


class ConfigState:
    """Mixin: a layer's config in its state dict (``_extra_state``) and the check that a
    loaded state dict was saved by a layer of the same config."""

    _config: Any

    @property
    def config(self) -> Any:
        """The frozen config this layer is (rebuild it with ``pysparse.nn.from_config``)."""
        return self._config

    def get_extra_state(self) -> dict:
        """The config as plain python types (``config.to_dict()``)."""
        return self._config.to_dict()

    def set_extra_state(self, state: Any) -> None:
        """Check a saved config against this layer's: a layer cannot become another kind
        by loading (its tensors' shapes follow from its config), so a mismatch raises."""
        why = self._config_mismatch(state, "_extra_state")
        if why:
            raise ValueError(why)

    def _config_mismatch(self, state: Any, key: str) -> Optional[str]:
        """None if ``state`` (a saved _extra_state) is this layer's config, else the error."""
        try:
            saved = config_from_dict(state)
        except ValueError as e:
            return f"{key}: not a pysparse layer config ({e})"
        if saved != self._config:
            diff = [f.name for f in dataclasses.fields(self._config)
                    if getattr(saved, f.name, None) != getattr(self._config, f.name)] if type(saved) is type(
                self._config) else ["kind"]
            return (f"{key}: the state dict was saved by a layer with another config (differs in {', '.join(diff)}): "
                    f"saved {saved}, this layer {self._config}; build the layer with "
                    f"pysparse.nn.from_config(saved config) to load it")
        return None

    def _check_extra_state(self, state_dict: dict, prefix: str, missing_keys: list,
                           error_msgs: list) -> Optional[bool]:
        """Before loading: True if the state dict carries this layer's config, False if it
        carries none (a file from before configs: load it the old way), None if it carries
        another (the error is in error_msgs; load nothing)."""
        key = prefix + "_extra_state"
        if key not in state_dict:
            return False
        why = self._config_mismatch(state_dict[key], key)
        if why:
            error_msgs.append(why)
            return None
        return True


def drop_key(keys: list, key: str) -> None:
    """Remove ``key`` from torch's missing/unexpected key list (a key this layer handles)."""
    while key in keys:
        keys.remove(key)
