"""What a compacted model's file records so that ``load`` can rebuild it from a fresh instance
of the original architecture, without pickle and without running code from the file.

``pysparse.compact`` removes the channels it finds exactly zero; which ones depends on the
pruned weights, which a fresh instance does not have. So the file records, for every layer
the channel analysis looks at (Conv2d, ConvTranspose2d, Linear, BatchNorm), which of its
output channels were live (not exactly zero) in the pruned model, plus compact's options and
the example inputs' shapes. Loading gives a copy of the fresh model exactly that zero
pattern (weights 1/fan_in in live rows, 0 in the others; BatchNorm weight and bias 1 or 0),
runs ``pysparse.compact`` on it with inputs of the recorded shapes, and checks the rebuilt
graph against the saved one (a sha256 of its generated code) before the tensors load.

    {"fold_bn": bool, "channels_last": bool, "inputs": [{"shape", "dtype"}],
     "live": {layer name: {"channels": n, "kept": [sorted live output channels]}},
     "graph_sha256": hex}

``compact`` here is ``pysparse.compact`` plus that record (``gm.meta["pysparse_compact"]``);
``record`` computes it from the pruned model alone, so pysparse.compact can attach it itself.
"""
from __future__ import annotations

import copy
import hashlib
from typing import Any, Sequence, Union

import torch
from torch import fx, nn

from .._depgraph import _as_tuple, build_graph
from ..compact import compact as _compact
from ..compact._keep import channel_zeros
from ..compact._record import LAYERS, RECORD_KEY, out_channels
from ..compact._record import record as _record
from .manifest import INPUT_DTYPES, ManifestError, check_inputs, describe_inputs

_LAYERS = LAYERS
_channels = out_channels


def record(model: nn.Module, example_inputs: Union[torch.Tensor, Sequence[torch.Tensor]], *, fold_bn: bool = True,
           channels_last: bool = True, compact_conv2d: bool = True) -> dict:
    """The compaction record of a pruned model (before compaction; nothing of it changes): what
    ``pysparse.compact`` attaches to its result as ``gm.meta[RECORD_KEY]``."""
    inputs = _as_tuple(example_inputs)
    g = build_graph(model, inputs)
    with torch.no_grad():
        z = channel_zeros(g)
    return _record(g, z, inputs, fold_bn=fold_bn, channels_last=channels_last, compact_conv2d=compact_conv2d)


def compact(model: nn.Module, example_inputs: Union[torch.Tensor, Sequence[torch.Tensor]], *, fold_bn: bool = True,
            channels_last: bool = True, compact_conv2d: bool = True) -> fx.GraphModule:
    """``pysparse.compact`` (kept for code written against it: pysparse.compact now attaches the
    record ``save`` needs itself)."""
    return _compact(model, example_inputs, fold_bn=fold_bn, channels_last=channels_last, compact_conv2d=compact_conv2d)


def graph_digest(gm: fx.GraphModule) -> str:
    """sha256 of the graph's generated code (what the rebuilt model must match)."""
    return hashlib.sha256(gm.code.encode()).hexdigest()


def check_record(rec: Any) -> dict:
    """A compaction record from a file, every field checked (ManifestError names it)."""
    want = {"fold_bn", "channels_last", "compact_conv2d", "inputs", "live", "graph_sha256", "unreplayable"}
    if not isinstance(rec, dict) or set(rec) - {"fuse_residual"} != want:
        raise ManifestError(f"manifest compaction: fields must be {sorted(want)} (and optionally fuse_residual), got "
                            f"{sorted(rec) if isinstance(rec, dict) else type(rec).__name__}")
    if rec.get("fuse_residual", True) is not True:
        raise ManifestError("manifest compaction: fuse_residual, where present, must be true")
    if rec["unreplayable"] is not None:
        raise ManifestError(f"manifest compaction: layer {rec['unreplayable']!r:.80} was marked unreplayable")
    for k in ("fold_bn", "channels_last", "compact_conv2d"):
        if not isinstance(rec[k], bool):
            raise ManifestError(f"manifest compaction: {k} must be true or false")
    if check_inputs("compaction.inputs", rec["inputs"]) is None:
        raise ManifestError("manifest compaction: inputs are required (the shapes compact traced with)")
    if not isinstance(rec["graph_sha256"], str):
        raise ManifestError("manifest compaction: graph_sha256 must be a hex string")
    live = rec["live"]
    if not isinstance(live, dict):
        raise ManifestError("manifest compaction: live must be an object keyed by layer name")
    for name, e in live.items():
        where = f"manifest compaction: layer {name!r}"
        if not isinstance(e, dict) or set(e) != {"channels", "kept"}:
            raise ManifestError(f"{where}: must be {{channels, kept}}")
        n, kept = e["channels"], e["kept"]
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ManifestError(f"{where}: channels must be an int >= 1, got {n!r:.40}")
        if not isinstance(kept, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in kept):
            raise ManifestError(f"{where}: kept must be a list of channel indices")
        bad = [i for i in kept if not 0 <= i < n]
        if bad:
            raise ManifestError(f"{where}: kept channel index {bad[0]} is out of range [0, {n})")
        if any(b <= a for a, b in zip(kept, kept[1:])):
            raise ManifestError(f"{where}: kept channel indices must be sorted and distinct")
    return rec


