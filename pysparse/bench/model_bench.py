"""``pysparse bench model``: a whole model in fp32 against its converted copies, and a
per-layer profile saying which nn.Linear layers are worth compressing."""
from __future__ import annotations

import copy
import itertools
import math
import sys
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

import pysparse
from pysparse.nn import Int8Linear

from . import peers
from .machine import finish, l3_bytes, run_header
from .models import BenchError
from .timing import Stats, Timed, TimingConfig, rotation_sets, time_interleaved

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass
class ModelRun:
    """One ``pysparse bench model`` run: the model (fp32, eval mode), its name and input shape."""

    name: str
    model: nn.Module
    input_shape: tuple[int, ...]
    timing: TimingConfig = field(default_factory=TimingConfig.full)
    progress: bool = True


@dataclass
class LinearSite:
    """An nn.Linear as the model calls it: its input's shape (M rows of in_features), and
    calls per forward."""

    name: str
    layer: nn.Linear
    shape: tuple[int, ...]
    M: int
    calls: int = 1


def _trace_linears(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[LinearSite]]:
    """Run the model once; return its output and the nn.Linear layers it called, in order.
    Only exact nn.Linear counts: what pysparse.quantize_int8 converts."""
    sites: dict[str, LinearSite] = {}

    def hook(name: str) -> Callable:
        def f(mod: nn.Linear, args: tuple) -> None:
            M = args[0].numel() // max(mod.in_features, 1)
            if name in sites:
                sites[name].calls += 1
            else:
                sites[name] = LinearSite(name, mod, tuple(args[0].shape), M)
        return f

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in model.named_modules() if type(m) is nn.Linear]
    try:
        y = model(x)
    except Exception as e:
        msg = f"{type(e).__name__}: {e}".splitlines()[0]
        raise BenchError(f"the model's forward failed on an input of shape "
                         f"{','.join(map(str, x.shape))} ({msg}); check --input-shape") from None
    finally:
        for h in handles:
            h.remove()
    return y, list(sites.values())


def _first_tensor(y: Any) -> torch.Tensor:
    if isinstance(y, torch.Tensor):
        return y
    if isinstance(y, dict):
        y = list(y.values())
    if isinstance(y, (list, tuple)) and y:
        return _first_tensor(y[0])
    raise BenchError(f"the model returned {type(y).__name__}; pysparse bench model needs a tensor output")


def _converted(model: nn.Module) -> list[tuple[str, Callable[[], nn.Module], Callable[[torch.Tensor], torch.Tensor]]]:
    # (name, build a converted deepcopy, the input it takes). Each peer converts the same
    # layers pysparse does: nn.Linear only.
    def qdyn() -> nn.Module:
        with peers.quiet():
            return torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {nn.Linear}, dtype=torch.qint8)

    def torchao() -> nn.Module:
        with peers.quiet():
            from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_
            m = copy.deepcopy(model)
            quantize_(m, Int8DynamicActivationInt8WeightConfig())
        return m

    same = lambda x: x  # noqa: E731
    return [("fp32", lambda: model, same),
            ("bf16", lambda: copy.deepcopy(model).to(torch.bfloat16), lambda x: x.bfloat16()),
            ("quantize_dynamic", qdyn, same), ("torchao-int8", torchao, same),
            ("pysparse-int8", lambda: pysparse.quantize_int8(copy.deepcopy(model)), same)]


def _rel_err(y: Any, ref: torch.Tensor) -> float:
    y = _first_tensor(y).detach().double()
    return float((y - ref).norm() / ref.norm().clamp(min=1e-30))


def _stat_row(st: Stats) -> dict:
    return {"median_ms": st.median_ms, "iqr_ms": st.iqr_ms, "q1_ms": st.q1_ms, "q3_ms": st.q3_ms,
            "min_ms": st.min_ms, "samples": st.samples}


def _profile_layers(sites: list[LinearSite], run: ModelRun, bar: Any) -> dict[tuple, tuple[Stats, Stats, int]]:
    """Time each distinct (input shape, N, bias) once: fp32 F.linear against Int8Linear, interleaved.

    Between two calls of a layer inside the model, every other layer's weights pass through
    the cache; copies of the layer totalling the model's Linear weight bytes (rotation_sets
    caps them) give the layer alone that same cache state.
    """
    total = sum(s.layer.weight.numel() * 4 for s in sites)
    l3 = l3_bytes()
    out: dict[tuple, tuple[Stats, Stats, int]] = {}
    for s in sites:
        lin = s.layer
        key = (s.shape, lin.out_features, lin.bias is not None)
        if key in out:
            continue
        w = lin.weight.detach().float()
        b = None if lin.bias is None else lin.bias.detach().float()
        n = 1
        if s.M <= run.timing.rotate_max_m:
            n = min(rotation_sets(s.M, w.numel() * 4, run.timing, l3), math.ceil(total / (w.numel() * 4)))
        fp32 = [(w.clone(), None if b is None else b.clone()) for _ in range(n)]
        q = Int8Linear.from_float(peers.make_linear(w, b))
        int8 = [q] + [copy.deepcopy(q) for _ in range(n - 1)]
        x = torch.randn(s.shape)  # the model's own input shape: a 3-D input takes another path in F.linear
        c32, c8 = itertools.cycle(fp32), itertools.cycle(int8)
        items = [Timed("fp32", lambda: F.linear(x, *next(c32))), Timed("pysparse-int8", lambda: next(c8)(x))]
        st = time_interleaved(items, run.timing)
        out[key] = (st["fp32"], st["pysparse-int8"], n)
        bar.update()
    return out


