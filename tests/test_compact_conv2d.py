"""pysparse::compact_conv2d and CompactConv2d: against the float64 reference (gather + conv +
scatter) on odd shapes and every ISA path, bit-equality across paths, opcheck,
torch.compile(fullgraph=True), bad input."""
import pytest
import torch
from torch import nn

import pysparse
from pysparse import ops_conv, reference as R
from pysparse.nn import CompactConv2d

CL = torch.channels_last


def _case(N, C, H, W, cin, cout, out_channels, k, dtype=torch.float32, sorted_out=False):
    x = torch.randn(N, C, H, W, dtype=dtype).contiguous(memory_format=CL)
    in_idx = torch.randperm(C)[:cin]
    out_idx = torch.randperm(out_channels)[:cout]
    if sorted_out:
        out_idx = out_idx.sort().values
    w = torch.randn(cout, cin, *k) / (cin * k[0] * k[1]) ** 0.5
    b = torch.randn(cout)
    return x, w, b, in_idx, out_idx


def _bound(x, w, in_idx, stride, padding, dilation):
    # fp32 accumulation of K = Cin * kh * kw products (and the bias / residual adds): |error| <=
    # (K + 2) * eps * sum |x w| (a loose, provable bound), from the float64 conv of |x| and |w|
    s = torch.nn.functional.conv2d(x.abs().double().index_select(1, in_idx.long()), w.abs().double(), None,
                                   stride, padding, dilation)
    return (w[0].numel() + 2) * torch.finfo(torch.float32).eps * s


# (N, C, H, W, cin, cout, out_channels, kernel, stride, padding, dilation): 1x1 / 3x3 / 5x5,
# stride 2, padding, dilation, Cin / Cout not multiples of 8 or 16 (partial panels), batch 1,
# empty batch, pixel counts that are not multiples of the tiles (4, 6, 12) or chunks (96)
SHAPES = [
    (2, 16, 9, 11, 7, 5, 12, (1, 1), (1, 1), (0, 0), (1, 1)),
    (1, 20, 13, 10, 11, 19, 23, (3, 3), (1, 1), (1, 1), (1, 1)),
    (3, 9, 12, 12, 9, 33, 40, (3, 3), (2, 2), (1, 1), (1, 1)),
    (1, 10, 11, 9, 6, 17, 17, (5, 5), (1, 2), (2, 1), (1, 1)),
    (2, 12, 14, 13, 5, 16, 30, (3, 3), (1, 1), (2, 2), (2, 2)),
    (0, 8, 7, 7, 4, 4, 8, (3, 3), (1, 1), (1, 1), (1, 1)),
    (1, 64, 10, 10, 32, 48, 64, (3, 1), (1, 1), (1, 0), (1, 1)),
    (1, 6, 5, 5, 3, 2, 3, (5, 5), (1, 1), (0, 0), (1, 1)),  # one output pixel
]


# ascending out_idx (as compact and from_conv write it): the AVX2 path's vector scatter (8
# output channels per permute); a random order mostly takes the scalar scatter
@pytest.mark.parametrize("sorted_out", [False, True], ids=["out-random", "out-sorted"])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"{s[7][0]}x{s[7][1]}-s{s[8][0]}-n{s[0]}-ci{s[4]}-co{s[5]}"
                                               for s in SHAPES])
def test_matches_float64_reference(isa, shape, sorted_out):
    N, C, H, W, cin, cout, oc, k, stride, padding, dilation = shape
    x, w, b, ii, oi = _case(N, C, H, W, cin, cout, oc, k, sorted_out=sorted_out)
    wp = ops_conv.pack_compact_conv2d_weight(w)
    ref0 = R.compact_conv2d(x.double(), w.double(), b.double(), ii, oi, stride, padding, dilation, oc)
    res = torch.randn(ref0.shape).contiguous(memory_format=CL)
    bound = _bound(x, w, ii, stride, padding, dilation)
    tol = torch.zeros_like(ref0)
    tol[:, oi.long()] = bound + 1e-6 * (1 + b.abs().max())
    for bias in (b, None):
        for r in (None, res):
            for relu in (False, True):
                y = ops_conv.compact_conv2d(x, wp, bias, ii, oi, stride, padding, dilation, oc, r, relu)
                ref = R.compact_conv2d(x.double(), w.double(), None if bias is None else bias.double(), ii, oi,
                                       stride, padding, dilation, oc, None if r is None else r.double(), relu)
                assert y.shape == ref.shape and y.dtype == torch.float32
                assert y.is_contiguous(memory_format=CL)
                assert ((y.double() - ref).abs() <= tol + (0 if r is None else 2.4e-7 * r.abs())).all()
                # channels the conv does not write: exactly 0, residual, or relu(residual)
                rest = torch.ones(oc, dtype=torch.bool)
                rest[oi.long()] = False
                want = torch.zeros_like(y) if r is None else (r.relu() if relu else r)
                assert torch.equal(y[:, rest], want[:, rest])


