"""The AMX shape rule (issue 12, csrc/cpu/dispatch.h): on an AMX machine int8_linear / int8_mm
run the AVX-512 VNNI kernel below amx_min_rows rows of x (32) and bsr_int8_linear below
amx_bsr_min_rows (64); PYSPARSE_AMX_MIN_ROWS / PYSPARSE_AMX_BSR_MIN_ROWS override them at
load, PYSPARSE_CPU_ISA / set_cpu_isa cap everything, and cpu_info / kernel_for report it.

Most machines have no AMX, so the rule is asked through the test hook
``_C.kernel_path(..., best_isa="amx")``, which evaluates the same function the ops dispatch
through as if the CPU's best ISA were AMX (it runs nothing)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import pysparse
from pysparse import ops

ROOT = Path(__file__).resolve().parent.parent
_AMX_ENV = ("PYSPARSE_AMX_MIN_ROWS", "PYSPARSE_AMX_BSR_MIN_ROWS", "PYSPARSE_AMX_GEMM", "PYSPARSE_AMX_PREFETCH")


def _python(code: str, **env: str) -> subprocess.CompletedProcess:
    """Run code in a fresh interpreter (the environment is read once, at import), with only the
    AMX / ISA variables given here set."""
    e = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), **env)
    for k in _AMX_ENV + ("PYSPARSE_CPU_ISA", "PYSPARSE_CPU_BF16"):
        if k not in env:
            e.pop(k, None)
    return subprocess.run([sys.executable, "-c", code], env=e, capture_output=True, text=True, timeout=300)


def _rule(op: str, M: int, best: str = "amx") -> str:
    return ops._C.kernel_path(op, M=M, best_isa=best)


def _thresholds() -> dict:
    f = pysparse.cpu_info()["features"]
    return {"int8_linear": f["amx_min_rows"], "int8_mm": f["amx_min_rows"], "bsr_int8_linear": f["amx_bsr_min_rows"]}


@pytest.mark.parametrize("op", ["int8_linear", "int8_mm", "bsr_int8_linear"])
def test_below_the_threshold_vnni_at_and_above_amx(op):
    t = _thresholds()[op]
    if t == 0:
        pytest.skip("threshold set to 0 in this environment: AMX for every M")
    assert _rule(op, t - 1) == "cpu-avx512"
    assert _rule(op, 1) == "cpu-avx512"
    assert _rule(op, 0) == "cpu-avx512"  # (an empty x: nothing runs, the rule still answers)
    assert _rule(op, t) == "cpu-amx"
    assert _rule(op, t + 1) == "cpu-amx"
    assert _rule(op, 4096) == "cpu-amx"
    assert _rule(op, -1) == "cpu-amx"  # M not known: the typical (large) call


def test_default_thresholds_and_report():
    r = _python("import pysparse; f = pysparse.cpu_info()['features']\n"
                "print(f['amx_min_rows'], f['amx_bsr_min_rows'], f['amx_gemm'], f['amx_prefetch'])")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["32", "64", "tiles", "-1"]


@pytest.mark.parametrize("op", ["int8_linear", "bsr_int8_linear"])
def test_the_cap_still_caps_every_m(op):
    for cap, want in (("avx512", {"cpu-avx512"}), ("avx2", {"cpu-avx2", "cpu-scalar"}), ("scalar", {"cpu-scalar"})):
        with pysparse.cpu_isa(cap):
            for M in (1, 31, 32, 63, 64, 512, -1):
                assert _rule(op, M) in want, (cap, M)
    with pysparse.cpu_isa("amx"):  # a cap at the best ISA is no cap
        assert _rule(op, 4096) == "cpu-amx"


def test_other_ops_do_not_depend_on_m():
    for M in (1, 16, 4096):
        assert _rule("bsr_linear", M) == "cpu-avx512"  # fp32 blocks top out at AVX-512
        assert _rule("int8_conv2d", M) == "cpu-amx"
        assert _rule("compact_conv2d", M) == "cpu-avx512"


def test_this_machine_reports_what_runs():
    """Without the hook the rule uses this CPU's best ISA; kernel_for passes M through."""
    best = pysparse.cpu_info()["best_isa"]
    assert _rule("int8_linear", 4096, best) == ops._C.kernel_path("int8_linear", M=4096)
    for op, t in _thresholds().items():
        for M in (1, max(t - 1, 0), t, 4096):
            got = ops.kernel_for("cpu", op, M=M)
            assert got == ops._C.kernel_path(op, M=M)
            if best == "amx":
                assert got == ("cpu-avx512" if M < t else "cpu-amx")
            else:
                assert got != "cpu-amx"


