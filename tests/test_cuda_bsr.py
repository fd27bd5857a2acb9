"""pysparse's CUDA implementations of the block-sparse ops (pysparse/_cuda_bsr.py), run on
CPU tensors with their kernel calls routed to an interpreted copy of kernels/bsr_linear.py.

The implementation functions are called directly (the tensors are on the CPU, so the
dispatcher would pick the C++ CPU kernels) and compared with the CPU ops on the same data:
bsr_int8_linear bit for bit (same quantization, same epilogue order), bsr_linear within a
proven float32 rounding bound (the sums run in another order). GPU-compiled code is
checked by scripts/gpu_check.py.
"""
import os

# Before triton is imported (see tests/test_int8_linear_triton.py).
os.environ["TRITON_INTERPRET"] = "1"

import importlib.util  # noqa: E402
import pathlib  # noqa: E402
import warnings  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton", reason="triton is not installed")
_cuda_bsr = pytest.importorskip("pysparse._cuda_bsr", reason="pysparse (its C++ extension) does not import")
from pysparse import formats  # noqa: E402

# The interpreter's numpy matmul warns on the NaN rows these tests feed on purpose.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered in matmul:RuntimeWarning")

ROOT = pathlib.Path(__file__).resolve().parents[1]
N0, K0 = 70, 130  # a multiple of no block side: edge blocks and masked x loads
U32 = 2.0 ** -24  # float32 unit roundoff


