"""pysparse.recover on real tasks (scikit-learn's digits, models trained here with fixed
seeds): a filter-pruned, compacted CNN; an 80% block-sparse int8 MLP; quantization-aware
recovery into the same int8 layer kinds; dict / model-output models; bad input."""
import copy
import time

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import pysparse
from pysparse.cnn_digits import accuracy, digits_tensors, fit, train_digits_cnn
from pysparse.nn import BsrInt8Linear, DenseInt8KeptLinear, Int8Conv2d, Int8Linear
from pysparse.prune.masks import get_mask
from pysparse.recover import distillation_loss, recalibrate_batchnorm, recover


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # 2 shared cores: one thread per test process is several times faster than two here
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def loader(x, y, batch=64, seed=0, shuffle=True):
    return DataLoader(TensorDataset(x, y), batch_size=batch, shuffle=shuffle,
                      generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def digits_mlp():
    xtr, ytr, xte, yte = digits_tensors(0)
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                        nn.Linear(256, 10))
    fit(mlp, xtr.flatten(1), ytr, 12, 2e-3, batch=128)
    return mlp, (xtr.flatten(1), ytr, xte.flatten(1), yte)


@pytest.fixture(scope="module")
def digits_cnn():
    # width 16 (pruned to 8, 16, 32, 32): at width 8 the halved CNN recovered to 98.5-98.9% of a 99.4% teacher
    return train_digits_cnn(width=16, epochs=6)


