"""The int8 GEMM's activation-range modes (csrc/cpu/int8_linear_avx2.cpp): gemm_avx2 multiplies
with VPMADDUBSW when the quantized activations are all >= 0 (a ReLU before the layer), with
VPMADDUBSW + VPSIGNB when they are >= -127, and with VPMADDWD otherwise. Each mode must give the
exact int32 sums, at the s16 bounds of every pair (the saturating multiply-add must never
saturate), on every path; the mode is chosen per call from the data, so one -128 among
non-negative values must switch it. Shapes cover the row tail (rows not a multiple of 4), K not a
multiple of 4 (the kernel stops at the valid K) and N not filling a 64-column chunk (skipped
16-column blocks)."""
import pytest
import torch

from pysparse import ops
from pysparse import ops_int8conv as opc
from pysparse import reference as R


def _mm_exact(a: torch.Tensor, w: torch.Tensor) -> None:
    packed, colsum = ops.int8_pack(w)
    y = ops.int8_mm(a, packed, colsum, w.shape[0], w.shape[1])
    assert torch.equal(y, (a.long() @ w.long().T).int())


# (M, N, K): row tails 1/3/5, N = 32 (half a chunk) / 17 / 70 (a second, partial chunk),
# K = 1 / 5 / 77 (not multiples of 4) / 600 (a second 512-k block)
MM_SHAPES = [(1, 32, 1), (3, 17, 5), (5, 70, 77), (33, 32, 600), (64, 130, 288), (4, 64, 64)]


@pytest.mark.parametrize("shape", MM_SHAPES, ids=["x".join(map(str, s)) for s in MM_SHAPES])
@pytest.mark.parametrize("lo", [0, -127, -128], ids=["nonneg", "ge-127", "full"])
def test_int8_mm_exact_per_mode(isa, shape, lo):
    M, N, K = shape
    a = torch.randint(lo, 128, (M, K), dtype=torch.int8)
    w = torch.randint(-128, 128, (N, K), dtype=torch.int8)
    _mm_exact(a, w)


@pytest.mark.parametrize("a_val,w_val", [(127, -128), (127, 127), (-127, -128), (-127, 127), (-128, -128),
                                         (-128, 127)])
def test_int8_mm_pair_bounds(isa, a_val, w_val):
    # every pair a0*w0 + a1*w1 at its extreme: 127 * -128 * 2 = -32512 (the unsigned mode),
    # |-127| * 128 * 2 (the VPSIGNB mode), -128 * -128 * 2 = 32768 (past s16: only the
    # VPMADDWD mode may take it)
    M, N, K = 5, 33, 260
    a = torch.full((M, K), a_val, dtype=torch.int8)
    w = torch.full((N, K), w_val, dtype=torch.int8)
    w[1::2, ::3] = -w_val if w_val != -128 else 127  # mixed signs per column
    _mm_exact(a, w)


@pytest.mark.parametrize("odd", [-128, -127, -1])
def test_one_value_switches_the_mode(isa, odd):
    # non-negative activations but one odd value, in the last row and past the first 512 k:
    # a mode picked from the first rows (or a wrong bound) would saturate or misread it
    M, N, K = 7, 40, 700
    a = torch.randint(0, 128, (M, K), dtype=torch.int8)
    a[-1, 650] = odd
    w = torch.randint(-128, 128, (N, K), dtype=torch.int8)
    w[:, 650] = -128
    _mm_exact(a, w)


@pytest.mark.parametrize("lo", [0, -127, -128], ids=["nonneg", "ge-127", "full"])
@pytest.mark.parametrize("k,cin,cout", [(3, 32, 32), (1, 32, 128), (3, 3, 20), (7, 3, 32)])
def test_int8_conv2d_exact_per_mode(isa, lo, k, cin, cout):
    # integral x with x_scale 1 and unit weight scales: the output is float(the exact sum)
    # (every sum < 2^24); the 32-channel cases are the compacted ResNet-50's first stage
    # (N = 32 fills half a chunk, the 1x1 has K = 32 of Kp = 64), the 3-channel ones its stem
    wq = torch.randint(-128, 128, (cout, cin, k, k), dtype=torch.int8)
    x = torch.randint(lo, 128, (2, cin, 9, 10)).float()
    packed, colsum = opc.int8_conv2d_pack(wq, 1)
    ws = opc.w_scale_packed(torch.ones(cout), cout, cin, k, k, 1)
    p = k // 2
    y = opc.int8_conv2d(x, packed, colsum, ws, None, torch.tensor([1.0]), (k, k), (1, 1), (p, p), (1, 1), 1,
                        cin, cout)
    ref = torch.nn.functional.conv2d(x.double(), wq.double(), None, 1, p)
    assert torch.equal(y.double(), ref)
    # and the int8-in form (the previous int8 layer's output) takes the same modes
    y8 = opc.int8_conv2d(x.to(torch.int8), packed, colsum, ws, None, torch.tensor([1.0]), (k, k), (1, 1),
                         (p, p), (1, 1), 1, cin, cout)
    assert torch.equal(y8.double(), ref)


def test_int8_linear_relu_input_matches_reference(isa):
    # static scale, non-negative input (the unsigned mode) through the float epilogue
    x = torch.rand(9, 77) * 3
    w = torch.randn(50, 77)
    wq, ws = R.quantize_weight(w)
    packed, colsum = ops.int8_pack(wq)
    wsp = torch.ones(1, packed.shape[0] * 16)
    wsp[0, :50] = ws.reshape(-1)
    xs = torch.tensor([3.0 / 127])
    y = ops.int8_linear(x, packed, colsum, wsp, None, xs, 50, 77)
    assert torch.equal(y, R.int8_linear(x, wq, ws, None, xs))
