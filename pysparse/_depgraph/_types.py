"""The graph's data: the public ChannelGroup / ChannelSlice, errors, and the internal layouts
(a tensor's channel dim as segments of producer "spaces")."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import fx


class ChannelGraphError(ValueError):
    """The model has an operation whose channels the dependency graph cannot follow, or the
    example inputs do not fit the model."""


class NotTraceableError(ChannelGraphError):
    """torch.fx could not trace the model."""


@dataclass(frozen=True)
class ChannelSlice:
    """Where a run of a group's channels sits in one layer.

    module: the layer's qualified name (as in ``model.named_modules()``).
    role: "out" (output channels: conv weight rows / Linear rows and the bias), "in" (input
      channels of a conv, input features of a Linear), or "bn" (BatchNorm entries).
    start: the layer's first channel (for "in" of a Linear: its first input feature).
    group_start: the group's channel that sits at ``start``; the slice covers ``length``
      channels from there, in order.
    spatial: "in" only: features per channel (``H*W`` when a map was flattened into a Linear;
      channel ``group_start + i`` owns features ``start + i*spatial ... + spatial - 1``).
    """

    module: str
    role: str
    start: int
    group_start: int
    length: int
    spatial: int = 1


@dataclass
class ChannelGroup:
    """A set of ``channels`` coupled channels (see the module docstring).

    producers: layers whose output channels these are (a depthwise conv is also a consumer).
    consumers: layers whose input channels/features read them.
    bns: BatchNorm layers normalizing them (possibly together with other groups' channels,
      after a torch.cat: see ``slices`` for the offsets).
    slices: exactly where each channel sits in each of those layers.
    prunable: False for the model's output channels and a few other cases; ``reason`` says why.
    divisions: prune the same number of channels in each of this many equal contiguous
      blocks (grouped convolutions); 1 when unconstrained.
    """

    channels: int
    producers: list[str]
    consumers: list[str]
    bns: list[str]
    slices: list[ChannelSlice]
    prunable: bool
    reason: str = ""
    divisions: int = 1


# ---------------------------------------------------------------------------------------------
# internal representation: a tensor's channel dim is a list of segments of "spaces"; a space is
# the output channels of one producer (or the model input). Coupled spaces are merged (union-find)
# with the identity index map, so a group's channel c is channel c of each of its spaces.

@dataclass(frozen=True)
class _Seg:
    space: int
    start: int
    length: int
    spatial: int = 1


@dataclass(frozen=True)
class _Layout:
    segs: tuple[_Seg, ...]
    cdim: int  # the channel dim of the tensor (non-negative)
    ndim: int

    @property
    def channels(self) -> int:
        return sum(s.length for s in self.segs)

    @property
    def features(self) -> int:
        return sum(s.length * s.spatial for s in self.segs)


@dataclass
class _Space:
    size: int
    producer: bool = False  # a layer's output channels (else the model input)


@dataclass
class NodeInfo:
    """What the graph knows of one fx node. ``op`` is the rule by which a channel that is
    exactly zero on the inputs is zero on the output (used by compaction):
    "input" never zero; "opaque" no channels; "module" a producer or BatchNorm (see module);
    "keep" zero where the input is; "nonzero" never zero; "and" / "or" zero where all / any
    channel inputs are; "cat" / "split" / "item" along channels."""

    op: str
    layout: Any = None  # _Layout, a tuple of _Layout (split), or None
    inputs: tuple = ()  # the fx nodes whose channels this op reads (in order)
    module: str = ""
    extra: dict = field(default_factory=dict)


def _what(node: fx.Node) -> str:
    if node.op == "call_module":
        return f"module {node.target!r}"
    if node.op == "call_method":
        return f"method .{node.target}()"
    if node.op == "call_function":
        return f"function {getattr(node.target, '__module__', '') or ''}.{getattr(node.target, '__name__', node.target)}"
    return node.op


def _where(node: fx.Node) -> str:
    scope = node.meta.get("pysparse_scope", "")
    layer = node.target if node.op == "call_module" else (scope or "<the model's own forward>")
    return f"node '{node.name}' ({_what(node)}) in layer '{layer}'"
