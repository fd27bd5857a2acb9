"""``pysparse bench kernels``: the registered kernel families, and the runner that times
every contender of a family side by side on each case of its grid."""
from __future__ import annotations

import itertools
import math
import sys
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from . import peers
from .machine import l3_bytes, run_header
from .registry import FAMILIES, Case, Contender, KernelFamily, family_meta, register_family
from .timing import TimingConfig, Timed, measure_bandwidth, rotation_sets, time_gpu, time_interleaved

M_GRID = (1, 16, 128, 512)
INT8_SHAPES = ((4096, 4096), (11008, 4096))  # (N, K): a square layer and an LLM MLP up-projection
DENSITIES = (0.1, 0.25, 0.5)
QUICK_SPARSE_M = 16  # --quick keeps one M for the sparse grid: small-batch inference, where
                     # sparsity is meant to pay by streaming fewer weight bytes
CHECK_ROWS = 8       # rows of each output compared with the float64 reference


def _base_weight(N: int, K: int) -> torch.Tensor:
    # N(0, 1/K): the scale of a trained layer's weights; seeded by shape, so every contender
    # and every run of a shape sees the same weight.
    g = torch.Generator().manual_seed(1_000_003 * N + K)
    return torch.randn(N, K, generator=g) / math.sqrt(K)


