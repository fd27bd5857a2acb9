"""scripts/gpu_check.py sections 1-4: int8 and block-sparse correctness (compiled Triton
kernels against the C++ CPU ops and exact references, one fixed config per M bucket) and
their timings (autotuned, against cuBLAS bf16, torch._int_mm and torch's BSR kernel)."""
from __future__ import annotations

import copy

import gpu_check_common as ST
from gpu_check_common import (U32, Section, _fixed, cell, exact_ref_mm, fmt, fp32_sum_bound, log, rand_i8, ratio,
                              rel_err, same_bits, speedup, time_ms)


# ------------------------------------------------------------------------------ 1. int8 correctness
def sec_int8_correctness(s: Section) -> None:
    import torch
    ops = torch.ops.pysparse
    K8 = s.run.K8
    _fixed(True)
    torch.manual_seed(0)

    def mm_shapes():
        for M, N, K in ST.PLAN.mm_shapes:
            a, w = rand_i8(M, K), rand_i8(N, K)
            if not torch.equal(K8.int8_mm_triton(a, w).to(torch.int64), exact_ref_mm(a, w)):
                raise AssertionError(f"int8_mm_triton differs from the exact reference at M,N,K={M},{N},{K}")
        return f"{len(ST.PLAN.mm_shapes)} shapes exact"
    s.check("int8_mm_triton exact (M=1..2048, K up to 16384)", mm_shapes)

    def mm_extremes():
        K = ST.PLAN.extremes_k or K8.MAX_K
        a = torch.full((1, K), -128, dtype=torch.int8, device=ST.DEVICE)
        w = torch.stack([torch.full((K,), -128, dtype=torch.int8, device=ST.DEVICE),
                         torch.full((K,), 127, dtype=torch.int8, device=ST.DEVICE)])
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
        p, cs = ST.G.int8_pack(w, 0)
        got = ST.G.int8_mm(a, p, cs, 70, 1000).cpu()
        ref = ops.int8_mm(a.cpu(), *ops.int8_pack(w.cpu(), 0), 70, 1000)
        if not torch.equal(got, ref):
            raise AssertionError("pysparse::int8_mm CUDA != CPU")
    s.check("pysparse::int8_mm CUDA == CPU", op_mm)

    def pack_roundtrip():
        w = rand_i8(70, 130)
        for g in (0, 64, 128):
            p, cs = ST.G.int8_pack(w, g)
            if not torch.equal(ST.G.int8_unpack(p, cs, 70, 130), w):
                raise AssertionError(f"unpack(pack(w)) != w for group_size={g}")
            if not torch.equal(cs.cpu(), ops.int8_pack(w.cpu(), g)[1]):
                raise AssertionError(f"colsum CUDA != CPU for group_size={g}")
    s.check("int8_pack / int8_unpack round trip, colsum", pack_roundtrip)

    def linear_vs_cpu():
        notes, all_exact = [], True
        # every dtype and bias on the edge shape and decode; bf16 on the others (each
        # (dtype, bias, M bucket) is one compile)
        for i, (M, K, N) in enumerate(ST.PLAN.linear_shapes):
            w = rand_i8(N, K)
            Np = (N + 63) // 64 * 64
            ws = torch.ones(1, Np, device=ST.DEVICE)
            ws[0, :N] = torch.rand(N, device=ST.DEVICE) * 0.01 + 1e-4
            bias = torch.randn(N, device=ST.DEVICE)
            p, cs = ST.G.int8_pack(w, 0)
            pc, csc = ops.int8_pack(w.cpu(), 0)
            for dtype in ((torch.float32, torch.bfloat16, torch.float16) if i in (0, 2) else (torch.bfloat16,)):
                x = (torch.randn(M, K, device=ST.DEVICE) * 3).to(dtype)
                if M >= 4:
                    x[1] = 0
                    x[2, 3] = float("nan")
                    x[3, 5] = float("inf")
                for x_scale in (None, torch.tensor([0.05], device=ST.DEVICE)):
                    for b in (None, bias):
                        y = ST.G.int8_linear(x, p, cs, ws, b, x_scale, N, K)
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
        p, cs = ST.G.int8_pack(w, g)
        Gn = cs.shape[0]
        ws = torch.ones(Gn, 128, device=ST.DEVICE)
        ws[:, :N] = torch.rand(Gn, N, device=ST.DEVICE) * 0.01 + 1e-4
        x = torch.randn(9, K, device=ST.DEVICE, dtype=torch.bfloat16)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            y = ST.G.int8_linear(x, p, cs, ws, None, None, N, K)
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
        m = m.to(ST.DEVICE)
        y = m(x.to(ST.DEVICE))
        eq, diff = same_bits(y, ref)
        if diff > 1e-4 * max(ref.abs().max().item(), 1.0):
            raise AssertionError(f"Int8Linear CUDA vs CPU: max|diff|={diff}")
        if not torch.equal(m.cpu()(x), ref):
            raise AssertionError("Int8Linear moved CUDA -> CPU changed its output")
        return ("bit-exact" if eq else f"close (max|diff|={diff:.3g})") + f"; {m.extra_repr()}"
    s.check("pysparse.nn.Int8Linear .cuda() and back", module)

    def compiled():
        if not ST.PLAN.torch_compile:
            return "not run: dry run", "inductor is too slow for the rehearsal"
        from pysparse.nn import Int8Linear
        m = Int8Linear.from_float(torch.nn.Linear(256, 64)).to(ST.DEVICE)
        x = torch.randn(8, 256, device=ST.DEVICE, dtype=torch.bfloat16)
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
    nk = ST.PLAN.bsr_check_nk
    # x: decode (M = 1) and a batch with two leading dims (3 x 100 rows: the prefill tile).
    # Each (dtype, block, bias / ReLU, M bucket) is one compile, so not every dtype meets
    # every block: every dtype on the first case, fewer on the others.
    ms = ST.PLAN.bsr_check_ms
    shapes = lambda K: [(ms[0], K), (3, ms[1] // 3, K)]  # noqa: E731
    gpu = ST.DEVICE == "cuda"
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
                md = copy.deepcopy(m).to(ST.DEVICE)
                md = md.half() if dtype == torch.float16 else md.bfloat16() if dtype == torch.bfloat16 else md
                b = md.bias.detach().cpu()
                for shape in shapes(K):
                    x = torch.randn(shape)
                    y = md(x.to(ST.DEVICE, dtype)).cpu()
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
        m = m.to(ST.DEVICE)
        x = torch.randn(5, K)
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            y = m(x.to(ST.DEVICE)).cpu()
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
            md = copy.deepcopy(m).to(ST.DEVICE)
            if ST.DEVICE == "cuda" and (tuple(md.values.shape[1:]) != (64, 64) or md.values.stride(2) != 1):
                raise AssertionError(f"values not K-major on the GPU: {tuple(md.values.shape)}")
            wdq, b = m.dense_weight().double(), m.bias_f32.double()
            for dtype in ((f32, bf16, f16) if i == 0 else (bf16,)):
                for shape in shapes(K):
                    x = (torch.randn(shape) * 3).to(dtype)
                    ref_cpu = m(x)  # the C++ CPU op
                    y = md(x.to(ST.DEVICE))
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
        y = ST.G.bsr_int8_linear(x.to(ST.DEVICE), formats.int8_blocks_to_kmajor(p.values).to(ST.DEVICE),
                              p.layout.row_ptr.to(ST.DEVICE), p.layout.col_idx.to(ST.DEVICE), p.colsum.to(ST.DEVICE),
                              p.w_scale.to(ST.DEVICE), None, None, N, K)
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
        for dtype in ((torch.float16, torch.bfloat16, torch.int8) if ST.DEVICE == "cuda" else (torch.int8,)):
            mg = pysparse.sparsify(copy.deepcopy(lin).to(ST.DEVICE), 0.0, block=(64, 64), dtype=dtype,
                                   dispatch="sparse")
            mc = pysparse.sparsify(copy.deepcopy(lin), 0.0, block=(64, 64),
                                   dtype=torch.int8 if dtype == torch.int8 else None, dispatch="sparse").to(ST.DEVICE)
            if dtype != torch.int8:
                mc.values.data = mc.values.data.to(dtype)
            xd = x.to(ST.DEVICE, torch.bfloat16 if dtype == torch.int8 else dtype)
            if mg.values.device != xd.device or not torch.equal(mg(xd), mc(xd)):
                raise AssertionError(f"{dtype}: built on {ST.DEVICE} != built on the CPU and moved")
            done.append(str(dtype).split(".")[-1])
        return "equal: " + ", ".join(done)
    s.check("sparsify(GPU layer, dtype=fp16/bf16/int8) == CPU-built layer moved", built_on_gpu)

    def bf16_cpu_layer_moved():
        N, K = nk[0]
        m = pysparse.sparsify(torch.nn.Linear(K, N), 0.75, dtype=torch.bfloat16, dispatch="sparse")
        md = copy.deepcopy(m).to(ST.DEVICE)
        if ST.DEVICE == "cuda" and md.values.dim() != 3:
            raise AssertionError(f"bf16 values not k-major on the GPU: {tuple(md.values.shape)}")
        x = torch.randn(7, K).bfloat16()
        y, ref = md(x.to(ST.DEVICE)).cpu().double(), m(x).double()
        if not bool(((y - ref).abs() <= 2.0 ** -6 * ref.abs() + 1e-2).all()):
            raise AssertionError("bf16 layer on the GPU differs from the CPU one")
        if not torch.equal(md.cpu().values, m.values):
            raise AssertionError("bf16 blocks moved GPU -> CPU changed")
        return "same output within bf16 rounding; blocks round-trip bit for bit"
    s.check("BlockSparseLinear bf16 blocks built on the CPU, moved to the GPU and back", bf16_cpu_layer_moved)

    def backward_on_gpu():
        N, K = nk[0]
        m = pysparse.sparsify(torch.nn.Linear(K, N), 0.75, dispatch="sparse")
        md = copy.deepcopy(m).to(ST.DEVICE)
        x, g = torch.randn(33, K), torch.randn(33, N)
        grads = []
        for mod, dev in ((m, "cpu"), (md, ST.DEVICE)):
            xi = x.to(dev).requires_grad_(True)
            (mod(xi) * g.to(dev)).sum().backward()
            grads.append((xi.grad.cpu(), mod.values.grad.cpu(), mod.bias.grad.cpu()))
        for a, b, name in zip(grads[0], grads[1], ("x", "values", "bias")):
            if not torch.allclose(a, b, rtol=1e-4, atol=1e-4):
                raise AssertionError(f"grad of {name} on {ST.DEVICE} differs from the CPU's")
        return "grads of x, blocks and bias match the CPU kernels"
    s.check("BlockSparseLinear backward on CUDA vs CPU", backward_on_gpu)

    def compiled():
        if not ST.PLAN.torch_compile:
            return "not run: dry run", "inductor is too slow for the rehearsal"
        lin = torch.nn.Linear(256, 192)
        for m, dtype in ((pysparse.sparsify(copy.deepcopy(lin), 0.5, block=(64, 64), dispatch="sparse"), torch.bfloat16),
                         (pysparse.sparsify(copy.deepcopy(lin), 0.5, dtype=torch.int8, dispatch="sparse"), torch.float16)):
            m = m.to(ST.DEVICE)
            if m.format == "bsr":
                m = m.to(dtype)
            x = torch.randn(8, 256, device=ST.DEVICE, dtype=dtype)
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
        for N, K in ST.PLAN.int8_nk:
            w = torch.randn(N, K, device=ST.DEVICE)
            sc = w.abs().amax(dim=1) / 127
            w_q = torch.round(w / sc[:, None]).clamp(-127, 127).to(torch.int8)
            w_bf16 = w.to(torch.bfloat16)
            packed, colsum = ST.G.int8_pack(w_q, 0)
            w_scale = torch.ones(1, colsum.shape[1], device=ST.DEVICE)
            w_scale[0, :N] = sc
            for M in ST.PLAN.int8_ms:
                def one(M=M):
                    x = torch.randn(M, K, device=ST.DEVICE, dtype=torch.bfloat16)
                    x_scale = x.float().abs().amax(dim=1) / 127
                    x_q = torch.round(x.float() / x_scale[:, None]).clamp(-128, 127).to(torch.int8)
                    op = lambda: ST.G.int8_linear(x, packed, colsum, w_scale, None, None, N, K)  # noqa: E731
                    r = {"M": M, "N": N, "K": K}
                    r["int8_op_ms"] = time_ms(op)
                    r["int8_op_graph_ms"] = time_ms(op, graph=True)
                    r["int8_gemm_ms"] = time_ms(lambda: K8.int8_linear_triton(x_q, x_scale, w_q, sc, None,
                                                                              torch.bfloat16))
                    r["bf16_ms"] = time_ms(lambda: F.linear(x, w_bf16))
                    r["int_mm_ms"] = time_ms(lambda: torch._int_mm(x_q, w_q.t())) if M > 16 and not ST.DRY else None
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
    """float32 [N, K] on ST.DEVICE with round(density * blocks) random nonzero 64 x 64 blocks."""
    import torch
    R, KB = -(-N // block), -(-K // block)
    keep = torch.zeros(R * KB, dtype=torch.bool)
    keep[torch.randperm(R * KB, generator=gen)[:max(1, round(density * R * KB))]] = True
    mask = keep.view(R, 1, KB, 1).expand(R, block, KB, block).reshape(R * block, KB * block)[:N, :K]
    return (torch.randn(N, K, generator=gen) * 0.02 * mask).to(ST.DEVICE)


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
    lines.append(f"K = N = {ST.PLAN.bsr_nk}, bf16 activations; ms = do_bench median (L2 flushed), (speedup vs cuBLAS "
                 "bf16 dense); graph: both sides in CUDA graphs; BSR int8 includes activation quantization; torch "
                 "BSR = torch.sparse._triton_ops.bsr_dense_mm (64x64, x^T padded to 16 columns).")
    return "\n".join(lines)


def sec_bsr_timing(s: Section) -> None:
    import torch
    import torch.nn.functional as F
    from pysparse import formats
    KB = s.run.KB
    _fixed(False)
    N = K = ST.PLAN.bsr_nk
    gen = torch.Generator().manual_seed(0)
    bsr_dense_mm, no_torch_bsr = None, "dry run (CPU)"
    if not ST.DRY:
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

    w_full_bf16 = (torch.randn(N, K, generator=gen) * 0.02).to(ST.DEVICE, torch.bfloat16)
    w_q_full = torch.randint(-127, 128, (N, K), generator=gen, dtype=torch.int8).to(ST.DEVICE)
    weights = {}
    for d in ST.PLAN.bsr_densities:
        w = block_pruned(N, K, d, gen)
        wb = w.to(torch.bfloat16)
        p = formats.pack_bsr_int8(w.cpu())  # the layer's path: CPU packing, then the GPU layout
        wq = {"values": formats.int8_blocks_to_kmajor(p.values).to(ST.DEVICE), "row_ptr": p.layout.row_ptr.to(ST.DEVICE),
              "col_idx": p.layout.col_idx.to(ST.DEVICE), "colsum": p.colsum.to(ST.DEVICE), "w_scale": p.w_scale.to(ST.DEVICE),
              "ref": (p.q.float() * p.w_scale[0, :N, None]).to(ST.DEVICE, torch.bfloat16)}
        bsr = {sh: KB.dense_to_bsr(wb, *sh) for sh in ST.PLAN.bsr_shapes}
        tb = None
        if bsr_dense_mm is not None:
            try:
                tb = wb.to_sparse_bsr((64, 64))
            except Exception as e:
                tb = f"{type(e).__name__}: {str(e)[:80]}"
        weights[d] = (wb, wq, bsr, tb)

    try:
        with torch.no_grad():
            for M in ST.PLAN.bsr_ms:
                x = torch.randn(M, K, generator=gen).to(ST.DEVICE, torch.bfloat16)
                x_q = torch.randint(-128, 128, (M, K), generator=gen, dtype=torch.int8).to(ST.DEVICE)
                base = {}

                def baseline():
                    base.update({"bf16_ms": time_ms(lambda: F.linear(x, w_full_bf16)),
                                 "bf16_graph_ms": time_ms(lambda: F.linear(x, w_full_bf16), graph=True),
                                 "int_mm_ms": time_ms(lambda: torch._int_mm(x_q, w_q_full.t()))
                                 if M > 16 and not ST.DRY else None})
                    return {"M": M, "baseline": True, **base}
                s.row(f"M={M} dense baselines", baseline)
                Mp = -(-M // 16) * 16  # torch's bsr_dense_mm wants x^T's columns a multiple of 16
                xt = torch.zeros(K, Mp, device=ST.DEVICE, dtype=torch.bfloat16)
                xt[:, :M] = x.t()
                for d in ST.PLAN.bsr_densities:
                    def one(M=M, d=d):
                        wb, wq, bsr, tb = weights[d]
                        ref = F.linear(x, wb)
                        r = {"M": M, "N": N, "K": K, "density": d, **base}
                        by_shape = {}
                        for sh, (v, rp, ci) in bsr.items():
                            fn = (lambda v=v, rp=rp, ci=ci: ST.G.bsr_linear(x, v, rp, ci, None, N, K))
                            sane(f"bsr bf16 {sh} M={M} d={d}", fn(), ref, 1e-2)
                            by_shape[f"{sh[0]}x{sh[1]}"] = time_ms(fn)
                        ok = {k: v for k, v in by_shape.items() if v is not None}
                        best = min(ok, key=ok.get) if ok else None
                        r.update(bsr_bf16_ms_by_block=by_shape, bsr_bf16_block=best, bsr_bf16_ms=ok.get(best))
                        if best:
                            v, rp, ci = bsr[tuple(int(t) for t in best.split("x"))]
                            r["bsr_bf16_graph_ms"] = time_ms(lambda: ST.G.bsr_linear(x, v, rp, ci, None, N, K), graph=True)
                        fn8 = (lambda: ST.G.bsr_int8_linear(x, wq["values"], wq["row_ptr"], wq["col_idx"], wq["colsum"],
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