def _load_interpreted_kernels():
    """A private copy of kernels/bsr_linear.py, decorated now, under TRITON_INTERPRET=1."""
    spec = importlib.util.spec_from_file_location("_pysparse_cuda_bsr_interpreted",
                                                  ROOT / "kernels" / "bsr_linear.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


T = _load_interpreted_kernels()


@pytest.fixture
def cuda_bsr(monkeypatch):
    """pysparse._cuda_bsr with its kernel calls routed to the interpreted kernels."""
    monkeypatch.setattr(_cuda_bsr, "_kernels", T)
    monkeypatch.setattr(_cuda_bsr, "_warned_fallback", False)
    return _cuda_bsr


# ---------------------------------------------------------------- helpers
def pruned_weight(N, K, bn, bk, density=0.5):
    keep = torch.rand(-(-N // bn), -(-K // bk)) < density
    keep[0] = False  # a block row with no block at all
    keep[-1, -1] = True  # the corner (edge) block is stored
    mask = keep[:, None, :, None].expand(-1, bn, -1, bk).reshape(keep.shape[0] * bn, -1)[:N, :K]
    return torch.randn(N, K) * mask


def x_with_edge_rows(shape, dtype, nonfinite=True):
    x = torch.randn(shape) * 3
    x2 = x.view(-1, shape[-1])
    if x2.shape[0] >= 4:
        x2[1] = 0.0                          # a zero row
        if nonfinite:
            x2[2, -1] = float("nan")         # in the last (stored, edge) block column
            x2[3, -2] = float("inf")
    return x.to(dtype)


def assert_within_fp32_bound(y, ref, x, w, bias):
    """|y - ref| <= 2 (K + 2) u (|x| @ |W|^T + |bias|), elementwise, NaN where NaN.

    Why: y and ref compute the same float32 dot products in different orders (Triton's
    tl.dot tiles; the CPU kernel's vector loop; a dense matmul for the fallback). Each is
    within gamma_K * sum|x_k w_k| of the exact dot, gamma_K = K u / (1 - K u), in any
    order, FMA or not (one rounding per product and per addition); then one rounding for
    + bias; the float32 output needs no cast. Their difference is at most twice that, and
    (K + 2) u covers gamma_K and the bias rounding.
    """
    K = x.shape[-1]
    xf = x.reshape(-1, K).double()
    mag = torch.nan_to_num(xf.abs(), posinf=0.0) @ w.double().abs().T
    if bias is not None:
        mag = mag + bias.double().abs()
    bound = (2 * (K + 2) * U32 * mag).reshape(ref.shape)
    assert torch.equal(torch.isnan(y), torch.isnan(ref))
    fin = torch.isfinite(ref)
    assert torch.equal(y[~fin & ~torch.isnan(ref)], ref[~fin & ~torch.isnan(ref)])  # same infinities
    err = (y[fin].double() - ref[fin].double()).abs()
    assert bool((err <= bound[fin]).all()), f"max excess {(err - bound[fin]).max().item():.3g}"


# ---------------------------------------------------------------- registration
def test_cuda_kernels_registered():
    assert _cuda_bsr.HAS_TRITON and _cuda_bsr.REGISTERED
    for op in ("bsr_linear", "bsr_int8_linear"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"pysparse::{op}", "CUDA"), op


# ---------------------------------------------------------------- bsr_linear
@pytest.mark.parametrize("bn,bk", [(16, 16), (64, 32), (32, 64)])
@pytest.mark.parametrize("M", [0, 1, 5])
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
def test_bsr_linear_matches_cpu_op(cuda_bsr, bn, bk, M, relu, with_bias):
    w = pruned_weight(N0, K0, bn, bk)
    values, lay = formats.pack_bsr_f32(w, bn, bk)
    bias = torch.randn(N0) if with_bias else None
    x = x_with_edge_rows((M, K0), torch.float32)
    y = cuda_bsr.bsr_linear_cuda(x, values, lay.row_ptr, lay.col_idx, bias, N0, K0, relu)
    ref = torch.ops.pysparse.bsr_linear(x, values, lay.row_ptr, lay.col_idx, bias, N0, K0, relu)
    assert y.dtype == torch.float32 and y.shape == (M, N0)
    assert_within_fp32_bound(y, ref, x, w, bias)
    if relu:
        assert bool((y[~torch.isnan(y)] >= 0).all())


@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float16])
def test_bsr_linear_low_precision_x_and_batch_dims(cuda_bsr, x_dtype):
    # x [2, 3, K] in bf16/fp16: cast exactly to the fp32 blocks on both sides; the two
    # float32 results (within the bound above) each round once to x's dtype, so they may
    # differ by one unit in the last place of that dtype (2**-7 of |y| for bf16, 2**-10
    # for fp16) plus the float32 bound, which is far below it here.
    w = pruned_weight(N0, K0, 64, 32)
    values, lay = formats.pack_bsr_f32(w, 64, 32)
    bias = torch.randn(N0)
    x = x_with_edge_rows((2, 3, K0), x_dtype, nonfinite=False)
    y = cuda_bsr.bsr_linear_cuda(x, values, lay.row_ptr, lay.col_idx, bias, N0, K0, True)
    ref = torch.ops.pysparse.bsr_linear(x, values, lay.row_ptr, lay.col_idx, bias, N0, K0, True)
    assert y.dtype == x_dtype and y.shape == (2, 3, N0)
    ulp = 2.0 ** -7 if x_dtype == torch.bfloat16 else 2.0 ** -10
    torch.testing.assert_close(y.float(), ref.float(), rtol=ulp, atol=1e-5)


@pytest.mark.parametrize("v_dtype", [torch.bfloat16, torch.float16])
def test_bsr_linear_half_values(cuda_bsr, v_dtype):
    # bf16/fp16 blocks (CUDA only; the CPU op takes fp32): x is rounded to the blocks' dtype,
    # the products are exact in float32, sums float32. So the CPU op on the same rounded
    # operands, upcast to float32, is within the float32 bound.
    w = pruned_weight(N0, K0, 32, 64).to(v_dtype)
    values, lay = formats.pack_bsr_f32(w.float(), 32, 64)
    bias = torch.randn(N0)
    x = x_with_edge_rows((5, K0), torch.float32)
    y = cuda_bsr.bsr_linear_cuda(x, values.to(v_dtype), lay.row_ptr, lay.col_idx, bias, N0, K0, False)
    xr = x.to(v_dtype).float()
    ref = torch.ops.pysparse.bsr_linear(xr, values, lay.row_ptr, lay.col_idx, bias, N0, K0, False)
    assert_within_fp32_bound(y, ref, xr, w.float(), bias)


@pytest.mark.parametrize("bn,bk,why", [(16, 8, "bk = 8 < 16"), (32, 24, "bk = 24 is not a power of two"),
                                       (64, 256, "bk = 256 > 128")])
def test_bsr_linear_small_block_falls_back(cuda_bsr, bn, bk, why):
    # Blocks the CPU op accepts but tl.dot cannot take: a dense PyTorch matmul, warned once.
    w = pruned_weight(N0, 300, bn, bk)
    values, lay = formats.pack_bsr_f32(w, bn, bk)
    bias = torch.randn(N0)
    # Finite x: in the dense matmul a NaN / Inf of x also meets the pruned zeros (documented).
    x = x_with_edge_rows((5, 300), torch.float32, nonfinite=False)
    with pytest.warns(RuntimeWarning, match=why):
        y = cuda_bsr.bsr_linear_cuda(x, values, lay.row_ptr, lay.col_idx, bias, N0, 300, True)
    ref = torch.ops.pysparse.bsr_linear(x, values, lay.row_ptr, lay.col_idx, bias, N0, 300, True)
    assert_within_fp32_bound(y, ref, x, w, bias)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once: the second call is silent
        y1 = cuda_bsr.bsr_linear_cuda(x[:1], values, lay.row_ptr, lay.col_idx, None, N0, 300, False)
    assert y1.shape == (1, N0)
    assert cuda_bsr.bsr_linear_cuda(x[:0], values, lay.row_ptr, lay.col_idx, None, N0, 300).shape == (0, N0)


def test_dense_weight_matches_formats(cuda_bsr):
    w = pruned_weight(N0, K0, 16, 8)
    values, lay = formats.pack_bsr_f32(w, 16, 8)
    assert torch.equal(cuda_bsr._dense_weight(values, lay.row_ptr, lay.col_idx, N0, K0), w)


def test_bsr_linear_empty_and_all_zero(cuda_bsr):
    values, lay = formats.pack_bsr_f32(torch.zeros(N0, K0), 64, 32)
    assert values.shape[0] == 0
    b = torch.randn(N0)
    y = cuda_bsr.bsr_linear_cuda(torch.randn(3, K0), values, lay.row_ptr, lay.col_idx, b, N0, K0, True)
    assert torch.equal(y, torch.relu(b).expand(3, N0))
    values, lay = formats.pack_bsr_f32(torch.zeros(N0, 0), 64, 32)
    y = cuda_bsr.bsr_linear_cuda(torch.randn(3, 0), values, lay.row_ptr, lay.col_idx, b, N0, 0)
    assert torch.equal(y, b.expand(3, N0))


# ---------------------------------------------------------------- bsr_int8_linear
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("M", [0, 1, 5])
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("static", [False, True])
def test_bsr_int8_linear_matches_cpu_op(cuda_bsr, dtype, M, relu, with_bias, static):
    # Same quantization (pysparse._cuda_ops.quantize_rows = the CPU kernels' float ops) and
    # the same epilogue order ((acc * w_scale) * x_scale + bias, ReLU keeping NaN, one
    # rounding to the output dtype, no FMA): equal bit for bit, NaN rows included.
    w = pruned_weight(N0, K0, 64, 64)
    p = formats.pack_bsr_int8(w)
    bias = torch.randn(N0) if with_bias else None
    x_scale = torch.tensor([0.05]) if static else None
    x = x_with_edge_rows((M, K0), dtype)
    y = cuda_bsr.bsr_int8_linear_cuda(x, formats.int8_blocks_to_kmajor(p.values), p.layout.row_ptr,
                                      p.layout.col_idx, p.colsum, p.w_scale, bias, x_scale, N0, K0, relu)
    ref = torch.ops.pysparse.bsr_int8_linear(x, p.values, p.layout.row_ptr, p.layout.col_idx, p.colsum,
                                             p.w_scale, bias, x_scale, N0, K0, relu)
    assert y.dtype == dtype and y.shape == (M, N0)
    torch.testing.assert_close(y, ref, rtol=0, atol=0, equal_nan=True)


def test_bsr_int8_linear_batch_dims_all_zero_and_k0(cuda_bsr):
    p = formats.pack_bsr_int8(pruned_weight(N0, K0, 64, 64))
    kv = formats.int8_blocks_to_kmajor(p.values)
    bias = torch.randn(N0)
    x = torch.randn(2, 3, K0)
    args = (p.layout.row_ptr, p.layout.col_idx, p.colsum, p.w_scale, bias, None, N0, K0, True)
    y = cuda_bsr.bsr_int8_linear_cuda(x, kv, *args)
    assert torch.equal(y, torch.ops.pysparse.bsr_int8_linear(x, p.values, *args))
    z = formats.pack_bsr_int8(torch.zeros(N0, K0))  # no block: (0 * w_scale) * x_scale + bias
    args = (z.layout.row_ptr, z.layout.col_idx, z.colsum, z.w_scale, bias, None, N0, K0, False)
    x = x_with_edge_rows((4, K0), torch.bfloat16)
    torch.testing.assert_close(cuda_bsr.bsr_int8_linear_cuda(x, formats.int8_blocks_to_kmajor(z.values), *args),
                               torch.ops.pysparse.bsr_int8_linear(x, z.values, *args), rtol=0, atol=0, equal_nan=True)
    e = formats.pack_bsr_int8(torch.zeros(N0, 0))  # K = 0: relu?(bias), a fresh tensor
    args = (e.layout.row_ptr, e.layout.col_idx, e.colsum, e.w_scale, bias, None, N0, 0, True)
    y = cuda_bsr.bsr_int8_linear_cuda(torch.randn(3, 0), formats.int8_blocks_to_kmajor(e.values), *args)
    assert torch.equal(y, torch.ops.pysparse.bsr_int8_linear(torch.randn(3, 0), e.values, *args))


def test_bad_input_messages(cuda_bsr):
    p = formats.pack_bsr_int8(pruned_weight(N0, K0, 64, 64))
    kv = formats.int8_blocks_to_kmajor(p.values)
    rp, ci, x = p.layout.row_ptr, p.layout.col_idx, torch.randn(2, K0)
    i8 = cuda_bsr.bsr_int8_linear_cuda
    values, lay = formats.pack_bsr_f32(pruned_weight(N0, K0, 64, 32), 64, 32)
    cases = [
        (lambda: i8(x, p.values, rp, ci, p.colsum, p.w_scale, None, None, N0, K0), "int8_blocks_to_kmajor"),
        (lambda: i8(x, kv, rp, ci, p.colsum, torch.ones(1, N0), None, None, N0, K0), "w_scale"),
        (lambda: i8(x, kv, rp, ci, p.colsum, p.w_scale, torch.ones(N0).double(), None, N0, K0), "bias"),
        (lambda: i8(x, kv, rp, ci, p.colsum, p.w_scale, None, torch.ones(2), N0, K0), "x_scale"),
        (lambda: i8(x.double(), kv, rp, ci, p.colsum, p.w_scale, None, None, N0, K0), "x must be float32"),
        (lambda: i8(torch.randn(2, K0 + 1), kv, rp, ci, p.colsum, p.w_scale, None, None, N0, K0), "last dim"),
        (lambda: cuda_bsr.bsr_linear_cuda(x, values.double(), lay.row_ptr, lay.col_idx, None, N0, K0),
         "values must be"),
        (lambda: cuda_bsr.bsr_linear_cuda(x, values, lay.row_ptr[:-1], lay.col_idx, None, N0, K0), "row_ptr"),
    ]
    for fn, msg in cases:
        with pytest.raises(ValueError, match=msg):
            fn()


def test_int8_gpu_layout_is_k_major():
    # GPU int8 blocks: [nnzb, 64 n, 64 k], K contiguous, each block as it sits in W (Hopper's
    # int8 wgmma takes B K-major only); the CPU layout converts there and back exactly.
    w = pruned_weight(N0, K0, 64, 64)
    p = formats.pack_bsr_int8(w)
    g = formats.int8_blocks_to_kmajor(p.values)
    blocks, _ = formats.dense_to_bsr(p.q, 64, 64, formats.block_mask(w, 64, 64))  # [nnzb, 64 n, 64 k]
    assert g.shape == blocks.shape and g.is_contiguous() and torch.equal(g, blocks)
    assert torch.equal(formats.int8_blocks_to_cpu(g), p.values)
    assert torch.equal(formats.int8_bsr_to_dense(g, p.layout.row_ptr, p.layout.col_idx, N0, K0), p.q)
    assert torch.equal(formats.int8_bsr_to_dense(p.values, p.layout.row_ptr, p.layout.col_idx, N0, K0), p.q)
    assert torch.equal(formats.int8_bsr_colsum(p.values, p.layout.row_ptr, N0), p.colsum[0, :N0])
    from pysparse import ops  # the dense reconstruction (backward) takes both layouts
    a = ops.bsr_int8_dequantized_weight(g, p.layout.row_ptr, p.layout.col_idx, p.w_scale, N0, K0)
    b = ops.bsr_int8_dequantized_weight(p.values, p.layout.row_ptr, p.layout.col_idx, p.w_scale, N0, K0)
    assert torch.equal(a, b) and torch.equal(a, p.q.float() * p.w_scale[0, :N0, None])
