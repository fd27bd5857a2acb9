"""pysparse::int8_mm / int8_linear / Int8Linear on the CPU, on the four axes: against the
reference, exactness, opcheck, torch.compile / torch.export; plus bad input."""
import io
import math

import pytest
import torch
from torch import nn

import pysparse
from pysparse import ops, reference as R
from pysparse.nn import Int8Linear

from .conftest import available_isas


def rand_i8(*shape):
    t = torch.randint(-128, 128, shape, dtype=torch.int8)
    if t.numel():
        t.view(-1)[0] = -128  # always exercise the asymmetric end
    return t


# ---------------------------------------------------------------- exactness
@pytest.mark.parametrize("M,N,K", [(0, 5, 7), (1, 1, 1), (1, 70, 130), (7, 64, 64), (17, 100, 1000),
                                   (33, 65, 4099), (2, 19, 16384), (300, 130, 200)])
def test_int8_mm_bit_exact(isa, M, N, K):
    a, w = rand_i8(M, K), rand_i8(N, K)
    packed, colsum = ops.int8_pack(w)
    assert torch.equal(ops.int8_mm(a, packed, colsum, N, K), R.int8_mm(a, w))


def test_int8_mm_extremes_k16384(isa):
    # All -128 x -128 over K = 16384: 2^28, the largest sum; -128 x 127 the most negative.
    K = 16384
    a = torch.full((3, K), -128, dtype=torch.int8)
    w = torch.stack([torch.full((K,), -128, dtype=torch.int8), torch.full((K,), 127, dtype=torch.int8)])
    packed, colsum = ops.int8_pack(w)
    out = ops.int8_mm(a, packed, colsum, 2, K)
    assert out[0].tolist() == [2**28, -128 * 127 * K]


def test_pack_unpack_roundtrip():
    w = rand_i8(70, 130)
    for g in (0, 64, 128):
        p, c = ops.int8_pack(w, g)
        assert torch.equal(torch.ops.pysparse.int8_unpack(p, c, 70, 130), w)


# ---------------------------------------------------------------- against the reference
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1, 130), (4, 5, 300), (0, 64), (65, 1000)])
@pytest.mark.parametrize("group_size", [0, 64])
def test_layer_matches_reference(isa, dtype, shape, group_size):
    K = shape[-1]
    lin = nn.Linear(K, 70)
    m = Int8Linear.from_float(lin, group_size=group_size)
    x = torch.randn(shape).to(dtype)
    q, s = R.quantize_weight(lin.weight, group_size)
    # Bit-equal: the kernels do the reference's float operations in the same order
    # (no FMA contraction), so only identical roundings are possible.
    assert torch.equal(m(x), R.int8_linear(x, q, s, lin.bias.detach(), group_size=group_size))


def test_paths_agree_bit_for_bit():
    lin = nn.Linear(777, 333)
    m = Int8Linear.from_float(lin)
    x = torch.randn(19, 777)
    outs = {}
    for isa in available_isas():
        with pysparse.cpu_isa(isa):
            outs[isa] = m(x)
    ref = outs["scalar"]
    for isa, y in outs.items():
        assert torch.equal(y, ref), isa


def test_non_contiguous_input(isa):
    lin = nn.Linear(96, 40)
    m = Int8Linear.from_float(lin)
    x = torch.randn(96, 10).T  # stride (1, 10)
    assert torch.equal(m(x), m(x.contiguous()))
    x3 = torch.randn(4, 10, 200)[:, :, ::2]
    assert torch.equal(m(x3[..., :96]), m(x3[..., :96].contiguous()))


def test_static_activations(isa):
    lin = nn.Linear(128, 64)
    x = torch.randn(8, 128)
    s = float(x.abs().max()) / 127
    m = Int8Linear.from_float(lin, activations="static", x_scale=s)
    q, ws = R.quantize_weight(lin.weight)
    assert torch.equal(m(x), R.int8_linear(x, q, ws, lin.bias.detach(), torch.tensor([s])))
    # outliers beyond the calibrated range clamp to +-127/-128, as the reference does
    x2 = x * 10
    assert torch.equal(m(x2), R.int8_linear(x2, q, ws, lin.bias.detach(), torch.tensor([s])))