def run_model(run: ModelRun, argv: Sequence[str]) -> dict:
    """Time the model whole (fp32, bf16, quantize_dynamic, torchao, pysparse) and each of its
    nn.Linear layers; return the results document (tables: results.model_tables)."""
    from tqdm.auto import tqdm

    g = torch.Generator().manual_seed(0)
    x = torch.randn(*run.input_shape, generator=g)
    model = run.model.eval()
    with torch.no_grad():
        y, sites = _trace_linears(model, x)  # first: a model that will not run is a bad argument
        ref = _first_tensor(y).double()
        doc = run_header("model", argv)
        convs = [m for m in model.modules() if isinstance(m, _CONVS)]
        n_params = sum(p.numel() for p in model.parameters())
        conv_params = sum(p.numel() for m in convs for p in m.parameters())
        doc.update({"timing": asdict(run.timing), "results": [], "layers": [], "skipped": [], "notes": [],
                    "model": {"name": run.name, "input_shape": list(run.input_shape), "params": n_params,
                              "linear_layers": len(sites), "conv_layers": len(convs),
                              "conv_param_share": conv_params / max(n_params, 1)}})
        shapes = {(s.shape, s.layer.out_features, s.layer.bias is not None) for s in sites}
        bar = tqdm(total=2 + len(shapes), desc=f"pysparse bench model {run.name}", unit="step",
                   file=sys.stderr, disable=not run.progress)
        items = []
        for name, build, inp in _converted(model):
            try:
                m = build()
                xin = inp(x)
            except Exception as e:
                doc["skipped"].append({"contender": name, "reason": f"{type(e).__name__}: {e}".splitlines()[0]})
                continue
            items.append(Timed(name, (lambda m=m, xin=xin: m(xin)), check=lambda y: _rel_err(y, ref)))
        bar.update()
        failures: dict[str, str] = {}
        stats = time_interleaved(items, run.timing, failures)
        doc["skipped"] += [{"contender": n, "reason": f"failed: {why}"} for n, why in failures.items()]
        bar.update()
        for name, st in stats.items():
            doc["results"].append({"scope": "model", "model": run.name, "contender": name,
                                   **_stat_row(st), "rel_err_vs_fp32": st.error})
        layer_stats = _profile_layers(sites, run, bar)
        bar.close()
    T = stats["fp32"].median_ms
    saved = 0.0
    for s in sites:
        lin = s.layer
        f32, i8, n = layer_stats[(s.shape, lin.out_features, lin.bias is not None)]
        d = s.calls * (f32.median_ms - i8.median_ms)
        saved += d
        doc["layers"].append({"layer": s.name, "M": s.M, "N": lin.out_features, "K": lin.in_features,
                              "calls": s.calls, "fp32_ms": f32.median_ms, "int8_ms": i8.median_ms,
                              "speedup": f32.median_ms / i8.median_ms, "share": s.calls * f32.median_ms / T,
                              "predicted_model_speedup": T / max(T - d, 1e-9), "weight_sets": n})
        for c, st in (("fp32", f32), ("pysparse-int8", i8)):
            doc["results"].append({"scope": "layer", "model": run.name, "layer": s.name, "M": s.M,
                                   "N": lin.out_features, "K": lin.in_features, "calls": s.calls,
                                   "contender": c, **_stat_row(st), "weight_sets": n})
    measured = T / stats["pysparse-int8"].median_ms if "pysparse-int8" in stats else None
    doc["prediction"] = {"all_linear_predicted": T / max(T - saved, 1e-9) if sites else 1.0,
                         "measured": measured}
    if convs:
        share = doc["model"]["conv_param_share"]
        doc["notes"].append(f"{len(convs)} convolution layers ({share:.0%} of the parameters) are not converted "
                            "yet: pysparse converts nn.Linear only, so they run in fp32 in every contender here "
                            "and the int8 speedup comes from the Linear layers alone")
    if not sites:
        doc["notes"].append("the model has no nn.Linear layer: nothing to convert")
    doc["notes"].append("whole-model times are single forward calls with the weights as warm as repeated calls "
                        "leave them; per-layer times rotate weight copies to match the layer's cache state "
                        "inside the model; layers of one shape share one measurement")
    return finish(doc)
