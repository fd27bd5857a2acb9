"""The channel dependency graph: which channels of which layers must be pruned together.

``channel_groups(model, example_inputs)`` traces the model with torch.fx, runs it once on
``example_inputs`` for the shapes, and follows every tensor's channel dimension through the
graph. Each group is a set of coupled channels: the layers whose output channels they are
(producers), the layers that read them (consumers), and the BatchNorms in between. Removing
channel ``c`` of a group means removing row ``c`` of every producer, entry ``c`` of every
BatchNorm and input ``c`` of every consumer, all at once.

What couples channels:
- a residual sum (``+``, ``torch.add``, ``-``) or an element-wise product of two channel
  tensors: every member shares one channel set (an SE block's ``x * scale`` too). The members
  may be concatenations or split pieces: channel i of one is channel i of the other, so a
  layer added to ``cat([a, b])`` has its first rows in a's group and the rest in b's, and a
  layer's two halves added together make one group of half the size;
- a depthwise conv (``groups == in_channels == out_channels``): its input and output channel
  ``c`` are one channel, so it is both a producer and a consumer of its input's group;
- a module called more than once: every call site shares its channels.

What the graph follows (anything else that touches a channel tensor is an error naming the
node and the layer, never an IndexError later):
- producers: Conv2d (grouped and depthwise too), ConvTranspose2d (groups=1), Linear;
- pass-through: BatchNorm1d/2d, activations (ReLU, ReLU6, Hardtanh, LeakyReLU, ELU, GELU,
  SiLU, Mish, Hardswish, Tanh, Sigmoid, Hardsigmoid; modules, functions and methods), pooling
  (max, avg, adaptive), Upsample/interpolate, dropout, Identity, contiguous/clone, indexing
  that keeps the channel dim whole, mean/sum/amax/amin over non-channel dims, transposes
  that leave the channel dim in place;
- flatten and flattening view/reshape: each channel then owns ``H*W`` consecutive features of
  the next Linear (``ChannelSlice.spatial``);
- torch.cat along channels (each input keeps its own group, at an offset), split/chunk along
  channels (each piece is a range of its input's groups);
- multiplication or division by a number, adding a number.

Grouped convolutions (1 < groups, not depthwise) split their input and output channels
into ``groups`` contiguous blocks, and the compacted conv must stay a grouped conv with
equal blocks, so a group that feeds or comes from one carries ``divisions``: it may only be
pruned by the same number of channels in each of its ``divisions`` equal contiguous
blocks. A depthwise conv with a channel multiplier (``out_channels = m * in_channels``,
``m > 1``) fixes its input's channels (each input channel owns m outputs).

The model's input channels are never a group; the model's output channels, and channels
that broadcast over a channel dim of size 1, are groups with ``prunable=False`` and a
``reason``.
"""
from __future__ import annotations

from typing import Sequence, Union

import torch
from torch import nn

from ._graph import ChannelGraph
from ._ops import build_graph
from ._trace import _as_tuple, _shape_of, trace
from ._types import ChannelGraphError, ChannelGroup, ChannelSlice, NodeInfo, NotTraceableError, _Layout, _Seg

__all__ = ["ChannelGroup", "ChannelSlice", "ChannelGraphError", "NotTraceableError", "channel_groups", "build_graph",
           "ChannelGraph", "trace"]


def channel_groups(model: nn.Module, example_inputs: Union[torch.Tensor, Sequence[torch.Tensor]]) -> list[ChannelGroup]:
    """The groups of coupled channels of ``model`` (see this module's docstring).

    model: any nn.Module that torch.fx can trace; it is not changed (it is run once on
      ``example_inputs`` in eval mode without gradients, and its train/eval flags restored).
    example_inputs: a tensor or tuple of tensors the model's forward takes (a batch of one is
      enough); the shapes fix the flatten sizes.
    Returns one ChannelGroup per set of coupled channels, in graph order; the model's input
    channels are not a group.
    Raises NotTraceableError naming the module that did not trace, ChannelGraphError for an
    operation the graph cannot follow (naming the node and the layer) or example_inputs that do
    not fit the model, TypeError for inputs that are not tensors.
    """
    return build_graph(model, example_inputs).groups
