"""The channel dependency graph (pysparse._depgraph): the groups each zoo architecture must
have, and clear errors for what it cannot follow."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from . import zoo
from pysparse._depgraph import ChannelGraphError, ChannelSlice, NotTraceableError, channel_groups


def _groups(name):
    m = zoo.make(name)
    return m, channel_groups(m, torch.randn(zoo.IMAGE))


def _group_of(groups, producer):
    found = [g for g in groups if producer in g.producers]
    assert len(found) == 1, (producer, found)
    return found[0]


def test_resnet_basic_residual_stage_is_one_group():
    _, groups = _groups("resnet_basic")
    stage1 = _group_of(groups, "conv1")
    # the stem and both blocks' last convs add into one residual stream
    assert stage1.producers == ["conv1", "layer1.0.conv2", "layer1.1.conv2"]
    assert stage1.bns == ["bn1", "layer1.0.bn2", "layer1.1.bn2"]
    assert set(stage1.consumers) == {"layer1.0.conv1", "layer1.1.conv1", "layer2.0.conv1", "layer2.0.downsample.0"}
    stage2 = _group_of(groups, "layer2.0.downsample.0")
    assert set(stage2.producers) == {"layer2.0.downsample.0", "layer2.0.conv2"}
    inner = _group_of(groups, "layer1.0.conv1")
    assert (inner.producers, inner.consumers, inner.channels) == (["layer1.0.conv1"], ["layer1.0.conv2"], 8)
    assert all(g.prunable for g in groups if "fc" not in g.producers)
    head = _group_of(groups, "fc")
    assert not head.prunable and "output" in head.reason
    # fc reads the last stage after global pooling: one feature per channel
    last = _group_of(groups, "layer3.0.conv2")
    assert ChannelSlice("fc", "in", 0, 0, 32, 1) in last.slices
    # 8 groups: 3 stages, 4 block-internal, the head
    assert len(groups) == 8


def test_bottleneck_stage_with_downsample():
    _, groups = _groups("resnet_bottleneck")
    stage = _group_of(groups, "layer2.0.conv3")
    assert set(stage.producers) == {"layer2.0.conv3", "layer2.0.downsample.0", "layer2.1.conv3"}
    assert stage.channels == 64


def test_grouped_conv_divisions():
    _, groups = _groups("resnext")
    # conv1's output feeds a groups=4 conv, conv2's output comes from one: 4 equal blocks
    assert _group_of(groups, "layer1.0.conv1").divisions == 4
    assert _group_of(groups, "layer1.0.conv2").divisions == 4
    assert _group_of(groups, "layer1.0.conv3").divisions == 1


def test_depthwise_couples_in_and_out():
    _, groups = _groups("mobilenet_v2")
    g = _group_of(groups, "features.2.conv.0.0")  # the 1x1 expansion
    dw = "features.2.conv.1.0"
    assert dw in g.producers and dw in g.consumers and g.channels == 48
    assert g.bns == ["features.2.conv.0.1", "features.2.conv.1.1"]
    # expand == 1: the depthwise conv reads the stem directly, so it joins the stem's group
    assert "features.1.conv.0.0" in _group_of(groups, "features.0.0").producers
    # inverted residual: both linear bottlenecks of stage 2 add up
    assert set(_group_of(groups, "features.2.conv.2.0").producers) == {"features.2.conv.2.0", "features.3.conv.2.0"}


def test_densenet_concat_offsets():
    _, groups = _groups("densenet")
    g = _group_of(groups, "blocks.0.0.conv2")
    # cat([stem(8), layer0(6)]) then layer 1's norm1 / conv1: this group sits at offset 8
    assert ChannelSlice("blocks.0.1.norm1", "bn", 8, 0, 6) in g.slices
    assert ChannelSlice("blocks.0.1.conv1", "in", 8, 0, 6) in g.slices
    assert ChannelSlice("transitions.0.2", "in", 8, 0, 6) in g.slices
    assert set(g.bns) == {"blocks.0.1.norm1", "blocks.0.2.norm1", "transitions.0.0"}


def test_flatten_into_linear_owns_hw_features():
    _, groups = _groups("flatten_head")
    g = _group_of(groups, "conv2")
    hw = (zoo.IMAGE[-1] // 8) ** 2
    assert ChannelSlice("fc1", "in", 0, 0, 16, hw) in g.slices
    assert _group_of(groups, "fc1").bns == ["bn3"]


def test_split_and_chunk_pieces():
    _, groups = _groups("splitnet")
    mid = _group_of(groups, "mid.0")
    assert ChannelSlice("left", "in", 0, 0, 8) in mid.slices
    assert ChannelSlice("right", "in", 0, 8, 16) in mid.slices
    stem = _group_of(groups, "stem.0")
    # chunk: the first half goes straight into the concat, the second into the branch
    assert ChannelSlice("branch.0.0", "in", 0, 8, 8) in stem.slices
    assert ChannelSlice("mid.0", "in", 0, 0, 8) in stem.slices


def test_conv_transpose_and_map_output():
    _, groups = _groups("unet")
    assert _group_of(groups, "up").consumers == ["dec.0"]
    assert not _group_of(groups, "head").prunable


class SE(nn.Module):
    def __init__(self, c=8):
        super().__init__()
        self.conv = nn.Conv2d(3, c, 3, padding=1)
        self.fc1, self.fc2 = nn.Linear(c, 4), nn.Linear(4, c)
        self.out = nn.Conv2d(c, 4, 1)

    def forward(self, x):
        x = self.conv(x)
        s = torch.sigmoid(self.fc2(F.relu(self.fc1(x.mean((2, 3))))))
        return self.out(x * s.view(s.shape[0], -1, 1, 1))


def test_squeeze_excite_product_couples():
    g = _group_of(channel_groups(SE(), torch.randn(1, 3, 8, 8)), "conv")
    assert set(g.producers) == {"conv", "fc2"} and set(g.consumers) == {"fc1", "out"}


def test_model_not_changed_and_train_mode_kept():
    m = zoo.make("resnet_basic").train()
    before = copy.deepcopy(m.state_dict())
    channel_groups(m, torch.randn(zoo.IMAGE))
    assert m.training and all(x.training for x in m.modules())
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k  # no BatchNorm statistics moved


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.body = Branchy()

    def forward(self, x):
        return self.body(self.conv(x))


class Branchy(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: fx cannot trace it
            return x
        return -x


def test_untraceable_names_the_module_and_what_to_do():
    with pytest.raises(NotTraceableError, match=r"module 'body' \(Branchy\).*rewrite"):
        channel_groups(Untraceable(), torch.randn(1, 3, 4, 4))


class Permute(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.conv(x).permute(0, 2, 3, 1))


class Shuffle(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)
        self.conv2 = nn.Conv2d(8, 8, 1)

    def forward(self, x):
        x = self.conv(x)
        n, c, h, w = x.shape
        x = x.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)  # channel shuffle
        return self.conv2(x)


class Norm(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)
        self.norm = nn.GroupNorm(2, 8)

    def forward(self, x):
        return self.norm(self.conv(x))


class ChannelSlicing(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)

    def forward(self, x):
        return self.conv(x)[:, :4]


class Shifted(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)
        self.out = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        a, b = self.conv(x).chunk(2, 1)
        return self.out(a + b)  # channel i added to channel i + 4 of the same layer


@pytest.mark.parametrize("model,node,layer", [
    (Permute(), "permute", "<the model's own forward>"),
    (Shuffle(), "view", "<the model's own forward>"),
    (Norm(), "norm", "norm"),
    (ChannelSlicing(), "getitem", "<the model's own forward>"),
])
def test_unsupported_op_names_node_and_layer(model, node, layer):
    with pytest.raises(ChannelGraphError, match=rf"node '{node}[_0-9]*'.*in layer '{layer}'"):
        channel_groups(model, torch.randn(1, 3, 4, 4))


def test_bad_example_inputs():
    m = zoo.make("flatten_head")
    with pytest.raises(ChannelGraphError, match=r"example_inputs do not fit.*conv1"):
        channel_groups(m, torch.randn(2, 1, 16, 16))  # 1 channel, the model takes 3
    with pytest.raises(ChannelGraphError, match=r"example_inputs do not fit.*fc1"):
        channel_groups(m, torch.randn(2, 3, 24, 24))  # the flatten no longer fits fc1
    with pytest.raises(ChannelGraphError, match="example_inputs has 2 tensors"):
        channel_groups(m, (torch.randn(2, 3, 16, 16), torch.randn(2, 3, 16, 16)))
    with pytest.raises(TypeError, match="example_inputs must be a tensor"):
        channel_groups(m, [[1.0, 2.0]])
    with pytest.raises(TypeError, match="torch.nn.Module"):
        channel_groups(lambda x: x, torch.randn(1))


def test_sum_of_halves_of_one_layer():
    # a + b with a, b the two halves of one conv: conv rows i and i + 4 are one channel
    g = _group_of(channel_groups(Shifted(), torch.randn(1, 3, 4, 4)), "conv")
    assert g.channels == 4
    assert ChannelSlice("conv", "out", 0, 0, 4) in g.slices and ChannelSlice("conv", "out", 4, 0, 4) in g.slices
    assert ChannelSlice("out", "in", 0, 0, 4) in g.slices


class CatThenResidual(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 6, 1)
        self.res = nn.Conv2d(10, 10, 3, padding=1)
        self.out = nn.Conv2d(10, 2, 1)

    def forward(self, x):
        y = torch.cat([self.a(x), self.b(x)], 1)
        return self.out(y + self.res(y))


def test_concatenation_plus_one_layer_splits_that_layer():
    # res's first 4 rows are a's channels, its last 6 are b's: two groups, res in both
    groups = channel_groups(CatThenResidual(), torch.randn(1, 3, 4, 4))
    ga, gb = _group_of(groups, "a"), _group_of(groups, "b")
    assert (ga.channels, gb.channels) == (4, 6)
    assert ChannelSlice("res", "out", 0, 0, 4) in ga.slices and ChannelSlice("res", "out", 4, 0, 6) in gb.slices
    assert ChannelSlice("res", "in", 0, 0, 4) in ga.slices and ChannelSlice("out", "in", 4, 0, 6) in gb.slices
