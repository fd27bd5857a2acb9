#!/usr/bin/env python3
"""The one prepared check for a GPU machine (H100/H200; torch, triton, CUDA; no network,
nothing to install). `make gpu-check` builds the C++ extension in place and runs this;
`make gpu-check-dry` rehearses the whole script on the CPU (--dry: CPU tensors, Triton
interpreter, tiny shapes, a fake timer), and tests/test_gpu_check_dry.py runs that
rehearsal in `make test`.

Made for one chance: about 15 minutes of device time in all, at most 10 per command, and
only $OUT plus the last 12,000 characters of output come back.
- Everything goes under $OUT when it is set (else --out): gpu_check.json (rewritten as
  each section ends), gpu_check.log (the whole output, unbuffered) and gpu_check.md (the
  tables). A one-line-per-check summary is printed last, where the output tail shows it.
- --budget SECONDS (default 480) is checked before each check and each timing row; past
  it the rest is recorded as "skipped: budget" and the script ends cleanly.
- Sections, in order of value: int8 correctness, block-sparse correctness, int8 timings,
  block-sparse timings, compact conv (pysparse.ops_conv.compact_conv2d), the compacted
  ResNet-50 against cuDNN on the unpruned one, int8 conv, 2:4. A failing check or row is
  recorded and the run goes on; a failing section keeps what it had; a sticky CUDA error
  (illegal address, launch failure: the context is gone) is reported once and every later
  check is marked "not run: CUDA error".
- Correctness sections set PYSPARSE_TRITON_FIXED_CONFIG=1: one fixed config per M bucket,
  no autotuning (kernels/*.py); timing sections autotune.
- pytest is not run unless --pytest (CI runs the CPU and interpreter tests).

Cost of a full run, as `--dry` prints it ("compile estimate") and writes it to the JSON:
compile_estimate() walks the full plan's Triton launches (plan_launches: each launch's
kernel, constexprs, dtypes, the integer arguments Triton specializes on (== 1, % 16) and
the configs its tuning key prunes to: configs x shapes), and the dry rehearsal checks that
every kernel variant it really launched is among those counted.
  96 Triton compiles (was ~370): int8 correctness 26 and block-sparse correctness 28 (one
  fixed config per M bucket), int8 timings 10, block-sparse timings 32 (autotuned);
  76 autotune benchmarks in 20 tuning keys (was ~500); 202 timings.
Estimated wall time on an H200 (16 host cores), wall_estimate(): build ~90 s (setup.py
compiles nine ISA units one after another), imports ~10 s, 96 compiles x ~1.5 s = ~144 s
(the review measured 0.2-2.7 s per compile; scripts/aot_compile_check.py compiled all 175
kernel configurations for sm_90a here, 7.9 s mean at a load of 13 on 2 cores, i.e. about
1.3 s of one core; the 128-row tiles cost the most),
76 benchmarks x ~0.15 s = ~11 s (do_bench 25 ms warm-up + 100 ms), 202 timings x ~0.25 s
= ~50 s, two torch.compile(fullgraph=True) ~40 s, ResNet-50 prune + compact on the host
and its timings ~40 s, compact conv ~60 s (kernels/compact_conv2d.py autotunes 9 configs for
each of 1x1 / 3x3 and panel / K-major weights: ~36 compiles): ~446 s, 7.4 minutes, under the
8-minute target.
`make gpu-check` gives build + script 540 s (the script's --budget is what the build
left), so a slower machine stops cleanly with "skipped: budget" inside a 10-minute command.

Exit status: 0 when everything that ran passed (or no CUDA device: "no CUDA device:
skipped"), 1 when a check or a row failed, 2 when the setup (imports) failed.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import datetime
import io
import json
import math
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Optional

ROOT = Path(__file__).resolve().parent.parent
FIXED_ENV = "PYSPARSE_TRITON_FIXED_CONFIG"
U32 = 2.0 ** -24  # float32 unit roundoff
STICKY = ("illegal memory access", "unspecified launch failure", "device-side assert", "misaligned address",
          "illegal instruction", "CUDA error: an illegal", "cudaErrorLaunchFailure", "CUBLAS_STATUS_EXECUTION_FAILED")


# ------------------------------------------------------------------------------ the plan
@dataclasses.dataclass
class Plan:
    """Every shape the run uses. full(): the GPU run; dry(): the CPU rehearsal."""
    mm_shapes: list          # int8_mm_triton exactness (M, N, K)
    extremes_k: Optional[int]  # None: the kernels' MAX_K
    linear_shapes: list      # int8_linear CUDA vs CPU (M, K, N)
    int8_nk: list            # int8 timings (N, K)
    int8_ms: list
    bsr_check_nk: list       # block-sparse checks (N, K)
    bsr_check_ms: list       # rows of x in the block-sparse checks
    bsr_nk: int              # block-sparse timings K = N
    bsr_ms: list
    bsr_densities: list
    bsr_shapes: list         # (bn, bk) of the bf16 kernel, best kept per row
    conv_cases: list         # compact conv (N, C, H, W, kernel, stride)
    conv_keep: float
    resnet_input: int        # H = W
    resnet_batches: list
    torch_compile: bool

    @staticmethod
    def full() -> "Plan":
        return Plan(
            mm_shapes=[(1, 1, 1), (3, 17, 33), (17, 65, 130), (5, 9, 16384), (1, 4096, 4096), (16, 4096, 4096),
                       (17, 4096, 4096), (128, 11008, 4096), (2048, 4096, 4096), (300, 1000, 1000)],
            extremes_k=None,
            linear_shapes=[(5, 130, 70), (33, 4096, 1000), (1, 4096, 4096), (300, 1000, 520)],
            int8_nk=[(4096, 4096), (11008, 4096)], int8_ms=[1, 16, 128, 512, 2048],
            bsr_check_nk=[(130, 300), (1000, 4096)], bsr_check_ms=[1, 300],
            bsr_nk=4096, bsr_ms=[1, 16, 128, 512], bsr_densities=[0.05, 0.1, 0.25, 0.5],
            # The weight is pruned in 64 x 64 blocks, so each of these stores the same
            # nonzeros; a narrower bn gives decode (M <= 16) more programs: 4096 / 64 = 64
            # block rows would leave half of 132 SMs idle.
            bsr_shapes=[(64, 64), (32, 64), (16, 64)],
            # ResNet-50 layers at batch 8: a stage-1 3x3, a stage-3 1x1, a strided 3x3
            conv_cases=[(8, 64, 56, 56, 3, 1), (8, 1024, 14, 14, 1, 1), (8, 128, 56, 56, 3, 2)],
            conv_keep=0.5, resnet_input=224, resnet_batches=[1, 8], torch_compile=True)

    @staticmethod
    def dry() -> "Plan":
        return Plan(
            mm_shapes=[(1, 1, 1), (3, 17, 33), (17, 65, 130)], extremes_k=2048,
            linear_shapes=[(5, 130, 70)], int8_nk=[(64, 128)], int8_ms=[1, 17],
            bsr_check_nk=[(70, 130)], bsr_check_ms=[1, 6],
            bsr_nk=128, bsr_ms=[1, 17], bsr_densities=[0.25, 0.5], bsr_shapes=[(64, 64), (32, 64)],
            conv_cases=[(1, 16, 6, 6, 3, 1), (2, 16, 5, 5, 1, 2)], conv_keep=0.5,
            resnet_input=32, resnet_batches=[1, 2], torch_compile=False)


PLAN = Plan.full()
DEVICE = "cuda"
DRY = False
G = SimpleNamespace()  # the GPU ops: torch.ops.pysparse on CUDA; their Python CUDA kernels in --dry


def log(msg: str = "") -> None:
    print(msg, flush=True)


# ------------------------------------------------------------------------------ the run
class Tee(io.TextIOBase):
    """Writes to the terminal and the log file, flushing both on every write."""

    def __init__(self, stream, f):
        self.stream, self.f = stream, f

    def write(self, s):
        self.stream.write(s)
        self.stream.flush()
        self.f.write(s)
        self.f.flush()
        return len(s)

    def flush(self):
        self.stream.flush()
        self.f.flush()


class Budget(Exception):
    """Raised inside a section when the run's time budget is spent."""


class Run:
    """The report, the clock, the budget and the sticky-error state of one run."""

    def __init__(self, out_dir: Path, budget_s: float, clock: Callable[[], float] = time.monotonic):
        self.out_dir, self.budget_s, self.clock = out_dir, budget_s, clock
        self.t0 = clock()
        self.dead: Optional[str] = None  # the sticky CUDA error, once seen
        self.report: dict = {"sections": {}}
        self.sections: list["Section"] = []
        self.inject: dict = {}

    def elapsed(self) -> float:
        return self.clock() - self.t0

    def over_budget(self) -> bool:
        return self.elapsed() > self.budget_s

    def write(self) -> None:
        self.report["seconds"] = round(self.elapsed(), 1)
        self.report["sections"] = {s.name: s.as_dict() for s in self.sections}
        self.report["status"] = self.status()
        p = self.out_dir / "gpu_check.json"
        tmp = p.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.report, indent=2, default=str))
        tmp.replace(p)
        (self.out_dir / "gpu_check.md").write_text(
            "\n\n".join(f"## {s.title}\n\n" + "\n\n".join(s.tables) for s in self.sections if s.tables) + "\n")

    def status(self) -> int:
        bad = any(c["status"] == "FAIL" for s in self.sections for c in s.checks) or \
            any(r.get("status") == "FAIL" for s in self.sections for r in s.rows) or \
            any(s.status == "FAIL" for s in self.sections) or self.dead is not None
        return 1 if bad else 0

    def saw_error(self, where: str, e: BaseException) -> None:
        """Mark the run dead if e is (or left behind) a sticky CUDA error: the context is
        gone, so every later launch would fail too (reported once, here)."""
        if self.dead:
            return
        msg = f"{type(e).__name__}: {e}"
        sticky = any(k in msg for k in STICKY) or "inject-sticky" in msg
        if not sticky and DEVICE == "cuda":
            import torch
            try:
                torch.cuda.synchronize()
            except Exception as e2:
                sticky, msg = True, f"{msg} (then synchronize: {type(e2).__name__}: {e2})"
        if sticky:
            self.dead = f"{where}: {msg.splitlines()[0]}"
            log(f"!! sticky CUDA error in {where}: {msg.splitlines()[0]}; everything after is not run")


