"""pysparse.prune.sensitivity and SensitivityTable: trials equal the pruning calls they stand for,
the model ends bitwise as given (also when eval_fn raises), bad eval_fn results are named, the
table prints / saves / plots, and allocate meets the global target with the least predicted loss
-- and, measured on a digits MLP, beats a uniform amount at the same sparsity."""
from __future__ import annotations

import copy
import itertools
import json

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from pysparse import prune
from pysparse.cnn_digits import accuracy, digits_cnn, digits_tensors, fit
from pysparse.prune import SensitivityTable


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # tiny models on a shared 2-core machine: one thread is 5-10x faster than two under load
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def digits():
    xtr, ytr, xte, yte = digits_tensors(0)
    # a validation split held out of training: sensitivity measures on it, the claim on the test split
    return (xtr[:-300], ytr[:-300]), (xtr[-300:], ytr[-300:]), (xte, yte)


@pytest.fixture(scope="module")
def mlp(digits):
    (xt, yt), _, _ = digits
    torch.manual_seed(0)
    m = nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))
    return fit(m, xt, yt, 15, 2e-3, batch=128)


def _snapshot(m: nn.Module):
    return ({k: v.clone() for k, v in m.state_dict().items()}, [(n, p.requires_grad) for n, p in m.named_parameters()],
            [t.training for t in m.modules()], [type(t) for t in m.modules()])


def _bitwise_same(m: nn.Module, snap) -> None:
    state, flags, modes, kinds = snap
    now = m.state_dict()
    assert now.keys() == state.keys()
    for k, v in state.items():
        assert torch.equal(now[k].view(-1).view(torch.int32) if v.dtype == torch.float32 else now[k],
                           v.view(-1).view(torch.int32) if v.dtype == torch.float32 else v), k
    assert [(n, p.requires_grad) for n, p in m.named_parameters()] == flags
    assert [t.training for t in m.modules()] == modes and [type(t) for t in m.modules()] == kinds


def test_trials_equal_the_pruning_calls(mlp, digits):
    _, (xv, yv), _ = digits
    m = copy.deepcopy(mlp)
    snap = _snapshot(m)
    ev = lambda mm: accuracy(mm, xv, yv)  # noqa: E731
    t = prune.sensitivity(m, ev, levels=(0.5, 0.9), progress=False)
    _bitwise_same(m, snap)
    assert t.layers == ["1", "3", "5"] and t.levels == (0.5, 0.9) and t.granularity == "unstructured"
    assert t.params == {"1": 64 * 128, "3": 128 * 128, "5": 1280}
    assert t.baseline == ev(mlp)
    for layer in t.layers:
        c = copy.deepcopy(mlp)
        prune.unstructured(c, 0.0, per_layer={layer: 0.9})
        assert t.metric(layer, 0.9) == ev(c)
    assert t.metric("5", 0.7) == pytest.approx((t.metric("5", 0.5) + t.metric("5", 0.9)) / 2)
    assert t.metric("1", 0.0) == t.baseline
    with pytest.raises(KeyError, match="'9' was not measured"):
        t.metric("9", 0.5)


def test_allocated_amounts_beat_uniform_on_digits_mlp(mlp, digits):
    """The issue's claim, measured: sensitivity on the validation split, accuracy on the test split,
    no fine-tuning. Measured here (seed 0; the dense model 96.1%): at 80% global sparsity
    allocated 93.5% vs uniform 82.0%; at 90% 81.1% vs 32.0%."""
    _, (xv, yv), (xte, yte) = digits
    t = prune.sensitivity(mlp, lambda mm: accuracy(mm, xv, yv), levels=(0.2, 0.4, 0.6, 0.8, 0.9, 0.95),
                          progress=False)
    total = sum(t.params.values())
    for target in (0.8, 0.9):
        amounts = t.allocate(target)
        assert sum(amounts[n] * t.params[n] for n in t.layers) / total == pytest.approx(target)
        assert max(amounts.values()) <= 0.95
        alloc, uniform = copy.deepcopy(mlp), copy.deepcopy(mlp)
        ma = prune.unstructured(alloc, target, per_layer=amounts)
        mu = prune.unstructured(uniform, target)
        za = sum(int((~k).sum()) for k in ma.values())
        zu = sum(int((~k).sum()) for k in mu.values())
        assert abs(za - zu) <= len(t.layers)  # the same global sparsity (per-layer rounding)
        acc_a, acc_u = accuracy(alloc, xte, yte), accuracy(uniform, xte, yte)
        print(f"target {target}: allocated {acc_a:.1f}% {amounts} vs uniform {acc_u:.1f}%")
        assert acc_a > acc_u + 3


def _synthetic(losses: dict[str, list[float]], params: dict[str, int], levels=(0.25, 0.5, 0.75)):
    return SensitivityTable(baseline=1.0, levels=levels, layers=list(losses), params=params,
                            granularity="unstructured", results={n: [1.0 - v for v in ls] for n, ls in losses.items()})


