"""Compaction: physically remove the channels a pruned model computes as exactly zero.

``pysparse.compact(model, example_inputs)`` traces the model (torch.fx), builds its channel
dependency graph (``pysparse._depgraph``), finds in each group of coupled channels the ones
that are exactly zero wherever they are read, and slices them out of every layer: Conv2d
(output rows, input channels; grouped and depthwise convs keep equal groups), ConvTranspose2d,
BatchNorm (weight, bias, running statistics), Linear (output rows; input features, ``H*W`` per
channel after a flatten), and the split sizes and reshapes that name channel counts. The result
computes what the pruned model computes, with fewer MACs and values.

A channel is removable when its value is exactly 0 for every input: every producer's effective
weight row (read through ``.weight``, so torch.nn.utils.parametrize masks count) and bias are
zero, and each BatchNorm on the way has weight and bias zero there (``pysparse.prune.filters``
masks all of these). Where the members of one residual sum have different zero channels (masks
a user made by hand), compaction keeps the union of their live channels for the sum, and each
member Conv2d with fewer live channels of its own becomes a ``pysparse.nn.CompactConv2d`` that
computes only those and writes zeros in the rest (``_partial``; the sum's add and a ReLU after it
fused into its epilogue where the graph is exactly conv -> add -> relu). A group that feeds or
comes from a grouped conv keeps the same number of channels in each conv group.
"""
from __future__ import annotations

import copy
from typing import Sequence, Union

import torch
from torch import fx, nn
from torch.nn.utils import parametrize

from .._depgraph import (ChannelGraph, ChannelGraphError, ChannelGroup, NotTraceableError, _as_tuple, _shape_of,
                         build_graph, channel_groups)
from ._fold import fold_batchnorm, to_channels_last, use_packed_conv2d
from ._keep import channel_zeros, keep_sets
from ._partial import live_outputs, use_compact_conv2d, use_residual_fusion
from ._record import RECORD_KEY, record
from ._slice import apply, plan, rewrite

__all__ = ["compact", "channel_groups", "ChannelGroup", "ChannelGraphError", "NotTraceableError"]


def _remove_parametrizations(model: nn.Module) -> None:
    for m in list(model.modules()):
        if parametrize.is_parametrized(m):
            # remove_parametrizations deletes the property from the module's generated class,
            # and a deep copy shares that class with the original: removing it here would break
            # the user's model (AttributeError: no attribute 'weight'). Give this module its own.
            cls = type(m)
            m.__class__ = type(cls.__name__, cls.__bases__, dict(cls.__dict__))
            for name in list(m.parametrizations.keys()):
                # leave_parametrized: the plain parameter keeps the masked values
                parametrize.remove_parametrizations(m, name, leave_parametrized=True)


