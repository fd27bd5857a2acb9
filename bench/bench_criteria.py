"""Pruning criteria by the accuracy they keep (not time): Optimal Brain Damage against magnitude and
first-order Taylor at equal unstructured sparsity (50 / 70 / 90%), no fine-tuning, and
sensitivity-allocated per-layer amounts against a uniform amount at the same global sparsity.

    python bench/bench_criteria.py [--quick] [--json out.json]

Models, trained here on scikit-learn's bundled digits (8x8 images; 957 train / 300 validation /
540 test images, seeded):
  mlp        64-256-256-10 ReLU MLP
  cnn        the digits CNN of pysparse.cnn_digits (width 32: conv-bn-relu x 4, a Linear head)
  cnn8       the same CNN at width 8 (fewer redundant weights)
Criteria (pysparse.prune.unstructured, every Linear and Conv2d weight):
  magnitude  |w|
  taylor     |w * dL/dw|, dL/dw averaged over the calibration batches
  obd        0.5 * h_ii * w^2, h_ii the empirical Fisher (mean of squared per-batch gradients)
  each per layer (scope="layer": every layer at the sparsity) and ranked across layers
  (scope="global"); calibration: 256 training images in batches of --calib-batch (1: the
  per-sample empirical Fisher).
Allocation: pysparse.prune.sensitivity (magnitude, each layer alone, accuracy on the validation
split) then SensitivityTable.allocate(target), against every layer at the target (uniform) and one
global magnitude ranking, all measured on the test split.
Accuracy does not depend on load: run it anywhere. Deterministic for a seed (one thread).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from pysparse import prune  # noqa: E402
from pysparse.cnn_digits import accuracy, digits_cnn, digits_tensors, fit  # noqa: E402

SPARSITIES = (0.5, 0.7, 0.9)
CRITERIA = ("magnitude", "taylor", "obd")
LEVELS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98)


@dataclass(frozen=True)
class ModelCase:
    """A model trained here: its name, how to build it, epochs and learning rate of Adam."""

    name: str
    kind: str  # "mlp" | "cnn"
    width: int
    epochs: int
    lr: float = 2e-3

    def build(self) -> nn.Module:
        if self.kind == "mlp":
            w = self.width
            return nn.Sequential(nn.Flatten(), nn.Linear(64, w), nn.ReLU(), nn.Linear(w, w), nn.ReLU(),
                                 nn.Linear(w, 10))
        return digits_cnn(self.width)


MODELS = [ModelCase("mlp", "mlp", 256, 30), ModelCase("cnn", "cnn", 32, 12), ModelCase("cnn8", "cnn", 8, 12)]


@dataclass
class Result:
    model: str
    params: int
    dense: float
    criteria: list = field(default_factory=list)  # {scope, sparsity, criterion, accuracy}
    allocation: list = field(default_factory=list)  # {target, uniform, global, allocated, amounts}
    seconds: float = 0.0


def run_model(case: ModelCase, data, calib_batch: int, seed: int, quick: bool) -> Result:
    t0 = time.time()
    (xt, yt), (xv, yv), (xte, yte) = data
    torch.manual_seed(seed)
    model = fit(case.build(), xt, yt, max(2, case.epochs // 3) if quick else case.epochs, case.lr, seed=seed)
    layers = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    res = Result(case.name, sum(m.weight.numel() for m in layers), accuracy(model, xte, yte))
    calib = [(xt[i:i + calib_batch], yt[i:i + calib_batch]) for i in range(0, 256, calib_batch)]
    for scope in ("layer", "global"):
        for s in SPARSITIES:
            for crit in CRITERIA:
                m = copy.deepcopy(model)
                prune.unstructured(m, s, criterion=crit, data=calib if crit != "magnitude" else None, scope=scope,
                                   progress=False)
                res.criteria.append({"scope": scope, "sparsity": s, "criterion": crit,
                                     "accuracy": accuracy(m, xte, yte)})
    table = prune.sensitivity(model, lambda mm: accuracy(mm, xv, yv), levels=LEVELS, progress=False)
    for target in SPARSITIES:
        amounts = table.allocate(target)
        row = {"target": target, "amounts": {k: round(v, 4) for k, v in amounts.items()}}
        for label, kw in (("uniform", {}), ("global", {"scope": "global"}), ("allocated", {"per_layer": amounts})):
            m = copy.deepcopy(model)
            prune.unstructured(m, target, progress=False, **kw)
            row[label] = accuracy(m, xte, yte)
        res.allocation.append(row)
    res.seconds = time.time() - t0
    return res


def render(results: list[Result]) -> str:
    out = ["Accuracy (%) on the digits test split after one-shot unstructured pruning, no fine-tuning", ""]
    head = f"{'model':6} {'scope':6} {'sparsity':>8} " + " ".join(f"{c:>9}" for c in CRITERIA)
    out += [head, "-" * len(head)]
    for r in results:
        out.append(f"{r.model:6} {'dense':6} {'0':>8} " + " ".join(f"{r.dense:9.1f}" for _ in CRITERIA))
        for scope in ("layer", "global"):
            for s in SPARSITIES:
                acc = {c["criterion"]: c["accuracy"] for c in r.criteria if c["scope"] == scope and c["sparsity"] == s}
                best = max(acc.values())
                cells = " ".join(f"{acc[c]:8.1f}{'*' if acc[c] == best else ' '}" for c in CRITERIA)
                out.append(f"{r.model:6} {scope:6} {s:8.0%} {cells}")
    out += ["", "Sensitivity-allocated per-layer amounts vs uniform, the same global sparsity (magnitude)", ""]
    head = f"{'model':6} {'target':>6} {'uniform':>8} {'global':>8} {'allocated':>9}  amounts"
    out += [head, "-" * len(head)]
    for r in results:
        for a in r.allocation:
            amounts = ", ".join(f"{k}:{v:.2f}" for k, v in a["amounts"].items())
            out.append(f"{r.model:6} {a['target']:6.0%} {a['uniform']:8.1f} {a['global']:8.1f} {a['allocated']:9.1f}"
                       f"  {amounts}")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", help="write the results here")
    p.add_argument("--quick", action="store_true", help="a third of the training epochs (a smoke run)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--calib-batch", type=int, default=1,
                   help="calibration batch size for taylor / obd (1: the per-sample empirical Fisher)")
    p.add_argument("--models", default=",".join(c.name for c in MODELS))
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # deterministic and load-independent; these models are tiny
    xtr, ytr, xte, yte = digits_tensors(args.seed)
    data = ((xtr[:-300], ytr[:-300]), (xtr[-300:], ytr[-300:]), (xte, yte))
    wanted = args.models.split(",")
    results = [run_model(c, data, args.calib_batch, args.seed, args.quick) for c in MODELS if c.name in wanted]
    print(render(results))
    if args.json:
        doc = {"bench": "criteria", "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               "machine": {"platform": platform.platform(), "processor": platform.processor(),
                           "python": platform.python_version(), "torch": torch.__version__},
               "config": {"seed": args.seed, "calib_batch": args.calib_batch, "quick": args.quick,
                          "sparsities": SPARSITIES, "levels": LEVELS, "models": [asdict(c) for c in MODELS
                                                                                 if c.name in wanted]},
               "results": [asdict(r) for r in results]}
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
