"""Hypothesis-driven checks of every CPU op against its reference (pysparse.reference) over
shapes, dtypes, strides (non-contiguous inputs, channels_last or not) and every CPU path at
or below this machine's best. Few examples each (this suite must stay fast); hypothesis
shrinks a failure to its smallest case and prints it. PYSPARSE_HYPOTHESIS_EXAMPLES=200 runs a
longer, randomized search (the default 12 examples are derandomized: the same cases every run)."""
import os

import pytest
import torch
from torch import nn

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

import pysparse  # noqa: E402
from pysparse import formats, ops, reference as R  # noqa: E402
from pysparse.nn import BlockSparseLinear, CompactConv2d, Int8Conv2d, Int8Linear  # noqa: E402

from .conftest import available_isas  # noqa: E402

ISAS = st.sampled_from(available_isas())
_N = int(os.environ.get("PYSPARSE_HYPOTHESIS_EXAMPLES", "0"))
FAST = settings(max_examples=_N or 12, deadline=None, derandomize=not _N, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _strided(x, how):
    """x with the same values, laid out contiguous, transposed-then-back (non-contiguous rows),
    or as every other element of a wider tensor."""
    if how == "contiguous":
        return x
    if how == "sliced":
        wide = torch.zeros(*x.shape[:-1], 2 * x.shape[-1], dtype=x.dtype)
        wide[..., ::2] = x
        return wide[..., ::2]
    return x.transpose(-1, -2).contiguous().transpose(-1, -2) if x.dim() >= 2 else x


LAYOUTS = st.sampled_from(["contiguous", "sliced", "transposed"])


@FAST
@given(M=st.integers(0, 9), N=st.integers(1, 80), K=st.integers(1, 200), isa=ISAS)
def test_int8_mm_is_exact(M, N, K, isa):
    g = torch.Generator().manual_seed(M * 7919 + N * 31 + K)
    a = torch.randint(-128, 128, (M, K), dtype=torch.int8, generator=g)
    w = torch.randint(-128, 128, (N, K), dtype=torch.int8, generator=g)
    with pysparse.cpu_isa(isa):
        packed, colsum = ops.int8_pack(w)
        assert torch.equal(ops.int8_mm(a, packed, colsum, N, K), R.int8_mm(a, w))


@FAST
@given(lead=st.lists(st.integers(0, 5), min_size=1, max_size=2), N=st.integers(1, 90), K=st.integers(1, 160),
       grouped=st.booleans(), static=st.booleans(), bias=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), layout=LAYOUTS, isa=ISAS)
def test_int8_linear_matches_reference(lead, N, K, grouped, static, bias, dtype, layout, isa):
    torch.manual_seed(N * 131 + K)
    gs = 64 if grouped else 0
    lin = nn.Linear(K, N, bias=bias)
    m = Int8Linear.from_float(lin, group_size=gs, activations="static" if static else "dynamic",
                              x_scale=0.02 if static else None)
    x = _strided(torch.randn(*lead, K).to(dtype), layout)
    q, s = R.quantize_weight(lin.weight, gs)
    with pysparse.cpu_isa(isa):
        y = m(x)
    # bit-equal: the kernels do the reference's float operations in the same order
    assert torch.equal(y, R.int8_linear(x, q, s, lin.bias.detach() if bias else None, m.x_scale, gs))


