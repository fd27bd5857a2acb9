"""The manifest: the JSON a pysparse file carries in its safetensors header (``__metadata__``
key ``"pysparse"``), and the layer specs it rebuilds layers from.

    {"format": "pysparse", "format_version": 1, "pysparse_version": "0.1.0", "torch_version": "...",
     "training": false,
     "modules": {name: {"kind": "Int8Linear" | "BlockSparseLinear" | "Int8Conv2d" | "CompactConv2d"
                                | "Identity", "config": {...}}},   # what replaced the architecture's module
     "tree": {name: class name},        # every submodule of the saved model (a check on load)
     "extra_state": {state dict key: plain value},   # the layers' configs (non-tensor state)
     "digests": {tensor name: sha256},  # every tensor's bytes
     "inputs": null | [{"shape": [...], "dtype": "float32"}],    # example inputs, if given to save
     "compaction": null | {...}}        # see compaction.py

Int8Linear and BlockSparseLinear carry their own frozen configs (pysparse.nn.config);
Int8Conv2d and CompactConv2d have none yet, so their specs (the constructor's arguments) are
written and checked here.
"""
from __future__ import annotations

import json
import math
import re
from typing import Any, Optional

import torch
from torch import nn

from ..nn import BlockSparseLinear, CompactConv2d, Int8Conv2d, Int8Linear, config_from_dict, from_config

FORMAT = "pysparse"
FORMAT_VERSION = 1
METADATA_KEY = "pysparse"
KINDS = ("Int8Linear", "BlockSparseLinear", "Int8Conv2d", "CompactConv2d", "Identity")
# A layer dimension above this is not a real model (and would ask for absurd allocations).
MAX_DIM = 1 << 20
_ACTS = (None, "relu", "relu6")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


class ManifestError(ValueError):
    """A pysparse file's manifest is malformed, of an unknown version, or does not fit."""


def kind_of(m: nn.Module) -> Optional[str]:
    """The manifest kind of a module a conversion puts in a model (None: not one)."""
    if isinstance(m, Int8Linear):
        return "Int8Linear"
    if isinstance(m, BlockSparseLinear):
        return "BlockSparseLinear"
    if isinstance(m, Int8Conv2d):
        return "Int8Conv2d"
    if isinstance(m, CompactConv2d):
        return "CompactConv2d"
    if type(m) is nn.Identity:
        return "Identity"
    return None


# ------------------------------------------------------------------ specs of the conv layers
def int8_conv2d_spec(m: Int8Conv2d) -> dict:
    return {"in_channels": m.in_channels, "out_channels": m.out_channels, "kernel_size": list(m.kernel_size),
            "stride": list(m.stride), "padding": list(m.padding), "dilation": list(m.dilation), "groups": m.groups,
            "bias": m.bias is not None, "dynamic": m.x_scale is None, "activation": m.activation,
            "int8_output": m.out_scale is not None}


def compact_conv2d_spec(m: CompactConv2d) -> dict:
    return {"kept_in": int(m.in_idx.numel()), "kept_out": int(m.out_idx.numel()), "in_channels": m.in_channels,
            "out_channels": m.out_channels, "kernel_size": list(m.kernel_size), "stride": list(m.stride),
            "padding": list(m.padding), "dilation": list(m.dilation), "relu": m.relu, "bias": m.bias is not None}


def _int(where: str, d: dict, key: str, lo: int, hi: int = MAX_DIM, none_ok: bool = False) -> Optional[int]:
    v = d.get(key)
    if v is None and none_ok:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise ManifestError(f"{where}: {key} must be an int in [{lo}, {hi}], got {v!r:.80}")
    return v


def _pair(where: str, d: dict, key: str, lo: int) -> tuple[int, int]:
    v = d.get(key)
    if not (isinstance(v, list) and len(v) == 2 and all(
            isinstance(i, int) and not isinstance(i, bool) and lo <= i <= 4096 for i in v)):
        raise ManifestError(f"{where}: {key} must be two ints in [{lo}, 4096], got {v!r:.80}")
    return v[0], v[1]


def _bool(where: str, d: dict, key: str) -> bool:
    v = d.get(key)
    if not isinstance(v, bool):
        raise ManifestError(f"{where}: {key} must be true or false, got {v!r:.80}")
    return v


