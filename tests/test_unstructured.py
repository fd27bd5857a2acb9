"""pysparse.prune.unstructured and pysparse.prune.blocks: exact counts per layer and globally,
Linear and Conv2d targets, per_layer / skip, masks that optimizer steps cannot regrow and that only
tighten, the gradient criteria on a real task, and bad input that leaves the model as it was."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.utils.data import DataLoader, TensorDataset

from pysparse import prune
from pysparse.formats import block_mask
from pysparse.prune._calib import leaf_weight
from pysparse.cnn_digits import accuracy, digits_cnn, digits_tensors, fit


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models on a shared 2-core machine
    yield
    torch.set_num_threads(n)


def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(),
                         nn.Flatten(), nn.Linear(8 * 8 * 8, 10))


def _zeros(t: torch.Tensor) -> int:
    return int((t.detach() == 0).sum())


def _state(m):
    return copy.deepcopy(m.state_dict()), [type(t) for t in m.modules()]


def test_layer_scope_exact_count_in_linear_and_conv():
    m = small_cnn()
    masks = prune.unstructured(m, 0.6)
    assert set(masks) == {"0", "2", "5"}
    for n, k in masks.items():
        w = m.get_submodule(n).weight
        assert int((~k).sum()) == round(0.6 * w.numel()) == _zeros(w), n
        # magnitude: every pruned |w| is at most every kept one
        orig = m.get_submodule(n).parametrizations.weight.original
        assert _zeros(orig) == int((~k).sum())  # zeros written into the stored weight too
    before = copy.deepcopy(m)
    ref = small_cnn()  # the same seed: magnitude keeps the largest
    w0 = ref[0].weight.detach().abs().flatten()
    assert w0[~masks["0"].flatten()].max() <= w0[masks["0"].flatten()].min()
    assert torch.equal(prune.unstructured(before, 0.6)["0"], masks["0"])  # again: nothing new


def test_global_scope_one_threshold():
    m = small_cnn()
    with torch.no_grad():
        m[5].weight.mul_(0.01)  # the big Linear's weights all small: global pruning takes them first
    masks = prune.unstructured(m, 0.5, scope="global")
    total = sum(k.numel() for k in masks.values())
    assert sum(int((~k).sum()) for k in masks.values()) == round(0.5 * total)
    kept = torch.cat([m.get_submodule(n).weight.detach()[k].abs() for n, k in masks.items()])
    pruned = torch.cat([leaf_weight(m.get_submodule(n)).detach()[~k].abs() for n, k in masks.items()])
    assert pruned.max() <= kept.min()
    assert masks["5"].float().mean() < 0.5 < masks["0"].float().mean()


def test_per_layer_skip_and_l2_same_as_l1():
    m = small_cnn()
    masks = prune.unstructured(m, 0.5, per_layer={"2": 0.25}, skip=["0"])
    assert set(masks) == {"2", "5"}
    assert not parametrize.is_parametrized(m[0])
    assert int((~masks["2"]).sum()) == round(0.25 * masks["2"].numel())
    assert int((~masks["5"]).sum()) == round(0.5 * masks["5"].numel())
    # global scope with per_layer: the named layer keeps its own amount
    g = prune.unstructured(small_cnn(), 0.5, scope="global", per_layer={"0": 0.1})
    assert int((~g["0"]).sum()) == round(0.1 * 36)
    assert sum(int((~g[n]).sum()) for n in ("2", "5")) == round(0.5 * (g["2"].numel() + g["5"].numel()))
    # w^2 ranks as |w| does
    a, b = prune.unstructured(small_cnn(), 0.7, criterion="l1"), prune.unstructured(small_cnn(), 0.7, criterion="l2")
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_masks_hold_through_training_and_only_tighten():
    m = small_cnn()
    m1 = prune.unstructured(m, 0.5)
    opt = torch.optim.SGD(m.parameters(), lr=0.5, momentum=0.9, weight_decay=1e-2)
    for _ in range(3):
        opt.zero_grad()
        m(torch.randn(4, 1, 8, 8)).pow(2).mean().backward()
        opt.step()
    for n, k in m1.items():
        assert (m.get_submodule(n).weight.detach()[~k] == 0).all(), n
    m2 = prune.unstructured(m, 0.8)
    for n in m1:
        assert not (m2[n] & ~m1[n]).any()  # never revives a pruned weight
        assert int((~m2[n]).sum()) == round(0.8 * m2[n].numel())  # the already pruned counted in
    m3 = prune.unstructured(m, 0.3)  # lower than in force: nothing changes
    assert all(torch.equal(m3[n], m2[n]) for n in m2)


def test_shared_module_pruned_once():
    lin = nn.Linear(16, 16)
    m = nn.Sequential(lin, nn.ReLU(), lin)
    masks = prune.unstructured(m, 0.5)
    assert list(masks) == ["0"] and int((~masks["0"]).sum()) == 128


@pytest.fixture(scope="module")
def digits_mlp():
    xtr, ytr, xte, yte = digits_tensors(0)
    torch.manual_seed(0)
    m = fit(nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10)), xtr, ytr, 15, 3e-3)
    return m, (xtr, ytr, xte, yte)


@pytest.mark.parametrize("criterion", ["magnitude", "taylor", "obd"])
def test_criteria_on_digits(digits_mlp, criterion):
    model, (xtr, ytr, xte, yte) = digits_mlp
    base = accuracy(model, xte, yte)
    assert base > 94
    loader = DataLoader(TensorDataset(xtr[:256], ytr[:256]), batch_size=8)
    m = copy.deepcopy(model)
    masks = prune.unstructured(m, 0.5, criterion=criterion, data=loader, progress=False)
    assert all(int((~k).sum()) == round(0.5 * k.numel()) for k in masks.values())
    # measured here (dense 95.9%), 50% of each layer, no fine-tuning: magnitude 92.2%, obd 88.1%, taylor 85.4%
    assert accuracy(m, xte, yte) > base - 15
    # scoring ran on the original weights and wrote no .grad
    assert all(p.grad is None for p in m.parameters())


def test_blocks_magnitude_is_block_magnitude_and_criteria():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(96, 128), nn.ReLU(), nn.Linear(128, 70))
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    ma = prune.block_magnitude(a, 0.5, block=(32, 32))
    mb = prune.blocks(b, 0.5, block=(32, 32))
    assert ma.keys() == mb.keys() and all(torch.equal(ma[n], mb[n]) for n in ma)
    assert all(torch.equal(pa, pb) for pa, pb in zip(a.state_dict().values(), b.state_dict().values()))
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(16, 96, generator=g), torch.randint(0, 70, (16,), generator=g)) for _ in range(3)]
    for crit in ("l1", "taylor", "obd"):
        m = copy.deepcopy(model)
        masks = prune.blocks(m, 0.5, block=(32, 32), criterion=crit, data=data, per_layer={"2": 0.25},
                             progress=False)
        assert int((~masks["0"]).sum()) == 0.5 * 96 * 128
        assert int((~block_mask(masks["2"].float(), 32, 32)).sum()) == 3  # 25% of the 3 x 4 blocks
    gm = prune.blocks(copy.deepcopy(model), 0.5, block=(32, 32), criterion="obd", data=data, scope="global",
                      progress=False)
    assert set(gm) == {"0", "2"}


def test_dict_inputs():
    class D(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 3)

        def forward(self, features):
            return self.fc(features)

    m = D()
    data = [({"features": torch.randn(4, 8)}, torch.randint(0, 3, (4,)))]
    masks = prune.unstructured(m, 0.5, criterion="obd", data=data, progress=False)
    assert int((~masks["fc"]).sum()) == 12


@pytest.mark.parametrize("kwargs,err,match", [
    (dict(sparsity=-0.1), ValueError, "sparsity"),
    (dict(sparsity=1.0), ValueError, r"sparsity must be in \[0, 1\)"),
    (dict(sparsity=float("nan")), ValueError, "sparsity"),
    (dict(sparsity="half"), TypeError, "sparsity"),
    (dict(criterion="l3"), ValueError, r"criterion must be one of \('magnitude', 'l1', 'l2', 'taylor', 'obd'\)"),
    (dict(criterion="taylor"), ValueError, "criterion='taylor' needs gradients: give data"),
    (dict(criterion="obd"), ValueError, "criterion='obd' needs gradients: give data"),
    (dict(criterion="obd", data=[]), ValueError, "data gave no batches"),
    (dict(criterion="obd", data=[torch.randn(2, 1, 8, 8)]), TypeError, r"data batch 0 must be an \(inputs, target\)"),
    (dict(scope="row"), ValueError, "scope"),
    (dict(skip=["9"]), ValueError, r"skip: no layer named \['9'\]"),
    (dict(per_layer={"7": 0.5}), ValueError, r"per_layer: no layer named \['7'\]"),
    (dict(per_layer={"1": 0.5}), ValueError, r"per_layer: \['1'\] are not Linear / Conv2d layers"),
    (dict(per_layer={"0": 0.5}, skip=["0"]), ValueError, "per_layer"),
    (dict(per_layer={"0": 1.5}), ValueError, r"per_layer\['0'\]"),
])
def test_bad_input_leaves_model_as_it_was(kwargs, err, match):
    m = small_cnn()
    before = _state(m)
    args = dict(sparsity=0.5)
    args.update(kwargs)
    with pytest.raises(err, match=match):
        prune.unstructured(m, args.pop("sparsity"), **args)
    after = _state(m)
    assert after[1] == before[1] and all(torch.equal(after[0][k], v) for k, v in before[0].items())
    assert not any(parametrize.is_parametrized(t) for t in m.modules())


@pytest.mark.parametrize("kwargs,match", [
    (dict(criterion="obd"), "needs gradients"), (dict(block=(32, 0)), "block"), (dict(per_layer={"0": 0.5}), "Linear"),
    (dict(criterion="abs"), "criterion must be one of"), (dict(sparsity=1.2), "sparsity"),
])
def test_blocks_bad_input(kwargs, match):
    m = small_cnn()
    before = _state(m)
    args = dict(sparsity=0.5)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        prune.blocks(m, args.pop("sparsity"), **args)
    assert all(torch.equal(m.state_dict()[k], v) for k, v in before[0].items())
    assert not any(parametrize.is_parametrized(t) for t in m.modules())


def test_a_failing_loss_leaves_the_model_as_it_was():
    m = digits_cnn(4)
    before = _state(m)

    def bad_loss(out, y):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        prune.unstructured(m, 0.5, criterion="taylor", data=[(torch.randn(2, 1, 8, 8), torch.tensor([0, 1]))],
                           loss_fn=bad_loss, progress=False)
    assert all(torch.equal(m.state_dict()[k], v) for k, v in before[0].items())
    assert not any(parametrize.is_parametrized(t) for t in m.modules())


def test_layers_left_whole_are_not_parametrized():
    m = small_cnn()
    masks = prune.unstructured(m, 0.0, per_layer={"2": 0.5})
    assert masks["0"].all() and not parametrize.is_parametrized(m[0]) and parametrize.is_parametrized(m[2])
    lin = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64))
    prune.blocks(lin, 0.0, block=(16, 16), per_layer={"1": 0.5})
    assert not parametrize.is_parametrized(lin[0]) and parametrize.is_parametrized(lin[1])