def test_compacted_cnn_recovers_within_half_a_point(digits_cnn):
    # (a) issue 9: 50% of the filters pruned and compacted, recovered with the original as teacher
    t0 = time.perf_counter()
    model, (xtr, ytr, xte, yte) = digits_cnn
    base = accuracy(model, xte, yte)
    pruned = copy.deepcopy(model)
    pysparse.prune.filters(pruned, 0.5, criterion="l1", example_inputs=(xtr[:2],))
    student = pysparse.compact(pruned, (xtr[:2],), fold_bn=False)
    convs = [m for m in student.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [8, 16, 32, 32]  # half of 16, 32, 64, 64
    one_shot = accuracy(student, xte, yte)
    recover(student, model, loader(xtr, ytr), epochs=5, lr=3e-3, progress=False)
    got = accuracy(student, xte, yte)
    print(f"\ndigits CNN: original {base:.2f}%, 50% filters pruned + compacted {one_shot:.2f}%, recovered "
          f"{got:.2f}% ({time.perf_counter() - t0:.1f} s)")
    assert got >= base - 0.5, (base, one_shot, got)
    assert not student.training and not model.training  # modes as given (fit returns eval)


def _block_zero_fraction(w: torch.Tensor, bn: int, bk: int) -> float:
    from pysparse.formats import block_mask

    return 1.0 - block_mask(w.float(), bn, bk).float().mean().item()


def test_block_sparse_int8_mlp_recovers_within_one_point(digits_mlp):
    # (b) 80% of the 16 x 16 blocks of the two hidden 256 x 256 layers (87% of the weights) pruned
    # (masks; the input layer and the head stay dense, as usual), int8 everywhere (static
    # activations), then quantization-aware recovery: within 1 point of the float teacher, the
    # pruned blocks still zero. (Pruning the 256 x 64 input layer too: 95.5-95.7% after 8-12
    # epochs against a 97.8% teacher.)
    t0 = time.perf_counter()
    mlp, (xtr, ytr, xte, yte) = digits_mlp
    base = accuracy(mlp, xte, yte)
    student = copy.deepcopy(mlp)
    pysparse.prune.block_magnitude(student, 0.8, block=(16, 16), skip=["0", "6"])
    pruned = accuracy(student, xte, yte)
    calib = [xtr[i:i + 128] for i in range(0, 512, 128)]
    pysparse.quantize_int8(student, activations="static", calibration_data=calib)
    one_shot = accuracy(student, xte, yte)
    recover(student, mlp, loader(xtr, ytr), epochs=6, lr=3e-3, progress=False)
    got = accuracy(student, xte, yte)
    print(f"\ndigits MLP: float {base:.2f}%, 80% blocks pruned {pruned:.2f}%, + int8 {one_shot:.2f}%, recovered "
          f"{got:.2f}% ({time.perf_counter() - t0:.1f} s)")
    assert got >= base - 1.0, (base, one_shot, got)
    for name in ("0", "2", "4", "6"):
        layer = student.get_submodule(name)
        assert type(layer) is Int8Linear and layer.activations == "static"
        if name in ("2", "4"):
            q, _ = layer.weight_int8()
            assert _block_zero_fraction(q, 16, 16) >= 0.8 - 1e-6  # pruned blocks never regrew


def test_qat_beats_unrecovered_and_keeps_the_int8_kinds(digits_mlp):
    # (c) a student of every int8 Linear kind: BsrInt8Linear (64 x 64 blocks, half pruned),
    # DenseInt8KeptLinear and Int8Linear; recovered it is more accurate, of the same kinds,
    # configs and block pattern
    mlp, (xtr, ytr, xte, yte) = digits_mlp
    student = copy.deepcopy(mlp)
    pysparse.sparsify(student, 0.5, dtype=torch.int8, dispatch="sparse", skip=["0", "4", "6"])
    pysparse.sparsify(student, 0.5, dtype=torch.int8, dispatch="dense", skip=["0", "6"])
    pysparse.quantize_int8(student)
    kinds = {n: (type(m), m.config) for n, m in student.named_children() if hasattr(m, "config")}
    assert [k[0] for k in kinds.values()] == [Int8Linear, BsrInt8Linear, DenseInt8KeptLinear, Int8Linear]
    layout = (student[2].row_ptr.clone(), student[2].col_idx.clone())
    before = accuracy(student, xte, yte)
    recover(student, mlp, loader(xtr, ytr), epochs=2, lr=1e-3, progress=False)
    after = accuracy(student, xte, yte)
    print(f"\nint8 kinds: float {accuracy(mlp, xte, yte):.2f}%, unrecovered {before:.2f}%, recovered {after:.2f}%")
    assert after > before
    assert {n: (type(m), m.config) for n, m in student.named_children() if hasattr(m, "config")} == kinds
    assert torch.equal(student[2].row_ptr, layout[0]) and torch.equal(student[2].col_idx, layout[1])
    w = student[4].dense_weight()
    assert _block_zero_fraction(w, 64, 64) >= 0.5  # the kept-dense layer's pruned blocks stay zero


def test_qat_int8_conv2d(digits_cnn):
    # Int8Conv2d (BatchNorm and ReLU folded in, static activations) trains through its shadow
    model, (xtr, ytr, xte, yte) = digits_cnn
    student = pysparse.compact(copy.deepcopy(model), (xtr[:2],))  # BatchNorm folded
    calib = [xtr[i:i + 128] for i in range(0, 256, 128)]
    pysparse.quantize_int8(student, activations="static", calibration_data=calib, convs=True)
    convs = {n: m.x_scale.clone() for n, m in student.named_modules() if isinstance(m, Int8Conv2d)}
    assert len(convs) == 4
    w0 = {n: student.get_submodule(n).weight_int8.clone() for n in convs}
    before = accuracy(student, xte, yte)
    recover(student, model, loader(xtr[:512], ytr[:512]), epochs=1, lr=1e-3, progress=False)
    after = accuracy(student, xte, yte)
    print(f"\nint8 CNN: unrecovered {before:.2f}%, recovered {after:.2f}%")
    assert after >= before - 0.2  # little to win back here: int8 costs this CNN almost nothing
    now = {n: m.x_scale for n, m in student.named_modules() if isinstance(m, Int8Conv2d)}
    assert list(now) == list(convs) and all(torch.equal(now[n], convs[n]) for n in now)  # static scales kept
    assert any(not torch.equal(student.get_submodule(n).weight_int8, w0[n]) for n in convs)  # it did train


class StepPruner:
    """A duck-typed prune schedule (recover needs only .step()): block-prunes the given
    layers a little more at every step, up to ``final``, with pysparse.prune masks."""

    def __init__(self, model, final, steps, skip=()):
        self.model, self.final, self.steps, self.skip, self.t = model, final, steps, skip, 0

    def step(self):
        self.t += 1
        s = self.final * min(self.t, self.steps) / self.steps
        pysparse.prune.block_magnitude(self.model, s, block=(16, 16), skip=self.skip)
        return s


def test_prune_schedule_and_masks_cannot_regrow(digits_mlp):
    mlp, (xtr, ytr, xte, yte) = digits_mlp
    student = copy.deepcopy(mlp)
    sched = StepPruner(student, 0.6, steps=4, skip=["0", "6"])
    recover(student, mlp, loader(xtr, ytr), steps=8, lr=1e-3, prune_schedule=sched, progress=False)
    assert sched.t == 8  # called after every optimizer step
    for name in ("2", "4"):
        lin = student.get_submodule(name)
        mask = get_mask(lin)
        assert mask is not None  # still a parametrization
        assert torch.all(lin.weight[~mask] == 0)  # masked weights are exactly zero after 4 more steps
        assert abs(_block_zero_fraction(lin.weight.detach(), 16, 16) - 0.6) < 0.01
    assert get_mask(student[0]) is None and get_mask(student[6]) is None


def test_feature_matching_projects_a_compacted_students_fewer_channels(digits_cnn):
    model, (xtr, ytr, xte, yte) = digits_cnn
    pruned = copy.deepcopy(model)
    pysparse.prune.filters(pruned, 0.5, criterion="l1", example_inputs=(xtr[:2],))
    student = pysparse.compact(pruned, (xtr[:2],), fold_bn=False)
    assert student.get_submodule("7").out_channels * 2 == model[7].out_channels  # 32 vs 64 channels
    before = copy.deepcopy(student)
    recover(student, model, loader(xtr[:256], ytr[:256]), steps=3, lr=1e-3, features={"7": "7", "10": ("10", 0.5)},
            progress=False)
    assert any(not torch.equal(a, b) for a, b in zip(student.state_dict().values(), before.state_dict().values()))
    # the projections are recover's own: none is left in the student
    assert not any(isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) for m in student.modules())
    with pytest.raises(ValueError, match="has no layer 'nope'"):
        recover(student, model, loader(xtr[:64], ytr[:64]), steps=1, features=["nope"], progress=False)