def _fields(where: str, d: Any, names: set) -> dict:
    if not isinstance(d, dict):
        raise ManifestError(f"{where}: the config must be an object, got {type(d).__name__}")
    if set(d) != names:
        raise ManifestError(f"{where}: config fields must be {sorted(names)}, got {sorted(d)}")
    return d


_CONV_FIELDS = {"in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups", "bias",
                "dynamic", "activation", "int8_output"}
_COMPACT_FIELDS = {"kept_in", "kept_out", "in_channels", "out_channels", "kernel_size", "stride", "padding",
                   "dilation", "relu", "bias"}


def check_config(where: str, kind: str, cfg: Any) -> Any:
    """The checked config of a manifest entry (a pysparse.nn config object, or the spec dict)."""
    if kind in ("Int8Linear", "BlockSparseLinear"):
        try:
            c = config_from_dict(cfg)
        except (ValueError, TypeError) as e:
            raise ManifestError(f"{where}: {e}") from None
        if c.kind != kind:
            raise ManifestError(f"{where}: kind {kind!r} with a {c.kind} config")
        if max(c.in_features, c.out_features) > MAX_DIM:
            raise ManifestError(f"{where}: features above {MAX_DIM}")
        return c
    if kind == "Int8Conv2d":
        d = _fields(where, cfg, _CONV_FIELDS)
        cin, cout = _int(where, d, "in_channels", 1), _int(where, d, "out_channels", 1)
        g = _int(where, d, "groups", 1)
        if cin % g or cout % g:
            raise ManifestError(f"{where}: groups={g} must divide in_channels={cin} and out_channels={cout}")
        _pair(where, d, "kernel_size", 1), _pair(where, d, "stride", 1), _pair(where, d, "padding", 0)
        _pair(where, d, "dilation", 1)
        for k in ("bias", "dynamic", "int8_output"):
            _bool(where, d, k)
        if d["activation"] not in _ACTS:
            raise ManifestError(f"{where}: activation must be one of {_ACTS}, got {d['activation']!r:.40}")
        return d
    if kind == "CompactConv2d":
        d = _fields(where, cfg, _COMPACT_FIELDS)
        cout = _int(where, d, "out_channels", 1)
        cin = _int(where, d, "in_channels", 1, none_ok=True)
        _int(where, d, "kept_in", 1, cin if cin is not None else MAX_DIM)
        _int(where, d, "kept_out", 1, cout)
        _pair(where, d, "kernel_size", 1), _pair(where, d, "stride", 1), _pair(where, d, "padding", 0)
        _pair(where, d, "dilation", 1)
        _bool(where, d, "relu"), _bool(where, d, "bias")
        return d
    if kind == "Identity":
        if cfg not in (None, {}):
            raise ManifestError(f"{where}: an Identity has no config, got {cfg!r:.80}")
        return None
    raise ManifestError(f"{where}: unknown layer kind {kind!r} (this pysparse knows {list(KINDS)})")