# ---------------------------------------------------------------- accuracy
def sqnr_db(ref, y):
    return 10 * math.log10(ref.pow(2).mean().item() / (ref - y).pow(2).mean().item())


@pytest.mark.parametrize("group_size", [0, 128])
def test_sqnr_gaussian(group_size):
    lin = nn.Linear(1024, 512)
    nn.init.normal_(lin.weight, std=0.02)
    x = torch.randn(64, 1024)
    y = Int8Linear.from_float(lin, group_size=group_size)(x)
    # 35 dB: the bar (int8 x int8 with per-row / per-channel scales gives ~40 dB
    # on Gaussians; a scale or rounding bug drops it far below)
    assert sqnr_db(lin(x), y) >= 35.0


# ---------------------------------------------------------------- opcheck / compile / export
def test_opcheck():
    w = rand_i8(70, 130)
    p, c = ops.int8_pack(w)
    ws = torch.rand(1, c.shape[1]) * 0.01
    b = torch.randn(70)
    torch.library.opcheck(torch.ops.pysparse.int8_pack.default, (w, 0))
    torch.library.opcheck(torch.ops.pysparse.int8_pack.default, (w, 64))
    torch.library.opcheck(torch.ops.pysparse.int8_unpack.default, (p, c, 70, 130))
    torch.library.opcheck(torch.ops.pysparse.int8_mm.default, (rand_i8(5, 130), p, c, 70, 130))
    for x in (torch.randn(5, 130), torch.randn(2, 3, 130).bfloat16()):
        torch.library.opcheck(torch.ops.pysparse.int8_linear.default, (x, p, c, ws, b, None, 70, 130))
    torch.library.opcheck(torch.ops.pysparse.int8_linear.default,
                          (torch.randn(5, 130), p, c, ws, None, torch.tensor([0.02]), 70, 130))


def _mlp():
    return nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 10))


def test_torch_compile_fullgraph():
    model = pysparse.quantize_int8(_mlp())
    x = torch.randn(3, 64)
    compiled = torch.compile(model, fullgraph=True)
    # inductor may fuse the ReLU differently, but never changes our op's result
    torch.testing.assert_close(compiled(x), model(x), rtol=0, atol=0)
    torch._dynamo.reset()


def test_torch_export():
    model = pysparse.quantize_int8(_mlp())
    x = torch.randn(3, 64)
    ep = torch.export.export(model, (x,))
    assert any("pysparse.int8_linear" in str(n.target) for n in ep.graph.nodes)
    assert torch.equal(ep.module()(x), model(x))


# ---------------------------------------------------------------- module behaviour
def test_state_dict_roundtrip_and_repr():
    lin = nn.Linear(200, 70)
    m = Int8Linear.from_float(lin, group_size=64)
    buf = io.BytesIO()
    torch.save(m.state_dict(), buf)
    m2 = Int8Linear(200, 70, group_size=64)
    m2.load_state_dict(torch.load(io.BytesIO(buf.getvalue())))
    x = torch.randn(3, 200)
    assert torch.equal(m(x), m2(x))
    assert "kernel=cpu-" in repr(m)
    # API change: the saved config must match (the error names the key and the field)
    with pytest.raises(RuntimeError, match="_extra_state.*in_features"):
        Int8Linear(201, 70).load_state_dict(m.state_dict())
    with pytest.raises(RuntimeError, match="weight_int8"):  # a file from before configs: the shapes are checked
        Int8Linear(201, 70, group_size=64).load_state_dict(
            {k: v for k, v in m.state_dict().items() if k != "_extra_state"})


def test_half_keeps_scales_float32_bit_for_bit():
    lin = nn.Linear(64, 32)
    with torch.no_grad():
        lin.weight.mul_(1e-4)  # scales below half's normal range: a cast would round them
        lin.bias.add_(1.0001)
    m = Int8Linear.from_float(lin)
    ws, b = m.w_scale.clone(), m.bias.clone()
    x = torch.randn(2, 64)
    y = m(x)
    m.half()
    assert m.w_scale.dtype == torch.float32 and torch.equal(m.w_scale, ws) and torch.equal(m.bias, b)
    assert torch.equal(m(x), y)
    assert m(x.half()).dtype == torch.float16
    m.bfloat16()
    assert torch.equal(m(x), y)


