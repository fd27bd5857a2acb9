#!/usr/bin/env python3
"""Compile every Triton kernel configuration of pysparse ahead of time for sm_90a (H100 /
H200), without a GPU: triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32)).

What a GPU run would compile: each kernel (kernels/int8_linear.py _int8_gemm_kernel,
kernels/bsr_linear.py _bsr_kernel) x every config of its GPU list (gpu_configs(), with the
block-sparse pruner's stage cuts for each block shape and dtype) x every constexpr variant
that scripts/gpu_check.py launches (plan_launches). A config that does not compile here
(shared memory over the sm_90 limit, an 8-bit dot with K < 32, ...) would fail on the GPU.

Needs Triton's CUDA backend and its ptxas (triton/backends/nvidia/bin/ptxas, or $TRITON_PTXAS_PATH);
without them it prints "skipped: <why>" and exits 0. --quick compiles one config per
kernel variant family (the test in tests/test_gpu_check_dry.py); the default compiles all
and prints the compile times (the per-compile cost in scripts/gpu_check.py's estimate).

Triton here may be newer than the GPU image's (3.6 there): a pass here is strong evidence,
not proof, for the image.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

_PTR = {"torch.float32": "*fp32", "torch.bfloat16": "*bf16", "torch.float16": "*fp16", "torch.int8": "*i8",
        "torch.int32": "*i32"}


def why_unavailable() -> str | None:
    """None when an sm_90a compile can run here, else the reason."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return "TRITON_INTERPRET=1 is set (kernels would be decorated for the interpreter)"
    try:
        import triton
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except Exception as e:
        return f"this Triton has no AOT compile API ({type(e).__name__}: {e})"
    try:
        from triton.backends.nvidia.compiler import get_ptxas  # noqa: F401
    except Exception as e:
        return f"Triton's CUDA backend is missing ({type(e).__name__}: {e})"
    ptxas = os.environ.get("TRITON_PTXAS_PATH") or str(Path(triton.__file__).parent / "backends/nvidia/bin/ptxas")
    if not os.path.exists(ptxas):
        return f"no ptxas ({ptxas} does not exist; the CUDA toolchain piece Triton needs)"
    return None


