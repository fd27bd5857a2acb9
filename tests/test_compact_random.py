"""Compaction on randomly wired CNNs: chains of plain, grouped and depthwise convs, residual
sums, concatenations, splits, squeeze-excite products and a pooled or flattened head, masked
at random fractions. Each must compact exactly: the bookkeeping of offsets, divisions and
flatten features has to be right for every combination, not only for the zoo's."""
from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pysparse._depgraph import channel_groups
from pysparse.compact import compact

from . import zoo
from .test_depgraph import CatThenResidual, Shifted
from .test_compact import _assert_close, _values, mask_channels


class Block(nn.Module):
    def __init__(self, kind: str, c: int, rng: random.Random):
        super().__init__()
        self.kind = kind
        if kind == "conv":
            self.out = rng.choice([4, 6, 8, 12])
            g = rng.choice([d for d in (1, 2) if c % d == 0 and self.out % d == 0])
            self.f = zoo.conv_bn(c, self.out, rng.choice([1, 3]), groups=g, act=rng.choice([nn.ReLU, nn.SiLU, None]))
        elif kind == "res":
            self.out = c
            self.f = nn.Sequential(zoo.conv_bn(c, c), zoo.conv_bn(c, c, act=None))
        elif kind == "dw":
            self.out = c
            self.f = zoo.conv_bn(c, c, 3, groups=c, act=nn.ReLU6)
        elif kind == "cat":
            k = rng.choice([2, 4])
            self.out = c + k
            self.f = zoo.conv_bn(c, k, 1)
        elif kind == "split":
            self.k = rng.randrange(1, c)
            self.out = c
            self.f = zoo.conv_bn(self.k, self.k, 3, act=nn.Hardswish)
        elif kind == "se":
            self.out = c
            self.fc1, self.fc2 = nn.Linear(c, 3), nn.Linear(3, c)
        self.kind = kind

    def forward(self, x):
        if self.kind in ("conv", "dw"):
            return self.f(x)
        if self.kind == "res":
            return F.relu(x + self.f(x))
        if self.kind == "cat":
            return torch.cat([x, self.f(x)], 1)
        if self.kind == "split":
            a, b = torch.split(x, [self.k, x.shape[1] - self.k], dim=1)
            return torch.cat([self.f(a), b], 1)
        s = torch.sigmoid(self.fc2(F.relu(self.fc1(x.mean((2, 3))))))
        return x * s[:, :, None, None]


class RandomNet(nn.Module):
    def __init__(self, seed: int):
        super().__init__()
        rng = random.Random(seed)
        c = rng.choice([4, 8])
        self.stem = zoo.conv_bn(3, c)
        blocks = []
        for _ in range(rng.randint(3, 6)):
            b = Block(rng.choice(["conv", "res", "dw", "cat", "split", "se"]), c, rng)
            blocks.append(b)
            c = b.out
        self.blocks = nn.Sequential(*blocks)
        self.flat = rng.random() < 0.5  # flatten a 2x2 map into the head, or pool first
        self.head = nn.Linear(c * (4 if self.flat else 1), 5)

    def forward(self, x):
        x = self.blocks(self.stem(x))
        x = F.adaptive_avg_pool2d(x, 2 if self.flat else 1)
        return self.head(torch.flatten(x, 1))


@pytest.mark.parametrize("seed", range(32))
def test_random_net_compacts_exactly(seed):
    torch.manual_seed(seed)
    model = zoo.randomize_bn(RandomNet(seed), seed).eval()
    x = torch.randn(2, 3, 8, 8)
    frac = random.Random(seed).choice([0.25, 0.5, 0.75])
    mask_channels(model, channel_groups(model, x), fraction=frac, seed=seed, use_parametrize=seed % 2 == 0)
    with torch.no_grad():
        y = model(x)
        for kw in (dict(fold_bn=False, channels_last=False), dict()):
            c = compact(model, x, **kw)
            _assert_close(c(x), y)
    assert _values(c) < _values(model)


def test_sums_across_concatenations_compact_exactly():
    for model in (CatThenResidual(), Shifted()):
        x = torch.randn(2, 3, 6, 6)
        groups = channel_groups(model, x)
        mask_channels(model, groups)
        c = compact(model, x)
        with torch.no_grad():
            _assert_close(c(x), model(x))
        assert _values(c) < _values(model)


@pytest.mark.parametrize("seed", range(32, 40))
def test_random_net_filters_then_compact(seed):
    # the real pruner on the same random wiring: its masks must make channels exactly zero
    from pysparse.prune.filters import filters

    torch.manual_seed(seed)
    model = zoo.randomize_bn(RandomNet(seed), seed).eval()
    x = torch.randn(2, 3, 8, 8)
    filters(model, 0.5, criterion=random.Random(seed).choice(["l1", "l2", "bn_scale"]), example_inputs=x)
    c = compact(model, x)
    with torch.no_grad():
        _assert_close(c(x), model(x))
    assert _values(c) < _values(model)
