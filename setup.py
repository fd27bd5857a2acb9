"""Build pysparse's C++ extension (pysparse._C).

Each ISA variant of the CPU kernels is its own translation unit with its own -m flags,
compiled here one by one and linked into the one extension; the kernel used is chosen
at run time from CPUID, so nothing is built with -march=native. Those units include no
torch headers (csrc/cpu/int8_linear.h), so their flags cannot leak into shared inline
code. The x86 units (AVX2, AVX-512, AMX) build only when the compiler targets x86-64;
elsewhere (aarch64, ...) the scalar units serve every op (csrc/cpu/isa.h PYSPARSE_X86).
CUDA sources would build only when the installed torch has CUDA and nvcc exists.
"""
import os
import platform
import shlex
import subprocess
import sysconfig

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

ROOT = os.path.dirname(os.path.abspath(__file__))
# -ffp-contract=off everywhere: no FMA contraction, so the float epilogue rounds the
# same on every path and the layers' outputs agree bit for bit across ISAs.
COMMON = ["-O3", "-std=c++20", "-ffp-contract=off", "-fno-math-errno"]
SCALAR_SOURCES = {
    "csrc/cpu/int8_linear_scalar.cpp": [],
    "csrc/cpu/bsr_linear_scalar.cpp": [],
    "csrc/cpu/compact_conv2d_scalar.cpp": [],
    "csrc/cpu/int8_conv2d_scalar.cpp": [],
}
X86_SOURCES = {
    "csrc/cpu/bsr_linear_avx2.cpp": ["-mavx2", "-mfma", "-mf16c"],
    "csrc/cpu/bsr_linear_avx512.cpp": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni",
                                       "-mavx2", "-mfma", "-mf16c"],
    "csrc/cpu/bsr_linear_avx512bf16.cpp": ["-mavx512bf16", "-mavx512f", "-mavx512bw", "-mavx512vl",
                                           "-mavx2", "-mfma", "-mf16c"],
    "csrc/cpu/int8_linear_avx2.cpp": ["-mavx2", "-mfma", "-mf16c"],
    "csrc/cpu/int8_linear_avx512.cpp": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni",
                                        "-mavx2", "-mfma", "-mf16c"],
    "csrc/cpu/bsr_linear_amx.cpp": ["-mamx-tile", "-mamx-int8", "-mamx-bf16", "-mavx512f", "-mavx512bw",
                                    "-mavx512vl", "-mavx512vnni", "-mavx2", "-mfma", "-mf16c"],
    "csrc/cpu/compact_conv2d_avx2.cpp": ["-mavx2", "-mfma"],
    "csrc/cpu/compact_conv2d_avx512.cpp": ["-mavx512f", "-mavx2", "-mfma"],
    "csrc/cpu/int8_conv2d_avx2.cpp": ["-mavx2", "-mfma", "-mf16c"],
    "csrc/cpu/int8_linear_amx.cpp": ["-mamx-tile", "-mamx-int8", "-mavx512f", "-mavx512bw",
                                     "-mavx512vl", "-mavx512vnni", "-mavx2", "-mfma", "-mf16c"],
    # register-only peak loops (csrc/cpu/peak.h), one unit per ISA
    "csrc/cpu/peak_avx2.cpp": ["-mavx2", "-mfma"],
    "csrc/cpu/peak_avx512.cpp": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni", "-mavx2", "-mfma"],
    "csrc/cpu/peak_avx512bf16.cpp": ["-mavx512bf16", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx2", "-mfma"],
    "csrc/cpu/peak_amx.cpp": ["-mamx-tile", "-mamx-int8", "-mamx-bf16"],
}



def targets_x86_64() -> bool:
    """Whether the C++ compiler builds for x86-64 (asked through its predefined macros, so a
    cross compiler set in CXX counts; the host's machine name if it cannot be asked)."""
    cxx = shlex.split(os.environ.get("CXX") or sysconfig.get_config_var("CXX") or "c++")
    try:
        out = subprocess.run(cxx + ["-dM", "-E", "-x", "c++", os.devnull], capture_output=True, text=True,
                             timeout=60, check=True).stdout
        return "#define __x86_64__ 1" in out
    except (OSError, subprocess.SubprocessError):
        return platform.machine().lower() in ("x86_64", "amd64")


ISA_SOURCES = {**SCALAR_SOURCES, **(X86_SOURCES if targets_x86_64() else {})}


class BuildWithIsaUnits(BuildExtension):
    """Compile each ISA unit with its own flags, then link them into the extension."""

    def build_extension(self, ext):
        objects = []
        for src, flags in ISA_SOURCES.items():
            objects += self.compiler.compile(
                [src], output_dir=self.build_temp, include_dirs=ext.include_dirs,
                extra_postargs=COMMON + ["-fPIC"] + flags)
        ext.extra_objects = list(ext.extra_objects or []) + objects
        super().build_extension(ext)


ext = CppExtension(
    "pysparse._C",
    sources=["csrc/ops/registry.cpp", "csrc/ops/int8_linear.cpp", "csrc/ops/bsr_linear.cpp",
             "csrc/ops/compact_conv2d.cpp", "csrc/cpu/cpu_features.cpp", "csrc/cpu/dispatch.cpp",
             "csrc/ops/int8_conv2d.cpp", "csrc/cpu/peak.cpp"],
    include_dirs=[os.path.join(ROOT, "csrc")],
    # -fopenmp: this torch's at::parallel_for is OpenMP, inlined from headers; without the
    # flag it silently runs on one thread (measured: cpu/wall 0.99 with 2 threads set).
    extra_compile_args={"cxx": COMMON + ["-fopenmp"]},
    extra_link_args=["-fopenmp"],
)

setup(
    ext_modules=[ext],
    cmdclass={"build_ext": BuildWithIsaUnits.with_options(use_ninja=True)},
)
