"""Small real models trained in the tests (no downloads: scikit-learn ships the digits)."""
import functools

import torch
from torch import nn


class DigitsMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 10))

    def forward(self, x):
        return self.net(x)


@functools.lru_cache(maxsize=1)
def digits_data():
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32) / 16.0
    y = torch.tensor(d.target)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(y), generator=g)
    x, y = x[perm], y[perm]
    n = int(0.7 * len(y))
    return x[:n], y[:n], x[n:], y[n:]


def trained_digits_mlp(epochs: int = 60):
    """Train the MLP on 70% of the digits (about 2 s on 2 cores); returns (model, data)."""
    torch.manual_seed(0)
    xtr, ytr, xte, yte = digits_data()
    model = DigitsMLP()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(epochs):
        for i in range(0, len(ytr), 64):
            opt.zero_grad()
            nn.functional.cross_entropy(model(xtr[i:i + 64]), ytr[i:i + 64]).backward()
            opt.step()
    model.eval()
    return model, (xtr, ytr, xte, yte)


@torch.no_grad()
def accuracy(model, x, y) -> float:
    return (model(x).argmax(-1) == y).float().mean().item()
