"""``compress``: a recipe's steps applied in order to a copy of the model, each measured."""
from __future__ import annotations

import copy
import time
from typing import Any, Callable, Iterable, Optional

import torch
from torch import nn

from .. import prune
from ..compact import compact
from .. import ops
from ..quantize import quantize_int8
from ..recover import recover
from ..sparsify import sparsify
from . import measure
from .recipe import Compact, Prune, Quantize, Recover, RecipeArg, Sparsify, Step, describe, load_recipe, to_dicts
from .report import CompressReport, StepRecord

_GRANULARITY = {"unstructured": "unstructured", "blocks": "block", "filters": "filter"}
_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "int8": torch.int8}


def _needs_data(step: Step) -> bool:
    if isinstance(step, Prune):
        return step.criterion in ("taylor", "obd")
    if isinstance(step, Recover):
        return True
    return isinstance(step, Quantize) and step.activations == "static"


def _check_data(data: Any, steps: list[Step]) -> None:
    needs = [i for i, s in enumerate(steps) if _needs_data(s)]
    if not needs:
        return
    if data is None:
        raise ValueError(f"data is needed by recipe step(s) {needs} ({describe(steps[needs[0]])}): give an iterable "
                         "of (input, target) batches, as a DataLoader yields")
    if iter(data) is data:
        raise ValueError("data must be re-iterable (a list or a DataLoader): steps read it more than once, "
                         f"got a one-shot {type(data).__name__}")
    try:
        first = next(iter(data))
    except StopIteration:
        raise ValueError("data is empty: it must yield at least one (input, target) batch") from None
    if not isinstance(first, (tuple, list)) or len(first) != 2:
        raise ValueError(f"data must yield (input, target) pairs, got a {type(first).__name__} "
                         f"{'of length ' + str(len(first)) if isinstance(first, (tuple, list)) else ''}")


def _inputs(data: Iterable, n: int) -> list:
    out = []
    for i, batch in enumerate(data):
        if i >= n:
            break
        out.append(batch[0])
    return out


def _prune(model: nn.Module, step: Prune, data: Any, loss_fn: Optional[Callable], eval_fn: Optional[Callable],
           args: tuple, progress: bool) -> Optional[dict[str, float]]:
    crit = step.criterion
    grads = dict(data=data, loss_fn=loss_fn) if crit in ("taylor", "obd") else {}
    if step.kind == "semi_structured":
        prune.semi_structured(model, skip=step.skip)
        return None
    per_layer, amount = None, step.amount
    target = step.sensitivity_target
    if target is not None:
        kw = dict(granularity=_GRANULARITY[step.kind], criterion="l1" if crit == "magnitude" and step.kind == "filters"
                  else crit, layers=None, block=step.block, progress=progress, **grads)
        if step.levels:
            kw["levels"] = step.levels
        if step.kind == "filters":
            kw["example_inputs"] = args
        table = prune.sensitivity(model, lambda m: measure.evaluate(eval_fn, m, "a sensitivity trial"), **kw)
        per_layer = table.allocate(target)
        amount = target
    if step.kind == "unstructured":
        prune.unstructured(model, amount, criterion=crit, scope=step.scope, skip=step.skip, per_layer=per_layer,
                           progress=progress, **grads)
    elif step.kind == "blocks":
        prune.blocks(model, amount, step.block, criterion=crit, scope=step.scope, skip=step.skip,
                     per_layer=per_layer, **grads)
    else:
        prune.filters(model, amount, criterion="l1" if crit == "magnitude" else crit, example_inputs=args,
                      per_layer=per_layer, round_to=step.round_to, skip=step.skip, **grads)
    return per_layer


def _apply(model: nn.Module, step: Step, teacher: nn.Module, data: Any, loss_fn: Optional[Callable],
           eval_fn: Optional[Callable], args: tuple, progress: bool) -> tuple[nn.Module, Optional[dict]]:
    if isinstance(step, Prune):
        return model, _prune(model, step, data, loss_fn, eval_fn, args, progress)
    if isinstance(step, Compact):
        return compact(model, args, fold_bn=step.fold_bn, channels_last=step.channels_last, inplace=True), None
    if isinstance(step, Recover):
        out = recover(model, teacher, data, epochs=step.epochs, steps=step.steps, lr=step.lr,
                      temperature=step.temperature, alpha=step.alpha, loss=step.loss, features=step.features,
                      progress=progress)
        return out.eval(), None
    if isinstance(step, Quantize):
        calib = _inputs(data, step.calibration_batches) if step.activations == "static" else None
        return quantize_int8(model, activations=step.activations, calibration_data=calib,
                             smoothquant_alpha=step.smoothquant_alpha, skip=step.skip, convs=step.convs), None
    assert isinstance(step, Sparsify)
    return sparsify(model, step.sparsity, step.block, dtype=_DTYPES[step.dtype], skip=step.skip), None