def _block_pruned(N, K, block, density, seed):
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(K, N)
    mask = torch.rand(-(-N // block[0]), -(-K // block[1]), generator=g) < density
    with torch.no_grad():
        lin.weight.mul_(formats.expand_block_mask(mask, N, K, *block))
    return lin


@FAST
@given(M=st.integers(0, 9), N=st.integers(1, 140), K=st.integers(1, 140), bk=st.sampled_from([8, 16, 32, 64]),
       bn=st.sampled_from([16, 32, 64]), density=st.floats(0.0, 1.0), relu=st.booleans(), layout=LAYOUTS,
       isa=ISAS)
def test_bsr_linear_matches_reference(M, N, K, bk, bn, density, relu, layout, isa):
    lin = _block_pruned(N, K, (bn, bk), density, N * 17 + K)
    m = BlockSparseLinear.from_dense(lin, block=(bn, bk), activation="relu" if relu else None, dispatch="sparse")
    x = _strided(torch.randn(M, K), layout)
    with pysparse.cpu_isa(isa):
        y = m(x)
    ref = R.bsr_linear(x, lin.weight.detach(), lin.bias.detach(), relu)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)  # fp32 sums of up to 140 products, another order


@FAST
@given(M=st.integers(0, 9), N=st.integers(1, 140), K=st.integers(1, 200), density=st.floats(0.0, 1.0),
       relu=st.booleans(), layout=LAYOUTS, isa=ISAS)
def test_bsr_int8_linear_matches_reference(M, N, K, density, relu, layout, isa):
    lin = _block_pruned(N, K, (64, 64), density, N * 19 + K)
    m = BlockSparseLinear.from_dense(lin, dtype=torch.int8, activation="relu" if relu else None, dispatch="sparse")
    x = _strided(torch.randn(M, K), layout)
    with pysparse.cpu_isa(isa):
        y = m(x)
    q, s = R.quantize_weight(lin.weight, 0)
    assert torch.equal(y, R.bsr_int8_linear(x, q, s, lin.bias.detach(), None, relu))  # same epilogue order


@FAST
@given(n=st.integers(1, 3), cin_g=st.integers(1, 6), cout_g=st.integers(1, 6), groups=st.sampled_from([1, 2, 3]),
       hw=st.tuples(st.integers(3, 9), st.integers(3, 9)), k=st.sampled_from([1, 3]), stride=st.integers(1, 2),
       dilation=st.integers(1, 2), static=st.booleans(), act=st.sampled_from([None, "relu", "relu6"]),
       channels_last=st.booleans(), isa=ISAS)
def test_int8_conv2d_matches_reference(n, cin_g, cout_g, groups, hw, k, stride, dilation, static, act,
                                       channels_last, isa):
    torch.manual_seed(cin_g * 7 + cout_g + groups * 31 + hw[0])
    cin, cout = cin_g * groups, cout_g * groups
    pad = dilation * (k - 1) // 2
    conv = nn.Conv2d(cin, cout, k, stride, pad, dilation, groups)
    m = Int8Conv2d.from_float(conv, x_scale=0.03 if static else None, activation=act)
    x = torch.randn(n, cin, *hw)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with pysparse.cpu_isa(isa):
        y = m(x)
    ref = R.int8_conv2d(x, m.weight_int8, m.weight_scale, m.bias, m.x_scale, stride, pad, dilation, groups, act)
    assert torch.equal(y, ref)  # integer sums exact, the epilogue in the reference's order


@FAST
@given(n=st.integers(0, 3), cin=st.integers(1, 12), cout=st.integers(1, 40), hw=st.tuples(st.integers(3, 8),
       st.integers(3, 8)), k=st.sampled_from([1, 3]), stride=st.integers(1, 2), relu=st.booleans(),
       residual=st.booleans(), keep=st.floats(0.2, 1.0), isa=ISAS)
def test_compact_conv2d_matches_reference(n, cin, cout, hw, k, stride, relu, residual, keep, isa):
    g = torch.Generator().manual_seed(cin * 13 + cout)
    conv = nn.Conv2d(cin, cout, k, stride, k // 2)
    in_mask = torch.rand(cin, generator=g) < keep
    out_mask = torch.rand(cout, generator=g) < keep
    in_mask[0] = out_mask[-1] = True  # at least one kept channel each way
    m = CompactConv2d.from_masked(conv, in_mask, out_mask, relu=relu)
    x = torch.randn(n, cin, *hw).contiguous(memory_format=torch.channels_last)
    ho, wo = m._out_hw(x)
    res = torch.randn(n, cout, ho, wo).contiguous(memory_format=torch.channels_last) if residual else None
    with pysparse.cpu_isa(isa), torch.no_grad():
        y = m(x, res)
    ref = R.compact_conv2d(x.double(), m.kept_weight().double(), m.bias.double(), m.in_idx, m.out_idx, m.stride,
                           m.padding, m.dilation, cout, None if res is None else res.double(), relu)
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)  # fp32 sums of up to 108 products
