"""int8 linear layers, pysparse against its peers: a small version of the
``pysparse bench kernels`` grid for pytest-benchmark.

    python -m pytest bench --benchmark-only --benchmark-columns=median,iqr,rounds

The contenders are the harness's own (pysparse.bench.peers, through the int8_linear family),
so both measure the same calls; results are grouped by shape. pytest-benchmark times one
contender after another, not interleaved: for ratios on a noisy machine prefer
``pysparse bench kernels``.
"""
from __future__ import annotations

import itertools

import pytest
import torch

from pysparse.bench.families import base_weight
from pysparse.bench.machine import l3_bytes
from pysparse.bench.registry import FAMILIES, Case, Contender
from pysparse.bench.timing import TimingConfig, env_set, rotation_sets

# K = N = 2048: a quarter of the kernels grid's 4096 x 4096, so the suite runs in about a minute.
SHAPES = [(1, 2048, 2048), (16, 2048, 2048), (128, 2048, 2048)]
FAMILY = FAMILIES["int8_linear"]
CONTENDERS: dict[str, Contender] = {c.name: c for c in FAMILY.contenders("cpu")}
L3 = l3_bytes()

# One converted weight (and its rotated copies) at a time: the tests run contender by
# contender (the outer parametrization), so M = 1 and M = 16 reuse the same copies.
_cache: dict[tuple, list] = {}


def _weight_sets(c: Contender, case: Case, n: int) -> list:
    key = (c.state_key or c.name, case.N, case.K)
    if key not in _cache:
        _cache.clear()
        w = base_weight(case.N, case.K)
        b = torch.randn(case.N) * 0.01
        _cache[key] = [(w, b), c.prepare(w, b)]
    sets = _cache[key]
    while len(sets) - 1 < n:
        sets.append(c.copy(sets[1]))
    return sets


@pytest.mark.parametrize("M, N, K", SHAPES, ids=[f"M{m}-N{n}-K{k}" for m, n, k in SHAPES])
@pytest.mark.parametrize("name", list(CONTENDERS))
def test_int8_linear(benchmark, name: str, M: int, N: int, K: int) -> None:
    c, case = CONTENDERS[name], Case(M, N, K)
    why = c.available()
    if why:
        pytest.skip(why)
    if not c.applies(case):
        pytest.skip(f"{name} does not run at M={M}")
    # M <= 16 is bound by streaming the weights: rotate copies past the L3, as the harness does.
    n = rotation_sets(M, c.weight_bytes(case), TimingConfig(), L3)
    (w, b), *sets = _weight_sets(c, case, n)
    sets = sets[:n]
    x = torch.randn(M, K)
    xin = c.input(x)
    it = itertools.cycle(sets)
    benchmark.group = f"int8_linear M={M} N={N} K={K}"
    benchmark.extra_info.update(contender=name, role=c.role, weight_sets=n, threads=torch.get_num_threads())
    with env_set(c.env):
        y = c.call(sets[0], xin)
        if c.tolerance is not None:  # correctness first: a fast wrong kernel is no result
            ref = torch.nn.functional.linear(x.double(), w.double(), b.double())
            err = float((y.double() - ref).norm() / ref.norm())
            assert err <= c.tolerance, f"{name}: relative error {err:.2e} > {c.tolerance}"
        benchmark(lambda: c.call(next(it), xin))
