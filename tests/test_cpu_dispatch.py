"""The CPU dispatch policy (csrc/cpu/dispatch.h, issue 13): one place decides, it reads the
environment once at import, the setters switch it atomically, and what cpu_info / kernel_for
report is what runs."""
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from torch import nn

import pysparse
from pysparse import formats, ops
from pysparse.nn import BlockSparseLinear, Int8Linear

from .conftest import available_isas

ROOT = Path(__file__).resolve().parent.parent


def _python(code: str, **env: str) -> subprocess.CompletedProcess:
    """Run code in a fresh interpreter (the environment is read once, at import)."""
    e = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), **env)
    for k in ("PYSPARSE_CPU_ISA", "PYSPARSE_CPU_BF16"):
        if k not in env:
            e.pop(k, None)
    return subprocess.run([sys.executable, "-c", code], env=e, capture_output=True, text=True, timeout=300)


def test_environment_is_read_at_import_only():
    r = _python("import os, pysparse\n"
                "os.environ['PYSPARSE_CPU_ISA'] = 'avx2'\n"  # too late: read at import
                "i = pysparse.cpu_info()\n"
                "print(i['selected_isa'], i['isa_cap'], i['bf16_mode'], i['features']['bf16_dot_choice'])",
                PYSPARSE_CPU_ISA="scalar", PYSPARSE_CPU_BF16="0")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["scalar", "scalar", "False", "forced"]


@pytest.mark.parametrize("var,value", [("PYSPARSE_CPU_ISA", "sse9"), ("PYSPARSE_CPU_BF16", "yes")])
def test_bad_environment_fails_the_import_naming_the_variable(var, value):
    r = _python("import pysparse", **{var: value})
    assert r.returncode != 0
    # (an error in an extension's module init reaches Python as ImportError, message kept)
    assert f"{var} (read when pysparse loads)='{value}' is not" in r.stderr, r.stderr


def test_set_cpu_isa_returns_previous_and_context_restores():
    assert pysparse.set_cpu_isa("scalar") is None
    try:
        assert ops.kernel_for("cpu") == "cpu-scalar"
        with pysparse.cpu_isa(None):
            assert pysparse.cpu_info()["selected_isa"] == available_isas()[-1]
        assert pysparse.cpu_info()["isa_cap"] == "scalar"
    finally:
        assert pysparse.set_cpu_isa(None) == "scalar"
    with pytest.raises(ValueError, match="name='AVX2'"):
        pysparse.set_cpu_isa("AVX2")


def test_set_cpu_bf16_returns_previous_and_reports_forced():
    with pysparse.cpu_bf16(False):
        assert pysparse.cpu_info()["bf16_mode"] is False
        assert pysparse.cpu_info()["features"]["bf16_dot_choice"] == "forced"
        assert not pysparse.cpu_info()["features"]["bf16_dot"]
        assert pysparse.set_cpu_bf16(True) is False
    assert pysparse.cpu_info()["bf16_mode"] is None


def _lin(w: torch.Tensor, bias: bool = True) -> nn.Linear:
    lin = nn.Linear(w.shape[1], w.shape[0], bias=bias)
    with torch.no_grad():
        lin.weight.copy_(w)
    return lin


@pytest.mark.parametrize("isa", ["scalar", "avx2", "avx512", "amx"])
@pytest.mark.parametrize("bf16", [None, False, True])
def test_cpu_info_reports_what_the_policy_runs(isa, bf16):
    with pysparse.cpu_isa(isa), pysparse.cpu_bf16(bf16):
        info = pysparse.cpu_info()
        o = info["ops"]
        assert o["int8_linear"] == ops.kernel_for("cpu") == f"cpu-{info['selected_isa']}"
        assert o["bsr_linear_bf16"] == ops.kernel_for("cpu", "bsr_linear", dtype=torch.bfloat16, block=(64, 64))
        # the defect: bf16 blocks not 32 or 64 deep never run on AMX-BF16
        for bk in (2, 16, 48):
            assert ops.kernel_for("cpu", "bsr_linear", dtype=torch.bfloat16, block=(64, bk)) != "cpu-amx"
        assert o["bsr_linear_bf16_other_bk"] != "cpu-amx"
        assert o["bsr_linear_grad_x_other_bk"] == "cpu-aten"
        assert o["bsr_linear"] in ("cpu-scalar", "cpu-avx2", "cpu-avx512")
        assert o["bsr_int8_linear"] == f"cpu-{info['selected_isa']}"  # one int8 block kernel per ISA
        if bf16 is False:
            assert o["bsr_linear_bf16"].endswith("-widen")


def test_kernel_for_bad_arguments():
    with pytest.raises(ValueError, match="op must be one of"):
        ops.kernel_for("cpu", "conv2d")
    with pytest.raises(ValueError, match="dtype"):
        ops.kernel_for("cpu", "bsr_linear", dtype=torch.float16)
    assert ops.kernel_for(torch.device("cpu")) == ops.kernel_for("cpu", "int8_linear")


