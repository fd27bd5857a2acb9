"""SensitivityTable: what ``pysparse.prune.sensitivity`` measured, and per-layer amounts from it."""
from __future__ import annotations

import csv
import json
import math
import numbers
from dataclasses import dataclass, field
from typing import Optional

_FORMAT = "pysparse.SensitivityTable/1"


@dataclass
class SensitivityTable:
    """The metric of a model with each layer pruned alone at each level (the others dense).

    baseline: the metric of the model as given. levels: the sparsities tried (ascending).
    layers: the layers measured, in model order. params: weights per layer (for a filter group,
    its producers' weights). granularity: "unstructured" | "block" | "filter". higher_is_better:
    the metric's direction (accuracy: True; a loss: False). results: {layer: [metric per level]}.
    """

    baseline: float
    levels: tuple[float, ...]
    layers: list[str]
    params: dict[str, int]
    granularity: str
    higher_is_better: bool = True
    results: dict[str, list[float]] = field(default_factory=dict)
    criterion: str = "magnitude"

    # -- reading ---------------------------------------------------------------------------
    def metric(self, layer: str, level: float) -> float:
        """The metric with ``layer`` pruned to ``level``: measured at a level of the table, linearly
        interpolated between levels (0 is the baseline). KeyError for a layer not measured,
        ValueError for a level outside [0, max(levels)]."""
        if layer not in self.results:
            raise KeyError(f"layer {layer!r} was not measured (layers: {self.layers})")
        xs, ys = self._curve(layer)
        level = float(level)
        if not xs[0] <= level <= xs[-1] + 1e-12:
            raise ValueError(f"level must be in [0, {xs[-1]}] (the levels measured), got {level}")
        for i in range(1, len(xs)):
            if level <= xs[i] + 1e-12:
                if abs(level - xs[i]) <= 1e-12:
                    return ys[i]
                t = (level - xs[i - 1]) / (xs[i] - xs[i - 1])
                return ys[i - 1] + t * (ys[i] - ys[i - 1])
        return ys[-1]

    def loss(self, layer: str, level: float) -> float:
        """Predicted metric loss of pruning ``layer`` to ``level`` (positive = worse than baseline)."""
        d = self.baseline - self.metric(layer, level)
        return d if self.higher_is_better else -d

    def _curve(self, layer: str) -> tuple[list[float], list[float]]:
        return [0.0] + list(self.levels), [self.baseline] + list(self.results[layer])

    def rows(self) -> list[dict]:
        """One dict per (layer, level): layer, params, sparsity, metric, loss (vs the baseline)."""
        return [{"layer": n, "params": self.params[n], "sparsity": lv, "metric": m,
                 "loss": (self.baseline - m) if self.higher_is_better else (m - self.baseline)}
                for n in self.layers for lv, m in zip(self.levels, self.results[n])]

    def __str__(self) -> str:
        head = ["layer", "params"] + [f"{lv:g}" for lv in self.levels]
        body = [[n, str(self.params[n])] + [f"{m:.4g}" for m in self.results[n]] for n in self.layers]
        widths = [max(len(r[i]) for r in [head] + body) for i in range(len(head))]

        def line(r):
            return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))

        direction = "higher is better" if self.higher_is_better else "lower is better"
        title = (f"sensitivity ({self.granularity}, {self.criterion}): metric with one layer pruned to each "
                 f"sparsity; baseline {self.baseline:.4g} ({direction})")
        return "\n".join([title, line(head), "  ".join("-" * w for w in widths)] + [line(r) for r in body])

    # -- saving ----------------------------------------------------------------------------
    def to_csv(self, path) -> None:
        """``rows()`` as CSV (header: layer, params, sparsity, metric, loss)."""
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["layer", "params", "sparsity", "metric", "loss"])
            w.writeheader()
            w.writerows(self.rows())

    def to_dict(self) -> dict:
        return {"format": _FORMAT, "baseline": self.baseline, "levels": list(self.levels), "layers": self.layers,
                "params": self.params, "granularity": self.granularity, "higher_is_better": self.higher_is_better,
                "criterion": self.criterion, "results": self.results}

    def to_json(self, path) -> None:
        """Everything in the table as JSON (``from_json`` reads it back)."""
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=1)

    @classmethod
    def from_json(cls, path) -> "SensitivityTable":
        """The table ``to_json`` wrote; ValueError when the file is not one."""
        with open(path) as f:
            d = json.load(f)
        if not isinstance(d, dict) or d.get("format") != _FORMAT:
            raise ValueError(f"{path}: not a pysparse sensitivity table (no format {_FORMAT!r})")
        try:
            t = cls(baseline=float(d["baseline"]), levels=tuple(float(v) for v in d["levels"]),
                    layers=list(d["layers"]), params={k: int(v) for k, v in d["params"].items()},
                    granularity=d["granularity"], higher_is_better=bool(d["higher_is_better"]),
                    results={k: [float(x) for x in v] for k, v in d["results"].items()},
                    criterion=d.get("criterion", "magnitude"))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path}: a malformed sensitivity table ({e})") from None
        if set(t.layers) != set(t.results) or any(len(v) != len(t.levels) for v in t.results.values()):
            raise ValueError(f"{path}: a malformed sensitivity table (results do not match layers x levels)")
        return t

    def plot(self, path=None):
        """A matplotlib Figure: one curve per layer, metric against sparsity (the baseline dashed).
        Saved to ``path`` when given (the format from its extension). Uses the Agg canvas, never
        pyplot, so it needs no display and changes no global backend."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        fig = Figure(figsize=(7, 4.5))
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        for n in self.layers:
            xs, ys = self._curve(n)
            ax.plot(xs, ys, marker="o", markersize=3, label=n)
        ax.axhline(self.baseline, color="grey", linestyle="--", linewidth=1, label="baseline")
        ax.set_xlabel("sparsity of the one layer pruned")
        ax.set_ylabel("metric")
        ax.set_title(f"pysparse sensitivity ({self.granularity}, {self.criterion})")
        ax.legend(fontsize="small", ncol=max(1, len(self.layers) // 12))
        fig.tight_layout()
        if path is not None:
            fig.savefig(path)
        return fig

    # -- allocation ------------------------------------------------------------------------
    def allocate(self, target: float, *, max_level: Optional[float] = None) -> dict[str, float]:
        """Per-layer amounts whose weight-count-weighted mean is ``target`` with the least predicted
        metric loss (the sum of the layers' losses, each read off its curve, linearly interpolated
        between the measured levels), no amount above ``max_level`` (default: the highest level).

        The choice is greedy over each curve's lower convex hull: the hull segments of all layers
        are taken in the order of their loss per pruned weight until the target's weight count is
        met, the last one in part (an exact solution of the convex relaxation; only that one layer
        sits between measured levels). Returns {layer: amount} for every layer of the table.
        ValueError when target is not in [0, max_level].
        """
        top = max(self.levels)
        if max_level is None:
            max_level = top
        if isinstance(max_level, bool) or not isinstance(max_level, numbers.Real) or \
                not 0.0 < float(max_level) <= top + 1e-12:
            raise ValueError(f"max_level must be in (0, {top}] (the levels measured), got {max_level!r}")
        max_level = min(float(max_level), top)
        if isinstance(target, bool) or not isinstance(target, numbers.Real) or math.isnan(target) \
                or not 0.0 <= float(target) <= max_level + 1e-12:
            raise ValueError(f"target must be in [0, max_level={max_level}], got {target!r}")
        target = min(float(target), max_level)
        total = sum(self.params[n] for n in self.layers)
        segments = []  # (loss per weight, layer order, x0, x1, layer)
        for li, n in enumerate(self.layers):
            xs = [0.0] + [lv for lv in self.levels if lv < max_level - 1e-12] + [max_level]
            pts = _lower_hull([(x, self.loss(n, x)) for x in xs])
            p = max(self.params[n], 1)
            for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
                segments.append(((y1 - y0) / ((x1 - x0) * p), li, x0, x1, n))
        segments.sort(key=lambda s: (s[0], s[1], s[2]))
        out = {n: 0.0 for n in self.layers}
        left = target * total
        for _, _, x0, x1, n in segments:
            if left <= 0:
                break
            p = self.params[n]
            take = p * (x1 - x0)
            if take <= left:
                out[n] = x1
                left -= take
            else:
                out[n] = x0 + left / p
                left = 0.0
        return out


def _lower_hull(pts: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The lower convex hull of points sorted by x (collinear middle points dropped)."""
    hull: list[tuple[float, float]] = []
    for p in pts:
        while len(hull) >= 2:
            (x1, y1), (x2, y2) = hull[-2], hull[-1]
            if (x2 - x1) * (p[1] - y1) - (y2 - y1) * (p[0] - x1) <= 0:  # hull[-1] on or above the chord
                hull.pop()
            else:
                break
        hull.append(p)
    return hull