def compact(model: nn.Module, example_inputs: Union[torch.Tensor, Sequence[torch.Tensor]], *, fold_bn: bool = True,
            channels_last: bool = True, inplace: bool = False, compact_conv2d: bool = True,
            prepack: bool = True, fuse_residual: bool = False) -> fx.GraphModule:
    """A copy of ``model`` with its exactly-zero channels physically removed.

    model: a pruned model (masks through torch.nn.utils.parametrize, or weights zeroed in
      place) that torch.fx can trace.
    example_inputs: a tensor or tuple of tensors for the model's forward (one small batch; the
      shapes fix the flatten sizes, and the compacted model expects the same spatial size where
      a map is flattened into a Linear).
    fold_bn: fold each BatchNorm into the conv/Linear before it (where that layer feeds only the
      BatchNorm). Keep False to fine-tune the compacted model with its BatchNorms.
    channels_last: put 4-D weights and the model's 4-D inputs in channels_last.
    inplace: work on ``model`` itself instead of a deep copy (its layers are sliced and its
      parametrizations removed). Everything is checked before the first change, but the model's
      layers are shared with the result.
    compact_conv2d: where the members of one residual sum (or product) keep the union of
      their live channels, a member Conv2d (groups=1, float32) with fewer live channels of
      its own becomes a pysparse.nn.CompactConv2d that computes only those (zeros in the
      rest), the sum's add and a ReLU after it fused in where the graph is exactly
      conv -> add -> relu. It pays when its live channels fill fewer 16-channel panels than
      the union has channels. CompactConv2d is inference only, so where one is placed the
      result's parameters are frozen (requires_grad=False; with ``inplace``, the shared layers'
      too); keep False to fine-tune it.
    prepack: with channels_last, make each remaining plain Conv2d a pysparse.nn.PackedConv2d, which reorders its
      weight once into oneDNN's blocked layout for CPU fp32 inference instead of on every call
      (the same results; 1.05x-1.2x faster on a compacted ResNet-50 at batch 1). It falls back to
      the plain convolution wherever the packed path does not apply (gradients, other devices and
      dtypes, torch.compile), so it never stops fine-tuning; saved files do not record it (it
      changes no result) and ``pysparse.load`` rebuilds prepacked layers.
    fuse_residual: for inference, with channels_last: every remaining plain Conv2d (groups=1,
      float32) whose output is one operand of a residual add becomes a pysparse.nn.CompactConv2d
      over all its channels with the add and a ReLU after it fused into its epilogue (one write
      of the sum instead of three passes; a compacted ResNet-50 1.05x-1.08x faster). Freezes the
      result's parameters, as CompactConv2d does (keep False to fine-tune or quantize to int8:
      quantize_int8 converts nn.Conv2d layers, not CompactConv2d).

    Returns an eval-mode torch.fx.GraphModule whose outputs equal ``model``'s in eval mode (up to
    float rounding: BatchNorm folding reorders the arithmetic). Without ``inplace`` the input
    model is never modified.

    Raises NotTraceableError (the module that did not trace), ChannelGraphError (an operation
    whose channels cannot be followed, naming the node and the layer, or example_inputs that do
    not fit the model), TypeError (a model or inputs of the wrong kind).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    inputs = _as_tuple(example_inputs)
    work = model if inplace else copy.deepcopy(model)
    g = build_graph(work, inputs)  # traces and runs once: every error the user can cause is raised here
    ref_shape = _shape_of_output(g)
    with torch.no_grad():
        zeros = channel_zeros(g)
        keep = keep_sets(g, zeros)
        planned = plan(g, keep)
        live = live_outputs(g, zeros, keep) if compact_conv2d else {}
        rec = record(g, zeros, inputs, fold_bn=fold_bn, channels_last=channels_last, compact_conv2d=compact_conv2d,
                     fuse_residual=fuse_residual and channels_last)
    # -- from here on the (copied) model changes
    _remove_parametrizations(work)
    apply(g, planned)
    rewrite(g, keep)
    gm = g.gm
    gm.eval()
    if fold_bn:
        fold_batchnorm(gm)
    if channels_last:
        to_channels_last(gm)
    if live:
        with torch.no_grad():
            use_compact_conv2d(gm, live)
    if fuse_residual and channels_last:
        with torch.no_grad():
            use_residual_fusion(gm)
    if prepack and channels_last:
        use_packed_conv2d(gm)  # packs on the shape check's call below, for the example inputs' shapes
    with torch.no_grad():
        got = _shape_of(gm(*inputs))
    if got != ref_shape:  # a bookkeeping bug must never hand back a wrong model silently
        raise AssertionError(f"pysparse internal: the compacted model returns shape {got}, the model {ref_shape}")
    gm.meta[RECORD_KEY] = rec  # what pysparse.serve.save records to rebuild it from a fresh model
    return gm


def _shape_of_output(g: ChannelGraph):
    out = next(n for n in g.gm.graph.nodes if n.op == "output")
    return out.meta.get("pysparse_shape")