class HFOutput(dict):
    """A Hugging Face style model output: a dict whose keys are also attributes."""

    def __getattr__(self, k):
        try:
            return self[k]
        except KeyError:
            raise AttributeError(k) from None


class DictModel(nn.Module):
    def __init__(self, body):
        super().__init__()
        self.body = body

    def forward(self, pixel_values, scale=None):
        h = self.body[:-1](pixel_values)
        return HFOutput(logits=self.body[-1](h), hidden_states=h)


def test_dict_inputs_and_model_outputs(digits_mlp):
    # (e) a model that takes a dict of tensors and returns a ModelOutput-like object
    mlp, (xtr, ytr, xte, yte) = digits_mlp
    teacher = DictModel(mlp)
    student_mlp = copy.deepcopy(mlp)
    pysparse.prune.block_magnitude(student_mlp, 0.8, block=(16, 16), skip=["0", "6"])
    student = DictModel(student_mlp)
    batches = [({"pixel_values": xtr[i:i + 64]}, ytr[i:i + 64]) for i in range(0, len(ytr), 64)]
    before = accuracy(student_mlp, xte, yte)
    recover(student, teacher, batches, epochs=2, lr=3e-3, output="logits", progress=False)
    mid = accuracy(student_mlp, xte, yte)
    assert mid > before + 5
    # a function picking the tensor; inputs alone (no labels): the soft term only
    recover(student, teacher, [b[0] for b in batches], steps=5, lr=1e-3, output=lambda o: o.logits, progress=False)
    # the output names a key the models lack: a clear error, the student as it was
    state = copy.deepcopy(student.state_dict())
    with pytest.raises(KeyError, match="no key 'embedding'.*logits"):
        recover(student, teacher, batches, steps=1, output="embedding", progress=False)
    assert all(torch.equal(a, b) for a, b in zip(student.state_dict().values(), state.values()))
    # output=None on a dict output takes "logits"
    recover(student, teacher, batches[:2], steps=1, lr=1e-4, progress=False)