# ------------------------------------------------------------------ threads vs the setter
def test_threads_calling_while_the_path_switches():
    torch.manual_seed(0)
    isas = available_isas()
    w = torch.randn(192, 256)
    w[:64, :128] = 0  # one pruned 64 x 64 block pair
    layers = {"int8": Int8Linear.from_float(_lin(w)),
              "bsr-int8": BlockSparseLinear.from_dense(_lin(w), dtype=torch.int8, dispatch="sparse"),
              "bsr-f32": BlockSparseLinear.from_dense(_lin(w), block=(64, 32), dispatch="sparse"),
              "bsr-bf16": BlockSparseLinear.from_dense(_lin(w), block=(64, 32), dtype=torch.bfloat16,
                                                       dispatch="sparse")}
    x = torch.randn(9, 256)
    # every output each path (and bf16 mode) can give
    allowed = {name: [] for name in layers}
    for isa in isas:
        for bf16 in (False, None):
            with pysparse.cpu_isa(isa), pysparse.cpu_bf16(bf16):
                for name, m in layers.items():
                    allowed[name].append(m(x))
    errors: list[BaseException] = []
    stop = threading.Event()

    def caller():
        try:
            for _ in range(40):
                for name, m in layers.items():
                    y = m(x)
                    if not any(torch.equal(y, a) for a in allowed[name]):
                        raise AssertionError(f"{name}: an output no path gives")
        except BaseException as e:  # noqa: BLE001 (reported below)
            errors.append(e)

    def switcher():
        i = 0
        while not stop.is_set():
            pysparse.set_cpu_isa(isas[i % len(isas)])
            pysparse.set_cpu_bf16(None if i % 3 else False)
            i += 1

    sw = threading.Thread(target=switcher)
    callers = [threading.Thread(target=caller) for _ in range(8)]
    sw.start()
    try:
        for t in callers:
            t.start()
        for t in callers:
            t.join()
    finally:
        stop.set()
        sw.join()
        pysparse.set_cpu_isa(None)
        pysparse.set_cpu_bf16(None)
    assert not errors, errors[0]


# ------------------------------------------------------------------ meta beside real tensors
def _int8_inputs():
    m = Int8Linear.from_float(_lin(torch.randn(70, 96)))
    return m


def _bsr_inputs(dtype):
    w = torch.randn(70, 96)
    w[:64, :64] = 0
    block = None if dtype == torch.int8 else (64, 32)
    return BlockSparseLinear.from_dense(_lin(w), block=block, dtype=dtype, dispatch="sparse")


META_CASES = {
    "int8_linear-bias": ("int8_linear", 4),
    "int8_linear-x_scale": ("int8_linear", 5),
    "int8_linear-colsum": ("int8_linear", 2),
    "int8_linear-w_scale": ("int8_linear", 3),
    "int8_mm-colsum": ("int8_mm", 2),
    "int8_unpack-colsum": ("int8_unpack", 1),
    "bsr_linear-bias": ("bsr_linear", 4),
    "bsr_linear-row_ptr": ("bsr_linear", 2),
    "bsr_linear-col_idx": ("bsr_linear", 3),
    "bsr_int8_linear-colsum": ("bsr_int8_linear", 4),
    "bsr_int8_linear-w_scale": ("bsr_int8_linear", 5),
    "bsr_int8_linear-bias": ("bsr_int8_linear", 6),
    "bsr_int8_linear-x_scale": ("bsr_int8_linear", 7),
    "bsr_linear_grad_x-row_ptr": ("bsr_linear_grad_x", 2),
    "bsr_linear_grad_values-col_idx": ("bsr_linear_grad_values", 4),
}


def _op_args(op: str) -> list:
    x = torch.randn(5, 96)
    if op in ("int8_linear", "int8_mm", "int8_unpack"):
        m = _int8_inputs()
        if op == "int8_linear":
            return [x, m.packed, m.colsum, m.w_scale, torch.randn(70), torch.tensor([0.05]), 70, 96]
        if op == "int8_mm":
            return [torch.randint(-128, 128, (5, 96), dtype=torch.int8), m.packed, m.colsum, 70, 96]
        return [m.packed, m.colsum, 70, 96]
    if op == "bsr_int8_linear":
        s = _bsr_inputs(torch.int8)
        return [x, s.values, s.row_ptr, s.col_idx, s.colsum, s.w_scale, torch.randn(70), torch.tensor([0.05]),
                70, 96, False]
    s = _bsr_inputs(None)
    v = s.values.detach()
    if op == "bsr_linear":
        return [x, v, s.row_ptr, s.col_idx, torch.randn(70), 70, 96, False]
    if op == "bsr_linear_grad_x":
        return [torch.randn(5, 70), v, s.row_ptr, s.col_idx, 70, 96]
    return [torch.randn(5, 70), x, v, s.row_ptr, s.col_idx, 70, 96]


@pytest.mark.parametrize("case", list(META_CASES))
def test_meta_helper_beside_cpu_tensors_is_an_error(case):
    op, i = META_CASES[case]
    args = _op_args(op)
    args[i] = args[i].to("meta")
    with pytest.raises(RuntimeError, match=r"on the meta device \(no data\).*one device"):
        getattr(torch.ops.pysparse, op)(*args)


