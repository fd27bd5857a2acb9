"""pysparse.serve.load: rebuild a saved model from a fresh instance of its architecture."""
from __future__ import annotations

import copy
import os
from typing import Union

import torch
from safetensors.torch import load_file
from torch import nn

from ..nn import CompactConv2d
from . import compaction, manifest
from .checks import read_header, verify_tensors
from .manifest import ManifestError


def load_manifest(path: Union[str, os.PathLike]) -> dict:
    """The checked manifest of a pysparse file (reads the header only)."""
    path = os.fspath(path)
    return manifest.parse(read_header(path).metadata, path)


def _set(model: nn.Module, name: str, mod: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, mod)


def _replace_layers(work: nn.Module, modules: dict, header_tensors: dict) -> None:
    """Put the file's pysparse layers (empty, of their configs) where they stood; every one is
    checked against the model and the file before the first is built."""
    have = dict(work.named_modules(remove_duplicate=False))
    plan = []
    for name, e in modules.items():
        kind, cfg = e["kind"], e["config"]
        target = have.get(name)
        if target is None or not name:
            raise ManifestError(f"manifest module {name!r}: unknown module name: the given model has no such "
                                f"submodule (another architecture?)")
        why = manifest.fits(kind, cfg, target)
        if why:
            raise ManifestError(f"manifest module {name!r}: does not fit the given model: {why}")
        for key, (dt, shape) in manifest.expected_tensors(kind, cfg).items():
            t = header_tensors.get(f"{name}.{key}")
            if t is None:
                raise ManifestError(f"{name}.{key}: a {kind} of this config needs this tensor; the file lacks it")
            if t.dtype != dt or t.shape != shape:
                raise ManifestError(f"{name}.{key}: expected {dt} of shape {list(shape)} (from the layer's config), "
                                    f"the file holds {t.dtype} {list(t.shape)}")
        plan.append((name, kind, cfg, target))
    built: dict[int, nn.Module] = {}  # a module shared under several names gets one replacement
    for name, kind, cfg, target in plan:
        if id(target) not in built:
            try:
                built[id(target)] = manifest.build_layer(kind, cfg)
            except (ValueError, TypeError, RuntimeError) as e:
                raise ManifestError(f"manifest module {name!r}: cannot build a {kind} of its config ({e})") from None
        _set(work, name, built[id(target)])


def _check_state(work: nn.Module, sd: dict) -> None:
    want = work.state_dict()
    missing = sorted(k for k in want if k not in sd)
    unexpected = sorted(k for k in sd if k not in want)
    if missing or unexpected:
        raise ManifestError(f"the file's state does not fit the rebuilt model: missing {missing[:5]}"
                            f"{' ...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                            f"{' ...' if len(unexpected) > 5 else ''}")
    for k, w in want.items():
        v = sd[k]
        if isinstance(w, torch.Tensor):
            if not isinstance(v, torch.Tensor):
                raise ManifestError(f"{k}: expected a tensor, the manifest holds {type(v).__name__}")
            if v.dtype != w.dtype or v.shape != w.shape:
                raise ManifestError(f"{k}: expected {w.dtype} of shape {list(w.shape)}, the file holds {v.dtype} "
                                    f"{list(v.shape)}")
    for name, m in work.named_modules():
        if isinstance(m, CompactConv2d):  # the kernel indexes activations by these: in range, distinct
            for key, limit in (("in_idx", m.in_channels), ("out_idx", m.out_channels)):
                t = sd[f"{name}.{key}" if name else key]
                if t.numel() and (int(t.min()) < 0 or (limit is not None and int(t.max()) >= limit)):
                    raise ManifestError(f"{name}.{key}: channel index out of range [0, {limit})")
                if t.unique().numel() != t.numel():
                    raise ManifestError(f"{name}.{key}: holds a channel twice")


def load(path: Union[str, os.PathLike], model: nn.Module) -> nn.Module:
    """Load a file written by ``pysparse.serve.save`` into a copy of ``model`` and return it.

    model: a freshly built instance of the architecture that was converted and saved (its
    weights do not matter). It is never modified, on success or error: the result is a new
    model (a torch.fx.GraphModule for a compacted one), on the CPU, in the train/eval mode it
    was saved in. Layers are rebuilt from their configs and pack their weights for this
    machine's kernels as they load (a file saved under one CPU path, or from a GPU, loads on
    any other).

    Nothing from the file is executed or unpickled: the header is parsed and bounds-checked
    here first (checks.py), and only then does safetensors read the tensors; what it read is
    checked against the header and each tensor's sha256 in the manifest, every config is
    checked before its layer is built. Raises ValueError naming what is wrong: a truncated or
    corrupted file, a malformed or oversized header, offsets outside the file, unknown dtypes,
    an unknown format version or layer kind, a structure or shapes that do not fit
    ``model``, channel indices out of range.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    path = os.fspath(path)
    header = read_header(path)
    man = manifest.parse(header.metadata, path)
    # the header is checked: safetensors reads nothing out of bounds now
    try:
        sd: dict = load_file(path)
    except Exception as e:  # the checks above passed: the file changed under us, or safetensors disagrees
        raise ValueError(f"{path}: safetensors could not read the tensors ({e})") from None
    verify_tensors(path, header, sd, man["digests"])
    rec = compaction.check_record(man["compaction"]) if man["compaction"] is not None else None
    work = copy.deepcopy(model).cpu()  # built and loaded on the CPU; move the result where it runs
    if rec is not None:
        work = compaction.rebuild(work, rec)
    _replace_layers(work, man["modules"], header.tensors)
    tree = {n: type(m).__name__ for n, m in work.named_modules(remove_duplicate=False) if n}
    if tree != man["tree"]:
        diff = sorted(n for n in set(tree) | set(man["tree"]) if tree.get(n) != man["tree"].get(n))
        raise ManifestError(f"the rebuilt model's structure differs from the saved one at {diff[:5]} (model: "
                            f"{[tree.get(n) for n in diff[:5]]}, file: {[man['tree'].get(n) for n in diff[:5]]})")
    for k, v in man["extra_state"].items():
        if k in sd:
            raise ManifestError(f"{k}: both a tensor and manifest state")
        sd[k] = v
    _check_state(work, sd)
    try:
        work.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise ManifestError(f"loading the file's tensors failed: {e}") from None
    work.train(man["training"])
    return work
