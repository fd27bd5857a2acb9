"""The small timer plan and compress need: warm-up, round-robin interleaving, medians.

(pysparse.bench has the full harness, but plan and compress sit below bench in the import layers.) The
machines are shared and noisy: each contender gets a short turn, then the next, for several
rounds, so a slow spell lands on all of them; the median over rounds of each turn's per-call
mean is robust to the rest.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Mapping, Optional

import torch

# 15 rounds: with 9 the prediction of a 3-layer MLP moved up to 15% between runs on 2 shared
# cores at load 4-5 (thread CPU time), with 15 within ~8%. A turn is ~20 ms of calls (at most 20 calls), long enough
# for perf_counter, short enough that one slow spell covers few turns.
ROUNDS = 15
TURN_S = 0.02
MAX_CALLS = 20
# After DROP_AFTER rounds a contender slower than DROP_RATIO x the fastest cannot win: it sits
# out the remaining rounds (the scalar int8 block kernel on AVX2 is 3-5x dense fp32).
DROP_AFTER = 3
# The figure of a contender: the median of its samples (with thread CPU time, preemption is not
# in the samples; what is left is symmetric enough that lower quantiles did not help).
QUANTILE = 0.5
DROP_RATIO = 2.5


def clock(cuda: bool = False) -> tuple[Callable[[], float], str]:
    """(timer, its name). One torch thread on the CPU: the calling thread's CPU time
    (time.thread_time), which a neighbour's load on a shared machine does not inflate (it still
    costs caches and memory bandwidth, which count). Measured on the 2 shared cores at load 5:
    wall-clock medians of one layer moved 3x between runs (2.0 to 6.1 ms), thread CPU time
    within 10%. Several threads or a GPU: wall time (time.perf_counter); another thread's
    work, or the GPU's, is not in this thread's CPU time."""
    if not cuda and torch.get_num_threads() == 1:
        return time.thread_time, "thread cpu time"
    return time.perf_counter, "wall time"


def _sync(device_types: set[str]) -> Callable[[], None]:
    if "cuda" in device_types and torch.cuda.is_available():
        return torch.cuda.synchronize
    return lambda: None


@torch.no_grad()
def interleaved_ms(fns: Mapping[str, Callable[[], Any]], *, rounds: Optional[int] = None, turn_s: float = TURN_S,
                   max_calls: int = MAX_CALLS, cuda: bool = False, drop_slow: bool = True,
                   before: Optional[Callable[[], Any]] = None, settle: bool = False, keep: tuple = (),
                   ticker: Callable[[], None] = lambda: None, paired_with: Optional[str] = None) -> dict[str, float]:
    """Median milliseconds per call of each ``fns[name]()``, timed interleaved.

    Each contender is called once to warm up (first calls fill oneDNN / MKL caches), then once
    more to size its turn (calls per turn = turn_s / that time, 1 to max_calls). before: called,
    untimed, before every timed call (a cache scrub), and then each turn is one call. settle:
    each turn starts with one untimed call (the steady state of back-to-back calls, not the
    cache the previous contender left). ``ticker`` is called after each contender's warm-up
    (a progress bar's update). keep: contenders never dropped as slow (and not the yardstick).
    paired_with: a contender in ``keep``; every other figure is then the median over rounds of
    its time / that contender's time in the same round, times that contender's median: a slow
    spell on a shared machine slows both in one round and cancels (the plan's layer timings:
    the median of unpaired times put a 3-layer int8 MLP's predicted speedup anywhere in
    1.85x-3.1x over four runs, measured 2.3x-2.6x).
    """
    if not fns:
        return {}
    rounds = ROUNDS if rounds is None else rounds  # read here: tests shorten it
    sync = _sync({"cuda"} if cuda else set())
    now = clock(cuda)[0]
    per_turn: dict[str, int] = {}
    for name, fn in fns.items():
        fn()
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        dt = time.perf_counter() - t0
        per_turn[name] = 1 if before is not None else max(1, min(max_calls, int(turn_s / max(dt, 1e-7))))
        ticker()
    samples: dict[str, list[float]] = {n: [] for n in fns}
    live = list(fns)
    for r in range(rounds):
        for name in live:
            fn, n = fns[name], per_turn[name]
            if before is not None and name not in keep:
                before()
                sync()
            if settle:
                fn()
                sync()
            t0 = now()
            for _ in range(n):
                fn()
            sync()
            samples[name].append((now() - t0) / n * 1e3)
        if drop_slow and r + 1 == DROP_AFTER and len(live) > 1:
            best = min((summary(samples[n]) for n in live if n not in keep), default=None)
            if best is not None:
                live = [n for n in live if n in keep or summary(samples[n]) <= DROP_RATIO * best]
    if paired_with is None:
        return {n: summary(s) for n, s in samples.items()}
    ref = samples[paired_with]
    out = {}
    for n, s in samples.items():
        ratios = [v / ref[i] for i, v in enumerate(s) if ref[i] > 0] if n != paired_with else []
        out[n] = summary(ratios) * summary(ref) if ratios else summary(s)
    return out


def summary(xs: list[float]) -> float:
    """The figure of a contender's samples: their QUANTILE (see there)."""
    xs = sorted(xs)
    i = QUANTILE * (len(xs) - 1)
    lo = int(i)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (i - lo)


class Scrub:
    """Reads ``nbytes`` of memory: between two calls of a layer inside a model, the rest of the
    model's weights stream through the caches, so timing a layer back to back (its weights
    warm in L3) would time a different thing than the model runs. Measured on the 32 MB-L3
    test machine: a 4-layer MLP of 32 MB of weights ran 18 ms against 12 ms summed from warm
    layer timings; with this scrub the layer sum matches the model (see tests/test_plan.py)."""

    # at most 512 MB: past twice any L3 seen here (273 MB reported), more only costs time
    MAX_BYTES = 512 << 20

    def __init__(self, nbytes: int, device: str = "cpu") -> None:
        n = max(0, min(int(nbytes), self.MAX_BYTES)) // 4
        self.buf = torch.ones(n, device=device) if n else None

    def __call__(self) -> None:
        if self.buf is not None:
            self.buf.sum()
