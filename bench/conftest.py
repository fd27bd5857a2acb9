"""pytest-benchmark settings for the bench/ suite (``python -m pytest bench --benchmark-only``)."""
from __future__ import annotations

import os
import sys

import pytest
import torch

# `pytest bench` from a fresh clone: the repository root holds the (in-place built) package.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# The same torch thread count for every contender; PYSPARSE_BENCH_THREADS sets it.
if os.environ.get("PYSPARSE_BENCH_THREADS"):
    torch.set_num_threads(int(os.environ["PYSPARSE_BENCH_THREADS"]))


def pytest_collect_file(file_path, parent):
    """Collect bench_*.py (STYLE.md: an op's benchmark is bench/bench_<op>.py), which pytest's
    default test_*.py pattern would skip."""
    if file_path.suffix == ".py" and file_path.name.startswith("bench_"):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def pytest_benchmark_update_machine_info(config, machine_info):
    """Record what pysparse sees of this CPU in pytest-benchmark's saved JSON."""
    import pysparse
    from pysparse.bench.machine import cpu_model, versions

    machine_info["cpu_model"] = cpu_model()
    machine_info["pysparse_cpu"] = pysparse.cpu_info()
    machine_info["versions"] = versions()
    machine_info["torch_threads"] = torch.get_num_threads()


@pytest.fixture(autouse=True)
def _inference():
    torch.manual_seed(0)
    with torch.no_grad():
        yield
