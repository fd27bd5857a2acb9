"""The AMX measurement of issue 12, one command for an AMX machine:

    python bench/bench_amx.py [--json amx.json] [--threads T] [--quick]

For int8_linear (K = N = 4096 and 4096 -> 11008) and bsr_int8_linear (K = N = 4096, density 0.1
and 0.25), M in {1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 256, 512}, it times side by side,
interleaved (medians of many single calls, turns round-robin as pysparse.bench.timing does):

  amx-tiles       the issue 12 AMX kernels (tile-packed activations, C in tiles, prefetch)
  amx-tiles-nopf  the same with software prefetch off (PYSPARSE_AMX_PREFETCH=0)
  amx-rows        the AMX dense GEMM before issue 12 (PYSPARSE_AMX_GEMM=rows; int8_linear only:
                  bsr_int8_linear has one AMX kernel)
  vnni            the AVX-512 VNNI kernels (pysparse.cpu_isa("avx512"))

and prints one table per op and shape, the crossover M (the smallest M of the grid from which
the AMX kernel is faster than VNNI at every larger M) and the thresholds it suggests for
PYSPARSE_AMX_MIN_ROWS / PYSPARSE_AMX_BSR_MIN_ROWS (csrc/cpu/dispatch.h), which the dispatcher
reads at load.

The AMX variant and prefetch distance are read once, when pysparse loads, so each AMX variant
runs in its own worker process (this file with --worker, its environment set, the thresholds
set to 0 so AMX runs at every M); the coordinator hands the workers turns one at a time, so
the interleaving is the same as in one process. Every contender's output is compared bit for
bit with the others' (the paths share the epilogue and sum exactly), so a wrong kernel shows.
For M <= 16 the weights stream from memory: each worker cycles through copies totalling twice
the L3 (pysparse.bench.timing.rotation_sets).

On a machine without AMX it says so and times what it can: the VNNI path where AVX-512 VNNI
exists, else the best path this CPU has (no crossover then).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

GRID_M = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 256, 512)
DENSE_SHAPES = ((4096, 4096), (11008, 4096))  # (N, K): square, and an LLM MLP up-projection 4096 -> 11008
BSR_SHAPE = (4096, 4096)
DENSITIES = (0.1, 0.25)
QUICK = {"M": (1, 64), "dense": ((1024, 1024),), "bsr": (1024, 1024), "densities": (0.1,)}

# Worker processes: name -> environment. Every worker runs AMX at every M (thresholds 0).
WORKERS = {
    "amx-tiles": {"PYSPARSE_AMX_GEMM": "tiles"},
    "amx-tiles-nopf": {"PYSPARSE_AMX_GEMM": "tiles", "PYSPARSE_AMX_PREFETCH": "0"},
    "amx-rows": {"PYSPARSE_AMX_GEMM": "rows"},
}
ALL_ENV = ("PYSPARSE_AMX_GEMM", "PYSPARSE_AMX_PREFETCH", "PYSPARSE_AMX_MIN_ROWS", "PYSPARSE_AMX_BSR_MIN_ROWS",
           "PYSPARSE_CPU_ISA")


@dataclass(frozen=True)
class Contender:
    name: str
    worker: str
    isa: Optional[str]  # cap (pysparse.cpu_isa) during its calls; None: the worker's best path
    ops: tuple[str, ...] = ("int8_linear", "bsr_int8_linear")


# ---------------------------------------------------------------- worker side

def _layer(op: str, N: int, K: int, density: float):
    """The weights of one case, the same in every worker (seeded by shape): returns a function
    copy() -> one weight set and call(set, x) -> y."""
    from pysparse import formats
    from pysparse.bench.families import base_weight, block_prune
    from pysparse.reference import quantize_weight

    w = base_weight(N, K)
    bias = torch.randn(N, generator=torch.Generator().manual_seed(N + K)) * 0.01
    if op == "int8_linear":
        q, scale = quantize_weight(w)
        packed, colsum = torch.ops.pysparse.int8_pack(q, 0)
        w_scale = torch.ones(1, colsum.shape[1])
        w_scale[0, :N] = scale[:, 0]
        base = (packed, colsum, w_scale)

        def call(s, x):
            return torch.ops.pysparse.int8_linear(x, s[0], s[1], s[2], bias, None, N, K)
    else:
        p = formats.pack_bsr_int8(block_prune(w, density, 64))
        base = (p.values, p.layout.row_ptr, p.layout.col_idx, p.colsum, p.w_scale)

        def call(s, x):
            return torch.ops.pysparse.bsr_int8_linear(x, s[0], s[1], s[2], s[3], s[4], bias, None, N, K, False)
    nbytes = sum(t.numel() * t.element_size() for t in base)
    return (lambda: tuple(t.clone() for t in base)), call, nbytes


def worker() -> None:
    """Serve the coordinator: one JSON command per stdin line, one JSON reply per stdout line."""
    import pysparse
    from pysparse.bench.machine import l3_bytes
    from pysparse.bench.timing import TimingConfig, rotation_sets

    out = sys.stdout
    sys.stdout = sys.stderr  # nothing else may reach the protocol stream
    state: dict = {}
    for line in sys.stdin:
        cmd = json.loads(line)
        reply: dict = {}
        try:
            if cmd["cmd"] == "info":
                reply = {"cpu_info": pysparse.cpu_info(), "threads": torch.get_num_threads()}
            elif cmd["cmd"] == "case":
                state.clear()
                copy, call, nbytes = _layer(cmd["op"], cmd["N"], cmd["K"], cmd["density"])
                M = cmd["M"]
                n = rotation_sets(M, nbytes, TimingConfig(), l3_bytes())
                sets = [copy() for _ in range(n)]
                x = torch.randn(M, cmd["K"], generator=torch.Generator().manual_seed(M))
                state.update(call=call, sets=sets, x=x, i=0)
                reply = {"sets": n, "hash": {}, "kernel": {}}
                for c in cmd["contenders"]:
                    with pysparse.cpu_isa(c["isa"]):
                        y = call(sets[0], x)
                        for _ in range(cmd["warmup"]):
                            call(sets[0], x)
                        reply["kernel"][c["name"]] = pysparse.ops.kernel_for("cpu", cmd["op"], M=M)
                    reply["hash"][c["name"]] = hashlib.sha1(y.numpy().tobytes()).hexdigest()
            elif cmd["cmd"] == "turn":
                call, sets, x = state["call"], state["sets"], state["x"]
                ms = []
                with pysparse.cpu_isa(cmd["isa"]):
                    t_end = time.perf_counter() + cmd["turn_s"]
                    while len(ms) < cmd["max_calls"] and (not ms or time.perf_counter() < t_end):
                        s = sets[state["i"] % len(sets)]
                        state["i"] += 1
                        t0 = time.perf_counter_ns()
                        call(s, x)
                        ms.append((time.perf_counter_ns() - t0) / 1e6)
                reply = {"ms": ms}
            elif cmd["cmd"] == "quit":
                break
        except Exception as e:  # reported to the coordinator, which prints it
            reply = {"error": f"{type(e).__name__}: {e}"}
        out.write(json.dumps(reply) + "\n")
        out.flush()


# ---------------------------------------------------------------- coordinator side

class Worker:
    def __init__(self, name: str, env: dict, threads: Optional[int]):
        e = {k: v for k, v in os.environ.items() if k not in ALL_ENV}
        e.update(env)
        e.update(PYSPARSE_AMX_MIN_ROWS="0", PYSPARSE_AMX_BSR_MIN_ROWS="0")
        e["PYTHONPATH"] = ROOT + os.pathsep + e.get("PYTHONPATH", "")
        if threads:
            e["OMP_NUM_THREADS"] = str(threads)
        self.name = name
        self.p = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker"], env=e, text=True,
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE)

    def ask(self, **cmd) -> dict:
        self.p.stdin.write(json.dumps(cmd) + "\n")
        self.p.stdin.flush()
        line = self.p.stdout.readline()
        if not line:
            raise RuntimeError(f"worker {self.name} died (its stderr is above)")
        r = json.loads(line)
        if "error" in r:
            raise RuntimeError(f"worker {self.name}: {r['error']}")
        return r

    def close(self) -> None:
        try:
            self.p.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
            self.p.stdin.flush()
        except OSError:
            pass
        self.p.wait(timeout=60)


def contenders_for(cpu: dict) -> tuple[list[Contender], str]:
    best = cpu["best_isa"]
    if best == "amx":
        return [Contender("amx-tiles", "amx-tiles", None), Contender("amx-tiles-nopf", "amx-tiles-nopf", None),
                Contender("amx-rows", "amx-rows", None, ("int8_linear",)),
                Contender("vnni", "amx-tiles", "avx512")], ""
    name = "vnni" if best == "avx512" else f"{best}"
    return [Contender(name, "amx-tiles", None)], (
        f"this machine has no AMX (best path {best}; amx_tile={cpu['features']['amx_tile']}, "
        f"amx_os_permission={cpu['features']['amx_os_permission']}): only the {name} column is measured, "
        "no crossover. Run this on an AMX machine (cpu_info()['best_isa'] == 'amx').")


def time_case(workers: dict, cs: list[Contender], case: dict, cfg) -> dict:
    """One case, interleaved: returns {name: {median_ms, q1_ms, q3_ms, samples, kernel}} and
    the bit-equality verdict."""
    by_worker: dict[str, list[Contender]] = {}
    for c in cs:
        by_worker.setdefault(c.worker, []).append(c)
    hashes, kernels, sets = {}, {}, {}
    for wname, wcs in by_worker.items():
        r = workers[wname].ask(cmd="case", warmup=cfg.warmup, contenders=[{"name": c.name, "isa": c.isa} for c in wcs],
                               **case)
        hashes.update(r["hash"])
        kernels.update(r["kernel"])
        sets[wname] = r["sets"]
    times: dict[str, list[float]] = {c.name: [] for c in cs}
    spent = {c.name: 0.0 for c in cs}
    for _ in range(cfg.rounds):
        for c in cs:
            if spent[c.name] >= cfg.budget_s * 1e3 and len(times[c.name]) >= cfg.min_samples:
                continue
            ms = workers[c.worker].ask(cmd="turn", isa=c.isa, turn_s=cfg.turn_s, max_calls=cfg.max_calls_per_turn)["ms"]
            times[c.name] += ms
            spent[c.name] += sum(ms)
    res = {}
    for c in cs:
        xs = sorted(times[c.name])
        q = statistics.quantiles(xs, n=4, method="inclusive") if len(xs) >= 2 else [xs[0]] * 3
        res[c.name] = {"median_ms": statistics.median(xs), "q1_ms": q[0], "q3_ms": q[2], "samples": len(xs),
                       "kernel": kernels[c.name]}
    same = len(set(hashes.values())) == 1
    return {"results": res, "bit_equal": same, "weight_sets": sets}


def crossover(rows: list[tuple[int, dict]], amx: str, ref: str) -> Optional[int]:
    """The smallest M of the grid from which `amx` beats `ref` at every larger M (None: never)."""
    cross = None
    for M, r in reversed(rows):
        if amx in r and ref in r and r[amx]["median_ms"] < r[ref]["median_ms"]:
            cross = M
        else:
            break
    return cross


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a smoke run: 2 small shapes, 2 M, short turns (seconds)")
    ap.add_argument("--threads", type=int, default=None, help="threads per worker (default: torch's default)")
    ap.add_argument("--json", default=None, help="write the results here (machine, versions, every median)")
    ap.add_argument("--m", type=int, nargs="*", default=None, help="override the M grid")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        worker()
        return 0
    from pysparse.bench.timing import TimingConfig

    cfg = TimingConfig.quick() if a.quick else TimingConfig.full()
    grid_m = tuple(a.m) if a.m else QUICK["M"] if a.quick else GRID_M
    dense = QUICK["dense"] if a.quick else DENSE_SHAPES
    bsr = QUICK["bsr"] if a.quick else BSR_SHAPE
    densities = QUICK["densities"] if a.quick else DENSITIES

    probe = Worker("probe", {}, a.threads)
    info = probe.ask(cmd="info")
    probe.close()
    cs, note = contenders_for(info["cpu_info"])
    print(f"pysparse AMX bench: best_isa {info['cpu_info']['best_isa']}, {info['threads']} threads"
          f"{' (quick)' if a.quick else ''}")
    if note:
        print("NOTE: " + note)
    workers = {w: Worker(w, WORKERS[w], a.threads) for w in {c.worker for c in cs}}
    cases = [("int8_linear", N, K, 0.0) for N, K in dense] + [("bsr_int8_linear", *bsr, d) for d in densities]
    doc: dict = {"grid_m": list(grid_m), "contenders": [c.__dict__ for c in cs], "note": note, "cases": []}
    suggest: dict[str, list[int]] = {"int8_linear": [], "bsr_int8_linear": []}
    try:
        for op, N, K, d in cases:
            ccs = [c for c in cs if op in c.ops]
            title = f"{op} N={N} K={K}" + (f" density {d}" if op == "bsr_int8_linear" else "")
            print(f"\n{title}  (median ms; IQR in the JSON)")
            names = [c.name for c in ccs]
            print("  " + "M".rjust(5) + "".join(n.rjust(16) for n in names) + "   amx/vnni  bit-equal")
            rows = []
            for M in grid_m:
                r = time_case(workers, ccs, {"op": op, "N": N, "K": K, "density": d, "M": M}, cfg)
                rows.append((M, r["results"]))
                doc["cases"].append({"op": op, "N": N, "K": K, "density": d, "M": M, **r})
                res = r["results"]
                ratio = (f"{res['amx-tiles']['median_ms'] / res['vnni']['median_ms']:9.2f}"
                         if "amx-tiles" in res and "vnni" in res else "        -")
                print("  " + str(M).rjust(5) + "".join(f"{res[n]['median_ms']:16.3f}" for n in names) +
                      f"  {ratio}  {'yes' if r['bit_equal'] else 'NO: outputs differ'}", flush=True)
            if "vnni" in names and "amx-tiles" in names:
                for amx in [n for n in names if n.startswith("amx")]:
                    x = crossover(rows, amx, "vnni")
                    print(f"  crossover {amx} vs vnni: " + (f"AMX faster from M={x} on" if x is not None
                                                             else "AMX never faster at the largest M"))
                x = crossover(rows, "amx-tiles", "vnni")
                if x is not None:
                    suggest[op].append(x)
                doc.setdefault("crossovers", []).append({"op": op, "N": N, "K": K, "density": d, "amx_tiles_from_m": x})
    finally:
        for w in workers.values():
            w.close()
    if any(suggest.values()):
        print("\nsuggested thresholds (the largest crossover over the shapes, amx-tiles vs vnni; "
              "csrc/cpu/dispatch.h has 32 and 64):")
        if suggest["int8_linear"]:
            print(f"  PYSPARSE_AMX_MIN_ROWS={max(suggest['int8_linear'])}")
        if suggest["bsr_int8_linear"]:
            print(f"  PYSPARSE_AMX_BSR_MIN_ROWS={max(suggest['bsr_int8_linear'])}")
        doc["suggested"] = {k: max(v) for k, v in suggest.items() if v}
    if a.json:
        from pysparse.bench.machine import run_header

        with open(a.json, "w") as f:
            json.dump({**run_header("amx", ["bench/bench_amx.py", *(argv or sys.argv[1:])]), **doc}, f, indent=1)
        print(f"\nwrote {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
