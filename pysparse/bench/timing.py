"""Timing done one way for every contender: warm-up, round-robin interleaving, medians.

The development machines are two shared, noisy cores. Interleaving (each contender gets a
short turn, then the next, for several rounds) spreads any slow spell over every contender
instead of landing on whichever ran then; the median and the inter-quartile range of many
single-call timings are robust to the remaining outliers.
"""
from __future__ import annotations

import contextlib
import gc
import math
import os
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import torch

from .. import ops


@dataclass(frozen=True)
class TimingConfig:
    """How hard to time. ``quick()`` and ``full()`` are the two presets the CLI uses."""

    # Calls before timing: first calls allocate and fill oneDNN / MKL primitive caches. A
    # contender whose first call takes longer than warmup_s gets that one call only.
    warmup: int = 2
    warmup_s: float = 0.5
    # Round-robin passes over all contenders; in each, a contender's turn is as many
    # back-to-back calls as fit in turn_s (1 to max_calls_per_turn).
    rounds: int = 12
    turn_s: float = 0.05
    max_calls_per_turn: int = 50
    # A contender that has spent budget_s in one case, with min_samples timed calls, sits out
    # the remaining rounds: the scalar path takes 2 s a call at M=512, K=N=4096.
    min_samples: int = 3
    budget_s: float = 10.0
    # At M <= rotate_max_m a layer is bound by streaming its weights from memory: cycle through
    # copies totalling rotate_bytes (0: twice the L3), at most max_weight_sets of them (the
    # smallest weight in the grid, 4096 x 4096 int8 at density 0.1, 1.7 MB, needs 325 copies
    # to pass twice the 273 MB L3; the cap only bites for tiny test shapes).
    rotate_max_m: int = 16
    rotate_bytes: int = 0
    max_weight_sets: int = 1024
    gpu_rounds: int = 3  # GPU: do_bench passes per contender, interleaved, samples pooled

    @staticmethod
    def quick() -> "TimingConfig":
        """Fewer rounds and shorter turns: the whole --quick grid in about a minute on 2 cores."""
        return TimingConfig(warmup=1, rounds=5, turn_s=0.02, budget_s=3.0)

    @staticmethod
    def full() -> "TimingConfig":
        """The default: enough samples for a stable median on a noisy machine."""
        return TimingConfig()


@dataclass(frozen=True)
class Stats:
    """Summary of one contender's timed calls, in milliseconds."""

    median_ms: float
    q1_ms: float
    q3_ms: float
    min_ms: float
    samples: int
    error: Optional[float] = None  # the contender's check (relative error vs the reference), if any

    @property
    def iqr_ms(self) -> float:
        """Inter-quartile range: the spread of the middle half of the samples."""
        return self.q3_ms - self.q1_ms

    @staticmethod
    def of(times_ms: Sequence[float], error: Optional[float] = None) -> "Stats":
        """Median, quartiles and minimum of ``times_ms`` (at least one sample)."""
        xs = sorted(times_ms)
        if len(xs) >= 2:
            q1, _, q3 = statistics.quantiles(xs, n=4, method="inclusive")
        else:
            q1 = q3 = xs[0]
        return Stats(statistics.median(xs), q1, q3, xs[0], len(xs), error)


@dataclass
class Timed:
    """One thing to time: ``fn()`` is one call (a layer forward on the next weight set).

    env: environment variables set during this contender's turns (PYSPARSE_CPU_ISA picks a
    kernel path, through pysparse.set_cpu_isa: see env_set). check: given the first call's output, returns a number
    to record (the relative error against the reference).
    """

    name: str
    fn: Callable[[], Any]
    env: Mapping[str, str] = field(default_factory=dict)
    check: Optional[Callable[[Any], float]] = None


# pysparse reads these once, at import: during a run they switch through its setters
# (one atomic switch the kernels read), never through os.environ.
_POLICY_SETTERS = {
    "PYSPARSE_CPU_ISA": lambda v: ops.set_cpu_isa(v or None),
    "PYSPARSE_CPU_BF16": lambda v: ops.set_cpu_bf16(None if not v else {"0": False, "1": True}[v]),
}


@contextlib.contextmanager
def env_set(overrides: Mapping[str, str]) -> Iterator[None]:
    """Set environment variables for the duration of the block, then restore them.

    PYSPARSE_CPU_ISA / PYSPARSE_CPU_BF16 ("0"/"1") go to pysparse.set_cpu_isa /
    set_cpu_bf16 instead (the environment is read only at import).
    """
    for k, v in overrides.items():
        if k == "PYSPARSE_CPU_BF16" and v not in ("", "0", "1"):
            raise ValueError(f"env_set: PYSPARSE_CPU_BF16 must be '0' or '1', got {v!r}")
    env = {k: v for k, v in overrides.items() if k not in _POLICY_SETTERS}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    prev = {k: _POLICY_SETTERS[k](v) for k, v in overrides.items() if k in _POLICY_SETTERS}
    try:
        yield
    finally:
        if "PYSPARSE_CPU_ISA" in prev:
            ops.set_cpu_isa(prev["PYSPARSE_CPU_ISA"])
        if "PYSPARSE_CPU_BF16" in prev:
            ops.set_cpu_bf16(prev["PYSPARSE_CPU_BF16"])
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def rotation_sets(M: int, weight_bytes: int, cfg: TimingConfig, l3_bytes: int) -> int:
    """How many copies of a weight to cycle through so that a call at batch M reads memory.

    At M <= cfg.rotate_max_m the copies total more than cfg.rotate_bytes (default 2 x L3:
    the development machine reports a 260 MB L3, which one 4096 x 4096 int8 weight fits 16
    times over), so the weight a call reads was evicted since its last use. Memory is bounded
    by that total plus one copy, and the count by cfg.max_weight_sets. Larger M is compute
    bound and uses one copy.
    """
    if M > cfg.rotate_max_m or weight_bytes <= 0:
        return 1
    target = cfg.rotate_bytes or 2 * l3_bytes
    return max(1, min(cfg.max_weight_sets, math.ceil(target / weight_bytes)))


