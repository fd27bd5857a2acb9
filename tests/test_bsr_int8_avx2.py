"""The AVX2 kernel of pysparse::bsr_int8_linear (csrc/cpu/bsr_linear_avx2.cpp): what the
dispatch policy reports, and outputs bit-equal to the scalar kernel's (int32 sums are exact,
the epilogue is shared) for every output dtype, ReLU, bias, row tails, partial blocks, empty
block rows and layers, extreme int8 values, row passes and threads."""
import pytest
import torch

import pysparse
from pysparse import formats, ops, reference as R

from .conftest import available_isas

pytestmark = pytest.mark.skipif("avx2" not in available_isas(), reason="CPU has no AVX2")


def pruned_weight(N, K, density, zero_rows=False):
    w = torch.randn(N, K)
    keep = torch.rand(-(-N // 64), -(-K // 64)) < density
    if zero_rows:
        keep[0] = False  # a block row with no block at all
    em = keep[:, None, :, None].expand(-1, 64, -1, 64).reshape(keep.shape[0] * 64, keep.shape[1] * 64)[:N, :K]
    return w * em


def run(isa, x, p, b, N, K, relu=False, xs=None):
    with pysparse.cpu_isa(isa):
        assert ops.kernel_for("cpu", "bsr_int8_linear") == f"cpu-{isa}"
        return ops.bsr_int8_linear(x, p.values, p.layout.row_ptr, p.layout.col_idx, p.colsum, p.w_scale, b, xs,
                                   N, K, relu)


def bits(t):
    return t.contiguous().view(torch.int32 if t.element_size() == 4 else torch.int16)


def same(a, b):
    """Bit-equal, NaN included (torch.equal is False for NaN)."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(bits(a), bits(b))


def check(x, p, b, N, K, relu, xs=None):
    y2 = run("avx2", x, p, b, N, K, relu, xs)
    y0 = run("scalar", x, p, b, N, K, relu, xs)
    assert same(y2, y0)
    assert torch.equal(y2, R.bsr_int8_linear(x, p.q, p.w_scale[0, :N, None], b, xs, relu))
    return y2


def test_policy_reports_the_avx2_kernel():
    with pysparse.cpu_isa("avx2"):
        assert ops.kernel_for("cpu", "bsr_int8_linear") == "cpu-avx2"
        for M in (1, 16, 128, 4096):
            assert ops.kernel_for("cpu", "bsr_int8_linear", M=M) == "cpu-avx2"
        assert pysparse.cpu_info()["ops"]["bsr_int8_linear"] == "cpu-avx2"
    with pysparse.cpu_isa("scalar"):
        assert ops.kernel_for("cpu", "bsr_int8_linear") == "cpu-scalar"
        assert pysparse.cpu_info()["ops"]["bsr_int8_linear"] == "cpu-scalar"


def test_every_row_count_1_to_70():
    # 4-row steps with a 1..3-row tail step; N, K not multiples of 64; an empty block row
    N, K = 130, 200
    p = formats.pack_bsr_int8(pruned_weight(N, K, 0.6, zero_rows=True))
    b = torch.randn(N)
    x = torch.randn(70, K)
    for M in range(1, 71):
        for relu in (False, True):
            check(x[:M], p, b if relu else None, N, K, relu)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("N,K", [(100, 130), (64, 64), (200, 300), (1, 1), (17, 65), (192, 320)])
@pytest.mark.parametrize("density", [0.05, 0.25, 0.6, 1.0])
def test_bit_equal_to_scalar(dtype, N, K, density):
    p = formats.pack_bsr_int8(pruned_weight(N, K, density, zero_rows=density < 1))
    x = torch.randn(70, K).to(dtype)
    for M in (1, 3, 4, 5, 13, 70):
        for relu in (False, True):
            for b in (None, torch.randn(N)):
                check(x[:M], p, b, N, K, relu)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_all_empty_layer(dtype):
    N, K = 130, 200
    p = formats.pack_bsr_int8(torch.zeros(N, K))
    assert p.values.shape[0] == 0
    b = torch.randn(N)
    x = torch.randn(9, K).to(dtype)
    for relu in (False, True):
        y = check(x, p, b, N, K, relu)
        assert torch.equal(y, (b.relu() if relu else b).to(dtype).expand(9, N))
    assert torch.equal(check(x, p, None, N, K, False), torch.zeros(9, N, dtype=dtype))


def test_extreme_int8_values():
    # every weight -128 or 127 and every activation quantized to +-127: the largest VPMADDWD
    # pairs (2 * 128 * 127) and int32 sums (K * 128 * 127), both signs
    N, K = 130, 4096
    w = pruned_weight(N, K, 0.5)
    q = torch.where(torch.rand(N, K) < 0.5, -128, 127).to(torch.int8)
    p = formats.pack_bsr_int8(w, q, torch.full((N, 1), 1e-3))
    for x in (torch.ones(6, K), -torch.ones(6, K), torch.where(torch.rand(6, K) < 0.5, -1.0, 1.0)):
        check(x, p, torch.randn(N), N, K, False)
    check(torch.randn(6, K) * 100, p, None, N, K, True)


@pytest.mark.parametrize("M", [256, 300, 600])
def test_row_passes(M):
    # passes of 256 rows, activations widened per pass: a full, a partial and a third pass
    N, K = 100, 330
    p = formats.pack_bsr_int8(pruned_weight(N, K, 0.5, zero_rows=True))
    x = torch.randn(M, K)
    check(x, p, torch.randn(N), N, K, True)
    check(x.view(2, M // 2, K), p, None, N, K, False)  # leading dims


def test_static_scale_strided_x_and_threads():
    N, K = 200, 300
    w = pruned_weight(N, K, 0.4, zero_rows=True)
    full_q, scale = R.quantize_weight(torch.randn(N, K))
    p = formats.pack_bsr_int8(w, full_q, scale)  # foreign q: only the stored blocks count
    b = torch.randn(N)
    xt = torch.randn(K, 37).t()  # not contiguous
    check(xt, p, b, N, K, True)
    check(xt, p, b, N, K, False, torch.tensor([0.02]))
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        y1 = run("avx2", xt, p, b, N, K, True)
        torch.set_num_threads(2)
        y2 = run("avx2", xt, p, b, N, K, True)
    finally:
        torch.set_num_threads(n)
    assert same(y1, y2)


def test_non_finite_rows():
    # a row with NaN / Inf gets scale NaN (int8_linear.h): the whole output row is NaN on both paths
    N, K = 100, 130
    p = formats.pack_bsr_int8(pruned_weight(N, K, 0.5))
    x = torch.randn(5, K)
    x[1, 3] = float("nan")
    x[3, 100] = float("inf")
    y0 = run("scalar", x, p, None, N, K)
    y2 = run("avx2", x, p, None, N, K)
    assert same(y2, y0)
    assert y2[1].isnan().all() and y2[3].isnan().all() and not y2[0].isnan().any()