class Section:
    """One section: guarded checks and timing rows, its tables, its JSON."""

    def __init__(self, run: Run, name: str, title: str):
        self.run, self.name, self.title = run, name, title
        self.checks: list[dict] = []
        self.rows: list[dict] = []
        self.tables: list[str] = []
        self.status = "running"
        self.detail = ""
        self.extra: dict = {}
        self.t0 = run.clock()

    def as_dict(self) -> dict:
        return {"title": self.title, "status": self.status, "detail": self.detail, "checks": self.checks,
                "rows": self.rows, "tables": self.tables, **self.extra,
                "seconds": round(self.run.clock() - self.t0, 2)}

    def _gate(self) -> Optional[str]:
        if self.run.dead:
            return f"not run: CUDA error ({self.run.dead})"
        if self.run.over_budget():
            return "skipped: budget"
        return None

    def check(self, name: str, fn: Callable[[], Any]) -> bool:
        t0 = self.run.clock()
        why = self._gate()
        if why:
            self.checks.append({"name": name, "status": why, "detail": "", "seconds": 0.0})
            log(f"  [{why}] {name}")
            if why == "skipped: budget":
                raise Budget()
            return False
        try:
            if self.run.inject.get(self.name) == "check":
                raise AssertionError("injected check failure (--inject)")
            detail, status = fn() or "", "ok"
            if isinstance(detail, tuple):  # (status, detail): a check that did not apply
                status, detail = detail
        except Exception as e:  # record and go on: every check is independent
            status, detail = "FAIL", f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=4)}"
            self.run.saw_error(f"{self.name}/{name}", e)
        dt = self.run.clock() - t0
        self.checks.append({"name": name, "status": status, "detail": str(detail), "seconds": round(dt, 2)})
        first = str(detail).splitlines()[0] if detail else ""
        log(f"  [{status}] {name} ({dt:.1f} s) {first}")
        return status == "ok"

    def row(self, label: str, fn: Callable[[], dict]) -> Optional[dict]:
        why = self._gate()
        if why:
            self.rows.append({"label": label, "status": why})
            if why == "skipped: budget":
                raise Budget()
            return None
        try:
            r = fn()
            r.setdefault("status", "ok")
        except Exception as e:
            r = {"status": "FAIL", "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
            log(f"    row {label} FAILED: {r['error']}")
            self.run.saw_error(f"{self.name}/{label}", e)
        r["label"] = label
        self.rows.append(r)
        return r

    def table(self, text: str) -> None:
        self.tables.append(text)


def run_section(run: Run, name: str, title: str, fn: Callable[[Section], None]) -> Section:
    s = Section(run, name, title)
    run.sections.append(s)
    log(f"\n## {title}")
    why = s._gate()
    if why:
        s.status = why
        log(f"  [{why}]")
        run.write()
        return s
    try:
        if run.inject.get(name) == "raise":
            raise RuntimeError("injected section failure (--inject)")
        if run.inject.get(name) == "sticky":
            raise RuntimeError("CUDA error: an illegal memory access was encountered (inject-sticky)")
        fn(s)
        if s.status == "running":
            s.status = "done"
    except Budget:
        s.status = "skipped: budget"
        log("  [skipped: budget] the rest of this section and the sections after it")
    except Exception as e:  # keep what the section had; the next section runs
        s.status, s.detail = "FAIL", f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=6)}"
        log(f"  section FAILED: {type(e).__name__}: {e}")
        run.saw_error(name, e)
    if s.status == "done" and any(c["status"] == "FAIL" for c in s.checks):
        s.status = "done, with failures"
    for t in s.tables:
        log("\n" + t)
    run.write()
    return s


# ------------------------------------------------------------------------------ timing
_FAKE_MS = [0]


def time_ms(fn: Callable[[], Any], graph: bool = False) -> Optional[float]:
    """Median ms of fn (triton.testing.do_bench, or do_bench_cudagraph: no launch
    overhead); None (and a log line) when it fails. --dry: fn runs once and a fake,
    deterministic time comes back."""
    if DRY:
        fn()
        _FAKE_MS[0] += 1
        return 0.5 + (_FAKE_MS[0] * 37 % 11) / 10
    import torch
    import triton.testing as tt
    try:
        fn()
        torch.cuda.synchronize()  # the first call autotunes; keep it out of the timing
        if graph:
            return tt.do_bench_cudagraph(fn, return_mode="median")
        return tt.do_bench(fn, return_mode="median")
    except Exception as e:
        msg = f"{type(e).__name__}: {e}"
        log(f"    timing failed: {msg.splitlines()[0]}")
        if any(k in msg for k in STICKY):
            raise  # the row guard marks the run dead
        return None


def speedup(base: Optional[float], ms: Optional[float]) -> Optional[float]:
    return round(base / ms, 3) if base and ms else None


def fmt(v, nd=4):
    return "-" if v is None else f"{v:.{nd}f}"


def cell(ms: Optional[float], sp: Optional[float]) -> str:
    """A timing cell: ms and its speedup; never raises on a missing time or baseline."""
    if ms is None:
        return "n/a"
    return f"{ms:.4f} ({sp:.2f}x)" if sp is not None else f"{ms:.4f}"


def ratio(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.2f}x"


def _fixed(on: bool) -> None:
    if on:
        os.environ[FIXED_ENV] = "1"
    else:
        os.environ.pop(FIXED_ENV, None)


# ------------------------------------------------------------------------------ helpers
def rand_i8(*shape, device=None):
    import torch
    t = torch.randint(-128, 128, shape, dtype=torch.int8).to(device or DEVICE)
    if t.numel():
        t.view(-1)[0] = -128
    return t


def exact_ref_mm(a, w):
    """Integer reference: a float64 GEMM of int8 values is exact (|sum| < 2**53)."""
    import torch
    return (a.double() @ w.double().T).to(torch.int64)


def same_bits(y, ref) -> tuple[bool, float]:
    """(equal bit for bit up to NaN payloads, max |difference| over finite entries)."""
    import torch
    y, ref = y.cpu(), ref.cpu()
    nan_same = torch.equal(torch.isnan(y), torch.isnan(ref))
    fin = ~torch.isnan(ref)
    eq = nan_same and torch.equal(y[fin], ref[fin])
    diff = (y[fin].double() - ref[fin].double()).abs().max().item() if fin.any() else 0.0
    return eq, diff


