"""The compression report: one row per step (metric, stored size, MACs, latency), the per-layer
choices, and the whole-model speedup measured against the original in the same run."""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Optional


@dataclass
class StepRecord:
    """What one step left behind (the first record is the original model)."""
    step: str
    metric: Optional[float]
    size_bytes: int
    nonzero_weights: int
    macs: int
    latency_ms: float
    seconds: float = 0.0
    per_layer: Optional[dict[str, float]] = None


@dataclass
class CompressReport:
    """Returned by ``pysparse.compress`` beside the compressed model.

    records: one StepRecord per step, after the original. speedup: the original's latency over the
    final model's, both timed interleaved at the end on example_inputs (not the per-step figures,
    which are timed as each step ends). layers: the final model's compute layers and what became
    of them. machine: the CPU path and threads the figures were taken with.
    """
    recipe: list[dict]
    records: list[StepRecord]
    layers: list[dict]
    original_ms: float
    final_ms: float
    machine: dict = field(default_factory=dict)

    @property
    def speedup(self) -> float:
        """Original latency over compressed latency (same run, interleaved)."""
        return self.original_ms / self.final_ms if self.final_ms > 0 else float("inf")

    @property
    def metric_before(self) -> Optional[float]:
        """eval_fn of the original model (None without eval_fn)."""
        return self.records[0].metric

    @property
    def metric_after(self) -> Optional[float]:
        """eval_fn of the compressed model (None without eval_fn)."""
        return self.records[-1].metric

    @property
    def size_ratio(self) -> float:
        """Final stored bytes over the original's."""
        return self.records[-1].size_bytes / max(self.records[0].size_bytes, 1)

    @property
    def macs_ratio(self) -> float:
        """Final multiply-accumulates over the original's."""
        return self.records[-1].macs / max(self.records[0].macs, 1)

    def to_dict(self) -> dict:
        """Plain types, for JSON."""
        d = asdict(self)
        d.update(speedup=self.speedup, size_ratio=self.size_ratio, macs_ratio=self.macs_ratio,
                 metric_before=self.metric_before, metric_after=self.metric_after)
        return d

    def to_json(self, path: str | os.PathLike) -> None:
        """Write the report as JSON."""
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2, default=str)

    def table(self) -> str:
        """The per-step table, then the headline figures."""
        head = f"{'step':<46} {'metric':>8} {'size KB':>9} {'nonzero':>10} {'MMACs':>9} {'ms':>8} {'step s':>7}"
        lines = [head, "-" * len(head)]
        for r in self.records:
            metric = f"{r.metric:8.3f}" if r.metric is not None else f"{'-':>8}"
            lines.append(f"{r.step[:46]:<46} {metric} {r.size_bytes / 1024:9.1f} {r.nonzero_weights:10d} "
                         f"{r.macs / 1e6:9.2f} {r.latency_ms:8.3f} {r.seconds:7.1f}")
        lines.append("")
        lines.append(f"speedup {self.speedup:.2f}x ({self.original_ms:.3f} -> {self.final_ms:.3f} ms, interleaved), "
                     f"size {self.size_ratio:.2f}x, MACs {self.macs_ratio:.2f}x of the original"
                     + (f", metric {self.metric_before:.3f} -> {self.metric_after:.3f}"
                        if self.metric_before is not None else ""))
        if self.machine:
            lines.append("machine: " + ", ".join(f"{k}={v}" for k, v in self.machine.items()))
        return "\n".join(lines)

    def layer_table(self) -> str:
        """The final model's compute layers and what became of each."""
        keys = ["layer", "kind"] + sorted({k for r in self.layers for k in r} - {"layer", "kind"})
        rows = [[str(r.get(k, "")) for k in keys] for r in self.layers]
        widths = [max(len(k), *(len(r[i]) for r in rows)) if rows else len(k) for i, k in enumerate(keys)]
        out = ["  ".join(k.ljust(w) for k, w in zip(keys, widths))]
        out += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
        return "\n".join(out)

    def __str__(self) -> str:
        return self.table()


def from_dict(d: dict[str, Any]) -> CompressReport:
    """A report back from to_dict() / its JSON."""
    records = [StepRecord(**r) for r in d["records"]]
    return CompressReport(recipe=d["recipe"], records=records, layers=d["layers"], original_ms=d["original_ms"],
                          final_ms=d["final_ms"], machine=d.get("machine", {}))
