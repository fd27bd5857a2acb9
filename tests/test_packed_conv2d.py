"""PackedConv2d (pysparse.nn): the oneDNN-prepacked Conv2d that pysparse.compact puts in place of
plain convs. It must equal the plain conv everywhere (shapes, groups, strides, memory formats),
rebuild its packed copy when the weight changes, fall back where packing does not apply
(gradients, torch.compile, fx tracing), and stay an ordinary Conv2d to everything else
(state dict, deepcopy, pickling, re-compaction, int8 conversion)."""
import copy
import pickle

import pytest
import torch
from torch import fx, nn

import pysparse
from pysparse.nn import PackedConv2d

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="oneDNN not available")

CL = torch.channels_last


def _pair(cin=16, cout=32, k=3, stride=1, groups=1, bias=True):
    torch.manual_seed(0)
    conv = nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=bias).eval().to(memory_format=CL)
    return conv, PackedConv2d.from_conv(conv)


@pytest.mark.parametrize("cin,cout,k,stride,groups,bias", [
    (16, 32, 3, 1, 1, True), (16, 32, 1, 2, 1, False), (16, 16, 3, 1, 16, True), (16, 32, 3, 2, 4, True),
    (3, 8, 7, 2, 1, True)])
def test_equals_the_plain_conv(cin, cout, k, stride, groups, bias):
    conv, packed = _pair(cin, cout, k, stride, groups, bias)
    with torch.no_grad():
        for x in (torch.randn(2, cin, 14, 14).contiguous(memory_format=CL), torch.randn(5, cin, 9, 11),
                  torch.randn(1, cin, 14, 14).contiguous(memory_format=CL)):
            want, got = conv(x), packed(x)
            assert torch.equal(want, got)
            assert want.stride() == got.stride()
    assert packed._packed is not None and len(packed._packed[1]) == 3  # the packed path ran, one copy per shape
    for b in range(1, 8):  # at most kPackShapes copies
        with torch.no_grad():
            packed(torch.randn(b, cin, 6, 6).contiguous(memory_format=CL))
    assert len(packed._packed[1]) == PackedConv2d.kPackShapes


def test_shares_parameters_and_sees_weight_changes():
    conv, packed = _pair()
    assert packed.weight is conv.weight and packed.bias is conv.bias
    x = torch.randn(2, 16, 8, 8).contiguous(memory_format=CL)
    with torch.no_grad():
        packed(x)
        first = packed._packed[1][tuple(x.shape)]
        conv.weight.mul_(-2)  # in place: the version changes
        assert torch.equal(packed(x), conv(x))
        assert packed._packed[1][tuple(x.shape)] is not first
        packed.load_state_dict({"weight": torch.randn_like(conv.weight), "bias": torch.zeros(32)})
        assert torch.equal(packed(x), conv(x))
        packed.weight = nn.Parameter(torch.randn(32, 16, 3, 3))  # a new tensor
        assert torch.equal(packed(x), nn.functional.conv2d(x, packed.weight, packed.bias, 1, 1))


def test_gradients_take_the_plain_path():
    conv, packed = _pair()
    x = torch.randn(2, 16, 8, 8, requires_grad=True)
    packed(x).square().sum().backward()
    assert packed._packed is None  # never packed: a gradient was needed
    g = packed.weight.grad.clone()
    packed.weight.grad = None
    conv(x).square().sum().backward()
    assert torch.allclose(g, conv.weight.grad)


def test_state_dict_copy_pickle_and_compile():
    conv, packed = _pair()
    x = torch.randn(2, 16, 8, 8).contiguous(memory_format=CL)
    with torch.no_grad():
        packed(x)
    assert list(packed.state_dict()) == ["weight", "bias"]
    for clone in (copy.deepcopy(packed), pickle.loads(pickle.dumps(packed))):
        assert clone._packed is None
        with torch.no_grad():
            assert torch.equal(clone(x), conv(x))
    compiled = torch.compile(packed, fullgraph=True)
    with torch.no_grad():
        # inductor picks its own conv algorithm (and may prepack itself): equal up to fp32 rounding
        assert torch.allclose(compiled(x), conv(x), atol=1e-5)
    gm = fx.symbolic_trace(packed)  # a plain fx tracer goes through forward: the functional conv
    with torch.no_grad():
        assert torch.equal(gm(x), conv(x))


def test_from_conv_rejects_other_layers():
    with pytest.raises(TypeError, match="conv must be a torch.nn.Conv2d"):
        PackedConv2d.from_conv(nn.Linear(3, 4))


def _cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10)).eval()


def test_compact_prepacks_and_matches_prepack_false():
    m = _cnn()
    x = torch.randn(2, 3, 16, 16)
    pysparse.prune.filters(m, 0.5, example_inputs=(x,))
    a = pysparse.compact(m, (x,))
    b = pysparse.compact(m, (x,), prepack=False)
    assert any(isinstance(mod, PackedConv2d) for mod in a.modules())
    assert not any(isinstance(mod, PackedConv2d) for mod in b.modules())
    assert a.code == b.code
    with torch.no_grad():
        assert torch.equal(a(x), b(x))
    # re-compacting a compacted model: its PackedConv2d layers are convs to the channel graph
    again = pysparse.compact(a, (x,))
    with torch.no_grad():
        # the same convs, re-sliced with nothing removed: equal up to fp32 rounding
        assert torch.allclose(again(x), a(x), atol=1e-5)
    # int8 conversion sees a Conv2d
    q = pysparse.quantize_int8(copy.deepcopy(a), activations="static", calibration_data=[x], convs=True)
    assert not any(isinstance(mod, PackedConv2d) for mod in q.modules())
    with torch.no_grad():
        # int8 weights and static activation scales: within 5% of the output's range (measured 0.2%)
        assert (q(x) - a(x)).abs().max() <= 0.05 * a(x).abs().max()
