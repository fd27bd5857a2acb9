"""Int8 Conv2d on ResNet-50 shapes: pysparse's int8 conv against torch's fp32 conv
(oneDNN, channels_last) and torch.ao's x86 static int8 conv (FBGEMM/oneDNN, NHWC).

    python -m pytest bench/bench_int8_conv2d.py --benchmark-only --benchmark-columns=median,iqr,rounds
    python bench/bench_int8_conv2d.py [--rounds 12] [--batches 1 8] [--clock wall|cpu] [--json out.json]

The script mode times the contenders interleaved call by call (pysparse.bench.timing), which
is what the ratios should come from on a shared machine; pytest-benchmark times one after the
other. Every contender computes the same layer (bias, no activation) on the same input,
and its output is checked against fp32 before timing.

Contenders (all at torch's thread count; set PYSPARSE_BENCH_THREADS / --threads):
- fp32: nn.Conv2d in eval, channels_last input (torch picks oneDNN).
- pysparse: Int8Conv2d (static per-tensor activation scale), float in -> float out: its time
  includes quantizing the input and dequantizing the output.
- ao_x86: torch.ao.nn.quantized.Conv2d with the x86 engine (7-bit activations, as its
  reduce_range qconfig), given an already quantized quint8 NHWC input and returning quint8 (how it runs inside a quantized model: no float
  round trip), so its time excludes what pysparse's includes.
- ao_x86_f32: the same plus quantize_per_tensor and dequantize (float in, float out).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable, Optional

import torch
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from pysparse.nn import Int8Conv2d  # noqa: E402


@dataclass(frozen=True)
class ConvCase:
    """One convolution: batch, input size, channels, kernel and stride (padding k // 2)."""

    name: str
    batch: int
    hw: int
    cin: int
    cout: int
    k: int
    stride: int = 1

    @property
    def macs(self) -> int:
        ho = (self.hw + 2 * (self.k // 2) - self.k) // self.stride + 1
        return self.batch * ho * ho * self.cout * self.cin * self.k * self.k


# ResNet-50's convolution shapes (the 3x3s of its four stages, and a bottleneck 1x1).
LAYERS = [("56x56 64->64 3x3", 56, 64, 64, 3), ("56x56 256->64 1x1", 56, 256, 64, 1),
          ("28x28 128->128 3x3", 28, 128, 128, 3), ("14x14 256->256 3x3", 14, 256, 256, 3),
          ("7x7 512->512 3x3", 7, 512, 512, 3)]


def cases(batches=(1, 8)) -> list[ConvCase]:
    """Every layer at every batch."""
    return [ConvCase(n, b, hw, ci, co, k) for b in batches for (n, hw, ci, co, k) in LAYERS]


def _ao_available() -> Optional[str]:
    if "x86" not in torch.backends.quantized.supported_engines:
        return f"torch has no x86 quantized engine ({torch.backends.quantized.supported_engines})"
    return None


def build(case: ConvCase, inp: str = "randn") -> tuple[torch.Tensor, torch.Tensor, dict[str, Callable[[], torch.Tensor]]]:
    """The input, the fp32 output, and each contender's call (float output). inp: "randn" (signed
    input: pysparse's VPSIGNB form on AVX2) or "relu" (relu(randn): what a conv after a ReLU sees,
    every conv of a ResNet but the stem: the unsigned VPMADDUBSW form)."""
    torch.manual_seed(0)
    conv = nn.Conv2d(case.cin, case.cout, case.k, case.stride, case.k // 2).eval()
    x = torch.randn(case.batch, case.cin, case.hw, case.hw).contiguous(memory_format=torch.channels_last)
    if inp == "relu":
        x = torch.relu(x)
    x_scale = float(x.abs().amax()) / 127
    with torch.no_grad():
        conv_cl = conv.to(memory_format=torch.channels_last)
        ref = conv_cl(x)
    calls: dict[str, Callable[[], torch.Tensor]] = {}

    def fp32():
        with torch.no_grad():
            return conv_cl(x)
    calls["fp32"] = fp32
    q = Int8Conv2d.from_float(conv, x_scale=x_scale)
    calls["pysparse"] = lambda: q(x)
    if _ao_available() is None:
        torch.backends.quantized.engine = "x86"
        import torch.ao.nn.quantized as nnq

        w = conv.weight.detach()
        ws = (w.abs().amax(dim=(1, 2, 3)) / 127).clamp_min(1e-12)
        wq = torch.quantize_per_channel(w, ws.double(), torch.zeros(case.cout, dtype=torch.long), 0, torch.qint8)
        y_scale = float(ref.abs().amax()) / 127
        qc = nnq.Conv2d(case.cin, case.cout, case.k, case.stride, case.k // 2)
        qc.set_weight_bias(wq, conv.bias.detach())
        qc.scale, qc.zero_point = y_scale, 128
        # 7-bit activations (quint8 in [0, 127]), as torch.ao's x86 qconfig does with
        # reduce_range=True: without VNNI its kernel sums u8 x s8 pairs in s16 (VPMADDUBSW),
        # which can saturate with full-range u8. Measured here on these layers: 10-11%
        # relative error with full-range u8, 2.0-2.4% with 7 bits; pysparse (exact int32
        # sums through VPMADDWD, 8-bit activations) 1.0-1.1%.
        # (a non-negative input: [0, amax] over the 128 levels, zero point 0)
        ao_scale, zp = (2 * float(x.abs().amax()) / 127, 64) if inp != "relu" else (float(x.amax()) / 127, 0)
        xq = torch.quantize_per_tensor(x, ao_scale, zp, torch.quint8)
        calls["ao_x86"] = lambda: qc(xq)
        calls["ao_x86_f32"] = lambda: qc(torch.quantize_per_tensor(x, ao_scale, zp, torch.quint8)).dequantize()
    return x, ref, calls


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    if y.is_quantized:
        y = y.dequantize()
    return float((y.float() - ref).norm() / ref.norm())


# ---------------------------------------------------------------- pytest-benchmark
try:
    import pytest

    @pytest.mark.parametrize("case", cases(), ids=lambda c: f"b{c.batch}-{c.name.replace(' ', '_')}")
    @pytest.mark.parametrize("contender", ["fp32", "pysparse", "ao_x86", "ao_x86_f32"])
    def test_int8_conv2d(benchmark, case: ConvCase, contender: str) -> None:
        if contender.startswith("ao") and _ao_available():
            pytest.skip(_ao_available())
        _, ref, calls = build(case)
        fn = calls[contender]
        # int8 weights and activations: ~1% relative error; 5% flags a broken contender
        assert rel_err(fn(), ref) < 0.05
        benchmark.group = f"int8_conv2d b{case.batch} {case.name}"
        benchmark.extra_info.update(contender=contender, threads=torch.get_num_threads(), macs=case.macs)
        benchmark(fn)
except ImportError:  # script mode without pytest
    pass


# ---------------------------------------------------------------- script mode
def time_cpu(items, rounds: int, calls: int = 3):
    """Process CPU time of single calls, contenders interleaved call by call, one thread."""
    from pysparse.bench.timing import Stats

    times = {t.name: [] for t in items}
    errs = {}
    for t in items:
        y = t.fn()
        errs[t.name] = t.check(y) if t.check else None
        t.fn()
    for _ in range(rounds):
        for _ in range(calls):
            for t in items:
                c = time.process_time()
                t.fn()
                times[t.name].append((time.process_time() - c) * 1e3)
    return {n: Stats.of(ts, errs[n]) for n, ts in times.items()}


def main(argv=None) -> int:
    from pysparse.bench.machine import cpu_model, versions
    from pysparse.bench.timing import Timed, TimingConfig, time_interleaved

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--threads", type=int, default=int(os.environ.get("PYSPARSE_BENCH_THREADS", "2")))
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--input", choices=["randn", "relu"], default="relu",
                    help="relu (default): relu(randn), what convs after a ReLU see; randn: signed input")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="cpu: one thread, process CPU time per call (interleaved, medians): robust when "
                         "other jobs share the cores, which make 2-thread wall times meaningless")
    args = ap.parse_args(argv)
    if args.clock == "cpu":
        args.threads = 1
    torch.set_num_threads(args.threads)
    cfg = TimingConfig(rounds=args.rounds)
    load0 = os.getloadavg()
    rows = []
    print(f"input={args.input} clock={args.clock} threads={args.threads} load={load0[0]:.2f} cpu={cpu_model()} isa={__import__('pysparse').cpu_info()['best_isa']}")
    hdr = f"{'layer':22s} {'b':>2s} {'fp32 ms':>9s} {'pysparse':>9s} {'ao_x86':>9s} {'ao f32io':>9s} " \
          f"{'fp32/ps':>8s} {'ao/ps':>7s} {'GMAC/s ps':>9s} {'err ps':>7s}"
    print(hdr + f" {'err ao':>7s}")
    with torch.no_grad():
        for case in cases(tuple(args.batches)):
            _, ref, calls = build(case, args.input)
            items = [Timed(n, f, check=lambda y: rel_err(y, ref)) for n, f in calls.items()]
            st = time_interleaved(items, cfg) if args.clock == "wall" else time_cpu(items, args.rounds)
            med = {n: s.median_ms for n, s in st.items()}
            row = dict(case=asdict(case), median_ms=med, iqr_ms={n: s.iqr_ms for n, s in st.items()},
                       err={n: s.error for n, s in st.items()})
            rows.append(row)
            ps = med["pysparse"]
            print(f"{case.name:22s} {case.batch:2d} {med['fp32']:9.3f} {ps:9.3f} {med.get('ao_x86', float('nan')):9.3f} "
                  f"{med.get('ao_x86_f32', float('nan')):9.3f} {med['fp32'] / ps:8.2f} "
                  f"{med.get('ao_x86', float('nan')) / ps:7.2f} {case.macs / ps / 1e6:9.1f} "
                  f"{st['pysparse'].error:7.4f} {st['ao_x86'].error if 'ao_x86' in st else float('nan'):7.4f}",
                  flush=True)
    load1 = os.getloadavg()
    print(f"load before {load0[0]:.2f}, after {load1[0]:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(date=time.strftime("%Y-%m-%d %H:%M:%S"), cpu=cpu_model(), versions=versions(),
                           threads=args.threads, clock=args.clock, input=args.input, load=[load0, load1], rows=rows),
                      f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