def expected_tensors(kind: str, cfg: Any) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """{state dict key (relative to the layer): (dtype, shape)} that a layer of this config
    holds, computed without allocating it (so a hostile config is refused before it asks for
    memory the file does not back)."""
    if kind in ("Int8Linear", "BlockSparseLinear"):
        meta = from_config(cfg, device="meta")
        return {k: (v.dtype, tuple(v.shape)) for k, v in meta.state_dict().items() if isinstance(v, torch.Tensor)}
    if kind == "Int8Conv2d":
        co, ci, g = cfg["out_channels"], cfg["in_channels"], cfg["groups"]
        kh, kw = cfg["kernel_size"]
        out = {"weight_int8": (torch.int8, (co, ci // g, kh, kw)), "weight_scale": (torch.float32, (co,))}
        if cfg["bias"]:
            out["bias"] = (torch.float32, (co,))
        if not cfg["dynamic"]:
            out["x_scale"] = (torch.float32, (1,))
        if cfg["int8_output"]:
            out["out_scale"] = (torch.float32, (1,))
        return out
    if kind == "CompactConv2d":
        ko, ki = cfg["kept_out"], cfg["kept_in"]
        kh, kw = cfg["kernel_size"]
        out = {"weight": (torch.float32, (-(-ko // 16), kh, kw, ki, 16)), "in_idx": (torch.int64, (ki,)),
               "out_idx": (torch.int64, (ko,))}
        if cfg["bias"]:
            out["bias"] = (torch.float32, (ko,))
        return out
    return {}


def build_layer(kind: str, cfg: Any) -> nn.Module:
    """An empty layer of a checked config, on the CPU, ready for load_state_dict."""
    if kind in ("Int8Linear", "BlockSparseLinear"):
        return from_config(cfg)
    if kind == "Int8Conv2d":
        return Int8Conv2d(cfg["in_channels"], cfg["out_channels"], tuple(cfg["kernel_size"]), tuple(cfg["stride"]),
                          tuple(cfg["padding"]), tuple(cfg["dilation"]), cfg["groups"], cfg["bias"],
                          dynamic=cfg["dynamic"], activation=cfg["activation"], int8_output=cfg["int8_output"])
    if kind == "CompactConv2d":
        ko, ki = cfg["kept_out"], cfg["kept_in"]
        w = torch.zeros(ko, ki, *cfg["kernel_size"])
        return CompactConv2d(w, torch.zeros(ko) if cfg["bias"] else None, torch.arange(ki), torch.arange(ko),
                             cfg["out_channels"], in_channels=cfg["in_channels"], stride=tuple(cfg["stride"]),
                             padding=tuple(cfg["padding"]), dilation=tuple(cfg["dilation"]), relu=cfg["relu"])
    return nn.Identity()


def config_of(kind: str, m: nn.Module) -> Any:
    """The JSON config of a layer of ``kind`` (None for Identity)."""
    if kind in ("Int8Linear", "BlockSparseLinear"):
        return m.config.to_dict()
    if kind == "Int8Conv2d":
        return int8_conv2d_spec(m)
    if kind == "CompactConv2d":
        return compact_conv2d_spec(m)
    return None


def fits(kind: str, cfg: Any, target: nn.Module) -> Optional[str]:
    """None if a layer of this config can stand where ``target`` (the given architecture's
    module, after compaction where there was one) stands; else why not."""
    if kind == "Identity":
        return None
    if kind in ("Int8Linear", "BlockSparseLinear"):
        if not isinstance(target, (nn.Linear, Int8Linear, BlockSparseLinear)):
            return f"the model has a {type(target).__name__} there, the file a {kind} (which replaces an nn.Linear)"
        have = (target.in_features, target.out_features)
        want = (cfg.in_features, cfg.out_features)
        if have != want:
            return f"the model's layer is {have[0]} -> {have[1]} features, the file's {want[0]} -> {want[1]}"
        return None
    if not isinstance(target, (nn.Conv2d, Int8Conv2d, CompactConv2d)):
        return f"the model has a {type(target).__name__} there, the file a {kind} (which replaces an nn.Conv2d)"
    tin = getattr(target, "in_channels", None)
    if kind == "Int8Conv2d":
        have = (tin, target.out_channels, tuple(target.kernel_size), tuple(target.stride),
                getattr(target, "groups", 1))
        want = (cfg["in_channels"], cfg["out_channels"], tuple(cfg["kernel_size"]), tuple(cfg["stride"]),
                cfg["groups"])
        names = "(in, out, kernel, stride, groups)"
    else:
        have = (tin, target.out_channels, tuple(target.kernel_size), tuple(target.stride))
        want = (cfg["in_channels"] if cfg["in_channels"] is not None else tin, cfg["out_channels"],
                tuple(cfg["kernel_size"]), tuple(cfg["stride"]))
        names = "(in, out, kernel, stride)"
    if have != want:
        return f"the model's conv is {names} = {have}, the file's {want}"
    return None


# ------------------------------------------------------------------ the manifest as a whole
def dumps(manifest: dict) -> str:
    return json.dumps(manifest, separators=(",", ":"), sort_keys=True, allow_nan=False)


def _str_map(where: str, d: Any, check_value) -> dict:
    if not isinstance(d, dict) or not all(isinstance(k, str) for k in d):
        raise ManifestError(f"manifest: {where} must be an object keyed by name")
    for k, v in d.items():
        check_value(k, v)
    return d


def check_inputs(where: str, inputs: Any, max_numel: int = 1 << 24) -> Optional[list]:
    """[{"shape": [...], "dtype": name}] checked: torch dtypes by name, small enough to build."""
    if inputs is None:
        return None
    if not isinstance(inputs, list) or not 1 <= len(inputs) <= 16:
        raise ManifestError(f"manifest: {where} must be a list of 1 to 16 inputs, got {inputs!r:.80}")
    total = 0
    for i, e in enumerate(inputs):
        if not isinstance(e, dict) or set(e) != {"shape", "dtype"}:
            raise ManifestError(f"manifest: {where}[{i}] must be {{shape, dtype}}, got {e!r:.80}")
        s = e["shape"]
        if not isinstance(s, list) or len(s) > 8 or not all(
                isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= MAX_DIM for v in s):
            raise ManifestError(f"manifest: {where}[{i}].shape must be at most 8 ints in [0, {MAX_DIM}], "
                                f"got {s!r:.80}")
        if e["dtype"] not in INPUT_DTYPES:
            raise ManifestError(f"manifest: {where}[{i}].dtype must be one of {sorted(INPUT_DTYPES)}, "
                                f"got {e['dtype']!r:.40}")
        total += math.prod(s)
    if total > max_numel:
        raise ManifestError(f"manifest: {where} hold {total} elements, above the {max_numel} limit")
    return inputs


INPUT_DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
                "bfloat16": torch.bfloat16, "int64": torch.int64, "int32": torch.int32, "int8": torch.int8,
                "uint8": torch.uint8, "bool": torch.bool}


def describe_inputs(inputs: tuple) -> list:
    names = {v: k for k, v in INPUT_DTYPES.items()}
    out = []
    for t in inputs:
        if not isinstance(t, torch.Tensor) or t.dtype not in names:
            raise TypeError(f"example_inputs must be tensors of dtypes {sorted(INPUT_DTYPES)}, got "
                            f"{getattr(t, 'dtype', type(t).__name__)}")
        out.append({"shape": list(t.shape), "dtype": names[t.dtype]})
    return out


def parse(metadata: dict[str, str], path: str) -> dict:
    """The manifest of a file's ``__metadata__``, every field checked (ManifestError names the
    field). Layer configs come back checked (``modules[name]["config"]``)."""
    raw = metadata.get(METADATA_KEY)
    if raw is None:
        raise ManifestError(f"{path}: a safetensors file without a pysparse manifest (no __metadata__ "
                            f"{METADATA_KEY!r}); save it with pysparse.serve.save")
    try:
        m = json.loads(raw)
    except ValueError as e:
        raise ManifestError(f"{path}: the manifest is not JSON ({e})") from None
    if not isinstance(m, dict):
        raise ManifestError(f"{path}: the manifest must be a JSON object, got {type(m).__name__}")
    if m.get("format") != FORMAT:
        raise ManifestError(f"{path}: manifest format must be {FORMAT!r}, got {m.get('format')!r:.40}")
    v = m.get("format_version")
    if v != FORMAT_VERSION:
        raise ManifestError(f"{path}: unknown format version {v!r:.40}: this pysparse reads version "
                            f"{FORMAT_VERSION} (a file from a newer pysparse needs that pysparse to load)")
    want = {"format", "format_version", "pysparse_version", "torch_version", "training", "modules", "tree",
            "extra_state", "digests", "inputs", "compaction"}
    if set(m) != want:
        raise ManifestError(f"{path}: manifest fields must be {sorted(want)}; missing {sorted(want - set(m))}, "
                            f"unknown {sorted(set(m) - want)}")
    if not isinstance(m["training"], bool):
        raise ManifestError(f"{path}: manifest training must be true or false")

    def mod_entry(name, e):
        where = f"manifest module {name!r}"
        if not isinstance(e, dict) or set(e) != {"kind", "config"}:
            raise ManifestError(f"{where}: must be {{kind, config}}, got {e!r:.80}")
        e["config"] = check_config(where, e["kind"], e["config"])

    _str_map("modules", m["modules"], mod_entry)

    def str_value(k, v):
        if not isinstance(v, str):
            raise ManifestError(f"manifest tree: {k!r} must name a class, got {v!r:.40}")

    _str_map("tree", m["tree"], str_value)

    def digest(k, v):
        if not isinstance(v, str) or not _HEX64.match(v):
            raise ManifestError(f"manifest digests: {k!r} must be a sha256 hex digest, got {v!r:.80}")

    _str_map("digests", m["digests"], digest)
    _str_map("extra_state", m["extra_state"], lambda k, v: None)
    m["inputs"] = check_inputs("inputs", m["inputs"])
    if m["compaction"] is not None and not isinstance(m["compaction"], dict):
        raise ManifestError(f"{path}: manifest compaction must be null or an object")
    return m