def block_prune(w: torch.Tensor, density: float, block: int = peers.BSR_BLOCK) -> torch.Tensor:
    """Magnitude pruning by blocks: keep the ``density`` fraction of block x block tiles of
    ``w`` [N, K] with the largest L1 norm, zero the rest. Shapes that blocks do not tile
    are pruned element by element instead."""
    N, K = w.shape
    if density >= 1.0:
        return w.clone()
    if N % block or K % block:
        keep = max(1, round(density * w.numel()))
        mask = torch.zeros(w.numel(), dtype=torch.bool)
        mask[w.abs().flatten().topk(keep).indices] = True
        return w * mask.view(N, K)
    tiles = w.view(N // block, block, K // block, block)
    norms = tiles.abs().sum(dim=(1, 3)).flatten()
    mask = torch.zeros_like(norms, dtype=torch.bool)
    mask[norms.topk(max(1, round(density * norms.numel()))).indices] = True
    return (tiles * mask.view(N // block, 1, K // block, 1)).reshape(N, K)


Shapes = Optional[Sequence[tuple[int, int, int]]]  # (M, N, K) triples from the hidden --shapes


def _int8_cases(quick: bool, shapes: Shapes) -> list[Case]:
    if shapes:
        return [Case(M, N, K) for M, N, K in shapes]
    nk = INT8_SHAPES[:1] if quick else INT8_SHAPES
    return [Case(M, N, K) for N, K in nk for M in M_GRID]


def _int8_contenders(device: str) -> list[Contender]:
    if device == "cuda":
        return [peers.pysparse_int8_cuda(), peers.dense("cublas-bf16", torch.bfloat16, "cuda"),
                peers.torchao_int8("cuda"), peers.int_mm("cuda")]
    return [*(peers.pysparse_int8(isa) for isa in peers.cpu_isas()), peers.dense("fp32"),
            peers.dense("bf16", torch.bfloat16), peers.quantize_dynamic(), peers.torchao_int8(), peers.int_mm()]


def _sparse_cases(quick: bool, shapes: Shapes) -> list[Case]:
    if shapes:
        return [Case(M, N, K, d) for M, N, K in shapes for d in DENSITIES]
    ms = (QUICK_SPARSE_M,) if quick else M_GRID
    return [Case(M, 4096, 4096, d) for d in DENSITIES for M in ms]


def _sparse_contenders(device: str) -> list[Contender]:
    return [peers.pysparse_bsr(), peers.torch_sparse("bsr"), peers.torch_sparse("csr"), peers.dense("dense-fp32")]


register_family(KernelFamily(
    name="int8_linear", title="int8 linear layer (dynamic per-row int8 activations)",
    cases=_int8_cases, contenders=_int8_contenders,
    make_weight=lambda c: _base_weight(c.N, c.K), bandwidth_column=True, devices=("cpu", "cuda")))

register_family(KernelFamily(
    name="sparse_linear", title=f"block-sparse linear ({peers.BSR_BLOCK}x{peers.BSR_BLOCK} blocks, magnitude-pruned), fp32",
    cases=_sparse_cases, contenders=_sparse_contenders,
    make_weight=lambda c: block_prune(_base_weight(c.N, c.K), c.density),
    speedup_for=("pysparse-bsr", "torch-bsr", "torch-csr"), reference="dense-fp32", x_axis="density", ideal=True))


@dataclass
class KernelRun:
    """One ``pysparse bench kernels`` run. shapes (hidden --shapes) replaces every family's
    grid by these (M, N, K); families empty means all registered."""

    quick: bool = False
    families: tuple[str, ...] = ()
    shapes: Shapes = None
    device: str = "cpu"
    timing: TimingConfig = field(default_factory=TimingConfig.full)
    bandwidth_bytes: int = 1 << 30
    progress: bool = True


def _rel_err(y: Any, ref: torch.Tensor) -> float:
    y = y[: ref.shape[0]].detach().to("cpu", torch.float64)
    return float((y - ref).norm() / ref.norm().clamp(min=1e-30))


def _rotating(call: Callable[[Any, torch.Tensor], Any], sets: list, x: torch.Tensor) -> Callable[[], Any]:
    if len(sets) == 1:
        state = sets[0]
        return lambda: call(state, x)
    it = itertools.cycle(sets)
    return lambda: call(next(it), x)


def _run_case(family: KernelFamily, case: Case, contenders: list[Contender], w: torch.Tensor,
              b: torch.Tensor, states: dict[str, list], run: KernelRun, l3: int, read_GBps: Optional[float],
              skipped: list[dict]) -> list[dict]:
    g = torch.Generator().manual_seed(case.M * 31 + case.K)
    x = torch.randn(case.M, case.K, generator=g)
    ref = F.linear(x[:CHECK_ROWS].double(), w.double(), b.double())
    items, meta = [], {}
    for c in contenders:
        if not c.applies(case):
            continue
        key = c.state_key or c.name
        n_sets = rotation_sets(case.M, c.weight_bytes(case), run.timing, l3) if run.device == "cpu" else 1
        try:
            sets = states.setdefault(key, [])
            if not sets:
                sets.append(c.prepare(w, b))
            while len(sets) < n_sets:
                sets.append(c.copy(sets[0]))
            fn = _rotating(c.call, sets[:n_sets], c.input(x))
        except Exception as e:  # a peer that cannot convert this shape: skip it, say why
            skipped.append({"family": family.name, "contender": c.name, "case": asdict(case),
                            "reason": f"prepare failed: {type(e).__name__}: {e}".splitlines()[0]})
            continue
        check = (lambda y: _rel_err(y, ref)) if c.tolerance is not None else None
        items.append(Timed(c.name, fn, c.env, check))
        meta[c.name] = (c, n_sets)
    failures: dict[str, str] = {}
    timer = time_gpu if run.device == "cuda" else time_interleaved
    stats = timer(items, run.timing, failures)
    for name, why in failures.items():
        skipped.append({"family": family.name, "contender": name, "case": asdict(case), "reason": f"failed: {why}"})
    rows = []
    for name, st in stats.items():
        c, n_sets = meta[name]
        wb = c.weight_bytes(case)
        rows.append({"family": family.name, **asdict(case), "contender": name, "role": c.role,
                     "median_ms": st.median_ms, "iqr_ms": st.iqr_ms, "q1_ms": st.q1_ms, "q3_ms": st.q3_ms,
                     "min_ms": st.min_ms, "samples": st.samples, "weight_sets": n_sets, "weight_bytes": wb,
                     "bw_bound_ms": wb / (read_GBps * 1e6) if read_GBps else None,
                     "rel_err": st.error,
                     "check_ok": None if st.error is None else bool(st.error <= c.tolerance)})
        if st.error is not None and st.error > c.tolerance:
            print(f"pysparse bench: warning: {name} at {case} is off the float64 reference by "
                  f"{st.error:.2e} (> {c.tolerance:g})", file=sys.stderr)
    return rows


def run_kernels(run: KernelRun, argv: Sequence[str]) -> dict:
    """Time every selected family's grid; return the results document (see results.py)."""
    from tqdm.auto import tqdm

    doc = run_header("kernels", argv)
    names = run.families or tuple(FAMILIES)
    selected = [FAMILIES[n] for n in names]
    l3 = l3_bytes()
    bw = measure_bandwidth(run.bandwidth_bytes, device=run.device)
    doc.update({"device": run.device, "quick": run.quick, "timing": asdict(run.timing), "bandwidth": asdict(bw),
                "families": {}, "results": [], "skipped": [], "notes": []})
    if run.device == "cpu":
        doc["notes"].append(f"M <= {run.timing.rotate_max_m}: each contender cycles through copies of its "
                            f"weights totalling > {(run.timing.rotate_bytes or 2 * l3) / 1e6:.0f} MB "
                            f"(2 x the {l3 / 1e6:.0f} MB L3; at most {run.timing.max_weight_sets} copies), "
                            "so the weights come from memory, not cache")
    plan = []
    for fam in selected:
        if run.device not in fam.devices:
            doc["skipped"].append({"family": fam.name, "reason": f"no {run.device} contenders"})
            continue
        ready = []
        for c in fam.contenders(run.device):
            why = c.available()
            if why:
                doc["skipped"].append({"family": fam.name, "contender": c.name, "reason": why})
            else:
                ready.append(c)
        doc["families"][fam.name] = family_meta(fam, ready)
        plan.append((fam, ready, fam.cases(run.quick, run.shapes)))
    bar = tqdm(total=sum(len(cs) for _, _, cs in plan), desc="pysparse bench", unit="case",
               file=sys.stderr, disable=not run.progress)
    with torch.no_grad():
        for fam, ready, cases in plan:
            # Cases that share a weight (same N, K, density) share its converted weight sets,
            # so each conversion and copy happens once per weight, not once per M.
            for _, group in itertools.groupby(cases, key=lambda c: (c.N, c.K, c.density)):
                group = list(group)
                w = fam.make_weight(group[0])
                b = torch.randn(group[0].N, generator=torch.Generator().manual_seed(7)) * 0.01
                states: dict[str, list] = {}
                for case in group:
                    bar.set_postfix_str(f"{fam.name} M={case.M} N={case.N} K={case.K} d={case.density:g}")
                    doc["results"] += _run_case(fam, case, ready, w, b, states, run, l3, bw.read_GBps,
                                                doc["skipped"])
                    bar.update()
                del states
    bar.close()
    return doc