@pytest.mark.parametrize("sorted_out", [False, True], ids=["out-random", "out-sorted"])
@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
def test_all_isa_paths_agree_bit_for_bit(sorted_out, with_residual):
    # One fused multiply-add per k in the same order on every path (scalar: std::fmaf), and the
    # same residual add and ReLU in either scatter (a residual's -0 stays -0 where not written)
    from .conftest import available_isas

    x, w, b, ii, oi = _case(2, 24, 15, 14, 13, 37, 50, (3, 3), sorted_out=sorted_out)
    wp = ops_conv.pack_compact_conv2d_weight(w)
    res = None
    if with_residual:
        res = torch.randn(2, 50, 8, 14).contiguous(memory_format=CL)
        res[:, ::3] = -0.0
    outs = {}
    for isa in available_isas():
        with pysparse.cpu_isa(isa):
            outs[isa] = ops_conv.compact_conv2d(x, wp, b, ii, oi, (2, 1), (1, 1), (1, 1), 50, res, True)
    first = next(iter(outs.values()))
    for isa, y in outs.items():
        assert torch.equal(y.view(torch.int32), first.view(torch.int32)), isa


def test_non_contiguous_inputs(isa):
    x, w, b, ii, oi = _case(2, 20, 16, 18, 9, 21, 30, (3, 3))
    wp = ops_conv.pack_compact_conv2d_weight(w)
    args = ((1, 1), (1, 1), (1, 1), 30)
    big = torch.randn(2, 23, 33, 19).contiguous(memory_format=CL)
    views = {
        "channels_last slice (channel stride 1, odd pixel strides)": big[:, 2:22, ::2, 1:],
        "NCHW contiguous (copied)": x.contiguous(),
        "NCHW transposed view": torch.randn(2, 20, 18, 16).transpose(2, 3),
    }
    for name, xv in views.items():
        y = ops_conv.compact_conv2d(xv, wp, b, ii, oi, *args, None, False)
        ref = R.compact_conv2d(xv.double(), w.double(), b.double(), ii, oi, *args)
        assert torch.allclose(y.double(), ref, rtol=1e-5, atol=1e-5), name  # fp32 sums of 81 products
    res = torch.randn(2, 30, 16, 18)  # NCHW residual: read through a channels_last copy
    y = ops_conv.compact_conv2d(x, wp, b, ii, oi, *args, res, True)
    ref = R.compact_conv2d(x.double(), w.double(), b.double(), ii, oi, *args, res.double(), True)
    assert torch.allclose(y.double(), ref, rtol=1e-5, atol=1e-5)
    # int32 indices work as int64 ones
    assert torch.equal(ops_conv.compact_conv2d(x, wp, b, ii.int(), oi.int(), *args, None, False),
                       ops_conv.compact_conv2d(x, wp, b, ii, oi, *args, None, False))


def test_degenerate_channel_counts(isa):
    x = torch.randn(2, 8, 6, 6).contiguous(memory_format=CL)
    res = torch.randn(2, 10, 6, 6)
    # no kept output: the output is 0 / the residual
    wp0 = ops_conv.pack_compact_conv2d_weight(torch.randn(0, 3, 3, 3))
    assert wp0.shape == (0, 3, 3, 3, 16)
    ii = torch.tensor([0, 4, 7])
    e = torch.tensor([], dtype=torch.int64)
    assert torch.equal(ops_conv.compact_conv2d(x, wp0, None, ii, e, (1, 1), (1, 1), (1, 1), 10, None, False),
                       torch.zeros(2, 10, 6, 6))
    assert torch.equal(ops_conv.compact_conv2d(x, wp0, None, ii, e, (1, 1), (1, 1), (1, 1), 10, res, True),
                       res.relu())
    # no kept input: bias only
    b = torch.randn(5)
    oi = torch.tensor([9, 0, 3, 4, 1])
    y = ops_conv.compact_conv2d(x, ops_conv.pack_compact_conv2d_weight(torch.randn(5, 0, 3, 3)), b, e, oi,
                                (1, 1), (1, 1), (1, 1), 10, None, False)
    assert torch.equal(y[:, oi], b.view(1, 5, 1, 1).expand(2, 5, 6, 6))


