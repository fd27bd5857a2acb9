"""The benchmark grid as data: a kernel family is a registered entry listing its contenders.

Adding a kernel family (block-sparse linear, a conv) to ``pysparse bench kernels`` means
writing its contenders (peers.py) and calling ``register_family``; the runner, tables, JSON,
CSV, plots and BENCHMARKS.md need no change.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence

import torch


@dataclass(frozen=True)
class Case:
    """One grid point: y [M, N] = x [M, K] @ W [N, K]^T, W at ``density`` (1.0: dense)."""

    M: int
    N: int
    K: int
    density: float = 1.0


@dataclass(frozen=True)
class KernelOp:
    """The pysparse op a contender's call runs, for its fraction of the instruction peak.

    op and facts(state) (dtype, block: what pysparse.ops.kernel_for takes) say which kernel
    runs (asked under the contender's env, at the case's M); kind ("int8", "fp32", "bf16")
    which peak its MACs count against; macs(state, case) the multiply-accumulates one call
    does: M x N x K for a dense layer, M x (stored blocks x block size) for a block-sparse
    one (only stored blocks' MACs).
    """

    op: str
    kind: str
    macs: Callable[[Any, Case], int]
    facts: Callable[[Any], Mapping[str, Any]] = lambda state: {}


def _always(case: Case) -> bool:
    return True


def _same(x: torch.Tensor) -> torch.Tensor:
    return x


@dataclass(frozen=True)
class Contender:
    """One way to compute a family's op, as a user of that library would call it.

    prepare(w, bias) builds one weight set from the float32 weight [N, K] and bias [N]
    (conversion, packing: not timed); call(state, x) is the timed work; input(x) turns the
    float32 activations into what call takes (bf16, pre-quantized int8), untimed.
    role: "ours", "peer" (an alternative a user has) or "bound" (a bare kernel that is not a
    whole layer, e.g. torch._int_mm: shown, never the "fastest peer").
    weight_bytes(case): bytes one call streams from memory, for cache rotation and the
    bandwidth bound. applies(case): False where the contender cannot run (torch._int_mm at
    M <= 16). available(): None, or why this contender cannot run here (skipped cleanly).
    env: environment set during its turns. state_key: contenders with the same key share
    weight sets (the ISA paths of one packed layout). tolerance: the relative error against
    a float64 reference above which the row is flagged (None: no check). kernel_op: the
    pysparse op it runs (its rows then carry the kernel and its fraction of peak), or None.
    """

    name: str
    role: str
    prepare: Callable[[torch.Tensor, Optional[torch.Tensor]], Any]
    call: Callable[[Any, torch.Tensor], Any]
    weight_bytes: Callable[[Case], int]
    input: Callable[[torch.Tensor], torch.Tensor] = _same
    applies: Callable[[Case], bool] = _always
    available: Callable[[], Optional[str]] = lambda: None
    env: Mapping[str, str] = field(default_factory=dict)
    state_key: Optional[str] = None
    copy: Callable[[Any], Any] = copy.deepcopy
    tolerance: Optional[float] = None
    device: str = "cpu"
    kernel_op: Optional[KernelOp] = None


@dataclass(frozen=True)
class KernelFamily:
    """A grid of cases and the contenders timed side by side on each.

    cases(quick, shapes) lists the grid (the --quick grid when quick; when shapes is not None,
    cases built from those (M, N, K) triples: the CLI's hidden --shapes, for tests).
    contenders(device) lists everything that might run on that device ("cpu" or "cuda").
    make_weight(case) gives the float32 weight [N, K] every contender converts (for a sparse
    family, pruned to case.density). The table and plot show, for each contender named in
    ``speedup_for`` (or the first "ours" contender when it is empty), its speedup over its
    entry in ``references``, else over ``reference`` (contender names), else over the fastest
    "peer". ``x_axis`` ("M" or "density") is the plot's axis; ``ideal`` draws 1/density on it.
    """

    name: str
    title: str
    cases: Callable[[bool, Optional[Sequence[tuple[int, int, int]]]], list[Case]]
    contenders: Callable[[str], list[Contender]]
    make_weight: Callable[[Case], torch.Tensor]
    speedup_for: tuple[str, ...] = ()
    reference: Optional[str] = None
    references: Mapping[str, str] = field(default_factory=dict)
    x_axis: str = "M"
    ideal: bool = False
    bandwidth_column: bool = False  # show the int8 weight bytes' time at the measured bandwidth
    devices: tuple[str, ...] = ("cpu",)


FAMILIES: dict[str, KernelFamily] = {}


def register_family(family: KernelFamily) -> KernelFamily:
    """Add ``family`` to the grid ``pysparse bench kernels`` runs (by name; a name is unique)."""
    if family.name in FAMILIES:
        raise ValueError(f"kernel family {family.name!r} is already registered")
    FAMILIES[family.name] = family
    return family


def family_meta(family: KernelFamily, contenders: list[Contender]) -> dict:
    """What the tables, plots and report need to know about a family, JSON-ready."""
    speedup_for = list(family.speedup_for) or [c.name for c in contenders if c.role == "ours"][:1]
    return {"title": family.title, "contenders": [c.name for c in contenders],
            "roles": {c.name: c.role for c in contenders}, "speedup_for": speedup_for,
            "reference": family.reference, "references": dict(family.references), "x_axis": family.x_axis,
            "ideal": family.ideal, "bandwidth_column": family.bandwidth_column}
