"""The build off x86-64 (issue 13): the torch-free kernel units and the dispatch policy compile
for aarch64 without the x86 units, and the ATen wrappers name no x86 kernel there (the x86
kernels are declared only under PYSPARSE_X86, so an unguarded use is a compile error).
Skips where Debian's cross compiler is absent (`make cross-aarch64` installs it)."""
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CXX = "aarch64-linux-gnu-g++"
UNITS = ["int8_linear_scalar.cpp", "bsr_linear_scalar.cpp", "compact_conv2d_scalar.cpp", "int8_conv2d_scalar.cpp",
         "cpu_features.cpp", "dispatch.cpp", "peak.cpp"]
WRAPPERS = ["int8_linear.cpp", "bsr_linear.cpp", "compact_conv2d.cpp", "int8_conv2d.cpp"]

needs_cross = pytest.mark.skipif(shutil.which(CXX) is None, reason=f"{CXX} not installed (make cross-aarch64)")


@needs_cross
@pytest.mark.parametrize("unit", UNITS)
def test_torch_free_unit_compiles_for_aarch64(tmp_path, unit):
    obj = tmp_path / "unit.o"
    cmd = [CXX, "-std=c++20", "-O1", "-Wall", "-Werror", "-ffp-contract=off", f"-I{ROOT / 'csrc'}", "-c",
           str(ROOT / "csrc" / "cpu" / unit), "-o", str(obj)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    # an aarch64 object, and it calls nothing x86-only
    nm = shutil.which("aarch64-linux-gnu-nm") or "nm"
    undefined = subprocess.run([nm, "-uC", str(obj)], capture_output=True, text=True).stdout
    for isa in ("avx2", "avx512", "amx", "cpuid", "bf16_dot_speedup"):
        assert isa not in undefined, undefined


@needs_cross
@pytest.mark.parametrize("wrapper", WRAPPERS)
def test_aten_wrapper_names_no_x86_kernel_on_aarch64(wrapper):
    from torch.utils.cpp_extension import include_paths

    cmd = [CXX, "-std=c++20", "-fsyntax-only", f"-I{ROOT / 'csrc'}", *[f"-I{p}" for p in include_paths()],
           str(ROOT / "csrc" / "ops" / wrapper)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