def _same_state(a, b):
    return all(torch.equal(x, y) for x, y in zip(a.values(), b.values())) and list(a) == list(b)


class Boom(RuntimeError):
    pass


def test_bad_input_names_the_problem_and_leaves_the_student(digits_mlp):
    # (f)
    mlp, (xtr, ytr, xte, yte) = digits_mlp
    student = copy.deepcopy(mlp)
    pysparse.prune.block_magnitude(student, 0.5, block=(16, 16), skip=["0", "6"])
    state = copy.deepcopy(student.state_dict())
    data = loader(xtr[:128], ytr[:128])
    wide = nn.Sequential(*copy.deepcopy(mlp)[:-1], nn.Linear(256, 12))
    cases = [
        (dict(data=[], epochs=1), ValueError, "data is empty"),
        (dict(data=loader(xtr[:0], ytr[:0], shuffle=False), epochs=1), ValueError, "data is empty"),
        (dict(data=data), ValueError, "give epochs= .* or steps="),
        (dict(data=data, epochs=1, lr=0.0), ValueError, "lr must be a finite number > 0"),
        (dict(data=data, epochs=1, lr=-1e-3), ValueError, "lr must be"),
        (dict(data=data, epochs=0), ValueError, "epochs must be"),
        (dict(data=data, epochs=1, teacher=wide), ValueError, r"teacher's output has shape \[64, 12\].*\[64, 10\]"),
        (dict(data=data, epochs=1, output="logits"), KeyError, "plain tensor"),
        (dict(data=data, epochs=1, loss="l1"), ValueError, "loss must be one of"),
        (dict(data=data, epochs=1, alpha=1.5), ValueError, "alpha must be in"),
        (dict(data=data, epochs=1, temperature=0), ValueError, "temperature must be"),
        (dict(data=data, epochs=1, optimizer=torch.optim.SGD(student.parameters(), lr=0.1)), TypeError,
         "not an instance"),
        (dict(data=data, epochs=1, prune_schedule=object()), TypeError, "prune_schedule must have a .step"),
        (dict(data=[(xtr[:8], ytr[:8], ytr[:8])], epochs=1), TypeError, "batch 0 is a tuple of 3 items"),
        (dict(data=[(xtr[:8], ytr[:7])], epochs=1), ValueError, "class labels of shape"),
    ]
    for kw, exc, msg in cases:
        kw.setdefault("teacher", mlp)
        with pytest.raises(exc, match=msg):
            recover(student, progress=False, **kw)
        assert _same_state(student.state_dict(), state), kw
    # a failure during training (here the schedule raises at step 3): rolled back
    class Fails:
        n = 0

        def step(self):
            Fails.n += 1
            if Fails.n == 3:
                raise Boom("schedule failed")

    params = list(student.parameters())
    with pytest.raises(Boom):
        recover(student, mlp, data, epochs=2, lr=1e-2, prune_schedule=Fails(), progress=False)
    assert _same_state(student.state_dict(), state)
    assert all(a is b for a, b in zip(student.parameters(), params))  # the same objects (an optimizer's)
    assert get_mask(student[2]) is not None and not student.training


def test_distillation_loss_and_recalibrate_batchnorm():
    s, t = torch.randn(8, 10, requires_grad=True), torch.randn(8, 10)
    T = 3.0
    ref = torch.nn.functional.kl_div(torch.log_softmax(s / T, -1), torch.softmax(t / T, -1),
                                     reduction="batchmean") * T * T
    assert torch.allclose(distillation_loss(s, t, temperature=T, alpha=0.5), ref)  # no labels: soft alone
    y = torch.randint(0, 10, (8,))
    mixed = distillation_loss(s, t, y, temperature=T, alpha=0.25)
    assert torch.allclose(mixed, 0.25 * ref + 0.75 * torch.nn.functional.cross_entropy(s, y))
    assert torch.allclose(distillation_loss(s, t, loss="mse"), torch.nn.functional.mse_loss(s, t))
    seq = distillation_loss(torch.randn(2, 5, 7), torch.randn(2, 5, 7))  # [batch, tokens, vocab] rows
    assert seq.shape == ()
    with pytest.raises(ValueError, match="shape"):
        distillation_loss(s, torch.randn(8, 11))
    # BatchNorm statistics: exact mean and unbiased variance of the BatchNorm's input
    net = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Dropout(0.5)).eval()
    x = torch.randn(96, 4) * 3 + 1
    recalibrate_batchnorm(net, [(x[i:i + 32],) for i in range(0, 96, 32)])
    h = net[0](x).detach()
    assert torch.allclose(net[1].running_mean, h.mean(0), atol=1e-5)
    assert torch.allclose(net[1].running_var, h.var(0), atol=1e-4)
    assert not net.training and not net[1].training
    with pytest.raises(ValueError, match="no batches"):
        recalibrate_batchnorm(net, [])


