"""plan(): measure each layer in each format on this machine, predict each format's accuracy
cost, choose per layer under the budget."""
from __future__ import annotations

import math
import numbers
import platform
import statistics
import warnings
from typing import Any, Callable, Iterable, Optional, Sequence

import torch
from torch import nn

from .. import ops
from ._accuracy import check_table, metric, trial_losses
from ._capture import call, capture
from ._choose import choose
from ._formats import build, candidates, check_densities, expand
from ._result import LayerPlan, Plan, _features
from .._timing import Scrub, clock, interleaved_ms

# A format must beat dense by more than this fraction of the layer's time to be chosen: two
# interleaved medians of the same kernel differ by up to ~2% on the shared 2-core machines, and
# a "win" inside that is noise that the whole-model measurement would not confirm.
MIN_GAIN = 0.02
_MODEL = "<model>"  # the dense model's contender in each layer's timing run (not a format name)


def _check_budget(budget: Any) -> float:
    if isinstance(budget, bool) or not isinstance(budget, numbers.Real) or not math.isfinite(float(budget)) \
            or budget < 0:
        raise ValueError(f"budget must be a finite number >= 0 (the metric loss allowed, in eval_fn's units), "
                         f"got {budget!r}")
    return float(budget)


def _bytes(m: nn.Module) -> int:
    seen, n = set(), 0
    for t in list(m.parameters()) + list(m.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            n += t.numel() * t.element_size()
    return n


def _hook_layer_times(sites: list) -> tuple[dict, list]:
    """({layer: [ms per call], "<on>": bool}, hook handles): forward hooks timing each site's
    module, with the plan's clock, while "<on>" is set (the dense model's calls; not the layer's
    own timing calls, which may run the same module)."""
    now = clock(False)[0]
    out: dict = {"<on>": False}
    handles = []
    for s in sites:
        out[s.name] = []
        start: dict = {}

        def pre(m, a, start=start) -> None:
            if out["<on>"]:
                start["t"] = now()

        def post(m, a, o, start=start, n=s.name) -> None:
            if out["<on>"] and "t" in start:
                out[n].append((now() - start.pop("t")) * 1e3)

        handles += [s.module.register_forward_pre_hook(pre), s.module.register_forward_hook(post)]
    return out, handles


def _time_in_plan(model: nn.Module, example_inputs: Any, sites: list, built: dict[str, dict[str, nn.Module]],
                  chosen: dict[str, str], cuda: bool, progress: bool) -> dict[str, list]:
    """{layer: [format, ms, model ms]}: each layer's chosen format (dense ones too) timed again as
    it runs inside the planned model: before each call the planned model's other layers run on
    their captured inputs, in the order a forward pass reaches them after this one (so the
    caches hold what the planned model leaves, and the layer before it has just run). The first
    timings read the dense model's other weights between calls instead; the planned model's
    are smaller (int8 is a quarter of fp32) and more of them stay cached: measured here, an MLP
    of three int8 layers (8 MB of weights against 32 MB fp32) ran 2.5x faster than dense where
    the dense-scrub timings predicted 1.9x-2.3x. Nothing when every layer stays dense."""
    if all(f == "dense" for f in chosen.values()):
        return {}
    from tqdm.auto import tqdm

    mods = [(built[s.name][chosen[s.name]], s.input) for s in sites]
    out: dict[str, list] = {}
    with tqdm(total=len(sites), desc="pysparse plan: timing the plan", unit="layer", disable=not progress) as bar:
        for i, s in enumerate(sites):
            others = mods[i + 1:] + mods[:i]

            @torch.no_grad()
            def rest(others=others) -> None:
                for m, x in others:
                    m(x)

            f, m = chosen[s.name], mods[i][0]
            fns = {_MODEL: lambda: call(model, example_inputs), f: (lambda m=m, x=s.input: m(x))}
            t = interleaved_ms(fns, cuda=cuda, before=rest, keep=(_MODEL,), paired_with=_MODEL)
            out[s.name] = [f, t[f], t[_MODEL]]
            bar.update()
    return out


def _machine(cuda: bool) -> dict:
    info = {"torch": torch.__version__, "threads": torch.get_num_threads(), "clock": clock(cuda)[1],
            "cpu": platform.processor() or platform.machine()}
    for op in ("int8_linear", "bsr_linear", "bsr_int8_linear", "int8_conv2d"):
        try:
            info[f"kernel {op}"] = ops.kernel_for("cpu", op)
        except Exception as e:  # an op this build lacks: say so rather than fail the plan
            info[f"kernel {op}"] = f"unavailable ({type(e).__name__})"
    return info


@torch.no_grad()
def plan(model: nn.Module, example_inputs: Any, *, eval_fn: Optional[Callable[[nn.Module], Any]] = None,
         budget: float = 0.01, formats: Optional[Iterable[str]] = None,
         densities: Sequence[float] = (0.5, 0.25, 0.1), sensitivity: Any = None, progress: bool = True) -> Plan:
    """Measure, on this machine, each Linear / Conv2d layer's latency in each available format
    and choose per layer the fastest whose predicted accuracy cost fits the budget.

    model: the model as it will run (call ``model.eval()`` first: it is timed and evaluated in
      the mode it is in). Never changed: trials swap a layer and put the same module back.
    example_inputs: one batch as the model will see it (a tensor, a tuple of positional tensors
      or a dict of keyword ones); one forward with hooks gives each layer its real input, on
      which every candidate layer, built from the real weights, is timed (interleaved medians).
    eval_fn: model -> float, higher is better (accuracy on a held-out set). Each candidate
      format is put in each layer alone and evaluated: the drop from the model's own metric is
      that format's predicted loss there. Formats slower than dense are not evaluated.
    budget: the total metric loss allowed (absolute, eval_fn's units: 0.01 = one point of
      accuracy in [0, 1]). The per-layer losses are taken as additive; the choice maximizes the
      time saved with their sum <= budget (an exact knapsack on losses rounded up).
    formats: restrict the candidates (names: "dense", "int8", "bsr:<density>",
      "bsr-int8:<density>", "bsr" / "bsr-int8" for each of ``densities``, "2:4"); default:
      every format that applies to the layer on this machine. Conv2d layers get "int8" only
      where int8 convs pay (pysparse.quantize.int8_conv_pays: AVX2, VNNI or AMX, not depthwise) or when listed here.
      Without eval_fn only the formats listed here are considered, chosen by speed alone, and
      the budget is ignored (a warning says so); with neither, every layer stays dense.
    densities: fractions of blocks kept for the block-sparse formats.
    sensitivity: a pysparse.prune.SensitivityTable of block granularity: its levels answer the
      "bsr:<1 - level>" trials instead of evaluating again (int8 and other formats still are).
    progress: a progress bar over the timings and trials.

    The predicted speedup is dense model time / (dense model time - time the chosen formats
    save), so the model's work outside these layers stays counted. Each layer is timed on its
    captured input with the rest of the model's weights read between calls (inside the model its
    weights are not warm in the cache either), beside the whole dense model. With one torch
    thread on the CPU every time is the thread's CPU time (a neighbour's load on a shared
    machine stays out of the figures); else wall time. Once chosen, each layer's format is timed
    again as it runs inside the planned model (its other layers run between calls), and on the
    CPU the dense layers' times inside the dense model come from hooks during the model's calls;
    the prediction subtracts those. Cost: per layer, 15 interleaved rounds of the dense model and
    each candidate (about 15 x (model time + the candidates' times)), as many again for the
    chosen format, and one eval_fn call per (layer, format that beat dense). Returns a Plan.

    Raises ValueError (budget < 0, an unknown format naming the known ones, bad densities),
    TypeError (model / eval_fn / sensitivity of the wrong kind), RuntimeError (eval_fn raised:
    the layer and format named); the model is as it was in every case.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    budget = _check_budget(budget)
    densities = check_densities(densities)
    wanted = expand(formats, densities)
    if eval_fn is not None and not callable(eval_fn):
        raise TypeError(f"eval_fn must be a callable model -> float, got {type(eval_fn).__name__}")
    if sensitivity is not None:
        check_table(sensitivity)
    notes = ["compact (filter pruning) is not a per-layer format: pruning a conv's channels changes its "
             "consumers and, in a residual stage, every member of the sum; use a compress recipe"]
    if eval_fn is None:
        if wanted is None:
            warnings.warn("pysparse.plan: no eval_fn, so no format's accuracy cost can be predicted: every layer "
                          "stays dense. Pass eval_fn (model -> metric), or formats=[...] to accept formats by "
                          "speed alone.", stacklevel=3)
            wanted = ["dense"]
        else:
            warnings.warn(f"pysparse.plan: no eval_fn: the formats you listed ({wanted}) are chosen by speed alone "
                          f"and budget={budget:g} is ignored.", stacklevel=3)
        notes.append("no eval_fn: " + ("every layer dense" if wanted == ["dense"]
                                       else f"formats {wanted} chosen by speed alone, budget ignored"))

    # the baseline first: an eval_fn that fails or returns no number fails before any timing
    baseline = metric(eval_fn, model, "the model as given") if eval_fn is not None else None
    sites, more = capture(model, example_inputs)
    notes += more
    if not sites:
        raise ValueError("model has no nn.Linear or nn.Conv2d layer that example_inputs reach")
    cuda = any(p.is_cuda for p in model.parameters())
    per_site = {s.name: candidates(s.module, densities, wanted) for s in sites}
    from tqdm.auto import tqdm

    bar = tqdm(total=sum(len(v) + 1 for v in per_site.values()), desc="pysparse plan: timing", unit="run",
               disable=not progress)
    built: dict[str, dict[str, nn.Module]] = {}
    ms: dict[str, dict[str, float]] = {}
    model_in_run: dict[str, float] = {}
    total = _bytes(model)
    # Each layer's time inside the dense model, from hooks during the model contender's calls
    # (CPU only: a GPU layer's time needs a sync per layer). The prediction subtracts these, not
    # the layers timed alone, from the model's time: alone each dense layer ran up to 0.5 ms
    # (of a 10 ms MLP) faster than inside the model, and the planned model was predicted that
    # much slower than it ran.
    in_dense, hooks = _hook_layer_times(sites) if not cuda else ({}, [])

    def model_call() -> None:
        in_dense["<on>"] = True
        try:
            call(model, example_inputs)
        finally:
            in_dense["<on>"] = False

    try:
        for s in sites:
            mods = {f: build(s.module, f) for f in per_site[s.name]}
            x = s.input
            # each call sees the caches as inside the model: the rest of its weights read in between
            scrub = Scrub(total - _bytes(s.module), device="cuda" if cuda else "cpu")
            # the whole dense model is a contender too: each layer's times are then a fraction of the
            # model measured in the same interleaved run, whatever load came and went between layers
            fns = {_MODEL: model_call}
            fns.update({f: (lambda m=m: m(x)) for f, m in mods.items()})
            t = interleaved_ms(fns, cuda=cuda, before=scrub, keep=(_MODEL,), ticker=bar.update, paired_with=_MODEL)
            model_in_run[s.name] = t.pop(_MODEL)
            ms[s.name] = t
            # only the formats that beat dense go on to the accuracy trials: the rest are dropped now,
            # so at most the faster candidates of every layer are held at once
            built[s.name] = {f: m for f, m in mods.items() if f == "dense" or t[f] < (1 - MIN_GAIN) * t["dense"]}
            del scrub, mods
    except BaseException:
        bar.close()
        raise
    finally:
        for h in hooks:
            h.remove()
    bar.close()
    dense_ms = statistics.median(model_in_run.values())

    faster = built
    losses: dict[str, dict[str, Optional[float]]] = {n: {} for n in built}
    if eval_fn is not None:
        bar = tqdm(total=sum(len(v) - 1 for v in faster.values()), desc="pysparse plan: accuracy", unit="trial",
                   disable=not progress)
        try:
            losses = trial_losses(model, {s.name: s.names for s in sites}, faster, eval_fn, baseline, sensitivity,
                                  ticker=bar.update)
        finally:
            bar.close()
    calls = {s.name: s.calls for s in sites}
    # saved time in units of the dense model's median time (the layer's run had its own)
    scale = {n: dense_ms / model_in_run[n] for n in built}
    options = {n: [(f, calls[n] * scale[n] * (ms[n]["dense"] - ms[n][f]), losses[n].get(f)) for f in faster[n]]
               for n in built}
    chosen = choose(options, budget if eval_fn is not None else None)
    in_plan = _time_in_plan(model, example_inputs, sites, built, chosen, cuda, progress)
    for n, row in in_plan.items():  # the layer's time inside the dense model, where measured
        if in_dense.get(n):
            row.append(statistics.median(in_dense[n]))
    rows = [LayerPlan(s.name, s.kind, list(s.input.shape), ms[s.name],
                      {f: losses[s.name].get(f) for f in ms[s.name]}, chosen[s.name], s.calls, s.aliases,
                      _features(s.module), model_in_run[s.name], in_plan.get(s.name)) for s in sites]
    if any(s.calls > 1 for s in sites):
        notes.append("a layer called several times per forward is timed on its first call's input; its saving "
                     "counts once per call")
    return Plan(rows, dense_ms, budget=budget if eval_fn is not None else None, baseline_metric=baseline,
                notes=notes, machine=_machine(cuda), model=model, example_inputs=example_inputs, eval_fn=eval_fn)