def test_nan_propagates_and_relu_keeps_it():
    x, w, b, ii, oi = _case(1, 8, 6, 6, 4, 4, 8, (3, 3))
    x[0, ii[0], 2, 2] = float("nan")
    y = ops_conv.compact_conv2d(x, ops_conv.pack_compact_conv2d_weight(w), b, ii, oi, (1, 1), (1, 1), (1, 1), 8,
                                None, True)
    assert torch.isnan(y[0, oi, 1:4, 1:4]).all() and not torch.isnan(y[0, oi, 0, 0]).any()


def test_opcheck():
    x, w, b, ii, oi = _case(2, 12, 7, 9, 5, 18, 20, (3, 3))
    wp = ops_conv.pack_compact_conv2d_weight(w)
    res = torch.randn(2, 20, 4, 5).contiguous(memory_format=CL)
    op = torch.ops.pysparse.compact_conv2d.default
    torch.library.opcheck(op, (x, wp, b, ii, oi, [2, 2], [1, 1], [1, 1], 20, None, False))
    torch.library.opcheck(op, (x, wp, None, ii.int(), oi, [2, 2], [1, 1], [1, 1], 20, res, True))
    torch.library.opcheck(op, (x[:0], wp, b, ii, oi, [1, 1], [0, 0], [1, 1], 20, None, False))


def _block(cin=32, c=24, keep_in=13, keep_out=9):
    """A residual block's second conv, its input and output both 50%-ish pruned."""
    torch.manual_seed(1)
    conv = nn.Conv2d(cin, c, 3, padding=1)
    in_mask = torch.zeros(cin, dtype=torch.bool)
    in_mask[torch.randperm(cin)[:keep_in]] = True
    out_mask = torch.zeros(c, dtype=torch.bool)
    out_mask[torch.randperm(c)[:keep_out]] = True
    with torch.no_grad():
        conv.weight[~out_mask] = 0
        conv.weight[:, ~in_mask] = 0
        conv.bias[~out_mask] = 0
    return conv, in_mask, out_mask


def test_layer_from_masked_equals_the_masked_conv():
    conv, im, om = _block()
    layer = CompactConv2d.from_masked(conv, im, om, relu=True)
    x = torch.randn(3, 32, 10, 11).contiguous(memory_format=CL)
    res = torch.randn(3, 24, 10, 11).contiguous(memory_format=CL)
    with torch.no_grad():
        y = layer(x, res)
        ref = torch.relu(conv(x) + res)
        # fp32 sums of 13 * 9 kept products (the masked conv sums 32 * 9, zeros included)
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(layer(x), torch.relu(conv(x)), rtol=1e-5, atol=1e-5)
    assert torch.equal(layer.kept_weight(), conv.weight.detach()[om][:, im])
    assert "in=13/32" in repr(layer) and "out=9/24" in repr(layer)


def test_layer_from_conv_state_dict_and_compile():
    conv = nn.Conv2d(7, 11, 3, stride=2, padding=1, bias=True)
    ii, oi = torch.tensor([3, 0, 9, 4, 12, 1, 7]), torch.randperm(20)[:11]
    layer = CompactConv2d.from_conv(conv, ii, oi, 20, relu=True, in_channels=14)
    x = torch.randn(2, 14, 9, 9).contiguous(memory_format=CL)
    with torch.no_grad():
        y = layer(x)
        ref = R.compact_conv2d(x.double(), conv.weight.double(), conv.bias.double(), ii, oi, (2, 2), (1, 1),
                               (1, 1), 20, None, True)
        torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)  # fp32 sums of 63 products
        other = CompactConv2d.from_conv(nn.Conv2d(7, 11, 3, stride=2, padding=1), torch.arange(7),
                                        torch.arange(11), 20, relu=True, in_channels=14)
        other.load_state_dict(layer.state_dict())
        assert torch.equal(other(x), y)
        torch._dynamo.reset()
        res = torch.randn(2, 20, 5, 5).contiguous(memory_format=CL)
        f = torch.compile(lambda a, r: layer(a, r), fullgraph=True)
        assert torch.equal(f(x, res), layer(x, res))
        torch._dynamo.reset()
        ep = torch.export.export(layer, (x,))
        assert any("compact_conv2d" in str(n.target) for n in ep.graph.nodes)
        assert torch.equal(ep.module()(x), y)


def test_padding_strings():
    conv = nn.Conv2d(4, 6, 3, padding="same", dilation=2)
    layer = CompactConv2d.from_conv(conv, torch.arange(4), torch.arange(6), 6)
    x = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), conv(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="same"):
        CompactConv2d.from_conv(nn.Conv2d(4, 6, 2, padding="same"), torch.arange(4), torch.arange(6), 6)


