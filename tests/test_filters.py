"""pysparse.prune.filters: each criterion picks the channels it should, coupled channels are
pruned as one set, round_to / per_layer / skip, masks that survive fine-tuning and compact
exactly, and bad input that leaves the model as it was."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from pysparse._depgraph import ChannelGraphError, channel_groups
from pysparse.compact import compact
from pysparse.prune.filters import filters

from . import zoo
from .test_compact import _assert_close, _values


class ConvNet(nn.Module):
    def __init__(self, c: int = 4):
        super().__init__()
        self.conv1 = nn.Conv2d(3, c, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, 2, 1)

    def forward(self, x):
        return self.conv2(F.relu(self.bn1(self.conv1(x))))


def _kept(mask: torch.Tensor) -> set[int]:
    return set(mask.nonzero().flatten().tolist())


X = torch.randn(1, 3, 6, 6)


def test_l1_and_l2_rank_differently():
    # channel 0: many small weights (L1 2.7, L2^2 0.27); channel 1: one large (L1 1, L2^2 1)
    m = ConvNet(2)
    with torch.no_grad():
        m.conv1.weight.zero_()
        m.conv1.weight[0] = 0.1
        m.conv1.weight[1, 0, 1, 1] = 1.0
    assert _kept(filters(copy.deepcopy(m), 0.5, criterion="l1", example_inputs=X)["conv1"]) == {0}
    assert _kept(filters(copy.deepcopy(m), 0.5, criterion="l2", example_inputs=X)["conv1"]) == {1}


def test_l1_masks_rows_bias_and_batchnorm():
    m = zoo.randomize_bn(ConvNet(4))  # BatchNorm bias nonzero: it must be masked too
    with torch.no_grad():
        for c, s in enumerate((3.0, 0.5, 2.0, 0.1)):
            m.conv1.weight[c] = s
    keep = filters(m, 0.5, example_inputs=X)["conv1"]
    assert _kept(keep) == {0, 2}
    for t in (m.conv1.weight, m.conv1.bias, m.bn1.weight, m.bn1.bias):
        assert (t[[1, 3]] == 0).all() and (t[[0, 2]] != 0).all()
    assert parametrize.is_parametrized(m.conv1, "weight") and parametrize.is_parametrized(m.bn1, "bias")


def test_bn_scale_ranks_by_gamma():
    m = ConvNet(4)
    with torch.no_grad():
        m.conv1.weight.fill_(1.0)
        m.bn1.weight.copy_(torch.tensor([0.2, -3.0, 1.0, 0.05]))  # |gamma|: 1 and 2 survive
    assert _kept(filters(m, 0.5, criterion="bn_scale", example_inputs=X)["conv1"]) == {1, 2}


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(5, 6)
        self.fc2 = nn.Linear(6, 3)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def _data(n=3):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 5, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(n)]


def _reference_scores(m: MLP, data, criterion: str) -> torch.Tensor:
    """The criteria computed independently: per-batch gradients of fc1.weight by backward."""
    grads = []
    for x, y in data:
        mm = copy.deepcopy(m)
        F.cross_entropy(mm(x), y).backward()
        grads.append(mm.fc1.weight.grad)
    w = m.fc1.weight.detach()
    if criterion == "taylor":
        return (w * sum(grads)).sum(1).abs()
    fisher = sum(gr ** 2 for gr in grads) / len(grads)
    return (0.5 * fisher * w ** 2).sum(1)


@pytest.mark.parametrize("criterion", ["taylor", "obd"])
def test_gradient_criteria(criterion):
    torch.manual_seed(0)
    m = MLP()
    with torch.no_grad():
        m.fc1.weight[0] *= 20  # the largest weights (l1 keeps channel 0) ...
        m.fc2.weight[:, 0] = 0  # ... but nothing depends on them: no gradient, score 0
    data = _data()
    ref = _reference_scores(m, data, criterion)
    expect = set(ref.argsort(descending=True)[:3].tolist())
    assert 0 not in expect
    before = copy.deepcopy(m.state_dict())
    keep = filters(m, 0.5, criterion=criterion, example_inputs=data[0][0], data=data)["fc1"]
    assert _kept(keep) == expect
    assert all(p.grad is None for p in m.parameters())  # scoring writes no .grad
    # l1 on the same weights keeps channel 0: the criteria differ here
    m2 = MLP()
    m2.load_state_dict(before)
    assert 0 in _kept(filters(m2, 0.5, criterion="l1", example_inputs=data[0][0])["fc1"])


def test_residual_group_pruned_as_one_set():
    m = zoo.make("resnet_basic")
    x = torch.randn(zoo.IMAGE)
    keep = filters(m, 0.5, example_inputs=x)
    stage = [keep[n] for n in ("conv1", "layer1.0.conv2", "layer1.1.conv2")]
    assert all(torch.equal(stage[0], k) for k in stage) and int(stage[0].sum()) == 4
    assert torch.equal(keep["layer2.0.downsample.0"], keep["layer2.0.conv2"])
    assert "fc" not in keep  # the model's output
    for bn in ("bn1", "layer1.0.bn2", "layer1.1.bn2"):
        assert torch.equal(m.get_submodule(bn).weight != 0, stage[0])


def test_grouped_and_depthwise_groups():
    m = zoo.make("resnext")
    x = torch.randn(zoo.IMAGE)
    keep = filters(m, 0.5, example_inputs=x)
    k = keep["layer1.0.conv1"].view(4, -1)  # 16 channels into a groups=4 conv
    assert (k.sum(1) == 2).all()
    mb = zoo.make("mobilenet_v2")
    keep = filters(mb, 0.5, example_inputs=x)
    assert torch.equal(keep["features.2.conv.0.0"], keep["features.2.conv.1.0"])  # expand + depthwise


def test_round_to_per_layer_and_skip():
    m = zoo.make("resnet_basic")
    x = torch.randn(zoo.IMAGE)
    keep = filters(m, 0.3, example_inputs=x, round_to=4, skip=["layer1.1.conv1"],
                   per_layer={"layer2.0.conv1": 0.75})
    for name, k in keep.items():
        n, kept = k.numel(), int(k.sum())
        assert kept % 4 == 0, name
        if name != "layer2.0.conv1":
            assert n - round(0.3 * n) <= kept < n, name  # rounded up, never pruning more than asked
    assert int(keep["layer2.0.conv1"].sum()) == 4  # 16 - round(0.75 * 16) = 4
    assert "layer1.1.conv1" not in keep and not parametrize.is_parametrized(m.layer1[1].conv1)


def test_pruning_again_only_tightens():
    m = zoo.make("resnet_bottleneck")
    x = torch.randn(zoo.IMAGE)
    first = filters(m, 0.5, example_inputs=x)
    second = filters(m, 0.75, example_inputs=x)
    for name, k in second.items():
        assert not (k & ~first[name]).any(), name  # nothing pruned comes back
        assert int(k.sum()) == max(1, k.numel() - round(0.75 * k.numel()))


def test_masks_survive_sgd_then_compact_matches():
    m = zoo.make("resnet_bottleneck")
    x = torch.randn(zoo.IMAGE)
    keep = filters(m, 0.5, example_inputs=x)
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2)
    m.train()
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(m(torch.randn(2, 3, 16, 16)), torch.randint(0, 10, (2,))).backward()
        opt.step()
    m.eval()
    for name, k in keep.items():
        layer = m.get_submodule(name)
        assert (layer.weight[~k] == 0).all() and (layer.weight[k] != 0).any(), name
    assert (m.bn1.weight[~keep["conv1"]] == 0).all() and (m.bn1.bias[~keep["conv1"]] == 0).all()
    c = compact(m, x)
    with torch.no_grad():
        _assert_close(c(x), m(x))
    assert _values(c) <= 0.6 * _values(m)


@pytest.mark.parametrize("name", ["mobilenet_v2", "densenet", "splitnet", "unet", "flatten_head"])
def test_filters_then_compact_on_the_zoo(name):
    m = zoo.make(name)
    x = torch.randn(zoo.IMAGE)
    filters(m, 0.5, criterion="l2", example_inputs=x, round_to=2)
    c = compact(m, x, fold_bn=False)
    with torch.no_grad():
        _assert_close(c(x), m(x))
    assert _values(c) <= 0.6 * _values(m)


def _state(m):
    return copy.deepcopy(m.state_dict()), [type(t) for t in m.modules()]


@pytest.mark.parametrize("kwargs,err,match", [
    (dict(amount=1.0), ValueError, r"amount must be in \[0, 1\)"),
    (dict(amount=-0.1), ValueError, "amount"),
    (dict(amount=float("nan")), ValueError, "amount"),
    (dict(criterion="l3"), ValueError, "criterion must be one of"),
    (dict(criterion="taylor"), ValueError, "needs gradients: give data"),
    (dict(skip=["layer9"]), ValueError, r"skip: no layer named \['layer9'\]"),
    (dict(per_layer={"conv7": 0.5}), ValueError, r"per_layer: no layer named \['conv7'\]"),
    (dict(per_layer={"fc": 0.5}), ValueError, r"per_layer: the channels of 'fc' cannot be pruned \(the model's output"),
    (dict(per_layer={"bn1": 0.5}), ValueError, "'bn1' is not a Conv2d"),
    (dict(per_layer={"conv1": 1.5}), ValueError, r"per_layer\['conv1'\]"),
    (dict(round_to=0), ValueError, "round_to"),
    (dict(example_inputs=torch.randn(2, 5, 16, 16)), ChannelGraphError, "example_inputs do not fit.*conv1"),
    (dict(criterion="obd", data=[torch.randn(2, 3, 16, 16)]), TypeError, r"data batch 0 must be an \(inputs, target\)"),
    (dict(criterion="obd", data=[]), ValueError, "data gave no batches"),
])
def test_bad_input_leaves_model_as_it_was(kwargs, err, match):
    m = zoo.make("resnet_basic")
    before = _state(m)
    args = dict(amount=0.5, example_inputs=torch.randn(zoo.IMAGE))
    args.update(kwargs)
    amount = args.pop("amount")
    with pytest.raises(err, match=match):
        filters(m, amount, **args)
    after = _state(m)
    assert after[1] == before[1] and all(torch.equal(after[0][k], v) for k, v in before[0].items())
    assert not any(parametrize.is_parametrized(t) for t in m.modules())


def test_taylor_on_frozen_weights_restores_the_flag():
    m = MLP()
    for p in m.parameters():
        p.requires_grad_(False)
    data = _data(2)
    keep = filters(m, 0.5, criterion="taylor", example_inputs=data[0][0], data=data)["fc1"]
    assert int(keep.sum()) == 3
    assert not any(p.requires_grad for p in m.parameters())
