"""Compression recipes: a list of steps, each a small frozen dataclass.

A recipe is given as a list of step objects, a list of dicts (``{"step": "prune", "kind": "filters",
"amount": 0.5}``), a dict ``{"steps": [...]}``, or the path of a JSON or YAML file holding either.
Everything is checked before any step runs, so a typo in step 4 does not cost the three steps before it.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

PRUNE_KINDS = ("unstructured", "blocks", "filters", "semi_structured")
CRITERIA = ("magnitude", "l1", "l2", "taylor", "obd", "bn_scale")
SENSITIVITY_PREFIX = "sensitivity:"


def _check_fraction(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{where} must be a number in [0, 1), got {value!r}")
    if not 0.0 <= float(value) < 1.0:
        raise ValueError(f"{where} must be in [0, 1), got {value}")
    return float(value)


def _check_block(block: Any, where: str) -> Optional[tuple[int, int]]:
    if block is None:
        return None
    if isinstance(block, int):
        block = (block, block)
    if (not isinstance(block, (list, tuple)) or len(block) != 2
            or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)):
        raise ValueError(f"{where} must be a positive int or a pair of positive ints, got {block!r}")
    return (int(block[0]), int(block[1]))


@dataclass(frozen=True)
class Prune:
    """Prune with masks (``pysparse.prune``). kind: unstructured | blocks | filters | semi_structured.

    amount: the fraction removed in every layer, or ``"sensitivity:<target>"``: measure each layer's
    sensitivity with ``eval_fn`` and allocate per-layer amounts whose weight-weighted mean is target.
    criterion: magnitude (= l1), l2, taylor, obd (need ``data``); filters also take bn_scale.
    """
    kind: str
    amount: Union[float, str, None] = None
    criterion: str = "magnitude"
    block: Optional[tuple[int, int]] = None
    round_to: Optional[int] = None
    scope: str = "layer"
    skip: tuple[str, ...] = ()
    levels: Optional[tuple[float, ...]] = None

    def __post_init__(self) -> None:
        if self.kind not in PRUNE_KINDS:
            raise ValueError(f"prune step: kind must be one of {PRUNE_KINDS}, got {self.kind!r}")
        if self.criterion not in CRITERIA:
            raise ValueError(f"prune step: criterion must be one of {CRITERIA}, got {self.criterion!r}")
        if self.criterion == "bn_scale" and self.kind != "filters":
            raise ValueError("prune step: criterion 'bn_scale' scores whole channels: only kind 'filters' takes it")
        if self.scope not in ("layer", "global"):
            raise ValueError(f"prune step: scope must be 'layer' or 'global', got {self.scope!r}")
        if self.kind == "semi_structured":
            if self.amount not in (None, 0.5):
                raise ValueError(f"prune step: kind 'semi_structured' keeps 2 of every 4 weights (amount 0.5), "
                                 f"got amount={self.amount!r}")
        elif isinstance(self.amount, str):
            target = self.sensitivity_target
            _check_fraction(target, f"prune step: the target of amount={self.amount!r}")
        else:
            _check_fraction(self.amount, "prune step: amount")
        object.__setattr__(self, "block", _check_block(self.block, "prune step: block"))
        object.__setattr__(self, "skip", tuple(self.skip))
        if self.levels is not None:
            object.__setattr__(self, "levels", tuple(_check_fraction(v, "prune step: levels[]") for v in self.levels))
        if self.round_to is not None and (not isinstance(self.round_to, int) or self.round_to <= 0):
            raise ValueError(f"prune step: round_to must be a positive int, got {self.round_to!r}")

    @property
    def sensitivity_target(self) -> Optional[float]:
        """The global target of ``amount="sensitivity:<target>"``, else None."""
        if not isinstance(self.amount, str):
            return None
        if not self.amount.startswith(SENSITIVITY_PREFIX):
            raise ValueError(f"prune step: amount must be a number or 'sensitivity:<target>', got {self.amount!r}")
        try:
            return float(self.amount[len(SENSITIVITY_PREFIX):])
        except ValueError:
            raise ValueError(f"prune step: amount {self.amount!r}: the target after 'sensitivity:' "
                             "must be a number") from None


@dataclass(frozen=True)
class Compact:
    """Remove pruned channels physically (``pysparse.compact``); BatchNorm folded, channels_last."""
    fold_bn: bool = True
    channels_last: bool = True


@dataclass(frozen=True)
class Recover:
    """Fine-tune by distillation from the original model (``pysparse.recover``)."""
    epochs: Optional[int] = None
    steps: Optional[int] = None
    lr: Optional[float] = None
    temperature: float = 2.0
    alpha: float = 0.5
    loss: str = "kl"
    features: Optional[Any] = None

    def __post_init__(self) -> None:
        if self.epochs is None and self.steps is None:
            object.__setattr__(self, "epochs", 1)
        for name in ("epochs", "steps"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v <= 0):
                raise ValueError(f"recover step: {name} must be a positive int, got {v!r}")
        if self.lr is not None and (not isinstance(self.lr, (int, float)) or self.lr <= 0):
            raise ValueError(f"recover step: lr must be a positive number, got {self.lr!r}")
        if self.loss not in ("kl", "mse"):
            raise ValueError(f"recover step: loss must be 'kl' or 'mse', got {self.loss!r}")
        if not 0.0 <= float(self.alpha) <= 1.0:
            raise ValueError(f"recover step: alpha must be in [0, 1], got {self.alpha!r}")
        if float(self.temperature) <= 0:
            raise ValueError(f"recover step: temperature must be > 0, got {self.temperature!r}")


@dataclass(frozen=True)
class Quantize:
    """int8 weights (``pysparse.quantize_int8``); static activations calibrate on ``data``'s inputs."""
    activations: str = "dynamic"
    convs: Optional[bool] = None
    smoothquant_alpha: Optional[float] = None
    calibration_batches: int = 8
    skip: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.activations not in ("dynamic", "static"):
            raise ValueError(f"quantize step: activations must be 'dynamic' or 'static', got {self.activations!r}")
        if not isinstance(self.calibration_batches, int) or self.calibration_batches <= 0:
            raise ValueError(f"quantize step: calibration_batches must be a positive int, "
                             f"got {self.calibration_batches!r}")
        object.__setattr__(self, "skip", tuple(self.skip))


