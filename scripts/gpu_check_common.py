"""scripts/gpu_check.py's machinery: the plan (every shape a run uses), the run's state
(device, dry rehearsal, the ops the sections call), the guarded run (budget, sticky CUDA
error, JSON and tables rewritten per section), the timer and the numeric helpers.

The state is module-level here and set once by gpu_check.main; the section modules read it
as ``gpu_check_common.PLAN`` etc. (attribute access, so they see what main set).
"""
from __future__ import annotations

import dataclasses
import io
import json
import os
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
        import torch
        if not sticky and DEVICE == "cuda" and torch.cuda.is_available():
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