def test_dequantized_weight_close():
    lin = nn.Linear(300, 50)
    w = Int8Linear.from_float(lin).dequantized_weight()
    # per-channel int8: error at most half a step (amax / 254) per element
    step = lin.weight.abs().amax(dim=1, keepdim=True) / 127
    assert bool(((w - lin.weight).abs() <= step / 2 + 1e-7).all())


def test_threads_respected():
    m = Int8Linear.from_float(nn.Linear(256, 256))
    x = torch.randn(64, 256)
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        y1 = m(x)
    finally:
        torch.set_num_threads(n)
    assert torch.equal(y1, m(x))


# ---------------------------------------------------------------- bad input
def test_nan_inf_propagate_per_row(isa):
    m = Int8Linear.from_float(nn.Linear(64, 16))
    x = torch.randn(4, 64)
    x[1, 3] = float("nan")
    x[2, 5] = float("inf")
    y = m(x)
    assert torch.isnan(y[1]).all() and torch.isnan(y[2]).all()
    assert torch.isfinite(y[0]).all() and torch.isfinite(y[3]).all()
    assert torch.equal(y.isnan(), R.int8_linear(x, *m.weight_int8(), m.bias).isnan())


@pytest.mark.parametrize("x,match", [
    (torch.randn(3, 63), "in_features=64"),
    (torch.randn(3, 64).double(), "float32, bfloat16 or float16"),
    (torch.randint(0, 5, (3, 64)), "float32, bfloat16 or float16"),
    (torch.tensor(1.0), "in_features"),
])
def test_bad_input_messages(x, match):
    m = Int8Linear.from_float(nn.Linear(64, 16))
    with pytest.raises((ValueError, RuntimeError), match=match):
        m(x)


def test_bad_device():
    m = Int8Linear.from_float(nn.Linear(64, 16))
    with pytest.raises(RuntimeError, match="one device"):
        m(torch.randn(3, 64, device="meta"))


