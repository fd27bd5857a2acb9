"""What ``pysparse.serve.save`` needs to rebuild a compacted model from a fresh instance of the
original architecture: for every layer the channel analysis looks at (Conv2d, ConvTranspose2d,
Linear, BatchNorm), which output channels were live (not exactly zero) in the pruned model, plus
compact's options and the example inputs' shapes. ``compact`` attaches it to its result as
``gm.meta[RECORD_KEY]``; pysparse/serve/compaction.py reads, checks and replays it."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .._depgraph import ChannelGraph

RECORD_KEY = "pysparse_compact"
LAYERS = (nn.Conv2d, nn.ConvTranspose2d, nn.Linear, nn.modules.batchnorm._BatchNorm)
def out_channels(m: nn.Module) -> int:
    """The output channels (features) of a recorded layer."""
    if isinstance(m, nn.Linear):
        return m.out_features
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        return m.num_features
    return m.out_channels


def _inputs(inputs: tuple) -> list[dict[str, Any]]:
    # plain names ("float32"); pysparse.serve checks them against what it can rebuild
    return [{"shape": [int(v) for v in t.shape], "dtype": str(t.dtype).replace("torch.", "")} for t in inputs]


def record(g: ChannelGraph, zeros: dict, inputs: tuple, *, fold_bn: bool, channels_last: bool,
           compact_conv2d: bool, fuse_residual: bool = False) -> dict:
    """The compaction record of the traced, pruned model ``g`` with its exactly-zero channels
    ``zeros`` (computed before anything changes). A layer called more than once with different
    zero channels cannot be replayed from one pattern: it is left out and the record marked
    ``replayable: False`` (save then refuses the model, naming the layer)."""
    live, unreplayable = {}, None
    for name, calls in g.calls.items():
        mod = g.modules[name]
        if not isinstance(mod, LAYERS):
            continue
        pats = [p for p in (zeros.get(n) for n in calls) if isinstance(p, torch.Tensor)]
        if not pats:
            continue
        if any(not torch.equal(p, pats[0]) for p in pats[1:]):
            unreplayable = unreplayable or name
            continue
        live[name] = {"channels": int(pats[0].numel()), "kept": (~pats[0]).nonzero().flatten().tolist()}
    rec = {"fold_bn": bool(fold_bn), "channels_last": bool(channels_last), "compact_conv2d": bool(compact_conv2d),
           "inputs": _inputs(inputs), "live": live, "graph_sha256": None, "unreplayable": unreplayable}
    if fuse_residual:  # only when set: files written before the option existed stay as they were
        rec["fuse_residual"] = True
    return rec
