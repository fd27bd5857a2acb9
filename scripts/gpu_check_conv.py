"""scripts/gpu_check.py sections 5-8: CompactConv2d (pysparse.ops_conv.compact_conv2d) against
cuDNN, the compacted ResNet-50 against cuDNN on the unpruned one, int8 convolutions, and 2:4
semi-structured sparsity (a dense-shape peer)."""
from __future__ import annotations

import copy
import math
import time

import gpu_check_common as ST
from gpu_check_common import Section, cell, fmt, has_gpu_kernel, log, ratio, rel_err, same_bits, speedup, time_ms


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
        for (N, C, H, W, k, stride) in ST.PLAN.conv_cases:
            def from_case(N=N, C=C, H=H, W=W, k=k, stride=stride):
                import warnings
                with warnings.catch_warnings(record=True) as said:
                    warnings.simplefilter("always")
                    case = case_fn(N, C, C, H, k, keep_in=ST.PLAN.conv_keep, keep_out=ST.PLAN.conv_keep, stride=stride,
                                   device=ST.DEVICE)
                    e = case["check"]()
                if not e <= 1e-4:
                    raise AssertionError(f"compact_conv2d off the float64 reference: max error / max |ref| {e:.3g} "
                                         f"(precision {case.get('precision')})")
                ci, co = round(C * ST.PLAN.conv_keep), round(C * ST.PLAN.conv_keep)
                wfull = torch.randn(C, C, k, k, device=ST.DEVICE).contiguous(memory_format=torch.channels_last)
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
                ci, co = max(1, round(C * ST.PLAN.conv_keep)), max(1, round(C * ST.PLAN.conv_keep))
                pad = k // 2
                in_idx = torch.randperm(C)[:ci].sort().values
                out_idx = torch.randperm(C)[:co].sort().values
                wt = torch.randn(co, ci, k, k) / math.sqrt(ci * k * k)
                bias = torch.randn(co)
                packed = ops_conv.pack_compact_conv2d_weight(wt).to(ST.DEVICE)
                x = torch.randn(N, C, H, W).to(ST.DEVICE).contiguous(memory_format=torch.channels_last)
                res = torch.randn(N, C, (H + 2 * pad - k) // stride + 1, (W + 2 * pad - k) // stride + 1)
                res = res.to(ST.DEVICE).contiguous(memory_format=torch.channels_last)
                ii, oi, wd, bd = in_idx.to(ST.DEVICE), out_idx.to(ST.DEVICE), wt.to(ST.DEVICE), bias.to(ST.DEVICE)

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
                wfull = torch.randn(C, C, k, k, device=ST.DEVICE).contiguous(memory_format=torch.channels_last)
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
    model, name = resnet_model(ST.DRY)
    model.eval()
    size = ST.PLAN.resnet_input
    example = torch.randn(1, 3, size, size)
    built = {}

    def build():
        t0 = time.monotonic()
        masked = copy.deepcopy(model)
        pysparse.prune.filters(masked, 0.5, criterion="l1", example_inputs=(example,))
        compacted = pysparse.compact(masked, (example,))
        macs_d, macs_c = count_macs(model, example), count_macs(compacted, example)
        cl = torch.channels_last
        built["dense"] = _fold(model).to(ST.DEVICE, memory_format=cl)
        built["compact"] = compacted.to(ST.DEVICE, memory_format=cl)
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
                y = built["compact"](x.to(ST.DEVICE).contiguous(memory_format=torch.channels_last)).cpu()
        finally:
            torch.backends.cudnn.allow_tf32 = prev
        e = rel_err(y, ref)
        if not e <= 1e-3:
            raise AssertionError(f"compacted model on {ST.DEVICE} vs the masked model on the CPU: relative error {e:.3g}")
        return f"relative error {e:.2e} vs the masked model (fp32, TF32 off)"
    s.check("compacted ResNet-50 on the GPU == masked model on the CPU", same)

    tf32 = torch.backends.cudnn.allow_tf32
    if ST.DEVICE == "cuda":
        torch.backends.cudnn.benchmark = True
    s.extra["cudnn_allow_tf32"] = tf32
    try:
        with torch.no_grad():
            for b in ST.PLAN.resnet_batches:
                def one(b=b):
                    x = torch.randn(b, 3, size, size, device=ST.DEVICE).contiguous(memory_format=torch.channels_last)
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
        y = copy.deepcopy(q).to(ST.DEVICE)(x.to(ST.DEVICE)).cpu()
        eq, diff = same_bits(y, ref)
        if diff > 1e-4 * max(ref.abs().max().item(), 1.0):
            raise AssertionError(f"Int8Conv2d on {ST.DEVICE} vs CPU: max|diff| {diff:.3g}")
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
    if ST.DEVICE != "cuda" or torch.cuda.get_device_capability()[0] < 8:
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
    N = K = ST.PLAN.bsr_nk
    gen = torch.Generator().manual_seed(0)
    w = (torch.randn(N, K, generator=gen) * 0.02).to(ST.DEVICE)
    w_bf16 = w.to(torch.bfloat16)
    w24 = prune_2_4(w).to(torch.bfloat16)
    w24_s, backend = semi_structured(w24)
    s.extra["backend"] = backend
    if w24_s is None:
        log(f"  2:4 semi-structured: n/a ({backend})")
    try:
        with torch.no_grad():
            for M in ST.PLAN.bsr_ms:
                def one(M=M):
                    x = torch.randn(M, K, generator=gen).to(ST.DEVICE, torch.bfloat16)
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
