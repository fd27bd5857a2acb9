"""Shared fixtures: the CPU ISA paths this machine can run (each forced through
pysparse.cpu_isa, so every path at or below the best one is tested here)."""
import pytest
import torch

import pysparse

_ORDER = ["scalar", "avx2", "avx512", "amx"]


def available_isas() -> list[str]:
    best = pysparse.cpu_info()["best_isa"]
    return _ORDER[: _ORDER.index(best) + 1]


@pytest.fixture(params=_ORDER)
def isa(request):
    """Run the test once per CPU path; skip paths this CPU lacks (never fail for hardware)."""
    if request.param not in available_isas():
        pytest.skip(f"CPU has no {request.param} (best: {available_isas()[-1]})")
    with pysparse.cpu_isa(request.param):
        assert pysparse.ops.kernel_for(torch.device("cpu")) == f"cpu-{request.param}"
        yield request.param


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same random state (failures reproduce)."""
    torch.manual_seed(0)
