"""The register-only instruction peaks (csrc/cpu/peak*.cpp, pysparse/bench/peak.py) and the
"of peak" columns of ``pysparse bench kernels``.

The machines are shared and noisy, so nothing here asserts a timing ratio tightly: the peaks
are checked to be positive, finite and within an order of magnitude or two of what such a
core can do, and the thread scaling only within a factor of four. The AMX loops run under
the software tile model (tests/emulate/amx.h) where AMX is absent, with a tiny count, and
their checksums prove the tile shapes and operands are what the MAC counts assume.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import pysparse
from pysparse.__main__ import main
from pysparse.bench import peak
from pysparse.bench.report import render_report
from pysparse.ops import _C

ROOT = Path(__file__).resolve().parent.parent
FEATURES = pysparse.cpu_info()["features"]
AVX2 = FEATURES["avx2"] and FEATURES["fma"]
needs_avx2 = pytest.mark.skipif(not AVX2, reason="no AVX2 + FMA on this CPU")

# MACs per instruction, counted as the hardware does them (peak.h)
EXPECTED_MACS = {"vpmaddwd": 16, "vpdpbusd": 64, "tdpbssd": 16 * 16 * 64, "fma-avx2": 8, "fma-avx512": 16,
                 "vdpbf16ps": 32, "tdpbf16ps": 16 * 16 * 32}


def test_the_loops_and_their_mac_counts():
    got = {d["name"]: d for d in peak.available_instructions()}
    assert set(got) == set(EXPECTED_MACS)
    for name, macs in EXPECTED_MACS.items():
        assert got[name]["macs_per_instruction"] == macs, name
    # available exactly where CPUID (and the OS, for AMX) says
    f = FEATURES
    amx = f["amx_tile"] and f["amx_os_permission"]
    assert got["vpmaddwd"]["available"] == f["avx2"]
    assert got["fma-avx2"]["available"] == (f["avx2"] and f["fma"])
    assert got["vpdpbusd"]["available"] == (f["avx512f"] and f["avx512_vnni"])
    assert got["fma-avx512"]["available"] == f["avx512f"]
    assert got["vdpbf16ps"]["available"] == (f["avx512f"] and f["avx512_bf16"])
    assert got["tdpbssd"]["available"] == (amx and f["amx_int8"])
    assert got["tdpbf16ps"]["available"] == (amx and f["amx_bf16"])


@needs_avx2
@pytest.mark.parametrize("name, lo, hi", [
    # per core, in ops/s (2 per MAC): a 1-5 GHz core doing 0.5-4 instructions per cycle
    ("fma-avx2", 5e9, 500e9),    # 16 FLOP per VFMADD231PS ymm
    ("vpmaddwd", 5e9, 1000e9),  # 32 int8 ops per VPMADDWD + VPADDD pair
])
def test_avx2_peaks_are_plausible(name, lo, hi):
    p = peak.measure_peak(name, threads=1, target_ms=10, repeats=3)
    assert p.threads == 1 and len(p.reps_macs_per_s) == 3
    assert all(math.isfinite(v) and v > 0 for v in p.reps_macs_per_s)
    assert lo <= 2 * p.per_core_macs_per_s <= hi, (name, 2 * p.per_core_macs_per_s)
    assert p.total_macs_per_s == p.per_core_macs_per_s  # one thread


@needs_avx2
@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="one logical CPU")
def test_peak_scales_with_threads():
    one = _C.measure_peak("fma-avx2", 1, 10.0, 3)
    two = _C.measure_peak("fma-avx2", 2, 10.0, 3)
    assert two["threads"] == 2 and len(two["wall_s"]) == 3
    for r in (one, two):
        assert r["iters"] > 0 and r["macs_per_thread"] == r["iters"] * 12 * 8  # 12 chains x 8 MACs
        for wall, slow, fast in zip(r["wall_s"], r["slowest_thread_s"], r["fastest_thread_s"]):
            # the wall time spans every thread's loop: at least the slowest, which is at least the fastest
            assert 0 < fast <= slow <= wall * (1 + 1e-9) + 1e-6
    # Two threads do twice the work; on a shared 2-core machine their rate is 1x-2x one thread's,
    # and a neighbour can move either figure: only a factor of four either way is asserted.
    rate = lambda r: r["threads"] * r["macs_per_thread"] / sorted(r["wall_s"])[1]  # noqa: E731
    assert 0.25 < rate(two) / rate(one) < 4.0


def test_bad_arguments_say_what():
    with pytest.raises(ValueError, match="no peak loop named"):
        peak.measure_peak("nope", 1)
    with pytest.raises(ValueError, match="no peak loop named"):
        _C.measure_peak("nope", 1, 1.0, 1)
    usable = [d["name"] for d in peak.available_instructions() if d["available"]]
    missing = [d["name"] for d in peak.available_instructions() if not d["available"]]
    if usable:
        with pytest.raises(ValueError, match="threads"):
            _C.measure_peak(usable[0], 0, 1.0, 1)
        with pytest.raises(ValueError, match="reps"):
            _C.measure_peak(usable[0], 1, 1.0, 0)
        with pytest.raises(ValueError, match="target_ms"):
            _C.measure_peak(usable[0], 1, -1.0, 1)
    if missing:
        with pytest.raises(ValueError, match="cannot run"):
            _C.measure_peak(missing[0], 1, 1.0, 1)


def test_each_kernel_maps_to_its_instruction():
    f = peak.instruction_for
    assert f("cpu-amx", "int8") == "tdpbssd" and f("cpu-avx512", "int8") == "vpdpbusd"
    assert f("cpu-avx2", "int8") == "vpmaddwd" and f("cpu-scalar", "int8") is None
    assert f("cpu-avx512", "fp32") == "fma-avx512" and f("cpu-avx2", "fp32") == "fma-avx2"
    assert f("cpu-aten", "fp32") is None and f("cpu-scalar", "fp32") is None
    assert f("cpu-amx", "bf16") == "tdpbf16ps" and f("cpu-avx512bf16", "bf16") == "vdpbf16ps"
    assert f("cpu-avx2-widen", "bf16") == "fma-avx2" and f("cpu-scalar-widen", "bf16") is None


def _run(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    threads = torch.get_num_threads()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(argv)
    finally:
        torch.set_num_threads(threads)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("peak") / "k.json")
    code, out, err = _run(["bench", "kernels", "--quick", "--shapes", "32x64x128", "--threads", "1",
                           "--device", "cpu", "--family", "int8_linear", "--family", "sparse_linear",
                           "--no-progress", "--json", path])
    assert code == 0, err
    return out, path


@needs_avx2
def test_tiny_grid_shows_the_fraction_of_peak(tiny_run):
    out, path = tiny_run
    doc = json.load(open(path))
    peaks = doc["peaks"]
    assert peaks["threads"] == 1 and {"vpmaddwd", "fma-avx2"} <= set(peaks["instructions"])
    for p in peaks["instructions"].values():
        assert p["total_macs_per_s"] > 0 and p["per_core_macs_per_s"] > 0
    rows = {(r["family"], r["contender"], r["density"]): r for r in doc["results"]}
    avx2 = rows[("int8_linear", "pysparse-avx2", 1.0)]
    assert avx2["kernel"] == "cpu-avx2" and avx2["peak_instruction"] == "vpmaddwd"
    assert avx2["macs"] == 32 * 64 * 128
    assert 0 < avx2["of_peak"] < 1  # a 32 x 64 x 128 layer is far from the peak, never past it
    scalar = rows[("int8_linear", "pysparse-scalar", 1.0)]
    assert scalar["kernel"] == "cpu-scalar" and scalar["of_peak"] is None and scalar["peak_instruction"] is None
    assert "of_peak" not in rows[("int8_linear", "fp32", 1.0)]  # peers: no kernel of ours, no fraction
    for r in doc["results"]:
        if r["contender"] == "pysparse-bsr":  # fp32 blocks (64, 32): the FMA peak, stored blocks' MACs only
            assert r["peak_instruction"] == "fma-avx2" and r["macs"] % (32 * 64 * 32) == 0
            assert 0 <= r["macs"] <= 32 * 64 * 128
            # at density 0.05 the two 64 x 64 tiles of this weight may both be pruned: no MACs, no fraction
            assert (r["of_peak"] is None) if r["macs"] == 0 else (0 < r["of_peak"] < 1)
        if r["contender"] == "pysparse-bsr-int8":
            assert r["macs"] % (32 * 64 * 64) == 0
    assert "register-only peak: VPMADDWD ymm + VPADDD (int8)" in out
    assert "pysparse-avx2 of peak" in out and "pysparse-bsr of peak" in out
    assert "pysparse-scalar of peak" not in out  # no peak: no column


def test_report_shows_peaks_and_old_docs_still_render(tiny_run, tmp_path):
    _, path = tiny_run
    md = render_report([path], str(tmp_path / "B.md"))
    if AVX2:
        assert "| register-only peak | VPMADDWD ymm + VPADDD (int8)" in md
        assert "pysparse-avx2 of peak" in md and "of peak: the kernel's MAC rate" in md
    # the same run as a file written before peaks existed: no "peaks", no row fields
    doc = json.load(open(path))
    doc.pop("peaks")
    for r in doc["results"]:
        for k in ("kernel", "macs", "peak_instruction", "of_peak"):
            r.pop(k, None)
    old = tmp_path / "old.json"
    old.write_text(json.dumps(doc))
    md_old = render_report([str(old)], str(tmp_path / "B.md"))
    assert "of peak" not in md_old and "register-only peak" not in md_old
    assert "| M | N | K |" in md_old and "pysparse-avx2" in md_old or "pysparse-scalar" in md_old
    # and the committed results (with peaks since 2026-12-02; a file from before renders without them)
    committed = ROOT / "docs" / "bench" / "kernels.json"
    if committed.exists():
        md_c = render_report([str(committed)], str(tmp_path / "B.md"))
        has_peaks = bool(json.loads(committed.read_text()).get("peaks"))
        assert "| M | N | K |" in md_c and ("of peak" in md_c) == has_peaks


CHECK = r"""
#include <cstdio>
#include "cpu/peak.h"
int main() {
  using namespace pysparse::cpu;
  const long s8 = peak_loop_tdpbssd_amx(3), bf = peak_loop_tdpbf16ps_amx(3);
  // 4 C tiles x 256 elements; per instruction each element gains 64 x 1 x 2 (int8), 32 x 1 x 1 (bf16)
  if (s8 != 4L * 256 * 128 * 3) { std::printf("tdpbssd checksum %ld\n", s8); return 1; }
  if (bf != 4L * 256 * 32 * 3) { std::printf("tdpbf16ps checksum %ld\n", bf); return 1; }
  std::printf("ok\n");
  return 0;
}
"""


def _compiler() -> str | None:
    for c in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if c and shutil.which(c):
            return c
    return None


def test_amx_peak_loops_under_the_tile_model(tmp_path):
    cxx = _compiler()
    if cxx is None:
        pytest.skip("no C++ compiler")
    if not (ROOT / "tests" / "emulate" / "amx.h").exists():
        pytest.skip("no tile model")
    check = tmp_path / "check.cpp"
    check.write_text(CHECK)
    exe = tmp_path / "check"
    cmd = [cxx, "-O2", "-std=c++20", f"-I{ROOT / 'csrc'}", "-include", str(ROOT / "tests" / "emulate" / "amx.h"),
           str(ROOT / "csrc" / "cpu" / "peak_amx.cpp"), str(check), "-o", str(exe)]
    build = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-3000:]
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stdout + run.stderr
