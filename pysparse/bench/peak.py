"""Register-only instruction peaks, measured in each ``pysparse bench kernels`` run (as the
memory bandwidth is), and each pysparse kernel's MAC rate as a fraction of the peak of the
instruction its path uses.

The loops (csrc/cpu/peak*.cpp) run many independent accumulator chains with nothing but the
multiply instruction and a loop counter inside: VPMADDWD + VPADDD (the AVX2 int8 path),
VPDPBUSD zmm (AVX-512 VNNI), TDPBSSD (AMX int8), the fp32 FMA of each vector width,
VDPBF16PS and TDPBF16PS (bf16). One loop per thread, all threads at once (the rate with
every core busy, as a kernel on all threads runs), median of a few repetitions.
"""
from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field
from typing import Optional

from .. import ops

# The instruction each CPU kernel path multiplies with, by what its MACs multiply.
# "cpu-*-widen" kernels widen bf16 blocks to fp32 and use the fp32 FMA of their width.
# cpu-scalar and cpu-aten have no register-only peak here (None).
_PEAK_OF = {
    "int8": {"cpu-amx": "tdpbssd", "cpu-avx512": "vpdpbusd", "cpu-avx2": "vpmaddwd"},
    "fp32": {"cpu-avx512": "fma-avx512", "cpu-avx2": "fma-avx2"},
    "bf16": {"cpu-amx": "tdpbf16ps", "cpu-avx512bf16": "vdpbf16ps", "cpu-avx512-widen": "fma-avx512",
             "cpu-avx2-widen": "fma-avx2"},
}


def instruction_for(kernel: str, kind: str) -> Optional[str]:
    """The peak loop (a key of ``Peaks.instructions``) of the instruction ``kernel`` (a
    pysparse.ops.kernel_for name) multiplies ``kind`` ("int8", "fp32", "bf16") MACs with, or
    None where there is none (scalar, ATen)."""
    return _PEAK_OF.get(kind, {}).get(kernel)


@dataclass(frozen=True)
class Peak:
    """One instruction's register-only peak on ``threads`` threads at once, in MACs per
    second (one MAC = 2 ops). total: the MACs of all threads over the wall time from the
    first thread's start to the last one's end, median over repetitions; per_core: total /
    threads; reps: each repetition's total."""

    instruction: str
    kind: str
    macs_per_instruction: float
    threads: int
    total_macs_per_s: float
    per_core_macs_per_s: float
    reps_macs_per_s: list[float] = field(default_factory=list)
    slowest_thread_macs_per_s: float = 0.0  # median over repetitions of the slowest thread's own rate


@dataclass(frozen=True)
class Peaks:
    """Every peak this CPU runs, measured with ``threads`` threads, ``target_ms`` per loop."""

    threads: int
    target_ms: float
    repeats: int
    instructions: dict[str, Peak]

    def to_json(self) -> dict:
        """The JSON form stored in a results document under "peaks"."""
        return asdict(self)


def available_instructions() -> list[dict]:
    """The peak loops pysparse has: name, instruction, kind, macs_per_instruction, available."""
    return list(ops._C.peak_instructions())


def measure_peak(name: str, threads: int, target_ms: float = 30.0, repeats: int = 3) -> Peak:
    """The register-only peak of loop ``name`` (see available_instructions) on ``threads``
    threads at once, each loop sized to about ``target_ms``, ``repeats`` repetitions.
    ValueError for an unknown name, one this CPU cannot run, or a bad count."""
    info = {d["name"]: d for d in available_instructions()}.get(name)
    if info is None:
        raise ValueError(f"measure_peak: no peak loop named {name!r}; have {sorted(d['name'] for d in available_instructions())}")
    r = ops._C.measure_peak(name, int(threads), float(target_ms), int(repeats))
    total = [r["threads"] * r["macs_per_thread"] / w for w in r["wall_s"]]
    slowest = [r["macs_per_thread"] / s for s in r["slowest_thread_s"]]
    med = statistics.median(total)
    return Peak(info["instruction"], info["kind"], info["macs_per_instruction"], r["threads"], med,
                med / r["threads"], total, statistics.median(slowest))


def measure_peaks(threads: int, target_ms: float = 30.0, repeats: int = 3) -> Peaks:
    """Every peak loop this CPU (and OS) runs, on ``threads`` threads at once."""
    got = {d["name"]: measure_peak(d["name"], threads, target_ms, repeats)
           for d in available_instructions() if d["available"]}
    return Peaks(threads, target_ms, repeats, got)


def fraction_of_peak(macs: Optional[int], median_ms: float, peak: Optional[dict]) -> Optional[float]:
    """A kernel's achieved MAC rate (``macs`` in ``median_ms``) over a peak's total (a JSON
    peak entry), or None when either is missing."""
    if not macs or not peak or not peak.get("total_macs_per_s") or median_ms <= 0:
        return None
    return macs / (median_ms * 1e-3) / peak["total_macs_per_s"]


def fmt_ops(macs_per_s: float) -> str:
    """A MAC rate as ops per second (2 per MAC), "1.23 T" or "456 G"."""
    ops_ = 2 * macs_per_s
    return f"{ops_ / 1e12:.2f} T" if ops_ >= 1e12 else f"{ops_ / 1e9:.0f} G"


def summary(peaks: Optional[dict]) -> Optional[str]:
    """One line for a report header: each instruction's total and per-core peak (from a
    results document's "peaks" entry), or None for a document without peaks."""
    if not peaks or not peaks.get("instructions"):
        return None
    parts = [f"{p['instruction']} ({p['kind']}) {fmt_ops(p['total_macs_per_s'])} ops/s "
             f"({fmt_ops(p['per_core_macs_per_s'])} per core)" for p in peaks["instructions"].values()]
    n = peaks["threads"]
    return "; ".join(parts) + (f" (register-only loops on {n} threads at once)" if n > 1
                               else " (register-only loops on 1 thread)")
