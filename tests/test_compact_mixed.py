"""pysparse.compact where the members of one residual sum were masked with different channel
sets (a user's own masks): the sum keeps the union of live channels and each member conv with
fewer live channels of its own becomes a CompactConv2d (the add and ReLU fused in where the
graph is conv -> add -> relu). Exact, smaller, compiles; bad input gets clear errors."""
from __future__ import annotations

import pytest
import torch
from torch import fx, nn

from pysparse._depgraph import ChannelGraphError, channel_groups
from pysparse.compact import _partial, compact
from pysparse.nn import CompactConv2d

from . import zoo
from .test_compact import _assert_close, _snapshot, _zero, mask_channels


def mask_members(model: nn.Module, x: torch.Tensor, fraction: float = 0.5, seed: int = 0,
                 use_parametrize: bool = False) -> int:
    """Zero a different random ``fraction`` of channels in every producer of every residual
    group (a group with more than one producer): its weight rows, and the weight and bias of
    the BatchNorm that reads it alone, so each member is exactly zero on its own channel set.
    Returns how many producers were masked."""
    gen = torch.Generator().manual_seed(seed)
    mods = dict(model.named_modules())
    bn_after = {}
    for node in fx.symbolic_trace(model).graph.nodes:
        if node.op == "call_module" and len(node.users) == 1:
            u = next(iter(node.users))
            if u.op == "call_module" and isinstance(mods[u.target], nn.BatchNorm2d):
                bn_after[node.target] = mods[u.target]
    masked = 0
    for grp in channel_groups(model, x):
        if not grp.prunable or len(grp.producers) < 2:
            continue
        for sl in grp.slices:
            m = mods[sl.module]
            if sl.role != "out" or not isinstance(m, nn.Conv2d) or m.groups != 1:
                continue
            drop = torch.randperm(sl.length, generator=gen)[: int(sl.length * fraction)] + sl.start
            idx = drop.tolist()
            _zero(m, "weight", idx, 0, use_parametrize)
            _zero(m, "bias", idx, 0, use_parametrize)
            bn = bn_after.get(sl.module)
            if bn is not None:
                _zero(bn, "weight", idx, 0, use_parametrize)
                _zero(bn, "bias", idx, 0, use_parametrize)
            masked += 1
    return masked


def _stored(model: nn.Module) -> int:
    # parameters, and CompactConv2d's packed weight and bias (buffers; padded to whole panels
    # of 16 output channels, counted as stored)
    return sum(p.numel() for p in model.parameters()) + sum(
        b.numel() for n, b in model.named_buffers() if n.rsplit(".", 1)[-1] in ("weight", "bias"))


def _fused(gm: fx.GraphModule) -> list[fx.Node]:
    mods = dict(gm.named_modules())
    return [n for n in gm.graph.nodes
            if n.op == "call_module" and isinstance(mods[n.target], CompactConv2d) and len(n.args) == 2]


# widths where a member's live channels (half) fill fewer 16-channel panels than the union
# (about three quarters): 32 channels and up in every residual sum
MIXED = {
    "resnet_basic": lambda: zoo.ResNet(zoo.BasicBlock, (2, 1), 32, 10, small_input=True),
    "resnet_bottleneck": lambda: zoo.resnet_bottleneck(),
    "mobilenet_v2": lambda: zoo.MobileNetV2(width=16),
}


@pytest.mark.parametrize("name", list(MIXED))
def test_mixed_members_use_compact_conv2d(name):
    torch.manual_seed(0)
    model = zoo.randomize_bn(MIXED[name]()).eval()
    x = torch.randn(zoo.IMAGE)
    assert mask_members(model, x, use_parametrize=name == "resnet_bottleneck") >= 3
    before = _snapshot(model)
    with torch.no_grad():
        y_ref = model(x)
    c = compact(model, x)
    union = compact(model, x, compact_conv2d=False)  # today's layout: dense convs over the union
    ccs = [m for m in c.modules() if isinstance(m, CompactConv2d)]
    assert ccs and not any(isinstance(m, CompactConv2d) for m in union.modules())
    assert all(m.out_idx.numel() < m.out_channels for m in ccs)
    fused = _fused(c)
    # ResNets: conv -> add -> relu in every block; MobileNetV2: x + conv(x), no ReLU
    assert fused and all(c.get_submodule(n.target).relu == name.startswith("resnet") for n in fused)
    with torch.no_grad():
        _assert_close(c(x), y_ref)
        _assert_close(union(x), y_ref)
        x2 = torch.randn(zoo.IMAGE)
        _assert_close(c(x2), model(x2))
    assert _stored(c) < _stored(union) < _stored(model), (_stored(c), _stored(union), _stored(model))
    after = _snapshot(model)
    assert after[1] == before[1] and all(torch.equal(after[0][k], v) for k, v in before[0].items())
    # inference only, so frozen: runs with autograd on, and exports (the op through its fake kernel)
    assert not any(p.requires_grad for p in c.parameters())
    _assert_close(c(x), y_ref)
    if name == "resnet_bottleneck":
        ep = torch.export.export(c, (x,))
        assert any("compact_conv2d" in str(n.target) for n in ep.graph.nodes)
        with torch.no_grad():
            _assert_close(ep.module()(x), y_ref)
    if name == "resnet_bottleneck":  # one model: dynamo's first compile costs ~10 s on 2 busy cores
        # fullgraph: no graph break at CompactConv2d; aot_eager traces its op through the fake
        # kernel (what inductor sees; inductor's C++ build itself runs once, in test_compact.py)
        torch._dynamo.reset()
        compiled = torch.compile(c, fullgraph=True, backend="aot_eager")
        with torch.no_grad():
            _assert_close(compiled(x), y_ref)


