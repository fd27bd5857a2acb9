"""The Triton compacted convolution (kernels/compact_conv2d.py), run on CPU tensors by the
Triton interpreter, against the float64 reference (pysparse.reference.compact_conv2d:
gather + conv + scatter); then the CUDA dispatch of pysparse::compact_conv2d (a GPU only).

The kernel's outputs must lie within a proven fp32 rounding bound of the float64 reference,
and the output channels it does not write must be exactly 0, the residual, or
relu(residual). Shapes are tiny (the interpreter runs each program in numpy) but cross
every tile edge of the interpreter's config (16 pixels x 32 output channels x 16 input
channels): channel counts that are multiples of neither 16 nor 32, a 32-column tile that
spans two weight panels and runs past the last one, strides, padding, dilation, 1x1, 3x3
and 5x3 kernels, empty batch and empty kept sets.
GPU-compiled code (and TF32) is checked by the CUDA tests at the end, skipped without a GPU.
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

from pysparse import ops_conv  # noqa: E402
from pysparse import reference as R  # noqa: E402
from pysparse.nn import CompactConv2d  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
CL = torch.channels_last


def _load_interpreted_kernels():
    """A private copy of kernels/compact_conv2d.py, decorated now, under TRITON_INTERPRET=1
    (a shared import may have been decorated for the GPU before this file set it)."""
    spec = importlib.util.spec_from_file_location("_pysparse_compact_conv2d_interpreted",
                                                  ROOT / "kernels" / "compact_conv2d.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


T = _load_interpreted_kernels()
conv = T.compact_conv2d_triton

U32 = 2.0**-24  # fp32 unit roundoff
U_TF32 = 2.0**-10  # a TF32 input: 10 mantissa bits, truncated or rounded (2**-11 if rounded)


# ---------------------------------------------------------------- helpers
def _case(N, C, H, W, cin, cout, oc, k):
    x = torch.randn(N, C, H, W).contiguous(memory_format=CL)
    in_idx = torch.randperm(C)[:cin]
    out_idx = torch.randperm(oc)[:cout]
    w = torch.randn(cout, cin, *k) / max(cin * k[0] * k[1], 1) ** 0.5
    return x, w, torch.randn(cout), in_idx, out_idx


def _check(y, x, w, bias, ii, oi, stride, padding, dilation, oc, res, relu, u_in=0.0):
    """y against float64 math on the same operands.

    Bound: an fp32 sum of K = Cin * kh * kw products (each rounded once), plus the bias and
    the residual, is within (K + 2) * 2**-24 * (sum |x w| + |bias| + |res|) of the exact
    value whatever the summation order (tl.dot's is unspecified); TF32 inputs (u_in, each
    operand's relative rounding) add (2 u_in + u_in**2) * sum |x w|. ReLU does not grow it;
    1.01 covers second-order terms. The channels not written are compared exactly.
    """
    dd = lambda t: None if t is None else t.double()  # noqa: E731
    ref = R.compact_conv2d(x.double(), w.double(), dd(bias), ii, oi, stride, padding, dilation, oc, dd(res), relu)
    assert y.shape == ref.shape and y.dtype == torch.float32 and y.is_contiguous(memory_format=CL)
    K = w[0].numel()
    mag = R.compact_conv2d(x.double().abs(), w.double().abs(), dd(bias).abs() if bias is not None else None,
                           ii, oi, stride, padding, dilation, oc, dd(res).abs() if res is not None else None)
    prod = R.compact_conv2d(x.double().abs(), w.double().abs(), None, ii, oi, stride, padding, dilation, oc)
    bound = 1.01 * ((K + 2) * U32 * mag + (2 * u_in + u_in**2) * prod)
    err = (y.double() - ref).abs()
    assert bool((err <= bound).all()), f"max excess {(err - bound).max().item():.3g}"
    rest = torch.ones(oc, dtype=torch.bool)
    rest[oi.long()] = False
    want = torch.zeros_like(y) if res is None else (res.relu() if relu else res)
    assert torch.equal(y[:, rest], want[:, rest].to(y.device))


# (N, C, H, W, cin, cout, out_channels, kernel, stride, padding, dilation)
SHAPES = [
    (2, 16, 5, 6, 7, 5, 12, (1, 1), (1, 1), (0, 0), (1, 1)),     # 1x1, few channels
    (1, 24, 6, 5, 19, 19, 23, (3, 3), (1, 1), (1, 1), (1, 1)),   # Cin 19: two K blocks of 16
    (1, 9, 7, 7, 9, 40, 45, (3, 3), (2, 2), (1, 1), (1, 1)),     # stride 2; Cout 40: tile 2 spans
    # panels 2..3 (40..63), past the last panel (48)
    (1, 12, 7, 8, 5, 17, 30, (3, 3), (1, 1), (2, 2), (2, 2)),    # dilation 2
    (1, 10, 7, 6, 6, 3, 17, (5, 3), (1, 2), (2, 1), (1, 1)),     # 5x3, unequal strides / padding
    (0, 8, 5, 5, 4, 4, 8, (3, 3), (1, 1), (1, 1), (1, 1)),       # empty batch
    (1, 6, 5, 5, 3, 2, 3, (5, 5), (1, 1), (0, 0), (1, 1)),       # one output pixel
]
# (bias, residual, relu) per shape: each combination is met somewhere, and every shape
# runs with no bias and with residual + relu
COMBOS = [(True, False, False), (False, True, True)]


@pytest.mark.parametrize("shape", SHAPES, ids=[f"{s[7][0]}x{s[7][1]}-s{s[8][0]}{s[8][1]}-d{s[10][0]}-n{s[0]}"
                                               f"-ci{s[4]}-co{s[5]}" for s in SHAPES])
def test_matches_float64_reference(shape):
    N, C, H, W, cin, cout, oc, k, stride, padding, dilation = shape
    x, w, b, ii, oi = _case(N, C, H, W, cin, cout, oc, k)
    wp = ops_conv.pack_compact_conv2d_weight(w)
    ho, wo = (T.conv_out_size((H, W)[i], k[i], stride[i], padding[i], dilation[i]) for i in range(2))
    res = torch.randn(N, oc, ho, wo).contiguous(memory_format=CL)
    for has_b, has_r, relu in COMBOS:
        bias, r = (b if has_b else None), (res if has_r else None)
        y = conv(x, wp, bias, ii, oi, stride, padding, dilation, oc, r, relu)
        _check(y, x, w, bias, ii, oi, stride, padding, dilation, oc, r, relu)


def test_bias_residual_relu_combinations():
    x, w, b, ii, oi = _case(1, 10, 4, 4, 6, 7, 11, (3, 3))
    wp = ops_conv.pack_compact_conv2d_weight(w)
    res = torch.randn(1, 11, 4, 4).contiguous(memory_format=CL)
    for bias in (b, None):
        for r in (None, res):
            for relu in (False, True):
                y = conv(x, wp, bias, ii, oi, (1, 1), (1, 1), (1, 1), 11, r, relu)
                _check(y, x, w, bias, ii, oi, (1, 1), (1, 1), (1, 1), 11, r, relu)


def test_non_contiguous_inputs_and_int32_indices():
    x, w, b, ii, oi = _case(1, 12, 4, 5, 9, 10, 14, (3, 3))
    wp = ops_conv.pack_compact_conv2d_weight(w)
    args = ((1, 1), (1, 1), (1, 1), 14)
    big = torch.randn(1, 15, 9, 7).contiguous(memory_format=CL)
    views = {
        "channels_last slice (channel stride 1, odd pixel strides)": big[:, 2:14, ::2, 1:6],
        "NCHW contiguous (read in place)": x.contiguous(),
        "NCHW transposed view": torch.randn(1, 12, 5, 4).transpose(2, 3),
    }
    for name, xv in views.items():
        y = conv(xv, wp, b, ii, oi, *args, None, False)
        _check(y, xv, w, b, ii, oi, *args, None, False)
    res = torch.randn(1, 14, 4, 5)  # NCHW residual, read through its strides
    y = conv(x, wp, b, ii, oi, *args, res, True)
    _check(y, x, w, b, ii, oi, *args, res, True)
    assert torch.equal(conv(x, wp, b, ii.int(), oi.int(), *args, res, True), y)


def test_empty_kept_sets():
    x = torch.randn(2, 8, 5, 5).contiguous(memory_format=CL)
    res = torch.randn(2, 10, 5, 5)
    ii, e = torch.tensor([0, 4, 7]), torch.tensor([], dtype=torch.int64)
    a = ((1, 1), (1, 1), (1, 1), 10)
    # no kept output: no launch; the output is 0 / the residual / relu(residual)
    wp0 = ops_conv.pack_compact_conv2d_weight(torch.randn(0, 3, 3, 3))
    assert torch.equal(conv(x, wp0, None, ii, e, *a), torch.zeros(2, 10, 5, 5))
    assert torch.equal(conv(x, wp0, None, ii, e, *a, res, False), res)
    assert torch.equal(conv(x, wp0, None, ii, e, *a, res, True), res.relu())
    # no kept input: an empty reduction, the kept outputs are relu?(bias + residual)
    b = torch.randn(5)
    oi = torch.tensor([9, 0, 3, 4, 1])
    wpe = ops_conv.pack_compact_conv2d_weight(torch.randn(5, 0, 3, 3))
    y = conv(x, wpe, b, e, oi, *a)
    want = torch.zeros(2, 10, 5, 5)
    want[:, oi] = b.view(1, 5, 1, 1)
    assert torch.equal(y, want)
    y = conv(x, wpe, b, e, oi, *a, res, True)
    want = res.relu()
    want[:, oi] = (res[:, oi] + b.view(1, 5, 1, 1)).relu()
    assert torch.equal(y, want)
    assert torch.equal(conv(x, wpe, None, e, oi, *a), torch.zeros(2, 10, 5, 5))
    # neither, and a zero-width output
    wpee = ops_conv.pack_compact_conv2d_weight(torch.randn(0, 0, 1, 1))
    assert torch.equal(conv(x, wpee, None, e, e, (1, 1), (0, 0), (1, 1), 4), torch.zeros(2, 4, 5, 5))
    assert conv(x, wpee, None, e, e, (1, 1), (0, 0), (1, 1), 0).shape == (2, 0, 5, 5)


def test_nan_propagates_and_relu_keeps_it():
    x, w, b, ii, oi = _case(1, 8, 6, 6, 4, 4, 8, (3, 3))
    x[0, ii[0], 2, 2] = float("nan")
    x[0, [c for c in range(8) if c not in ii.tolist()][0], 5, 5] = float("nan")  # not read: no effect
    y = conv(x, ops_conv.pack_compact_conv2d_weight(w), b, ii, oi, (1, 1), (1, 1), (1, 1), 8, None, True)
    assert torch.isnan(y[0, oi, 1:4, 1:4]).all()
    y[0, :, 1:4, 1:4] = 0
    assert not torch.isnan(y).any() and bool((y >= 0).all())


def test_bad_input_names_the_argument():
    x = torch.randn(1, 4, 5, 5)
    wp = ops_conv.pack_compact_conv2d_weight(torch.randn(6, 3, 3, 3))
    a = ((1, 1), (1, 1), (1, 1), 8)
    i3, i6 = torch.arange(3), torch.arange(6)
    cases = [
        (lambda: conv(x.double(), wp, None, i3, i6, *a), "x must be a 4-D float32 tensor"),
        (lambda: conv(x[0], wp, None, i3, i6, *a), "x must be a 4-D float32 tensor"),
        (lambda: conv(x, wp.double(), None, i3, i6, *a), "weight must be the packed layout"),
        (lambda: conv(x, torch.randn(6, 3, 27), None, i3, i6, *a), "weight must be the packed layout"),
        (lambda: conv(x, torch.randn(5, 3, 3, 3), None, i3, i6, *a), "the K-major weight holds 5 rows"),
        (lambda: conv(x, wp.transpose(1, 2), None, i3, i6, *a), "(not contiguous)"),
        (lambda: conv(x, wp.to("meta"), None, i3, i6, *a), "weight is on meta but x is on cpu"),
        (lambda: conv(x, wp, None, torch.tensor([0, 1, 4]), i6, *a), "in_idx[2]=4 is outside [0, 4)"),
        (lambda: conv(x, wp, None, torch.tensor([0, -1, 2]), i6, *a), "in_idx[1]=-1 is outside [0, 4)"),
        (lambda: conv(x, wp, None, i3, torch.tensor([0, 1, 8, 2, 3, 4]), *a), "out_idx[2]=8 is outside [0, 8)"),
        (lambda: conv(x, wp, None, i3, torch.tensor([0, 1, 1, 2, 3, 4]), *a), "out_idx holds 1 twice"),
        (lambda: conv(x, wp, None, torch.arange(2), i6, *a), "in_idx must hold 3 indices"),
        (lambda: conv(x, wp, None, i3.float(), i6, *a), "in_idx must be a 1-D int32 or int64 tensor"),
        (lambda: conv(x, wp, None, i3, torch.arange(17), *a), "out_idx ((17,)) must list one output channel"),
        (lambda: conv(x, wp, torch.randn(5), i3, i6, *a), "bias must have shape [6]"),
        (lambda: conv(x, wp, torch.randn(6).double(), i3, i6, *a), "bias must be a float32 tensor"),
        (lambda: conv(x, wp, None, i3, i6, (0, 1), (1, 1), (1, 1), 8), "stride must be >= 1"),
        (lambda: conv(x, wp, None, i3, i6, (1, 1), (1, -1), (1, 1), 8), "padding must be >= 0"),
        (lambda: conv(x, wp, None, i3, i6, (1, 1), (1, 1), (1,), 8), "dilation must have 2 values"),
        (lambda: conv(x, wp, None, i3, i6, (1, 1), (1, 1), (1, 1), -1), "out_channels must be an int >= 0"),
        (lambda: conv(x, wp, None, i3, i6, (1, 1), (0, 0), (3, 3), 8), "smaller than the dilated kernel"),
        (lambda: conv(x, wp, None, i3, i6, *a, torch.randn(1, 8, 5, 4)), "residual must be a float32 tensor of "
                                                                           "the output's shape [1, 8, 5, 5]"),
        (lambda: conv(x, wp, None, i3, i6, *a, precision="fp16"), "precision must be one of"),
    ]
    for fn, msg in cases:
        with pytest.raises(ValueError, match=re.escape("compact_conv2d: ") + ".*" + re.escape(msg)):
            fn()


def test_kmajor_weight_gives_the_same_result():
    # The same operand values reach every tl.dot in either layout (only the addresses
    # differ), so the interpreter's results are equal bit for bit.
    for cin, cout in ((9, 40), (0, 5), (4, 0)):
        x, w, b, ii, oi = _case(1, 9, 7, 7, cin, cout, 45, (3, 3))
        wp = ops_conv.pack_compact_conv2d_weight(w)
        wk = T.kmajor_weight(wp, cout)
        assert wk.shape == (cout, 3, 3, cin) and torch.equal(wk, w.permute(0, 2, 3, 1))
        res = torch.randn(1, 45, 4, 4)
        args = (b, ii, oi, (2, 2), (1, 1), (1, 1), 45, res, True)
        assert torch.equal(conv(x, wk, *args), conv(x, wp, *args))
    with pytest.raises(ValueError, match="cout=17 does not fit 1 panels"):
        T.kmajor_weight(ops_conv.pack_compact_conv2d_weight(torch.randn(3, 2, 1, 1)), 17)


def test_config_pruning():
    cfgs = [T._config(bm, bn, bk, 4, 3) for bm in (32, 128) for bn in (32, 64, 128) for bk in (16, 32)]
    kept = T._prune(cfgs, {"M_BUCKET": T._m_bucket(49), "COUT": 20, "CIN": 10})
    # 20 kept outputs: 32-column tiles; 10 kept inputs: 16-deep K blocks; 49 pixels: 32 rows
    assert {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]) for c in kept} == {(32, 32, 16)}
    kept = T._prune(cfgs, {"M_BUCKET": T._m_bucket(50000), "COUT": 256, "CIN": 256})
    assert len(kept) == len(cfgs)
    assert T._m_bucket(0) == T._m_bucket(16) == 16 and T._m_bucket(17) == 32


# ---------------------------------------------------------------- the CUDA dispatch
def test_cuda_kernel_registered():
    assert ops_conv.CUDA_REGISTERED
    assert torch._C._dispatch_has_kernel_for_dispatch_key("pysparse::compact_conv2d", "CUDA")


def test_cuda_wrapper_follows_torch_fp32_conv_precision(monkeypatch):
    # The registered function (compact_conv2d_cuda), run here on CPU tensors through the
    # interpreted kernel: it passes every argument through and picks the precision that
    # PyTorch allows fp32 convolutions.
    seen = {}

    def spy(*args, precision):
        seen["precision"] = precision
        return conv(*args, precision=precision)

    monkeypatch.setattr(ops_conv, "_kernels", type("K", (), {"compact_conv2d_triton": staticmethod(spy)}))
    x, w, b, ii, oi = _case(1, 6, 4, 4, 5, 3, 7, (3, 3))
    wp = ops_conv.pack_compact_conv2d_weight(w)
    res = torch.randn(1, 7, 4, 4)
    y = ops_conv.compact_conv2d_cuda(x, wp, b, ii, oi, [1, 1], [1, 1], [1, 1], 7, res, True)
    _check(y, x, w, b, ii, oi, (1, 1), (1, 1), (1, 1), 7, res, True)
    assert seen["precision"] == ops_conv.fp32_conv_precision()
    with pytest.raises(ValueError, match=re.escape("compact_conv2d: weight must be the packed layout")):
        ops_conv.compact_conv2d_cuda(x, w, b, ii, oi, [1, 1], [1, 1], [1, 1], 7, res, True)  # unpacked: refused
    conv_flags = getattr(torch.backends.cudnn, "conv", None)
    if conv_flags is not None and hasattr(conv_flags, "fp32_precision"):
        for p in ("ieee", "tf32"):
            monkeypatch.setattr(conv_flags, "fp32_precision", p)
            assert ops_conv.fp32_conv_precision() == p


def test_timing_case_on_cpu():
    # The entry gpu-check times (here on the CPU op): every peer computes the same conv.
    c = ops_conv.compact_conv2d_case(1, 10, 12, 5, 3, stride=2, residual=True, relu=True, device="cpu")
    assert c["check"]() < 1e-5 and c["macs"] == 1 * 3 * 3 * 6 * 5 * 9
    y, ref = c["pysparse"](), c["gather_conv_scatter"]()
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    oi = c["args"][4]
    torch.testing.assert_close(y[:, oi], torch.relu(c["dense_kept"]() + c["args"][9][:, oi]), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- compiled for a GPU, without one
def _compile_for(arch: int, precision: str, kmajor: bool):
    """The kernel compiled ahead of time for sm_<arch> (Triton's ASTSource; ptxas, no GPU).
    The interpreter checks the math; this checks what only the compiler sees (tl.dot operand
    shapes and types, layouts, shared memory). Skips where the NVIDIA backend cannot run."""
    import shutil

    triton = pytest.importorskip("triton")
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        ptxas = triton.knobs.nvidia.ptxas.path
    except Exception as e:  # another Triton version's internals
        pytest.skip(f"no ahead-of-time Triton compile here ({type(e).__name__}: {e})")
    if not (ptxas and os.path.exists(ptxas)) and not shutil.which("ptxas"):
        pytest.skip("ptxas is not installed")
    # a copy decorated for the GPU: the one above was decorated for the interpreter
    os.environ["TRITON_INTERPRET"] = "0"
    try:
        spec = importlib.util.spec_from_file_location("_pysparse_compact_conv2d_compiled",
                                                      ROOT / "kernels" / "compact_conv2d.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        os.environ["TRITON_INTERPRET"] = "1"
    fn = mod._compact_conv2d_kernel.fn
    names = fn.arg_names
    ptrs = {"x_ptr": "*fp32", "w_ptr": "*fp32", "bias_ptr": "*fp32", "in_idx_ptr": "*i64", "out_idx_ptr": "*i64",
            "res_ptr": "*fp32", "out_ptr": "*fp32"}
    const = dict(KH=3, KW=3, HAS_BIAS=True, HAS_RES=True, RELU=True, PRECISION=precision, W_KMAJOR=kmajor,
                 BLOCK_M=128, BLOCK_N=64, BLOCK_K=32, GROUP_M=8)
    sig = {n: ptrs.get(n, "constexpr" if n in const else "i32") for n in names}
    # as a launch specializes them: 16-byte aligned pointers, channel counts multiples of 16
    aligned = list(ptrs) + ["CIN", "COUT", "C_IN_FULL", "C_OUT_FULL"]
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    src = ASTSource(fn, signature=sig, constexprs={(names.index(k),): v for k, v in const.items()}, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": 4, "num_stages": 3,
                                                                                "enable_fp_fusion": True})


def test_compiles_for_the_gpu():
    # The path an H100/H200 runs by default (TF32, the portable weight panels; ~5 s of CPU:
    # one configuration only). TF32 must reach the tensor cores (sm_90: wgmma).
    k = _compile_for(90, "tf32", False)
    assert "wgmma.mma_async" in k.asm["ptx"] and ".tf32" in k.asm["ptx"]
    assert k.metadata.shared <= 160 * 1024


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def _cuda_args(N=2, C=40, H=9, W=10, cin=21, cout=37, oc=48, k=(3, 3)):
    x, w, b, ii, oi = _case(N, C, H, W, cin, cout, oc, k)
    return x, w, b, ii, oi


@CUDA
@pytest.mark.parametrize("precision", ["ieee", "tf32"])
def test_cuda_op_matches_reference(precision, monkeypatch):
    # The compiled kernel through torch.ops.pysparse.compact_conv2d on CUDA tensors; TF32
    # products widen the bound by each operand's 10-bit rounding.
    conv_flags = getattr(torch.backends.cudnn, "conv", None)
    if conv_flags is not None and hasattr(conv_flags, "fp32_precision"):
        monkeypatch.setattr(conv_flags, "fp32_precision", precision)
    else:
        monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", precision == "tf32")
    assert ops_conv.fp32_conv_precision() == precision
    u_in = U_TF32 if precision == "tf32" else 0.0
    for k, stride, padding, dilation in [((1, 1), (1, 1), (0, 0), (1, 1)), ((3, 3), (2, 2), (1, 1), (1, 1)),
                                         ((3, 3), (1, 1), (2, 2), (2, 2))]:
        x, w, b, ii, oi = _cuda_args(k=k)
        wp = ops_conv.pack_compact_conv2d_weight(w)
        ho, wo = (T.conv_out_size((9, 10)[i], k[i], stride[i], padding[i], dilation[i]) for i in range(2))
        res = torch.randn(2, 48, ho, wo)
        for bias, r, relu in ((b, None, False), (None, res, True), (b, res, False)):
            y = ops_conv.compact_conv2d(x.cuda(), wp.cuda(), None if bias is None else bias.cuda(), ii.cuda(),
                                        oi.cuda(), stride, padding, dilation, 48,
                                        None if r is None else r.cuda(), relu)
            assert y.is_cuda
            _check(y.cpu(), x, w, bias, ii, oi, stride, padding, dilation, 48, r, relu, u_in)
    # CPU index tensors beside CUDA data: checked on the host, then copied
    y2 = ops_conv.compact_conv2d(x.cuda(), wp.cuda(), None, ii, oi, stride, padding, dilation, 48, None, False)
    _check(y2.cpu(), x, w, None, ii, oi, stride, padding, dilation, 48, None, False, u_in)
    with pytest.raises(ValueError, match="out_idx holds"):
        ops_conv.compact_conv2d(x.cuda(), wp.cuda(), None, ii, oi.clone().fill_(3), stride, padding, dilation, 48,
                                None, False)


@CUDA
def test_cuda_layer_moves_with_its_state_dict():
    x, w, b, ii, oi = _cuda_args()
    c = torch.nn.Conv2d(21, 37, 3, padding=1)
    with torch.no_grad():
        c.weight.copy_(w)
        c.bias.copy_(b)
    layer = CompactConv2d.from_conv(c, ii, oi, 48, relu=True, in_channels=40)
    res = torch.randn(2, 48, 9, 10).contiguous(memory_format=CL)
    with torch.no_grad():
        y_cpu = layer(x, res)
        g = layer.cuda()
        y = g(x.cuda(), res.cuda())
        u_in = U_TF32 if ops_conv.fp32_conv_precision() == "tf32" else 0.0
        _check(y.cpu(), x, w, b, ii, oi, (1, 1), (1, 1), (1, 1), 48, res, True, u_in)
        # one layout on both devices: a CUDA state_dict loads into a CPU layer and back
        other = CompactConv2d.from_conv(c, ii, oi, 48, relu=True, in_channels=40)
        other.load_state_dict({k: v.cpu() for k, v in g.state_dict().items()})
        assert torch.equal(other(x, res), y_cpu)
        torch._dynamo.reset()
        f = torch.compile(lambda a, r: g(a, r), fullgraph=True)
        assert torch.equal(f(x.cuda(), res.cuda()), y)
        torch._dynamo.reset()


@CUDA
def test_cuda_timing_case_and_kmajor_kernel():
    for k, stride in ((1, 1), (3, 2), (3, 1)):
        c = ops_conv.compact_conv2d_case(2, 64, 48, 14, k, stride=stride, residual=True, relu=True)
        u_in = U_TF32 if c["precision"] == "tf32" else 0.0
        # max relative error: fp32 sums of 32 * k * k products, or TF32 inputs (10 bits)
        assert c["check"]() < (4e-3 if u_in else 1e-5)
        # the two weight layouts may be tuned to different K blocks (another summation order)
        tol = 1e-2 if u_in else 1e-5
        torch.testing.assert_close(c["pysparse_kmajor"](), c["pysparse"](), rtol=tol, atol=tol)