def test_allocate_least_predicted_loss_against_brute_force():
    t = _synthetic({"a": [0.0, 0.01, 0.5], "b": [0.02, 0.05, 0.06], "c": [0.2, 0.3, 0.9]},
                   {"a": 100, "b": 300, "c": 100})
    grid = (0.0, 0.25, 0.5, 0.75)
    total = 500
    for target in (0.2, 0.3, 0.5, 0.6):
        got = t.allocate(target)
        mean = sum(got[n] * t.params[n] for n in t.layers) / total
        assert mean == pytest.approx(target)
        pred = sum(t.loss(n, got[n]) for n in t.layers)
        # the best combination of measured levels whose mean is at least the target: allocate's
        # interpolated answer (exactly the target) predicts no more loss than it
        best = min(sum(t.loss(n, a) for n, a in zip(t.layers, combo)) for combo in itertools.product(grid, repeat=3)
                   if sum(a * t.params[n] for n, a in zip(t.layers, combo)) / total >= target - 1e-9)
        assert pred <= best + 1e-9, (target, got)
    assert t.allocate(0.0) == {"a": 0.0, "b": 0.0, "c": 0.0}
    capped = t.allocate(0.4, max_level=0.5)
    assert max(capped.values()) <= 0.5
    with pytest.raises(ValueError, match=r"target must be in \[0, max_level=0.5\]"):
        t.allocate(0.6, max_level=0.5)
    with pytest.raises(ValueError, match="max_level"):
        t.allocate(0.5, max_level=0.9)
    # a lower-is-better metric (a loss): higher numbers are the damage
    lo = SensitivityTable(baseline=0.1, levels=(0.5,), layers=["a", "b"], params={"a": 1, "b": 1},
                          granularity="unstructured", higher_is_better=False, results={"a": [0.9], "b": [0.2]})
    assert lo.allocate(0.25) == {"a": 0.0, "b": 0.5}


class _Flaky:
    def __init__(self, fail_at: int, value=None):
        self.calls, self.fail_at, self.value = 0, fail_at, value

    def __call__(self, m):
        self.calls += 1
        if self.calls == self.fail_at:
            if self.value is None:
                raise ZeroDivisionError("bad metric")
            return self.value
        with torch.no_grad():
            return float(m(torch.ones(2, 1, 8, 8)).sum())


@pytest.mark.parametrize("fail_at,value,err,match", [
    (1, None, RuntimeError, r"eval_fn raised ZeroDivisionError \(the model as given\): bad metric"),
    (4, None, RuntimeError, r"eval_fn raised ZeroDivisionError \(layer '3' at sparsity 0.5\)"),
    (2, float("nan"), ValueError, r"eval_fn returned nan \(layer '0' at sparsity 0.5\)"),
    (2, "high", TypeError, "eval_fn must return a number, got str"),
    (2, None, RuntimeError, "eval_fn raised"),
    (3, [1.0], TypeError, "eval_fn must return a number, got list"),
])
def test_bad_eval_fn_named_and_model_bitwise_as_given(fail_at, value, err, match):
    m = digits_cnn(4).train()
    prune.unstructured(m, 0.3)  # masks already held: they stay exactly as they were
    for p in m[0].parameters():
        p.requires_grad_(False)
    snap = _snapshot(m)
    with pytest.raises(err, match=match):
        prune.sensitivity(m, _Flaky(fail_at, value), levels=(0.5, 0.9), progress=False)
    _bitwise_same(m, snap)
    with pytest.raises(TypeError, match="eval_fn must return a number, got NoneType"):
        prune.sensitivity(m, lambda mm: None, progress=False)
    _bitwise_same(m, snap)


def test_eval_fn_that_changes_the_model_is_undone():
    m = digits_cnn(4)
    snap = _snapshot(m)

    def meddling(mm):
        mm.train()
        mm(torch.randn(8, 1, 8, 8))  # BatchNorm running statistics move
        with torch.no_grad():
            mm[0].weight.add_(1.0)
        return 1.0

    prune.sensitivity(m, meddling, levels=(0.5,), progress=False)
    _bitwise_same(m, snap)


@pytest.mark.parametrize("kwargs,err,match", [
    (dict(levels=(0.5, 1.0)), ValueError, "levels"),
    (dict(levels=()), ValueError, "levels"),
    (dict(levels=(0.0, 0.5)), ValueError, "levels"),
    (dict(granularity="channel"), ValueError, "granularity must be one of"),
    (dict(criterion="fisher"), ValueError, "criterion must be one of"),
    (dict(criterion="obd"), ValueError, "needs gradients: give data"),
    (dict(criterion="obd", data=[]), ValueError, "data gave no batches"),
    (dict(layers=["nope"]), ValueError, r"layers: no layer named \['nope'\]"),
    (dict(layers=["1"]), ValueError, r"layers: \['1'\] are not Linear / Conv2d layers"),
    (dict(max_layers=0), ValueError, "max_layers"),
    (dict(granularity="filter"), ValueError, "needs example_inputs"),
    (dict(granularity="block", block=(0, 4)), ValueError, "block"),
])
def test_bad_arguments(kwargs, err, match):
    m = digits_cnn(4)
    snap = _snapshot(m)
    with pytest.raises(err, match=match):
        prune.sensitivity(m, lambda mm: 1.0, progress=False, **kwargs)
    _bitwise_same(m, snap)
    with pytest.raises(TypeError, match="eval_fn must be a callable"):
        prune.sensitivity(m, 1.0)