def _call_ms(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter_ns()
    fn()
    return (time.perf_counter_ns() - t0) / 1e6


def _first_calls(items: Sequence[Timed], failures: Optional[dict[str, str]]) -> tuple[list[Timed], dict, dict]:
    """Call each item once: its check value, the seconds the call took, and the items that ran.
    An item that raises is dropped and its error recorded in ``failures`` (or re-raised)."""
    ok, errors, first = [], {}, {}
    for t in items:
        with env_set(t.env):
            try:
                t0 = time.perf_counter()
                out = t.fn()
                first[t.name] = time.perf_counter() - t0
                errors[t.name] = float(t.check(out)) if t.check is not None else None
            except Exception as e:
                if failures is None:
                    raise
                failures[t.name] = f"{type(e).__name__}: {e}".splitlines()[0]
                continue
        ok.append(t)
    return ok, errors, first


def time_interleaved(items: Sequence[Timed], cfg: TimingConfig,
                     failures: Optional[dict[str, str]] = None) -> dict[str, Stats]:
    """Time each item on the CPU, round-robin, and return its Stats by name.

    Each item first gets its warm-up calls (and its check on the first output); then, for
    cfg.rounds rounds, each item gets a turn of about cfg.turn_s of back-to-back calls, each
    call timed on its own. The garbage collector is paused so that no contender pays for
    another's garbage. An item whose first call raises is left out, its error put in
    ``failures`` when given (else the error propagates).
    """
    items, errors, first_s = _first_calls(items, failures)
    times: dict[str, list[float]] = {t.name: [] for t in items}
    per_call: dict[str, float] = {}
    spent: dict[str, float] = {t.name: 0.0 for t in items}
    gc.collect()
    gc_was_on = gc.isenabled()
    gc.disable()
    try:
        for t in items:
            with env_set(t.env):
                if first_s[t.name] >= cfg.warmup_s:
                    per_call[t.name] = first_s[t.name] * 1e3  # one call was warm-up enough
                    continue
                for _ in range(cfg.warmup - 1):
                    t.fn()
                per_call[t.name] = _call_ms(t.fn)  # a warmed-up estimate, sizes the turns
        for _ in range(cfg.rounds):
            for t in items:
                name = t.name
                if spent[name] >= cfg.budget_s * 1e3 and len(times[name]) >= cfg.min_samples:
                    continue
                calls = int(cfg.turn_s * 1e3 / max(per_call[name], 1e-3))
                calls = max(1, min(cfg.max_calls_per_turn, calls))
                with env_set(t.env):
                    for _ in range(calls):
                        ms = _call_ms(t.fn)
                        times[name].append(ms)
                        spent[name] += ms
        # Fewer rounds than min_samples (a slow contender, one call a turn): top up.
        for t in items:
            with env_set(t.env):
                while len(times[t.name]) < cfg.min_samples:
                    times[t.name].append(_call_ms(t.fn))
    finally:
        if gc_was_on:
            gc.enable()
    return {name: Stats.of(ts, errors[name]) for name, ts in times.items()}


def time_gpu(items: Sequence[Timed], cfg: TimingConfig,
             failures: Optional[dict[str, str]] = None) -> dict[str, Stats]:
    """Time each item on the GPU with ``triton.testing.do_bench`` (which warms up and
    flushes the L2 cache between calls), cfg.gpu_rounds passes interleaved, samples pooled.
    Failures as in time_interleaved.
    """
    from triton.testing import do_bench

    items, errors, _ = _first_calls(items, failures)
    times: dict[str, list[float]] = {t.name: [] for t in items}
    torch.cuda.synchronize()
    for _ in range(cfg.gpu_rounds):
        for t in items:
            ts = do_bench(t.fn, warmup=25, rep=100, return_mode="all")
            times[t.name].extend(float(x) for x in ts)
    return {name: Stats.of(ts, errors[name]) for name, ts in times.items()}


@dataclass(frozen=True)
class Bandwidth:
    """Main-memory bandwidth measured here, in GB/s (1e9 bytes per second)."""

    read_GBps: float   # a sum over a large tensor: the rate at which a kernel can stream weights
    copy_GBps: float   # a copy, counting bytes read plus bytes written
    bytes: int         # size of the tensor used


def measure_bandwidth(nbytes: int = 1 << 30, repeats: int = 5, device: str = "cpu") -> Bandwidth:
    """Stream ``nbytes`` (default 1 GiB, four times the 260 MB L3 seen here) through a sum and a
    copy with the current torch thread count; medians of ``repeats`` passes."""
    n = max(nbytes // 4, 1024)
    a = torch.ones(n, device=device)
    b = torch.empty_like(a)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def timed(fn: Callable[[], Any]) -> float:
        sync()
        t0 = time.perf_counter_ns()
        fn()
        sync()
        return (time.perf_counter_ns() - t0) / 1e6

    timed(a.sum)
    timed(lambda: b.copy_(a))  # the first touch of b's pages is not bandwidth
    read = statistics.median(timed(a.sum) for _ in range(repeats))
    copy = statistics.median(timed(lambda: b.copy_(a)) for _ in range(repeats))
    nb = n * 4
    return Bandwidth(read_GBps=nb / read / 1e6, copy_GBps=2 * nb / copy / 1e6, bytes=nb)
