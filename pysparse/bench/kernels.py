"""``pysparse bench kernels``: the runner that times every contender of each registered
kernel family (families.py) side by side on each case of its grid."""
from __future__ import annotations

import itertools
import sys
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from .. import ops
from .machine import finish, l3_bytes, run_header
from .peak import fraction_of_peak, instruction_for, measure_peaks
from .registry import FAMILIES, Case, Contender, KernelFamily, family_meta
from .families import Shapes
from .timing import TimingConfig, Timed, env_set, measure_bandwidth, rotation_sets, time_gpu, time_interleaved

CHECK_ROWS = 8  # rows of each output compared with the float64 reference (cheap at any M)


@dataclass
class KernelRun:
    """One ``pysparse bench kernels`` run. shapes (hidden --shapes) replaces every family's
    grid by these (M, N, K); families empty means all registered. peak_ms / peak_repeats:
    how long each register-only peak loop runs and how often (CPU runs; peak_ms 0: none)."""

    quick: bool = False
    families: tuple[str, ...] = ()
    shapes: Shapes = None
    device: str = "cpu"
    timing: TimingConfig = field(default_factory=TimingConfig.full)
    bandwidth_bytes: int = 1 << 30
    peak_ms: float = 30.0
    peak_repeats: int = 3
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


def _kernel_facts(c: Contender, state: Any, case: Case, peaks: Optional[dict]) -> dict:
    """For a contender that runs a pysparse op on the CPU: the kernel it runs at this M (asked
    under its env, as the call runs), the MACs of one call, the peak instruction and its entry."""
    k = c.kernel_op
    if k is None or c.device != "cpu":
        return {}
    try:
        with env_set(c.env):
            kernel = ops.kernel_for("cpu", k.op, M=case.M, **k.facts(state))
    except (ValueError, RuntimeError, AttributeError):  # an op this build lacks: no fraction, not a failure
        return {}
    instr = instruction_for(kernel, k.kind)
    peak = (peaks or {}).get("instructions", {}).get(instr) if instr else None
    return {"kernel": kernel, "macs": int(k.macs(state, case)), "peak_instruction": instr if peak else None,
            "_peak": peak}


def _run_case(family: KernelFamily, case: Case, contenders: list[Contender], w: torch.Tensor,
              b: torch.Tensor, states: dict[str, list], run: KernelRun, l3: int, read_GBps: Optional[float],
              skipped: list[dict], peaks: Optional[dict] = None) -> list[dict]:
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
        meta[c.name] = (c, n_sets, _kernel_facts(c, sets[0], case, peaks))
    failures: dict[str, str] = {}
    timer = time_gpu if run.device == "cuda" else time_interleaved
    stats = timer(items, run.timing, failures)
    for name, why in failures.items():
        skipped.append({"family": family.name, "contender": name, "case": asdict(case), "reason": f"failed: {why}"})
    rows = []
    for name, st in stats.items():
        c, n_sets, kf = meta[name]
        wb = c.weight_bytes(case)
        kf = dict(kf)
        peak = kf.pop("_peak", None)
        if kf:  # the pysparse kernel that ran, its MACs and its fraction of that instruction's peak
            kf["of_peak"] = fraction_of_peak(kf["macs"], st.median_ms, peak)
        rows.append({"family": family.name, **asdict(case), "contender": name, "role": c.role,
                     "median_ms": st.median_ms, "iqr_ms": st.iqr_ms, "q1_ms": st.q1_ms, "q3_ms": st.q3_ms,
                     "min_ms": st.min_ms, "samples": st.samples, "weight_sets": n_sets, "weight_bytes": wb,
                     "bw_bound_ms": wb / (read_GBps * 1e6) if read_GBps else None,
                     "rel_err": st.error,
                     "check_ok": None if st.error is None else bool(st.error <= c.tolerance), **kf})
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
    # The register-only peaks, like the bandwidth, once per run on the threads the kernels use
    peaks = (measure_peaks(torch.get_num_threads(), run.peak_ms, run.peak_repeats).to_json()
             if run.device == "cpu" and run.peak_ms > 0 else None)
    doc.update({"device": run.device, "quick": run.quick, "timing": asdict(run.timing), "bandwidth": asdict(bw),
                "peaks": peaks, "families": {}, "results": [], "skipped": [], "notes": []})
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
                                                doc["skipped"], peaks)
                    bar.update()
                del states
    bar.close()
    return finish(doc)