@torch.no_grad()
def _give_zero_pattern(work: nn.Module, live: dict) -> None:
    """Set every recorded layer of ``work`` to the recorded zero pattern (the values do not
    matter: the file's tensors replace them; only which channels are exactly zero does)."""
    mods = dict(work.named_modules())
    for name, e in live.items():
        m = mods.get(name)
        if m is None:
            raise ManifestError(f"manifest compaction: layer {name!r} is not in the given model (unknown module "
                                f"name; the model has e.g. {sorted(n for n in mods if n)[:5]})")
        if not isinstance(m, _LAYERS):
            raise ManifestError(f"manifest compaction: layer {name!r} is a {type(m).__name__} in the given model, "
                                "not a Conv2d / ConvTranspose2d / Linear / BatchNorm")
        n = _channels(m)
        if n != e["channels"]:
            raise ManifestError(f"manifest compaction: layer {name!r} has {n} output channels in the given model, "
                                f"the file {e['channels']} (another architecture)")
        on = torch.zeros(n, dtype=torch.bool)
        on[torch.tensor(e["kept"], dtype=torch.long)] = True
        f = on.float()
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            if m.weight is not None:
                m.weight.copy_(f)
            if m.bias is not None:
                m.bias.copy_(f)
            if m.running_mean is not None:
                m.running_mean.copy_(-f)  # shift != 0 where live, also without an affine bias
                m.running_var.fill_(1.0)
            continue
        w = m.weight
        fan_in = max(1, w[0].numel())
        if isinstance(m, nn.ConvTranspose2d):  # weight [in, out/groups, kh, kw]
            w.copy_((f.view(1, -1, *([1] * (w.dim() - 2))) / fan_in).expand_as(w))
        else:
            w.copy_((f.view(-1, *([1] * (w.dim() - 1))) / fan_in).expand_as(w))
        if m.bias is not None:
            m.bias.copy_(f)


def rebuild(work: nn.Module, rec: dict) -> fx.GraphModule:
    """Compact ``work`` (a copy of the fresh model, changed here) as the record says."""
    _give_zero_pattern(work, rec["live"])
    inputs = tuple(torch.zeros(e["shape"], dtype=INPUT_DTYPES[e["dtype"]]) for e in rec["inputs"])
    try:
        gm = _compact(work, inputs, fold_bn=rec["fold_bn"], channels_last=rec["channels_last"], inplace=True,
                      compact_conv2d=rec["compact_conv2d"], fuse_residual=rec.get("fuse_residual", False))
    except (RuntimeError, TypeError, IndexError, AssertionError) as e:
        raise ManifestError(f"rebuilding the compacted model from the given one failed ({type(e).__name__}: "
                            f"{e}); the file's compaction does not fit this architecture") from None
    except ValueError as e:
        raise ManifestError(f"rebuilding the compacted model from the given one failed: {e}") from None
    if graph_digest(gm) != rec["graph_sha256"]:
        raise ManifestError("the compacted graph rebuilt from the given model differs from the saved one (another "
                            "architecture, or a model edited after compaction)")
    return gm


def attach_digest(rec: dict, gm: fx.GraphModule) -> dict:
    """The record with the saved graph's digest filled in (at save time)."""
    out = copy.deepcopy(rec)
    out["graph_sha256"] = graph_digest(gm)
    return out
