"""pysparse's benchmark harness: ``pysparse bench kernels | model | report``.

- registry.py: a kernel family as data (Case, Contender, KernelFamily, register_family)
- peers.py: the contenders (pysparse's layers and the alternatives a user has)
- families.py: the registered kernel families (grids and contenders)
- kernels.py: the grid runner
- model_bench.py, models.py: whole models and a per-layer profile
- timing.py: warm-up, interleaving, medians, cache rotation, bandwidth
- peak.py: the register-only instruction peaks (measured each run) and the kernels' fraction of them
- results.py, plot.py, report.py: tables, JSON / CSV, PNG, BENCHMARKS.md
- cli.py: the command line

See PERFORMANCE.md (the project's guide to measuring) for the peers and how to time.
"""
from . import families  # noqa: F401  (registers the kernel families)
from .cli import main
from .registry import FAMILIES, Case, Contender, KernelFamily, register_family
from .timing import Stats, TimingConfig

__all__ = ["main", "FAMILIES", "Case", "Contender", "KernelFamily", "register_family", "Stats", "TimingConfig"]
