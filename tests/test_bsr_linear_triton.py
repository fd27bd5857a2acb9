"""The Triton block-sparse kernels (kernels/bsr_linear.py), run on CPU tensors by the
Triton interpreter.

bsr_int8_mm_triton must equal an int64 reference bit for bit; bsr_int8_linear_triton must
equal the same float32 operations done in PyTorch bit for bit; bsr_linear_triton must lie
within a proven rounding bound of a float64 reference computed from the same (rounded)
operands, and equal PyTorch bit for bit where its math is exact (the bf16 / fp16 casts).
Weights are random block-pruned ones (an all-zero block row included), with N and K not
multiples of the block, so edge blocks and masked x loads are exercised.
GPU-compiled code is not checked here (no GPU in the interpreter).
"""
import os

# Before triton is imported: Triton decides when a kernel is decorated whether it is
# interpreted (see tests/test_int8_linear_triton.py).
os.environ["TRITON_INTERPRET"] = "1"

import importlib.util  # noqa: E402
import pathlib  # noqa: E402
import re  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton", reason="triton is not installed")

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _load_interpreted_kernels():
    """A private copy of kernels/bsr_linear.py, decorated now, under TRITON_INTERPRET=1
    (a shared import may have been decorated for the GPU before this file set it)."""
    spec = importlib.util.spec_from_file_location("_pysparse_bsr_linear_interpreted",
                                                  ROOT / "kernels" / "bsr_linear.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


T = _load_interpreted_kernels()

BLOCKS = [(16, 16), (32, 64)]  # (bn, bk): 70 x 130 is a multiple of neither
# int8 blocks: bk >= 32, as the GPU needs (an 8-bit tl.dot needs K >= 32; the interpreter
# would take 16, so shapes that would not compile on hardware are kept out of here).
INT8_BLOCKS = [(16, 32), (32, 64)]
N0, K0 = 70, 130


# ---------------------------------------------------------------- helpers
def block_mask(N, K, bn, bk, density, zero_row=True):
    keep = torch.rand(-(-N // bn), -(-K // bk)) < density
    if zero_row:
        keep[0] = False  # a block row with no block at all
    return keep[:, None, :, None].expand(-1, bn, -1, bk).reshape(keep.shape[0] * bn, -1)[:N, :K]


def pruned_weight(N, K, bn, bk, density=0.5, zero_row=True):
    return torch.randn(N, K) * block_mask(N, K, bn, bk, density, zero_row)


def rand_i8(*shape):
    t = torch.randint(-128, 128, shape, dtype=torch.int8)
    if t.numel():
        t.view(-1)[0] = -128  # always exercise the asymmetric end
    return t


def pruned_i8(N, K, bn, bk, density=0.5):
    w = rand_i8(N, K) * block_mask(N, K, bn, bk, density).to(torch.int8)
    w[-1, -1] = -128  # the last (edge) block is kept and holds the extreme value
    return w


def bsr_to_dense(values, row_ptr, col_idx, N, K):
    """Inverse of dense_to_bsr, written independently (loops), for the round trip."""
    bk, bn = values.shape[1:]
    R, KB = -(-N // bn), -(-K // bk)
    w = values.new_zeros(R * bn, KB * bk)
    for r in range(R):
        for j in range(int(row_ptr[r]), int(row_ptr[r + 1])):
            c = int(col_idx[j])
            w[r * bn:(r + 1) * bn, c * bk:(c + 1) * bk] = values[j].T
    return w[:N, :K]


# Half-ulp relative rounding of the final cast to the output dtype.
_U_OUT = {torch.float32: 0.0, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
U32 = 2.0**-24


def check_float_bound(y, x_r, w_r, bias, relu, out_dtype):
    """y against float64 math on the rounded operands x_r, w_r (what the kernel multiplies).

    Error bound: an fp32 sum of K products (each product rounded at most once, exact for
    fp16/bf16 operands) plus the bias is within (K + 1) * 2**-24 * (sum |x w| + |bias|) of
    the exact value, whatever the summation order (tl.dot's is unspecified); ReLU does not
    grow it. Then the cast to ``out_dtype``: half an ulp, u_out * |y32|, with an absolute
    2**-25 for fp16's subnormal range. 1.01 covers second-order terms.
    """
    K = x_r.shape[1]
    xd, wd = x_r.double(), w_r.double()
    ref = xd @ wd.T
    mag = xd.abs() @ wd.abs().T
    if bias is not None:
        ref, mag = ref + bias.double(), mag + bias.double().abs()
    if relu:
        ref = torch.relu(ref)
    u = _U_OUT[out_dtype]
    acc_err = (K + 1) * U32 * mag
    bound = 1.01 * (acc_err * (1 + u) + u * ref.abs()) + (2.0**-25 if out_dtype == torch.float16 else 0.0)
    err = (y.double() - ref).abs()
    assert bool((err <= bound).all()), f"max excess {(err - bound).max().item():.3g}"


def int8_epilogue_ref(acc, x_scale, w_scale, bias, relu, out_dtype):
    """The kernel's float operations in the same order, each rounded to float32."""
    y = (acc.float() * w_scale[None, :]) * x_scale[:, None]
    if bias is not None:
        y = y + bias[None, :]
    if relu:
        y = torch.relu(y)
    return y.to(out_dtype)


# ---------------------------------------------------------------- dense_to_bsr
@pytest.mark.parametrize("bn,bk", BLOCKS + [(64, 32), (3, 5)])
def test_dense_to_bsr_round_trip(bn, bk):
    w = pruned_weight(N0, K0, bn, bk)
    values, row_ptr, col_idx = T.dense_to_bsr(w, bn, bk)
    R, KB = -(-N0 // bn), -(-K0 // bk)
    assert values.shape[1:] == (bk, bn) and values.dtype == w.dtype
    assert row_ptr.dtype == col_idx.dtype == torch.int32 and row_ptr.shape == (R + 1,)
    assert row_ptr[0] == 0 and row_ptr[-1] == values.shape[0] == col_idx.shape[0]
    assert row_ptr[1] == 0  # the all-zero first block row holds no block
    assert bool((col_idx >= 0).all() and (col_idx < KB).all())
    assert bool(values.flatten(1).ne(0).any(1).all())  # only blocks with a nonzero
    assert torch.equal(bsr_to_dense(values, row_ptr, col_idx, N0, K0), w)
    # k-major: values[j, k, n] = W[r*bn + n, col_idx[j]*bk + k] (first block of row 1)
    for r in range(R):
        for j in range(int(row_ptr[r]), int(row_ptr[r + 1])):
            c = int(col_idx[j])
            n, k = min(2, N0 - r * bn - 1), min(1, K0 - c * bk - 1)
            assert values[j, k, n] == w[r * bn + n, c * bk + k]


def test_dense_to_bsr_matches_pysparse_formats():
    formats = pytest.importorskip("pysparse.formats")
    w = pruned_weight(N0, K0, 32, 64)
    values, row_ptr, col_idx = T.dense_to_bsr(w, 32, 64)
    ref_values, lay = formats.pack_bsr_f32(w, 32, 64)
    assert torch.equal(values, ref_values)
    assert torch.equal(row_ptr, lay.row_ptr) and torch.equal(col_idx, lay.col_idx)


def test_dense_to_bsr_edge_cases():
    v, rp, ci = T.dense_to_bsr(torch.zeros(N0, K0), 16, 16)
    assert v.shape == (0, 16, 16) and rp.tolist() == [0] * 6 and ci.numel() == 0
    v, rp, ci = T.dense_to_bsr(torch.zeros(0, 5), 16, 16)
    assert v.shape == (0, 16, 16) and rp.tolist() == [0]
    wq = pruned_i8(N0, K0, 16, 16)
    v, rp, ci = T.dense_to_bsr(wq, 16, 16)
    assert v.dtype == torch.int8 and torch.equal(bsr_to_dense(v, rp, ci, N0, K0), wq)
    with pytest.raises(ValueError, match="w must be a 2-D tensor"):
        T.dense_to_bsr(torch.zeros(3), 16, 16)
    with pytest.raises(ValueError, match="bk must be an int >= 1"):
        T.dense_to_bsr(torch.zeros(3, 3), 16, 0)


# ---------------------------------------------------------------- bsr_linear_triton
# (x dtype, values dtype): same dtype, and mixed (x is cast to the values' dtype).
DTYPE_PAIRS = [(torch.float32, torch.float32), (torch.float16, torch.float16),
               (torch.bfloat16, torch.bfloat16), (torch.float32, torch.bfloat16),
               (torch.bfloat16, torch.float32), (torch.float32, torch.float16)]


@pytest.mark.parametrize("x_dtype,v_dtype", DTYPE_PAIRS, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("bn,bk", BLOCKS)
@pytest.mark.parametrize("M", [0, 1, 5, 17])
def test_bsr_linear_vs_float64(x_dtype, v_dtype, bn, bk, M):
    w = pruned_weight(N0, K0, bn, bk)
    values, row_ptr, col_idx = T.dense_to_bsr(w.to(v_dtype), bn, bk)
    x = torch.randn(M, K0).to(x_dtype)
    b = torch.randn(N0)
    # The operands the kernel multiplies: x cast to the values' dtype (as torch's .to),
    # and the weight as stored.
    x_r, w_r = x.to(v_dtype), w.to(v_dtype)
    for bias in (None, b):
        for relu in (False, True):
            y = T.bsr_linear_triton(x, values, row_ptr, col_idx, bias, N0, K0, relu)
            assert y.dtype == x_dtype and y.shape == (M, N0)
            check_float_bound(y, x_r, w_r, bias, relu, x_dtype)


@pytest.mark.parametrize("M,N,K", [(1, 1, 1), (3, 16, 16), (4, 100, 33), (2, 300, 20)])
def test_bsr_linear_other_shapes(M, N, K):
    for bn, bk in BLOCKS:
        w = pruned_weight(N, K, bn, bk, 0.6, zero_row=False)
        values, row_ptr, col_idx = T.dense_to_bsr(w, bn, bk)
        x, b = torch.randn(M, K), torch.randn(N)
        y = T.bsr_linear_triton(x, values, row_ptr, col_idx, b, N, K, relu=True)
        check_float_bound(y, x, w, b, True, torch.float32)


def test_bsr_linear_strided_x():
    # x with a non-unit K stride (and a row stride that is not K).
    w = pruned_weight(N0, K0, 16, 16)
    values, row_ptr, col_idx = T.dense_to_bsr(w, 16, 16)
    x = torch.randn(9, 2 * K0 + 6)[:, : 2 * K0 : 2]
    y = T.bsr_linear_triton(x, values, row_ptr, col_idx, None, N0, K0)
    check_float_bound(y, x, w, None, False, torch.float32)


def _diag_weight(n):
    """An n x n diagonal weight: y[:, i] = x[:, i] * d[i], one product, all other terms 0."""
    d = torch.randn(n)
    return torch.diag(d)


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.float16])
def test_x_cast_to_bf16_rounds_to_nearest_even(x_dtype):
    # x * I with fp32 out for x fp32 is exactly x.to(bf16): bit-compare the kernel's cast
    # with torch's. 1 + 3 * 2**-8 is a tie that truncation rounds the other way.
    n = 32
    x = (torch.randn(5, n) * 3).to(x_dtype)
    x[0, :4] = torch.tensor([1 + 3 * 2.0**-8, -(1 + 3 * 2.0**-8), 1 + 2.0**-8, 1.0 + 2.0**-9])
    values, row_ptr, col_idx = T.dense_to_bsr(torch.eye(n).bfloat16(), 16, 16)
    y = T.bsr_linear_triton(x, values, row_ptr, col_idx, None, n, n)
    assert torch.equal(y, x.to(torch.bfloat16).to(x_dtype))


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_diagonal_products_bias_and_output_cast_bit_exact(out_dtype):
    # One nonzero product per output: y = fl32(fl32(x * d) + bias), then the cast to
    # x.dtype; torch does the same float32 operations, so the results are equal bit for bit
    # (this pins the bf16 output rounding to nearest even, and fp16's).
    n = 48
    w = _diag_weight(n)
    values, row_ptr, col_idx = T.dense_to_bsr(w, 16, 16)
    x = (torch.randn(7, n) * 5).to(out_dtype)
    b = torch.randn(n)
    for relu in (False, True):
        y = T.bsr_linear_triton(x, values, row_ptr, col_idx, b, n, n, relu)
        ref = x.float() * w.diagonal()[None, :] + b
        ref = (torch.relu(ref) if relu else ref).to(out_dtype)
        assert torch.equal(y, ref)


def test_relu_keeps_nan():
    w = pruned_weight(N0, K0, 16, 16)
    values, row_ptr, col_idx = T.dense_to_bsr(w, 16, 16)
    b = torch.randn(N0)
    b[3] = float("nan")
    b[20] = -1e30  # the first block row is all zero: relu(-1e30) = 0
    y = T.bsr_linear_triton(torch.randn(4, K0), values, row_ptr, col_idx, b, N0, K0, relu=True)
    assert torch.isnan(y[:, 3]).all()
    y[:, 3] = 0
    assert bool((y >= 0).all()) and bool((y[:, 20] == 0).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_all_zero_layer(dtype):
    values, row_ptr, col_idx = T.dense_to_bsr(torch.zeros(N0, K0, dtype=dtype), 32, 64)
    assert values.shape[0] == 0
    b = torch.randn(N0)
    x = torch.randn(5, K0).to(dtype)
    y = T.bsr_linear_triton(x, values, row_ptr, col_idx, b, N0, K0)
    assert torch.equal(y, b.to(dtype).expand(5, N0))
    y = T.bsr_linear_triton(x, values, row_ptr, col_idx, b, N0, K0, relu=True)
    assert torch.equal(y, torch.relu(b).to(dtype).expand(5, N0))
    assert torch.equal(T.bsr_linear_triton(x, values, row_ptr, col_idx, None, N0, K0),
                       torch.zeros(5, N0, dtype=dtype))


# ---------------------------------------------------------------- int8
@pytest.mark.parametrize("bn,bk", INT8_BLOCKS + [(64, 64)])
@pytest.mark.parametrize("M,N,K", [(0, 70, 130), (1, 70, 130), (5, 70, 130), (17, 70, 130), (3, 33, 2048)])
def test_bsr_int8_mm_bit_exact(bn, bk, M, N, K):
    w = pruned_i8(N, K, bn, bk)
    values, row_ptr, col_idx = T.dense_to_bsr_int8(w, bn, bk)
    x = rand_i8(M, K)
    acc = T.bsr_int8_mm_triton(x, values, row_ptr, col_idx, N, K)
    assert acc.dtype == torch.int32 and acc.shape == (M, N)
    assert torch.equal(acc, (x.long() @ w.long().T).to(torch.int32))  # int64 sums: exact


def test_bsr_int8_mm_extremes():
    # A dense weight at K = 2048: all -128 x -128 sums to 2048 * 16384 = 2**25, and
    # -128 x 127 to the most negative value; an all-zero row gives 0.
    K = 2048
    x = torch.full((2, K), -128, dtype=torch.int8)
    w = torch.stack([torch.full((K,), -128, dtype=torch.int8), torch.full((K,), 127, dtype=torch.int8),
                     torch.zeros(K, dtype=torch.int8)])
    values, row_ptr, col_idx = T.dense_to_bsr_int8(w, 16, 64)
    acc = T.bsr_int8_mm_triton(x, values, row_ptr, col_idx, 3, K)
    assert acc.tolist() == [[16384 * K, -128 * 127 * K, 0]] * 2


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bn,bk", INT8_BLOCKS)
@pytest.mark.parametrize("M", [1, 17])
def test_bsr_int8_linear_bit_exact(out_dtype, bn, bk, M):
    w = pruned_i8(N0, K0, bn, bk)
    values, row_ptr, col_idx = T.dense_to_bsr_int8(w, bn, bk)
    x = rand_i8(M, K0)
    x_scale = torch.rand(M) * 0.1 + 1e-3
    w_scale = torch.rand(N0) * 0.01 + 1e-4
    b = torch.randn(N0)
    acc = (x.long() @ w.long().T).to(torch.int32)
    for bias in (None, b):
        for relu in (False, True):
            y = T.bsr_int8_linear_triton(x, x_scale, values, row_ptr, col_idx, w_scale, bias, N0, K0,
                                         relu, out_dtype)
            assert y.dtype == out_dtype and y.shape == (M, N0)
            # Same float32 operations in the same order, then the same rounding to out_dtype.
            assert torch.equal(y, int8_epilogue_ref(acc, x_scale, w_scale, bias, relu, out_dtype))


def test_bsr_int8_linear_nan_row_scale_and_stride0_scale():
    w = pruned_i8(N0, K0, 32, 64)
    values, row_ptr, col_idx = T.dense_to_bsr_int8(w, 32, 64)
    x = rand_i8(4, K0)
    x_scale = torch.rand(4) + 0.01
    x_scale[2] = float("nan")
    w_scale, b = torch.rand(N0) * 0.01, torch.randn(N0)
    y = T.bsr_int8_linear_triton(x, x_scale, values, row_ptr, col_idx, w_scale, b, N0, K0, relu=True)
    assert torch.isnan(y[2]).all() and torch.isfinite(y[[0, 1, 3]]).all()
    s = torch.tensor([0.02])  # one static scale expanded to [M] with stride 0
    y = T.bsr_int8_linear_triton(x, s.expand(4), values, row_ptr, col_idx, w_scale, b, N0, K0)
    acc = (x.long() @ w.long().T).to(torch.int32)
    assert torch.equal(y, int8_epilogue_ref(acc, s.expand(4), w_scale, b, False, torch.float32))


def test_bsr_int8_all_zero_layer():
    values, row_ptr, col_idx = T.dense_to_bsr_int8(torch.zeros(N0, K0, dtype=torch.int8), 16, 32)
    x = rand_i8(3, K0)
    xs, ws, b = torch.rand(3), torch.rand(N0), torch.randn(N0)
    assert torch.equal(T.bsr_int8_mm_triton(x, values, row_ptr, col_idx, N0, K0),
                       torch.zeros(3, N0, dtype=torch.int32))
    y = T.bsr_int8_linear_triton(x, xs, values, row_ptr, col_idx, ws, b, N0, K0, out_dtype=torch.bfloat16)
    assert torch.equal(y, b.to(torch.bfloat16).expand(3, N0))


def test_int8_blocks_k_contiguous_any_strides():
    # values_q [nnzb, bn, bk], K contiguous (dense_to_bsr_int8); the kernel reads it through
    # its strides, so a transposed view of [nnzb, bk, bn] blocks gives the same sums.
    w = pruned_i8(N0, K0, 32, 64)
    v, rp, ci = T.dense_to_bsr_int8(w, 32, 64)
    vf, rp2, ci2 = T.dense_to_bsr(w, 32, 64)
    assert v.shape[1:] == (32, 64) and v.stride(2) == 1
    assert torch.equal(v, vf.transpose(1, 2)) and torch.equal(rp, rp2) and torch.equal(ci, ci2)
    x = rand_i8(5, K0)
    ref = (x.long() @ w.long().T).to(torch.int32)
    assert torch.equal(T.bsr_int8_mm_triton(x, v, rp, ci, N0, K0), ref)
    assert torch.equal(T.bsr_int8_mm_triton(x, vf.transpose(1, 2), rp, ci, N0, K0), ref)


def test_fixed_config_env(monkeypatch):
    # PYSPARSE_TRITON_FIXED_CONFIG=1: no autotuning, the first config of the M bucket runs
    # through the jitted kernel; the results are the same.
    w = pruned_i8(N0, K0, 32, 64)
    v, rp, ci = T.dense_to_bsr_int8(w, 32, 64)
    x = rand_i8(17, K0)
    ref = T.bsr_int8_mm_triton(x, v, rp, ci, N0, K0)
    monkeypatch.setenv(T.FIXED_CONFIG_ENV, "1")
    assert T.fixed_config_enabled()
    log = T.LAUNCH_LOG = []
    try:
        assert torch.equal(T.bsr_int8_mm_triton(x, v, rp, ci, N0, K0), ref)
    finally:
        T.LAUNCH_LOG = None
    assert log and log[0][0] == "bsr" and log[0][1]["fixed"] is True and log[0][1]["BK"] == 64
    monkeypatch.setenv(T.FIXED_CONFIG_ENV, "0")
    assert not T.fixed_config_enabled()


def test_gpu_configs_one_per_footprint_and_fixed_first():
    cfgs = T.gpu_configs()
    keys = [(c.kwargs["BLOCK_M"], c.num_warps, c.num_stages) for c in cfgs]
    assert len(keys) == len(set(keys))
    x, v8, v32 = torch.empty(1, 1, dtype=torch.bfloat16), torch.empty(1, 1, dtype=torch.int8), torch.empty(1, 1)
    for M in (1, 16, 17, 64, 65, 4096):
        for bk, bn, v in ((64, 64, v8), (64, 64, v32), (128, 128, v32)):
            kept = T._prune(cfgs, {"M_BUCKET": T._m_bucket(M), "x_ptr": x, "v_ptr": v}, BK=bk, BN=bn)
            assert kept and len({(c.kwargs["BLOCK_M"], c.num_warps, c.num_stages) for c in kept}) == len(kept)
    # the key holds no block count: layers of any density share one tuning
    assert "NNZB" not in T._bsr_kernel.keys


# ---------------------------------------------------------------- tuning
def test_prune_decode_and_shared_memory():
    cfgs = [T._config(bm, 4, st) for bm in (16, 32, 64, 128) for st in (1, 3)]
    x, v = torch.empty(1, 1), torch.empty(1, 16, 16)
    kept = T._prune(cfgs, {"M_BUCKET": T._m_bucket(5), "x_ptr": x, "v_ptr": v}, BK=16, BN=16)
    assert {c.kwargs["BLOCK_M"] for c in kept} == {16}  # decode: never padded to 64/128 rows
    kept = T._prune(cfgs, {"M_BUCKET": T._m_bucket(4000), "x_ptr": x, "v_ptr": v}, BK=16, BN=16)
    assert {c.kwargs["BLOCK_M"] for c in kept} == {64, 128}
    # fp32 128 x 128 blocks: 3 stages of (128-row x tile + block) = 384 KiB cannot fit;
    # the pipelines are cut to the stages that do (96 KiB a stage at 64 rows, 128 KiB at
    # 128 rows: one stage each, duplicates merged).
    v = torch.empty(1, 128, 128)
    kept = T._prune(cfgs, {"M_BUCKET": 4096, "x_ptr": x, "v_ptr": v}, BK=128, BN=128)
    assert sorted((c.kwargs["BLOCK_M"], c.num_stages) for c in kept) == [(64, 1), (128, 1)]
    assert all(T._stage_bytes(c, 128, 128, 4, 4) * c.num_stages <= T._SMEM_BUDGET for c in kept)
    assert T._m_bucket(1) == T._m_bucket(16) == 16 and T._m_bucket(17) == 32


# ---------------------------------------------------------------- bad input
def test_bad_input_messages():
    w = pruned_weight(N0, K0, 16, 16)
    v, rp, ci = T.dense_to_bsr(w, 16, 16)
    x = torch.randn(3, K0)
    wq = pruned_i8(N0, K0, 16, 32)
    vq, rpq, ciq = T.dense_to_bsr_int8(wq, 16, 32)
    xq, xs, ws = rand_i8(3, K0), torch.ones(3), torch.ones(N0)
    L = T.bsr_linear_triton
    Q = T.bsr_int8_linear_triton
    cases = [
        (lambda: L(x.double(), v, rp, ci, None, N0, K0), "x must be torch.float32"),
        (lambda: L(x, v.double(), rp, ci, None, N0, K0), "values must be torch.float32"),
        (lambda: L(x, v[:, :, 0], rp, ci, None, N0, K0), "values must be 3-D"),
        (lambda: L(x, torch.zeros(1, 16, 24), rp, ci[:1], None, N0, K0), "values must be [nnzb, bk, bn] blocks"),
        (lambda: L(x, torch.zeros(1, 8, 16), rp, ci[:1], None, N0, K0), "got bk = 8, bn = 16"),
        (lambda: L(x, torch.zeros(1, 16, 256), rp, ci[:1], None, N0, K0), "powers of two in 16..128"),
        (lambda: L(torch.randn(3, K0 + 1), v, rp, ci, None, N0, K0), "x must be [M, K] with K = 130"),
        (lambda: L(x, v, rp.long(), ci, None, N0, K0), "row_ptr must be torch.int32"),
        (lambda: L(x, v, rp[:-1], ci, None, N0, K0), "row_ptr must have shape [ceil(N / bn) + 1] = [6]"),
        (lambda: L(x, v, rp, ci[:-1], None, N0, K0), "col_idx must have shape [nnzb]"),
        (lambda: L(x, v, rp, ci, torch.ones(N0 + 1), N0, K0), "bias must have shape [N] = [70]"),
        (lambda: L(x, v, rp, ci, torch.ones(N0).half(), N0, K0), "bias must be float32"),
        (lambda: L(x, v.to("meta"), rp, ci, None, N0, K0), "same device"),
        (lambda: L(x, v, rp, ci, None, -1, K0), "N must be an int >= 0"),
        (lambda: T.bsr_int8_mm_triton(xq.float(), vq, rpq, ciq, N0, K0), "x_q must be torch.int8"),
        (lambda: T.bsr_int8_mm_triton(xq, vq.float(), rpq, ciq, N0, K0), "values_q must be torch.int8"),
        (lambda: T.bsr_int8_mm_triton(rand_i8(1, T.MAX_K + 1), vq, rpq, ciq, N0, T.MAX_K + 1), "too large"),
        (lambda: Q(xq, torch.ones(4), vq, rpq, ciq, ws, None, N0, K0), "x_scale must have shape [M] = [3]"),
        (lambda: Q(xq, xs, vq, rpq, ciq, ws.double(), None, N0, K0), "w_scale must be float32"),
        (lambda: Q(xq, xs, vq, rpq, ciq, ws, torch.ones(4), N0, K0), "bias must have shape [N] = [70]"),
        (lambda: Q(xq, xs, vq, rpq, ciq, ws, None, N0, K0, out_dtype=torch.int32), "out_dtype"),
    ]
    for fn, msg in cases:
        with pytest.raises(ValueError, match=re.escape(msg)):
            fn()
