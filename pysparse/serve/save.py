"""pysparse.serve.save: one safetensors file with a JSON manifest (see manifest.py)."""
from __future__ import annotations

import os
import sys
import tempfile
from typing import Optional, Sequence, Union

import torch
from safetensors.torch import save_file
from torch import fx, nn

from .._depgraph import _as_tuple
from . import compaction, manifest
from .checks import tensor_digest


def _version() -> str:
    # the package root sits above serve (it may not be imported from here); it is loaded by now
    return str(getattr(sys.modules.get("pysparse"), "__version__", "unknown"))


def _structure(model: nn.Module) -> tuple[dict, dict]:
    """(modules: {name: {kind, config}} for the layers conversions put in, tree: {name: class})."""
    modules, tree = {}, {}
    inside: list[str] = []  # prefixes of recorded layers: their children are rebuilt with them
    for name, m in model.named_modules(remove_duplicate=False):
        if not name:
            continue
        tree[name] = type(m).__name__
        if any(name.startswith(p + ".") for p in inside):
            continue
        kind = manifest.kind_of(m)
        if kind is not None:
            modules[name] = {"kind": kind, "config": manifest.config_of(kind, m)}
            inside.append(name)
    return modules, tree


def save(model: nn.Module, path: Union[str, os.PathLike], *,
         example_inputs: Optional[Union[torch.Tensor, Sequence[torch.Tensor]]] = None) -> None:
    """Write ``model`` (converted by quantize_int8 / sparsify, compacted by
    ``pysparse.serve.compact``, or any mix) to one safetensors file at ``path``.

    The file holds the state dict's tensors and, as JSON in the header's ``__metadata__``, the
    manifest: which modules were replaced by which pysparse layer and their configs (shapes,
    format, block, quantization scheme), the kept channels of a compacted model with compact's
    options and input shapes, each tensor's sha256, the pysparse and format versions.
    Nothing in it is pickled: ``pysparse.serve.load`` rebuilds the model from a fresh instance
    of the architecture.

    example_inputs: optional tensors the model takes; their shapes and dtypes are recorded
    (``load_manifest(path)["inputs"]``; the example server checks requests against them).

    Written to a temporary file beside ``path`` and renamed, so a crash never leaves half a
    file. Raises ValueError for a GraphModule that carries no compaction record (one that
    ``pysparse.compact`` did not make) or for state that is neither a tensor nor plain JSON.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    rec = None
    if isinstance(model, fx.GraphModule):
        rec = model.meta.get(compaction.RECORD_KEY)
        if rec is None:
            raise ValueError("model is a torch.fx.GraphModule without a compaction record: a graph cannot be "
                             "saved without pickling code; pysparse.compact records the kept channels its "
                             "result needs to be rebuilt, other graphs cannot be saved")
        if rec.get("unreplayable"):
            raise ValueError(f"layer {rec['unreplayable']!r} of the compacted model was called more than once with "
                             "different zero channels: its compaction cannot be rebuilt from one pattern")
        rec = compaction.attach_digest(rec, model)
    inputs = manifest.describe_inputs(_as_tuple(example_inputs)) if example_inputs is not None else None
    modules, tree = _structure(model)
    state = model.state_dict()
    tensors, extra = {}, {}
    for k, v in state.items():
        if isinstance(v, torch.Tensor):
            # own, contiguous CPU copies: safetensors refuses tensors that share storage
            tensors[k] = v.detach().to("cpu").contiguous().clone()
        else:
            extra[k] = v
    try:
        manifest.dumps(extra)
    except (TypeError, ValueError) as e:
        raise ValueError(f"the state dict holds non-tensor state that is not plain JSON ({e}); only pysparse "
                         "layer configs are supported there") from None
    man = {"format": manifest.FORMAT, "format_version": manifest.FORMAT_VERSION, "pysparse_version": _version(),
           "torch_version": torch.__version__, "training": bool(model.training), "modules": modules, "tree": tree,
           "extra_state": extra, "digests": {k: tensor_digest(t) for k, t in tensors.items()}, "inputs": inputs,
           "compaction": rec}
    path = os.fspath(path)
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".pysparse-", suffix=".tmp", dir=d)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={manifest.METADATA_KEY: manifest.dumps(man)})
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
