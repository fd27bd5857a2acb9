"""pysparse.compact: every zoo model, half of each prunable group's channels masked, compacts
to a model that computes the same outputs with far fewer values, compiles, and leaves the
input model untouched; user-made partial masks stay exact; bad input gets clear errors."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from pysparse._depgraph import ChannelGraphError, NotTraceableError, channel_groups
from pysparse.compact import compact

from . import zoo
from .test_depgraph import SE, Untraceable


class _Mask(nn.Module):
    def __init__(self, mask):
        super().__init__()
        self.register_buffer("mask", mask)

    def forward(self, w):
        return w * self.mask


def _zero(module: nn.Module, attr: str, idx: list[int], dim: int, use_parametrize: bool) -> None:
    p = getattr(module, attr)
    if p is None or not idx:
        return
    shape = [1] * p.dim()
    shape[dim] = p.shape[dim]
    mask = torch.ones(shape)
    mask.view(-1)[idx] = 0
    if use_parametrize:  # as pysparse.prune masks are: every read of .weight sees the zeros
        existing = parametrize.is_parametrized(module, attr)
        if existing:
            module.parametrizations[attr][0].mask.mul_(mask)
        else:
            parametrize.register_parametrization(module, attr, _Mask(mask))
    else:
        with torch.no_grad():
            p.mul_(mask)


def mask_channels(model: nn.Module, groups, fraction: float = 0.5, seed: int = 0,
                  use_parametrize: bool = False) -> dict[int, set[int]]:
    """Zero ``fraction`` of every prunable group's channels (the same count in each of its
    divisions): the producers' weight rows and biases and the BatchNorms' weights and
    biases, so those channels are exactly zero. Returns {group index: dropped channels}."""
    gen = torch.Generator().manual_seed(seed)
    mods = dict(model.named_modules())
    dropped = {}
    for gi, grp in enumerate(groups):
        if not grp.prunable:
            continue
        b = grp.channels // grp.divisions
        drop = set(torch.cat([torch.randperm(b, generator=gen)[: int(b * fraction)] + i * b
                              for i in range(grp.divisions)]).tolist())
        dropped[gi] = drop
        for sl in grp.slices:
            if sl.role == "in":
                continue
            idx = [sl.start + c for c in range(sl.length) if sl.group_start + c in drop]
            m = mods[sl.module]
            dim = 1 if isinstance(m, nn.ConvTranspose2d) and sl.role == "out" else 0
            _zero(m, "weight", idx, dim, use_parametrize)
            _zero(m, "bias", idx, 0, use_parametrize)
    return dropped


def _values(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _assert_close(y, y_ref):
    # <= 1e-4 of the output's max (the bar): slicing is exact, folding BN reorders the
    # float arithmetic (seen: ~1e-7)
    assert (y - y_ref).abs().max() <= 1e-4 * y_ref.abs().max(), (y - y_ref).abs().max()


def _snapshot(model):
    return copy.deepcopy(model.state_dict()), [type(m) for m in model.modules()], model.training


@pytest.mark.parametrize("name", list(zoo.ZOO))
def test_zoo_compacts_exactly(name):
    torch.manual_seed(0)
    model = zoo.make(name)
    x = torch.randn(zoo.IMAGE)
    groups = channel_groups(model, x)
    # masks through parametrize on half the zoo, zeros written in place on the other half
    use_p = list(zoo.ZOO).index(name) % 2 == 0
    mask_channels(model, groups, use_parametrize=use_p)
    before = _snapshot(model)
    with torch.no_grad():
        y_ref = model(x)
    plain = compact(model, x, fold_bn=False, channels_last=False)
    folded = compact(model, x)
    with torch.no_grad():
        _assert_close(plain(x), y_ref)
        _assert_close(folded(x), y_ref)
        x2 = torch.randn(zoo.IMAGE)  # a batch the compaction never saw
        _assert_close(folded(x2), model(x2))
    # half of every prunable group gone: <= 0.6x the values, BatchNorms counted and kept
    assert _values(plain) <= 0.6 * _values(model), (_values(plain), _values(model))
    assert not folded.training and not plain.training
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in folded.modules()) or name in ("densenet",)
    assert not any(parametrize.is_parametrized(m) for m in folded.modules())
    # the input model: same values, same module types (parametrizations kept), same mode
    after = _snapshot(model)
    assert after[1] == before[1] and after[2] == before[2]
    assert all(torch.equal(after[0][k], v) for k, v in before[0].items())
    assert any(parametrize.is_parametrized(m) for m in model.modules()) == use_p
    # torch.compile(fullgraph=True): dynamo captures the whole model as one graph (what fails on
    # a graph break). Inductor's C++ build takes 25-45 s per model on 2 busy cores, so it runs
    # once, in test_compact_inductor.
    torch._dynamo.reset()
    compiled = torch.compile(folded, fullgraph=True, backend="eager")
    with torch.no_grad():
        _assert_close(compiled(x), y_ref)


def test_compact_inductor():
    model = zoo.make("flatten_head")
    x = torch.randn(zoo.IMAGE)
    mask_channels(model, channel_groups(model, x))
    c = compact(model, x)
    torch._dynamo.reset()
    with torch.no_grad():
        _assert_close(torch.compile(c, fullgraph=True)(x), model(x))


def test_folds_and_channels_last():
    model = zoo.make("resnet_bottleneck")
    x = torch.randn(zoo.IMAGE)
    mask_channels(model, channel_groups(model, x))
    c = compact(model, x)
    convs = [m for m in c.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(m.weight.is_contiguous(memory_format=torch.channels_last) for m in convs)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in c.modules())  # every conv feeds its BN alone
    assert c.conv1.out_channels == 4 and c.get_submodule("layer1.0.conv3").in_channels == 4


def test_residual_members_with_different_zeros_keep_the_union():
    # A user's own masks: the two producers of one residual sum zero different channels. The
    # sum is zero only where both are, so exactly the union of live channels is kept.
    model = zoo.make("resnet_basic")
    x = torch.randn(zoo.IMAGE)
    with torch.no_grad():
        for conv, bn, chans in ((model.conv1, model.bn1, [0, 1, 2, 3]),
                                (model.layer1[0].conv2, model.layer1[0].bn2, [2, 3, 4, 5]),
                                (model.layer1[1].conv2, model.layer1[1].bn2, [1, 2, 3, 6])):
            conv.weight[chans] = 0
            bn.weight[chans] = 0
            bn.bias[chans] = 0
    c = compact(model, x, fold_bn=False)
    assert c.conv1.out_channels == 6  # channels 2 and 3 are zero in every member
    assert c.get_submodule("layer2.0.conv1").in_channels == 6
    assert c.get_submodule("layer1.1.bn2").num_features == 6
    with torch.no_grad():
        _assert_close(c(x), model(x))


def test_zero_rows_under_a_live_batchnorm_are_kept():
    # conv rows zero but the BatchNorm after them shifts the channel: it is not zero, keep it
    model = zoo.make("flatten_head")
    x = torch.randn(zoo.IMAGE)
    with torch.no_grad():
        model.conv1.weight[:4] = 0
        model.conv1.bias[:4] = 0
    c = compact(model, x, fold_bn=False)
    assert c.conv1.out_channels == 8
    with torch.no_grad():
        model.bn1.weight[:4] = 0
        model.bn1.bias[:4] = 0
    c = compact(model, x, fold_bn=False)
    assert c.conv1.out_channels == 4 and c.conv2.in_channels == 4
    with torch.no_grad():
        _assert_close(c(x), model(x))


def test_grouped_conv_uneven_zeros_keep_equal_groups():
    model = zoo.make("resnext")
    x = torch.randn(zoo.IMAGE)
    conv, bn = model.layer1[0].conv1, model.layer1[0].bn1  # 16 channels into a groups=4 conv
    with torch.no_grad():
        for ch in (0, 1, 2, 5, 9, 13):  # 3 zeros in block 0, 1 in each other block
            conv.weight[ch] = 0
            bn.weight[ch] = 0
            bn.bias[ch] = 0
    c = compact(model, x, fold_bn=False)
    g = c.get_submodule("layer1.0.conv2")
    assert (c.get_submodule("layer1.0.conv1").out_channels, g.in_channels, g.groups) == (12, 12, 4)
    with torch.no_grad():
        _assert_close(c(x), model(x))


def test_nothing_masked_changes_nothing():
    model = zoo.make("mobilenet_v2")
    x = torch.randn(zoo.IMAGE)
    c = compact(model, x, fold_bn=False, channels_last=False)
    assert _values(c) == _values(model)
    with torch.no_grad():
        assert torch.equal(c(x), model(x))


def test_inplace_slices_the_model_itself():
    model = zoo.make("flatten_head")
    x = torch.randn(zoo.IMAGE)
    mask_channels(model, channel_groups(model, x), use_parametrize=True)
    with torch.no_grad():
        y = model(x)
    c = compact(model, x, fold_bn=False, channels_last=False, inplace=True)
    assert model.conv1.out_channels == 4 and c.conv1 is model.conv1
    assert not parametrize.is_parametrized(model.conv1)
    with torch.no_grad():
        _assert_close(c(x), y)


@pytest.mark.parametrize("inplace", [False, True])
def test_bad_input_leaves_model_as_it_was(inplace):
    model = zoo.make("flatten_head")
    mask_channels(model, channel_groups(model, torch.randn(zoo.IMAGE)), use_parametrize=True)
    before = _snapshot(model)
    with pytest.raises(ChannelGraphError, match="example_inputs do not fit.*conv1"):
        compact(model, torch.randn(2, 4, 16, 16), inplace=inplace)
    with pytest.raises(TypeError, match="example_inputs"):
        compact(model, "image", inplace=inplace)
    after = _snapshot(model)
    assert after[1] == before[1] and all(torch.equal(after[0][k], v) for k, v in before[0].items())
    with pytest.raises(NotTraceableError, match="'body'"):
        compact(Untraceable(), torch.randn(1, 3, 4, 4), inplace=inplace)
    with pytest.raises(TypeError, match="torch.nn.Module"):
        compact(torch.randn(3), torch.randn(3))


def test_squeeze_excite_and_broadcast():
    # x * s: the SE scale's producer (fc2) loses the rows of x's removed channels; a masked
    # channel of x is zero whatever its scale, so the product stays exact
    model = zoo.randomize_bn(SE()).eval()
    x = torch.randn(2, 3, 8, 8)
    mask_channels(model, channel_groups(model, x))
    c = compact(model, x)
    assert c.conv.out_channels == 4 and c.fc2.out_features == 4 and c.fc1.in_features == 4
    with torch.no_grad():
        _assert_close(c(x), model(x))


def test_layer_whose_inputs_are_all_zero_keeps_one():
    # SplitNet: the stem's channels 8..15 are the chunk that feeds the branch alone; all zero,
    # the branch's first conv still needs one input channel (a zero one: still exact)
    model = zoo.make("splitnet")
    x = torch.randn(zoo.IMAGE)
    with torch.no_grad():
        stem_conv, stem_bn = model.stem[0], model.stem[1]
        stem_conv.weight[8:] = 0
        stem_bn.weight[8:] = 0
        stem_bn.bias[8:] = 0
    c = compact(model, x, fold_bn=False)
    assert c.get_submodule("branch.0.0").in_channels == 1 and c.get_submodule("stem.0").out_channels == 9
    with torch.no_grad():
        _assert_close(c(x), model(x))


@pytest.mark.parametrize("name", ["resnet_bottleneck", "splitnet"])
def test_compacted_model_exports(name):
    # torch.export (the path to serving and to ONNX's dynamo exporter) sees plain layers and a
    # split with literal sizes, no pysparse code at all
    model = zoo.make(name)
    x = torch.randn(zoo.IMAGE)
    mask_channels(model, channel_groups(model, x))
    c = compact(model, x)
    ep = torch.export.export(c, (x,))
    with torch.no_grad():
        _assert_close(ep.module()(x), model(x))