def test_block_and_filter_granularity_and_layer_limits():
    torch.manual_seed(0)
    m = digits_cnn(4).eval()
    x = torch.randn(16, 1, 8, 8)
    ev = lambda mm: float(mm(x).detach().square().mean())  # noqa: E731
    snap = _snapshot(m)
    t = prune.sensitivity(m, ev, levels=(0.5,), granularity="filter", example_inputs=(x[:2],),
                          higher_is_better=False, progress=False)
    _bitwise_same(m, snap)
    # the head (the model's output) cannot lose channels; conv 0 .. conv 10 are four groups
    assert t.layers == ["0", "3", "7", "10"]
    c = copy.deepcopy(m)
    prune.filters(c, 0.0, per_layer={"7": 0.5}, example_inputs=(x[:2],))
    assert t.metric("7", 0.5) == ev(c)
    lin = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))
    tb = prune.sensitivity(lin, lambda mm: float(mm(torch.ones(1, 64)).detach().sum()), levels=(0.5,),
                           granularity="block", block=(16, 16), max_layers=2, progress=False)
    assert tb.layers == ["0", "2"]
    c = copy.deepcopy(lin)
    prune.blocks(c, 0.0, block=(16, 16), per_layer={"2": 0.5})
    assert tb.metric("2", 0.5) == float(c(torch.ones(1, 64)).detach().sum())
    tl = prune.sensitivity(lin, lambda mm: 1.0, levels=(0.5,), layers=["4", "2"], progress=False)
    assert tl.layers == ["4", "2"]


def test_gradient_criterion_scored_once_on_the_model_as_given(mlp, digits):
    (xt, yt), (xv, yv), _ = digits
    data = [(xt[i:i + 64], yt[i:i + 64]) for i in range(0, 256, 64)]
    t = prune.sensitivity(mlp, lambda mm: accuracy(mm, xv, yv), levels=(0.5,), criterion="obd", data=data,
                          max_layers=1, progress=False)
    c = copy.deepcopy(mlp)
    prune.unstructured(c, 0.0, per_layer={"1": 0.5}, criterion="obd", data=data, progress=False)
    assert t.metric("1", 0.5) == accuracy(c, xv, yv) and t.criterion == "obd"


def test_table_prints_saves_and_plots(tmp_path):
    t = _synthetic({"enc.0": [0.0, 0.1, 0.4], "head": [0.05, 0.2, 0.6]}, {"enc.0": 1000, "head": 10})
    s = str(t)
    assert "enc.0" in s and "head" in s and "0.75" in s and "baseline 1" in s
    rows = t.rows()
    assert len(rows) == 6 and rows[0] == {"layer": "enc.0", "params": 1000, "sparsity": 0.25, "metric": 1.0,
                                          "loss": 0.0}
    t.to_csv(tmp_path / "t.csv")
    lines = (tmp_path / "t.csv").read_text().splitlines()
    assert lines[0] == "layer,params,sparsity,metric,loss" and len(lines) == 7
    t.to_json(tmp_path / "t.json")
    back = SensitivityTable.from_json(tmp_path / "t.json")
    assert back == t
    (tmp_path / "bad.json").write_text(json.dumps({"levels": [0.5]}))
    with pytest.raises(ValueError, match="not a pysparse sensitivity table"):
        SensitivityTable.from_json(tmp_path / "bad.json")
    fig = t.plot(tmp_path / "t.png")
    ax = fig.axes[0]
    assert len(ax.lines) == 3  # one curve per layer and the baseline
    assert list(ax.lines[0].get_xdata()) == [0.0, 0.25, 0.5, 0.75]
    assert (tmp_path / "t.png").stat().st_size > 1000
    assert not parametrize.is_parametrized(nn.Linear(1, 1))


def test_progress_bars(capsys):
    lin = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    data = [(torch.randn(4, 8), torch.randint(0, 3, (4,)))]
    prune.sensitivity(lin, lambda mm: 1.0, levels=(0.5,), criterion="obd", data=data)
    err = capsys.readouterr().err
    assert "pysparse sensitivity (unstructured)" in err and "pysparse sensitivity (obd)" in err
    prune.unstructured(lin, 0.5, criterion="obd", data=data)
    assert "pysparse unstructured (obd)" in capsys.readouterr().err