def test_float_fast_layers_and_a_bare_int8_layer(digits_mlp):
    # BsrLinear trains as it is (pattern fixed); DenseKeptLinear keeps its pruned blocks at zero;
    # CompactConv2d trains through a PyTorch-ops stand-in; a bare Int8Linear is trained in place
    from pysparse.nn import BsrLinear, CompactConv2d, DenseKeptLinear

    mlp, (xtr, ytr, xte, yte) = digits_mlp
    student = copy.deepcopy(mlp)
    pysparse.sparsify(student, 0.5, dispatch="sparse", skip=["0", "4", "6"])
    pysparse.sparsify(student, 0.5, dispatch="dense", skip=["0", "6"])
    assert type(student[2]) is BsrLinear and type(student[4]) is DenseKeptLinear
    v0, w0 = student[2].values.detach().clone(), student[4].dense_weight().clone()
    recover(student, mlp, loader(xtr[:256], ytr[:256]), steps=3, lr=1e-3, progress=False)
    assert type(student[2]) is BsrLinear and type(student[4]) is DenseKeptLinear
    assert student[2].values.shape == v0.shape and not torch.equal(student[2].values, v0)
    w1 = student[4].dense_weight()
    assert not torch.equal(w0, w1) and torch.all(w1[w0 == 0] == 0)
    assert not hasattr(student[4].dense, "parametrizations")  # recover's temporary mask is gone

    torch.manual_seed(0)
    conv_t = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                           nn.AdaptiveAvgPool2d(1), nn.Flatten())
    conv_s = copy.deepcopy(conv_t)
    keep = torch.tensor([True, False] * 4)
    conv_s[2] = CompactConv2d.from_masked(conv_s[2], keep, keep)
    k0 = conv_s[2].kept_weight().clone()
    recover(conv_s, conv_t, [(xtr[:32].view(-1, 1, 8, 8),)] * 2, steps=2, lr=1e-2, progress=False)
    assert type(conv_s[2]) is CompactConv2d and not torch.equal(conv_s[2].kept_weight(), k0)

    lin = nn.Linear(64, 10)
    q = Int8Linear.from_float(copy.deepcopy(lin))
    q0 = q.weight_int8()[0].clone()
    with torch.no_grad():
        lin.weight.mul_(1.5)
    assert recover(q, lin, [(xtr[:64],)] * 3, steps=3, lr=1e-2, loss="mse", progress=False) is q
    assert type(q) is Int8Linear and not torch.equal(q.weight_int8()[0], q0)


def _int8_layers():
    from pysparse.nn import BlockSparseLinear

    torch.manual_seed(0)
    lin = nn.Linear(128, 96)
    pruned = nn.Linear(128, 128)
    with torch.no_grad():
        pruned.weight[:64, 64:] = 0  # one of four 64 x 64 blocks pruned
    conv = nn.Conv2d(8, 16, 3, padding=1)
    return {
        "int8 dynamic": (Int8Linear.from_float(lin), torch.randn(5, 128)),
        "int8 static": (Int8Linear.from_float(lin, activations="static", x_scale=3.0 / 127), torch.randn(5, 128)),
        "int8 group 64": (Int8Linear.from_float(lin, group_size=64), torch.randn(5, 128)),
        "int8 smoothquant": (Int8Linear.from_float(lin, smooth=torch.rand(128) + 0.5), torch.randn(5, 128)),
        "bsr-int8": (BlockSparseLinear.from_dense(pruned, dtype=torch.int8, dispatch="sparse", activation="relu"),
                     torch.randn(5, 128)),
        "dense-int8": (BlockSparseLinear.from_dense(pruned, dtype=torch.int8, dispatch="dense"), torch.randn(5, 128)),
        "conv static": (Int8Conv2d.from_float(conv, x_scale=3.0 / 127, activation="relu"), torch.randn(2, 8, 6, 6)),
        "conv dynamic": (Int8Conv2d.from_float(conv, x_scale=None), torch.randn(2, 8, 6, 6)),
        "conv int8 output": (Int8Conv2d.from_float(conv, x_scale=3.0 / 127, activation="relu", out_scale=0.02),
                             torch.randn(2, 8, 6, 6)),
    }