def _load(op: str):
    spec = importlib.util.spec_from_file_location(f"_pysparse_aot_{op}", ROOT / "kernels" / f"{op}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def jobs(quick: bool) -> list[dict]:
    """Every (kernel, constexprs, pointer dtypes, config) to compile."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import gpu_check
    K8, KB = _load("int8_linear"), _load("bsr_linear")
    size = {"torch.float32": 4, "torch.bfloat16": 2, "torch.float16": 2, "torch.int8": 1}
    variants = {}
    for kernel, _sec, _M, _N, _K, const, _fixed in gpu_check.plan_launches(gpu_check.Plan.full(), K8.MAX_K):
        variants.setdefault((kernel, const), None)
    out, seen = [], set()
    for kernel, const in variants:
        if kernel == "int8_gemm":
            epi, hb, dt = const
            cfgs = K8.gpu_configs()
            fn = K8._int8_gemm_kernel.fn
            ptrs = {"a_ptr": "*i8", "b_ptr": "*i8", "c_ptr": _PTR[dt], "xs_ptr": "*fp32", "ws_ptr": "*fp32",
                    "bias_ptr": "*fp32"}
            consts = {"EPILOGUE": epi, "HAS_BIAS": hb}
            ones = {"stride_ak", "stride_bk", "stride_cn", "stride_xs", "stride_ws", "stride_bias"}
            fam = (kernel, epi)
        else:
            int8, epi, hb, relu, x, v, dt, bk, bn = const
            cfgs = []
            for mb in (16, 64, 4096):  # every M bucket's pruned configs, stages cut for this block
                for c in KB._prune_sizes(KB.gpu_configs(), {"M_BUCKET": mb, "BK": bk, "BN": bn}, size[x], size[v]):
                    if str(c) not in {str(d) for d in cfgs}:
                        cfgs.append(c)
            fn = KB._bsr_kernel.fn
            ptrs = {"x_ptr": _PTR[x], "v_ptr": _PTR[v], "row_ptr_ptr": "*i32", "col_idx_ptr": "*i32",
                    "out_ptr": _PTR[dt], "xs_ptr": "*fp32", "ws_ptr": "*fp32", "bias_ptr": "*fp32"}
            consts = {"INT8": int8, "EPILOGUE": epi, "HAS_BIAS": hb, "RELU": relu, "UPCAST_BF16": False,
                      "BN": bn, "BK": bk}
            # int8 blocks are K-major (stride_vk = 1), float blocks n-contiguous (stride_vn = 1)
            ones = {"stride_xk", "stride_on", "stride_xs", "stride_ws", "stride_bias",
                    "stride_vk" if int8 else "stride_vn"}
            fam = (kernel, int8, x, bk, bn)
        for c in cfgs:
            if quick and fam in seen:
                break
            seen.add(fam)
            out.append({"kernel": kernel, "fn": fn, "ptrs": ptrs, "consts": {**consts, **c.kwargs}, "ones": ones,
                        "num_warps": c.num_warps, "num_stages": c.num_stages,
                        "fp_fusion": not (kernel == "int8_gemm" or (const[0] and const[1])),
                        "label": f"{kernel} {const} {c}"})
    return out


def compile_one(job: dict, arch: int = 90) -> float:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    fn = job["fn"]
    sig, attrs = {}, {}
    consts = dict(job["consts"])
    # As the JIT specializes a launch of pysparse's layouts: pointers 16-byte aligned (torch
    # allocations), unit strides as the constant 1, the other integers divisible by 16 (the
    # timed shapes), M and the do-not-specialize M_BUCKET left general.
    for i, name in enumerate(fn.arg_names):
        if name in job["ptrs"]:
            sig[name] = job["ptrs"][name]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in consts:
            sig[name] = "constexpr"
        elif name in job.get("ones", ()):
            sig[name], consts[name] = "constexpr", 1
        else:
            sig[name] = "i32"
            if name not in ("M", "M_BUCKET"):
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn, sig, constexprs=consts, attrs=attrs)
    t0 = time.perf_counter()
    k = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                       options={"num_warps": job["num_warps"], "num_stages": job["num_stages"],
                                "enable_fp_fusion": job["fp_fusion"]})
    dt = time.perf_counter() - t0
    if "cubin" not in k.asm:
        raise RuntimeError("no cubin produced")
    job["shared"] = k.metadata.shared
    ptx = k.asm.get("ptx", "")
    # how the operands reach the MMA: wgmma (Hopper), cp.async (pipelined loads), byte
    # permutes (an int8 operand transposed in registers: what an n-contiguous int8 B costs)
    job["ptx"] = {"wgmma": ptx.count("wgmma.mma_async"), "cp_async": ptx.count("cp.async.c"),
                  "prmt": ptx.count("prmt"), "st_shared": ptx.count("st.shared")}
    return dt


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one config per kernel variant family")
    ap.add_argument("--json", default=None, help="write the per-config results here")
    args = ap.parse_args(argv)
    # A private cache: every configuration really compiles (no hits from an earlier run),
    # and no race with another process compiling into ~/.triton/cache (seen here once).
    os.environ.setdefault("TRITON_CACHE_DIR", tempfile.mkdtemp(prefix="pysparse-aot-"))
    why = why_unavailable()
    if why:
        print(f"skipped: {why}")
        return 0
    import triton
    todo = jobs(args.quick)
    print(f"AOT compile for sm_90a with Triton {triton.__version__}: {len(todo)} kernel configurations", flush=True)
    results, failed, total = [], 0, 0.0
    for j in todo:
        try:
            dt = compile_one(j)
            total += dt
            results.append({"config": j["label"], "ok": True, "seconds": round(dt, 2), "shared": j.get("shared"),
                            "ptx": j.get("ptx")})
            print(f"  ok   {dt:5.2f} s  smem {j.get('shared', 0) // 1024:3d} KiB  {j.get('ptx')}  {j['label']}", flush=True)
        except Exception as e:
            failed += 1
            msg = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            results.append({"config": j["label"], "ok": False, "error": msg})
            print(f"  FAIL {j['label']}: {msg}", flush=True)
    n = len(results) - failed
    print(f"{n} compiled, {failed} failed; {total:.1f} s in all, {total / max(n, 1):.2f} s per compile", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"triton": triton.__version__, "target": "cuda:90", "results": results},
                                              indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