def test_bad_input_names_the_argument():
    conv = nn.Conv2d(4, 6, 3, padding=1)
    ok = dict(conv=conv, in_idx=torch.arange(4), out_idx=torch.arange(6), out_channels=8)
    mk = lambda **kw: CompactConv2d.from_conv(**{**ok, **kw})  # noqa: E731
    with pytest.raises(ValueError, match="in_idx must be 1-D with 4"):
        mk(in_idx=torch.arange(3))
    with pytest.raises(ValueError, match="in_idx holds a channel twice"):
        mk(in_idx=torch.tensor([0, 1, 1, 2]))
    with pytest.raises(ValueError, match="out_idx holds 8, outside"):
        mk(out_idx=torch.tensor([0, 1, 2, 3, 4, 8]))
    with pytest.raises(ValueError, match="in_idx holds -1"):
        mk(in_idx=torch.tensor([0, 1, 2, -1]))
    with pytest.raises(TypeError, match="in_idx must hold integer"):
        mk(in_idx=torch.ones(4))
    with pytest.raises(ValueError, match="out_channels must be"):
        mk(out_channels=5)
    with pytest.raises(ValueError, match="groups=2"):
        mk(conv=nn.Conv2d(4, 6, 3, groups=2))
    with pytest.raises(TypeError, match="nn.Conv2d"):
        mk(conv=nn.Linear(4, 6))
    with pytest.raises(ValueError, match="in_mask must be a bool"):
        CompactConv2d.from_masked(conv, torch.ones(3, dtype=torch.bool), torch.ones(6, dtype=torch.bool))
    layer = mk(in_channels=10)
    with torch.no_grad():
        with pytest.raises(ValueError, match="x has 9 channels, expected in_channels=10"):
            layer(torch.randn(1, 9, 5, 5))
        with pytest.raises(TypeError, match="x must be float32"):
            layer(torch.randn(1, 10, 5, 5, dtype=torch.float64))
        with pytest.raises(ValueError, match="residual must have the output's shape"):
            layer(torch.randn(1, 10, 5, 5), torch.randn(1, 6, 5, 5))
    with pytest.raises(RuntimeError, match="inference only"):
        layer(torch.randn(1, 10, 5, 5, requires_grad=True))
    # the op itself checks everything it indexes with (never an out-of-bounds read)
    x = torch.randn(1, 4, 5, 5)
    wp = ops_conv.pack_compact_conv2d_weight(torch.randn(6, 3, 3, 3))
    op = ops_conv.compact_conv2d
    a = ((1, 1), (1, 1), (1, 1), 8)
    with pytest.raises(ValueError, match=r"in_idx\[2\]=4 is outside \[0, 4\)"):
        op(x, wp, None, torch.tensor([0, 1, 4]), torch.arange(6), *a)
    with pytest.raises(ValueError, match="out_idx holds 1 twice"):
        op(x, wp, None, torch.arange(3), torch.tensor([0, 1, 1, 2, 3, 4]), *a)
    with pytest.raises(ValueError, match="in_idx must hold 3 indices"):
        op(x, wp, None, torch.arange(2), torch.arange(6), *a)
    with pytest.raises(ValueError, match="out_idx"):
        op(x, wp, None, torch.arange(3), torch.arange(17), *a)
    with pytest.raises(ValueError, match="bias must be"):
        op(x, wp, torch.randn(5), torch.arange(3), torch.arange(6), *a)
    with pytest.raises(ValueError, match="weight must be the packed layout"):
        op(x, torch.randn(6, 3, 3, 3), None, torch.arange(3), torch.arange(6), *a)
    with pytest.raises(ValueError, match="smaller than the dilated kernel"):
        op(x, wp, None, torch.arange(3), torch.arange(6), (1, 1), (0, 0), (3, 3), 8)
    with pytest.raises(ValueError, match="stride must be >= 1"):
        op(x, wp, None, torch.arange(3), torch.arange(6), (0, 1), (1, 1), (1, 1), 8)
    with pytest.raises(ValueError, match="x must be a 4-D float32"):
        op(x.double(), wp, None, torch.arange(3), torch.arange(6), *a)
    with pytest.raises(ValueError, match="residual must be"):
        op(x, wp, None, torch.arange(3), torch.arange(6), *a, torch.randn(1, 8, 4, 5))
    with pytest.raises(ValueError, match="in_idx must be a 1-D int32 or int64"):
        op(x, wp, None, torch.arange(3).float(), torch.arange(6), *a)
    with pytest.raises(RuntimeError, match="no backward"):
        xg = torch.randn(1, 4, 5, 5, requires_grad=True)
        op(xg, wp, None, torch.arange(3), torch.arange(6), *a).sum().backward()