def test_bad_arguments():
    with pytest.raises(ValueError, match="group_size"):
        Int8Linear.from_float(nn.Linear(64, 16), group_size=32)
    with pytest.raises(ValueError, match="x_scale"):
        Int8Linear.from_float(nn.Linear(64, 16), activations="static")
    lin = nn.Linear(64, 16)
    lin.weight.data[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        Int8Linear.from_float(lin)
    with pytest.raises(TypeError, match="nn.Linear"):
        Int8Linear.from_float(nn.Conv2d(3, 3, 1))
    p, c = ops.int8_pack(rand_i8(16, 64))
    with pytest.raises(ValueError, match="packed for another layer"):
        ops.int8_mm(rand_i8(2, 200), p, c, 16, 200)
    with pytest.raises(ValueError, match="int8"):
        ops.int8_mm(torch.randn(2, 64), p, c, 16, 64)


def test_bad_isa_name():
    with pytest.raises(ValueError, match="set_cpu_isa: name='sse9' is not one of amx, avx512, avx2, scalar"):
        pysparse.set_cpu_isa("sse9")
    with pytest.raises(TypeError, match="name must be a str or None"):
        pysparse.set_cpu_isa(2)
    assert pysparse.cpu_info()["isa_cap"] is None  # a refused name changes nothing


def test_cpu_info():
    info = pysparse.cpu_info()
    assert info["selected_isa"] in ("scalar", "avx2", "avx512", "amx")
    assert info["ops"]["int8_linear"] == f"cpu-{info['selected_isa']}"
    if info["features"]["avx512_vnni"] and info["features"]["avx512bw"]:
        assert info["best_isa"] in ("avx512", "amx")


def test_k_too_large_for_int32_is_an_error():
    # K = 131072 could overflow int32 (all -128 x -128): refuse rather than wrap silently
    with pytest.raises(ValueError, match="too large"):
        ops.int8_pack(torch.zeros(1, 131072, dtype=torch.int8))


def test_tiny_and_zero_rows_match_reference(isa):
    # amax subnormal: 127 / amax overflows to inf and 0 * inf is NaN, which must quantize
    # to 0 (as the reference), not to -128; a static scale below FLT_MIN likewise.
    lin = nn.Linear(64, 8)
    q, s = R.quantize_weight(lin.weight)
    x = torch.zeros(3, 64)
    x[1, 1::2] = 1e-40
    x[2, 3] = -1e-39
    m = Int8Linear.from_float(lin)
    assert torch.equal(m(x), R.int8_linear(x, q, s, lin.bias.detach()))
    ms = Int8Linear.from_float(lin, activations="static", x_scale=1e-39)
    assert torch.equal(ms(x), R.int8_linear(x, q, s, lin.bias.detach(), torch.tensor([1e-39])))
    assert torch.equal(ms(torch.zeros(2, 64)), lin.bias.detach().expand(2, 8))


def test_packed_for_another_k_is_refused():
    p, c = ops.int8_pack(rand_i8(70, 200))
    with pytest.raises(ValueError, match="packed for another layer"):
        ops.int8_mm(rand_i8(2, 130), p, c, 70, 130)


def test_state_dict_restores_static_and_smoothquant_into_a_plain_layer():
    lin = nn.Linear(64, 8)
    x = torch.randn(16, 64)
    x[:, 3] *= 30
    src = pysparse.quantize_int8(nn.Sequential(lin), activations="static", calibration_data=[x],
                                 smoothquant_alpha=0.5)[0]
    # API change: a file carrying its config loads into a layer of that config only ...
    with pytest.raises(RuntimeError, match="_extra_state.*activations, smoothquant"):
        Int8Linear(64, 8).load_state_dict(src.state_dict())
    dst = Int8Linear.from_config(src.config)
    dst.load_state_dict(src.state_dict())
    assert torch.equal(dst(x), src(x))
    # ... while a file from before configs still restores static and SmoothQuant into a plain one
    dst = Int8Linear(64, 8)  # dynamic, no smoothing
    dst.load_state_dict({k: v for k, v in src.state_dict().items() if k != "_extra_state"})
    assert dst.activations == "static" and dst.smooth is not None and dst.config == src.config
    assert torch.equal(dst(x), src(x))
    with pytest.raises(RuntimeError, match="bias"):
        Int8Linear(64, 8, bias=False).load_state_dict(Int8Linear.from_float(lin).state_dict())


@pytest.mark.parametrize("N,wrong", [(70, 100), (100, 70), (64, 60), (60, 64)])
def test_ops_reject_an_n_the_weight_was_not_packed_for(N, wrong):
    # N and the wrong N round up to the same 64-column padding: only the colsum mark tells
    K = 96
    packed, colsum = torch.ops.pysparse.int8_pack(torch.randint(-128, 128, (N, K), dtype=torch.int8))
    x = torch.randn(3, K)
    ws = torch.ones(1, colsum.shape[1])
    with pytest.raises(ValueError, match=f"N={wrong} does not match the packed weight, which holds {N}"):
        torch.ops.pysparse.int8_linear(x, packed, colsum, ws, None, None, wrong, K)
    with pytest.raises(ValueError, match="does not match the packed weight"):
        torch.ops.pysparse.int8_mm(torch.zeros(2, K, dtype=torch.int8), packed, colsum, wrong, K)
    with pytest.raises(ValueError, match="does not match the packed weight"):
        torch.ops.pysparse.int8_unpack(packed, colsum, wrong, K)


def test_smoothquant_dequantized_weight_is_the_original():
    """SmoothQuant stores W * s and keeps 1/s for the input: dequantized_weight undoes it (it
    returned W * s^2 before; found by the recover helper's float-shadow check)."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(128, 64)
    s = torch.rand(128) * 4 + 0.25
    m = Int8Linear.from_float(lin, smooth=s)
    q, scale = R.quantize_weight(lin.weight.detach() * s, 0)
    want = q.float() * scale / s  # the int8 rounding of W * s, with s divided back out
    torch.testing.assert_close(m.dequantized_weight(), want, rtol=1e-6, atol=1e-7)
