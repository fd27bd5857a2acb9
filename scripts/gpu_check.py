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

Block-sparse (pysparse::bsr_linear / bsr_int8_linear on CUDA, pysparse/_cuda_bsr.py):

2b. BlockSparseLinear from ``pysparse.sparsify(..., dispatch="sparse")`` moved to the GPU:
   fp32/fp16/bf16 blocks against the dense masked weight (within a proven rounding
   bound), int8 blocks against the C++ CPU op (bit for bit expected) and the dense masked
   weight (within the activation-quantization bound), the small-block dense fallback,
   torch.compile(fullgraph=True).
3b. Timings at K = N = 4096, M in {1, 16, 128, 512}, density in {0.05, 0.1, 0.25, 0.5}
   (random 64 x 64 blocks): our Triton BSR (bf16, best of three block shapes; eager and
   CUDA graph), our int8 BSR op, cuBLAS bf16 F.linear, torch._int_mm (M > 16),
   torch.sparse._triton_ops.bsr_dense_mm on the same weight, and 2:4 semi-structured
   sparsity (torch.sparse.to_sparse_semi_structured; at density 0.5).

Prints markdown tables and writes everything as JSON to --json (default gpu_check.json).
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
def time_ms(fn, graph=False):
    """Median ms of fn (triton.testing.do_bench, or do_bench_cudagraph: no launch overhead);
    None (and a log line) when it fails."""
    import torch
    import triton.testing as tt
    try:
        fn()
        torch.cuda.synchronize()  # the first call autotunes; keep it out of the timing
        if graph:
            return tt.do_bench_cudagraph(fn, return_mode="median")
        return tt.do_bench(fn, return_mode="median")
    except Exception as e:
        log(f"    timing failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        return None


def bench(K8) -> list:
    import torch
    import torch.nn.functional as F
    ops = torch.ops.pysparse
    rows = []
    torch.manual_seed(0)

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


# ------------------------------------------------------------------------------ block-sparse (2b, 3b)
# Module-level so that a CPU dry run (interpreted kernels) can shrink them and point
# DEVICE at the CPU; on a GPU machine they are what the docstring says.
DEVICE = "cuda"
BSR_CHECK_NK = [(130, 300), (1000, 4096)]  # (N, K): edge blocks; a real layer's K
BSR_NK = 4096  # timings: K = N
BSR_MS = [1, 16, 128, 512]
BSR_DENSITIES = [0.05, 0.1, 0.25, 0.5]
# (bn, bk) of our bf16 kernel, best one kept per row. The weight is pruned in 64 x 64
# blocks, so each of these stores exactly the same nonzeros; a narrower bn gives decode
# (M <= 16) more programs: 4096 / 64 = 64 block rows would leave half of 132 SMs idle.
BSR_SHAPES = [(64, 64), (32, 64), (16, 64)]
U32 = 2.0 ** -24  # float32 unit roundoff


def fp32_sum_bound(x, w, bias):
    """Elementwise bound on |float32 x @ w^T + bias - exact| for any summation order:
    (K + 2) u (|x| @ |w|^T + |bias|) (gamma_K for the sum, one rounding for the bias)."""
    K = x.shape[-1]
    mag = x.reshape(-1, K).double().abs() @ w.double().abs().T
    if bias is not None:
        mag = mag + bias.double().abs()
    return (K + 2) * U32 * mag


def bsr_checks(KB) -> "Checks":
    """BlockSparseLinear from pysparse.sparsify(..., dispatch="sparse") moved to the GPU,
    against the dense masked weight (float blocks) and the CPU op (int8 blocks)."""
    import copy
    import warnings

    import torch
    import pysparse
    from pysparse.nn import BlockSparseLinear
    c = Checks()
    torch.manual_seed(0)
    # One rounding to the output dtype: at most 2**-11 (fp16) / 2**-8 (bf16) of |y|, taken
    # twice over; below fp16's normal range the spacing is absolute, 2**-24.
    ulp = {torch.float32: 0.0, torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}
    tiny = {torch.float32: 1e-38, torch.float16: 2.0 ** -24, torch.bfloat16: 1e-38}

    def float_blocks():
        notes, worst = [], 0.0
        # Few cases: every (dtype, block, shape, bias / ReLU) variant compiles and autotunes
        # up to 13 Triton configs (x shapes: M = 1 and 15 share the decode configs).
        (n0, k0), (n1, k1) = BSR_CHECK_NK
        cases = [(n0, k0, (64, 32), None), (n1, k1, (64, 64), "relu"), (n0, k0, (16, 16), None)]
        for N, K, blk, act in cases:
            lin = torch.nn.Linear(K, N)
            m = pysparse.sparsify(lin, 0.75, block=blk, dispatch="sparse")  # prunes lin in place too
            if act:
                m = BlockSparseLinear.from_dense(lin, block=blk, activation=act, dispatch="sparse")
            assert m.format == "bsr", m.format
            w = m.dense_weight().float()  # the dense masked weight
            for dtype in (torch.float32, torch.float16, torch.bfloat16):
                md = copy.deepcopy(m).to(DEVICE)
                md = md.half() if dtype == torch.float16 else md.bfloat16() if dtype == torch.bfloat16 else md
                assert md.values.dtype == dtype and md.bias.dtype == torch.float32
                b = md.bias.detach().cpu()  # float32 again, but rounded through dtype by .half() / .bfloat16()
                for shape in ((1, K), (3, 5, K), (300, K)):
                    x = torch.randn(shape)
                    y = md(x.to(DEVICE, dtype)).cpu()
                    # Reference: the kernel's rounded operands (x and weight in dtype), exact sums.
                    xr, wr = x.to(dtype).double(), w.to(dtype).double()
                    ref = xr.reshape(-1, K) @ wr.T + b.double()
                    if act:
                        ref = ref.relu()
                    # One float32 sum (bound above), then one rounding to dtype (<= 1 ulp).
                    bound = fp32_sum_bound(xr, wr, b) + ulp[dtype] * ref.abs() + tiny[dtype]
                    err = (y.reshape(ref.shape).double() - ref).abs()
                    if y.dtype != dtype or y.shape != (*shape[:-1], N) or not bool((err <= bound).all()):
                        raise AssertionError(f"N,K={N},{K} block={blk} {dtype} x{tuple(shape)}: "
                                             f"max err/bound {(err / bound).max().item():.3g}")
                    worst = max(worst, (err / bound).max().item())
            notes.append(f"{N}x{K}/{blk[0]}x{blk[1]}")
        return f"within bound (worst err/bound {worst:.2f}): {', '.join(notes)}; fp32/fp16/bf16 blocks"
    c.run("BlockSparseLinear bsr .to(GPU)/.half()/.bfloat16() vs dense masked weight", float_blocks)

    def small_block_fallback():
        N, K = BSR_CHECK_NK[0]
        lin = torch.nn.Linear(K, N)
        m = pysparse.sparsify(lin, 0.5, block=(16, 8), dispatch="sparse")
        w = m.dense_weight()  # on the CPU module: formats.bsr_f32_to_dense indexes with CPU tensors
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
        return (said[0][:90] + "...") if said else "no warning (already warned in this process?)"
    c.run("bsr_linear 16x8 blocks: dense fallback on CUDA", small_block_fallback)

    def int8_blocks():
        notes, all_exact = [], True
        for N, K in BSR_CHECK_NK:
            lin = torch.nn.Linear(K, N)
            m = pysparse.sparsify(lin, 0.75, dtype=torch.int8, dispatch="sparse")
            assert m.format == "bsr-int8", m.format
            md = copy.deepcopy(m).to(DEVICE)
            if DEVICE == "cuda" and tuple(md.values.shape[1:]) != (64, 64):
                raise AssertionError(f"values not re-laid k-major on the GPU: {tuple(md.values.shape)}")
            wdq, b = m.dense_weight().double(), m.bias_f32.double()
            for dtype in (torch.float32, torch.bfloat16, torch.float16):
                for shape in ((1, K), (3, 5, K), (300, K)):
                    x = (torch.randn(shape) * 3).to(dtype)
                    ref_cpu = m(x)  # the C++ CPU op
                    y = md(x.to(DEVICE))
                    eq, diff = same_bits(y, ref_cpu)
                    if not eq:
                        all_exact = False
                        notes.append(f"{N}x{K} {dtype} x{tuple(shape)}: max|diff| {diff:.3g}")
                        if diff > 1e-2 * max(ref_cpu.abs().max().item(), 1.0):
                            raise AssertionError("; ".join(notes))
                    # Dense masked reference on the float x: per-row activation rounding is at
                    # most s_x / 2 per element (s_x = amax / 127), so |y - ref| <= s_x / 2 *
                    # sum_k |w_k|; plus the float32 epilogue (a few roundings of magnitudes up
                    # to mag, 8u covers them) and the output rounding.
                    x2 = x.reshape(-1, K).double()
                    ref = x2 @ wdq.T + b
                    sx = x2.abs().amax(1, keepdim=True) / 127
                    qerr = sx / 2 * wdq.abs().sum(1)
                    mag = (x2.abs() + sx / 2) @ wdq.abs().T + b.abs()
                    bound = qerr + 8 * U32 * mag + ulp[dtype] * (ref.abs() + qerr) + tiny[dtype]
                    if not bool(((y.cpu().reshape(ref.shape).double() - ref).abs() <= bound).all()):
                        raise AssertionError(f"{N}x{K} {dtype}: off the dense masked reference")
            back = md.cpu()  # the layout converts back
            x = torch.randn(3, K)
            if not torch.equal(back(x), m(x)):
                raise AssertionError("BlockSparseLinear int8 moved GPU -> CPU changed its output")
        return ("bit-exact vs CPU op" if all_exact else "close to CPU op, NOT bit-exact: " + "; ".join(notes[:4])) + \
            "; within the quantization bound of the dense masked weight"
    c.run("BlockSparseLinear bsr-int8 .to(GPU) vs CPU op and dense masked weight", int8_blocks)

    def built_on_gpu():
        # from_dense on a GPU layer (half blocks allowed there) == the CPU-built layer moved.
        N, K = BSR_CHECK_NK[0]
        lin = torch.nn.Linear(K, N, bias=False)
        pysparse.sparsify(lin, 0.75, block=(64, 64), dispatch="sparse")  # prune lin once, on the CPU
        x = torch.randn(9, K)
        done = []
        for dtype in ((torch.float16, torch.bfloat16, torch.int8) if DEVICE == "cuda" else (torch.int8,)):
            # sparsity 0: convert the zeros as they are (no second pruning on either device)
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
    c.run("sparsify(GPU layer, dtype=fp16/bf16/int8) == CPU-built layer moved", built_on_gpu)

    def bf16_cpu_layer_moved():
        # CPU bf16 blocks are input pairs [nnzb, bk/2, bn, 2]; on the GPU k-major [nnzb, bk, bn]
        N, K = BSR_CHECK_NK[0]
        lin = torch.nn.Linear(K, N)
        m = pysparse.sparsify(lin, 0.75, dtype=torch.bfloat16, dispatch="sparse")
        assert m.values.dim() == 4, tuple(m.values.shape)
        md = copy.deepcopy(m).to(DEVICE)
        if DEVICE == "cuda" and md.values.dim() != 3:
            raise AssertionError(f"bf16 values not k-major on the GPU: {tuple(md.values.shape)}")
        x = torch.randn(7, K).bfloat16()
        y, ref = md(x.to(DEVICE)).cpu().double(), m(x).double()
        if not bool(((y - ref).abs() <= 2.0 ** -6 * ref.abs() + 1e-2).all()):  # two bf16 roundings, fp32 sums
            raise AssertionError("bf16 layer on the GPU differs from the CPU one")
        if not torch.equal(md.cpu().values, m.values):
            raise AssertionError("bf16 blocks moved GPU -> CPU changed")
        return "same output within bf16 rounding; blocks round-trip bit for bit"
    c.run("BlockSparseLinear bf16 blocks built on the CPU, moved to the GPU and back", bf16_cpu_layer_moved)

    def backward_on_gpu():
        # the backward ops' CUDA composites against the CPU kernels, fp32 blocks, fixed pattern
        N, K = BSR_CHECK_NK[0]
        lin = torch.nn.Linear(K, N)
        m = pysparse.sparsify(lin, 0.75, dispatch="sparse")
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
    c.run("BlockSparseLinear backward on CUDA vs CPU", backward_on_gpu)

    def compiled():
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
    c.run("torch.compile(fullgraph=True) of BlockSparseLinear on CUDA", compiled)
    return c


def block_pruned(N, K, density, gen, block=64):
    """float32 [N, K] on DEVICE with round(density * blocks) random nonzero 64 x 64 blocks."""
    import torch
    R, KB = -(-N // block), -(-K // block)
    keep = torch.zeros(R * KB, dtype=torch.bool)
    keep[torch.randperm(R * KB, generator=gen)[:max(1, round(density * R * KB))]] = True
    mask = keep.view(R, 1, KB, 1).expand(R, block, KB, block).reshape(R * block, KB * block)[:N, :K]
    return (torch.randn(N, K, generator=gen) * 0.02 * mask).to(DEVICE)


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


def rel_err(y, ref) -> float:
    y, ref = y.float(), ref.float()
    return ((y - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def bsr_bench(KB) -> tuple[list, list]:
    """Block-sparse timings at K = N = BSR_NK: rows, and the sanity failures (a timed
    result far from the dense bf16 product)."""
    import torch
    import torch.nn.functional as F
    from pysparse import formats
    ops = torch.ops.pysparse
    N = K = BSR_NK
    gen = torch.Generator().manual_seed(0)
    no_torch_bsr = ""
    try:
        from torch.sparse._triton_ops import bsr_dense_mm
    except Exception as e:  # torch without its Triton sparse kernels
        bsr_dense_mm, no_torch_bsr = None, f"{type(e).__name__}: {e}"
    if bsr_dense_mm is None:  # also None where torch found no usable Triton
        no_torch_bsr = no_torch_bsr or "torch.sparse._triton_ops.bsr_dense_mm is None (no usable Triton)"
        log(f"  torch BSR: n/a ({no_torch_bsr})")
    bad, rows = [], []

    def sane(name, y, ref, tol):
        e = rel_err(y, ref)
        if not e <= tol:
            bad.append(f"{name}: relative error {e:.3g} > {tol}")
            log(f"    WRONG {name}: relative error {e:.3g}")
        return e

    w_full = (torch.randn(N, K, generator=gen) * 0.02).to(DEVICE)
    w_full_bf16 = w_full.to(torch.bfloat16)
    w_q_full = torch.randint(-127, 128, (N, K), generator=gen, dtype=torch.int8).to(DEVICE)
    w24 = prune_2_4(w_full).to(torch.bfloat16)
    w24_s, semi_backend = semi_structured(w24)
    if w24_s is None:
        log(f"  2:4 semi-structured: n/a ({semi_backend})")
    weights = {}
    for d in BSR_DENSITIES:
        w = block_pruned(N, K, d, gen)
        wb = w.to(torch.bfloat16)
        p = formats.pack_bsr_int8(w)  # the layer's path: CPU packing, then the GPU layout
        wq = {"values": formats.int8_blocks_to_kmajor(p.values).to(DEVICE), "row_ptr": p.layout.row_ptr.to(DEVICE),
              "col_idx": p.layout.col_idx.to(DEVICE), "colsum": p.colsum.to(DEVICE), "w_scale": p.w_scale.to(DEVICE),
              "ref": (p.q.float() * p.w_scale[0, :N, None]).to(DEVICE, torch.bfloat16)}
        bsr = {s: KB.dense_to_bsr(wb, *s) for s in BSR_SHAPES}
        try:
            tb = wb.to_sparse_bsr((64, 64))
        except Exception as e:
            tb = f"{type(e).__name__}: {str(e)[:80]}"
        weights[d] = (wb, wq, bsr, tb)

    with torch.no_grad():
        for M in BSR_MS:
            x = torch.randn(M, K, generator=gen).to(DEVICE, torch.bfloat16)
            x_q = torch.randint(-128, 128, (M, K), generator=gen, dtype=torch.int8).to(DEVICE)
            base = {"bf16_ms": time_ms(lambda: F.linear(x, w_full_bf16)),
                    "bf16_graph_ms": time_ms(lambda: F.linear(x, w_full_bf16), graph=True),
                    "int_mm_ms": time_ms(lambda: torch._int_mm(x_q, w_q_full.t())) if M > 16 else None}
            semi_ms = None
            if w24_s is not None:
                sane(f"2:4 M={M}", F.linear(x, w24_s), F.linear(x, w24), 1e-2)
                semi_ms = time_ms(lambda: F.linear(x, w24_s))
            # torch's bsr_dense_mm computes W @ x^T and wants x^T's columns (M) a multiple of 16
            Mp = -(-M // 16) * 16
            xt = torch.zeros(K, Mp, device=DEVICE, dtype=torch.bfloat16)
            xt[:, :M] = x.t()
            for d in BSR_DENSITIES:
                wb, wq, bsr, tb = weights[d]
                ref = F.linear(x, wb)
                r = {"M": M, "N": N, "K": K, "density": d, **base}
                by_shape = {}
                for s, (v, rp, ci) in bsr.items():
                    fn = (lambda v=v, rp=rp, ci=ci: ops.bsr_linear(x, v, rp, ci, None, N, K))
                    sane(f"bsr bf16 {s} M={M} d={d}", fn(), ref, 1e-2)
                    by_shape[f"{s[0]}x{s[1]}"] = time_ms(fn)
                ok = {k: v for k, v in by_shape.items() if v is not None}
                best = min(ok, key=ok.get) if ok else None
                r["bsr_bf16_ms_by_block"] = by_shape
                r["bsr_bf16_block"] = best
                r["bsr_bf16_ms"] = ok.get(best)
                if best:
                    v, rp, ci = bsr[tuple(int(t) for t in best.split("x"))]
                    r["bsr_bf16_graph_ms"] = time_ms(lambda: ops.bsr_linear(x, v, rp, ci, None, N, K), graph=True)
                fn8 = (lambda: ops.bsr_int8_linear(x, wq["values"], wq["row_ptr"], wq["col_idx"], wq["colsum"],
                                                   wq["w_scale"], None, None, N, K))
                sane(f"bsr int8 M={M} d={d}", fn8(), F.linear(x, wq["ref"]), 5e-2)
                r["bsr_int8_ms"] = time_ms(fn8)
                r["bsr_int8_graph_ms"] = time_ms(fn8, graph=True)
                r["torch_bsr_ms"], r["torch_bsr_note"] = None, "M padded to 16" if Mp != M else ""
                if bsr_dense_mm is None or isinstance(tb, str):
                    r["torch_bsr_note"] = no_torch_bsr if bsr_dense_mm is None else tb
                else:
                    try:
                        sane(f"torch bsr_dense_mm M={M} d={d}", bsr_dense_mm(tb, xt)[:, :M].t(), ref, 1e-2)
                        r["torch_bsr_ms"] = time_ms(lambda: bsr_dense_mm(tb, xt))
                    except Exception as e:
                        r["torch_bsr_note"] = f"{type(e).__name__}: {str(e)[:80]}"
                        log(f"    torch BSR failed: {r['torch_bsr_note']}")
                r["semi24_ms"] = semi_ms if d == 0.5 else None
                r["semi24_backend"] = semi_backend if d == 0.5 else None
                for k in ("bsr_bf16", "bsr_int8", "torch_bsr", "semi24", "int_mm"):
                    a, b = r.get(f"{k}_ms"), r["bf16_ms"]
                    r[f"{k}_speedup_vs_bf16"] = round(b / a, 3) if a and b else None
                a, b = r.get("bsr_bf16_graph_ms"), r["bf16_graph_ms"]
                r["bsr_bf16_graph_speedup_vs_bf16_graph"] = round(b / a, 3) if a and b else None
                rows.append(r)
                log(f"  M={M:4d} density={d:<4}: " + ", ".join(
                    f"{k[:-3]}={v:.4f}" for k, v in r.items() if k.endswith("_ms") and v is not None))
    return rows, bad


def bsr_table(rows) -> str:
    def cell(ms, speedup):
        return "n/a" if ms is None else f"{ms:.4f} ({speedup:.2f}x)"

    head = ("| M | density | cuBLAS bf16 ms | BSR bf16 (block) | BSR bf16 graph | BSR int8 | torch BSR | 2:4 "
            "| _int_mm |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        lines.append(
            f"| {r['M']} | {r['density']} | {fmt(r['bf16_ms'])} "
            f"| {cell(r['bsr_bf16_ms'], r['bsr_bf16_speedup_vs_bf16'])} {r['bsr_bf16_block'] or ''} "
            f"| {cell(r.get('bsr_bf16_graph_ms'), r['bsr_bf16_graph_speedup_vs_bf16_graph'])} "
            f"| {cell(r['bsr_int8_ms'], r['bsr_int8_speedup_vs_bf16'])} "
            f"| {cell(r['torch_bsr_ms'], r['torch_bsr_speedup_vs_bf16'])} "
            f"| {cell(r['semi24_ms'], r['semi24_speedup_vs_bf16']) if r['density'] == 0.5 else '-'} "
            f"| {cell(r['int_mm_ms'], r['int_mm_speedup_vs_bf16']) if r['int_mm_ms'] else '-'} |")
    lines.append("")
    lines.append(f"K = N = {BSR_NK}, bf16 activations; ms = do_bench median (L2 flushed), (speedup vs cuBLAS bf16 "
                 "dense); graph: both sides in CUDA graphs; BSR int8 includes activation quantization; torch BSR "
                 "= torch.sparse._triton_ops.bsr_dense_mm (64x64, x^T padded to 16 columns); 2:4 and _int_mm "
                 "are dense-shape peers (2:4 at 50%).")
    return "\n".join(lines)


# ------------------------------------------------------------------------------ main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default="gpu_check.json", help="where to write the results (JSON)")
    ap.add_argument("--pytest-timeout", type=int, default=300, help="seconds for the pytest run")
    ap.add_argument("--skip-tests", action="store_true", help="skip the pytest run")
    ap.add_argument("--skip-bench", action="store_true", help="skip the timings")
    ap.add_argument("--skip-int8", action="store_true", help="skip the dense int8 checks and timings")
    ap.add_argument("--skip-bsr", action="store_true", help="skip the block-sparse checks and timings")
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
        from pysparse import _cuda_bsr, _cuda_ops
        report["triton"] = triton.__version__
        if not (_cuda_ops.REGISTERED and _cuda_bsr.REGISTERED):
            raise RuntimeError("pysparse._cuda_ops / _cuda_bsr registered no CUDA kernels (is triton installed?)")
        K8 = _cuda_ops._triton_kernels()
        KB = _cuda_bsr._triton_kernels()
    except Exception as e:
        report["setup_error"] = f"{type(e).__name__}: {e}"
        log(f"setup failed: {report['setup_error']}")
        traceback.print_exc()
        Path(args.json).write_text(json.dumps(report, indent=2))
        return 2
    log(f"triton {report['triton']}")

    checks_ok = True
    if not args.skip_int8:
        log("\n## 2. compiled-kernel checks")
        checks = gpu_checks(K8)
        report["checks"] = checks.results
        checks_ok = checks.ok
    if not args.skip_bsr:
        log("\n## 2b. block-sparse checks")
        bchecks = bsr_checks(KB)
        report["bsr_checks"] = bchecks.results
        checks_ok = checks_ok and bchecks.ok
    if not checks_ok:
        status = 1

    if not args.skip_bench:
        tables = []
        if not args.skip_int8:
            log("\n## 3. timings (triton.testing.do_bench, median, ms)")
            rows = bench(K8)
            report["bench"] = rows
            cache = getattr(K8._int8_gemm_kernel, "cache", {})
            report["autotune"] = {str(k): str(v) for k, v in cache.items()}
            tables.append(table(rows))
        if not args.skip_bsr:
            log("\n## 3b. block-sparse timings (triton.testing.do_bench, median, ms)")
            rows, bad = bsr_bench(KB)
            report["bsr_bench"] = rows
            report["bsr_bench_wrong"] = bad
            report["bsr_autotune"] = {str(k): str(v) for k, v in getattr(KB._bsr_kernel, "cache", {}).items()}
            report["bsr_table"] = bsr_table(rows)
            tables.append(report["bsr_table"])
            if bad:
                status = 1
        for t in tables:
            log("\n" + t)
        if not checks_ok:
            log("\n(some checks FAILED: the timings above are of wrong kernels)")

    report["seconds"] = round(time.time() - t_start, 1)
    report["status"] = status
    Path(args.json).write_text(json.dumps(report, indent=2))
    log(f"\nwrote {args.json}; {'all passed' if status == 0 else 'FAILURES (see above)'}; {report['seconds']} s")
    return status


if __name__ == "__main__":
    sys.exit(main())