def test_best_isa_hook_validates():
    with pytest.raises(ValueError, match="best_isa='sse9' is not one of"):
        ops._C.kernel_path("int8_linear", M=1, best_isa="sse9")


def test_environment_overrides_at_load():
    code = ("import pysparse; from pysparse import ops; f = pysparse.cpu_info()['features']\n"
            "k = lambda op, M: ops._C.kernel_path(op, M=M, best_isa='amx')\n"
            "print(f['amx_min_rows'], f['amx_bsr_min_rows'], f['amx_gemm'], f['amx_prefetch'],\n"
            "      k('int8_linear', 99), k('int8_linear', 100), k('int8_mm', 99), k('bsr_int8_linear', 0),\n"
            "      k('bsr_int8_linear', 1))")
    r = _python(code, PYSPARSE_AMX_MIN_ROWS="100", PYSPARSE_AMX_BSR_MIN_ROWS="0", PYSPARSE_AMX_GEMM="rows",
                PYSPARSE_AMX_PREFETCH="0")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["100", "0", "rows", "0", "cpu-avx512", "cpu-amx", "cpu-avx512", "cpu-amx", "cpu-amx"]


@pytest.mark.parametrize("var,value,says", [
    ("PYSPARSE_AMX_MIN_ROWS", "abc", "is not a row count from 0 to"),
    ("PYSPARSE_AMX_MIN_ROWS", "-1", "is not a row count from 0 to"),
    ("PYSPARSE_AMX_MIN_ROWS", "1.5", "is not a row count from 0 to"),
    ("PYSPARSE_AMX_MIN_ROWS", "99999999999999999999999", "is not a row count from 0 to"),
    ("PYSPARSE_AMX_BSR_MIN_ROWS", " 64", "is not a row count from 0 to"),
    ("PYSPARSE_AMX_GEMM", "cols", "is not one of tiles, rows"),
    ("PYSPARSE_AMX_PREFETCH", "65", "is not a prefetch distance from 0 to 64"),
])
def test_bad_environment_fails_the_import_naming_the_variable(var, value, says):
    r = _python("import pysparse", **{var: value})
    assert r.returncode != 0
    assert f"{var} (read when pysparse loads)='{value}' {says}" in r.stderr, r.stderr


def test_ops_run_either_side_of_the_thresholds():
    """On any machine: each op's batch equals its rows run one at a time on both sides of each
    threshold (on an AMX machine the batch and the single rows run different kernels, which
    agree bit for bit: per-row scales, exact int32 sums, one shared epilogue)."""
    from pysparse.nn import BlockSparseLinear, Int8Linear
    lin = torch.nn.Linear(160, 130)
    dense = Int8Linear.from_float(lin)
    with torch.no_grad():  # a block-sparse int8 layer: every other 64 x 64 block of W zero
        w = lin.weight.clone()
        w[:64, :64] = 0
        w[64:, 64:128] = 0
        lin.weight.copy_(w)
    sparse = BlockSparseLinear.from_dense(lin, dtype=torch.int8, dispatch="sparse")
    ms = sorted({1, 2, *(max(t + d, 1) for t in _thresholds().values() for d in (-1, 0, 1))})
    for layer in (dense, sparse):
        for M in ms:
            x = torch.randn(M, 160)
            y = layer(x)
            assert y.shape == (M, 130)
            torch.testing.assert_close(y, torch.cat([layer(x[i:i + 1]) for i in range(M)]), rtol=0, atol=0)