def rel_err(y, ref) -> float:
    y, ref = y.float(), ref.float()
    return ((y - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def fp32_sum_bound(x, w, bias):
    """Elementwise bound on |float32 x @ w^T + bias - exact| for any summation order:
    (K + 2) u (|x| @ |w|^T + |bias|) (gamma_K for the sum, one rounding for the bias)."""
    K = x.shape[-1]
    mag = x.reshape(-1, K).double().abs() @ w.double().abs().T
    if bias is not None:
        mag = mag + bias.double().abs()
    return (K + 2) * U32 * mag


def has_gpu_kernel(op: str, module: Optional[str]) -> bool:
    """Whether pysparse::<op> has a GPU kernel: its Triton module kernels/<module>.py exists
    (the op's wrapper may route CUDA tensors to it) or, on a GPU, a kernel is registered
    for CUDA."""
    import torch
    if module is not None and (ROOT / "kernels" / f"{module}.py").is_file():
        return True
    return not DRY and torch._C._dispatch_has_kernel_for_dispatch_key(f"pysparse::{op}", "CUDA")


# ------------------------------------------------------------------------------ 1. int8 correctness
def sec_int8_correctness(s: Section) -> None:
    import torch
    ops = torch.ops.pysparse
    K8 = s.run.K8
    _fixed(True)
    torch.manual_seed(0)

    def mm_shapes():
        for M, N, K in PLAN.mm_shapes:
            a, w = rand_i8(M, K), rand_i8(N, K)
            if not torch.equal(K8.int8_mm_triton(a, w).to(torch.int64), exact_ref_mm(a, w)):
                raise AssertionError(f"int8_mm_triton differs from the exact reference at M,N,K={M},{N},{K}")
        return f"{len(PLAN.mm_shapes)} shapes exact"
    s.check("int8_mm_triton exact (M=1..2048, K up to 16384)", mm_shapes)

    def mm_extremes():
        K = PLAN.extremes_k or K8.MAX_K
        a = torch.full((1, K), -128, dtype=torch.int8, device=DEVICE)
        w = torch.stack([torch.full((K,), -128, dtype=torch.int8, device=DEVICE),
                         torch.full((K,), 127, dtype=torch.int8, device=DEVICE)])
        got = K8.int8_mm_triton(a, w)[0].tolist()
        if got != [16384 * K, -128 * 127 * K]:
            raise AssertionError(f"extremes at K={K}: {got}")
        return f"K={K}: {got}"
    s.check("int8_mm_triton extremes at MAX_K", mm_extremes)

    def strided():
        a_big, w_big = rand_i8(9, 200), rand_i8(21, 128)
        a, w = a_big[:, ::2], w_big[:, :100]
        if not torch.equal(K8.int8_mm_triton(a, w).to(torch.int64), exact_ref_mm(a, w)):
            raise AssertionError("strided operands")
    s.check("int8_mm_triton strided operands", strided)

    def op_mm():
        a, w = rand_i8(33, 1000), rand_i8(70, 1000)
        p, cs = G.int8_pack(w, 0)
        got = G.int8_mm(a, p, cs, 70, 1000).cpu()
        ref = ops.int8_mm(a.cpu(), *ops.int8_pack(w.cpu(), 0), 70, 1000)
        if not torch.equal(got, ref):
            raise AssertionError("pysparse::int8_mm CUDA != CPU")
    s.check("pysparse::int8_mm CUDA == CPU", op_mm)

    def pack_roundtrip():
        w = rand_i8(70, 130)
        for g in (0, 64, 128):
            p, cs = G.int8_pack(w, g)
            if not torch.equal(G.int8_unpack(p, cs, 70, 130), w):
                raise AssertionError(f"unpack(pack(w)) != w for group_size={g}")
            if not torch.equal(cs.cpu(), ops.int8_pack(w.cpu(), g)[1]):
                raise AssertionError(f"colsum CUDA != CPU for group_size={g}")
    s.check("int8_pack / int8_unpack round trip, colsum", pack_roundtrip)

    def linear_vs_cpu():
        notes, all_exact = [], True
        # every dtype and bias on the edge shape and decode; bf16 on the others (each
        # (dtype, bias, M bucket) is one compile)
        for i, (M, K, N) in enumerate(PLAN.linear_shapes):
            w = rand_i8(N, K)
            Np = (N + 63) // 64 * 64
            ws = torch.ones(1, Np, device=DEVICE)
            ws[0, :N] = torch.rand(N, device=DEVICE) * 0.01 + 1e-4
            bias = torch.randn(N, device=DEVICE)
            p, cs = G.int8_pack(w, 0)
            pc, csc = ops.int8_pack(w.cpu(), 0)
            for dtype in ((torch.float32, torch.bfloat16, torch.float16) if i in (0, 2) else (torch.bfloat16,)):
                x = (torch.randn(M, K, device=DEVICE) * 3).to(dtype)
                if M >= 4:
                    x[1] = 0
                    x[2, 3] = float("nan")
                    x[3, 5] = float("inf")
                for x_scale in (None, torch.tensor([0.05], device=DEVICE)):
                    for b in (None, bias):
                        y = G.int8_linear(x, p, cs, ws, b, x_scale, N, K)
                        ref = ops.int8_linear(x.cpu(), pc, csc, ws.cpu(), None if b is None else b.cpu(),
                                              None if x_scale is None else x_scale.cpu(), N, K)
                        eq, diff = same_bits(y, ref)
                        if not eq:
                            all_exact = False
                            fin = ~torch.isnan(ref)
                            scale = ref[fin].abs().max().item() if fin.any() else 1.0
                            notes.append(f"M,K,N={M},{K},{N} {dtype} static={x_scale is not None} "
                                         f"bias={b is not None}: max|diff|={diff:.3g} (max|y|={scale:.3g})")
                            tol = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-3}[dtype]
                            if diff > tol * max(scale, 1.0):
                                raise AssertionError("; ".join(notes))
        return "bit-exact" if all_exact else "close, NOT bit-exact: " + "; ".join(notes[:5])
    s.check("pysparse::int8_linear CUDA vs CPU op (3 dtypes, dynamic/static, bias)", linear_vs_cpu)

    def grouped():
        import warnings
        N, K, g = 96, 1000, 128
        w = rand_i8(N, K)
        p, cs = G.int8_pack(w, g)
        Gn = cs.shape[0]
        ws = torch.ones(Gn, 128, device=DEVICE)
        ws[:, :N] = torch.rand(Gn, N, device=DEVICE) * 0.01 + 1e-4
        x = torch.randn(9, K, device=DEVICE, dtype=torch.bfloat16)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            y = G.int8_linear(x, p, cs, ws, None, None, N, K)
        ref = ops.int8_linear(x.cpu(), *ops.int8_pack(w.cpu(), g), ws.cpu(), None, None, N, K)
        eq, diff = same_bits(y, ref)
        if diff > 1e-2 * max(ref.abs().max().item(), 1.0):
            raise AssertionError(f"grouped CUDA vs CPU: max|diff|={diff}")
        return "bit-exact" if eq else f"close (max|diff|={diff:.3g})"
    s.check("grouped weights (PyTorch fallback) CUDA vs CPU", grouped)

    def module():
        from pysparse.nn import Int8Linear
        m = Int8Linear.from_float(torch.nn.Linear(300, 130))
        x = torch.randn(4, 7, 300)
        ref = m(x)
        m = m.to(DEVICE)
        y = m(x.to(DEVICE))
        eq, diff = same_bits(y, ref)
        if diff > 1e-4 * max(ref.abs().max().item(), 1.0):
            raise AssertionError(f"Int8Linear CUDA vs CPU: max|diff|={diff}")
        if not torch.equal(m.cpu()(x), ref):
            raise AssertionError("Int8Linear moved CUDA -> CPU changed its output")
        return ("bit-exact" if eq else f"close (max|diff|={diff:.3g})") + f"; {m.extra_repr()}"
    s.check("pysparse.nn.Int8Linear .cuda() and back", module)

    def compiled():
        if not PLAN.torch_compile:
            return "not run: dry run", "inductor is too slow for the rehearsal"
        from pysparse.nn import Int8Linear
        m = Int8Linear.from_float(torch.nn.Linear(256, 64)).to(DEVICE)
        x = torch.randn(8, 256, device=DEVICE, dtype=torch.bfloat16)
        ref = m(x)
        if not torch.equal(torch.compile(m, fullgraph=True)(x), ref):
            raise AssertionError("torch.compile(fullgraph=True) output differs from eager")
    s.check("torch.compile(fullgraph=True) of Int8Linear on CUDA", compiled)


# ------------------------------------------------------------------------------ 2. block-sparse correctness
def sec_bsr_correctness(s: Section) -> None:
    import warnings

    import torch
    import pysparse
    from pysparse.nn import BlockSparseLinear
    _fixed(True)
    torch.manual_seed(0)
    # One rounding to the output dtype: at most 2**-11 (fp16) / 2**-8 (bf16) of |y|, taken
    # twice over; below fp16's normal range the spacing is absolute, 2**-24.
    ulp = {torch.float32: 0.0, torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}
    tiny = {torch.float32: 1e-38, torch.float16: 2.0 ** -24, torch.bfloat16: 1e-38}
    nk = PLAN.bsr_check_nk
    # x: decode (M = 1) and a batch with two leading dims (3 x 100 rows: the prefill tile).
    # Each (dtype, block, bias / ReLU, M bucket) is one compile, so not every dtype meets
    # every block: every dtype on the first case, fewer on the others.
    ms = PLAN.bsr_check_ms
    shapes = lambda K: [(ms[0], K), (3, ms[1] // 3, K)]  # noqa: E731
    gpu = DEVICE == "cuda"
    f32, f16, bf16 = torch.float32, torch.float16, torch.bfloat16

    def float_blocks():
        notes, worst = [], 0.0
        (n0, k0), (n1, k1) = nk[0], nk[-1]
        # (off the GPU the layer runs the CPU op, which takes float32 blocks only)
        cases = [(n0, k0, (64, 32), None, (f32, f16, bf16) if gpu else (f32,)),
                 (n1, k1, (64, 64), "relu", (f32, bf16) if gpu else (f32,)), (n0, k0, (16, 16), None, (f32,))]
        for N, K, blk, act, dtypes in cases:
            lin = torch.nn.Linear(K, N)
            m = pysparse.sparsify(lin, 0.75, block=blk, dispatch="sparse")  # prunes lin in place too
            if act:
                m = BlockSparseLinear.from_dense(lin, block=blk, activation=act, dispatch="sparse")
            assert m.format == "bsr", m.format
            w = m.dense_weight().float()
            for dtype in dtypes:
                md = copy.deepcopy(m).to(DEVICE)
                md = md.half() if dtype == torch.float16 else md.bfloat16() if dtype == torch.bfloat16 else md
                b = md.bias.detach().cpu()
                for shape in shapes(K):
                    x = torch.randn(shape)
                    y = md(x.to(DEVICE, dtype)).cpu()
                    xr, wr = x.to(dtype).double(), w.to(dtype).double()
                    ref = xr.reshape(-1, K) @ wr.T + b.double()
                    if act:
                        ref = ref.relu()
                    bound = fp32_sum_bound(xr, wr, b) + ulp[dtype] * ref.abs() + tiny[dtype]
                    err = (y.reshape(ref.shape).double() - ref).abs()
                    if y.dtype != dtype or y.shape != (*shape[:-1], N) or not bool((err <= bound).all()):
                        raise AssertionError(f"N,K={N},{K} block={blk} {dtype} x{tuple(shape)}: "
                                             f"max err/bound {(err / bound).max().item():.3g}")
                    worst = max(worst, (err / bound).max().item())
            notes.append(f"{N}x{K}/{blk[0]}x{blk[1]}")
        return f"within bound (worst err/bound {worst:.2f}): {', '.join(notes)}; fp32/fp16/bf16 blocks"
    s.check("BlockSparseLinear bsr .to(GPU)/.half()/.bfloat16() vs dense masked weight", float_blocks)

    def small_block_fallback():
        N, K = nk[0]
        lin = torch.nn.Linear(K, N)
        m = pysparse.sparsify(lin, 0.5, block=(16, 8), dispatch="sparse")
        w = m.dense_weight()
        m = m.to(DEVICE)
        x = torch.randn(5, K)
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            y = m(x.to(DEVICE)).cpu()
        ref = (x.double() @ w.double().T + lin.bias.detach().double())
        bound = fp32_sum_bound(x, w, lin.bias.detach()) + 1e-30
        if not bool(((y.double() - ref).abs() <= bound).all()):
            raise AssertionError("dense fallback out of bound")
        said = [str(r.message) for r in rec if "Triton" in str(r.message)]
        return (said[0][:90] + "...") if said else "no warning (already warned, or the CPU op)"
    s.check("bsr_linear 16x8 blocks: dense fallback on CUDA", small_block_fallback)

    def int8_blocks():
        notes, all_exact = [], True
        for i, (N, K) in enumerate(nk):
            lin = torch.nn.Linear(K, N)
            m = pysparse.sparsify(lin, 0.75, dtype=torch.int8, dispatch="sparse")
            assert m.format == "bsr-int8", m.format
            md = copy.deepcopy(m).to(DEVICE)
            if DEVICE == "cuda" and (tuple(md.values.shape[1:]) != (64, 64) or md.values.stride(2) != 1):
                raise AssertionError(f"values not K-major on the GPU: {tuple(md.values.shape)}")
            wdq, b = m.dense_weight().double(), m.bias_f32.double()
            for dtype in ((f32, bf16, f16) if i == 0 else (bf16,)):
                for shape in shapes(K):
                    x = (torch.randn(shape) * 3).to(dtype)
                    ref_cpu = m(x)  # the C++ CPU op
                    y = md(x.to(DEVICE))
                    eq, diff = same_bits(y, ref_cpu)
                    if not eq:
                        all_exact = False
                        notes.append(f"{N}x{K} {dtype} x{tuple(shape)}: max|diff| {diff:.3g}")
                        if diff > 1e-2 * max(ref_cpu.abs().max().item(), 1.0):
                            raise AssertionError("; ".join(notes))
                    # Dense masked reference: per-row activation rounding is at most s_x / 2
                    # per element, so |y - ref| <= s_x / 2 * sum_k |w_k|; plus the float32
                    # epilogue (8u of the magnitudes) and the output rounding.
                    x2 = x.reshape(-1, K).double()
                    ref = x2 @ wdq.T + b
                    sx = x2.abs().amax(1, keepdim=True) / 127
                    qerr = sx / 2 * wdq.abs().sum(1)
                    mag = (x2.abs() + sx / 2) @ wdq.abs().T + b.abs()
                    bound = qerr + 8 * U32 * mag + ulp[dtype] * (ref.abs() + qerr) + tiny[dtype]
                    if not bool(((y.cpu().reshape(ref.shape).double() - ref).abs() <= bound).all()):
                        raise AssertionError(f"{N}x{K} {dtype}: off the dense masked reference")
            x = torch.randn(3, K)
            if not torch.equal(md.cpu()(x), m(x)):
                raise AssertionError("BlockSparseLinear int8 moved GPU -> CPU changed its output")
        return ("bit-exact vs CPU op" if all_exact else "close to CPU op, NOT bit-exact: " + "; ".join(notes[:4])) + \
            "; within the quantization bound of the dense masked weight"
    s.check("BlockSparseLinear bsr-int8 .to(GPU) vs CPU op and dense masked weight", int8_blocks)

    def int8_op_direct():
        # the op on the GPU layout against the C++ op on the CPU layout, bit for bit
        from pysparse import formats
        N, K = nk[0]
        w = torch.randn(N, K) * (torch.rand(N, K) < 0.5)
        p = formats.pack_bsr_int8(w)
        x = torch.randn(5, K)
        y = G.bsr_int8_linear(x.to(DEVICE), formats.int8_blocks_to_kmajor(p.values).to(DEVICE),
                              p.layout.row_ptr.to(DEVICE), p.layout.col_idx.to(DEVICE), p.colsum.to(DEVICE),
                              p.w_scale.to(DEVICE), None, None, N, K)
        ref = torch.ops.pysparse.bsr_int8_linear(x, p.values, p.layout.row_ptr, p.layout.col_idx, p.colsum,
                                                 p.w_scale, None, None, N, K)
        if not same_bits(y, ref)[0]:
            raise AssertionError("bsr_int8_linear on K-major GPU blocks != CPU op")
        return "bit-exact"
    s.check("pysparse::bsr_int8_linear K-major GPU blocks == CPU op", int8_op_direct)

    def built_on_gpu():
        N, K = nk[0]
        lin = torch.nn.Linear(K, N, bias=False)
        pysparse.sparsify(lin, 0.75, block=(64, 64), dispatch="sparse")
        x = torch.randn(9, K)
        done = []
        for dtype in ((torch.float16, torch.bfloat16, torch.int8) if DEVICE == "cuda" else (torch.int8,)):
            mg = pysparse.sparsify(copy.deepcopy(lin).to(DEVICE), 0.0, block=(64, 64), dtype=dtype,
                                   dispatch="sparse")
            mc = pysparse.sparsify(copy.deepcopy(lin), 0.0, block=(64, 64),
                                   dtype=torch.int8 if dtype == torch.int8 else None, dispatch="sparse").to(DEVICE)
            if dtype != torch.int8:
                mc.values.data = mc.values.data.to(dtype)
            xd = x.to(DEVICE, torch.bfloat16 if dtype == torch.int8 else dtype)
            if mg.values.device != xd.device or not torch.equal(mg(xd), mc(xd)):
                raise AssertionError(f"{dtype}: built on {DEVICE} != built on the CPU and moved")
            done.append(str(dtype).split(".")[-1])
        return "equal: " + ", ".join(done)
    s.check("sparsify(GPU layer, dtype=fp16/bf16/int8) == CPU-built layer moved", built_on_gpu)

    def bf16_cpu_layer_moved():
        N, K = nk[0]
        m = pysparse.sparsify(torch.nn.Linear(K, N), 0.75, dtype=torch.bfloat16, dispatch="sparse")
        md = copy.deepcopy(m).to(DEVICE)
        if DEVICE == "cuda" and md.values.dim() != 3:
            raise AssertionError(f"bf16 values not k-major on the GPU: {tuple(md.values.shape)}")
        x = torch.randn(7, K).bfloat16()
        y, ref = md(x.to(DEVICE)).cpu().double(), m(x).double()
        if not bool(((y - ref).abs() <= 2.0 ** -6 * ref.abs() + 1e-2).all()):
            raise AssertionError("bf16 layer on the GPU differs from the CPU one")
        if not torch.equal(md.cpu().values, m.values):
            raise AssertionError("bf16 blocks moved GPU -> CPU changed")
        return "same output within bf16 rounding; blocks round-trip bit for bit"
    s.check("BlockSparseLinear bf16 blocks built on the CPU, moved to the GPU and back", bf16_cpu_layer_moved)

    def backward_on_gpu():
        N, K = nk[0]
        m = pysparse.sparsify(torch.nn.Linear(K, N), 0.75, dispatch="sparse")
        md = copy.deepcopy(m).to(DEVICE)
        x, g = torch.randn(33, K), torch.randn(33, N)
        grads = []
        for mod, dev in ((m, "cpu"), (md, DEVICE)):
            xi = x.to(dev).requires_grad_(True)
            (mod(xi) * g.to(dev)).sum().backward()
            grads.append((xi.grad.cpu(), mod.values.grad.cpu(), mod.bias.grad.cpu()))
        for a, b, name in zip(grads[0], grads[1], ("x", "values", "bias")):
            if not torch.allclose(a, b, rtol=1e-4, atol=1e-4):
                raise AssertionError(f"grad of {name} on {DEVICE} differs from the CPU's")
        return "grads of x, blocks and bias match the CPU kernels"
    s.check("BlockSparseLinear backward on CUDA vs CPU", backward_on_gpu)

    def compiled():
        if not PLAN.torch_compile:
            return "not run: dry run", "inductor is too slow for the rehearsal"
        lin = torch.nn.Linear(256, 192)
        for m, dtype in ((pysparse.sparsify(copy.deepcopy(lin), 0.5, block=(64, 64), dispatch="sparse"), torch.bfloat16),
                         (pysparse.sparsify(copy.deepcopy(lin), 0.5, dtype=torch.int8, dispatch="sparse"), torch.float16)):
            m = m.to(DEVICE)
            if m.format == "bsr":
                m = m.to(dtype)
            x = torch.randn(8, 256, device=DEVICE, dtype=dtype)
            with torch.no_grad():
                ref = m(x)
                y = torch.compile(m, fullgraph=True)(x)
            if not torch.equal(y, ref):
                raise AssertionError(f"{m.format}: torch.compile(fullgraph=True) output differs from eager")
        return "bsr (bf16) and bsr-int8 equal eager"
    s.check("torch.compile(fullgraph=True) of BlockSparseLinear on CUDA", compiled)


# ------------------------------------------------------------------------------ 3. int8 timings
def int8_table(rows) -> str:
    head = ("| M | N | K | int8 op ms | int8 op (graph) ms | int8 GEMM ms | bf16 cuBLAS ms | _int_mm ms "
            "| op vs bf16 | GEMM vs bf16 |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        if r.get("status") != "ok":
            lines.append(f"| {r['label']} | {r.get('status')} {r.get('error', '')} |")
            continue
        lines.append(f"| {r['M']} | {r['N']} | {r['K']} | {fmt(r['int8_op_ms'])} | {fmt(r['int8_op_graph_ms'])} "
                     f"| {fmt(r['int8_gemm_ms'])} | {fmt(r['bf16_ms'])} | {fmt(r['int_mm_ms'])} "
                     f"| {ratio(r['int8_op_speedup_vs_bf16'])} "
                     f"| {ratio(r['int8_gemm_speedup_vs_bf16'])} |")
    return "\n".join(lines)


def sec_int8_timing(s: Section) -> None:
    import torch
    import torch.nn.functional as F
    K8 = s.run.K8
    _fixed(False)
    torch.manual_seed(0)
    try:
        for N, K in PLAN.int8_nk:
            w = torch.randn(N, K, device=DEVICE)
            sc = w.abs().amax(dim=1) / 127
            w_q = torch.round(w / sc[:, None]).clamp(-127, 127).to(torch.int8)
            w_bf16 = w.to(torch.bfloat16)
            packed, colsum = G.int8_pack(w_q, 0)
            w_scale = torch.ones(1, colsum.shape[1], device=DEVICE)
            w_scale[0, :N] = sc
            for M in PLAN.int8_ms:
                def one(M=M):
                    x = torch.randn(M, K, device=DEVICE, dtype=torch.bfloat16)
                    x_scale = x.float().abs().amax(dim=1) / 127
                    x_q = torch.round(x.float() / x_scale[:, None]).clamp(-128, 127).to(torch.int8)
                    op = lambda: G.int8_linear(x, packed, colsum, w_scale, None, None, N, K)  # noqa: E731
                    r = {"M": M, "N": N, "K": K}
                    r["int8_op_ms"] = time_ms(op)
                    r["int8_op_graph_ms"] = time_ms(op, graph=True)
                    r["int8_gemm_ms"] = time_ms(lambda: K8.int8_linear_triton(x_q, x_scale, w_q, sc, None,
                                                                              torch.bfloat16))
                    r["bf16_ms"] = time_ms(lambda: F.linear(x, w_bf16))
                    r["int_mm_ms"] = time_ms(lambda: torch._int_mm(x_q, w_q.t())) if M > 16 and not DRY else None
                    for k in ("int8_op", "int8_gemm"):
                        r[f"{k}_speedup_vs_bf16"] = speedup(r["bf16_ms"], r[f"{k}_ms"])
                    log(f"  M={M:5d} N={N:5d} K={K}: " + ", ".join(
                        f"{k}={v:.4f}" for k, v in r.items() if k.endswith("_ms") and v is not None))
                    return r
                s.row(f"M={M} N={N} K={K}", one)
    finally:
        s.extra["autotune"] = {str(k): str(v) for k, v in getattr(K8._int8_gemm_kernel, "cache", {}).items()}
        s.table(int8_table(s.rows))


# ------------------------------------------------------------------------------ 4. block-sparse timings
def block_pruned(N, K, density, gen, block=64):
    """float32 [N, K] on DEVICE with round(density * blocks) random nonzero 64 x 64 blocks."""
    import torch
    R, KB = -(-N // block), -(-K // block)
    keep = torch.zeros(R * KB, dtype=torch.bool)
    keep[torch.randperm(R * KB, generator=gen)[:max(1, round(density * R * KB))]] = True
    mask = keep.view(R, 1, KB, 1).expand(R, block, KB, block).reshape(R * block, KB * block)[:N, :K]
    return (torch.randn(N, K, generator=gen) * 0.02 * mask).to(DEVICE)


def bsr_table(rows) -> str:
    head = "| M | density | cuBLAS bf16 ms | BSR bf16 (block) | BSR bf16 graph | BSR int8 | torch BSR | _int_mm |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        if r.get("status") != "ok":
            lines.append(f"| {r['label']} | {r.get('status')} {r.get('error', '')} |")
            continue
        lines.append(
            f"| {r['M']} | {r['density']} | {fmt(r.get('bf16_ms'))} "
            f"| {cell(r.get('bsr_bf16_ms'), r.get('bsr_bf16_speedup_vs_bf16'))} {r.get('bsr_bf16_block') or ''} "
            f"| {cell(r.get('bsr_bf16_graph_ms'), r.get('bsr_bf16_graph_speedup_vs_bf16_graph'))} "
            f"| {cell(r.get('bsr_int8_ms'), r.get('bsr_int8_speedup_vs_bf16'))} "
            f"| {cell(r.get('torch_bsr_ms'), r.get('torch_bsr_speedup_vs_bf16'))} "
            f"| {cell(r.get('int_mm_ms'), r.get('int_mm_speedup_vs_bf16')) if r.get('int_mm_ms') else '-'} |")
    lines.append("")
    lines.append(f"K = N = {PLAN.bsr_nk}, bf16 activations; ms = do_bench median (L2 flushed), (speedup vs cuBLAS "
                 "bf16 dense); graph: both sides in CUDA graphs; BSR int8 includes activation quantization; torch "
                 "BSR = torch.sparse._triton_ops.bsr_dense_mm (64x64, x^T padded to 16 columns).")
    return "\n".join(lines)


def sec_bsr_timing(s: Section) -> None:
    import torch
    import torch.nn.functional as F
    from pysparse import formats
    KB = s.run.KB
    _fixed(False)
    N = K = PLAN.bsr_nk
    gen = torch.Generator().manual_seed(0)
    bsr_dense_mm, no_torch_bsr = None, "dry run (CPU)"
    if not DRY:
        try:
            from torch.sparse._triton_ops import bsr_dense_mm
        except Exception as e:
            no_torch_bsr = f"{type(e).__name__}: {e}"
        if bsr_dense_mm is None:
            no_torch_bsr = no_torch_bsr if no_torch_bsr != "dry run (CPU)" else "bsr_dense_mm is None"
    bad = s.extra.setdefault("wrong", [])

    def sane(name, y, ref, tol):
        e = rel_err(y, ref)
        if not e <= tol:
            bad.append(f"{name}: relative error {e:.3g} > {tol}")
            raise AssertionError(f"{name}: relative error {e:.3g} > {tol} (a wrong kernel; not timed)")
        return e

    w_full_bf16 = (torch.randn(N, K, generator=gen) * 0.02).to(DEVICE, torch.bfloat16)
    w_q_full = torch.randint(-127, 128, (N, K), generator=gen, dtype=torch.int8).to(DEVICE)
    weights = {}
    for d in PLAN.bsr_densities:
        w = block_pruned(N, K, d, gen)
        wb = w.to(torch.bfloat16)
        p = formats.pack_bsr_int8(w.cpu())  # the layer's path: CPU packing, then the GPU layout
        wq = {"values": formats.int8_blocks_to_kmajor(p.values).to(DEVICE), "row_ptr": p.layout.row_ptr.to(DEVICE),
              "col_idx": p.layout.col_idx.to(DEVICE), "colsum": p.colsum.to(DEVICE), "w_scale": p.w_scale.to(DEVICE),
              "ref": (p.q.float() * p.w_scale[0, :N, None]).to(DEVICE, torch.bfloat16)}
        bsr = {sh: KB.dense_to_bsr(wb, *sh) for sh in PLAN.bsr_shapes}
        tb = None
        if bsr_dense_mm is not None:
            try:
                tb = wb.to_sparse_bsr((64, 64))
            except Exception as e:
                tb = f"{type(e).__name__}: {str(e)[:80]}"
        weights[d] = (wb, wq, bsr, tb)

    try:
        with torch.no_grad():
            for M in PLAN.bsr_ms:
                x = torch.randn(M, K, generator=gen).to(DEVICE, torch.bfloat16)
                x_q = torch.randint(-128, 128, (M, K), generator=gen, dtype=torch.int8).to(DEVICE)
                base = {}

                def baseline():
                    base.update({"bf16_ms": time_ms(lambda: F.linear(x, w_full_bf16)),
                                 "bf16_graph_ms": time_ms(lambda: F.linear(x, w_full_bf16), graph=True),
                                 "int_mm_ms": time_ms(lambda: torch._int_mm(x_q, w_q_full.t()))
                                 if M > 16 and not DRY else None})
                    return {"M": M, "baseline": True, **base}
                s.row(f"M={M} dense baselines", baseline)
                Mp = -(-M // 16) * 16  # torch's bsr_dense_mm wants x^T's columns a multiple of 16
                xt = torch.zeros(K, Mp, device=DEVICE, dtype=torch.bfloat16)
                xt[:, :M] = x.t()
                for d in PLAN.bsr_densities:
                    def one(M=M, d=d):
                        wb, wq, bsr, tb = weights[d]
                        ref = F.linear(x, wb)
                        r = {"M": M, "N": N, "K": K, "density": d, **base}
                        by_shape = {}
                        for sh, (v, rp, ci) in bsr.items():
                            fn = (lambda v=v, rp=rp, ci=ci: G.bsr_linear(x, v, rp, ci, None, N, K))
                            sane(f"bsr bf16 {sh} M={M} d={d}", fn(), ref, 1e-2)
                            by_shape[f"{sh[0]}x{sh[1]}"] = time_ms(fn)
                        ok = {k: v for k, v in by_shape.items() if v is not None}
                        best = min(ok, key=ok.get) if ok else None
                        r.update(bsr_bf16_ms_by_block=by_shape, bsr_bf16_block=best, bsr_bf16_ms=ok.get(best))
                        if best:
                            v, rp, ci = bsr[tuple(int(t) for t in best.split("x"))]
                            r["bsr_bf16_graph_ms"] = time_ms(lambda: G.bsr_linear(x, v, rp, ci, None, N, K), graph=True)
                        fn8 = (lambda: G.bsr_int8_linear(x, wq["values"], wq["row_ptr"], wq["col_idx"], wq["colsum"],
                                                         wq["w_scale"], None, None, N, K))
                        sane(f"bsr int8 M={M} d={d}", fn8(), F.linear(x, wq["ref"]), 5e-2)
                        r["bsr_int8_ms"] = time_ms(fn8)
                        r["bsr_int8_graph_ms"] = time_ms(fn8, graph=True)
                        r["torch_bsr_ms"], r["torch_bsr_note"] = None, "M padded to 16" if Mp != M else ""
                        if bsr_dense_mm is None or isinstance(tb, str) or tb is None:
                            r["torch_bsr_note"] = no_torch_bsr if bsr_dense_mm is None else str(tb)
                        else:
                            try:
                                sane(f"torch bsr_dense_mm M={M} d={d}", bsr_dense_mm(tb, xt)[:, :M].t(), ref, 1e-2)
                                r["torch_bsr_ms"] = time_ms(lambda: bsr_dense_mm(tb, xt))
                            except Exception as e:
                                r["torch_bsr_note"] = f"{type(e).__name__}: {str(e)[:80]}"
                        for k in ("bsr_bf16", "bsr_int8", "torch_bsr", "int_mm"):
                            r[f"{k}_speedup_vs_bf16"] = speedup(r.get("bf16_ms"), r.get(f"{k}_ms"))
                        r["bsr_bf16_graph_speedup_vs_bf16_graph"] = speedup(r.get("bf16_graph_ms"),
                                                                            r.get("bsr_bf16_graph_ms"))
                        log(f"  M={M:4d} density={d:<4}: " + ", ".join(
                            f"{k[:-3]}={v:.4f}" for k, v in r.items() if k.endswith("_ms") and v is not None))
                        return r
                    s.row(f"M={M} density={d}", one)
    finally:
        s.extra["autotune"] = {str(k): str(v) for k, v in getattr(KB._bsr_kernel, "cache", {}).items()}
        s.table(bsr_table([r for r in s.rows if not r.get("baseline")]))


# ------------------------------------------------------------------------------ 5. compact conv
def conv_table(rows) -> str:
    head = "| N | C | HxW | k | stride | kept in/out | CompactConv2d ms | K-major weight ms | dense conv of kept size ms | gather+conv+scatter ms | vs dense kept | vs gather/scatter | dense full ms |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        if r.get("status") != "ok":
            lines.append(f"| {r['label']} | {r.get('status')} {r.get('error', '')} |")
            continue
        lines.append(f"| {r['N']} | {r['C']} | {r['H']}x{r['W']} | {r['k']} | {r['stride']} | {r['ci']}/{r['co']} "
                     f"| {fmt(r['compact_ms'])} | {fmt(r.get('compact_kmajor_ms'))} | {fmt(r['dense_kept_ms'])} "
                     f"| {fmt(r['gather_ms'])} "
                     f"| {ratio(r['compact_vs_dense_kept'])} "
                     f"| {ratio(r['compact_vs_gather'])} "
                     f"| {fmt(r['dense_full_ms'])} |")
    lines.append("")
    lines.append("fp32 (TF32 off for the op and cuDNN), channels_last; K-major weight: the kernel on a K-major copy "
                 "of the panels (ops_conv.compact_conv2d_case), where the op offers it; ratios > 1: CompactConv2d faster. Targets (issue 8): >= 0.8x the dense conv "
                 "of the kept size, >= 1.5x faster than gather + conv + scatter in torch ops.")
    return "\n".join(lines)


def sec_compact_conv(s: Section) -> None:
    import torch
    import torch.nn.functional as F
    from pysparse import ops_conv
    if not has_gpu_kernel("compact_conv2d", "compact_conv2d"):
        s.check("CompactConv2d GPU kernel present", lambda: ("not run: no GPU kernel",
                "pysparse::compact_conv2d has no CUDA kernel (kernels/compact_conv2d.py: issue 8, tconv)"))
        s.status = "not run: no GPU kernel"
        return
    torch.manual_seed(0)
    prev_tf32 = torch.backends.cudnn.allow_tf32
    # fp32 means fp32 here, for the op (it follows cuDNN's TF32 rule) and the cuDNN peers
    torch.backends.cudnn.allow_tf32 = False
    case_fn = getattr(ops_conv, "compact_conv2d_case", None)  # the op's own timing entry, where it has one
    try:
        for (N, C, H, W, k, stride) in PLAN.conv_cases:
            def from_case(N=N, C=C, H=H, W=W, k=k, stride=stride):
                import warnings
                with warnings.catch_warnings(record=True) as said:
                    warnings.simplefilter("always")
                    case = case_fn(N, C, C, H, k, keep_in=PLAN.conv_keep, keep_out=PLAN.conv_keep, stride=stride,
                                   device=DEVICE)
                    e = case["check"]()
                if not e <= 1e-4:
                    raise AssertionError(f"compact_conv2d off the float64 reference: max error / max |ref| {e:.3g} "
                                         f"(precision {case.get('precision')})")
                ci, co = round(C * PLAN.conv_keep), round(C * PLAN.conv_keep)
                wfull = torch.randn(C, C, k, k, device=DEVICE).contiguous(memory_format=torch.channels_last)
                x = case["args"][0]
                r = {"N": N, "C": C, "H": H, "W": W, "k": k, "stride": stride, "ci": ci, "co": co,
                     "check": e, "precision": case.get("precision"), "macs": case.get("macs"),
                     "warnings": sorted({str(w.message)[:120] for w in said})}
                r["compact_ms"] = time_ms(case["pysparse"])
                if "pysparse_kmajor" in case:
                    r["compact_kmajor_ms"] = time_ms(case["pysparse_kmajor"])
                r["dense_kept_ms"] = time_ms(case["dense_kept"])
                r["gather_ms"] = time_ms(case["gather_conv_scatter"])
                r["dense_full_ms"] = time_ms(lambda: F.conv2d(x, wfull, None, stride, k // 2))
                r["compact_vs_dense_kept"] = speedup(r["dense_kept_ms"], r["compact_ms"])
                r["compact_vs_gather"] = speedup(r["gather_ms"], r["compact_ms"])
                log(f"  N={N} C={C} {H}x{W} k={k} s={stride}: compact {fmt(r['compact_ms'])} ms "
                    f"(K-major weight {fmt(r.get('compact_kmajor_ms'))}), dense kept {fmt(r['dense_kept_ms'])}, "
                    f"gather/scatter {fmt(r['gather_ms'])}")
                return r

            def one(N=N, C=C, H=H, W=W, k=k, stride=stride):
                ci, co = max(1, round(C * PLAN.conv_keep)), max(1, round(C * PLAN.conv_keep))
                pad = k // 2
                in_idx = torch.randperm(C)[:ci].sort().values
                out_idx = torch.randperm(C)[:co].sort().values
                wt = torch.randn(co, ci, k, k) / math.sqrt(ci * k * k)
                bias = torch.randn(co)
                packed = ops_conv.pack_compact_conv2d_weight(wt).to(DEVICE)
                x = torch.randn(N, C, H, W).to(DEVICE).contiguous(memory_format=torch.channels_last)
                res = torch.randn(N, C, (H + 2 * pad - k) // stride + 1, (W + 2 * pad - k) // stride + 1)
                res = res.to(DEVICE).contiguous(memory_format=torch.channels_last)
                ii, oi, wd, bd = in_idx.to(DEVICE), out_idx.to(DEVICE), wt.to(DEVICE), bias.to(DEVICE)

                def compact(residual=None, relu=False):
                    return ops_conv.compact_conv2d(x, packed, bd, ii, oi, (stride, stride), (pad, pad), (1, 1), C,
                                                   residual, relu)

                def gather_conv_scatter(residual=None, relu=False):
                    y = F.conv2d(x[:, ii], wd, bd, stride, pad)
                    out = torch.zeros_like(res) if residual is None else residual.clone()
                    out[:, oi] += y
                    return out.relu() if relu else out
                import warnings
                with warnings.catch_warnings(record=True) as said:
                    warnings.simplefilter("always")
                    compact()
                notes = sorted({str(w.message)[:120] for w in said})
                for residual, relu in ((None, False), (res, True)):
                    e = rel_err(compact(residual, relu), gather_conv_scatter(residual, relu))
                    if not e <= 1e-4:
                        raise AssertionError(f"compact_conv2d off the torch reference: relative error {e:.3g} "
                                             f"(residual={residual is not None}, relu={relu})")
                xk = x[:, ii].contiguous(memory_format=torch.channels_last)
                wk = wd.contiguous(memory_format=torch.channels_last)
                wfull = torch.randn(C, C, k, k, device=DEVICE).contiguous(memory_format=torch.channels_last)
                r = {"N": N, "C": C, "H": H, "W": W, "k": k, "stride": stride, "ci": ci, "co": co, "warnings": notes}
                r["compact_ms"] = time_ms(compact)
                r["dense_kept_ms"] = time_ms(lambda: F.conv2d(xk, wk, bd, stride, pad))
                r["gather_ms"] = time_ms(gather_conv_scatter)
                r["dense_full_ms"] = time_ms(lambda: F.conv2d(x, wfull, None, stride, pad))
                r["compact_vs_dense_kept"] = speedup(r["dense_kept_ms"], r["compact_ms"])
                r["compact_vs_gather"] = speedup(r["gather_ms"], r["compact_ms"])
                log(f"  N={N} C={C} {H}x{W} k={k} s={stride}: compact {fmt(r['compact_ms'])} ms, dense kept "
                    f"{fmt(r['dense_kept_ms'])}, gather/scatter {fmt(r['gather_ms'])}")
                return r
            s.row(f"N={N} C={C} {H}x{W} k={k} s={stride}", from_case if case_fn is not None else one)
    finally:
        torch.backends.cudnn.allow_tf32 = prev_tf32
        s.table(conv_table(s.rows))


# ------------------------------------------------------------------------------ 6. compacted ResNet-50
def resnet_model(dry: bool):
    from torch import nn

    from pysparse.bench import models
    if not dry:
        return models.resnet50(3), "ResNet-50"
    # the rehearsal: two of ResNet-50's bottlenecks (one strided, projection shortcuts)
    return nn.Sequential(models._conv_bn(3, 16, 3, 2), models.Bottleneck(16, 8, 1), models.Bottleneck(32, 8, 2),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10)), "two bottlenecks (dry)"


def sec_resnet50(s: Section) -> None:
    import torch

    import pysparse
    from pysparse.bench.cnn_bench import _fold, count_macs
    torch.manual_seed(0)
    model, name = resnet_model(DRY)
    model.eval()
    size = PLAN.resnet_input
    example = torch.randn(1, 3, size, size)
    built = {}

    def build():
        t0 = time.monotonic()
        masked = copy.deepcopy(model)
        pysparse.prune.filters(masked, 0.5, criterion="l1", example_inputs=(example,))
        compacted = pysparse.compact(masked, (example,))
        macs_d, macs_c = count_macs(model, example), count_macs(compacted, example)
        cl = torch.channels_last
        built["dense"] = _fold(model).to(DEVICE, memory_format=cl)
        built["compact"] = compacted.to(DEVICE, memory_format=cl)
        built["cpu_ref"] = (compacted, masked)
        s.extra.update(model=name, input=size, macs_dense=macs_d, macs_compact=macs_c,
                       mac_reduction=round(macs_d / max(macs_c, 1), 3))
        return f"{name}: 50% of filters pruned (L1), compacted on the host in {time.monotonic() - t0:.1f} s; " \
               f"MACs {macs_d / 1e9:.2f} G -> {macs_c / 1e9:.2f} G ({macs_d / max(macs_c, 1):.2f}x fewer)"
    if not s.check("ResNet-50: prune.filters 50% + pysparse.compact (host), moved to the GPU", build):
        return

    def same():
        compacted, masked = built["cpu_ref"]
        x = torch.randn(2, 3, size, size)
        prev = torch.backends.cudnn.allow_tf32
        torch.backends.cudnn.allow_tf32 = False
        try:
            with torch.no_grad():
                ref = masked.eval()(x)
                y = built["compact"](x.to(DEVICE).contiguous(memory_format=torch.channels_last)).cpu()
        finally:
            torch.backends.cudnn.allow_tf32 = prev
        e = rel_err(y, ref)
        if not e <= 1e-3:
            raise AssertionError(f"compacted model on {DEVICE} vs the masked model on the CPU: relative error {e:.3g}")
        return f"relative error {e:.2e} vs the masked model (fp32, TF32 off)"
    s.check("compacted ResNet-50 on the GPU == masked model on the CPU", same)

    tf32 = torch.backends.cudnn.allow_tf32
    if DEVICE == "cuda":
        torch.backends.cudnn.benchmark = True
    s.extra["cudnn_allow_tf32"] = tf32
    try:
        with torch.no_grad():
            for b in PLAN.resnet_batches:
                def one(b=b):
                    x = torch.randn(b, 3, size, size, device=DEVICE).contiguous(memory_format=torch.channels_last)
                    r = {"batch": b}
                    for k in ("dense", "compact"):
                        m = built[k]
                        r[f"{k}_ms"] = time_ms(lambda m=m: m(x))
                        r[f"{k}_graph_ms"] = time_ms(lambda m=m: m(x), graph=True)
                    r["speedup"] = speedup(r["dense_ms"], r["compact_ms"])
                    r["graph_speedup"] = speedup(r["dense_graph_ms"], r["compact_graph_ms"])
                    red = s.extra.get("mac_reduction")
                    r["of_mac_reduction"] = round(r["speedup"] / red, 3) if r["speedup"] and red else None
                    log(f"  batch {b}: dense {fmt(r['dense_ms'])} ms, compacted {fmt(r['compact_ms'])} ms")
                    return r
                s.row(f"batch={b}", one)
    finally:
        lines = ["| batch | cuDNN dense (BN folded) ms | compacted ms | speedup | graph: dense / compacted ms "
                 "| graph speedup | of MAC reduction |", "|---|---|---|---|---|---|---|"]
        for r in s.rows:
            if r.get("status") != "ok":
                lines.append(f"| {r['label']} | {r.get('status')} {r.get('error', '')} |")
                continue
            lines.append(f"| {r['batch']} | {fmt(r['dense_ms'])} | {fmt(r['compact_ms'])} "
                         f"| {ratio(r['speedup'])} "
                         f"| {fmt(r['dense_graph_ms'])} / {fmt(r['compact_graph_ms'])} "
                         f"| {ratio(r['graph_speedup'])} "
                         f"| {fmt(r['of_mac_reduction'], 2)} |")
        lines.append("")
        lines.append(f"{s.extra.get('model', name)}, {size}x{size}, fp32 channels_last, both BN-folded; cuDNN "
                     f"(benchmark mode, TF32 {'allowed' if tf32 else 'off'} as PyTorch's default); MAC reduction "
                     f"{s.extra.get('mac_reduction')}x.")
        s.table("\n".join(lines))


# ------------------------------------------------------------------------------ 7. int8 conv
def sec_int8_conv(s: Section) -> None:
    import torch

    import pysparse
    if not has_gpu_kernel("int8_conv2d", "int8_conv2d"):
        s.check("Int8Conv2d GPU kernel present", lambda: ("not run: no GPU kernel",
                "pysparse::int8_conv2d has no CUDA kernel yet (issue 8 is CPU first)"))
        s.status = "not run: no GPU kernel"
        return

    def vs_cpu():
        torch.manual_seed(0)
        m = torch.nn.Sequential(torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.ReLU()).eval()
        calib = [torch.randn(2, 16, 8, 8) for _ in range(2)]
        q = pysparse.quantize_int8(m, activations="static", calibration_data=calib, convs=True)
        x = torch.randn(2, 16, 8, 8)
        ref = q(x)
        y = copy.deepcopy(q).to(DEVICE)(x.to(DEVICE)).cpu()
        eq, diff = same_bits(y, ref)
        if diff > 1e-4 * max(ref.abs().max().item(), 1.0):
            raise AssertionError(f"Int8Conv2d on {DEVICE} vs CPU: max|diff| {diff:.3g}")
        return "bit-exact" if eq else f"close (max|diff| {diff:.3g})"
    s.check("Int8Conv2d on the GPU vs the CPU op", vs_cpu)


# ------------------------------------------------------------------------------ 8. 2:4
def prune_2_4(w):
    """Keep the 2 largest |w| of every 4 consecutive inputs (the 2:4 pattern)."""
    import torch
    N, K = w.shape
    g = w.reshape(N, K // 4, 4)
    mask = torch.zeros_like(g, dtype=torch.bool).scatter_(-1, g.abs().topk(2, dim=-1).indices, True)
    return (g * mask).reshape(N, K)


def semi_structured(w24):
    """(2:4 tensor, backend) by torch.sparse.to_sparse_semi_structured, cuSPARSELt first
    then CUTLASS; (None, why) where neither works (needs sm80+ and a CUDA torch)."""
    import torch
    if DEVICE != "cuda" or torch.cuda.get_device_capability()[0] < 8:
        return None, "needs a CUDA device of sm80+"
    S = torch.sparse.SparseSemiStructuredTensor
    why = []
    for force_cutlass in (False, True):
        old = S._FORCE_CUTLASS
        try:
            S._FORCE_CUTLASS = force_cutlass
            t = torch.sparse.to_sparse_semi_structured(w24)
            return t, t.BACKEND
        except Exception as e:
            why.append(f"{'cutlass' if force_cutlass else 'cusparselt'}: {type(e).__name__}: {str(e)[:80]}")
        finally:
            S._FORCE_CUTLASS = old
    return None, "; ".join(why)


def sec_semi24(s: Section) -> None:
    import torch
    import torch.nn.functional as F
    N = K = PLAN.bsr_nk
    gen = torch.Generator().manual_seed(0)
    w = (torch.randn(N, K, generator=gen) * 0.02).to(DEVICE)
    w_bf16 = w.to(torch.bfloat16)
    w24 = prune_2_4(w).to(torch.bfloat16)
    w24_s, backend = semi_structured(w24)
    s.extra["backend"] = backend
    if w24_s is None:
        log(f"  2:4 semi-structured: n/a ({backend})")
    try:
        with torch.no_grad():
            for M in PLAN.bsr_ms:
                def one(M=M):
                    x = torch.randn(M, K, generator=gen).to(DEVICE, torch.bfloat16)
                    r = {"M": M, "bf16_ms": time_ms(lambda: F.linear(x, w_bf16)), "semi24_ms": None}
                    if w24_s is not None:
                        e = rel_err(F.linear(x, w24_s), F.linear(x, w24))
                        if not e <= 1e-2:
                            raise AssertionError(f"2:4 M={M}: relative error {e:.3g}")
                        r["semi24_ms"] = time_ms(lambda: F.linear(x, w24_s))
                    r["semi24_speedup_vs_bf16"] = speedup(r["bf16_ms"], r["semi24_ms"])
                    return r
                s.row(f"M={M}", one)
    finally:
        lines = ["| M | cuBLAS bf16 ms | 2:4 bf16 ms |", "|---|---|---|"]
        for r in s.rows:
            if r.get("status") != "ok":
                lines.append(f"| {r['label']} | {r.get('status')} {r.get('error', '')} |")
                continue
            lines.append(f"| {r['M']} | {fmt(r['bf16_ms'])} | {cell(r['semi24_ms'], r['semi24_speedup_vs_bf16'])} |")
        lines.append("")
        lines.append(f"K = N = {N}, dense-shape peer at 50% (2:4 semi-structured, {backend}).")
        s.table("\n".join(lines))


SECTIONS = [
    ("int8_correctness", "1. int8 correctness (compiled Triton kernels, fixed configs)", sec_int8_correctness),
    ("bsr_correctness", "2. block-sparse correctness (fixed configs)", sec_bsr_correctness),
    ("int8_timing", "3. int8 timings (do_bench median, ms; autotuned)", sec_int8_timing),
    ("bsr_timing", "4. block-sparse timings (do_bench median, ms; autotuned)", sec_bsr_timing),
    ("compact_conv", "5. CompactConv2d (pysparse.ops_conv.compact_conv2d) vs cuDNN", sec_compact_conv),
    ("resnet50", "6. compacted ResNet-50 vs cuDNN on the unpruned one (fp32, channels_last)", sec_resnet50),
    ("int8_conv", "7. int8 convolutions", sec_int8_conv),
    ("semi24", "8. 2:4 semi-structured (dense-shape peer)", sec_semi24),
]


# ------------------------------------------------------------------------------ compile estimate
def _spec(*ints) -> tuple:
    """What Triton specializes an integer argument on: == 1, divisible by 16, or neither."""
    return tuple("1" if v == 1 else "D" if v % 16 == 0 else "-" for v in ints)


def plan_launches(plan: Plan, max_k: int) -> list[tuple]:
    """Every Triton launch of a run of the plan, as (kernel, section, M, N, K, const, fixed):
    const holds the constexprs and dtypes (bsr: INT8, EPILOGUE, HAS_BIAS, RELU, x/v/out
    dtypes, BK, BN). Mirrors what the sections call."""
    L = []
    f32, bf16, f16 = "torch.float32", "torch.bfloat16", "torch.float16"
    i8 = lambda M, N, K, epi, hb, out, sec, fixed: L.append(("int8_gemm", sec, M, N, K, (epi, hb, out), fixed))  # noqa: E731

    def bsr(M, N, K, int8, hb, relu, x, v, out, bk, bn, sec, fixed):
        L.append(("bsr", sec, M, N, K, (int8, True, hb, relu, x, v, out, bk, bn), fixed))
    # 1. int8 correctness
    for M, N, K in plan.mm_shapes:
        i8(M, N, K, False, False, "torch.int32", "int8_correctness", True)
    i8(1, 2, max_k, False, False, "torch.int32", "int8_correctness", True)
    i8(9, 21, 100, False, False, "torch.int32", "int8_correctness", True)
    i8(33, 70, 1000, False, False, "torch.int32", "int8_correctness", True)
    for i, (M, K, N) in enumerate(plan.linear_shapes):
        for out in ((f32, bf16, f16) if i in (0, 2) else (bf16,)):
            for hb in (False, True):
                i8(M, N, K, True, hb, out, "int8_correctness", True)
    i8(28, 130, 300, True, True, f32, "int8_correctness", True)
    if plan.torch_compile:
        i8(8, 64, 256, True, True, bf16, "int8_correctness", True)
    # 2. block-sparse correctness (int8 blocks: 64 x 64, x quantized to int8)
    (n0, k0), (n1, k1) = plan.bsr_check_nk[0], plan.bsr_check_nk[-1]
    ms = (plan.bsr_check_ms[0], plan.bsr_check_ms[1] // 3 * 3)
    for N, K, (bn, bk), relu, dts in ((n0, k0, (64, 32), False, (f32, f16, bf16)), (n1, k1, (64, 64), True, (f32, bf16)),
                                      (n0, k0, (16, 16), False, (f32,))):
        for dt in dts:
            for M in ms:
                bsr(M, N, K, False, True, relu, dt, dt, dt, bk, bn, "bsr_correctness", True)
    for i, (N, K) in enumerate(plan.bsr_check_nk):
        for dt in ((f32, bf16, f16) if i == 0 else (bf16,)):
            for M in ms:
                bsr(M, N, K, True, True, False, "torch.int8", "torch.int8", dt, 64, 64, "bsr_correctness", True)
    bsr(5, n0, k0, True, False, False, "torch.int8", "torch.int8", f32, 64, 64, "bsr_correctness", True)
    for dt in (f16, bf16):
        bsr(9, n0, k0, False, False, False, dt, dt, dt, 64, 64, "bsr_correctness", True)
    bsr(9, n0, k0, True, False, False, "torch.int8", "torch.int8", bf16, 64, 64, "bsr_correctness", True)
    bsr(7, n0, k0, False, True, False, bf16, bf16, bf16, 32, 64, "bsr_correctness", True)
    bsr(33, n0, k0, False, True, False, f32, f32, f32, 32, 64, "bsr_correctness", True)
    if plan.torch_compile:
        bsr(8, 192, 256, False, True, False, bf16, bf16, bf16, 64, 64, "bsr_correctness", True)
        bsr(8, 192, 256, True, True, False, "torch.int8", "torch.int8", f16, 64, 64, "bsr_correctness", True)
    # 3. int8 timings: the op and the GEMM alone (one kernel variant), autotuned
    for N, K in plan.int8_nk:
        for M in plan.int8_ms:
            i8(M, N, K, True, False, bf16, "int8_timing", False)
    # 4. block-sparse timings
    N = K = plan.bsr_nk
    for M in plan.bsr_ms:
        for _ in plan.bsr_densities:
            for bn, bk in plan.bsr_shapes:
                bsr(M, N, K, False, False, False, bf16, bf16, bf16, bk, bn, "bsr_timing", False)
            bsr(M, N, K, True, False, False, "torch.int8", "torch.int8", bf16, 64, 64, "bsr_timing", False)
    return L


def compile_estimate(plan: Plan, K8, KB) -> dict:
    """Distinct Triton compiles and autotune benchmarks of a full run (configs x shapes),
    from plan_launches and the kernels' GPU config lists and pruning."""
    size = {"torch.float32": 4, "torch.bfloat16": 2, "torch.float16": 2, "torch.int8": 1}
    compiles, tunes, per_section = set(), {}, {}
    for kernel, sec, M, N, K, const, fixed in plan_launches(plan, K8.MAX_K):
        if kernel == "int8_gemm":
            cfgs = K8._prune(K8.gpu_configs(), {"M_BUCKET": K8._m_bucket(M)})
            bucket_key = (kernel, K8._m_bucket(M), N, K, const[2])
        else:
            int8, _, hb, relu, x, v, out, bk, bn = const
            cfgs = KB._prune_sizes(KB.gpu_configs(), {"M_BUCKET": KB._m_bucket(M), "BK": bk, "BN": bn},
                                   size[x], size[v])
            bucket_key = (kernel, KB._m_bucket(M), N, K, bn, bk, x, v, out)
        if fixed:
            cfgs = cfgs[:1]
        elif bucket_key not in tunes and len(cfgs) > 1:
            tunes[bucket_key] = len(cfgs)
        for c in cfgs:
            key = (kernel, const, _spec(M, N, K), str(c))
            if key not in compiles:
                compiles.add(key)
                per_section[sec] = per_section.get(sec, 0) + 1
    timed = (len(plan.int8_nk) * len(plan.int8_ms) * (4 + 1)
             + len(plan.bsr_ms) * (2 + 1 + len(plan.bsr_densities) * (len(plan.bsr_shapes) + 4))
             + len(plan.conv_cases) * 4 + len(plan.resnet_batches) * 4 + len(plan.bsr_ms) * 2)
    return {"compiles": len(compiles), "compiles_by_section": per_section, "autotune_benchmarks": sum(tunes.values()),
            "autotune_keys": len(tunes), "timings": timed,
            "variants": sorted({(k[0],) + tuple(map(str, k[1])) for k in compiles})}


def wall_estimate(est: dict) -> dict:
    """Seconds on an H200 machine (16 host cores), from the counts; the per-item costs
    are in the module docstring."""
    parts = {"build": 90, "imports": 10, "compiles": est["compiles"] * 1.5,
             "autotune_benchmarks": est["autotune_benchmarks"] * 0.15, "timings": est["timings"] * 0.25,
             "torch_compile": 40, "resnet50_host": 40,
             # tconv's kernel autotunes 9 configs per (1x1 | 3x3, panel | K-major weight): ~36 compiles
             "compact_conv": 60}
    return {"parts_s": parts, "total_s": round(sum(parts.values()), 1)}


# ------------------------------------------------------------------------------ pytest (opt-in)
def run_pytest(timeout_s: int) -> dict:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "tests/"]
    log(f"$ {' '.join(cmd)}   (timeout {timeout_s} s)")
    t0 = time.time()
    try:
        p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s)
        out, rc = p.stdout + p.stderr, p.returncode
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        out, rc = out + f"\nTIMEOUT after {timeout_s} s", None
    lines = [ln for ln in out.splitlines() if ln.strip()]
    tail = lines[-25:] if rc not in (0, None) else lines[-3:]
    log("\n".join(tail))
    return {"rc": rc, "ok": rc == 0, "summary": lines[-1] if lines else "", "seconds": round(time.time() - t0, 1),
            "tail": tail}


# ------------------------------------------------------------------------------ main
def summary(run: Run) -> str:
    lines = ["", "## summary (one line per check; timing sections: rows)"]
    for s in run.sections:
        lines.append(f"{s.name}: {s.status}" + (f" ({s.detail.splitlines()[0]})" if s.detail else ""))
        for c in s.checks:
            d = c["detail"].splitlines()[0][:110] if c["detail"] else ""
            lines.append(f"  [{c['status']}] {c['name']}" + (f": {d}" if d else ""))
        if s.rows:
            n = {}
            for r in s.rows:
                n[r.get("status", "ok")] = n.get(r.get("status", "ok"), 0) + 1
            lines.append("  rows: " + ", ".join(f"{v} {k}" for k, v in n.items()))
    if run.dead:
        lines.append(f"CUDA error (sticky, reported once): {run.dead}")
    lines.append(f"{'all passed' if run.status() == 0 else 'FAILURES'}; {run.elapsed():.1f} s; "
                 f"results in {run.out_dir}/gpu_check.json")
    return "\n".join(lines)


def _setup(dry: bool) -> tuple:
    """Import the kernels and pick the ops the sections call."""
    import importlib.util

    import torch
    sys.path.insert(0, str(ROOT))
    import triton
    # This tree's kernels, also where another checkout's pysparse is installed (an editable
    # install maps pysparse.kernels to its own kernels/ folder).
    for op in ("int8_linear", "bsr_linear"):
        name, path = f"pysparse.kernels.{op}", ROOT / "kernels" / f"{op}.py"
        if name not in sys.modules and path.is_file():
            spec = importlib.util.spec_from_file_location(name, path)
            mod = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(mod)
            sys.modules[name] = mod
    import pysparse  # noqa: F401
    import pysparse.ops  # noqa: F401  (fake kernels: torch.compile)
    from pysparse import _cuda_bsr, _cuda_ops
    if not (_cuda_ops.REGISTERED and _cuda_bsr.REGISTERED):
        raise RuntimeError("pysparse._cuda_ops / _cuda_bsr registered no CUDA kernels (is triton installed?)")
    K8, KB = _cuda_ops._triton_kernels(), _cuda_bsr._triton_kernels()
    if dry:  # the Python CUDA kernels themselves, on CPU tensors (interpreted Triton)
        G.__dict__.update(int8_pack=_cuda_ops.int8_pack_cuda, int8_unpack=_cuda_ops.int8_unpack_cuda,
                          int8_mm=_cuda_ops.int8_mm_cuda, int8_linear=_cuda_ops.int8_linear_cuda,
                          bsr_linear=_cuda_bsr.bsr_linear_cuda, bsr_int8_linear=_cuda_bsr.bsr_int8_linear_cuda)
    else:
        ops = torch.ops.pysparse
        G.__dict__.update(int8_pack=ops.int8_pack, int8_unpack=ops.int8_unpack, int8_mm=ops.int8_mm,
                          int8_linear=ops.int8_linear, bsr_linear=ops.bsr_linear, bsr_int8_linear=ops.bsr_int8_linear)
    return triton, K8, KB


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT") or "gpu_check_out",
                    help="folder for gpu_check.json / .log / .md (default: $OUT, else gpu_check_out)")
    ap.add_argument("--budget", type=float, default=480, help="seconds; past it the rest is skipped (default 480)")
    ap.add_argument("--dry", action="store_true",
                    help="the rehearsal: CPU tensors, TRITON_INTERPRET=1, tiny shapes, a fake timer")
    ap.add_argument("--only", default="", help="comma-separated section names to run (default: all)")
    ap.add_argument("--inject", action="append", default=[],
                    help="SECTION:raise|sticky|check, a failure injected for the rehearsal's tests")
    ap.add_argument("--pytest", action="store_true", help="also run pytest first (CI runs it; off by default)")
    ap.add_argument("--pytest-timeout", type=int, default=300)
    args = ap.parse_args(argv)

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    logf = open(out_dir / "gpu_check.log", "w")
    old = sys.stdout, sys.stderr
    sys.stdout = Tee(old[0], logf)
    sys.stderr = Tee(old[1], logf)
    try:
        return _main(args, out_dir)
    finally:
        sys.stdout, sys.stderr = old
        logf.close()


def _main(args, out_dir: Path) -> int:
    global PLAN, DEVICE, DRY
    DRY = args.dry
    PLAN = Plan.dry() if DRY else Plan.full()
    DEVICE = "cpu" if DRY else "cuda"
    if DRY:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
    else:
        os.environ.pop("TRITON_INTERPRET", None)  # compiled kernels
    try:
        import torch
    except ImportError as e:
        log(f"no CUDA device: skipped (torch does not import: {e})")
        return 0
    if not DRY and not torch.cuda.is_available():
        log("no CUDA device: skipped")
        return 0
    run = Run(out_dir, args.budget)
    for spec in args.inject:
        sec, _, kind = spec.partition(":")
        run.inject[sec] = kind or "raise"
    run.report.update({"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                       "dry": DRY, "torch": torch.__version__, "cuda": torch.version.cuda,
                       "python": sys.version.split()[0], "budget_s": args.budget})
    if not DRY:
        run.report.update(gpu=torch.cuda.get_device_name(0),
                          capability=".".join(map(str, torch.cuda.get_device_capability(0))))
    log(f"# pysparse GPU check{' (dry rehearsal on the CPU)' if DRY else ''}: {run.report.get('gpu', 'cpu')}, "
        f"torch {torch.__version__}, CUDA {torch.version.cuda}; budget {args.budget:.0f} s; out {out_dir}")
    if args.pytest:
        log("\n## pytest")
        run.report["pytest"] = run_pytest(min(args.pytest_timeout, int(args.budget / 2)))
    try:
        triton, run.K8, run.KB = _setup(DRY)
        run.report["triton"] = triton.__version__
    except Exception as e:
        run.report["setup_error"] = f"{type(e).__name__}: {e}"
        log(f"setup failed: {run.report['setup_error']}")
        traceback.print_exc()
        run.write()
        return 2
    est = compile_estimate(Plan.full(), run.K8, run.KB)
    run.report["compile_estimate"] = {**est, **wall_estimate(est)}
    log(f"compile estimate (full run): {est['compiles']} Triton compiles {est['compiles_by_section']}, "
        f"{est['autotune_benchmarks']} autotune benchmarks, {est['timings']} timings; "
        f"~{wall_estimate(est)['total_s']:.0f} s on an H200")
    # every launch recorded in the rehearsal (on a GPU a dict per launch would add to the
    # launch-bound timings)
    launches = []
    if DRY:
        run.K8.LAUNCH_LOG = run.KB.LAUNCH_LOG = launches
    only = {s for s in args.only.split(",") if s}
    try:
        for name, title, fn in SECTIONS:
            if only and name not in only:
                continue
            run_section(run, name, title, fn)
    finally:
        run.K8.LAUNCH_LOG = run.KB.LAUNCH_LOG = None
        _fixed(False)
    seen = sorted({(k, *(str(sig[c]) for c in (("EPILOGUE", "HAS_BIAS", "out") if k == "int8_gemm" else
                                                  ("INT8", "EPILOGUE", "HAS_BIAS", "RELU", "x", "v", "out", "BK", "BN"))))
                   for k, sig in launches})
    run.report["launches"] = {"count": len(launches), "variants_seen": seen}
    missing = [v for v in seen if v not in {tuple(x) for x in est["variants"]}]
    run.report["launches"]["variants_not_in_estimate"] = missing
    if missing and not DRY:
        log(f"note: {len(missing)} kernel variants launched that the compile estimate does not count: {missing[:4]}")
    run.write()
    log(summary(run))
    return run.status()


if __name__ == "__main__":
    sys.exit(main())
