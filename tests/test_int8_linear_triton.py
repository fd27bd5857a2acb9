"""The Triton int8 kernels (kernels/int8_linear.py) and pysparse's CUDA op implementations
(pysparse/_cuda_ops.py), run on CPU tensors by the Triton interpreter.

int8_mm_triton must equal an int64 reference bit for bit; int8_linear_triton must equal
the same float32 operations done in PyTorch bit for bit, and a float64 reference within
the rounding bound of those operations; the CUDA op implementations must equal the C++
CPU ops bit for bit (same quantization, same epilogue order). GPU-compiled code is
checked by scripts/gpu_check.py.
"""
import os

# Before triton is imported: Triton decides when a kernel is decorated whether it is
# interpreted, and triton.language's own helpers are decorated when triton is first
# imported. Left set for the rest of the session: the interpreter checks it again
# while it runs. (So compiled-GPU Triton tests belong in another process: see
# scripts/gpu_check.py.)
os.environ["TRITON_INTERPRET"] = "1"

import importlib.util  # noqa: E402
import pathlib  # noqa: E402
import re  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton", reason="triton is not installed")

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _load_interpreted_kernels():
    """A private copy of kernels/int8_linear.py, decorated now, under TRITON_INTERPRET=1.

    The shared module (pysparse.kernels.int8_linear) may already have been imported by
    pysparse, compiled for the GPU, before this file set the variable.
    """
    spec = importlib.util.spec_from_file_location("_pysparse_int8_linear_interpreted",
                                                  ROOT / "kernels" / "int8_linear.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


T = _load_interpreted_kernels()

try:  # the op implementations; the kernel tests above them do not need pysparse
    from pysparse import _cuda_ops
    _CUDA_OPS_ERROR = None
except Exception as e:  # e.g. pysparse/__init__.py mid-edit, or the extension not built
    _cuda_ops, _CUDA_OPS_ERROR = None, f"{type(e).__name__}: {e}"

needs_cuda_ops = pytest.mark.skipif(_cuda_ops is None, reason=f"pysparse._cuda_ops: {_CUDA_OPS_ERROR}")


def rand_i8(*shape, gen=None):
    t = torch.randint(-128, 128, shape, dtype=torch.int8, generator=gen)
    if t.numel():
        t.view(-1)[0] = -128  # always exercise the asymmetric end
    return t


def ref_mm(a, w):
    return (a.long() @ w.long().T).to(torch.int32)  # int64 sums: exact


# ---------------------------------------------------------------- int8_mm_triton
@pytest.mark.parametrize("M,N,K", [(1, 1, 1), (0, 5, 7), (5, 0, 7), (4, 3, 0), (3, 17, 33),
                                   (17, 65, 130), (40, 70, 300), (2, 33, 4096)])
def test_int8_mm_bit_exact(M, N, K):
    a, w = rand_i8(M, K), rand_i8(N, K)
    out = T.int8_mm_triton(a, w)
    assert out.dtype == torch.int32 and out.shape == (M, N)
    assert torch.equal(out, ref_mm(a, w))


def test_int8_mm_extremes_at_max_k():
    # K = MAX_K: all -128 x -128 is 16384 * 131071 = 2**31 - 16384, the largest sum that
    # fits int32; -128 x 127 the most negative one.
    K = T.MAX_K
    a = torch.full((1, K), -128, dtype=torch.int8)
    w = torch.stack([torch.full((K,), -128, dtype=torch.int8), torch.full((K,), 127, dtype=torch.int8)])
    assert T.int8_mm_triton(a, w)[0].tolist() == [16384 * K, -128 * 127 * K]


def test_int8_mm_strided_operands():
    # Non-unit K stride for a, and a weight that is the K-prefix of a wider (padded) one.
    a_big, w_big = rand_i8(9, 2 * 100), rand_i8(21, 128)
    a, w = a_big[:, ::2], w_big[:, :100]
    assert torch.equal(T.int8_mm_triton(a, w), ref_mm(a, w))


# ---------------------------------------------------------------- int8_linear_triton
def _linear_inputs(M, N, K, with_bias):
    x_q, w_q = rand_i8(M, K), rand_i8(N, K)
    x_scale = torch.rand(M) * 0.1 + 1e-3
    w_scale = torch.rand(N) * 0.01 + 1e-4
    bias = torch.randn(N) if with_bias else None
    return x_q, x_scale, w_q, w_scale, bias


# Half-ulp relative rounding of the final cast to the output dtype.
_U_OUT = {torch.float32: 0.0, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("M,N,K", [(1, 70, 130), (17, 65, 130), (5, 33, 1000), (0, 5, 7), (3, 4, 0)])
def test_int8_linear_vs_references(dtype, with_bias, M, N, K):
    x_q, x_scale, w_q, w_scale, bias = _linear_inputs(M, N, K, with_bias)
    y = T.int8_linear_triton(x_q, x_scale, w_q, w_scale, bias, dtype)
    assert y.dtype == dtype and y.shape == (M, N)

    acc = ref_mm(x_q, w_q)
    # 1) Bit for bit against the same float32 operations in the same order (int32 ->
    #    float32, * w_scale, * x_scale, + bias, cast): the kernel rounds exactly there.
    f32 = (acc.float() * w_scale[None, :]) * x_scale[:, None]
    if bias is not None:
        f32 = f32 + bias[None, :]
    torch.testing.assert_close(y, f32.to(dtype), rtol=0, atol=0)

    # 2) Against float64 math. Error bound: four float32 roundings (acc -> float32 when
    #    |acc| > 2**24, * w_scale, * x_scale, + bias), each at most 2**-24 relative to the
    #    magnitude it acts on, so |y32 - ref| <= 4 * 2**-24 * (|prod| + |bias|); then the
    #    cast to ``dtype``, at most half an ulp, u_out * |y32|. fp16 adds an absolute 2**-25
    #    for results in its subnormal range. A factor 1.01 covers second-order terms.
    prod = (acc.double() * w_scale.double()[None, :]) * x_scale.double()[:, None]
    ref = prod + (bias.double()[None, :] if bias is not None else 0.0)
    mag = prod.abs() + (bias.double().abs()[None, :] if bias is not None else 0.0)
    u = _U_OUT[dtype]
    bound = 1.01 * (4 * 2.0**-24 * mag * (1 + u) + u * ref.abs()) + (2.0**-25 if dtype == torch.float16 else 0.0)
    err = (y.double() - ref).abs()
    assert bool((err <= bound).all()), f"max excess {(err - bound).max().item():.3g}"


def test_int8_linear_nan_row_scale():
    # A NaN row scale (what quantization gives a row with NaN/Inf) makes exactly that row NaN.
    x_q, x_scale, w_q, w_scale, bias = _linear_inputs(4, 20, 50, True)
    x_scale[2] = float("nan")
    y = T.int8_linear_triton(x_q, x_scale, w_q, w_scale, bias, torch.bfloat16)
    assert torch.isnan(y[2]).all()
    assert torch.isfinite(y[[0, 1, 3]]).all()


def test_int8_linear_stride0_scale():
    # One static scale expanded to [M] with stride 0 (how the CUDA op passes it).
    x_q, _, w_q, w_scale, bias = _linear_inputs(6, 10, 40, True)
    s = torch.tensor([0.02])
    y = T.int8_linear_triton(x_q, s.expand(6), w_q, w_scale, bias, torch.float32)
    ref = (ref_mm(x_q, w_q).float() * w_scale) * s + bias
    torch.testing.assert_close(y, ref, rtol=0, atol=0)


def test_bad_input_messages():
    a, w = rand_i8(3, 8), rand_i8(5, 8)
    xs, ws = torch.ones(3), torch.ones(5)
    cases = [
        (lambda: T.int8_mm_triton(a.float(), w), "a must be int8"),
        (lambda: T.int8_mm_triton(a, w.view(-1)), "w_q must be 2-D"),
        (lambda: T.int8_mm_triton(a, rand_i8(5, 9)), "K = a.shape[1] = 8"),
        (lambda: T.int8_mm_triton(a, w.to("meta")), "same device"),
        (lambda: T.int8_mm_triton(rand_i8(1, T.MAX_K + 1), rand_i8(1, T.MAX_K + 1)), "too large"),
        (lambda: T.int8_linear_triton(a, torch.ones(4), w, ws, None, torch.float32), "x_scale must have shape [M] = [3]"),
        (lambda: T.int8_linear_triton(a, xs, w, ws.double(), None, torch.float32), "w_scale must be float32"),
        (lambda: T.int8_linear_triton(a, xs, w, ws, torch.ones(4), torch.float32), "bias must have shape [N] = [5]"),
        (lambda: T.int8_linear_triton(a, xs, w, ws, None, torch.int32), "out_dtype"),
    ]
    for fn, msg in cases:
        with pytest.raises(ValueError, match=re.escape(msg)):
            fn()


# ---------------------------------------------------------------- pysparse._cuda_ops on CPU tensors
@pytest.fixture
def cuda_ops(monkeypatch):
    """pysparse._cuda_ops, its kernel calls routed to the interpreted copy of the kernels."""
    monkeypatch.setattr(_cuda_ops, "_kernels", T)
    monkeypatch.setattr(_cuda_ops, "_warned_grouped", False)
    return _cuda_ops


def _w_scale_padded(N, G, gen_scale):
    Np = (N + 63) // 64 * 64
    ws = torch.ones(G, Np)
    ws[:, :N] = gen_scale
    return ws


@needs_cuda_ops
def test_cuda_kernels_registered():
    if not _cuda_ops.HAS_TRITON:
        pytest.skip("triton did not load in pysparse._cuda_ops")
    assert _cuda_ops.REGISTERED
    for op in ("int8_pack", "int8_unpack", "int8_mm", "int8_linear"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"pysparse::{op}", "CUDA"), op


@needs_cuda_ops
@pytest.mark.parametrize("group_size", [0, 64, 128, 256])
def test_pack_unpack_and_colsum(cuda_ops, group_size):
    N, K = 70, 130
    w = rand_i8(N, K)
    packed, colsum = cuda_ops.int8_pack_cuda(w, group_size)
    assert packed.data_ptr() != w.data_ptr()  # a copy: op outputs must not alias inputs
    cpu_packed, cpu_colsum = torch.ops.pysparse.int8_pack(w, group_size)
    assert torch.equal(colsum, cpu_colsum)  # same per-group column sums, same [G, Np] shape
    assert torch.equal(cuda_ops.int8_unpack_cuda(packed, colsum, N, K), w)


@needs_cuda_ops
def test_int8_mm_op_matches_cpu(cuda_ops):
    a, w = rand_i8(9, 150), rand_i8(33, 150)
    packed, colsum = cuda_ops.int8_pack_cuda(w)
    cpu = torch.ops.pysparse.int8_mm(a, *torch.ops.pysparse.int8_pack(w), 33, 150)
    assert torch.equal(cuda_ops.int8_mm_cuda(a, packed, colsum, 33, 150), cpu)


def _x_with_edge_rows(shape, dtype):
    x = torch.randn(shape) * 3
    x2 = x.view(-1, shape[-1])
    if x2.shape[0] >= 4:
        x2[1] = 0.0                      # a zero row: scale 1
        x2[2, 5] = float("nan")          # NaN row: NaN out
        x2[3, 7] = float("inf")          # Inf row: NaN out
    return x.to(dtype)


@needs_cuda_ops
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("shape", [(5, 130), (2, 3, 64)])
def test_int8_linear_op_matches_cpu_op(cuda_ops, dtype, static, with_bias, shape):
    # Same quantization and the same epilogue order as the C++ CPU op: equal bit for bit.
    K, N = shape[-1], 70
    w = rand_i8(N, K)
    ws = _w_scale_padded(N, 1, torch.rand(N) * 0.01 + 1e-4)
    bias = torch.randn(N) if with_bias else None
    x_scale = torch.tensor([0.05]) if static else None
    x = _x_with_edge_rows(shape, dtype)
    packed, colsum = cuda_ops.int8_pack_cuda(w)
    y = cuda_ops.int8_linear_cuda(x, packed, colsum, ws, bias, x_scale, N, K)
    ref = torch.ops.pysparse.int8_linear(x, *torch.ops.pysparse.int8_pack(w), ws, bias, x_scale, N, K)
    assert y.dtype == dtype and y.shape == (*shape[:-1], N)
    torch.testing.assert_close(y, ref, rtol=0, atol=0, equal_nan=True)


@needs_cuda_ops
def test_quantize_rows_matches_reference(cuda_ops):
    from pysparse import reference as R
    x = _x_with_edge_rows((6, 300), torch.float32)
    x[0, :4] = torch.tensor([0.5, -0.5, 1.5, 2.5]) * (x[0].abs().max() / 127)  # near-ties after scaling
    for x_scale in (None, torch.tensor([0.03])):
        q, s = cuda_ops.quantize_rows(x, x_scale)
        rq, rs = R.quantize_per_row(x, x_scale)
        finite = torch.isfinite(x).all(dim=1)
        assert torch.equal(q[finite], rq[finite])  # non-finite rows: q is irrelevant
        torch.testing.assert_close(s, rs, rtol=0, atol=0, equal_nan=True)


@needs_cuda_ops
@pytest.mark.parametrize("group_size", [64, 128])
def test_grouped_falls_back_and_matches_cpu(cuda_ops, group_size):
    N, K = 40, 200
    w = rand_i8(N, K)
    packed, colsum = cuda_ops.int8_pack_cuda(w, group_size)
    G = colsum.shape[0]
    assert G > 1
    ws = _w_scale_padded(N, G, (torch.rand(N, G) * 0.01 + 1e-4).T)
    bias = torch.randn(N)
    x = torch.randn(7, K).to(torch.bfloat16)
    with pytest.warns(RuntimeWarning, match="per-channel only"):
        y = cuda_ops.int8_linear_cuda(x, packed, colsum, ws, bias, None, N, K)
    ref = torch.ops.pysparse.int8_linear(x, *torch.ops.pysparse.int8_pack(w, group_size), ws, bias, None, N, K)
    torch.testing.assert_close(y, ref, rtol=0, atol=0)


@needs_cuda_ops
def test_int8_linear_op_empty_and_k0(cuda_ops):
    w = rand_i8(5, 0)
    packed, colsum = cuda_ops.int8_pack_cuda(w)
    bias = torch.randn(5)
    y = cuda_ops.int8_linear_cuda(torch.randn(3, 0), packed, colsum, torch.ones(1, 64), bias, None, 5, 0)
    assert torch.equal(y, bias.expand(3, 5)) and y.data_ptr() != bias.data_ptr()
    packed, colsum = cuda_ops.int8_pack_cuda(rand_i8(5, 8))
    assert cuda_ops.int8_linear_cuda(torch.randn(0, 8), packed, colsum, torch.ones(1, 64), None, None,
                                     5, 8).shape == (0, 5)


@needs_cuda_ops
def test_op_bad_input_messages(cuda_ops):
    N, K = 10, 70
    w = rand_i8(N, K)
    packed, colsum = cuda_ops.int8_pack_cuda(w)
    ws, x = torch.ones(1, 64), torch.randn(2, K)
    cpu_packed, cpu_colsum = torch.ops.pysparse.int8_pack(w)
    cases = [
        (lambda: cuda_ops.int8_linear_cuda(x, cpu_packed, cpu_colsum, ws, None, None, N, K), "CUDA layout"),
        (lambda: cuda_ops.int8_linear_cuda(x.double(), packed, colsum, ws, None, None, N, K), "x must be float32"),
        (lambda: cuda_ops.int8_linear_cuda(torch.randn(2, K + 1), packed, colsum, ws, None, None, N, K),
         "last dimension"),
        (lambda: cuda_ops.int8_linear_cuda(x, packed, colsum, torch.ones(1, N), None, None, N, K), "w_scale"),
        (lambda: cuda_ops.int8_linear_cuda(x, packed, colsum, ws, torch.ones(N + 1), None, N, K), "bias"),
        (lambda: cuda_ops.int8_linear_cuda(x, packed, colsum, ws, None, torch.ones(2), N, K), "x_scale"),
        (lambda: cuda_ops.int8_pack_cuda(w, 32), "group_size"),
        (lambda: cuda_ops.int8_mm_cuda(rand_i8(2, K), *cuda_ops.int8_pack_cuda(w, 64), N, K), "per output channel"),
    ]
    for fn, msg in cases:
        with pytest.raises(ValueError, match=msg):
            fn()


def test_fixed_config_env(monkeypatch):
    # PYSPARSE_TRITON_FIXED_CONFIG=1 (the GPU check's correctness sections): no autotuning,
    # the first config of the M bucket runs straight through the jitted kernel; same sums.
    a, w = rand_i8(17, 130), rand_i8(40, 130)
    ref = T.int8_mm_triton(a, w)
    monkeypatch.setenv(T.FIXED_CONFIG_ENV, "1")
    log = T.LAUNCH_LOG = []
    try:
        assert torch.equal(T.int8_mm_triton(a, w), ref)
        x_scale, w_scale = torch.rand(17) + 0.01, torch.rand(40) + 0.01
        y = T.int8_linear_triton(a, x_scale, w, w_scale, None, torch.float32)
    finally:
        T.LAUNCH_LOG = None
    monkeypatch.delenv(T.FIXED_CONFIG_ENV)
    assert torch.equal(y, T.int8_linear_triton(a, x_scale, w, w_scale, None, torch.float32))
    assert [e[1]["fixed"] for e in log] == [True, True] and log[1][1]["EPILOGUE"] is True


def test_gpu_configs_fixed_config_per_bucket():
    # the first config of each bucket is the fixed one; every bucket has one
    cfgs = T.gpu_configs()
    for M in (1, 16, 17, 64, 65, 4096):
        kept = T._prune(cfgs, {"M_BUCKET": T._m_bucket(M)})
        assert kept and kept[0] is next(c for c in cfgs if c in kept)
    assert len({str(c) for c in cfgs}) == len(cfgs)
