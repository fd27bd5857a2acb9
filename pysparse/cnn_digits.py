"""A small CNN on scikit-learn's bundled handwritten digits (8x8 grey images, 1797 of them):
the real task behind the CNN compression demo and its accuracy test.

``train_digits_cnn`` trains it here in a few seconds on 2 cores; ``prune_compact_finetune``
runs the recipe a user would: filter pruning with masks, fine-tuning with the masks held,
compaction (BatchNorm folded, channels physically removed), then optional int8.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn


def digits_tensors(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_train, y_train, x_test, y_test): images [n, 1, 8, 8] scaled to [0, 1], a 70/30 split."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32).view(-1, 1, 8, 8) / 16.0
    y = torch.tensor(d.target)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x, y = x[perm], y[perm]
    n = int(0.7 * len(y))
    return x[:n], y[:n], x[n:], y[n:]


def digits_cnn(width: int = 32) -> nn.Module:
    """conv-bn-relu x 2, max-pool to 4x4, conv-bn-relu x 2, global pool, a Linear head."""
    def cbr(cin: int, cout: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

    w = width
    return nn.Sequential(*cbr(1, w), *cbr(w, 2 * w), nn.MaxPool2d(2), *cbr(2 * w, 4 * w), *cbr(4 * w, 4 * w),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * w, 10))


def fit(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, lr: float, seed: int = 0,
        batch: int = 64) -> nn.Module:
    """Adam, cross-entropy, ``epochs`` passes in a seeded order; returns the model in eval mode."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(y), generator=g)
        for i in range(0, len(y), batch):
            idx = perm[i:i + batch]
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 accuracy in percent."""
    return 100.0 * (model(x).argmax(-1) == y).float().mean().item()


def train_digits_cnn(width: int = 32, epochs: int = 12, seed: int = 0) -> tuple[nn.Module, tuple]:
    """The trained CNN and the data split (x_train, y_train, x_test, y_test)."""
    data = digits_tensors(seed)
    torch.manual_seed(seed)
    model = fit(digits_cnn(width), data[0], data[1], epochs, 2e-3, seed)
    return model, data


def prune_compact_finetune(model: nn.Module, data: tuple, amount: float = 0.5, epochs: int = 4,
                           criterion: str = "l1", int8: bool = False,
                           calib_batches: int = 8) -> tuple[nn.Module, Optional[nn.Module]]:
    """Filter-prune a copy of ``model`` (``amount`` of every prunable layer's channels), fine-tune
    it with the masks held, compact it; returns (compacted fp32, its int8 conversion or None)."""
    import copy

    import pysparse

    xtr, ytr = data[0], data[1]
    example = (xtr[:2],)
    pruned = copy.deepcopy(model)
    pysparse.prune.filters(pruned, amount, criterion=criterion, example_inputs=example,
                           data=[(xtr[i:i + 64], ytr[i:i + 64]) for i in range(0, 256, 64)]
                           if criterion in ("taylor", "obd") else None,
                           loss_fn=nn.functional.cross_entropy if criterion in ("taylor", "obd") else None)
    fit(pruned, xtr, ytr, epochs, 1e-3, seed=1)
    compacted = pysparse.compact(pruned, example)
    q = None
    if int8:
        calib = [xtr[i:i + 64] for i in range(0, 64 * calib_batches, 64)]
        q = pysparse.quantize_int8(copy.deepcopy(compacted), activations="static", calibration_data=calib, convs=True)
    return compacted, q
