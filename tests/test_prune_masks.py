"""Masks that cannot regrow, and conversions that leave the model as it was on any error."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import pysparse
from pysparse import prune
from pysparse.nn import BlockSparseLinear, Int8Linear


class Attn(nn.Module):
    def __init__(self, d: int = 128) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(d, 4, batch_first=True)
        self.ff = nn.Linear(d, d)

    def forward(self, x):
        return self.ff(self.attn(x, x, x, need_weights=False)[0])


def _state(model: nn.Module) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(model: nn.Module, before: dict, kinds: list) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k in before:
        assert torch.equal(after[k].isnan(), before[k].isnan()) and torch.equal(after[k].nan_to_num(), before[k].nan_to_num()), k
    assert [type(m) for m in model.modules()] == kinds


def test_mha_out_proj_mask_does_not_regrow():
    # MultiheadAttention reads out_proj.weight itself and never calls out_proj.forward, so a
    # forward pre-hook never re-applied the mask there: 7168 pruned weights regrew after 2 steps.
    torch.manual_seed(0)
    m = Attn()
    masks = prune.block_magnitude(m, 0.5, block=(64, 32))
    assert "attn.out_proj" in masks
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2)
    for _ in range(2):
        opt.zero_grad()
        m(torch.randn(2, 5, 128)).pow(2).mean().backward()
        opt.step()
    m(torch.randn(1, 5, 128))
    for name, mask in masks.items():
        w = m.get_submodule(name).weight
        assert int((w.detach()[~mask] != 0).sum()) == 0, name
    # the attention really computes with the masked weight: zeroing the masked entries of the
    # stored original changes nothing
    x = torch.randn(1, 5, 128)
    y = m(x)
    orig = m.attn.out_proj.parametrizations.weight.original
    with torch.no_grad():
        orig[~masks["attn.out_proj"]] = 0
    torch.testing.assert_close(m(x), y, rtol=0, atol=0)


def test_mask_seen_by_export_and_direct_reads():
    lin = nn.Linear(64, 64)
    mask = prune.block_magnitude(lin, 0.5, block=(32, 32))[""]
    with torch.no_grad():  # an optimizer-like write into the stored weight
        lin.parametrizations.weight.original.add_(1.0)
    assert (lin.weight[~mask] == 0).all()
    x = torch.randn(3, 64)
    ep = torch.export.export(lin, (x,))
    torch.testing.assert_close(ep.module()(x), x @ (lin.weight.detach()).T + lin.bias.detach())
    prune.remove(lin)
    assert not hasattr(lin, "parametrizations") or "weight" not in lin.parametrizations
    assert (lin.weight[~mask] == 0).all()


def test_masks_tighten_and_state_dict():
    lin = nn.Linear(128, 128)
    m1 = prune.block_magnitude(lin, 0.25, block=(32, 32))[""]
    m2 = prune.block_magnitude(lin, 0.5, block=(32, 32))[""]
    assert not (m2 & ~m1).any()
    assert prune.get_mask(lin) is not None and torch.equal(prune.get_mask(lin), m2)
    other = nn.Linear(128, 128)
    prune.block_magnitude(other, 0.5, block=(32, 32))
    other.load_state_dict(lin.state_dict())
    assert torch.equal(other.weight, lin.weight)


@pytest.mark.parametrize("kwargs, match", [
    (dict(sparsity=-0.1), "sparsity"),
    (dict(sparsity=float("nan")), "sparsity"),
    (dict(sparsity=1.0), "sparsity"),
    (dict(sparsity=0.5, block=(64, 0)), "block"),
    (dict(sparsity=0.5, block=(64,)), "block"),
    (dict(sparsity=0.5, skip=["nope"]), "skip"),
    (dict(sparsity=0.5, scope="row"), "scope"),
])
def test_block_magnitude_bad_args(kwargs, match):
    m = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64))
    before, kinds = _state(m), [type(x) for x in m.modules()]
    with pytest.raises(ValueError, match=match):
        prune.block_magnitude(m, **kwargs)
    _same(m, before, kinds)


@pytest.mark.parametrize("kwargs, match", [
    (dict(sparsity=-0.1), "sparsity"),
    (dict(sparsity=float("nan")), "sparsity"),
    (dict(sparsity=0.5, dtype=torch.float16), "float16"),
    (dict(sparsity=0.5, dtype=torch.float64), "dtype"),
    (dict(sparsity=0.5, dtype=torch.int32), "dtype"),
    (dict(sparsity=0.5, block=(48, 32)), "block"),
    (dict(sparsity=0.5, block=(64, 0)), "block"),
    (dict(sparsity=0.5, block=(64, 33), dtype=torch.bfloat16), "bk"),
    (dict(sparsity=0.5, skip="missing"), "skip"),
])
def test_sparsify_bad_args_leave_model_as_it_was(kwargs, match):
    # The first layer used to be pruned in place before the error surfaced.
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 64))
    before, kinds = _state(m), [type(x) for x in m.modules()]
    with pytest.raises(ValueError, match=match):
        pysparse.sparsify(m, dispatch="sparse", **kwargs)
    _same(m, before, kinds)


def test_sparsify_never_prunes_the_users_layer_in_place():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 64))
    ref = copy.deepcopy(m)
    lin0 = m[0]
    out = pysparse.sparsify(m, 0.5, dispatch="sparse")
    assert isinstance(out[0], BlockSparseLinear)
    assert torch.equal(lin0.weight, ref[0].weight)  # the replaced Linear object itself is intact


def test_quantize_failure_leaves_model_as_it_was():
    m = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64))
    with torch.no_grad():
        m[2].weight[0, 0] = float("nan")
    before, kinds = _state(m), [type(x) for x in m.modules()]
    with pytest.raises(ValueError, match="NaN"):
        pysparse.quantize_int8(m)
    _same(m, before, kinds)
    for bad, match in [(dict(group_size=48), "group_size"), (dict(skip=["3"]), "skip"),
                       (dict(activations="static"), "calibration_data"), (dict(smoothquant_alpha=2.0), "smoothquant")]:
        with pytest.raises(ValueError, match=match):
            pysparse.quantize_int8(m, **bad)
        _same(m, before, kinds)


def test_one_target_predicate():
    # quantize, sparsify and prune agree: MultiheadAttention's out_proj is pruned (masks work
    # there) but never replaced (the attention would not call the replacement).
    m = Attn()
    assert "attn.out_proj" in prune.block_magnitude(copy.deepcopy(m), 0.5, block=(64, 32))
    q = pysparse.quantize_int8(copy.deepcopy(m))
    assert isinstance(q.ff, Int8Linear) and type(q.attn.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
    s = pysparse.sparsify(copy.deepcopy(m), 0.5, dispatch="sparse")
    assert isinstance(s.ff, BlockSparseLinear) and not isinstance(s.attn.out_proj, BlockSparseLinear)
    x = torch.randn(1, 3, 128)
    q(x), s(x)