@dataclass(frozen=True)
class Sparsify:
    """Block-sparse Linear layers (``pysparse.sparsify``); dtype fp32 | bf16 | int8."""
    sparsity: float
    block: Optional[tuple[int, int]] = None
    dtype: str = "fp32"
    skip: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _check_fraction(self.sparsity, "sparsify step: sparsity")
        if self.dtype not in ("fp32", "bf16", "int8"):
            raise ValueError(f"sparsify step: dtype must be 'fp32', 'bf16' or 'int8', got {self.dtype!r}")
        object.__setattr__(self, "block", _check_block(self.block, "sparsify step: block"))
        object.__setattr__(self, "skip", tuple(self.skip))


Step = Union[Prune, Compact, Recover, Quantize, Sparsify]
STEPS: dict[str, type] = {"prune": Prune, "compact": Compact, "recover": Recover, "quantize": Quantize,
                          "sparsify": Sparsify}
RecipeArg = Union[str, os.PathLike, dict, Sequence[Union[Step, dict]]]


def step_name(step: Step) -> str:
    """The recipe name of a step object ("prune", "compact", ...)."""
    for name, cls in STEPS.items():
        if isinstance(step, cls):
            return name
    raise TypeError(f"not a recipe step: {step!r}")


def _from_dict(d: dict, i: int) -> Step:
    if not isinstance(d, dict):
        raise ValueError(f"recipe step {i}: expected a dict or a step object, got {type(d).__name__}")
    d = dict(d)
    name = d.pop("step", None)
    if name not in STEPS:
        raise ValueError(f"recipe step {i}: 'step' must be one of {tuple(STEPS)}, got {name!r}")
    cls = STEPS[name]
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"recipe step {i} ({name}): unknown field(s) {unknown}; {name} takes {sorted(names)}")
    for k in ("block", "levels", "skip"):
        if isinstance(d.get(k), list):
            d[k] = tuple(d[k])
    try:
        return cls(**d)
    except TypeError as e:  # a missing required field
        raise ValueError(f"recipe step {i} ({name}): {e}") from None
    except ValueError as e:
        raise ValueError(f"recipe step {i}: {e}") from None


def _read_file(path: str) -> Any:
    if not os.path.isfile(path):
        raise ValueError(f"recipe: no such file {path!r}")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if path.endswith((".yaml", ".yml")):
        import yaml

        try:
            return yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ValueError(f"recipe {path!r}: not valid YAML: {e}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"recipe {path!r}: not valid JSON ({e}); name YAML files .yaml or .yml") from None


def load_recipe(recipe: RecipeArg) -> list[Step]:
    """The recipe as a list of checked step objects (see the module docstring for the forms taken)."""
    if isinstance(recipe, (str, os.PathLike)):
        recipe = _read_file(os.fspath(recipe))
    if isinstance(recipe, dict):
        if "steps" not in recipe:
            raise ValueError("recipe: a dict recipe holds its list under 'steps'")
        recipe = recipe["steps"]
    if not isinstance(recipe, (list, tuple)) or not recipe:
        raise ValueError(f"recipe must be a non-empty list of steps, got {recipe!r}")
    steps = [s if isinstance(s, tuple(STEPS.values())) else _from_dict(s, i) for i, s in enumerate(recipe)]
    return steps


def to_dicts(steps: Sequence[Step]) -> list[dict]:
    """The steps as plain dicts (the inverse of load_recipe), for reports and JSON."""
    out = []
    for s in steps:
        d = {"step": step_name(s)}
        d.update({f.name: getattr(s, f.name) for f in dataclasses.fields(s)})
        out.append(d)
    return out


def describe(step: Step) -> str:
    """A short one-line description of a step for tables."""
    if isinstance(step, Prune):
        amount = "2:4" if step.kind == "semi_structured" else step.amount
        return f"prune {step.kind} {amount} ({step.criterion})"
    if isinstance(step, Recover):
        n = f"{step.epochs} epochs" if step.epochs else f"{step.steps} steps"
        return f"recover {n} ({step.loss}, T={step.temperature})"
    if isinstance(step, Quantize):
        return f"quantize int8 ({step.activations})"
    if isinstance(step, Sparsify):
        return f"sparsify {step.sparsity} ({step.dtype})"
    return "compact"


__all__ = ["Prune", "Compact", "Recover", "Quantize", "Sparsify", "Step", "STEPS", "load_recipe", "to_dicts",
           "describe", "step_name"]
