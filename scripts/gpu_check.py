#!/usr/bin/env python3
"""The one prepared check for a GPU machine (H100/H200; torch, triton, CUDA, pytest, no
network). `make gpu-check` builds the C++ extension in place and runs this.

1. ``pytest -x -q tests/`` in a subprocess, TRITON_INTERPRET unset; prints the summary.
2. Compiled-kernel checks on the GPU (pytest runs Triton only in the interpreter):
   int8_mm_triton against exact integer references, the CUDA ops against the C++ CPU
   ops (bit for bit expected), pack/unpack, grouped fallback, Int8Linear moved to CUDA.
3. Timings with ``triton.testing.do_bench(fn, return_mode="median")`` for K = 4096,
   N in {4096, 11008}, M in {1, 16, 128, 512, 2048}: torch.ops.pysparse.int8_linear on
   CUDA tensors (dynamic activation quantization included), the Triton GEMM alone on
   pre-quantized input, cuBLAS bf16 F.linear, and torch._int_mm (M > 16 only).

Prints a markdown table and writes everything as JSON to --json (default gpu_check.json).
Exit status: 0 when all passed (or no CUDA device: "no CUDA device: skipped"), 1 when a
test or check failed, 2 when the setup (imports) failed.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHAPES_NK = [(4096, 4096), (11008, 4096)]
MS = [1, 16, 128, 512, 2048]


def log(msg: str = "") -> None:
    print(msg, flush=True)


# ------------------------------------------------------------------------------ 1. pytest
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


# ------------------------------------------------------------------------------ 2. checks
class Checks:
    def __init__(self):
        self.results = []

    def run(self, name, fn):
        t0 = time.time()
        try:
            detail = fn() or ""
            ok = True
        except Exception as e:  # record and go on: every check is independent
            ok, detail = False, f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=4)}"
        self.results.append({"name": name, "ok": ok, "detail": str(detail), "seconds": round(time.time() - t0, 2)})
        log(f"  [{'ok' if ok else 'FAIL'}] {name} ({time.time() - t0:.1f} s) {str(detail).splitlines()[0] if detail else ''}")

    @property
    def ok(self):
        return all(r["ok"] for r in self.results)


def rand_i8(*shape, device="cuda"):
    import torch
    t = torch.randint(-128, 128, shape, dtype=torch.int8, device=device)
    if t.numel():
        t.view(-1)[0] = -128
    return t


def exact_ref_mm(a, w):
    """Integer reference on the GPU: a float64 GEMM of int8 values is exact (|sum| < 2**53)."""
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


def gpu_checks(K8) -> list:
    import torch
    ops = torch.ops.pysparse
    c = Checks()
    torch.manual_seed(0)

    def mm_shapes():
        shapes = [(1, 1, 1), (3, 17, 33), (17, 65, 130), (5, 9, 16384), (1, 4096, 4096), (16, 4096, 4096),
                  (17, 4096, 4096), (128, 11008, 4096), (2048, 4096, 4096), (300, 1000, 1000)]
        for M, N, K in shapes:
            a, w = rand_i8(M, K), rand_i8(N, K)
            out = K8.int8_mm_triton(a, w)
            if not torch.equal(out.to(torch.int64), exact_ref_mm(a, w)):
                raise AssertionError(f"int8_mm_triton differs from the exact reference at M,N,K={M},{N},{K}")
        return f"{len(shapes)} shapes exact"
    c.run("int8_mm_triton exact (incl. M=1..2048, K=16384)", mm_shapes)

    def mm_extremes():
        K = K8.MAX_K
        a = torch.full((1, K), -128, dtype=torch.int8, device="cuda")
        w = torch.stack([torch.full((K,), -128, dtype=torch.int8, device="cuda"),
                         torch.full((K,), 127, dtype=torch.int8, device="cuda")])
        got = K8.int8_mm_triton(a, w)[0].tolist()
        if got != [16384 * K, -128 * 127 * K]:
            raise AssertionError(f"extremes at K={K}: {got}")
        return f"K={K}: {got}"
    c.run("int8_mm_triton extremes at MAX_K", mm_extremes)

    def strided():
        a_big, w_big = rand_i8(9, 200), rand_i8(21, 128)
        a, w = a_big[:, ::2], w_big[:, :100]
        if not torch.equal(K8.int8_mm_triton(a, w).to(torch.int64), exact_ref_mm(a, w)):
            raise AssertionError("strided operands")
    c.run("int8_mm_triton strided operands", strided)

    def op_mm():
        a, w = rand_i8(33, 1000), rand_i8(70, 1000)
        p, cs = ops.int8_pack(w, 0)
        got = ops.int8_mm(a, p, cs, 70, 1000).cpu()
        ref = ops.int8_mm(a.cpu(), *ops.int8_pack(w.cpu(), 0), 70, 1000)
        if not torch.equal(got, ref):
            raise AssertionError("pysparse::int8_mm CUDA != CPU")
    c.run("pysparse::int8_mm CUDA == CPU", op_mm)

    def pack_roundtrip():
        w = rand_i8(70, 130)
        for g in (0, 64, 128):
            p, cs = ops.int8_pack(w, g)
            if not torch.equal(ops.int8_unpack(p, cs, 70, 130), w):
                raise AssertionError(f"unpack(pack(w)) != w for group_size={g}")
            if not torch.equal(cs.cpu(), ops.int8_pack(w.cpu(), g)[1]):
                raise AssertionError(f"colsum CUDA != CPU for group_size={g}")
    c.run("int8_pack / int8_unpack round trip, colsum", pack_roundtrip)

    def linear_vs_cpu():
        notes, all_exact = [], True
        for (M, K, N) in [(5, 130, 70), (33, 4096, 1000), (1, 4096, 4096), (300, 1000, 520)]:
            w = rand_i8(N, K)
            Np = (N + 63) // 64 * 64
            ws = torch.ones(1, Np, device="cuda")
            ws[0, :N] = torch.rand(N, device="cuda") * 0.01 + 1e-4
            bias = torch.randn(N, device="cuda")
            p, cs = ops.int8_pack(w, 0)
            pc, csc = ops.int8_pack(w.cpu(), 0)
            for dtype in (torch.float32, torch.bfloat16, torch.float16):
                x = (torch.randn(M, K, device="cuda") * 3).to(dtype)
                if M >= 4:
                    x[1] = 0
                    x[2, 3] = float("nan")
                    x[3, 5] = float("inf")
                for x_scale in (None, torch.tensor([0.05], device="cuda")):
                    for b in (None, bias):
                        y = ops.int8_linear(x, p, cs, ws, b, x_scale, N, K)
                        ref = ops.int8_linear(x.cpu(), pc, csc, ws.cpu(), None if b is None else b.cpu(),
                                              None if x_scale is None else x_scale.cpu(), N, K)
                        eq, diff = same_bits(y, ref)
                        if not eq:
                            all_exact = False
                            scale = ref[~torch.isnan(ref)].abs().max().item() if (~torch.isnan(ref)).any() else 1.0
                            notes.append(f"M,K,N={M},{K},{N} {dtype} static={x_scale is not None} "
                                         f"bias={b is not None}: max|diff|={diff:.3g} (max|y|={scale:.3g})")
                            tol = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-3}[dtype]
                            if diff > tol * max(scale, 1.0):
                                raise AssertionError("; ".join(notes))
        return "bit-exact" if all_exact else "close, NOT bit-exact: " + "; ".join(notes[:5])
    c.run("pysparse::int8_linear CUDA vs CPU op (3 dtypes, dynamic/static, bias)", linear_vs_cpu)

    def grouped():
        import warnings
        N, K, g = 96, 1000, 128
        w = rand_i8(N, K)
        p, cs = ops.int8_pack(w, g)
        G = cs.shape[0]
        ws = torch.ones(G, 128, device="cuda")
        ws[:, :N] = torch.rand(G, N, device="cuda") * 0.01 + 1e-4
        x = torch.randn(9, K, device="cuda", dtype=torch.bfloat16)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            y = ops.int8_linear(x, p, cs, ws, None, None, N, K)
        ref = ops.int8_linear(x.cpu(), *ops.int8_pack(w.cpu(), g), ws.cpu(), None, None, N, K)
        eq, diff = same_bits(y, ref)
        if diff > 1e-2 * max(ref.abs().max().item(), 1.0):
            raise AssertionError(f"grouped CUDA vs CPU: max|diff|={diff}")
        return "bit-exact" if eq else f"close (max|diff|={diff:.3g})"
    c.run("grouped weights (PyTorch fallback) CUDA vs CPU", grouped)

    def module():
        from pysparse.nn import Int8Linear
        lin = torch.nn.Linear(300, 130)
        m = Int8Linear.from_float(lin)
        x = torch.randn(4, 7, 300)
        ref = m(x)
        m = m.cuda()
        y = m(x.cuda())
        eq, diff = same_bits(y, ref)
        if diff > 1e-4 * max(ref.abs().max().item(), 1.0):
            raise AssertionError(f"Int8Linear CUDA vs CPU: max|diff|={diff}")
        back = m.cpu()(x)
        if not torch.equal(back, ref):
            raise AssertionError("Int8Linear moved CUDA -> CPU changed its output")
        return ("bit-exact" if eq else f"close (max|diff|={diff:.3g})") + f"; {m.extra_repr()}"
    c.run("pysparse.nn.Int8Linear .cuda() and back", module)

    def compiled():
        from pysparse.nn import Int8Linear
        m = Int8Linear.from_float(torch.nn.Linear(256, 64)).cuda()
        x = torch.randn(8, 256, device="cuda", dtype=torch.bfloat16)
        ref = m(x)
        y = torch.compile(m, fullgraph=True)(x)
        if not torch.equal(y, ref):
            raise AssertionError("torch.compile(fullgraph=True) output differs from eager")
    c.run("torch.compile(fullgraph=True) of Int8Linear on CUDA", compiled)
    return c


# ------------------------------------------------------------------------------ 3. timings
def bench(K8) -> list:
    import torch
    import torch.nn.functional as F
    import triton.testing as tt
    ops = torch.ops.pysparse
    rows = []
    torch.manual_seed(0)

    def time_ms(fn, graph=False):
        try:
            fn()
            torch.cuda.synchronize()  # the first call autotunes; keep it out of the timing
            if graph:
                return tt.do_bench_cudagraph(fn, return_mode="median")
            return tt.do_bench(fn, return_mode="median")
        except Exception as e:
            log(f"    timing failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            return None

    for N, K in SHAPES_NK:
        w = torch.randn(N, K, device="cuda")
        s = w.abs().amax(dim=1) / 127
        w_q = torch.round(w / s[:, None]).clamp(-127, 127).to(torch.int8)
        w_bf16 = w.to(torch.bfloat16)
        packed, colsum = ops.int8_pack(w_q, 0)
        Np = colsum.shape[1]
        w_scale = torch.ones(1, Np, device="cuda")
        w_scale[0, :N] = s
        for M in MS:
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            amax = x.float().abs().amax(dim=1)
            x_scale = amax / 127
            x_q = torch.round(x.float() / x_scale[:, None]).clamp(-128, 127).to(torch.int8)
            r = {"M": M, "N": N, "K": K}
            r["int8_op_ms"] = time_ms(lambda: ops.int8_linear(x, packed, colsum, w_scale, None, None, N, K))
            r["int8_op_graph_ms"] = time_ms(lambda: ops.int8_linear(x, packed, colsum, w_scale, None, None, N, K),
                                            graph=True)
            r["int8_gemm_ms"] = time_ms(lambda: K8.int8_linear_triton(x_q, x_scale, w_q, s, None, torch.bfloat16))
            r["bf16_ms"] = time_ms(lambda: F.linear(x, w_bf16))
            r["int_mm_ms"] = time_ms(lambda: torch._int_mm(x_q, w_q.t())) if M > 16 else None
            for k in ("int8_op", "int8_gemm"):
                a, b = r[f"{k}_ms"], r["bf16_ms"]
                r[f"{k}_speedup_vs_bf16"] = round(b / a, 3) if a and b else None
            rows.append(r)
            log(f"  M={M:5d} N={N:5d} K={K}: " + ", ".join(
                f"{k}={v:.4f}" for k, v in r.items() if k.endswith("_ms") and v is not None))
    return rows


def fmt(v, nd=4):
    return "-" if v is None else f"{v:.{nd}f}"


def table(rows) -> str:
    head = ("| M | N | K | int8 op ms | int8 op (graph) ms | int8 GEMM ms | bf16 cuBLAS ms | _int_mm ms "
            "| op vs bf16 | GEMM vs bf16 |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        lines.append(f"| {r['M']} | {r['N']} | {r['K']} | {fmt(r['int8_op_ms'])} | {fmt(r['int8_op_graph_ms'])} "
                     f"| {fmt(r['int8_gemm_ms'])} | {fmt(r['bf16_ms'])} | {fmt(r['int_mm_ms'])} "
                     f"| {fmt(r['int8_op_speedup_vs_bf16'], 2)}x | {fmt(r['int8_gemm_speedup_vs_bf16'], 2)}x |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------ main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default="gpu_check.json", help="where to write the results (JSON)")
    ap.add_argument("--pytest-timeout", type=int, default=300, help="seconds for the pytest run")
    ap.add_argument("--skip-tests", action="store_true", help="skip the pytest run")
    ap.add_argument("--skip-bench", action="store_true", help="skip the timings")
    args = ap.parse_args(argv)

    try:
        import torch
    except ImportError as e:
        log(f"no CUDA device: skipped (torch does not import: {e})")
        return 0
    if not torch.cuda.is_available():
        log("no CUDA device: skipped")
        return 0

    # Compiled kernels here: triton must not be imported in interpreter mode.
    os.environ.pop("TRITON_INTERPRET", None)
    sys.path.insert(0, str(ROOT))
    t_start = time.time()
    report = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "gpu": torch.cuda.get_device_name(0),
              "capability": ".".join(map(str, torch.cuda.get_device_capability(0))),
              "torch": torch.__version__, "cuda": torch.version.cuda, "python": sys.version.split()[0]}
    log(f"# pysparse GPU check: {report['gpu']} (sm_{report['capability'].replace('.', '')}), "
        f"torch {report['torch']}, CUDA {report['cuda']}")

    status = 0
    if not args.skip_tests:
        log("\n## 1. pytest")
        report["pytest"] = run_pytest(args.pytest_timeout)
        if not report["pytest"]["ok"]:
            status = 1

    try:
        import triton
        import pysparse  # noqa: F401
        import pysparse.ops  # noqa: F401  (fake kernels: torch.compile)
        from pysparse import _cuda_ops
        report["triton"] = triton.__version__
        if not _cuda_ops.REGISTERED:
            raise RuntimeError("pysparse._cuda_ops registered no CUDA kernels (is triton installed?)")
        K8 = _cuda_ops._triton_kernels()
    except Exception as e:
        report["setup_error"] = f"{type(e).__name__}: {e}"
        log(f"setup failed: {report['setup_error']}")
        traceback.print_exc()
        Path(args.json).write_text(json.dumps(report, indent=2))
        return 2
    log(f"triton {report['triton']}")

    log("\n## 2. compiled-kernel checks")
    checks = gpu_checks(K8)
    report["checks"] = checks.results
    if not checks.ok:
        status = 1

    if not args.skip_bench:
        log("\n## 3. timings (triton.testing.do_bench, median, ms)")
        rows = bench(K8)
        report["bench"] = rows
        cache = getattr(K8._int8_gemm_kernel, "cache", {})
        report["autotune"] = {str(k): str(v) for k, v in cache.items()}
        log("\n" + table(rows))
        if not checks.ok:
            log("\n(some checks FAILED: the timings above are of wrong kernels)")

    report["seconds"] = round(time.time() - t_start, 1)
    report["status"] = status
    Path(args.json).write_text(json.dumps(report, indent=2))
    log(f"\nwrote {args.json}; {'all passed' if status == 0 else 'FAILURES (see above)'}; {report['seconds']} s")
    return status


if __name__ == "__main__":
    sys.exit(main())
