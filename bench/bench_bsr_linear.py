"""Block-sparse linear layers, pysparse against dense and torch's sparse formats: a small
version of the ``pysparse bench kernels`` sparse grid for pytest-benchmark.

    python -m pytest bench --benchmark-only --benchmark-columns=median,iqr,rounds

The contenders are the harness's own (the sparse_linear family), so both measure the same
calls; results are grouped by (M, density). For interleaved ratios on a noisy machine
prefer ``pysparse bench kernels``.
"""
from __future__ import annotations

import pytest
import torch

from pysparse.bench.families import base_weight, block_prune
from pysparse.bench.registry import FAMILIES, Case, Contender
from pysparse.bench.timing import env_set

# K = N = 2048 and two densities: a quarter of the kernels grid, about a minute in all.
SHAPES = [(16, 2048, 2048), (128, 2048, 2048)]
DENSITIES = [0.1, 0.5]
FAMILY = FAMILIES["sparse_linear"]
CONTENDERS: dict[str, Contender] = {c.name: c for c in FAMILY.contenders("cpu")}


@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("M, N, K", SHAPES, ids=[f"M{m}-N{n}-K{k}" for m, n, k in SHAPES])
@pytest.mark.parametrize("name", list(CONTENDERS))
def test_bsr_linear(benchmark, name: str, M: int, N: int, K: int, density: float) -> None:
    c, case = CONTENDERS[name], Case(M, N, K, density)
    why = c.available()
    if why:
        pytest.skip(why)
    if not c.applies(case):
        pytest.skip(f"{name} does not run at M={M}")
    w = block_prune(base_weight(N, K), density)
    b = torch.randn(N) * 0.01
    state = c.prepare(w, b)
    x = torch.randn(M, K)
    xin = c.input(x)
    benchmark.group = f"sparse_linear M={M} N={N} K={K} density={density}"
    benchmark.extra_info.update(contender=name, role=c.role, threads=torch.get_num_threads())
    with env_set(c.env):
        y = c.call(state, xin)
        if c.tolerance is not None:  # correctness first: a fast wrong kernel is no result
            ref = torch.nn.functional.linear(x.double(), w.double(), b.double())
            err = float((y.double() - ref).norm() / ref.norm())
            assert err <= c.tolerance, f"{name}: relative error {err:.2e} > {c.tolerance}"
        benchmark(lambda: c.call(state, xin))