def layer_out_scale(layer):
    return float(layer.out_scale) if isinstance(layer, Int8Conv2d) and layer.out_scale is not None else None


@pytest.mark.parametrize("kind", list(_int8_layers()))
def test_shadow_computes_what_the_int8_layer_does_and_requantizes_exactly(kind):
    from pysparse.recover._qat import quantized_from_shadow, shadow_of

    layer, x = _int8_layers()[kind]
    sh = shadow_of(layer)
    with torch.no_grad():
        want, got = layer(x).float(), sh(x).float()
        if layer_out_scale(layer) is not None:  # int8 out: the shadow gives it dequantized
            want = want * layer_out_scale(layer)
    # the same integers times the same scales; the kernels round x * (127 / amax) where the
    # shadow rounds x / (amax / 127): an input on a rounding tie may land one step apart
    assert torch.allclose(got, want, rtol=1e-3, atol=2e-2 * want.abs().max().item()), kind
    back = quantized_from_shadow(sh)
    assert type(back) is type(layer) and getattr(back, "config", None) == getattr(layer, "config", None)
    a, b = layer.state_dict(), back.state_dict()
    assert list(a) == list(b)
    for k in a:
        if isinstance(a[k], torch.Tensor) and a[k].dtype.is_floating_point:
            assert torch.allclose(a[k], b[k], rtol=1e-6), (kind, k)  # scales: 127 * s / 127, one ulp
        elif isinstance(a[k], torch.Tensor):
            assert torch.equal(a[k], b[k]), (kind, k)  # int8 weights, layouts: exact
        else:
            assert a[k] == b[k], (kind, k)


def test_gradual_pruning_with_the_real_cubic_schedule(digits_mlp):
    """recover steps a pysparse.prune.CubicSchedule after each optimizer step: the hidden layers reach
    the final sparsity along the cubic, the masks hold (no pruned weight revives), and distillation
    keeps the accuracy within 2 points of the teacher at 80% (one-shot 80% loses far more)."""
    model, (xtr, ytr, xte, yte) = digits_mlp
    base = accuracy(model, xte, yte)
    student = copy.deepcopy(model)
    hidden = ["2", "4"]
    sched = pysparse.prune.CubicSchedule(student, 0.8, end_step=40, frequency=5, kind="unstructured",
                                         skip=["0", "6"])
    seen = []

    class Watch:  # records the sparsity in force after every step, then steps the real schedule
        def step(self):
            s = sched.step()
            seen.append(s)
            return s

    recover(student, model, loader(xtr, ytr), steps=60, lr=1e-3, prune_schedule=Watch(), progress=False)
    assert sched.done and seen[-1] == pytest.approx(0.8)
    assert all(a <= b + 1e-9 for a, b in zip(seen, seen[1:]))  # monotone, as the cubic
    for name in hidden:
        layer = dict(student.named_modules())[name]
        assert get_mask(layer) is not None
        zero = (layer.weight == 0).float().mean().item()
        assert zero == pytest.approx(0.8, abs=0.01), (name, zero)
    one_shot = copy.deepcopy(model)
    pysparse.prune.unstructured(one_shot, 0.8, skip=["0", "6"], progress=False)
    got, shot = accuracy(student, xte, yte), accuracy(one_shot, xte, yte)
    print(f"\ngradual 80% + distillation {got:.2f}% vs one-shot {shot:.2f}% (teacher {base:.2f}%)")
    assert got >= base - 2.0 and got > shot
