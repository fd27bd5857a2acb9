"""The AMX int8 kernels on a CPU without AMX, compiled against a software model of the tile
instructions (tests/emulate/amx.h): the dense ones (csrc/cpu/int8_linear_amx.cpp, checked by
tests/emulate/amx_check.cpp: issue 12's gemm_amx with tile-packed and with row-major A, prefetch
on and off, and the previous gemm_amx_rows; int32 sums bit-exact against int64, -128 included,
and every output type's epilogue, with and without bias, per channel and per group, bit-equal
to the scalar kernel's, over every M of 1..70, K = 100 and 4160, tasks split over rows and
column chunks) and the block-sparse one (csrc/cpu/bsr_linear_amx.cpp,
tests/emulate/bsr_amx_check.cpp: tile-packed and row-major A, prefetch on and off, every output
type, ReLU on and off, bit-equal to the scalar block-sparse kernel, every row tail of the 16- and
32-row passes, edge blocks and empty block rows) and its bf16 kernel
(tests/emulate/bsr_bf16_amx_check.cpp: TDPBF16PS against the scalar bf16 kernel within fp32
rounding). On an AMX machine the real kernel also runs through every other test (the `isa`
fixture); this one makes sure its tile logic has run somewhere before it meets one."""
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _compiler() -> str | None:
    for c in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if c and shutil.which(c):
            return c
    return None


@pytest.mark.parametrize("kernel,check,scalar", [
    ("int8_linear_amx.cpp", "amx_check.cpp", "int8_linear_scalar.cpp"),
    ("bsr_linear_amx.cpp", "bsr_amx_check.cpp", "bsr_linear_scalar.cpp"),
    ("bsr_linear_amx.cpp", "bsr_bf16_amx_check.cpp", "bsr_linear_scalar.cpp"),
])
def test_amx_kernel_under_emulation(tmp_path, kernel, check, scalar):
    cxx = _compiler()
    if cxx is None:
        pytest.skip("no C++ compiler")
    exe = tmp_path / "check"
    # -ffp-contract=off as setup.py: the epilogue must round as the scalar kernel's does
    cmd = [cxx, "-O2", "-std=c++20", "-ffp-contract=off", f"-I{ROOT / 'csrc'}",
           "-include", str(ROOT / "tests" / "emulate" / "amx.h"),
           str(ROOT / "csrc" / "cpu" / kernel), str(ROOT / "csrc" / "cpu" / scalar),
           str(ROOT / "tests" / "emulate" / check), "-o", str(exe)]
    build = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-3000:]
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stdout + run.stderr