def _record(name: str, model: nn.Module, args: tuple, eval_fn: Optional[Callable], reps: int,
            seconds: float = 0.0, per_layer: Optional[dict] = None) -> StepRecord:
    metric = measure.evaluate(eval_fn, model, "the model as given" if name == "original" else f"the model after '{name}'") if eval_fn is not None else None
    ms = measure.latencies_ms([model], args, rounds=max(3, reps // 3))[0]
    return StepRecord(step=name, metric=metric, size_bytes=measure.size_bytes(model),
                      nonzero_weights=measure.nonzero_weights(model), macs=measure.macs(model, args), latency_ms=ms,
                      seconds=seconds, per_layer=per_layer)


def compress(model: nn.Module, recipe: RecipeArg, *, data: Optional[Iterable] = None,
             eval_fn: Optional[Callable[[nn.Module], float]] = None, example_inputs: Any,
             loss_fn: Optional[Callable[[Any, Any], torch.Tensor]] = None, progress: bool = True,
             latency_reps: int = 15) -> tuple[nn.Module, CompressReport]:
    """Apply ``recipe`` to a copy of ``model``; returns (compressed model, report).

    recipe: steps (``pysparse.compress.Prune`` / ``Compact`` / ``Recover`` / ``Quantize`` /
      ``Sparsify``), their dicts (``{"step": "prune", "kind": "filters", "amount": 0.5}``), or a
      JSON/YAML file of them; see ``pysparse.compress.recipe``.
    data: (input, target) batches, re-iterable (a DataLoader): gradients for the taylor/obd
      criteria, the distillation data of ``recover`` (the original model is the teacher), the
      calibration inputs of static int8.
    eval_fn: model -> float, higher is better (accuracy): measured before and after every step, and
      needed by ``amount="sensitivity:<target>"``.
    example_inputs: a tensor or tuple of tensors (or a dict of keyword tensors) for one call: the
      trace of ``compact``, the MAC count and the latency the report gives.
    loss_fn: (output, target) -> loss for the gradient criteria (default cross-entropy).
    latency_reps: interleaved rounds of the final original-vs-compressed timing (each step's own
      figure takes a third of them). With one torch thread the clock is thread CPU time (steady
      on a shared machine), else wall time; the report's ``machine`` names it.

    The model given is never changed, also when a step fails (the error names the step).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    steps = load_recipe(recipe)
    if eval_fn is not None and not callable(eval_fn):
        raise TypeError(f"eval_fn must be callable (model -> float), got {type(eval_fn).__name__}")
    for i, s in enumerate(steps):
        if isinstance(s, Prune) and s.sensitivity_target is not None and eval_fn is None:
            raise ValueError(f"recipe step {i} ({describe(s)}): amount='sensitivity:...' needs eval_fn")
    _check_data(data, steps)
    if not isinstance(latency_reps, int) or latency_reps < 3:
        raise ValueError(f"latency_reps must be an int >= 3, got {latency_reps!r}")
    args = measure.as_args(example_inputs)

    teacher = copy.deepcopy(model).eval()
    work = copy.deepcopy(model).eval()
    try:
        with torch.no_grad():
            measure.call(work, args)
    except Exception as e:
        raise ValueError(f"example_inputs: the model does not run on them ({type(e).__name__}: {e})") from e

    records = [_record("original", work, args, eval_fn, latency_reps)]
    for i, step in enumerate(steps):
        t0 = time.perf_counter()
        try:
            work, per_layer = _apply(work, step, teacher, data, loss_fn, eval_fn, args, progress)
        except (ValueError, TypeError) as e:
            raise type(e)(f"recipe step {i} ({describe(step)}): {e}") from e
        except RuntimeError as e:
            raise RuntimeError(f"recipe step {i} ({describe(step)}): {e}") from e
        records.append(_record(describe(step), work, args, eval_fn, latency_reps, time.perf_counter() - t0,
                               per_layer))
    work.eval()
    original_ms, final_ms = measure.latencies_ms([teacher, work], args, rounds=latency_reps)
    report = CompressReport(recipe=to_dicts(steps), records=records, layers=measure.layer_kinds(work),
                            original_ms=original_ms, final_ms=final_ms,
                            machine={"cpu_isa": ops._C.selected_isa(), "threads": torch.get_num_threads(),
                                     "clock": measure.clock_name()})
    return work, report