def test_unfolded_keeps_batchnorm_and_does_not_fuse():
    model = zoo.randomize_bn(MIXED["resnet_basic"]()).eval()
    x = torch.randn(zoo.IMAGE)
    mask_members(model, x, seed=1)
    c = compact(model, x, fold_bn=False, channels_last=False)
    assert any(isinstance(m, CompactConv2d) for m in c.modules()) and not _fused(c)
    assert any(isinstance(m, nn.BatchNorm2d) for m in c.modules())
    with torch.no_grad():
        _assert_close(c(x), model(x))


def test_where_it_does_not_pay_the_conv_stays_dense():
    # 16-channel sums: a member's 8 live channels fill one 16-wide panel, no fewer rows than
    # the union's ~12: the dense conv over the union is kept
    model = zoo.randomize_bn(zoo.ResNet(zoo.BasicBlock, (2,), 16, 10, small_input=True)).eval()
    x = torch.randn(zoo.IMAGE)
    mask_members(model, x)
    c = compact(model, x)
    assert not any(isinstance(m, CompactConv2d) for m in c.modules())
    with torch.no_grad():
        _assert_close(c(x), model(x))


class InplaceReuse(nn.Module):
    """``a.add_(conv(a))`` where ``a`` is read again after the in-place add (fx records
    ``a += b`` as a plain add, ``add_`` as the mutation it is): the add must not be fused, the
    fused conv would leave ``a`` unchanged."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 32, 3, padding=1)
        self.conv = nn.Conv2d(32, 32, 3, padding=1)
        self.head = nn.Conv2d(32, 4, 1)

    def forward(self, x):
        a = self.stem(x)
        b = a.add_(self.conv(a))
        return self.head(a) + self.head(b)


def test_inplace_add_whose_operand_is_read_later_is_not_fused():
    model = InplaceReuse().eval()
    x = torch.randn(zoo.IMAGE)
    with torch.no_grad():
        model.stem.weight[:16] = 0
        model.stem.bias[:16] = 0
        model.conv.weight[8:] = 0  # live 0..7 of the union 0..31: one panel of 16 < 32
        model.conv.bias[8:] = 0
    c = compact(model, x)
    assert isinstance(c.conv, CompactConv2d) and not _fused(c)
    with torch.no_grad():
        _assert_close(c(x), model(x))


@pytest.mark.parametrize("inplace", [False, True])
def test_bad_example_inputs_name_the_layer_and_leave_the_model(inplace):
    # issue 8's bad input: example_inputs of the wrong shape get an error naming the layer
    # that cannot take them, and the user's model (masked through parametrize) is unchanged
    model = zoo.make("flatten_head")
    mask_channels(model, channel_groups(model, torch.randn(zoo.IMAGE)), use_parametrize=True)
    before = _snapshot(model)
    cases = [
        (torch.randn(2, 3, 32, 32), "example_inputs do not fit.*'fc1'.*mat1 and mat2"),  # flatten size
        ((torch.randn(2, 3, 16, 16),) * 2, "example_inputs has 2 tensors.*takes 1"),
        (torch.randn(2, 3, 16, 16, dtype=torch.float64), "example_inputs do not fit.*'conv1'"),
        (torch.randn(2, 3, 1, 1), "example_inputs do not fit.*'pool'"),
    ]
    for inputs, msg in cases:
        with pytest.raises(ChannelGraphError, match=msg) as e:
            compact(model, inputs, inplace=inplace)
        assert "While executing" not in str(e.value)  # fx's note, the node is named already
    after = _snapshot(model)
    assert after[1] == before[1] and all(torch.equal(after[0][k], v) for k, v in before[0].items())
    # an unbatched image: a conv runs it, but dim 1 is then not the channels (was a misleading
    # "the graph tracked 16 input channels, the layer has 3")
    nobn = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    with pytest.raises(ChannelGraphError, match=r"example_inputs do not fit.*'0'.*3-D.*\[N, C, H, W\]"):
        compact(nobn, torch.randn(3, 16, 16), inplace=inplace)


def _random_net(seed: int):
    from .test_compact_random import RandomNet

    return zoo.randomize_bn(RandomNet(seed), seed).eval(), torch.randn(2, 3, 8, 8)


# the random wirings (tests/test_compact_random.py) that hold residual blocks
@pytest.mark.parametrize("name", ["resnet_basic", "resnet_bottleneck", "resnext", "mobilenet_v2"] +
                         [f"random{s}" for s in (0, 4, 7, 8, 9, 10, 12, 13)])
def test_forced_on_every_member_stays_exact(name, monkeypatch):
    # Whether it pays aside (tiny widths: any strict subset becomes a CompactConv2d), every
    # wiring with residual members masked differently compacts exactly, with fused adds
    monkeypatch.setattr(_partial, "_pays", lambda live, union: 0 < live < union)
    if name.startswith("random"):
        model, x = _random_net(int(name[6:]))
    else:
        model, x = zoo.make(name), torch.randn(zoo.IMAGE)
    mask_members(model, x, seed=len(name))
    c = compact(model, x)
    with torch.no_grad():
        _assert_close(c(x), model(x))
    assert _fused(c)