def test_meta_bias_in_a_layer_is_an_error():
    m = Int8Linear.from_float(nn.Linear(96, 70))
    m.bias = m.bias.to("meta")
    with pytest.raises(RuntimeError, match="bias is on the meta device"):
        m(torch.randn(5, 96))


def test_all_meta_still_runs_the_fake():
    args = [a.to("meta") if isinstance(a, torch.Tensor) else a for a in _op_args("int8_linear")]
    y = torch.ops.pysparse.int8_linear(*args)
    assert y.device.type == "meta" and y.shape == (5, 70)


# ------------------------------------------------------------------ N = 0: grad_x's fake
def test_bsr_grad_x_fake_for_no_outputs():
    v = torch.zeros(0, 32, 64)
    rp, ci = torch.zeros(1, dtype=torch.int32), torch.zeros(0, dtype=torch.int32)
    g = torch.randn(3, 5, 0)
    assert torch.ops.pysparse.bsr_linear_grad_x(g, v, rp, ci, 0, 96).shape == (15, 96)
    torch.library.opcheck(torch.ops.pysparse.bsr_linear_grad_x, (g, v, rp, ci, 0, 96))


def test_compiled_training_of_a_layer_with_no_outputs():
    torch._dynamo.reset()
    layer = BlockSparseLinear.from_dense(nn.Linear(96, 0), block=(64, 32), dispatch="sparse")
    x = torch.randn(4, 96, requires_grad=True)
    layer(x).sum().backward()
    eager = x.grad.clone()
    x.grad = None
    torch.compile(layer, fullgraph=True)(x).sum().backward()
    assert torch.equal(x.grad, eager)


# ------------------------------------------------------------------ gradients through int8
def test_gradient_flows_through_int8_linear(isa):
    torch.manual_seed(0)
    pre = nn.Linear(40, 96)
    m = Int8Linear.from_float(nn.Linear(96, 70))
    x = torch.randn(3, 5, 40, requires_grad=True)
    h = pre(x)
    y = m(h)
    y.square().sum().backward()
    assert x.grad is not None and pre.weight.grad is not None
    # straight-through: the gradient of F.linear with the dequantized weight, same grad_y
    g = 2 * y.detach()
    h2 = h.detach().requires_grad_()
    nn.functional.linear(h2, m.dequantized_weight(), m.bias).backward(g)
    h3 = h.detach().requires_grad_()
    m(h3).backward(g)
    torch.testing.assert_close(h3.grad, h2.grad, rtol=1e-5, atol=1e-5)  # fp32 sums in another order


def test_gradient_flows_through_int8_block_sparse(isa):
    torch.manual_seed(0)
    w = torch.randn(130, 200)
    w[64:128, :128] = 0
    s = BlockSparseLinear.from_dense(_lin(w), dtype=torch.int8, activation="relu", dispatch="sparse")
    h = torch.randn(7, 200, requires_grad=True)
    y = s(h)
    g = torch.randn_like(y)
    y.backward(g)
    h2 = h.detach().requires_grad_()
    # through the ReLU of the int8 output (a float ReLU's mask differs where y is near 0)
    nn.functional.linear(h2, s.dense_weight(), getattr(s, "bias_f32", None)).backward(g * (y > 0))
    assert h.grad is not None
    torch.testing.assert_close(h.grad, h2.grad, rtol=1e-5, atol=1e-5)  # fp32 sums in another order


def test_int8_dequantized_weight_per_group():
    lin = nn.Linear(200, 70)
    m = Int8Linear.from_float(lin, group_size=64)
    w = ops.int8_dequantized_weight(m.packed, m.colsum, m.w_scale, 70, 200)
    assert torch.equal(w, m.dequantized_weight())


# ------------------------------------------------------------------ int8_pack layout
@pytest.mark.parametrize("N,K,group", [(1, 1, 0), (17, 5, 0), (70, 130, 0), (70, 130, 64), (33, 256, 128)])
def test_int8_pack_layout(N, K, group):
    w = torch.randint(-128, 128, (N, K), dtype=torch.int8)
    packed, colsum = ops.int8_pack(w, group)
    Np, Kp = -(-N // 64) * 64, ops.packed_k(K, group)
    full = torch.zeros(Np, Kp, dtype=torch.int8)
    full[:N, :K] = w
    # [Np/16][Kp/4][16][4]: 16 columns x 4 k per 64-byte line (csrc/cpu/int8_linear.h)
    ref = full.reshape(Np // 16, 16, Kp // 4, 4).permute(0, 2, 1, 3).reshape(Np // 16, Kp * 16)
    assert torch.equal(packed, ref)
    G = colsum.shape[0]
    sums = full.int().reshape(Np, G, Kp // G).sum(-1).T
    sums[:, N:] = formats.COLSUM_PAD
    assert torch.equal(colsum, sums)
    assert torch.equal(torch.ops.pysparse.int8_unpack(packed, colsum, N, K), w)
