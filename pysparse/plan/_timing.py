"""The small timer plan needs: warm-up, round-robin interleaving, medians.

(pysparse.bench has the full harness, but plan sits below bench in the import layers.) The
machines are shared and noisy: each contender gets a short turn, then the next, for several
rounds, so a slow spell lands on all of them; the median over rounds of each turn's per-call
mean is robust to the rest.
"""
from __future__ import annotations

import statistics
import time
from typing import Any, Callable, Mapping, Optional

import torch

# 9 rounds: the median of 9 turns moved < 3% between runs of the same layer on 2 shared
# cores, where 5 moved up to 8%. A turn is ~20 ms of calls (at most 20 calls), long enough
# for perf_counter, short enough that one slow spell covers few turns.
ROUNDS = 9
TURN_S = 0.02
MAX_CALLS = 20
# After DROP_AFTER rounds a contender slower than DROP_RATIO x the fastest cannot win: it sits
# out the remaining rounds (the scalar int8 block kernel on AVX2 is 3-5x dense fp32).
DROP_AFTER = 3
DROP_RATIO = 2.5


def _sync(device_types: set[str]) -> Callable[[], None]:
    if "cuda" in device_types and torch.cuda.is_available():
        return torch.cuda.synchronize
    return lambda: None


@torch.no_grad()
def interleaved_ms(fns: Mapping[str, Callable[[], Any]], *, rounds: int = ROUNDS, turn_s: float = TURN_S,
                   max_calls: int = MAX_CALLS, cuda: bool = False, drop_slow: bool = True,
                   before: Optional[Callable[[], Any]] = None, settle: bool = False, keep: tuple = (),
                   ticker: Callable[[], None] = lambda: None) -> dict[str, float]:
    """Median milliseconds per call of each ``fns[name]()``, timed interleaved.

    Each contender is called once to warm up (first calls fill oneDNN / MKL caches), then once
    more to size its turn (calls per turn = turn_s / that time, 1 to max_calls). before: called,
    untimed, before every timed call (a cache scrub), and then each turn is one call. settle:
    each turn starts with one untimed call (the steady state of back-to-back calls, not the
    cache the previous contender left). ``ticker`` is called after each contender's warm-up
    (a progress bar's update). keep: contenders never dropped as slow (and not the yardstick).
    """
    if not fns:
        return {}
    sync = _sync({"cuda"} if cuda else set())
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
            if before is not None:
                before()
                sync()
            if settle:
                fn()
                sync()
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            sync()
            samples[name].append((time.perf_counter() - t0) / n * 1e3)
        if drop_slow and r + 1 == DROP_AFTER and len(live) > 1:
            best = min((statistics.median(samples[n]) for n in live if n not in keep), default=None)
            if best is not None:
                live = [n for n in live if n in keep or statistics.median(samples[n]) <= DROP_RATIO * best]
    return {n: statistics.median(s) for n, s in samples.items()}


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
