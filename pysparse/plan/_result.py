"""The Plan object: per-layer rows (shape, measured ms and predicted loss per format, the
choice), the predicted whole-model speedup, a table, JSON, apply() and measure()."""
from __future__ import annotations

import copy
import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional

from torch import nn

from .. import _modules
from ._accuracy import metric
from ._capture import call
from ._formats import build, kind_of, parse
from .._timing import clock, interleaved_ms

JSON_VERSION = 1
# Whole-model timing: 15 rounds of ~50 ms turns (a model is slower than a layer; more rounds
# because the figure is a ratio the test holds to 10%).
MODEL_ROUNDS = 15
MODEL_TURN_S = 0.05


@dataclass
class LayerPlan:
    """One layer: its name(s), kind ("linear" / "conv2d"), the shape of its input in the
    example forward, calls per forward, measured ms per call in each format, the predicted
    metric loss of each format alone (None: not evaluated), and the chosen format."""

    name: str
    kind: str
    input_shape: list[int]
    ms: dict[str, float]
    loss: dict[str, Optional[float]]
    chosen: str = "dense"
    calls: int = 1
    aliases: list[str] = field(default_factory=list)
    features: list[int] = field(default_factory=list)  # [in, out] features / channels, checked by apply
    model_ms: Optional[float] = None  # the dense model's ms in this layer's timing run (interleaved with it)
    # [format, ms per call, the dense model's ms in that run(, the dense layer's ms per call inside
    # the dense model)]: the chosen format timed again as it runs inside the planned model (and the
    # dense layer as it ran inside the dense model, where hooks could time it: CPU); None: not
    # re-timed (the plan chose dense everywhere, or a plan saved before it was measured)
    in_plan: Optional[list] = None

    def saved_ms(self, dense_model_ms: Optional[float] = None) -> float:
        """Time per forward the choice saves over dense: calls x per-call difference, each time
        scaled by dense_model_ms / the model time measured beside it (in units of the plan's dense
        model time). The chosen format's time is its in-plan one when that is for this format."""
        def scaled(ms: float, beside: Optional[float]) -> float:
            return ms * dense_model_ms / beside if dense_model_ms is not None and beside else ms

        dense = scaled(self.ms["dense"], self.model_ms)
        if self.in_plan is not None and self.in_plan[0] == self.chosen:
            chosen = scaled(float(self.in_plan[1]), float(self.in_plan[2]))
            if len(self.in_plan) > 3:
                # dense timed inside the dense model (hooks), chosen inside the planned model's
                # cache state: both raw, as the model time is. Scaled by the model timed beside it,
                # the chosen time was 5-8% too high: that model ran warmer there (after the other
                # planned layers, not after a scrub), which is cache, not load.
                dense, chosen = float(self.in_plan[3]), float(self.in_plan[1])
        else:
            chosen = scaled(self.ms[self.chosen], self.model_ms)
        return self.calls * (dense - chosen)


def model_ms(models: dict[str, nn.Module], inputs: Any, *, cuda: bool = False) -> dict[str, float]:
    """Median ms per forward of each model, timed interleaved."""
    fns = {k: (lambda m=m: call(m, inputs)) for k, m in models.items()}
    return interleaved_ms(fns, rounds=MODEL_ROUNDS, turn_s=MODEL_TURN_S, cuda=cuda, drop_slow=False, settle=True)


def _features(m: nn.Module) -> list[int]:
    if isinstance(m, nn.Linear):
        return [m.in_features, m.out_features]
    return [m.in_channels, m.out_channels]


