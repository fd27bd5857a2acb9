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

Files: this one (the order of the sections, the compile estimate, main), gpu_check_common.py
(the plan, the guarded run, the timer, helpers), gpu_check_linear.py (sections 1-4),
gpu_check_conv.py (sections 5-8); scripts/aot_compile_check.py compiles every kernel
configuration for sm_90a without a GPU.

Exit status: 0 when everything that ran passed (or no CUDA device: "no CUDA device:
skipped"), 1 when a check or a row failed, 2 when the setup (imports) failed.
"""
from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the section modules beside this file

import gpu_check_common as ST  # noqa: E402
from gpu_check_common import (ROOT, Plan, Run, Section, Tee, _fixed, cell, log, ratio, run_section,  # noqa: E402,F401
                              speedup)
from gpu_check_conv import sec_compact_conv, sec_int8_conv, sec_resnet50, sec_semi24  # noqa: E402
from gpu_check_linear import (bsr_table, sec_bsr_correctness, sec_bsr_timing, sec_int8_correctness,  # noqa: E402,F401
                              sec_int8_timing)


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
        ST.G.__dict__.update(int8_pack=_cuda_ops.int8_pack_cuda, int8_unpack=_cuda_ops.int8_unpack_cuda,
                          int8_mm=_cuda_ops.int8_mm_cuda, int8_linear=_cuda_ops.int8_linear_cuda,
                          bsr_linear=_cuda_bsr.bsr_linear_cuda, bsr_int8_linear=_cuda_bsr.bsr_int8_linear_cuda)
    else:
        ops = torch.ops.pysparse
        ST.G.__dict__.update(int8_pack=ops.int8_pack, int8_unpack=ops.int8_unpack, int8_mm=ops.int8_mm,
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
    ST.DRY = DRY = args.dry
    ST.PLAN = Plan.dry() if DRY else Plan.full()
    ST.DEVICE = "cpu" if DRY else "cuda"
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
