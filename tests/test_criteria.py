"""pysparse.prune.criteria and the calibration pass behind the gradient criteria: each criterion
computes what its formula says, against gradients taken independently by backward, and the one
implementation serves elements, blocks and filters alike."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from pysparse import prune
from pysparse.prune import criteria
from pysparse.prune._calib import gradient_stats


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.bn = nn.BatchNorm1d(8)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(F.relu(self.bn(self.fc1(x))))


def _data(n: int = 3, b: int = 8):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(b, 6, generator=g), torch.randint(0, 3, (b,), generator=g)) for _ in range(n)]


def _per_batch_grads(m: nn.Module, data) -> list[dict[str, torch.Tensor]]:
    """Gradients by plain backward, one batch at a time, on copies in eval mode."""
    out = []
    for x, y in data:
        mm = copy.deepcopy(m).eval()
        F.cross_entropy(mm(x), y).backward()
        out.append({"fc1": mm.fc1.weight.grad, "fc2": mm.fc2.weight.grad})
    return out


def test_element_scores_formulas():
    w = torch.tensor([[1.0, -2.0], [0.5, 0.0]])
    g = torch.tensor([[0.1, 0.3], [-2.0, 5.0]])
    h = torch.tensor([[4.0, 1.0], [2.0, 3.0]])
    torch.testing.assert_close(criteria.element_scores("l1", w), w.abs())
    torch.testing.assert_close(criteria.element_scores("l2", w), w * w)
    torch.testing.assert_close(criteria.element_scores("taylor", w, grad=g), w * g)
    torch.testing.assert_close(criteria.element_scores("obd", w, fisher=h), 0.5 * h * w * w)
    # the element is its own unit: taylor's |.| per element; the other scores are non-negative already
    torch.testing.assert_close(criteria.importance("taylor", w, grad=g), (w * g).abs())
    torch.testing.assert_close(criteria.importance("obd", w, fisher=h), 0.5 * h * w * w)
    # a unit (a row) sums the signed scores first, then |.| (Molchanov et al.)
    torch.testing.assert_close(criteria.unit_scores("taylor", w * g), (w * g).sum(1).abs())


@pytest.mark.parametrize("criterion,match", [("taylor", "needs gradients"), ("obd", "needs the empirical Fisher"),
                                             ("l3", "criterion must be one of")])
def test_element_scores_errors(criterion, match):
    with pytest.raises(ValueError, match=match):
        criteria.element_scores(criterion, torch.ones(2, 2))


def test_check_criterion_names_choices_and_magnitude_is_l1():
    assert criteria.check_criterion("magnitude", criteria.PRUNE_CRITERIA) == "l1"
    assert criteria.check_criterion("obd", criteria.PRUNE_CRITERIA) == "obd"
    with pytest.raises(ValueError, match=r"criterion must be one of \('magnitude', 'l1', 'l2', 'taylor', 'obd'\)"):
        criteria.check_criterion("hessian", criteria.PRUNE_CRITERIA)


def test_gradient_stats_match_backward():
    torch.manual_seed(0)
    m = MLP()
    m.train()
    data = _data()
    ref = _per_batch_grads(m, data)
    bn_before = m.bn.running_mean.clone()
    grad, fisher = gradient_stats(m, {"fc1": m.fc1, "fc2": m.fc2}, data, None, "obd", progress=False)
    for n in ("fc1", "fc2"):
        # float32 sums of 3 batches in a different order: a few ulps
        torch.testing.assert_close(grad[n], sum(r[n] for r in ref) / 3, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(fisher[n], sum(r[n] ** 2 for r in ref) / 3, rtol=1e-5, atol=1e-9)
    assert m.training and m.bn.training  # flags restored; the pass itself ran in eval mode
    assert torch.equal(m.bn.running_mean, bn_before)
    assert all(p.grad is None for p in m.parameters())


def test_gradient_stats_inputs_tuple_dict_dataloader_and_masked():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(6, 3), nn.Linear(6, 3)

        def forward(self, x, z):
            return self.a(x) + self.b(z)

    torch.manual_seed(0)
    m = Two()
    x, z, y = torch.randn(16, 6), torch.randn(16, 6), torch.randint(0, 3, (16,))
    g_tuple, _ = gradient_stats(m, {"a": m.a}, [((x, z), y)], None, "taylor", progress=False)
    g_dict, _ = gradient_stats(m, {"a": m.a}, [({"x": x, "z": z}, y)], None, "taylor", progress=False)
    torch.testing.assert_close(g_tuple["a"], g_dict["a"])
    single = nn.Linear(6, 3)
    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    g_loader, _ = gradient_stats(single, {"": single}, loader, None, "taylor", progress=False)
    assert g_loader[""].shape == (3, 6)
    # under a mask the gradient is the stored weight's: zero where masked
    prune.apply_mask(single, torch.tensor([[True] * 6, [False] * 6, [True] * 6]))
    g_masked, _ = gradient_stats(single, {"": single}, loader, None, "taylor", progress=False)
    assert (g_masked[""][1] == 0).all() and (g_masked[""][0] != 0).all()


def test_gradient_stats_errors():
    m = MLP()
    with pytest.raises(ValueError, match="data gave no batches"):
        gradient_stats(m, {"fc1": m.fc1}, [], None, "obd", progress=False)
    with pytest.raises(TypeError, match=r"data batch 0 must be an \(inputs, target\) pair"):
        gradient_stats(m, {"fc1": m.fc1}, [torch.randn(2, 6)], None, "obd", progress=False)
    with pytest.raises(TypeError, match="loss_fn must return a scalar"):
        gradient_stats(m, {"fc1": m.fc1}, _data(1), lambda o, t: o, "obd", progress=False)


def test_obd_prunes_a_large_weight_the_loss_does_not_see():
    # Input feature 0 is always zero: its weights are the largest, yet no loss depends on them
    # (h_ii = 0), so OBD removes them first and magnitude keeps them.
    torch.manual_seed(0)
    lin = nn.Linear(6, 3)
    with torch.no_grad():
        lin.weight[:, 0] = 5.0
    g = torch.Generator().manual_seed(2)
    data = []
    for _ in range(4):
        x = torch.randn(16, 6, generator=g)
        x[:, 0] = 0
        data.append((x, torch.randint(0, 3, (16,), generator=g)))
    obd = prune.unstructured(copy.deepcopy(lin), 0.2, criterion="obd", data=data, progress=False)[""]
    mag = prune.unstructured(copy.deepcopy(lin), 0.2, criterion="magnitude")[""]
    assert not obd[:, 0].any() and mag[:, 0].all()
    # taylor: w * dL/dw is 0 there too
    tay = prune.unstructured(copy.deepcopy(lin), 0.2, criterion="taylor", data=data, progress=False)[""]
    assert not tay[:, 0].any()


@pytest.mark.parametrize("criterion", ["taylor", "obd"])
def test_unstructured_ranks_by_the_formula(criterion):
    torch.manual_seed(0)
    m = MLP()
    data = _data()
    ref = _per_batch_grads(m, data)
    w = m.fc1.weight.detach()
    if criterion == "taylor":
        score = (w * sum(r["fc1"] for r in ref) / 3).abs()
    else:
        score = 0.5 * (sum(r["fc1"] ** 2 for r in ref) / 3) * w ** 2
    k = int(round(0.5 * w.numel()))
    expect = torch.ones(w.numel(), dtype=torch.bool)
    expect[score.flatten().argsort()[:k]] = False
    got = prune.unstructured(m, 0.5, criterion=criterion, data=data, progress=False)["fc1"]
    # the same ranking up to near-ties at the threshold (float sums in another order)
    assert (got.flatten() != expect).sum() <= 2


def test_block_scores_share_the_element_criteria():
    torch.manual_seed(0)
    w, g, h = torch.randn(8, 8), torch.randn(8, 8), torch.rand(8, 8)
    s = criteria.block_scores(w, 4, 4, "obd", fisher=h)
    torch.testing.assert_close(s[0, 1], (0.5 * h * w * w)[:4, 4:].mean())
    s = criteria.block_scores(w, 4, 4, "taylor", grad=g)
    torch.testing.assert_close(s[1, 0], (w * g)[4:, :4].sum().abs() / 16)
    s = criteria.block_scores(w, 4, 4, "l2")
    torch.testing.assert_close(s[1, 1], w[4:, 4:].pow(2).mean().sqrt())