class Plan:
    """What ``pysparse.plan.plan`` measured and chose.

    choices: {layer: format}. predicted_speedup: dense model ms / (dense model ms - time the
    choices save), the per-layer times measured on this machine (the model's other work counted
    as it is; each layer's times scaled by the dense model's median time over the model time
    measured interleaved with that layer, so load that came and went between layers cancels).
    dense_model_ms: the median of those per-layer-run model times. layers: a LayerPlan per
    layer. str(plan) is the table; to_json / from_json keep it; apply(model) builds the planned
    model; measure() times it against the dense one. machine: torch version, threads, the clock
    (thread CPU time with one thread, else wall time) and the kernel paths the timings ran.
    """

    def __init__(self, layers: list[LayerPlan], dense_model_ms: float, *, budget: Optional[float],
                 baseline_metric: Optional[float] = None, notes: Optional[list[str]] = None,
                 machine: Optional[dict] = None, model: Optional[nn.Module] = None, example_inputs: Any = None,
                 eval_fn: Optional[Callable[[nn.Module], Any]] = None) -> None:
        self.layers = layers
        self.dense_model_ms = float(dense_model_ms)
        self.budget = budget
        self.baseline_metric = baseline_metric
        self.notes = list(notes or [])
        self.machine = dict(machine or {})
        # what measure() needs; not saved to JSON
        self.model, self.example_inputs, self.eval_fn = model, example_inputs, eval_fn

    # ------------------------------------------------------------------ the figures
    @property
    def choices(self) -> dict[str, str]:
        """{layer name: chosen format} for every planned layer."""
        return {r.name: r.chosen for r in self.layers}

    @property
    def saved_ms(self) -> float:
        """Milliseconds per model call the chosen formats save, summed over layers (x calls)."""
        return sum(r.saved_ms(self.dense_model_ms) for r in self.layers)

    @property
    def predicted_ms(self) -> float:
        """The dense model's time minus what the choices save."""
        return self.dense_model_ms - self.saved_ms

    @property
    def predicted_speedup(self) -> float:
        """dense model time / (dense model time - saved time)."""
        left = self.predicted_ms
        # the layers' savings were timed apart from the model: if they add up to more than the
        # whole model took (noise), the prediction is unbounded; say so rather than divide by ~0
        return self.dense_model_ms / left if left > 0 else math.inf

    @property
    def predicted_loss(self) -> Optional[float]:
        """Sum of the chosen formats' predicted losses (None without eval_fn)."""
        ls = [r.loss.get(r.chosen) for r in self.layers]
        return None if any(v is None for v in ls) else sum(max(v, 0.0) for v in ls)

    # ------------------------------------------------------------------ the table
    def report(self) -> str:
        """The per-layer table (ms per format, predicted loss, the choice) and the headline figures."""
        fmts: list[str] = []
        for r in self.layers:
            fmts += [f for f in r.ms if f not in fmts]
        head = ["layer", "kind", "input", "chosen"] + fmts
        out_rows = [head] + [self._cells(r, fmts) for r in self.layers]
        w = [max(len(row[i]) for row in out_rows) for i in range(len(head))]
        lines = ["  ".join(c.ljust(w[i]) for i, c in enumerate(row)).rstrip() for row in out_rows]
        lines.append("cells: ms per call (predicted metric loss of that format in that layer alone; none shown: not "
                     "evaluated, as no faster than dense); * = chosen")
        pl = self.predicted_loss
        lines.append(f"dense model {self.dense_model_ms:.3f} ms; planned (predicted) {self.predicted_ms:.3f} ms; "
                     f"predicted speedup {self.predicted_speedup:.3f}x"
                     + (f"; predicted loss {pl:.4f} of budget {self.budget:g}" if pl is not None
                        and self.budget is not None else "")
                     + (f"; baseline metric {self.baseline_metric:.4f}" if self.baseline_metric is not None else ""))
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)

    @staticmethod
    def _cells(r: LayerPlan, fmts: list[str]) -> list[str]:
        cells = [r.name + (f" (x{r.calls})" if r.calls != 1 else ""), r.kind,
                 "x".join(str(s) for s in r.input_shape), r.chosen]
        for f in fmts:
            if f not in r.ms:
                cells.append("-")
                continue
            loss = r.loss.get(f)
            c = f"{r.ms[f]:.3f}" + (f" ({loss:+.4f})" if loss is not None and f != "dense" else "")
            cells.append(("*" if f == r.chosen else "") + c)
        return cells

    def __str__(self) -> str:
        return self.report()

    def __repr__(self) -> str:
        n = sum(r.chosen != "dense" for r in self.layers)
        return f"Plan({n} of {len(self.layers)} layers changed, predicted speedup {self.predicted_speedup:.3f}x)"

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> dict:
        """Plain types, for JSON."""
        return {"version": JSON_VERSION, "dense_model_ms": self.dense_model_ms, "budget": self.budget,
                "baseline_metric": self.baseline_metric, "predicted_speedup": self.predicted_speedup,
                "notes": self.notes, "machine": self.machine, "layers": [asdict(r) for r in self.layers]}

    def to_json(self, path: str) -> None:
        """Write the plan as JSON (``Plan.from_json`` reads it back)."""
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=1)

    @classmethod
    def from_dict(cls, d: dict) -> "Plan":
        """A plan back from ``to_dict()``."""
        if not isinstance(d, dict) or d.get("version") != JSON_VERSION:
            raise ValueError(f"not a pysparse plan (version {JSON_VERSION}): {str(d)[:80]!r}")
        layers = [LayerPlan(**r) for r in d["layers"]]
        for r in layers:
            parse(r.chosen)  # a hand-edited file with an unknown format fails here, not in apply
            if r.chosen not in r.ms:
                raise ValueError(f"layer {r.name!r}: chosen format {r.chosen!r} was not measured ({list(r.ms)})")
        return cls(layers, d["dense_model_ms"], budget=d.get("budget"), baseline_metric=d.get("baseline_metric"),
                   notes=d.get("notes"), machine=d.get("machine"))

    @classmethod
    def from_json(cls, path: str) -> "Plan":
        """A plan back from ``to_json``'s file."""
        with open(path) as f:
            return cls.from_dict(json.load(f))

    # ------------------------------------------------------------------ using it
    def apply(self, model: nn.Module) -> nn.Module:
        """A deep copy of ``model`` with every choice made (each layer built from the copy's own
        weights); ``model`` is untouched. Raises ValueError when a planned layer is missing or
        has another kind or shape."""
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        names = {n: m for n, m in model.named_modules(remove_duplicate=False)}
        for r in self.layers:
            m = names.get(r.name)
            if m is None or kind_of(m) != r.kind or (r.features and _features(m) != r.features):
                got = "nothing" if m is None else f"{type(m).__name__} {_features(m) if kind_of(m) else ''}"
                raise ValueError(f"plan.apply: the plan has {r.kind} {r.name!r} {r.features}, the model has {got} "
                                 f"there: apply a plan to the model it was made for")
        work = copy.deepcopy(model)
        todo = [r for r in self.layers if r.chosen != "dense"]
        new: dict[str, nn.Module] = {}
        for r in todo:
            layer = work.get_submodule(r.name) if r.name else work
            rep = build(layer, r.chosen)
            for n in [r.name] + list(r.aliases):
                new[n] = rep
        return _modules.replace(work, new)

    def measure(self, model_after: Optional[nn.Module] = None, *, model: Optional[nn.Module] = None,
                example_inputs: Any = None, eval_fn: Optional[Callable[[nn.Module], Any]] = None) -> dict:
        """Time the planned model against the dense one (interleaved, same inputs) and evaluate
        both. model_after: the planned model (default: ``apply(model)``). model, example_inputs,
        eval_fn default to those plan() was given (a plan loaded from JSON needs them here).

        Returns {"measured_speedup", "predicted_speedup", "metric_before", "metric_after"
        (None without eval_fn), "dense_ms", "planned_ms", "clock"} (the clock plan() uses: thread
        CPU time with one torch thread on the CPU, else wall time).
        """
        model = model if model is not None else self.model
        inputs = example_inputs if example_inputs is not None else self.example_inputs
        eval_fn = eval_fn if eval_fn is not None else self.eval_fn
        if model is None or inputs is None:
            raise ValueError("plan.measure needs the dense model and example_inputs (a plan loaded from JSON: "
                             "pass model= and example_inputs=)")
        if model_after is None:
            model_after = self.apply(model)
        cuda = any(p.is_cuda for p in model.parameters())
        t = model_ms({"dense": model, "planned": model_after}, inputs, cuda=cuda)
        before = after = None
        if eval_fn is not None:
            before = metric(eval_fn, model, "the dense model")
            after = metric(eval_fn, model_after, "the planned model")
        return {"measured_speedup": t["dense"] / t["planned"], "predicted_speedup": self.predicted_speedup,
                "metric_before": before, "metric_after": after, "dense_ms": t["dense"], "planned_ms": t["planned"],
                "clock": clock(cuda)[1]}

